"""Pick one quantization option per layer: least summed sensitivity within a bit budget.

This is a multiple-choice knapsack. `solve_dp` solves it exactly with a Pareto-frontier dynamic
program (costs are large integers, so no table indexed by cost); `solve_milp` hands the same
problem to HiGHS through scipy, as a cross-check or for problems with odd structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Choice:
    """One way to quantize one layer: its name (e.g. "W4A16"), storage cost in bits, and score
    (estimated loss increase; lower is better)."""

    option: str
    cost: int
    score: float


@dataclass
class Problem:
    """choices: layer -> its options; budget: total bits allowed; tied: groups of layers that
    must take the same option (q/k/v, gate/up, so fused kernels can load them together);
    fixed: layer -> the option it must take (e.g. lm_head at W8A16); n_weights: optional, only
    used to state bits per weight in error messages."""

    choices: dict[str, list[Choice]]
    budget: int
    tied: list[list[str]] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)
    n_weights: int | None = None

    def without(self, options: set[str] | list[str]) -> "Problem":
        """The same problem with these options removed from every layer (e.g. all below a
        minimum bit width). A fixed layer whose option is removed is then an error."""
        drop = set(options)
        return Problem(
            {name: [c for c in cs if c.option not in drop] for name, cs in self.choices.items()},
            self.budget, [list(g) for g in self.tied], dict(self.fixed), self.n_weights,
        )

    def _chosen(self, plan: dict[str, str]) -> list[Choice]:
        out = []
        for name, cs in self.choices.items():
            if name not in plan:
                raise LowbitError(f"the plan has no option for layer {name!r}")
            match = [c for c in cs if c.option == plan[name]]
            if not match:
                raise LowbitError(f"layer {name!r} has no option {plan[name]!r}")
            out.append(match[0])
        return out

    def cost(self, plan: dict[str, str]) -> int:
        return sum(c.cost for c in self._chosen(plan))

    def score(self, plan: dict[str, str]) -> float:
        return math.fsum(c.score for c in self._chosen(plan))


@dataclass
class _Item:
    """A layer, or a tied group of layers, that takes one option; costs/scores summed over members."""

    members: list[str]
    names: list[str]
    costs: list[int]
    scores: list[float]


def _budget_words(problem: Problem, bits: int) -> str:
    if problem.n_weights:
        return f"{bits} bits ({bits / problem.n_weights:.4g} bits per weight)"
    return f"{bits} bits"


def _items(problem: Problem) -> tuple[list[_Item], int]:
    """Validate the problem and merge each tied group (and apply fixed options) into one item."""
    by_layer: dict[str, dict[str, Choice]] = {}
    for name, cs in problem.choices.items():
        if not cs:
            raise LowbitError(f"layer {name!r} has no options left")
        opts: dict[str, Choice] = {}
        for c in cs:
            if c.option in opts:
                raise LowbitError(f"layer {name!r} lists option {c.option!r} twice")
            if isinstance(c.cost, bool) or int(c.cost) != c.cost or c.cost < 0:
                raise LowbitError(
                    f"layer {name!r} option {c.option!r}: cost must be a non-negative integer, got {c.cost!r}"
                )
            if not math.isfinite(c.score):
                raise LowbitError(f"layer {name!r} option {c.option!r}: score must be finite, got {c.score!r}")
            opts[c.option] = c
        by_layer[name] = opts

    for name, option in problem.fixed.items():
        if name not in by_layer:
            raise LowbitError(f"unknown layer {name!r} in fixed")
        if option not in by_layer[name]:
            raise LowbitError(
                f"layer {name!r} is fixed to {option!r} but its options are {', '.join(by_layer[name])}"
            )

    # Union-find, so overlapping tied groups (a layer listed twice) merge instead of conflicting.
    parent = {name: name for name in by_layer}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in problem.tied:
        for name in group:
            if name not in by_layer:
                raise LowbitError(f"unknown layer {name!r} in tied group {list(group)}")
        for name in group[1:]:
            parent[root(name)] = root(group[0])
    groups: dict[str, list[str]] = {}
    for name in by_layer:  # keeps the order of problem.choices
        groups.setdefault(root(name), []).append(name)

    items = []
    for members in groups.values():
        common = [o for o in by_layer[members[0]] if all(o in by_layer[m] for m in members)]
        pinned = {problem.fixed[m] for m in members if m in problem.fixed}
        if pinned:  # fixed members pin the whole group; two different pins leave nothing
            common = [o for o in common if {o} == pinned]
        if not common:
            why = " given their fixed options" if pinned else ""
            raise LowbitError(f"tied group {members} has no option common to all its layers{why}")
        items.append(_Item(
            members, common,
            [sum(int(by_layer[m][o].cost) for m in members) for o in common],
            [math.fsum(by_layer[m][o].score for m in members) for o in common],
        ))

    budget = math.floor(problem.budget)  # integer costs fit a budget iff they fit its floor
    least = sum(min(it.costs) for it in items)
    if least > budget:
        raise LowbitError(
            f"the budget of {_budget_words(problem, budget)} is below the minimum achievable "
            f"{_budget_words(problem, least)}"
        )
    return items, budget


def _plan(items: list[_Item], picks: list[int]) -> dict[str, str]:
    return {m: it.names[j] for it, j in zip(items, picks) for m in it.members}


def _lagrange(cost: np.ndarray, score: np.ndarray, budget: int) -> tuple[float, float]:
    """Lagrangian relaxation with a price lam per bit: the best price found (for lower bounds)
    and the best score of a feasible plan seen on the way. Used only to prune the DP."""
    fcost = cost.astype(np.float64)
    rows = np.arange(len(cost))
    best_lam, best_dual, incumbent = 0.0, -math.inf, math.inf

    def try_price(lam: float) -> bool:
        nonlocal best_lam, best_dual, incumbent
        v = score + lam * fcost
        j = np.argmin(v, axis=1)
        dual = float(v[rows, j].sum()) - lam * budget
        if dual > best_dual:
            best_lam, best_dual = lam, dual
        fits = int(cost[rows, j].sum()) <= budget
        if fits:
            incumbent = min(incumbent, float(score[rows, j].sum()))
        return fits

    if try_price(0.0):
        return best_lam, incumbent  # the unconstrained best fits: it is optimal
    # Integer costs differ by >= 1 bit, so above this price every item takes its cheapest
    # option (ties aside), which fits the budget (checked earlier).
    span = float(np.ptp(np.where(np.isfinite(score), score, score[:, :1]), axis=1).max())
    lo, hi = 0.0, 2.0 * (span + 1.0)
    try_price(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if try_price(mid):
            hi = mid
        else:
            lo = mid
    return best_lam, incumbent


def solve_dp(problem: Problem, *, bound: bool = True) -> dict[str, str]:
    """Exact optimum: layer -> option. Keeps, item by item, the Pareto frontier of (total cost,
    total score) partial plans, dropping those that cannot fit the budget even with the cheapest
    remaining options and (with bound=True, for speed only) those whose Lagrangian lower bound is
    worse than a known feasible plan. Equal-score optima resolve to the cheaper plan."""
    items, budget = _items(problem)
    if not items:
        return {}
    n, k = len(items), max(len(it.names) for it in items)
    top = sum(max(it.costs) for it in items)
    budget = min(budget, top)  # budget beyond the dearest plan is slack
    if top >= 2**62:
        raise LowbitError(f"total cost {top} bits is too large for the solver (over 2^62)")
    cost = np.zeros((n, k), np.int64)
    score = np.full((n, k), np.inf)
    for i, it in enumerate(items):
        cost[i, : len(it.costs)] = it.costs
        score[i, : len(it.scores)] = it.scores
    # cheapest cost of items i.. (Python ints: exact)
    rest = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        rest[i] = rest[i + 1] + min(items[i].costs)

    if bound:
        lam, incumbent = _lagrange(cost, score, budget)
        low = np.min(score + lam * cost.astype(np.float64), axis=1)  # per item, at that price
        rest_low = np.concatenate([np.cumsum(low[::-1])[::-1], [0.0]])
        # rounding slack, so the optimum itself is never pruned
        tol = 1e-9 * (float(np.abs(np.where(np.isfinite(score), score, 0)).max(axis=1).sum()) + lam * budget)

    f_cost = np.zeros(1, np.int64)
    f_score = np.zeros(1)
    history = []  # per item: (parent index in previous frontier, option index)
    for i, it in enumerate(items):
        ic = np.asarray(it.costs, np.int64)
        sc = np.asarray(it.scores)
        m = len(ic)
        nc = (f_cost[:, None] + ic[None, :]).ravel()
        ns = (f_score[:, None] + sc[None, :]).ravel()
        keep = nc <= budget - rest[i + 1]
        if bound:
            lower = ns + rest_low[i + 1] - lam * (budget - nc).astype(np.float64)
            keep &= lower <= incumbent + tol
        idx = np.flatnonzero(keep)
        if not len(idx):  # only reachable through rounding in the bound: redo without it
            return solve_dp(problem, bound=False)
        nc, ns = nc[idx], ns[idx]
        order = np.lexsort((ns, nc))  # by cost, then score
        idx, nc, ns = idx[order], nc[order], ns[order]
        # Pareto: keep a state only if it scores strictly better than every cheaper-or-equal one.
        front = np.empty(len(ns), bool)
        front[0] = True
        front[1:] = ns[1:] < np.minimum.accumulate(ns)[:-1]
        idx, f_cost, f_score = idx[front], nc[front], ns[front]
        history.append((idx // m, (idx % m).astype(np.int16)))

    # The frontier's scores fall as cost rises: the last state is the best.
    at = len(f_cost) - 1
    picks = [0] * n
    for i in range(n - 1, -1, -1):
        par, opt = history[i]
        picks[i] = int(opt[at])
        at = int(par[at])
    return _plan(items, picks)


def solve_milp(problem: Problem, *, time_limit: float | None = None) -> dict[str, str]:
    """The same optimum as an integer program for HiGHS (scipy.optimize.milp): a binary x per
    layer and option, one option per layer, the budget row, and equality rows that make tied
    layers take the same option."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError:
        raise LowbitError("the milp solver needs scipy: pip install scipy") from None
    items, budget = _items(problem)
    if not items:
        return {}
    layers = {name: {c.option: c for c in cs} for name, cs in problem.choices.items()}

    var = {}  # (layer, option) -> column
    obj, shifted = [], []
    base = 0
    for it in items:
        for m in it.members:
            cheapest = min(int(layers[m][o].cost) for o in it.names)
            base += cheapest
            for o in it.names:
                var[m, o] = len(obj)
                obj.append(layers[m][o].score)
                shifted.append(int(layers[m][o].cost) - cheapest)
    # Costs are ~1e7 bits; HiGHS' tolerances are absolute, so shift each layer's costs to start
    # at 0 and divide by their gcd (exact for integer plans) to keep coefficients small.
    g = math.gcd(*shifted) or 1
    coef = [c // g for c in shifted]
    room = (budget - base) // g

    rows, cols, vals, lb, ub = [], [], [], [], []

    def row(entries, low, high):
        r = len(lb)
        for c, v in entries:
            rows.append(r), cols.append(c), vals.append(v)
        lb.append(low), ub.append(high)

    for it in items:
        for m in it.members:
            row([(var[m, o], 1.0) for o in it.names], 1, 1)
        for m in it.members[1:]:
            for o in it.names:
                row([(var[it.members[0], o], 1.0), (var[m, o], -1.0)], 0, 0)
    budget_row = len(lb)
    row([(j, float(c)) for j, c in enumerate(coef) if c], -np.inf, room)

    options = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    names = {j: key for key, j in var.items()}
    for _ in range(3):
        a = coo_matrix((vals, (rows, cols)), shape=(len(lb), len(obj)))
        res = milp(np.asarray(obj), integrality=np.ones(len(obj)), bounds=Bounds(0, 1),
                   constraints=LinearConstraint(a, lb, ub), options=options)
        if res.x is None:
            raise LowbitError(f"the milp solver found no plan: {res.message}")
        plan = {}
        for name, opts in layers.items():
            best = max((var[name, o] for o in opts if (name, o) in var), key=lambda j: res.x[j])
            plan[name] = names[best][1]
        over = sum(coef[var[m, o]] for m, o in plan.items()) - room
        if over <= 0:
            return plan
        ub[budget_row] -= over  # rounding let it over the budget: tighten and solve again
    raise LowbitError("the milp solver could not keep within the budget (numerical trouble)")


SOLVERS = {"dp": solve_dp, "milp": solve_milp}
