"""The head cache: a compile without --dlm uses the head cached for its model's fingerprint, distills
one on demand where a GPU is present, else warns once and plans with self:0; `specontext distill`
without -o fills the cache atomically; nothing outside the cache root is written or removed."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli, compile_model, smollm2
from specontext_compiler.distill import default_head, head_cache
from specontext_compiler.distill.head_cache import heads_dir as real_heads_dir
from specontext_compiler.distill.head_file import head_bytes
from specontext_compiler.driver import HEAD_FILE
from specontext_compiler.errors import SpecontextError, SpecontextWarning
from specontext_compiler.models import resolve_model

runner = CliRunner()
SMALL_DISTILL = {"sequences": 2, "seq_len": 512, "epochs": 1, "teacher_layers": (4, 5, 6)}


def invoke(*args):
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "200", "SPECONTEXT_DEBUG": None})


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, deep_model):
    directory = tmp_path_factory.mktemp("llm") / "tiny-real"
    deep_model.save_pretrained(directory)
    return directory


def fingerprint(directory):
    source = resolve_model(directory)
    return head_cache.model_fingerprint(source.config, source.path)


@pytest.fixture
def cached(model_dir, make_fused_head):
    """A distilled head for model_dir, stored in the (test's private) cache."""
    head = make_fused_head(resolve_model(model_dir).config, (3, 5, 6))
    head.source = "distilled:tiny-real"
    record = {"teacher_layers": [4, 5, 6], "recall": {"held-out recall@256": 0.875}}
    return head_cache.store_head(head_bytes(head, record), fingerprint(model_dir), "tiny-real")


def test_fingerprint_keeps_a_copied_model_and_changes_with_the_weights(model_dir, deep_model, tmp_path):
    import torch
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(model_dir, copy)
    assert fingerprint(copy) == fingerprint(model_dir)
    changed = tmp_path / "changed"
    with torch.no_grad():
        saved = deep_model.model.layers[4].self_attn.q_proj.weight.clone()
        deep_model.model.layers[4].self_attn.q_proj.weight.add_(0.01)   # a fine-tune of one middle layer
        deep_model.save_pretrained(changed)
        deep_model.model.layers[4].self_attn.q_proj.weight.copy_(saved)
    assert fingerprint(changed) != fingerprint(model_dir)
    empty = tmp_path / "config-only"
    empty.mkdir()
    shutil.copy(model_dir / "config.json", empty)
    with pytest.raises(SpecontextError, match="holds no weights"):
        head_cache.model_fingerprint(resolve_model(empty).config, empty)


def test_a_cached_head_is_used_and_recorded_as_dlm_would(model_dir, cached, tmp_path):
    result = invoke("compile", str(model_dir), "--max-len", "1k", "-o", str(tmp_path / "auto"))
    assert result.exit_code == 0, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("note: ") and str(cached) in lines[0], result.stderr
    assert "0.875" in lines[0]
    explicit = invoke("compile", str(model_dir), "--max-len", "1k", "--dlm", str(cached), "-o", str(tmp_path / "dlm"))
    assert explicit.exit_code == 0, explicit.output
    auto, by_hand = (json.loads((tmp_path / name / "plan.json").read_text())["retrieval_head"]
                     for name in ("auto", "dlm"))
    assert auto == by_hand
    assert (auto["kind"], auto["source"], auto["file"]) == ("distilled", str(cached), HEAD_FILE)
    assert auto["teacher_layers"] == [4, 5, 6] and auto["recall"] == {"held-out recall@256": 0.875}
    shown = " ".join(invoke("inspect", str(tmp_path / "auto")).stdout.split())
    assert "(distilled)" in shown and "held-out recall@256 0.875" in shown


def test_other_weights_miss_the_cache_and_without_a_gpu_warn_once(cached, deep_model, tmp_path):
    import torch
    other = tmp_path / "other"
    with torch.no_grad():
        deep_model.model.embed_tokens.weight.mul_(-1)
        deep_model.save_pretrained(other)
        deep_model.model.embed_tokens.weight.mul_(-1)
    result = invoke("compile", str(other), "--max-len", "1k", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    assert f"`specontext distill {other}`" in lines[0] and "self:0" in lines[0]
    head = json.loads((tmp_path / "p" / "plan.json").read_text())["retrieval_head"]
    assert (head["kind"], head["source"], head["file"]) == ("self", "self:0", None)


def test_dlm_self_keeps_the_old_head_quietly_even_with_a_cached_head(model_dir, cached, tmp_path):
    result = invoke("compile", str(model_dir), "--max-len", "1k", "--dlm", "self:0", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert stderr_lines(result) == []
    head = json.loads((tmp_path / "p" / "plan.json").read_text())["retrieval_head"]
    assert (head["kind"], head["source"]) == ("self", "self:0")


def test_no_distill_with_a_gpu_plans_with_self_and_warns(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(default_head, "on_demand_device", lambda: "cpu")          # "a GPU is present"
    monkeypatch.setattr(default_head, "distill_into_cache", lambda *a: pytest.fail("distilled"))
    result = invoke("compile", str(model_dir), "--max-len", "1k", "--no-distill", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "self:0" in lines[0]
    with pytest.warns(SpecontextWarning, match="self:0"):                         # the Python API too
        plan = compile_model(str(model_dir), max_len=1024, out=tmp_path / "q", distill=False)
    assert plan.retrieval_head.facts["kind"] == "self"


def test_with_a_gpu_a_missing_head_is_distilled_into_the_cache_then_reused(model_dir, deep_model, tokenizer,
                                                                            tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(default_head, "on_demand_device", lambda: "cpu")          # "a GPU is present"
    monkeypatch.setattr(default_head, "ON_DEMAND_OPTIONS", SMALL_DISTILL)
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda source: (deep_model, tokenizer, source))
    plan = compile_model(str(model_dir), max_len=1024, out=tmp_path / "p")
    stored = [p for p in head_cache.heads_dir().iterdir()]
    assert len(stored) == 1 and stored[0].name == f"tiny-real-{fingerprint(model_dir)}.safetensors"
    head = plan.retrieval_head
    assert (head.facts["kind"], head.source, head.facts["teacher_layers"]) == ("distilled", str(stored[0]),
                                                                               [4, 5, 6])
    assert "held-out recall@128" in head.facts["recall"]
    progress = capsys.readouterr().err
    assert "distilling a retrieval head for tiny-real" in progress and "training 1/1" in progress
    monkeypatch.setattr(default_head, "distill_into_cache", lambda *a: pytest.fail("distilled twice"))
    with pytest.warns(default_head.HeadNotice, match="cached for this model"):
        again = compile_model(str(model_dir), max_len=1024, out=tmp_path / "q")
    assert again.retrieval_head == head


def test_a_model_that_cannot_be_distilled_plans_with_self_and_says_why(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(default_head, "on_demand_device", lambda: "cpu")          # "a GPU is present"
    result = invoke("compile", str(model_dir), "--max-len", "1k", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    lines = [line for line in stderr_lines(result) if not line.startswith(" ")]   # progress lines are indented
    warned = [line for line in lines if line.startswith("warning: ")]
    assert len(warned) == 1 and "self:0" in warned[0] and "no tokenizer" in warned[0], result.stderr
    head = json.loads((tmp_path / "p" / "plan.json").read_text())["retrieval_head"]
    assert head["kind"] == "self" and list(head_cache.heads_dir().iterdir()) == []


def test_distill_without_out_fills_the_cache_under_its_root_only(model_dir, deep_model, tokenizer, tmp_path,
                                                                 monkeypatch):
    root = tmp_path / "cache-root"
    monkeypatch.setenv("SPECONTEXT_CACHE", str(root))
    monkeypatch.setattr(head_cache, "heads_dir", real_heads_dir)
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda source: (deep_model, tokenizer, source))
    (root / "heads").mkdir(parents=True)
    (root / "heads" / "notes.txt").write_text("mine")
    (root / "heads" / "mine.safetensors").write_bytes(b"not a head")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("distill", str(model_dir), "--sequences", "2", "--seq-len", "512", "--epochs", "1",
                    "--teacher-layers", "4-6")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    expected = f"tiny-real-{fingerprint(model_dir)}.safetensors"
    assert sorted(p.name for p in (root / "heads").iterdir()) == sorted(["notes.txt", "mine.safetensors", expected])
    assert (root / "heads" / "notes.txt").read_text() == "mine"
    assert f"specontext compile {model_dir} (no --dlm" in " ".join(result.stdout.split())
    assert head_cache.cached_head(fingerprint(model_dir)) == root / "heads" / expected
    listed = json.loads(invoke("heads", "--json").stdout)
    assert [(h["model"], h["fingerprint"], h["teacher_layers"]) for h in listed] == [
        ("tiny-real", fingerprint(model_dir), [4, 5, 6])]
    assert "held-out recall@128" in listed[0]["recall"] and listed[0]["bytes"] > 0
    table = " ".join(invoke("heads").stdout.split())
    assert "tiny-real" in table and fingerprint(model_dir) in table and "4, 5, 6" in table


def test_store_refuses_a_foreign_file_and_a_failed_write_leaves_nothing(model_dir, cached, monkeypatch):
    data = cached.read_bytes()
    foreign = head_cache.heads_dir() / "user-0123456789abcdef.safetensors"
    foreign.write_bytes(b"the user's file")
    with pytest.raises(SpecontextError, match="not a specontext retrieval head"):
        head_cache.store_head(data, "0123456789abcdef", "user")
    assert foreign.read_bytes() == b"the user's file"

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(head_cache.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        head_cache.store_head(data, "fedcba9876543210", "other")
    assert sorted(p.name for p in head_cache.heads_dir().iterdir()) == sorted([cached.name, foreign.name])


def test_heads_on_an_empty_cache_says_how_to_fill_it():
    result = invoke("heads")
    assert result.exit_code == 0 and "specontext distill MODEL" in result.stdout
    assert json.loads(invoke("heads", "--json").stdout) == []
