"""Check a whole generate() batch, and bind()'s options, before any of it runs.

A bad request (a float or out-of-vocabulary token id, top_p = 2, a NaN temperature) would otherwise
raise a raw IndexError deep in the embedding, or sample nonsense, and only after the requests
before it were prefilled. Each problem is one RequestError line naming the request and the fix.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

from specontext_compiler.errors import RequestError


def validate_requests(prompts: Any, *, max_new_tokens: Any, temperature: Any, top_p: Any, vocab_size: int | None,
                      seed: Any = None, stream: Callable | None = None) -> None:
    """Raise RequestError for the first problem in the batch; return None when all of it can be served."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise RequestError(f"prompts must be a list of prompts, not {type(prompts).__name__}; "
                           "wrap one prompt as [prompt]")
    _check_int("max_new_tokens", max_new_tokens, low=1)
    _check_real("temperature", temperature, ">= 0 (0 is greedy)", lambda t: t >= 0)
    _check_real("top_p", top_p, "in (0, 1]", lambda p: 0 < p <= 1)
    if seed is not None:
        _check_int("seed", seed, low=0)
    if stream is not None and not callable(stream):
        raise RequestError(f"stream must be a function (request index, token id), not {type(stream).__name__}")
    for index, prompt in enumerate(prompts):
        _check_prompt(index, prompt, vocab_size)


def validate_bind_options(*, batch: Any) -> None:
    """bind(batch=...): None (the plan's batch) or a positive request count."""
    if batch is not None:
        _check_int("batch", batch, low=1, fix="pass a positive number of request slots, or None for the plan's")


def _check_prompt(index: int, prompt: Any, vocab_size: int | None) -> None:
    if isinstance(prompt, str):
        return
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):   # a tensor or array of ids
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise RequestError(f"request {index} is a {type(prompt).__name__}; a prompt is a text or a list of token ids")
    for position, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise RequestError(f"request {index}, token {position} is {token!r}, not an integer token id")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise RequestError(f"request {index}, token {position} is {int(token)}, outside the vocabulary "
                               f"{bound}; tokenize with the model's own tokenizer")


def _check_int(name: str, value: Any, low: int, fix: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise RequestError(f"{name} = {value!r} must be an integer >= {low}" + (f"; {fix}" if fix else ""))


def _check_real(name: str, value: Any, wanted: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise RequestError(f"{name} = {value!r} must be a finite number {wanted}")
