"""`specontext distill` at model scale: time and GPU memory on a Llama-3.1-8B-shaped model.

    python3 -m pip install -q --no-deps --no-build-isolation -e . && \
    python3 benchmarks/bench_distill.py --out $OUT          # on the GPU machine (one H200), minutes

Builds Llama-3.1-8B (the preset's config: 32 layers, 32 query / 8 KV heads, hidden 4096, vocab
128256, llama3 RoPE) with random bf16 weights made directly on the GPU (no download), then runs
the whole distillation (`distill_retrieval_head`: the automatic teacher-layer probe, the teacher
forward per sequence, the fused head's training) on a few sequences of 8k tokens. Random weights
teach nothing; they cost what real ones cost, which is what this measures. The text is the
distiller's own stdlib prose through a byte-level tokenizer (the real tokenizer is not offline).
Prints a table last (each stage's seconds, the peak of torch.cuda.max_memory_allocated) and
writes bench_distill.json and the log to --out.

`--config tiny --device cpu` runs the same code on an 8-layer toy model in seconds (the test does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 4096}


class ByteTokenizer:
    """UTF-8 bytes as token ids (below any real vocabulary's size): the distiller only needs ids."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return type("Encoded", (), {"input_ids": list(text.encode("utf-8"))})()


def build_model(name: str, device: str):
    """A random causal LM of the named shape, in bf16 on CUDA (fp32 on CPU), built in place."""
    from transformers import AutoConfig, LlamaForCausalLM

    from specontext_compiler.models import load_preset_config
    config = load_preset_config("llama-3.1-8b") if name == "llama-3.1-8b" else AutoConfig.for_model(
        "llama", **TINY)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # weights are born in bf16: no fp32 copy of 8B params
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


class StageClock:
    """Progress callback that records when each stage last advanced (its end) and logs notes."""

    def __init__(self, log):
        self.started, self.last, self.log = time.perf_counter(), {}, log

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        self.last[stage] = time.perf_counter()
        if note or done == total:
            self.log(f"{stage} {done}/{total} {note}".rstrip())

    def durations(self, end: float) -> dict[str, float]:
        """Seconds per stage, each from the previous stage's end."""
        marks, previous, out = sorted(self.last.items(), key=lambda item: item[1]), self.started, {}
        for stage, mark in marks:
            out[stage], previous = mark - previous, mark
        out["total"] = end - self.started
        return out


def run(args) -> dict:
    from specontext_compiler.distill import distill_retrieval_head
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    import transformers  # noqa: F401  (imported before the clock starts: its import is not the build)
    built = time.perf_counter()
    model = build_model(args.config, device)
    build_s = time.perf_counter() - built
    weights_gb = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = StageClock(log)
    head, report = distill_retrieval_head(model, ByteTokenizer(), sequences=args.sequences, seq_len=args.seq_len,
                                          epochs=args.epochs, queries=args.queries, loss_level=args.loss,
                                          name=f"{args.config}-random", progress=clock)
    stages = clock.durations(time.perf_counter())
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"config": args.config, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "sequences": args.sequences, "seq_len": args.seq_len,
            "epochs": args.epochs, "queries": args.queries, "loss": args.loss, "build_s": build_s,
            "weights_gb": weights_gb, "peak_allocated_gb": peak_gb, "stages_s": stages,
            "teacher_layers": report["teacher_layers"], "head_params": report["params"],
            "validation_after": report["after"], "log": log_lines}


def table(result: dict) -> str:
    """The markdown table printed last."""
    stages = result["stages_s"]
    per_sequence = stages.get("teacher", 0.0) / result["sequences"]
    rows = [("model", f"{result['config']} random weights, {result['device']} ({result['gpu'] or 'cpu'})"),
            ("data", f"{result['sequences']} sequences x {result['seq_len']} tokens, {result['epochs']} epochs, "
                     f"{result['queries']} queries/sequence, loss {result['loss']}"),
            ("build model", f"{result['build_s']:.1f} s ({result['weights_gb']:.1f} GiB of weights)"),
            ("choose teacher layers", f"{stages.get('layers', 0.0):.1f} s"),
            ("teacher", f"{stages.get('teacher', 0.0):.1f} s ({per_sequence:.2f} s per sequence)"),
            ("training", f"{stages.get('training', 0.0):.1f} s"),
            ("distill total", f"{stages['total']:.1f} s"),
            ("peak max_memory_allocated", f"{result['peak_allocated_gb']:.1f} GiB")]
    return "\n".join(["| what | measured |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("llama-3.1-8b", "tiny"), default="llama-3.1-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--loss", choices=("head", "group"), default="group")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON and log")
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps(result, indent=1))
    (out / "bench_distill.log").write_text("\n".join(result["log"]) + "\n")
    text = table(result)
    (out / "bench_distill.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
