"""Next-token choice on the device: greedy, or temperature with top-k / top-p, one setting per row.

Nothing here reads a tensor back to the host, so the decode loop can launch the next step before
the host has seen this one's tokens. A sampled row draws by the exponential race (argmax of
p / E with E ~ Exp(1) picks token i with probability p_i), and E comes from a counter-based hash
of (seed, draw number, token id): a request's tokens depend on its own seed and how many tokens it
drew, never on which slot it sits in or who shares its batch, and no generator state lives per row.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B            # < 2**31, so a 32-bit value times it stays inside int64


def sample(logits: torch.Tensor, temperature: torch.Tensor | float = 0.0,
           top_p: torch.Tensor | float = 1.0, top_k: torch.Tensor | int = 0,
           seeds: torch.Tensor | int = 0, draws: torch.Tensor | int = 0) -> torch.Tensor:
    """Token ids [N] from logits [N, vocab]; rows with temperature <= 0 are greedy.

    temperature, top_p: [N] float or one number; top_k: [N] int or one (0 = no limit);
    seeds, draws: [N] int64 or one: the row's seed and how many tokens it has drawn so far."""
    greedy = logits.argmax(dim=-1)
    if isinstance(temperature, (int, float)) and temperature <= 0:
        return greedy
    rows, vocab = logits.shape
    temperature = _per_row(temperature, rows, logits.device, torch.float32)
    scaled = logits.float() / temperature.clamp_min(1e-6).view(-1, 1)
    scaled = keep_top(scaled, _per_row(top_k, rows, logits.device, torch.int64),
                      _per_row(top_p, rows, logits.device, torch.float32))
    noise = exponential_noise(_per_row(seeds, rows, logits.device, torch.int64),
                              _per_row(draws, rows, logits.device, torch.int64), vocab)
    chosen = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(temperature > 0, chosen, greedy)


def keep_top(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [N, V] with every token outside the row's top-k and top-p nucleus set to -inf.

    The nucleus is the smallest prefix (by probability) whose mass reaches top_p; the best token
    is always kept. top_k [N] (0 = all), top_p [N] (>= 1 = all)."""
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device).view(1, -1)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (mass_before < top_p.view(-1, 1)) | (top_p.view(-1, 1) >= 1.0) | (rank == 0)
    keep &= (rank < top_k.view(-1, 1)) | (top_k.view(-1, 1) <= 0)
    ordered = ordered.masked_fill(~keep, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, ordered)


def exponential_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """E ~ Exp(1), [N, vocab] float32, a pure function of (seed, draw number, token id)."""
    seed_key = _mix(_mix(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    row_key = _mix(seed_key ^ (draws & _MASK32))
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64).view(1, -1)
    bits = _mix(_mix((row_key.view(-1, 1) + token * 0x27D4EB2D) & _MASK32))
    uniform = ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)    # in (0, 1), 24 bits
    return -torch.log(uniform)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values in [0, 2**32) held in int64, so shifts stay logical)."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def _per_row(value, rows: int, device, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).view(-1).expand(rows)
    return torch.full((rows,), value, device=device, dtype=dtype)
