"""Bit-allocation solvers: the DP against brute force, the DP against the MILP, and bad input."""
import importlib.util
import itertools
import math
import random
import sys

import pytest

from lowbit.allocate import SOLVERS, Choice, Problem, average_bits, layer_bits, solve_dp, solve_milp
from lowbit.errors import LowbitError
from lowbit.schemes import Scheme, get_scheme

needs_scipy = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None,
    reason="scipy is not installed (optional dependency of the milp solver: pip install scipy)",
)

POOL = ["W2", "W3", "W4", "W8"]
BITS = {"W2": 2, "W3": 3, "W4": 4, "W8": 8}


# ---------------------------------------------------------------- cost


def test_layer_bits_by_hand():
    # 172 inputs in groups of 32 -> 6 groups (the last one partial); each group of each of the
    # 64 rows stores a 16-bit scale and a 4-bit zero point.
    assert layer_bits(64, 172, Scheme(4, 32)) == 64 * 172 * 4 + 64 * 6 * (16 + 4) == 51712
    # per channel: one group per row
    assert layer_bits(64, 172, Scheme(8, -1)) == 64 * 172 * 8 + 64 * 1 * (16 + 8)
    # W4A16 preset (group 128) on a 4096x4096 projection: 32 groups per row
    assert layer_bits(4096, 4096, get_scheme("W4A16")) == 4096 * 4096 * 4 + 4096 * 32 * 20
    # zero points are stored either way, so symmetry does not change the cost
    assert layer_bits(10, 300, Scheme(2, 64, sym=True)) == layer_bits(10, 300, Scheme(2, 64, sym=False))
    assert layer_bits(10, 300, Scheme(2, 64)) == 10 * 300 * 2 + 10 * 5 * 18


def test_average_bits():
    n = 4096 * 4096
    c = layer_bits(4096, 4096, get_scheme("W4A16"))
    assert average_bits({"a": c, "b": c}, 2 * n) == pytest.approx(4 + 20 / 128)
    assert average_bits([c], n) == pytest.approx(4.15625)
    with pytest.raises(LowbitError):
        average_bits([c], 0)


# ---------------------------------------------------------------- brute force vs DP


def brute_force(p: Problem):
    """Best score over every plan that fits, ties and fixed options respected; None if none."""
    names = list(p.choices)
    best = None
    for combo in itertools.product(*(p.choices[n] for n in names)):
        plan = {n: c.option for n, c in zip(names, combo)}
        if sum(c.cost for c in combo) > p.budget:
            continue
        if any(plan[l] != o for l, o in p.fixed.items()):
            continue
        if any(len({plan[l] for l in g}) > 1 for g in p.tied):
            continue
        s = math.fsum(c.score for c in combo)
        best = s if best is None else min(best, s)
    return best


def random_small(rng: random.Random) -> Problem:
    n = rng.randint(3, 7)
    choices = {}
    for i in range(n):
        opts = sorted(rng.sample(POOL, rng.randint(2, 4)), key=BITS.get)
        size = rng.randint(1, 50)
        integer_scores = rng.random() < 0.3  # many equal scores: exercise tie handling
        choices[f"l{i}"] = [
            Choice(o, size * BITS[o] + rng.randint(0, 5),
                   float(rng.randint(0, 4)) if integer_scores else rng.random() * 2.0 ** -BITS[o])
            for o in opts
        ]
    names = list(choices)
    tied = []
    if rng.random() < 0.5:
        tied.append(rng.sample(names, rng.randint(2, 3)))
    fixed = {}
    if rng.random() < 0.4:
        l = rng.choice(names)
        fixed[l] = rng.choice(choices[l]).option
    lo = sum(min(c.cost for c in cs) for cs in choices.values())
    hi = sum(max(c.cost for c in cs) for cs in choices.values())
    kind = rng.random()
    if kind < 0.2:
        budget = lo  # tightest that fits when nothing is tied or fixed
    elif kind < 0.3:
        budget = lo - rng.randint(1, 3)  # infeasible
    elif kind < 0.6:  # exactly the cost of some plan: the optimum may sit on the budget
        budget = sum(rng.choice(cs).cost for cs in choices.values())
    else:
        budget = rng.randint(lo, hi)
    return Problem(choices, budget, tied, fixed)


def check_plan(p: Problem, plan: dict):
    assert set(plan) == set(p.choices)
    assert p.cost(plan) <= p.budget
    for group in p.tied:
        assert len({plan[l] for l in group}) == 1, (group, plan)
    for l, o in p.fixed.items():
        assert plan[l] == o


@pytest.mark.parametrize("bound", [True, False])
def test_dp_matches_brute_force(bound):
    rng = random.Random(1234)
    solved = infeasible = 0
    for _ in range(400):
        p = random_small(rng)
        best = brute_force(p)
        if best is None:
            with pytest.raises(LowbitError):
                solve_dp(p, bound=bound)
            infeasible += 1
            continue
        plan = solve_dp(p, bound=bound)
        check_plan(p, plan)
        assert p.score(plan) == pytest.approx(best, rel=1e-12, abs=1e-12)
        solved += 1
    assert solved > 250 and infeasible > 20  # both branches really exercised


# ---------------------------------------------------------------- DP vs MILP


def random_medium(rng: random.Random, n_layers=40, n_opts=(3, 5)) -> Problem:
    """Realistic magnitudes: costs in the millions of bits, sensitivity falling with bits."""
    choices = {}
    for i in range(n_layers):
        out, inp = rng.choice([(1024, 4096), (4096, 4096), (14336, 4096), (4096, 14336)])
        opts = sorted(rng.sample(["W2A16", "W3A16", "W4A16", "W8A16", "W2A16G32"], rng.randint(*n_opts)))
        sens = rng.lognormvariate(0, 1)
        choices[f"b{i // 8}.l{i % 8}"] = [
            Choice(o, layer_bits(out, inp, get_scheme(o)),
                   sens * 4.0 ** -get_scheme(o).bits * (0.7 if "G32" in o else 1.0) * rng.uniform(0.9, 1.1))
            for o in opts
        ]
    names = list(choices)
    tied = [names[j:j + 3] for j in range(0, 12, 3)]  # four q/k/v-like triples
    tied = [g for g in tied if set.intersection(*({c.option for c in choices[l]} for l in g))]
    fixed = {names[-1]: choices[names[-1]][-1].option}
    lo = sum(min(c.cost for c in cs) for cs in choices.values())
    hi = sum(max(c.cost for c in cs) for cs in choices.values())
    return Problem(choices, lo + int(rng.uniform(0.1, 0.9) * (hi - lo)), tied, fixed)


@needs_scipy
def test_dp_and_milp_agree():
    rng = random.Random(99)
    for _ in range(15):
        p = random_medium(rng)
        try:
            dp = solve_dp(p)
        except LowbitError:
            with pytest.raises(LowbitError):
                solve_milp(p)
            continue
        mi = solve_milp(p)
        check_plan(p, dp)
        check_plan(p, mi)
        # HiGHS stops at an absolute gap of 1e-6
        assert p.score(dp) == pytest.approx(p.score(mi), rel=1e-9, abs=2e-6)
        assert p.score(dp) <= p.score(mi) + 1e-12  # the DP is exact


@needs_scipy
def test_dp_and_milp_agree_on_a_tight_model_sized_problem():
    # 300 layers in Llama-like blocks, q/k/v and gate/up tied, budget ~3 bits per weight
    rng = random.Random(7)
    shapes = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
    choices, tied, n_weights = {}, [], 0
    for i in range(300):
        b, kind = divmod(i, 7)
        out, inp = shapes[list(shapes)[kind]]
        n_weights += out * inp
        sens = rng.lognormvariate(0, 1) * out * inp / 1e6
        choices[f"{b}.{list(shapes)[kind]}"] = [
            Choice(o, layer_bits(out, inp, get_scheme(o)), sens * 4.0 ** -get_scheme(o).bits)
            for o in ("W2A16", "W3A16", "W4A16", "W8A16")
        ]
    for b in range(300 // 7):
        tied += [[f"{b}.q", f"{b}.k", f"{b}.v"], [f"{b}.gate", f"{b}.up"]]
    p = Problem(choices, 3 * n_weights, tied, {"42.q": "W8A16"}, n_weights=n_weights)
    dp, mi = solve_dp(p), solve_milp(p)
    check_plan(p, dp)
    check_plan(p, mi)
    assert p.score(dp) == pytest.approx(p.score(mi), rel=1e-9, abs=2e-6)
    assert 2.9 < average_bits([p.cost(dp)], n_weights) <= 3.0


# ---------------------------------------------------------------- constraints, errors


def two_layers(budget, **kw):
    return Problem({
        "a": [Choice("W2", 2, 10.0), Choice("W4", 4, 1.0)],
        "b": [Choice("W2", 2, 1.0), Choice("W4", 4, 0.9)],
    }, budget, **kw)


@pytest.mark.parametrize("solver", [solve_dp, pytest.param(solve_milp, marks=needs_scipy)])
def test_ties_and_fixed_change_the_answer(solver):
    assert solver(two_layers(6)) == {"a": "W4", "b": "W2"}  # untied optimum splits
    assert solver(two_layers(6, tied=[["a", "b"]])) == {"a": "W2", "b": "W2"}  # W4+W4 = 8 > 6
    assert solver(two_layers(8, tied=[["a", "b"]])) == {"a": "W4", "b": "W4"}
    assert solver(two_layers(6, fixed={"b": "W4"})) == {"a": "W2", "b": "W4"}
    assert solver(two_layers(100)) == {"a": "W4", "b": "W4"}


def test_overlapping_tied_groups_merge():
    p = Problem({n: [Choice("W2", 2, 5.0), Choice("W4", 4, 1.0)] for n in "abcd"}, 12,
                tied=[["a", "b"], ["b", "c"]])
    plan = solve_dp(p)
    assert plan["a"] == plan["b"] == plan["c"]
    assert plan == {"a": "W2", "b": "W2", "c": "W2", "d": "W4"}


@pytest.mark.parametrize("solver", [solve_dp, pytest.param(solve_milp, marks=needs_scipy)])
def test_errors(solver):
    with pytest.raises(LowbitError, match=r"minimum achievable 4 bits \(2 bits per weight\)"):
        solver(Problem(two_layers(3).choices, 3, n_weights=2))
    with pytest.raises(LowbitError, match="minimum achievable 8 bits"):
        solver(two_layers(7, tied=[["a", "b"]], fixed={"a": "W4"}))
    with pytest.raises(LowbitError, match="unknown layer 'zz' in tied"):
        solver(two_layers(8, tied=[["a", "zz"]]))
    with pytest.raises(LowbitError, match="unknown layer 'zz' in fixed"):
        solver(two_layers(8, fixed={"zz": "W4"}))
    with pytest.raises(LowbitError, match="fixed to 'W8'"):
        solver(two_layers(8, fixed={"a": "W8"}))
    with pytest.raises(LowbitError, match="no option common"):
        solver(Problem({"a": [Choice("W2", 2, 1.0)], "b": [Choice("W4", 4, 1.0)]}, 10, [["a", "b"]]))
    with pytest.raises(LowbitError, match="no option common"):
        solver(two_layers(8, tied=[["a", "b"]], fixed={"a": "W2", "b": "W4"}))
    with pytest.raises(LowbitError, match="no options left"):
        solver(two_layers(8).without({"W2", "W4"}))


def test_without_drops_options():
    p = two_layers(6).without({"W2"})
    assert [c.option for c in p.choices["a"]] == ["W4"]
    with pytest.raises(LowbitError, match="minimum achievable 8 bits"):
        solve_dp(p)
    assert solve_dp(Problem(p.choices, 8)) == {"a": "W4", "b": "W4"}


def test_empty_problem_and_registry():
    assert solve_dp(Problem({}, 0)) == {}
    assert SOLVERS["dp"] is solve_dp and SOLVERS["milp"] is solve_milp


def test_milp_without_scipy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    with pytest.raises(LowbitError, match="pip install scipy"):
        solve_milp(two_layers(8))
