"""The `specontext` CLI through its real entry points: help, errors at the edge, compile, inspect."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli
from specontext_compiler.errors import PlanError, TargetError
from specontext_compiler.runtime.plan import Plan, load_plan
from specontext_compiler.runtime.plan import write_plan_dir as _write_plan_dir
from specontext_compiler.runtime.plan_integrity import plan_manifest


def write_plan_dir(plan, directory, files):
    """Write a plan as the driver does: the files plus the manifest over them and plan.json."""
    return _write_plan_dir(plan, directory, {**files, **plan_manifest(plan.to_json(), files)})

_spec = importlib.util.spec_from_file_location("_plan_fixture", Path(__file__).with_name("test_report.py"))
_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixture)
make_plan, plan_files = _fixture.make_plan, _fixture.plan_files

runner = CliRunner()
COMMANDS = ["compile", "inspect", "targets", "run", "serve", "eval", "distill"]


def invoke(*args: str, **kwargs):
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "100", "SPECONTEXT_DEBUG": None}, **kwargs)


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]


@pytest.fixture
def plan_dir(tmp_path) -> Path:
    plan = make_plan()
    return write_plan_dir(plan, tmp_path / "plan", plan_files(plan))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example: specontext " + command in " ".join(result.stdout.replace("│", " ").split())


def test_version_is_the_installed_distributions():
    import importlib.metadata
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"specontext {importlib.metadata.version('specontext')}\n"


def test_max_len_help_says_units():
    text = " ".join(invoke("compile", "--help").stdout.replace("│", " ").split())
    assert "in tokens; accepts 131072, 128k, 1M" in text


def test_console_script_and_python_m():
    script = Path(sys.executable).with_name("specontext")
    for argv in ([str(script), "--help"], [sys.executable, "-m", "specontext_compiler", "--help"]):
        if not Path(argv[0]).exists():
            continue
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "compile" in done.stdout and "inspect" in done.stdout


def test_python_m_error_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "specontext_compiler", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")


# -- compile (the driver monkeypatched: these test the CLI, not the compiler) -------------------
@pytest.fixture
def fake_driver(monkeypatch):
    from specontext_compiler import driver
    calls = []

    def compile_model(model, target="a100", max_len="128k", *, out=None, progress=None, **kwargs):
        calls.append({"model": model, "target": target, "max_len": max_len, "out": out, **kwargs})
        if target == "z9000":
            raise TargetError("unknown target 'z9000'; known targets: a100, h100")
        for stage in ("load model", "plan (ILP)", "export", "passes", "codegen", "write"):
            progress(stage, 0.0)
        plan = make_plan(max_len=max_len)
        write_plan_dir(plan, out, plan_files(plan))
        return plan

    monkeypatch.setattr(driver, "compile_model", compile_model)
    return calls


def test_compile_prints_summary_and_writes_default_dir(fake_driver, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("compile", "llama-3.1-8b", "--target", "h100", "--max-len", "64k", "--batch", "auto")
    assert result.exit_code == 0, result.output
    call = fake_driver[0]
    assert call["max_len"] == 65536 and call["batch"] == "auto" and call["target"] == "h100"
    assert Path(call["out"]) == Path("plans/llama-3.1-8b-h100")
    assert load_plan(tmp_path / "plans" / "llama-3.1-8b-h100").workload.max_len == 65536
    assert "GPU layers" in result.stdout and "specontext inspect" in result.stdout


def test_compile_json(fake_driver, tmp_path):
    result = invoke("compile", "llama-3.1-8b", "-o", str(tmp_path / "p"), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["summary"]["model"] == "llama-3.1-8b"


@pytest.mark.parametrize("args, words", [
    (["--max-len", "12q"], ["--max-len", "'12q'", "128k"]),
    (["--batch", "0"], ["--batch", "'auto'"]),
    (["--prompt-len", "-5"], ["--prompt-len"]),
])
def test_compile_bad_sizes_exit_2_before_compiling(fake_driver, tmp_path, args, words):
    result = invoke("compile", "llama-3.1-8b", "-o", str(tmp_path / "p"), *args)
    assert_one_line_error(result, *words)
    assert fake_driver == []


def test_compile_unknown_target_exit_2(fake_driver, tmp_path):
    assert_one_line_error(invoke("compile", "llama-3.1-8b", "-t", "z9000", "-o", str(tmp_path / "p")), "z9000")


def test_usage_errors_keep_typer_exit_2():
    result = invoke("compile")
    assert result.exit_code == 2 and "Traceback" not in result.output


# -- inspect --------------------------------------------------------------------------------------
def test_inspect_shows_the_report(plan_dir):
    result = invoke("inspect", str(plan_dir))
    assert result.exit_code == 0, result.output
    for title in ("KV residency per layer", "Predictions per segment", "GPU memory per segment",
                  "Predicted overlap", "Compiler passes"):
        assert title in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 100


def test_inspect_json_and_plot(plan_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "plan.png"
    result = invoke("inspect", str(plan_dir), "--json", "--plot", str(png))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["num_segments"] == len(load_plan(plan_dir).segments)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_plot_without_matplotlib_names_the_install(plan_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("inspect", str(plan_dir), "--plot", str(tmp_path / "p.png"))
    assert_one_line_error(result, "matplotlib", "pip install 'specontext[plot]'")


def test_inspect_missing_dir(tmp_path):
    assert_one_line_error(invoke("inspect", str(tmp_path / "nope")), "not a plan directory")


def test_inspect_corrupted_plan(plan_dir):
    (plan_dir / "plan.json").write_text('{"schema_version": [1, 0], "model": ')
    assert_one_line_error(invoke("inspect", str(plan_dir)), "corrupted")


def test_inspect_newer_schema(plan_dir):
    data = json.loads((plan_dir / "plan.json").read_text())
    data["schema_version"] = [2, 0]
    (plan_dir / "plan.json").write_text(json.dumps(data))
    assert_one_line_error(invoke("inspect", str(plan_dir)), "2.0", "newer")


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(cli.app, ["--debug", "inspect", str(tmp_path / "nope")])
    assert isinstance(result.exception, PlanError)
    result = runner.invoke(cli.app, ["inspect", str(tmp_path / "nope")], env={"SPECONTEXT_DEBUG": "1"})
    assert isinstance(result.exception, PlanError)


# -- targets, run, eval -----------------------------------------------------------------------
def test_targets_table_json_and_sources():
    from specontext_compiler.cost_models.target import list_targets, load_target
    names = list_targets()
    result = invoke("targets")
    assert result.exit_code == 0 and all(name in result.stdout for name in names)
    data = json.loads(invoke("targets", "--json").stdout)
    assert [t["name"] for t in data] == names
    one = load_target(names[0])
    text = " ".join(invoke("targets", one.name).stdout.replace("│", " ").split())
    assert all(" ".join(src.split()) in text for src in one.sources.values())
    assert_one_line_error(invoke("targets", "z9000"), "z9000")


def test_run_streams_generated_text(plan_dir, tmp_path, monkeypatch):
    seen = {}

    vocab = {7: "Hel", 3: "lo", 9: "!"}

    class FakeTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(vocab[i] for i in ids)

    class FakeEngine:  # the runtime's contract: stream(request index, token id), Generation-like results
        tokenizer = FakeTokenizer()

        def generate(self, prompts, max_new_tokens, temperature, top_p, stream):
            seen.update(prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature)
            for token in vocab:
                if stream is not None:
                    stream(0, token)
                    stream(1, token)  # another request's tokens are not printed
            return [type("Generation", (), {"text": "Hello!", "token_ids": list(vocab)})()]

    monkeypatch.setattr(Plan, "bind", lambda self, model, dlm=None, **kw: FakeEngine())
    result = invoke("run", str(plan_dir), "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello!\n" and seen["prompts"] == ["Hi"] and seen["max_new_tokens"] == 3
    result = invoke("run", str(plan_dir), "-m", str(tmp_path), "-p", "Hi", "--no-stream")
    assert result.stdout == "Hello!\n"


def test_eval_is_thin_over_the_runner(plan_dir, monkeypatch):
    from specontext_compiler.eval import runner as eval_runner
    got = {}
    monkeypatch.setattr(eval_runner, "run_eval_for_plan",
                        lambda plan, tasks, **kw: got.update(plan=plan, tasks=tasks, **kw) or "RESULT")
    monkeypatch.setattr(eval_runner, "to_json", lambda result: json.dumps({"result": result}))
    result = invoke("eval", str(plan_dir), "--task", "passkey", "--length", "4k", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"result": "RESULT"}
    assert got["tasks"] == ["passkey"] and got["lengths"] == [4096]
    assert got["passkey_question"] == "prompt" and got["passkey_keys"] == 1
    invoke("eval", str(plan_dir), "--task", "passkey", "--question", "decode", "--keys", "3")
    assert got["passkey_question"] == "decode" and got["passkey_keys"] == 3
    assert_one_line_error(invoke("eval", str(plan_dir), "--task", "mmlu"), "mmlu", "recall or passkey")
    assert_one_line_error(invoke("eval", str(plan_dir), "--task", "passkey", "--question", "later"),
                          "--question later", "prompt or decode")
    assert_one_line_error(invoke("eval", str(plan_dir), "--task", "passkey", "--keys", "0"), "--keys 0", "positive")


# -- the real driver, end to end (a tiny preset: a few seconds on CPU) ------------------------
def test_real_compile_then_inspect(tmp_path):
    out = tmp_path / "tiny"
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    assert plan.workload.max_len == 2048 and (out / "report.md").is_file()
    shown = invoke("inspect", str(out))
    assert shown.exit_code == 0 and f"{len(plan.segments[-1].gpu_layers)}/{plan.model.num_layers}" in shown.stdout


def test_real_compile_with_a_fused_head_file(tmp_path, make_fused_head):
    from specontext_compiler.models import load_preset_config
    from specontext_compiler.runtime.retrieval_head import RetrievalHead
    head_path = make_fused_head(load_preset_config("tiny-llama"), (0, 2)).save(tmp_path / "head.safetensors")
    out = tmp_path / "fused"
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--dlm", str(head_path), "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    assert plan.retrieval_head.feature_layers == [0, 2]
    assert plan.graph.op_counts["specontext.record_features.default"] == 2
    head = RetrievalHead.load(out / plan.retrieval_head.file)
    assert head.feature_layers == (0, 2)
    # the cost model prices this head's own parameters (fc included), in the model's bf16
    breakdown = plan.prediction["memory_breakdown"][0]
    assert breakdown["retrieval_head"] == head.param_count(include_embedding=False) * 2


def test_real_compile_with_a_head_file_for_another_model(tmp_path, make_fused_head):
    from transformers import LlamaConfig
    other = LlamaConfig(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=3, max_position_embeddings=2048)
    head_path = make_fused_head(other, (0, 2)).save(tmp_path / "other.safetensors")
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--dlm", str(head_path), "-o", str(tmp_path / "p"))
    assert_one_line_error(result, "other.safetensors", "hidden_size 32, the LLM 64")
    assert not (tmp_path / "p").exists()


def test_real_compile_unknown_target(tmp_path):
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--target", "z9000", "-o", str(tmp_path / "p"))
    assert_one_line_error(result, "z9000")
    assert not (tmp_path / "p").exists()


def test_selection_overlap_reaches_the_plan_and_bad_values_exit_2(tmp_path):
    out = tmp_path / "low"
    result = invoke("compile", "tiny-llama", "--max-len", "2k", "--selection-overlap", "0.15", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert load_plan(out).workload.selection_overlap == 0.15
    bad = invoke("compile", "tiny-llama", "--max-len", "2k", "--selection-overlap", "1.5", "-o", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "selection overlap 1.5" in bad.output and not (tmp_path / "x").exists()


def test_inspect_reprices_at_another_selection_overlap(tmp_path):
    out = tmp_path / "tiny"
    assert invoke("compile", "tiny-llama", "--max-len", "2k", "-o", str(out)).exit_code == 0
    shown = invoke("inspect", str(out), "--selection-overlap", "0.3")
    assert shown.exit_code == 0, shown.output
    assert "selection overlap 0.3" in shown.stdout and "critical path" in shown.stdout
    assert_one_line_error(invoke("inspect", str(out), "--selection-overlap", "1.5"), "--selection-overlap 1.5")


def test_run_defaults_to_the_plans_source_and_wraps_chat(plan_dir, tmp_path, monkeypatch):
    import dataclasses as dc

    from specontext_compiler.runtime import plan as plan_module
    source = tmp_path / "weights"
    source.mkdir()
    real_load = plan_module.load_plan

    def with_source(directory):
        loaded = real_load(directory)
        return dc.replace(loaded, model=dc.replace(loaded.model, source=str(source)))

    bound, seen = {}, {}

    class ChatTokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}<assistant>"

        def decode(self, ids, skip_special_tokens=True):
            return ""

    class FakeEngine:
        tokenizer = ChatTokenizer()

        def generate(self, prompts, max_new_tokens, temperature, top_p, stream):
            seen["prompts"] = prompts
            return [type("Generation", (), {"text": "ok", "token_ids": [1]})()]

    monkeypatch.setattr(plan_module, "load_plan", with_source)
    monkeypatch.setattr(Plan, "bind", lambda self, model, dlm=None, **kw: bound.update(model=model) or FakeEngine())
    result = invoke("run", str(plan_dir), "--prompt", "Hi", "--chat", "--no-stream")
    assert result.exit_code == 0, result.output
    assert bound["model"] == str(source) and seen["prompts"] == ["<user>Hi<assistant>"]


def test_run_without_model_on_a_plan_with_no_source_says_pass_model(plan_dir, monkeypatch):
    import dataclasses as dc

    from specontext_compiler.runtime import plan as plan_module
    real_load = plan_module.load_plan
    monkeypatch.setattr(plan_module, "load_plan",        # as compiled from a preset: no weights recorded
                        lambda directory: (lambda p: dc.replace(p, model=dc.replace(p.model, source=None)))(
                            real_load(directory)))
    assert_one_line_error(invoke("run", str(plan_dir), "--prompt", "Hi"), "records no model source", "--model")


def test_serve_passes_its_options(plan_dir, monkeypatch):
    from specontext_compiler import serve as serve_module
    got = {}
    monkeypatch.setattr(serve_module, "serve", lambda plan, model, host, port, dlm=None: got.update(
        plan=plan, model=model, host=host, port=port))
    result = invoke("serve", str(plan_dir), "--port", "8123", "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert got == {"plan": plan_dir, "model": None, "host": "0.0.0.0", "port": 8123}
