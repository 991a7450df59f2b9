"""Silent wrong results (issue 11) refused at the function that takes the input: one line each."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from specontext_compiler.cost_models.target import load_target, load_target_file, override_target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import ModelError, PlanError, SpecontextError, TargetError
from specontext_compiler.sizes import parse_tokens

_spec = importlib.util.spec_from_file_location("_plan_fixture", Path(__file__).with_name("test_report.py"))
_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixture)
H100 = (Path(__file__).resolve().parents[1] / "specontext_compiler" / "targets" / "h100.toml").read_text()


def toml_with(tmp_path, key, value) -> Path:
    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line for line in H100.splitlines()]
    path = tmp_path / "t.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("key, value", [("hbm_gbps", "nan"), ("h2d_gbps", "inf"), ("bf16_tflops", "-inf"),
                                        ("gpu_memory_bytes", "inf"), ("pinned_gather_gbps", "0.0"),
                                        ("host_memory_bytes", "1e400")])
def test_a_target_figure_that_is_not_finite_and_positive_is_refused(tmp_path, key, value):
    with pytest.raises(TargetError, match=key):
        load_target_file(toml_with(tmp_path, key, value))


def test_a_set_figure_that_is_not_finite_is_refused():
    with pytest.raises(TargetError, match="hbm_gbps.*not a finite number"):
        override_target(load_target("h100"), {"hbm_gbps": "nan"})


@pytest.mark.parametrize("content, words", [(b'name = "caf\xe9"\n', "not UTF-8"), (None, "is a directory")])
def test_an_unreadable_target_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "t.toml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(TargetError, match=words):
        load_target_file(path)


def test_a_non_finite_number_never_reaches_plan_json():
    plan = _fixture.make_plan()
    plan.target["hbm_gbps"] = float("nan")
    with pytest.raises(PlanError, match="plan.target.hbm_gbps is nan"):
        plan.to_json()
    plan.target["hbm_gbps"] = 1.0
    json.loads(plan.to_json(), parse_constant=lambda name: pytest.fail(f"{name} in plan.json"))


def test_json_output_is_strict():
    from specontext_compiler.cli.app import strict_json as _strict_json
    assert json.loads(_strict_json({"a": 1.5})) == {"a": 1.5}
    with pytest.raises(SpecontextError, match="not finite"):
        _strict_json({"a": float("inf")})


@pytest.mark.parametrize("text", ["inf", "nan", "1e400", "-inf"])
def test_max_len_that_is_not_a_count_is_refused(text):
    with pytest.raises(SpecontextError, match="not a token count"):
        parse_tokens(text, "--max-len")


def test_budget_larger_than_max_len_is_refused_and_the_default_fits():
    with pytest.raises(SpecontextError, match="--budget 2048 is larger than --max-len 1024"):
        Workload(max_len=1024, prompt_len=64, budget=2048)
    from specontext_compiler.driver import DEFAULT_BUDGET, _budget
    assert _budget(None, 1024) == 1024 and _budget(None, 1 << 20) == DEFAULT_BUDGET


@pytest.mark.parametrize("budgets", [(0,), (-5,), (256, 0)])
def test_eval_refuses_a_budget_below_one_before_loading_a_model(budgets):
    from specontext_compiler.eval.runner import run_eval
    with pytest.raises(SpecontextError, match="must be a positive number"):
        run_eval("no-such-model", tasks=("recall",), budgets=budgets)


def hf_config(**changes):
    """The tiny preset's config fields as plain attributes (None removes one), changes applied."""
    from types import SimpleNamespace

    from specontext_compiler.models import load_preset_config
    fields = {**load_preset_config("tiny-llama").to_dict(), **changes}
    return SimpleNamespace(**{k: v for k, v in fields.items() if v is not None or k == "head_dim"})


@pytest.mark.parametrize("changes, words", [
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0"),
    ({"intermediate_size": None}, "has no intermediate_size"),
    ({"head_dim": None, "hidden_size": 66}, "hidden_size 66 is not a multiple"),
])
def test_an_impossible_model_shape_is_refused(changes, words):
    from specontext_compiler.models import _check_shape
    with pytest.raises(ModelError, match=words):
        _check_shape(hf_config(**changes), "config.json", "llama")


@pytest.mark.parametrize("name, words", [("plot.txt", "name it plot.png"), ("plot", "name it plot.png"),
                                         ("dir", "is a directory"), ("afile/x.png", "is a file")])
def test_plot_path_is_checked_before_drawing(tmp_path, name, words):
    from specontext_compiler.plot import check_plot_path
    (tmp_path / "dir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpecontextError, match=words):
        check_plot_path(tmp_path / name)


def test_compile_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch):
    import os

    from specontext_compiler.runtime.plan import check_plan_output
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PlanError, match="is a file"):
        check_plan_output(tmp_path / "afile" / "sub" / "plan")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PlanError, match="not writable"):
        check_plan_output(tmp_path / "new" / "plan")


def test_a_failed_plan_write_is_one_line(tmp_path, monkeypatch):
    import errno

    from specontext_compiler import driver
    from specontext_compiler.runtime import plan as plan_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(plan_module, "publish_dir", read_only)    # where the directory is written
    with pytest.raises(PlanError, match="cannot write the plan .*Read-only file system"):
        driver.compile_model("tiny-llama", target="h100", max_len=256, budget=64, out=tmp_path / "p")
