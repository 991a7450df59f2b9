"""Every CLI case of benchmarks/reliability_table.py (issue 11) ends in one `error:` line and exit 2.

The inputs (tiny configs, a compiled tiny plan and tampered copies) are made once for the module;
each case runs through typer's test runner in that folder. The data-loss cases (the `-o` fix) and
the case that needs another user are left to their own tests.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli

_spec = importlib.util.spec_from_file_location(
    "reliability_table", Path(__file__).resolve().parents[1] / "benchmarks" / "reliability_table.py")
table = importlib.util.module_from_spec(_spec)
sys.modules["reliability_table"] = table        # dataclasses look their module up while building
_spec.loader.exec_module(table)

CLI_CASES = [case for case in table.CASES if case.argv and not case.fresh and not case.as_nobody]
API_CASES = [case for case in table.CASES if case.api]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return table.make_inputs(tmp_path_factory.mktemp("reliability"))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.label for c in CLI_CASES])
def test_cli_case_is_one_line_exit_2(inputs, case, monkeypatch):
    monkeypatch.chdir(inputs)
    result = CliRunner().invoke(cli.app, list(case.argv), env={"SPECONTEXT_DEBUG": None, "COLUMNS": "200"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    assert case.expect and case.expect in errors[0], errors[0]
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("case", API_CASES, ids=[c.label for c in API_CASES])
def test_api_case_raises_a_specontext_error(inputs, case):
    from specontext_compiler.errors import SpecontextError
    with pytest.raises(SpecontextError) as info:
        table.API_CASES[case.api](inputs)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root: the check runs the case as nobody")
def test_an_unwritable_output_folder_is_refused_as_another_user():
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="specontext-nobody-"))   # pytest's own tmp is root-only
    try:
        case = next(c for c in table.CASES if c.as_nobody)
        code, line = table.run_cli_case(case, table.make_inputs(folder, with_plan=False))
        assert code == "exit 2" and line.startswith("error: ") and "not writable" in line, line
        assert not (folder / "readonly" / "plan").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
