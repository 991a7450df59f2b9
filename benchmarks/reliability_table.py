"""Run every bad input of issue 11 and write docs/RELIABILITY.md: the command, its exit code, its first line.

    .venv/bin/python benchmarks/reliability_table.py --out docs/RELIABILITY.md

Each CLI case runs `python -m specontext_compiler ...` in a fresh process, in a scratch folder that
holds the inputs (tiny configs, a compiled tiny plan, tampered copies of it); Python API cases run
in this process and report the exception they raise. tests/test_reliability_cli.py runs the same
CLI cases through typer's test runner. Takes a few minutes on CPU (a process start per case).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "specontext_compiler" / "presets" / "tiny-llama.json"


@dataclass(frozen=True)
class Case:
    section: str
    label: str
    argv: tuple[str, ...] = ()            # a CLI case: arguments after `specontext`
    api: str = ""                         # an API case: a name in API_CASES
    as_nobody: bool = False               # root ignores permission bits: run this one as nobody
    fresh: bool = False                   # runs in its own copy of the inputs (it may delete them)
    expect: str = ""                      # words the error line must hold (tests/test_reliability_cli.py)


TRACEBACKS = "tracebacks -> exit 2"
SILENT = "silent wrong results"
INTEGRITY = "plan integrity"
DATA_LOSS = "data loss (-o)"

CASES = [
    Case(TRACEBACKS, "--max-len inf", ("compile", "tiny", "--max-len", "inf", "-o", "out"), expect="not a token count"),
    Case(TRACEBACKS, "--max-len 1e400", ("compile", "tiny", "--max-len", "1e400", "-o", "out"), expect="not a token count"),
    Case(TRACEBACKS, "sc.compile(max_len='inf')", api="compile_inf"),
    Case(TRACEBACKS, "OPT config", ("compile", "opt", "--max-len", "2k", "-o", "out"), expect="has no intermediate_size"),
    Case(TRACEBACKS, "Mamba config", ("compile", "mamba", "--max-len", "2k", "-o", "out"), expect="has no num_attention_heads"),
    Case(TRACEBACKS, "config with 0 heads", ("compile", "zero_heads", "--max-len", "2k", "-o", "out"), expect="count is zero"),
    Case(TRACEBACKS, "config with 0 layers", ("compile", "zero_layers", "--max-len", "2k", "-o", "out"), expect="num_hidden_layers = 0"),
    Case(TRACEBACKS, "hidden size 66, 4 heads", ("compile", "bad_div", "--max-len", "2k", "-o", "out"), expect="not a multiple"),
    Case(TRACEBACKS, "hidden_size: \"64\" (a string)", ("compile", "wrong_types", "--max-len", "2k", "-o", "out"), expect="hidden_size"),
    Case(TRACEBACKS, "non-UTF-8 target TOML", ("compile", "tiny", "--max-len", "2k", "--target-file", "latin1.toml", "-o", "out"), expect="not UTF-8"),
    Case(TRACEBACKS, "a directory as the target TOML", ("compile", "tiny", "--max-len", "2k", "--target-file", "tomldir.toml", "-o", "out"),
         expect="is a directory"),
    Case(TRACEBACKS, "-o under a regular file", ("compile", "tiny", "--max-len", "2k", "-o", "afile/sub"), expect="is a file"),
    Case(TRACEBACKS, "-o on a file system that refuses writes (/sys)", ("compile", "tiny", "--max-len", "2k", "-o", "/sys/specontext-plan"), expect="cannot write the plan"),
    Case(TRACEBACKS, "-o in a folder without write permission (as nobody)", ("compile", "tiny", "--max-len", "2k", "-o", "readonly/plan"), as_nobody=True,
         expect="not writable"),
    Case(TRACEBACKS, "inspect --plot to /sys", ("inspect", "plan", "--plot", "/sys/plan.png"), expect="cannot write the plot"),
    Case(TRACEBACKS, "inspect --plot x.txt", ("inspect", "plan", "--plot", "x.txt"), expect="name it x.png"),
    Case(TRACEBACKS, "inspect --plot DIR", ("inspect", "plan", "--plot", "emptydir"), expect="is a directory"),
    Case(TRACEBACKS, "plan.json with a wrong field type (resealed)", ("inspect", "plan_wrong_type"), expect="workload.max_len is a str"),
    Case(TRACEBACKS, "plan.json with prediction: null (resealed)", ("inspect", "plan_prediction_null"), expect="prediction is null"),
    Case(TRACEBACKS, "a truncated GGUF header", ("compile", "trunc.gguf", "--max-len", "2k", "-o", "out"), expect="truncated or not GGUF"),
    Case(TRACEBACKS, "run on a config-only directory", ("run", "plan", "--model", "tiny", "--prompt", "hi"), expect="cannot load weights"),
    Case(TRACEBACKS, "bind on a config-only directory", api="bind_config_only"),
    Case(TRACEBACKS, "eval on a model without a tokenizer", ("eval", "plan", "--task", "recall", "--budget", "64"), expect="no tokenizer"),
    Case(TRACEBACKS, "compile --budget 0 (typer's range check)", ("compile", "tiny", "--budget", "0"), expect="--budget"),
    Case(TRACEBACKS, "run --top-p 2 (typer's range check)", ("run", "plan", "--model", "tinyw", "--prompt", "x", "--top-p", "2"), expect="--top-p"),
    Case(SILENT, "target hbm_gbps = nan", ("compile", "tiny", "--max-len", "2k", "--target-file", "nan.toml", "-o", "out"), expect="hbm_gbps = nan"),
    Case(SILENT, "target h2d_gbps = inf", ("compile", "tiny", "--max-len", "2k", "--target-file", "inf.toml", "-o", "out"), expect="h2d_gbps = inf"),
    Case(SILENT, "eval --budget 0", ("eval", "plan", "--task", "recall", "--budget", "0"), expect="--budget 0"),
    Case(SILENT, "eval --budget -5", ("eval", "plan", "--task", "recall", "--budget", "-5"), expect="--budget -5"),
    Case(SILENT, "4 heads, 3 KV heads", ("compile", "gqa43", "--max-len", "2k", "-o", "out"), expect="num_key_value_heads 3"),
    Case(SILENT, "--budget 2048 --max-len 1k", ("compile", "tiny", "--max-len", "1k", "--budget", "2048", "-o", "out"), expect="larger than --max-len 1024"),
    Case(SILENT, "generate(max_new_tokens=0)", api="gen_max_new_0"),
    Case(SILENT, "generate(temperature=-1)", api="gen_temperature_neg"),
    Case(SILENT, "generate(temperature=nan)", api="gen_temperature_nan"),
    Case(SILENT, "generate(top_p=1.5)", api="gen_top_p_big"),
    Case(SILENT, "generate(top_p=-0.1)", api="gen_top_p_neg"),
    Case(SILENT, "generate([[5, 6.0]]) (a float id)", api="gen_float_id"),
    Case(SILENT, "generate([[5, 999]]) (out of vocabulary)", api="gen_oov_id"),
    Case(SILENT, "generate([[5, -1]])", api="gen_negative_id"),
    Case(SILENT, "generate('text') (not a list)", api="gen_not_list"),
    Case(SILENT, "generate([[5], [999]]): bad id in request 1", api="gen_late_bad_id"),
    Case(SILENT, "bind(batch=0)", api="bind_batch_0"),
    Case(INTEGRITY, "plan.json: graph.sha256 blanked", ("inspect", "plan_graph_sha_blank"), expect="plan.json was changed"),
    Case(INTEGRITY, "plan.json: budget: 0", ("inspect", "plan_budget_0"), expect="plan.json was changed"),
    Case(INTEGRITY, "plan.json: max_len changed", ("inspect", "plan_max_len"), expect="plan.json was changed"),
    Case(INTEGRITY, "plan.json: a segment removed", ("inspect", "plan_segments"), expect="plan.json was changed"),
    Case(INTEGRITY, "decode_graph.py edited", ("inspect", "plan_graph_edit"), expect="decode_graph.py was changed"),
    Case(INTEGRITY, "decode_graph.py edited, then run", ("run", "plan_graph_edit", "--model", "tinyw", "--prompt", "hi"), expect="decode_graph.py was changed"),
    Case(INTEGRITY, "kernels/sparse_decode.py edited", ("inspect", "plan_kernel_edit"), expect="sparse_decode.py was changed"),
    Case(INTEGRITY, "report.md edited", ("inspect", "plan_report_edit"), expect="report.md was changed"),
    Case(INTEGRITY, "manifest.json removed", ("inspect", "plan_no_manifest"), expect="no manifest.json"),
    Case(INTEGRITY, "budget: 0 with the manifest rewritten to match", ("inspect", "plan_budget_0_resealed"), expect="workload.budget is 0"),
    Case(DATA_LOSS, "-o . (the current directory)", ("compile", "tiny", "--max-len", "2k", "-o", "."), fresh=True, expect="current directory"),
    Case(DATA_LOSS, "-o '' (the current directory)", ("compile", "tiny", "--max-len", "2k", "-o", ""), fresh=True, expect="current directory"),
    Case(DATA_LOSS, "-o tiny (the model's own folder)", ("compile", "tiny", "--max-len", "2k", "-o", "tiny"), fresh=True, expect="did not write"),
    Case(DATA_LOSS, "-o notes.txt (a file)", ("compile", "tiny", "--max-len", "2k", "-o", "notes.txt"), fresh=True, expect="not a directory"),
    Case(DATA_LOSS, "-o somedir (a folder with files)", ("compile", "tiny", "--max-len", "2k", "-o", "somedir"), fresh=True, expect="did not write"),
]


# -- inputs -------------------------------------------------------------------------------------
def make_inputs(work: Path, with_plan: bool = True) -> Path:
    """The scratch folder the cases run in."""
    base = json.loads(PRESET.read_text())
    configs = {"tiny": {}, "zero_heads": {"num_attention_heads": 0, "num_key_value_heads": 0},
               "zero_layers": {"num_hidden_layers": 0}, "bad_div": {"hidden_size": 66, "head_dim": None},
               "wrong_types": {"hidden_size": "64"}, "gqa43": {"num_key_value_heads": 3}}
    for name, changes in configs.items():
        config = {k: v for k, v in {**base, **changes}.items() if v is not None}
        _write(work / name / "config.json", json.dumps(config))
    _write(work / "opt" / "config.json", json.dumps({
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "ffn_dim": 128, "vocab_size": 256, "max_position_embeddings": 2048,
        "word_embed_proj_dim": 64}))
    _write(work / "mamba" / "config.json", json.dumps({
        "model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "vocab_size": 256, "state_size": 16}))
    (work / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    (work / "tomldir.toml").mkdir()
    (work / "emptydir").mkdir()
    target = (REPO / "specontext_compiler" / "targets" / "h100.toml").read_text()
    _write(work / "nan.toml", _set_figure(target, "hbm_gbps", "nan"))
    _write(work / "inf.toml", _set_figure(target, "h2d_gbps", "inf"))
    _write(work / "afile", "not a folder\n")
    (work / "trunc.gguf").write_bytes(b"GGUF\x03\x00")
    (work / "readonly").mkdir()
    (work / "readonly").chmod(0o555)
    _write(work / "notes.txt", "a user's notes\n")
    _write(work / "somedir" / "keep.txt", "a user's file\n")
    if with_plan:
        _tiny_weights(work / "tinyw")
        from specontext_compiler import compile_model
        compile_model(str(work / "tinyw"), target="h100", max_len=512, budget=64, out=work / "plan")
        _tampered_plans(work)
    (work / ".nobody").mkdir()
    (work / ".nobody").chmod(0o777)   # HOME of the as-nobody case
    work.chmod(0o755)                 # readable by the as-nobody case
    return work


def _set_figure(toml: str, key: str, value: str) -> str:
    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line for line in toml.splitlines()]
    return "\n".join(lines) + "\n"


def _tiny_weights(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from specontext_compiler.models import load_preset_config
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_preset_config("tiny-llama")).save_pretrained(folder)


def _tampered_plans(work: Path) -> None:
    def json_edit(name, change, reseal=False):
        folder = Path(shutil.copytree(work / "plan", work / name))
        data = json.loads((folder / "plan.json").read_text())
        change(data)
        (folder / "plan.json").write_text(json.dumps(data, indent=2))
        if reseal:
            _reseal(folder)

    def file_edit(name, rel):
        folder = Path(shutil.copytree(work / "plan", work / name))
        with open(folder / rel, "a") as handle:
            handle.write("\nprint('not what the compiler wrote')\n")

    json_edit("plan_graph_sha_blank", lambda d: d["graph"].update(sha256=""))
    json_edit("plan_budget_0", lambda d: d["workload"].update(budget=0))
    json_edit("plan_max_len", lambda d: d["workload"].update(max_len=4096))
    json_edit("plan_segments", lambda d: d["segments"].pop())
    json_edit("plan_budget_0_resealed", lambda d: d["workload"].update(budget=0), reseal=True)
    json_edit("plan_wrong_type", lambda d: d["workload"].update(max_len="512"), reseal=True)
    json_edit("plan_prediction_null", lambda d: d.update(prediction=None), reseal=True)
    file_edit("plan_graph_edit", "decode_graph.py")
    file_edit("plan_kernel_edit", "kernels/sparse_decode.py")
    file_edit("plan_report_edit", "report.md")
    folder = Path(shutil.copytree(work / "plan", work / "plan_no_manifest"))
    (folder / "manifest.json").unlink()


def _reseal(folder: Path) -> None:
    """Rewrite the manifest over edited files: the integrity check passes, the semantic one must not."""
    from specontext_compiler.runtime.plan_integrity import MANIFEST_FILE, plan_manifest
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and p.name not in (MANIFEST_FILE, "plan.json") and "__pycache__" not in p.parts}
    (folder / MANIFEST_FILE).write_text(plan_manifest((folder / "plan.json").read_text(), files)[MANIFEST_FILE])


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- the Python API cases -----------------------------------------------------------------------
def _engine(work: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from specontext_compiler import load_plan
    model = AutoModelForCausalLM.from_pretrained(work / "tinyw", dtype=torch.float32)
    return load_plan(work / "plan").bind(model, device="cpu")


def _generate(prompts, **options):
    return lambda work: _engine(work).generate(prompts, **{"max_new_tokens": 2, **options})


API_CASES = {
    "compile_inf": lambda work: __import__("specontext_compiler").compile("tiny-llama", max_len="inf",
                                                                          out=work / "out"),
    "bind_config_only": lambda work: __import__("specontext_compiler").load_plan(work / "plan").bind(
        str(work / "tiny"), device="cpu"),
    "bind_batch_0": lambda work: __import__("specontext_compiler").load_plan(work / "plan").bind(
        str(work / "tinyw"), device="cpu", batch=0),
    "gen_max_new_0": _generate([[5, 6]], max_new_tokens=0),
    "gen_temperature_neg": _generate([[5, 6]], temperature=-1.0),
    "gen_temperature_nan": _generate([[5, 6]], temperature=float("nan")),
    "gen_top_p_big": _generate([[5, 6]], top_p=1.5),
    "gen_top_p_neg": _generate([[5, 6]], top_p=-0.1),
    "gen_float_id": _generate([[5, 6.0]]),
    "gen_oov_id": _generate([[5, 999]]),
    "gen_negative_id": _generate([[5, -1]]),
    "gen_not_list": _generate("text"),
    "gen_late_bad_id": _generate([[5], [999]]),
}


def run_api_case(case: Case, work: Path) -> tuple[str, str]:
    """(result, first line): the exception's class and message, or 'returned'."""
    try:
        API_CASES[case.api](work)
    except Exception as exc:          # noqa: BLE001 - recording what escapes is the point
        return f"raises {type(exc).__name__}", (str(exc).strip().splitlines() or [""])[0]
    return "returned", ""


def run_cli_case(case: Case, work: Path) -> tuple[str, str]:
    """(exit code, first line of stderr) of `python -m specontext_compiler ARGS` in work."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    env.pop("SPECONTEXT_DEBUG", None)
    command = [sys.executable, "-m", "specontext_compiler", *case.argv]
    if case.as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        env["HOME"] = env["TRITON_CACHE_DIR"] = str(work / ".nobody")
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("Loading weights", "warning:"))]
    return f"exit {done.returncode}", (lines[0] if lines else "(no error line)")


def _left_behind(folder: Path) -> str:
    """What a data-loss case left of its inputs (the user's files that must survive)."""
    if not folder.is_dir():
        return "; the folder itself is gone"
    kept = [name for name in ("tiny/config.json", "notes.txt", "somedir/keep.txt") if (folder / name).is_file()]
    return f"; kept {', '.join(kept) or 'none of the user files'}"


def _fresh_copy(work: Path, scratch: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    make_inputs(folder, with_plan=False)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    parser.add_argument("--sections", help="re-run only these sections (comma separated titles) and "
                        "replace them in an existing --out")
    args = parser.parse_args()
    wanted = set(args.sections.split(",")) if args.sections else None
    scratch = Path(tempfile.mkdtemp(prefix="specontext-reliability-"))
    scratch.chmod(0o755)
    try:
        work = make_inputs(scratch / "inputs")
        rows = []
        for case in (c for c in CASES if wanted is None or c.section in wanted):
            where = _fresh_copy(work, scratch) if case.fresh else work
            result, line = run_api_case(case, where) if case.api else run_cli_case(case, where)
            after = _left_behind(where) if case.fresh else ""
            rows.append((case, result, line.replace(str(where), "."), after))
            print(f"{case.section:24} {case.label:50} {result:14} {line[:100]}", flush=True)
        text = render(rows)
        if wanted is not None:
            text = splice_sections(args.out.read_text(), text)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def splice_sections(document: str, partial: str) -> str:
    """The document with each '## title' section that `partial` holds replaced by partial's."""
    def split(text: str) -> tuple[str, dict[str, str]]:
        head, *parts = text.split("\n## ")
        return head, {part.split("\n", 1)[0]: part for part in parts}
    head, sections = split(document)
    sections.update(split(partial)[1])
    return "\n## ".join([head, *sections.values()])


def render(rows) -> str:
    out = ["# Reliability: every bad input of issue 11, what specontext does with it", "",
           "Generated by `.venv/bin/python benchmarks/reliability_table.py --out docs/RELIABILITY.md` "
           "(CPU, a scratch folder of tiny inputs). CLI rows give the exit code and the first line on "
           "stderr; Python API rows give the exception raised. The same CLI cases are tests in "
           "tests/test_reliability_cli.py; tests/test_reliability_plan_integrity.py, "
           "tests/test_reliability_inputs.py and tests/test_reliability_requests.py cover each class. "
           "Replacing a plan under concurrency and interruption has its own tests "
           "(tests/runtime/test_atomic_dir.py, tests/test_plan_output.py).", ""]
    section = None
    for case, result, line, after in rows:
        if case.section != section:
            section = case.section
            out += ["", f"## {section}", "", "| case | command | result | first line |", "|---|---|---|---|"]
        command = ("`specontext " + " ".join(a if a else "''" for a in case.argv) + "`") if case.argv else "Python API"
        cell = line.replace("|", "\\|")
        out.append(f"| {case.label} | {command} | {result}{after} | {cell} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
