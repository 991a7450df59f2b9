"""Continuous batching: a waiting queue, request slots that refill as soon as they free up.

Every step() of the scheduler
  1. admits waiting requests into free slots (the KV store was sized at bind for `slots` requests
     of the plan's max-len each, checked against the machine's memory then, so any mix of lengths
     up to max-len fits the plan's memory model once admitted),
  2. launches one decode step for every slot whose request is decoding,
  3. runs prefill chunks of admitted requests, up to `prefill_tokens` per slot that is not decoding,
     so a long prompt is spread over several steps instead of stalling the running requests,
  4. reads the tokens sampled one step earlier and hands them to their requests.
Tokens stay on the device: a step's input ids are the previous step's sampled ids, and the host
reads them one step late through the engine's asynchronous copy, so the GPU never waits for the
host between steps. A request that ends on a token the host has not read yet has one more step
launched for it, whose token is dropped (its slot is reset before reuse).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from specontext_compiler.errors import RequestError
from specontext_compiler.runtime.detokenizer import TextStream
from specontext_compiler.runtime.sampling_params import SamplingParams, SlotSampling

# on_output(request, token_id, text_delta, finish_reason): as each token is handed to its request;
# finish_reason is None until the last one.
OutputCallback = Callable[["Request", int, str, "str | None"], None]


@dataclass(eq=False)
class Request:
    """One request's state, from the queue to its last token."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_output: OutputCallback | None = None
    eos_ids: frozenset[int] = frozenset()
    slot: int | None = None
    prefilled: int = 0                 # prompt tokens in the KV cache
    cached: int = 0                    # all tokens in the KV cache (host's count, no device read)
    sampled: int = 0                   # tokens drawn on the device (handed out or in flight)
    token_ids: list[int] = field(default_factory=list)
    text: TextStream | None = None
    finish_reason: str | None = None   # "stop" (EOS or a stop string), "length", "abort"
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Prefill done and more tokens to draw."""
        return (not self.finished and self.prefilled == len(self.prompt_ids)
                and 0 < self.sampled < self.params.max_tokens)


class Scheduler:
    """Serves requests on an Engine (runtime/engine.py) with continuous batching."""

    def __init__(self, engine, prefill_tokens: int | None = None):
        self.engine = engine
        self.slots: list[Request | None] = [None] * engine.slots
        self.waiting: deque[Request] = deque()
        self.prefill_tokens = prefill_tokens or engine.prefill_chunk
        self.sampling = SlotSampling(engine.slots, engine.device)
        self.decode_steps = 0
        self.prefill_chunks = 0
        self.generated_tokens = 0
        self._ids = torch.zeros(engine.slots, 1, dtype=torch.long, device=engine.device)
        self._owners: dict[int, Request] = {}     # slot -> request whose token is in _ids
        self._idle_len = [0] * engine.slots         # cache length a free slot was left with
        self._counter = itertools.count()

    # -- the queue ---------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request cannot be served by this plan (nothing is queued)."""
        params.check()
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        need, limit = len(prompt_ids) + params.max_tokens, self.engine.max_len
        if need > limit:
            raise RequestError(f"the request needs {need} tokens (prompt {len(prompt_ids)} + max_tokens "
                               f"{params.max_tokens}), the plan's max-len is {limit}; shorten it or "
                               "compile with a larger --max-len")
        vocab = self.engine.vocab_size
        if vocab and not all(0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"the prompt has token ids outside the vocabulary [0, {vocab})")

    def add(self, prompt_ids: list[int], params: SamplingParams,
            on_output: OutputCallback | None = None) -> Request:
        """Queue a request (checked first); it starts as soon as a slot is free."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check(prompt_ids, params)
        tokenizer = self.engine.tokenizer
        request = Request(next(self._counter), prompt_ids, params, on_output, eos_ids=_eos_ids(tokenizer))
        if tokenizer is not None:
            request.text = TextStream(tokenizer, params.stop)
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is (queued or running); its slot frees at once."""
        if request in self.waiting:
            self.waiting.remove(request)
        if not request.finished:
            self._finish(request, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Admit, decode, prefill, hand out the previous step's tokens; returns requests that ended."""
        self._admit()
        read_tokens = self.engine.tokens_to_host(self._ids)
        ids, owners = self._decode()
        self._prefill(ids, owners)
        ended = self._deliver(read_tokens(), self._owners)
        self._ids = ids
        self._owners = {slot: r for slot, r in owners.items() if not r.finished}
        return ended

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is None and self.waiting:
                request = self.waiting.popleft()
                request.slot = slot
                self.slots[slot] = request
                self.engine.ctx.reset_slot(slot)
                self._idle_len[slot] = 0
                self.sampling.assign(slot, request.params)

    def _decode(self) -> tuple[torch.Tensor, dict[int, Request]]:
        """One decode step for the decoding slots; returns the sampled ids [S, 1] and their owners."""
        decoding = [r is not None and r.decoding for r in self.slots]
        if not any(decoding):
            return self._ids.clone(), {}    # the host copy of _ids may still be reading it
        longest = max(r.cached if r is not None else idle for r, idle in zip(self.slots, self._idle_len))
        logits = self.engine.decode(self._ids, decoding, longest)
        ids = self.engine.shared_tokens(self.sampling.sample(logits[:, -1], slice(0, len(self.slots))).view(-1, 1))
        owners = {}
        for slot, request in enumerate(self.slots):
            if decoding[slot]:
                request.cached += 1
                request.sampled += 1
                owners[slot] = request
        self.decode_steps += 1
        return ids, owners

    def _prefill(self, ids: torch.Tensor, owners: dict[int, Request]) -> None:
        """Prefill chunks of admitted requests, oldest first; a finished prompt samples its first token.

        The budget is one chunk per slot that did not decode this step: the decode step costs the
        same however many slots it serves, so while most slots wait for their prompts, more prompt
        tokens go in per step (fewer mostly idle decode steps); while most decode, one chunk a step
        keeps their pace."""
        budget = self.prefill_tokens * max(1, len(self.slots) - len(owners))
        for request in sorted((r for r in self.slots if r is not None), key=lambda r: r.id):
            while budget > 0 and request.prefilled < len(request.prompt_ids) and not request.finished:
                start = request.prefilled
                chunk = request.prompt_ids[start:start + min(budget, self.engine.prefill_chunk)]
                logits = self.engine.prefill_chunk_into(request.slot, chunk, start)
                request.prefilled = request.cached = start + len(chunk)
                budget -= len(chunk)
                self.prefill_chunks += 1
                if request.prefilled == len(request.prompt_ids):
                    rows = slice(request.slot, request.slot + 1)
                    ids[rows, 0] = self.engine.shared_tokens(self.sampling.sample(logits.view(1, -1), rows))
                    request.sampled = 1
                    owners[request.slot] = request

    def _deliver(self, tokens: list[int], owners: dict[int, Request]) -> list[Request]:
        ended = []
        for slot, request in owners.items():
            if request.finished:
                continue
            reason = self._take(request, tokens[slot])
            if reason is not None:
                self._finish(request, reason)
                ended.append(request)
        return ended

    def _take(self, request: Request, token: int) -> str | None:
        """Hand one token to its request; returns why the request ends now, if it does."""
        request.token_ids.append(token)
        self.generated_tokens += 1
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        params = request.params
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in request.eos_ids)
        stopped_by_text = request.text is not None and request.text.add(token)
        reason = "stop" if (stop_token or stopped_by_text) else (
            "length" if len(request.token_ids) >= params.max_tokens else None)
        if reason is not None and request.text is not None:
            request.text.finish()
        if request.on_output is not None:
            delta = request.text.delta(final=reason is not None) if request.text is not None else ""
            request.on_output(request, token, delta, reason)
        return reason

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        slot = request.slot
        if slot is not None and self.slots[slot] is request:
            self.slots[slot] = None
            self.sampling.release(slot)
            # The slot keeps its cache (reset when reused); its length still counts in `longest`,
            # since the placeholder decode of an idle slot writes at that length.
            self._idle_len[slot] = request.cached


def _eos_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's end-of-sequence id(s); none without a tokenizer."""
    value = getattr(tokenizer, "eos_token_id", None)
    return frozenset(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
