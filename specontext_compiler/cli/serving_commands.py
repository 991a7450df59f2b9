"""`specontext run` (one prompt), `serve` (HTTP) and `eval` (a plan's selection, offline)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from specontext_compiler.cli.app import app, edge, out_console
from specontext_compiler.errors import SpecontextError
from specontext_compiler.sizes import parse_tokens


class _StreamPrinter:
    """The engine's stream callback (request index, token id): prints request 0's new text.

    It decodes the whole sequence so far and prints the new suffix, since one token can be part
    of a multi-byte character that only decodes with its neighbours."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, index: int, token: int | str) -> None:
        if index != 0:
            return
        if isinstance(token, str) or self.tokenizer is None:
            sys.stdout.write(str(token) if isinstance(token, str) else f"{token} ")
        else:
            self.ids.append(int(token))
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            sys.stdout.write(text[len(self.printed):])
            self.printed = text
        sys.stdout.flush()


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    text = getattr(output, "text", None)
    return text if text is not None else " ".join(map(str, getattr(output, "token_ids", [])))


@app.command("run")
@edge
def run_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt text.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR", help="Local HF model directory or .gguf file (or 'smollm2'); default: the model the plan was compiled from.")] = None,
    dlm: Annotated[Optional[Path], typer.Option("--dlm", metavar="PATH", help="Distilled model directory or retrieval-head .safetensors file, if the plan needs one.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, metavar="N", help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, metavar="T", help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, metavar="P", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as a user message in the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are generated.")] = True,
) -> None:
    """Generate text for one prompt with a compiled plan bound to local weights.

    Example: specontext run plans/smollm2-a100 --prompt "Hello" --chat
    """
    from specontext_compiler.dlm import head_for_plan
    from specontext_compiler.runtime.plan import load_plan
    from specontext_compiler.serve import resolve_model
    plan = load_plan(plan_dir)
    engine = plan.bind(resolve_model(plan, model), dlm=head_for_plan(str(dlm), plan) if dlm else None)
    tokenizer = getattr(engine, "tokenizer", None)
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise SpecontextError("--chat needs the model's chat template, and its tokenizer has none; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    printer = _StreamPrinter(tokenizer) if stream else None
    outputs = engine.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stream=printer)
    if not stream:
        sys.stdout.write(_output_text(outputs[0]))
    sys.stdout.write("\n")


@app.command("serve")
@edge
def serve_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile`.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR", help="Local HF model directory or .gguf file (or 'smollm2'); default: the model the plan was compiled from.")] = None,
    dlm: Annotated[Optional[Path], typer.Option("--dlm", metavar="PATH", help="Distilled model directory or retrieval-head .safetensors file, if the plan needs one.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve a plan over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    Example: specontext serve plans/smollm2-a100 --port 8000
    """
    from specontext_compiler.serve import serve
    serve(plan_dir, model, host, port, dlm=str(dlm) if dlm else None)


@app.command("eval")
@edge
def eval_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile` from a local model.")],
    task: Annotated[list[str], typer.Option("--task", metavar="TASK", help="recall (attention mass kept vs full attention) or passkey; repeat for both.")],
    length: Annotated[Optional[list[str]], typer.Option("--length", metavar="TOKENS", help="Passkey context length in tokens (4096, 4k); repeatable. Default: 2k, 4k, 8k.")] = None,
    budget: Annotated[Optional[list[int]], typer.Option("--budget", metavar="TOKENS", help="Recall budget in selected tokens; repeatable. Default: 256 to 2048.")] = None,
    question: Annotated[str, typer.Option("--question", metavar="MODE", help="Passkey: 'prompt' (the question is part of the densely prefilled prompt, as `specontext run` serves it) or 'decode' (its tokens are sparse decode steps; stricter).")] = "prompt",
    keys: Annotated[int, typer.Option("--keys", metavar="N", help="Passkey keys (cases) per length and depth.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Measure a plan's token selection on the plan's own model, offline (CPU is fine).

    Example: specontext eval plans/smollm2-a100 --task recall --task passkey --length 4k
    """
    from specontext_compiler.eval import runner
    unknown = sorted(set(task) - {"recall", "passkey"})
    if unknown:
        raise SpecontextError(f"--task {', '.join(unknown)} is not a task; choose recall or passkey")
    from specontext_compiler.eval.passkey import QUESTION_MODES
    if question not in QUESTION_MODES:            # before the plan and model load
        raise SpecontextError(f"--question {question} is not a mode; choose {' or '.join(QUESTION_MODES)}")
    if keys < 1:
        raise SpecontextError(f"--keys {keys} must be a positive integer")
    options: dict[str, Any] = {}
    if length:
        options["lengths"] = [parse_tokens(text, "--length") for text in length]
    if budget:
        bad = [b for b in budget if b < 1]
        if bad:
            raise SpecontextError(f"--budget {bad[0]} must be a positive number of selected tokens")
        options["budgets"] = budget
    options.update(passkey_question=question, passkey_keys=keys)
    result = runner.run_eval_for_plan(plan_dir, task, **options)
    if as_json:
        typer.echo(runner.to_json(result))
    else:
        runner.render_table(result, out_console())

