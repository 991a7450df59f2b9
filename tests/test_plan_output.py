"""`-o` never removes what specontext did not write: only a plan directory (or an empty one) is replaced."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli
from specontext_compiler.models import load_preset_config
from specontext_compiler.runtime.plan import load_plan

runner = CliRunner()


def compile_to(out: str, model: str = "tiny-llama"):
    return runner.invoke(cli.app, ["compile", model, "--max-len", "2048", "--budget", "256", "-o", out],
                         env={"COLUMNS": "100", "SPECONTEXT_DEBUG": None})


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "refusing to write the plan" in lines[0]
    for word in words:
        assert word in lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A user's model folder: a tiny Llama config plus files that stand for weights and tokenizer."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(load_preset_config("tiny-llama").to_dict()))
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.mark.parametrize("out", [".", ""])
def test_current_directory_is_refused(model_dir, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_refused(compile_to(out, str(model_dir)), "current directory")
    assert snapshot(tmp_path) == before


def test_model_directory_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(model_dir)
    assert_refused(compile_to("./tiny", "./tiny"), "did not write")
    assert snapshot(model_dir) == before


def test_file_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(compile_to("notes.txt", str(model_dir)), "not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_directory_with_files_is_refused(model_dir, tmp_path):
    other = tmp_path / "some-dir"
    (other / "sub").mkdir(parents=True)
    (other / "a.txt").write_text("a")
    (other / "sub" / "b.txt").write_text("b")
    before = snapshot(other)
    assert_refused(compile_to(str(other), str(model_dir)), str(other), "choose a new -o path")
    assert snapshot(other) == before


def test_directory_with_a_foreign_plan_json_is_refused(model_dir, tmp_path):
    other = tmp_path / "looks-like-a-plan"
    other.mkdir()
    (other / "plan.json").write_text('{"name": "someone else\'s plan"}')
    assert_refused(compile_to(str(other), str(model_dir)))
    assert (other / "plan.json").read_text() == '{"name": "someone else\'s plan"}'


def test_no_leftovers_beside_a_refused_output(model_dir, tmp_path):
    (tmp_path / "some-dir").mkdir()
    (tmp_path / "some-dir" / "a.txt").write_text("a")
    before = sorted(p.name for p in tmp_path.iterdir())
    compile_to(str(tmp_path / "some-dir"), str(model_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_plan_and_an_empty_directory_are_replaced(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compile_to(str(empty), str(model_dir)).exit_code == 0
    assert load_plan(empty).workload.budget == 256
    result = runner.invoke(cli.app, ["compile", str(model_dir), "--max-len", "2048", "--budget", "128",
                                     "-o", str(empty)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert load_plan(empty).workload.budget == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "tiny"]


def test_python_api_refuses_too(model_dir, tmp_path):
    from specontext_compiler import driver
    from specontext_compiler.errors import PlanError
    with pytest.raises(PlanError, match="did not write"):
        driver.compile_model(str(model_dir), max_len=2048, budget=256, out=model_dir)
    assert (model_dir / "model.safetensors").read_bytes() == b"weights"
