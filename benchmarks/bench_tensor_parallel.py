"""Tensor-parallel decode: a `--gpus N` plan run by N processes (torchrun), tokens/s against the plan.

    # here (PuLP): compile one plan per N, self:0 head (a head file is not split yet)
    for n in 1 2 4 8; do specontext compile llama-3.1-8b --target h200 --max-len 32k --gpus $n \
        --dlm self:0 -o benchmarks/plans-tp/g$n; done
    # on a machine with N GPUs, for each N:
    torchrun --nproc-per-node N benchmarks/bench_tensor_parallel.py --plan benchmarks/plans-tp/gN --out $OUT

Model: the plan's shape with random bf16 weights built on each rank's GPU from one seed (every
rank builds the whole model, then bind keeps its shards: the 8B shape only; a 70B shape needs a
loader that reads each rank's slices, which does not exist yet). The prompt is random tokens of
--prompt-len, prefilled through the plan; decode steps are timed after --warmup steps. Runs on CPU
with gloo too (a smoke test: --device cpu). Rank 0 writes OUT/bench_tensor_parallel.jsonl and
prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

from specontext_compiler.runtime.plan import load_plan


def random_model(plan, device: torch.device, dtype: torch.dtype):
    """A Llama of the plan's shape with random weights, the same on every rank (one seed)."""
    m = plan.model
    config = LlamaConfig(hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, vocab_size=m.vocab_size,
                         max_position_embeddings=m.max_positions, rope_theta=m.rope_theta)
    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def timed_decode(engine, prompt: list[int], warmup: int, steps: int, batch: int) -> float:
    """Seconds per decode step over `steps` steps after `warmup` (every rank times the same steps)."""
    engine.generate([prompt] * batch, max_new_tokens=warmup, stop_at_eos=False)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    start = time.perf_counter()
    engine.generate([prompt] * batch, max_new_tokens=steps, stop_at_eos=False)
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    on_gpu = args.device == "cuda"
    if on_gpu:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    device = torch.device(f"cuda:{local}" if on_gpu else "cpu")
    plan = load_plan(args.plan)
    engine = plan.bind(random_model(plan, device, torch.bfloat16 if on_gpu else torch.float32), device=device)
    batch = plan.workload.batch
    prompt = torch.randint(3, plan.model.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    # generate() prefills each time; the prefill is outside the timed window only when it is short
    # beside the steps, so the step time is the difference of two runs' wall times
    short = timed_decode(engine, prompt.tolist(), args.warmup, 1, batch)
    long = timed_decode(engine, prompt.tolist(), args.warmup, 1 + args.steps, batch)
    step_s = (long * (1 + args.steps) - short) / args.steps
    if dist.get_rank() == 0:
        gpus = (plan.tensor_parallel or {}).get("gpus", 1)
        row = {"gpus": gpus, "world": dist.get_world_size(), "batch": batch, "prompt_len": args.prompt_len,
               "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
               "predicted_tokens_per_s_at_max_len": plan.prediction.get("tokens_per_s_at_max_len"),
               "device": torch.cuda.get_device_name(device) if on_gpu else "cpu"}
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench_tensor_parallel.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        print("| GPUs | batch | prompt | step ms | tok/s | plan tok/s at max len |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        print(f"| {gpus} | {batch} | {args.prompt_len} | {row['step_ms']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{row['predicted_tokens_per_s_at_max_len'] or float('nan'):.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
