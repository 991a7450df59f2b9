"""Adaptive memory management: follow the plan's residency segments as sequences grow (Alg. 1).

Before a decode step at length S, every layer that the plan offloads at S but that is still on
the GPU moves its KV history to pinned host memory (from the last layer backwards, one way, as
the paper does). The plan's thresholds come from the memory equation (Eq. 7, with its factor 4;
the paper's Alg. 2 drops that factor), solved ahead of time by the ILP.
"""
from __future__ import annotations

import torch

from specontext_compiler.errors import RuntimeResourceError


class MemoryManager:
    """Moves layers to the host at the plan's segment boundaries."""

    def __init__(self, plan, ctx):
        self.plan = plan
        self.ctx = ctx
        self.on_change = []          # callbacks run after layers moved (e.g. recapture the graph)
        self.moves: list[tuple[int, int]] = []   # (sequence length, layer) for every move made

    def before_step(self, seq_len: int) -> list[int]:
        """Apply the residency of the segment that holds seq_len + 1; returns the layers moved.

        Offloads first (frees device memory), then grows the resident layers' caches, one layer
        at a time so the transient copy never needs more than one layer, to where this residency
        ends (Plan.residency_end), not just to this segment's end: every grow copies every
        resident layer's history and recaptures the step (the [32k, 2k] workload on an H200, batch
        27, growing per segment: 8 captures and ~24 s of stalls in a 66 s run), while the
        segments of one residency differ only in length.
        """
        segment = self.plan.segment_for(seq_len + 1)
        room = min(self.plan.residency_end(seq_len + 1), self.ctx.store.layout.max_len)
        layers = self.ctx.store.layers
        moving = sorted((i for i in segment.offloaded_layers if not layers[i].offloaded), reverse=True)
        growing = [i for i, layer in enumerate(layers) if i not in moving and not layer.offloaded
                   and layer.capacity < room]
        if not (moving or growing):    # most steps: no device-to-host read of the lengths
            return moving
        filled = int(self.ctx.cache_len.max())        # every slot's history must survive the move
        try:
            for index in moving:
                self._act(f"moving layer {index}'s KV cache to pinned host memory", layers[index].offload,
                          filled=filled)
                self.moves.append((seq_len, index))
            if growing:
                _return_cached_blocks()
            for index in growing:
                self._act(f"growing layer {index}'s KV cache to {room} tokens", layers[index].grow,
                          room, filled=filled)
        finally:                       # tensors may have moved even if a later one failed
            for callback in self.on_change:
                callback()
        return moving

    def _act(self, what: str, action, *args, **kwargs) -> None:
        """Run one layer's move or grow; out of memory becomes one error that says what to change.

        Every action allocates before it replaces, so the layer stays usable: the request fails,
        the engine serves the next one."""
        try:
            action(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeResourceError(
                f"out of GPU memory {what} for {self.ctx.store.layout.slots} request slots "
                f"({_allocated_gb():.1f} GB allocated): the plan leaves too little headroom on this GPU; "
                "recompile with a smaller --batch") from None
        except RuntimeError as exc:
            if not any(word in str(exc).lower() for word in ("pin", "alloc", "out of memory")):
                raise
            raise RuntimeResourceError(
                f"out of pinned host memory {what} ({exc}); recompile with a smaller --batch or "
                "--max-len") from None


def _return_cached_blocks() -> None:
    """Give the caching allocator's free blocks back before a grow, so that fragments left by the
    prefill can serve the grown cache. The memory model's reserve is what makes a plan fit; this
    only helps at the margin, and costs one call per residency segment."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated_gb() -> float:
    return torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
