"""What a fused retrieval head reads from the LLM: its hidden states at each request's last position.

A fused head (EAGLE-3 style, runtime/retrieval_head.py) projects token j from its embedding and
F_{j-1}, the LLM's hidden states entering the head's `feature_layers` at position j-1. The decode
graph taps those states (`specontext::record_features`, placed by passes/insert_feature_taps.py)
and the step context hands them to this class.

Decode (one token per slot): retrieve reads `previous(rows)` before layer 0; the taps later in the
same step overwrite it with this token's states, which the next step reads. It is one persistent
buffer, so a captured CUDA graph reads and writes it in place.
Prefill (a chunk of T tokens): the head's K rows for the chunk need states that the chunk's own
forward computes, so the taps only collect them and `project_chunk` runs the head once the forward
is done, shifted by one position (row 0 reads the states carried over from the chunk before).
"""
from __future__ import annotations

import torch


class HeadFeatures:
    """Per request slot, the LLM's features [F*H] at the slot's last cached position."""

    def __init__(self, head, slots: int, dtype: torch.dtype, device: torch.device):
        self.head = head
        self.hidden_size = head.hidden_size
        self.last = torch.zeros(slots, head.feature_width, dtype=dtype, device=device)
        self._chunk: dict[int, torch.Tensor] = {}

    def previous(self, rows: slice) -> torch.Tensor:
        """[B, 1, F*H]: each slot's features at its last cached position (zeros before the first)."""
        return self.last[rows].unsqueeze(1)

    def record(self, hidden: torch.Tensor, block: int, rows: slice, decode: bool) -> None:
        """Take hidden [B, T, H], the states entering feature layer number `block` (0..F-1)."""
        if decode:
            width = self.hidden_size
            self.last[rows, block * width:(block + 1) * width].copy_(hidden[:, -1])
        else:
            self._chunk[block] = hidden

    def drop_chunk(self) -> None:
        """Forget states collected by a forward that did not finish."""
        self._chunk.clear()

    def project_chunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """The head's k [B, Hkv, T, D] for a prefill chunk; the slots' last features become its last row's."""
        blocks = len(self.head.feature_layers)
        missing = [self.head.feature_layers[b] for b in range(blocks) if b not in self._chunk]
        if missing:
            raise RuntimeError(f"the fused retrieval head reads the LLM's hidden states entering layers "
                               f"{missing}, which this graph does not tap; compile the plan with this head")
        features = torch.cat([self._chunk[b] for b in range(blocks)], dim=-1)
        self._chunk.clear()
        shifted = self.head.shift_features(features, before=self.last[rows])
        k = self.head.project(input_ids, position_ids, shifted)[1]
        self.last[rows].copy_(features[:, -1])
        return k

    def reset(self, slot: int) -> None:
        """A new request in this slot has no history: zeros, as the head was trained at position 0."""
        self.last[slot].zero_()
