"""The default head says it is inaccurate; plans and inspect say which head selects and how well."""
import json
import warnings

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from specontext_compiler import cli, compile_model, load_plan
from specontext_compiler.errors import SpecontextWarning
from specontext_compiler.head_info import head_file_facts
from specontext_compiler.models import load_preset_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "200", "SPECONTEXT_DEBUG": None})


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A real model directory: config and weights (the tiny preset's shape, random weights)."""
    directory = tmp_path_factory.mktemp("llm") / "tiny-real"
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in load_preset_config("tiny-llama").to_dict().items()
                                    if k != "model_type"})).save_pretrained(directory)
    return directory


def test_real_model_without_dlm_warns_once_with_the_fix(llm_dir, tmp_path):
    result = invoke("compile", str(llm_dir), "--max-len", "2k", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    for words in ("self:0", "benchmarks/ACCURACY.md", f"`specontext distill {llm_dir}`", "no distilled head cached"):
        assert words in lines[0]
    assert " -o " not in lines[0]           # the head goes to the cache, where the next compile finds it
    with pytest.warns(SpecontextWarning, match="self:0"):       # the Python API warns the same way
        compile_model(str(llm_dir), max_len=2048, out=tmp_path / "q")


def test_presets_and_config_only_directories_plan_without_the_warning(tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(load_preset_config("tiny-llama").to_dict()))
    for model in ("tiny-llama", str(config_only)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SpecontextWarning)
            plan = compile_model(model, max_len=2048, out=tmp_path / "p")
        head = plan.retrieval_head.to_dict()
        assert head["kind"] == "self" and head["source"] == "self:0" and head["recall_note"] == "not measured"
        assert "ACCURACY.md" in head["accuracy"]
    assert "warning" not in invoke("compile", "tiny-llama", "--max-len", "2k", "-o", str(tmp_path / "c")).stderr


def test_inspect_and_plan_json_name_the_default_head(tmp_path):
    invoke("compile", "tiny-llama", "--max-len", "2k", "-o", str(tmp_path / "p"))
    data = json.loads((tmp_path / "p" / "plan.json").read_text())["retrieval_head"]
    assert (data["kind"], data["level"], data["recall"], data["recall_note"]) == ("self", "head", None, "not measured")
    shown = " ".join(invoke("inspect", str(tmp_path / "p")).stdout.split())
    assert "self:0 (self), level head, 2 groups" in shown and "recall not measured" in shown
    assert "head accuracy" in shown


def _with_provenance(head, path, provenance):
    """A head file whose metadata also says how it was distilled (another JSON entry)."""
    data = path.with_suffix(".plain.safetensors")
    head.save(data)
    with safe_open(str(data), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    save_file(tensors, str(path), metadata=metadata | {"specontext_distill": json.dumps(provenance)})
    return path


def test_distilled_head_file_carries_teacher_layers_and_recall_into_the_plan(tmp_path, make_fused_head):
    head = make_fused_head(load_preset_config("tiny-llama"), (0, 2))
    head.source = "distilled:tiny"
    path = _with_provenance(head, tmp_path / "head.safetensors",
                            {"teacher_layers": [1, 2], "teacher_layers_reason": "far-context attention",
                             "recall": {"recall@2048": 0.822}})
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--dlm", str(path), "-o", str(tmp_path / "p"))
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    info = load_plan(tmp_path / "p").retrieval_head.to_dict()
    assert info["kind"] == "distilled" and info["teacher_layers"] == [1, 2]
    assert info["recall"] == {"recall@2048": 0.822} and "recall_note" not in info
    shown = " ".join(invoke("inspect", str(tmp_path / "p")).stdout.split())
    assert "(distilled)" in shown and "teacher layers [1, 2] (far-context attention)" in shown
    assert "recall recall@2048 0.822" in shown


def test_head_file_without_provenance_is_not_measured(tmp_path, make_fused_head):
    path = make_fused_head(load_preset_config("tiny-llama"), (1,)).save(tmp_path / "bare.safetensors")
    facts = head_file_facts(path)
    assert facts["recall"] is None and facts["recall_note"] == "not measured" and "teacher_layers" not in facts


def test_level_option_reaches_the_plan_and_bad_levels_exit_2(tmp_path):
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--level", "batch", "-o", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "b")
    assert plan.workload.level == "batch" and plan.retrieval_head.facts["selection_groups"] == 1
    assert all(k.constexprs.get("GROUPS", 1) == 1 for k in plan.kernels)     # kernels built for one set
    bad = invoke("compile", "tiny-llama", "--max-len", "2k", "--level", "layer", "-o", str(tmp_path / "x"))
    lines = bad.stderr.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "--level 'layer'" in lines[0] and "head or batch" in lines[0]
    assert not (tmp_path / "x").exists()
    assert compile_model("tiny-llama", max_len=2048, level="batch", out=tmp_path / "api").workload.level == "batch"
