"""Mixed-precision bit allocation: what each layer costs, and solvers that pick one option per
layer to minimize summed sensitivity within a bit budget. Model-free: numbers in, plan out."""
from lowbit.allocate.cost import average_bits, layer_bits
from lowbit.allocate.solvers import SOLVERS, Choice, Problem, solve_dp, solve_milp

__all__ = ["SOLVERS", "Choice", "Problem", "average_bits", "layer_bits", "solve_dp", "solve_milp"]
