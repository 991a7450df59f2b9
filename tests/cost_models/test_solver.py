"""solver.py: the PuLP adapter on a tiny problem, and its reading of PuLP 3 and PuLP 4 results."""
import pathlib
import types
import warnings

from specontext_compiler.cost_models import solver as lp


def test_tiny_problem_is_optimal_without_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        problem = lp.Problem("tiny")
        x, y = problem.binary("x"), problem.continuous("y", 0, 10)
        problem.constrain(x + y >= 2.5, "cover")
        problem.constrain(y <= 1.75, "cap")
        problem.minimize(3 * x + y)
        stats = problem.solve(5)
    assert stats.status == "optimal" and stats.has_solution
    assert abs(stats.objective - 4.5) < 1e-9
    assert lp.value(x) == 1 and abs(lp.value(y) - 1.5) < 1e-9
    assert stats.solver.startswith("CBC")


def test_infeasible_is_reported_without_a_solution():
    problem = lp.Problem("impossible")
    z = problem.binary("z")
    problem.constrain(z >= 2, "too_big")
    problem.minimize(z)
    stats = problem.solve(5)
    assert stats.status == "infeasible" and not stats.has_solution and stats.objective is None


def test_reads_pulp4_solve_stats():
    prob = types.SimpleNamespace()
    optimal = types.SimpleNamespace(status=1, has_solution=True)
    timed_out = types.SimpleNamespace(status=-4, has_solution=True)
    nothing = types.SimpleNamespace(status=-4, has_solution=False)
    assert lp._read_status(prob, optimal) == ("optimal", True)
    assert lp._read_status(prob, timed_out) == ("feasible", True)
    assert lp._read_status(prob, nothing) == ("time limit", False)


def test_reads_pulp3_int_status():
    assert lp._read_status(types.SimpleNamespace(sol_status=2), 1) == ("feasible", True)
    assert lp._read_status(types.SimpleNamespace(sol_status=-1), -1) == ("infeasible", False)


def test_only_the_adapter_imports_pulp():
    folder = pathlib.Path(lp.__file__).parent
    importers = [p.name for p in folder.glob("*.py") if "import pulp" in p.read_text()]
    assert importers == ["solver.py"]
