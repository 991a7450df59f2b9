"""The default head path on a GPU: compile a model with weights and no --dlm, twice, from an empty head cache.

    python3 benchmarks/bench_default_head.py --model smollm2 --out $OUT [--max-len 8k] [--passkey-keys 3]

The first compile finds no head cached for the model's fingerprint and, torch seeing a GPU,
distills one there (distill/default_head.py, the settings of a plain `specontext distill MODEL`);
the second finds it in the cache. Both must record the same head (kind "distilled"). The head
cache ($SPECONTEXT_CACHE) is a fresh temporary folder unless --cache is given, so the user's cache
is untouched and the distill really runs. With --passkey-keys N > 0, the second plan is scored on
the passkey task at --max-len (specontext eval's runner: the plan's head against full attention
and the other methods, at the plan's budget). Needs PuLP (compile) and, for a GGUF, gguf; on the
device machine run it through benchmarks/device_run.sh's set-up (the PuLP wheel in .whl).
Writes OUT/default_head.json (and the plans under OUT) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path


def _compile(model: str, max_len: int, out: Path) -> tuple[dict, float, list[str]]:
    from specontext_compiler import compile_model
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = compile_model(model, target="h200", max_len=max_len, out=out)
    lines = [f"{item.category.__name__}: {item.message}" for item in caught
             if "specontext" in item.category.__module__]
    return plan.retrieval_head, time.perf_counter() - started, lines


def _model_path(model: str) -> str:
    from specontext_compiler import smollm2
    directory, gguf_file = smollm2.resolve_source(model)
    return str(directory / gguf_file if gguf_file else directory)


def _passkey(plan_dir: Path, length: int, keys: int) -> dict:
    from specontext_compiler.eval import runner
    from specontext_compiler.eval.tables import markdown
    result = runner.run_eval_for_plan(plan_dir, ["passkey"], lengths=[length], passkey_keys=keys)
    return {"result": json.loads(runner.to_json(result)), "markdown": markdown(result)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', an HF directory with weights, or a GGUF")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None, help="head cache root (default: a fresh temp folder)")
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--passkey-keys", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: this benchmark measures the on-demand distill a GPU triggers")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["SPECONTEXT_CACHE"] = str(args.cache or tempfile.mkdtemp(prefix="specontext-cache-"))
    model = _model_path(args.model)
    first, first_s, first_lines = _compile(model, args.max_len, args.out / "plan-first")
    again, again_s, again_lines = _compile(model, args.max_len, args.out / "plan-cached")
    torch.cuda.synchronize()
    record = {"model": model, "max_len": args.max_len, "cache": os.environ["SPECONTEXT_CACHE"],
              "gpu": torch.cuda.get_device_name(), "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
              "first": {"seconds": first_s, "head": first, "messages": first_lines},
              "cached": {"seconds": again_s, "head": again, "messages": again_lines},
              "same_head": first == again}
    if args.passkey_keys > 0:
        record["passkey"] = _passkey(args.out / "plan-cached", args.max_len, args.passkey_keys)
    (args.out / "default_head.json").write_text(json.dumps(record, indent=1, default=str))
    from specontext_compiler.head_info import recall_text
    print("| compile | seconds | head | kind | recall | messages |\n|---|---|---|---|---|---|")
    for name, seconds, head, lines in (("first (distills)", first_s, first, first_lines),
                                       ("second (cached)", again_s, again, again_lines)):
        print(f"| {name} | {seconds:.1f} | {head.get('source')} | {head.get('kind')} | {recall_text(head)} | "
              f"{len(lines)} |")
    print(f"\nsame head recorded: {record['same_head']}; peak GPU memory {record['peak_gpu_bytes'] / 2**30:.2f} GiB")
    if "passkey" in record:
        print("\n" + record["passkey"]["markdown"])
    return 0 if record["same_head"] and first.get("kind") == "distilled" else 1


if __name__ == "__main__":
    raise SystemExit(main())
