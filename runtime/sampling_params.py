"""One request's sampling parameters, and the per-slot copy of them that the device samples from."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from specontext_compiler.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks and stops: greedy when temperature is 0.

    max_tokens counts generated tokens; stop strings end the text before them; the end-of-sequence
    token ends a request unless ignore_eos; a seed makes a sampled request reproducible."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise RequestError naming the first parameter out of range."""
        problems = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens {self.max_tokens!r} must be >= 1"),
            (_number(self.temperature) and 0 <= self.temperature <= 100, f"temperature {self.temperature!r} must be in [0, 100]"),
            (_number(self.top_p) and 0 < self.top_p <= 1, f"top_p {self.top_p!r} must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k {self.top_k!r} must be >= 0 (0 = no limit)"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), f"seed {self.seed!r} must be an integer >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in problems:
            if not ok:
                raise RequestError(message)

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @property
    def filtered(self) -> bool:
        return self.sampled and (self.top_k > 0 or self.top_p < 1.0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class SlotSampling:
    """Each request slot's parameters as device tensors [S], written when a request takes the slot.

    draws counts the tokens a slot has drawn (the noise counter in runtime/sampling.py); it is
    advanced on the device, so sampling never waits for the host."""

    def __init__(self, slots: int, device: torch.device):
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.int64, device=device)
        self.draws = torch.zeros(slots, dtype=torch.int64, device=device)
        self.params: list[SamplingParams | None] = [None] * slots

    def assign(self, slot: int, params: SamplingParams) -> None:
        """A request with these parameters takes the slot (its seed, or a fresh random one)."""
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.temperature[slot] = float(params.temperature)
        self.top_p[slot] = float(params.top_p)
        self.top_k[slot] = int(params.top_k)
        self.seeds[slot] = seed & (2**62 - 1)
        self.draws[slot] = 0
        self.params[slot] = params

    def release(self, slot: int) -> None:
        self.params[slot] = None

    def sample(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Token ids [len(rows)] for logits [len(rows), V] of those slots; advances their draw counters."""
        from specontext_compiler.runtime.sampling import sample
        live = [p for p in self.params[rows] if p is not None]
        if not any(p.sampled for p in live):          # all greedy: no noise, no sort
            ids = logits.argmax(dim=-1)
        elif not any(p.filtered for p in live):
            ids = sample(logits, self.temperature[rows], 1.0, 0, self.seeds[rows], self.draws[rows])
        else:
            ids = sample(logits, self.temperature[rows], self.top_p[rows], self.top_k[rows],
                         self.seeds[rows], self.draws[rows])
        self.draws[rows] += 1
        return ids
