"""`specontext distill`: bad input exits 2 with one line; a run writes a loadable head and reports it."""
import pytest
from typer.testing import CliRunner

from specontext_compiler import cli, smollm2
from specontext_compiler.distill.head_file import distill_metadata
from specontext_compiler.runtime.retrieval_head import RetrievalHead

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, ["distill", *args], env={"COLUMNS": "120", "SPECONTEXT_DEBUG": None})


def assert_one_line_error(result, word):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], result.stderr


@pytest.mark.parametrize("args, word", [
    (["--sequences", "0"], "--sequences"),
    (["--seq-len", "0"], "--seq-len"),
    (["--epochs", "0"], "--epochs"),
    (["--threads", "0"], "--threads"),
])
def test_non_positive_numbers_exit_2(tmp_path, args, word):
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.safetensors"), *args), word)


@pytest.mark.parametrize("text", ["19-x", "24-19", "a,b", "-3", "best"])
def test_bad_teacher_layers_exit_2_before_the_model_loads(tmp_path, text):
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.safetensors"), "--teacher-layers", text),
                          "--teacher-layers")


@pytest.mark.parametrize("option, value", [("--loss", "layer"), ("--teacher", "median")])
def test_unknown_loss_or_teacher_exits_2_before_the_model_loads(tmp_path, monkeypatch, option, value):
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.safetensors"), option, value), option)


def test_missing_output_directory_and_unknown_model_exit_2(tmp_path):
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "nope" / "h.safetensors")), "does not exist")
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.bin")), ".safetensors")
    assert_one_line_error(invoke(str(tmp_path / "no-model"), "-o", str(tmp_path / "h.safetensors")), "no-model")


def test_distill_writes_the_head_and_prints_the_report(tmp_path, monkeypatch, deep_model, tokenizer):
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda source: (deep_model, tokenizer, tmp_path))
    out = tmp_path / "head.safetensors"
    result = invoke("tiny", "-o", str(out), "--sequences", "2", "--seq-len", "512", "--epochs", "1",
                    "--threads", "1", "--teacher-layers", "4-6")
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.stdout and "distilled:tiny" in result.stdout
    assert "4, 5, 6" in result.stdout
    head = RetrievalHead.load(out)
    assert head.feature_layers == (3, 5, 6) and head.source == "distilled:tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]     # no temporary left behind
    record = distill_metadata(out)
    assert record["teacher_layers"] == [4, 5, 6] and record["teacher_layer_choice"] is None
    assert record["loss_level"] == "group" and record["device"] == "cpu" and "recall@128" in record["after"]


def test_default_teacher_layers_are_chosen_and_their_scores_kept_in_the_file(tmp_path, monkeypatch, deep_model,
                                                                             tokenizer):
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda source: (deep_model, tokenizer, tmp_path))
    out = tmp_path / "head.safetensors"
    result = invoke("tiny", "-o", str(out), "--sequences", "2", "--seq-len", "512", "--epochs", "1",
                    "--device", "cpu", "--loss", "group")
    assert result.exit_code == 0, result.output
    assert "auto: far copy score" in result.stdout and "copy score, best layers" in result.stdout
    choice = distill_metadata(out)["teacher_layer_choice"]
    assert len(choice["scores"]) == deep_model.config.num_hidden_layers and choice["probed_queries"] > 0
    best = max(choice["scores"])
    assert choice["layers"] == [i for i, s in enumerate(choice["scores"]) if s >= 0.25 * best]
    assert RetrievalHead.load(out).feature_layers == (3, 5, 6)          # the extra metadata does not disturb loading
    from specontext_compiler.head_info import head_file_facts         # what plan.json and inspect show
    facts = head_file_facts(out)
    assert facts["teacher_layers"] == choice["layers"] and "copy score" in facts["teacher_layers_reason"]
    assert 0 <= facts["recall"]["held-out recall@128"] <= 1


def test_device_cuda_without_a_gpu_and_an_unknown_device_exit_2(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.safetensors"), "--device", "cuda"), "no GPU")
    assert_one_line_error(invoke("smollm2", "-o", str(tmp_path / "h.safetensors"), "--device", "tpu"), "--device")


def test_distill_metadata_of_a_plain_head_is_none_and_a_missing_file_is_an_error(tmp_path, model):
    from specontext_compiler.dlm import extract_retrieval_head
    from specontext_compiler.errors import SpecontextError
    head, _ = extract_retrieval_head("self:0", model, llm=model)
    assert distill_metadata(head.save(tmp_path / "plain.safetensors")) is None
    with pytest.raises(SpecontextError, match="does not exist"):
        distill_metadata(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpecontextError, match="not a safetensors"):
        distill_metadata(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("content", [b"weights of the user's model", None])
def test_an_existing_file_that_is_not_a_head_is_refused(tmp_path, monkeypatch, content):
    monkeypatch.setattr(smollm2, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "model.safetensors"
    if content is None:
        out.mkdir()
    else:
        out.write_bytes(content)
    assert_one_line_error(invoke("smollm2", "-o", str(out)), "not a specontext retrieval head")
    assert content is None or out.read_bytes() == content

