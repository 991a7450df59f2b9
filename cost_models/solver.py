"""The only module that imports PuLP: a tiny adapter written to what PuLP 3.3.2 and 4.x both accept.

PuLP 4.0 (Python >= 3.12; coin-or/pulp doc/source/guides/how_to_migrate_to_v4.rst) creates
variables with prob.add_variable (LpVariable(...) raises), drops the bundled PULP_CBC_CMD for
COIN_CMD (pip install pulp[cbc]), and has solve() return an LpSolveStats instead of an int.
3.3.1+ already has add_variable. Reading the result is the one place that must know the version:
_read_status.
"""
import time
from dataclasses import dataclass

import pulp

# LpSolveStatus in 4.x keeps 3.x's integers and adds the reasons a solve stopped early.
_STATUS_NAMES = {1: "optimal", 0: "not solved", -1: "infeasible", -2: "unbounded", -3: "undefined",
                 -4: "time limit", -5: "memory limit", -6: "node limit", -7: "gap limit",
                 -8: "iteration limit", -9: "solution limit", -10: "interrupted", -11: "stopped",
                 -12: "numerical error"}
_SOLUTION_FOUND_3X = (1, 2)   # PuLP 3.x sol_status: LpSolutionOptimal, LpSolutionIntegerFeasible


@dataclass(frozen=True)
class SolveStats:
    """What a solve returned, the same on PuLP 3 and 4."""

    solver: str
    status: str           # "optimal", "feasible" (a solution, not proven optimal), "infeasible", ...
    has_solution: bool
    time_s: float         # wall time of the solve call
    objective: float | None


def lp_sum(terms):
    """Sum of variables / affine expressions as one PuLP expression."""
    return pulp.lpSum(terms)


def value(var_or_expr) -> float:
    """Value of a variable or expression in the last solution."""
    return float(pulp.value(var_or_expr))


class Problem:
    """A minimisation MILP: variables, named constraints, one objective."""

    def __init__(self, name: str):
        self._prob = pulp.LpProblem(name, pulp.LpMinimize)

    def binary(self, name: str):
        return self._prob.add_variable(name, lowBound=0, upBound=1, cat="Integer")

    def continuous(self, name: str, low: float | None = 0.0, up: float | None = None):
        return self._prob.add_variable(name, lowBound=low, upBound=up, cat="Continuous")

    def constrain(self, constraint, name: str) -> None:
        self._prob += constraint, name

    def minimize(self, expression) -> None:
        self._prob.setObjective(expression)

    def solve(self, time_limit_s: float = 10.0) -> SolveStats:
        """Solve with CBC (PuLP 3's bundled binary, or PuLP 4's COIN_CMD from pulp[cbc])."""
        started = time.perf_counter()
        returned = self._prob.solve(_cbc(time_limit_s))
        elapsed = time.perf_counter() - started
        status, has_solution = _read_status(self._prob, returned)
        objective = value(self._prob.objective) if has_solution else None
        return SolveStats(solver=f"CBC via PuLP {pulp.__version__} COIN_CMD",
                          status=status, has_solution=has_solution, time_s=elapsed, objective=objective)


def _cbc(time_limit_s: float):
    """COIN_CMD on both majors: 3.x's bundled binary (PULP_CBC_CMD warns there), 4.x's pulp[cbc]."""
    bundled = getattr(pulp.PULP_CBC_CMD, "pulp_cbc_path", None) if hasattr(pulp, "PULP_CBC_CMD") else None
    if bundled:
        return pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, path=bundled)
    return pulp.COIN_CMD(msg=False, timeLimit=time_limit_s)


def _read_status(prob, returned) -> tuple[str, bool]:
    """(status name, has a solution) from PuLP 3's int + prob.sol_status or PuLP 4's LpSolveStats."""
    if isinstance(returned, int):
        has_solution = getattr(prob, "sol_status", 0) in _SOLUTION_FOUND_3X
        # 3.x reports 1 for a feasible solution found before the time limit; sol_status tells them apart
        if returned == 1 and prob.sol_status != 1:
            return "feasible", has_solution
        return _STATUS_NAMES.get(returned, f"status {returned}"), has_solution
    code = int(returned.status)
    if code != 1 and returned.has_solution:
        return "feasible", True
    return _STATUS_NAMES.get(code, f"status {code}"), bool(returned.has_solution)
