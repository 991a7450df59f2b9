"""Passkey retrieval: a 5-digit key hidden at a depth of long filler, answered greedily.

Per case one dense prefill is shared by all methods (the KV cache is cropped back to it after each).
Two ways to ask (`question`):
- "prompt" (default): context and question are one prompt, prefilled densely, as the runtime's
  engine serves a prompt and as the paper evaluates LongBench (dense prefill, sparse decode). The
  first answer token comes from the dense prefill; every later one is a sparse decode step.
- "decode": only the context is prefilled; the question's tokens are decode steps too, so the
  look-up that finds the key (the question's last token) already goes through the selection.
  Stricter than any prompt a user sends.
In a decode step the method picks the tokens to attend (SpeContext: once for all layers from the
retrieval head, which keeps its own K cache, a "self-prefix:N" head also its prefix layers' dense
KV, and a fused head the LLM's hidden states of the previous position; Quest: per layer from the
LLM's own query) and attention reads only those plus the new token. Exact match of the first
5-digit number in the answer.
"""
from __future__ import annotations

from typing import Callable

import torch

from specontext_compiler.eval import sparse_attention
from specontext_compiler.eval.methods import PER_LAYER, Budget, method_mask
from specontext_compiler.eval.recall import context_qk
from specontext_compiler.eval.text import parse_answer, passkey, passkey_prompt

SPEC_METHODS = ("spec-head", "spec-batch")     # the methods that read the retrieval head
QUESTION_MODES = ("prompt", "decode")


class _StepSelector:
    """The selector of one decode step: a per-step mask shared by layers (or per layer for Quest)."""

    def __init__(self, method: str, limit: Budget, head_q, head_k, head, generator):
        self.method, self.limit, self.head, self.generator = method, limit, head, generator
        self.head_q, self.head_k = head_q, head_k
        self._shared: dict[str, torch.Tensor | None] = {}

    def __call__(self, layer: int, query: torch.Tensor, keys: torch.Tensor):
        if self.method not in PER_LAYER and "mask" in self._shared:
            return self._shared["mask"]
        mask = method_mask(self.method, self.limit, query=query, keys=keys, head_q=self.head_q,
                           head_k=self.head_k, head=self.head, generator=self.generator)
        self._shared["mask"] = mask
        return mask


class _HeadState:
    """The retrieval head's side of a decode run: its K cache and, for a fused head, the LLM's last features."""

    def __init__(self, head, head_k: torch.Tensor, last_features: torch.Tensor | None):
        self.head, self.head_k, self.last_features = head, head_k, last_features
        self.fused = getattr(head, "fused", False)

    def query(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The new token's q [1, Hq, D]; its k joins the cache after the step (see `advance`)."""
        previous = self.last_features[:, None] if self.fused else None
        q_new, self._k_new = self.head.project(ids, pos, previous)
        return q_new[:, :, 0]

    def advance(self, hidden_states) -> None:
        self.head_k = torch.cat([self.head_k, self._k_new], dim=2)
        if self.fused:
            self.last_features = self.head.features_of(hidden_states)[:, -1]


@torch.no_grad()
def sparse_generate(model, head, cache, context_len: int, feed: list[int], *, method: str, limit: Budget,
                    head_k: torch.Tensor, max_new_tokens: int, generator: torch.Generator,
                    eos_token_id: int | None = None, last_features: torch.Tensor | None = None,
                    stop: Callable[[list[int]], bool] | None = None, first_token: int | None = None) -> list[int]:
    """Feed `feed` then greedily generate, every step sparse; returns the generated ids.

    cache: an HF cache holding exactly the dense-prefilled context (context_len tokens).
    first_token: with an empty feed, the token the dense prefill already produced (the first
    generated one); the steps then start by feeding it.
    head_k: [1, Hkv, context_len, D], the retrieval head's K cache for the context (not modified;
    read by the spec-* methods only, which also project each new token through `head`).
    last_features: [1, F*H], the LLM's features at the context's last position (fused heads).
    """
    pending, generated, position = list(feed), [], context_len
    if not pending:
        generated.append(first_token)
        if len(generated) >= max_new_tokens or first_token == eos_token_id or (stop and stop(generated)):
            return generated
    uses_head = method in SPEC_METHODS
    state = _HeadState(head, head_k, last_features) if uses_head else None
    while True:
        token = pending.pop(0) if pending else generated[-1]
        ids, pos = torch.tensor([[token]]), torch.tensor([[position]])
        q_new = state.query(ids, pos) if uses_head else None
        selector = _StepSelector(method, limit, q_new, state.head_k if uses_head else None, head, generator)
        with sparse_attention.active(selector=selector):
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                        output_hidden_states=bool(uses_head and state.fused))
        if uses_head:
            state.advance(out.hidden_states)
        position += 1
        if not pending:
            generated.append(int(out.logits[0, -1].argmax()))
            done = stop is not None and stop(generated)
            if len(generated) >= max_new_tokens or generated[-1] == eos_token_id or done:
                return generated


@torch.no_grad()
def passkey_cases(model, tokenizer, head, *, lengths, depths, budgets, methods, sink: int = 1,
                  recent: int = 0, page_size: int = 16, max_new_tokens: int = 8, seed: int = 0,
                  extra_heads: dict | None = None, question_mode: str = "prompt", keys_per_depth: int = 1,
                  progress: Callable[[], None] | None = None) -> list[dict]:
    """One record per (length, depth, key, method, budget[, head]): key, answer text, parsed answer, correct.

    extra_heads: name -> head; the spec-* methods run once more with each (record["head"] names the
    head for spec-* records: "main" for `head`, else the name; None for the other methods).
    question_mode: "prompt" or "decode" (module docstring). keys_per_depth: cases per (length,
    depth), each with its own key (the first is the key a single case had).
    """
    from transformers import DynamicCache
    if question_mode not in QUESTION_MODES:
        raise ValueError(f"question_mode {question_mode!r}: choose from {QUESTION_MODES}")
    sparse_attention.install(model)
    heads = {"main": head} | dict(extra_heads or {})
    records = []
    cases = [(length, depth, li * len(depths) + di, r) for li, length in enumerate(lengths)
             for di, depth in enumerate(depths) for r in range(keys_per_depth)]
    for length, depth, case, repeat in cases:
        key = passkey(seed * 1000 + repeat * 100 + case)
        context, question = passkey_prompt(tokenizer, length - max_new_tokens, depth, key)
        if question_mode == "prompt":
            context, question = context + question, []
        ids = torch.tensor([context])
        # Full layers everywhere: a sliding-window layer's cache cannot be cropped back to the prefill;
        # eval_attention applies the window itself.
        cache = DynamicCache()
        with sparse_attention.active():
            prefill = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                            output_hidden_states=True)
        first_token = int(prefill.logits[0, -1].argmax())
        hidden = prefill.hidden_states
        head_ks = {name: context_qk(h, ids, hidden)[1] for name, h in heads.items()
                   if set(methods) & set(SPEC_METHODS)}
        last = {name: h.features_of(hidden)[:, -1] for name, h in heads.items() if getattr(h, "fused", False)}
        runs = [(m, name) for m in methods for name in (heads if m in SPEC_METHODS else [None])]
        for method, name in runs:
            for budget in (budgets if method != "full" else budgets[:1]):
                extra = cache.get_seq_length() - len(context)
                if extra:
                    cache.crop(-extra)   # negative = drop that many: the form every version takes
                out = sparse_generate(model, heads[name or "main"], cache, len(context), question,
                                      method=method, limit=Budget(budget, sink, recent, page_size),
                                      head_k=head_ks.get(name or "main"), max_new_tokens=max_new_tokens,
                                      generator=torch.Generator().manual_seed(seed + repeat * 100 + case),
                                      eos_token_id=tokenizer.eos_token_id,
                                      last_features=last.get(name or "main"), first_token=first_token,
                                      stop=lambda g: parse_answer(tokenizer.decode(g)) is not None)
                text = tokenizer.decode(out, skip_special_tokens=True)
                answer = parse_answer(text)
                records.append({"length": length, "depth": depth, "method": method, "head": name,
                                "budget": None if method == "full" else budget, "key": key,
                                "question": question_mode, "text": text, "answer": answer,
                                "correct": answer == key})
        if progress:
            progress()
    return records
