"""run_eval_for_plan reads the plan; tables render; the real model (slow) gives sane numbers."""
import dataclasses

import pytest

from specontext_compiler.driver import compile_model
from specontext_compiler.errors import SpecontextError
from specontext_compiler.eval import runner


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tiny-llama compiled from its preset (no model.source) with a budget, sinks and recent window."""
    out = tmp_path_factory.mktemp("eval") / "plan"
    compile_model("tiny-llama", max_len=2048, budget=1024, sink_tokens=4, recent_tokens=32, out=out)
    return out


def _with_source(monkeypatch, source):
    """load_plan as if the plan had been compiled from the weights at `source`."""
    from specontext_compiler.runtime import plan as plan_module
    real_load = plan_module.load_plan
    monkeypatch.setattr(plan_module, "load_plan", lambda directory: (lambda plan: dataclasses.replace(
        plan, model=dataclasses.replace(plan.model, source=source)))(real_load(directory)))


def test_plan_budget_and_head_reach_run_eval(compiled, monkeypatch):
    seen = {}
    monkeypatch.setattr(runner, "run_eval", lambda source, **kw: seen.update(kw, source=source))
    _with_source(monkeypatch, "/models/x.gguf")
    runner.run_eval_for_plan(compiled, tasks=("passkey",))
    assert seen == {"source": "/models/x.gguf", "tasks": ("passkey",), "sink": 4, "recent": 32,
                    "passkey_budgets": (1024,), "head_layer": 0}


def test_a_plan_with_a_stored_head_file_is_evaluated_with_that_head(tmp_path, monkeypatch, make_fused_head):
    from specontext_compiler.models import load_preset_config
    head_path = make_fused_head(load_preset_config("tiny-llama"), (0, 2)).save(tmp_path / "head.safetensors")
    compile_model("tiny-llama", max_len=2048, dlm=str(head_path), out=tmp_path / "plan")
    seen = {}
    monkeypatch.setattr(runner, "run_eval", lambda source, **kw: seen.update(kw, source=source))
    _with_source(monkeypatch, "/models/x.gguf")
    runner.run_eval_for_plan(tmp_path / "plan", tasks=("recall",))
    assert seen["head"] == str(tmp_path / "plan" / "retrieval_head.safetensors") and "head_layer" not in seen


def test_plan_without_source_is_refused(compiled):
    with pytest.raises(SpecontextError, match="model.source"):
        runner.run_eval_for_plan(compiled)


def test_unknown_method_is_refused():
    with pytest.raises(SpecontextError, match="unknown"):
        runner.run_eval("smollm2", methods=("h2o",))


def test_tables_and_json_round_trip(tmp_path):
    from rich.console import Console
    from specontext_compiler.eval.tables import markdown
    result = runner.EvalResult(meta={"x": 1}, recall={"full": {256: [1.0, 1.0]}, "spec-head": {256: [0.5, 0.7]}},
                               head_layers={"self:0": {256: 0.6}},
                               passkey=[{"length": 2048, "depth": 0.5, "method": "full", "budget": None,
                                         "correct": True}])
    console = Console(record=True, width=120)
    runner.render_table(result, console)
    assert "0.600 / 0.500" in console.export_text() and "100% (1/1)" in markdown(result)
    path = tmp_path / "r.json"
    path.write_text(runner.to_json(result))
    assert runner.load_json(path).recall_mean("spec-head", 256) == pytest.approx(0.6)


@pytest.mark.slow
def test_smollm2_recall_and_short_passkey():
    pytest.importorskip("gguf")
    try:
        from specontext_compiler.smollm2 import find_gguf
        find_gguf()
    except SpecontextError as exc:
        pytest.skip(str(exc))
    result = runner.run_eval("smollm2", budgets=(256,), passkey_budgets=(2048,), lengths=(1024,), depths=(0.5,),
                             recall_length=1024, recall_queries=2, compare_head_layers=(),
                             methods=("full", "spec-head", "streaming"), show_progress=False)
    assert result.recall_mean("full", 256) == 1.0
    assert 0.3 < result.recall_mean("spec-head", 256) < 1.0
    # A budget above the context: every method is dense, so all must find the key full attention finds.
    assert result.passkey_accuracy("full", 1024, None) == result.passkey_accuracy("spec-head", 1024, 2048)


def test_head_table_lists_sizes_recall_and_passkey_per_head():
    from specontext_compiler.eval.tables import head_rows, markdown, passkey_rows
    record = {"length": 8192, "depth": 0.5, "budget": 2048, "method": "spec-head"}
    result = runner.EvalResult(
        meta={"head_name": "self-prefix:2", "heads": {
            "self-prefix:2": {"params": 7_000_000, "reduction": 0.948},
            "self:0": {"params": 442_944, "reduction": 0.997}}},
        head_layers={"self-prefix:2": {2048: 0.94}, "self:0": {2048: 0.89}},
        passkey=[record | {"head": "main", "correct": True}, record | {"head": "self:0", "correct": False},
                 record | {"method": "streaming", "head": None, "correct": False}])
    columns, rows = head_rows(result)
    assert columns[-1] == "passkey 8192 tok / B=2048"
    assert rows == [["self-prefix:2", "7,000,000", "94.8%", "0.940", "1/1"],
                    ["self:0", "442,944", "99.7%", "0.890", "0/1"]]
    labels = [label for label, _, _ in passkey_rows(result)]
    assert labels == ["spec-head", "spec-head [self:0]", "streaming"]
    assert "| self:0 | 442,944 | 99.7% | 0.890 | 0/1 |" in markdown(result)
