"""benchmarks/fit_step_dag.py end to end on the CPU: the table, the fitted point, the TOML lines."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fit_step_dag.py"


def test_script_fits_one_overlap_and_holds_out_the_other():
    done = subprocess.run([sys.executable, str(SCRIPT), "--measured", "0.8:19.07,0.95:11.47", "--fit-on", "0.8",
                           "--set", "pinned_gather_gbps=33", "--set", "gather_gbps_beside_compute=21.5",
                           "--set", "compute_slowdown_beside_gather=2.0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 0.")]
    fit_row, held_row = rows
    assert "| 19.07 | " in fit_row and "0.0% | fit |" in fit_row and "gather L20..L31" in fit_row
    assert "held out" in held_row
    assert "gather_gbps_beside_compute = " in done.stdout and "compute_slowdown_beside_gather = 2.000" in done.stdout


def test_script_names_a_bad_fit_request():
    done = subprocess.run([sys.executable, str(SCRIPT), "--measured", "0.8:19.07", "--fit-on", "0.9"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "as many measured points" in done.stderr
    assert "Traceback" not in done.stderr
