"""The KV store: each layer's K/V cache, on the GPU or offloaded to pinned host memory (paper s.6).

Layout per layer (head-major, so one (head, token) row is head_dim elements contiguous):
  resident  k, v: [slots, Hkv, capacity, D] on the compute device
  offloaded host: [slots, Hkv, max_len, D + Dv] in pinned host memory (the full history), with
            k = host[..., :D] and v = host[..., D:] as views, plus a budget buffer
            buf_k, buf_v: [slots, Hkv, W, D] on the device

The offloaded history keeps K and V of one (position, head) adjacent: the elastic gather reads
each selected row from host memory over PCIe, and one 512-byte run per row instead of two
256-byte rows in two arrays measured 1.8x the gather rate, with less slowdown of the kernels
running beside it (benchmarks/bench_gather.py, bench_gather_interference.py; RESULTS.md).

One slot table for the whole store, slot_pos [slots, G, W] int32 on the device, says which position
each buffer slot holds (-1 empty). It is shared because selection picks one index set per step for
every layer: all offloaded layers hold the same positions in the same slots (runtime/prefetch.py
keeps them so; a layer offloaded later is marked needs_full_load until it has caught up).

A resident layer's device cache holds only as many tokens as the current residency segment
allows (the ILP's memory constraint is per segment); grow() enlarges it at a segment boundary.
A layer moves from resident to offloaded at most once (the paper offloads one way, from the last
layer backwards); offload() copies its history to the host and frees the device cache.
The retrieval head's own K cache lives here too ([slots, Hkv_head, max_len, D], device).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Sizes of the store. W = selection width (budget + sinks + recent)."""

    num_layers: int
    slots: int               # requests served at once (the plan's batch)
    max_len: int             # tokens per request, prompt + generated
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    width: int               # W
    groups: int              # G: index sets per request (Hkv, or 1 for MQA / batch level)
    dtype: torch.dtype
    device: torch.device


class LayerKV:
    """One layer's cache; `offloaded` says where the history lives."""

    def __init__(self, layout: KVLayout, capacity: int, offloaded: bool):
        self.layout = layout
        self.offloaded = False
        self.k = self.v = None
        self.host = None           # the offloaded history that k and v view
        self.buf_k = self.buf_v = None
        # True while the budget buffer is empty but the store's slot table may name positions.
        self.needs_full_load = False
        if offloaded:              # never allocate a device cache for a layer born offloaded
            self._to_host(0)
            return
        shape_k = (layout.slots, layout.num_kv_heads, capacity, layout.head_dim)
        shape_v = (layout.slots, layout.num_kv_heads, capacity, layout.v_head_dim)
        self.k = torch.empty(shape_k, dtype=layout.dtype, device=layout.device)
        self.v = torch.empty(shape_v, dtype=layout.dtype, device=layout.device)

    @property
    def capacity(self) -> int:
        """Tokens both caches hold (K can be ahead of V after a grow that ran out of memory)."""
        return min(self.k.shape[2], self.v.shape[2])

    def _to_host(self, filled: int) -> None:
        # Everything is allocated before anything is replaced: an allocation that fails leaves the
        # layer as it was (on the GPU, usable), so the engine can report it and serve on.
        lay = self.layout
        host = torch.empty((lay.slots, lay.num_kv_heads, lay.max_len, lay.head_dim + lay.v_head_dim),
                           dtype=lay.dtype, pin_memory=lay.device.type == "cuda")
        host_k, host_v = host[..., :lay.head_dim], host[..., lay.head_dim:]
        buf_k = torch.empty((lay.slots, lay.num_kv_heads, lay.width, lay.head_dim),
                            dtype=lay.dtype, device=lay.device)
        buf_v = torch.empty((lay.slots, lay.num_kv_heads, lay.width, lay.v_head_dim),
                            dtype=lay.dtype, device=lay.device)
        if filled and self.k is not None:
            for b in range(lay.slots):     # one (request, head) span is contiguous in host memory: one DMA
                span = torch.cat((self.k[b, :, :filled], self.v[b, :, :filled]), dim=-1)
                for h in range(lay.num_kv_heads):
                    host[b, h, :filled].copy_(span[h])
        self.host, self.k, self.v, self.buf_k, self.buf_v = host, host_k, host_v, buf_k, buf_v
        self.offloaded = True

    def offload(self, filled: int) -> None:
        """Move this layer's history [0, filled) to pinned host memory; frees the device cache."""
        if not self.offloaded:
            self._to_host(filled)
            self.needs_full_load = True     # other layers' buffers may already hold rows

    def write_history(self, rows: slice, k: torch.Tensor, v: torch.Tensor, starts: list[int],
                      stream=None) -> None:
        """Write a prefill's new K, V [B, H, T, D] of slots `rows` at positions starts[b].. (offloaded).

        K and V are packed into the host layout on the caller's stream, then each (request, head)
        span is one asynchronous DMA straight into the pinned history, issued on `stream` (a CUDA
        copy stream that waits for the caller's, or None: in order): no staging copy, no read-back.
        Rows past max_len are dropped, as the append kernel drops them.
        """
        spans = torch.cat((k, v), dim=-1)
        host = self.host[rows]
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for b, start in enumerate(starts):
                take = max(0, min(spans.shape[2], host.shape[2] - start))
                for h in range(spans.shape[1]):
                    host[b, h, start:start + take].copy_(spans[b, h, :take], non_blocking=True)
        if stream is not None:
            spans.record_stream(stream)     # freed by the caller's stream only after the copies ran

    def history(self, rows: slice, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of request slots `rows`, positions [0, end), on `device` (prefill of an offloaded layer).

        Each (request, head) span of K and V together is contiguous in the host layout, so it is
        copied as one DMA; a single `.to()` of the strided [B, H, :end] view first packs it on the
        CPU instead, measured 21x slower on the H100 (15.9 vs 0.76 ms for a 16.6k-token K history,
        benchmarks/measure_prefill_pieces.py).
        """
        dim = self.layout.head_dim
        spans = self.host[rows, :, :end]
        if spans.device == device:
            return spans[..., :dim], spans[..., dim:]
        out = torch.empty(spans.shape, dtype=spans.dtype, device=device)
        for b in range(spans.shape[0]):
            for h in range(spans.shape[1]):
                out[b, h].copy_(spans[b, h], non_blocking=True)
        return out[..., :dim], out[..., dim:]

    def storage(self) -> list[torch.Tensor]:
        """The tensors that own this layer's history (k and v are views of `host` when offloaded)."""
        return [self.host] if self.offloaded else [self.k, self.v]

    def grow(self, capacity: int, filled: int) -> None:
        """Give a resident layer room for `capacity` tokens, keeping its first `filled` tokens."""
        if self.offloaded or capacity <= self.capacity:
            return
        lay = self.layout
        capacity = min(capacity, lay.max_len)
        # K first, then V: only one of the two is ever held twice (the memory model counts that).
        # If V's allocation fails, K stays grown and a later call grows V alone.
        if self.k.shape[2] < capacity:
            self.k = _regrown(self.k, capacity, filled)
        if self.v.shape[2] < capacity:
            self.v = _regrown(self.v, capacity, filled)


def _regrown(old: torch.Tensor, capacity: int, filled: int) -> torch.Tensor:
    new = torch.empty((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype, device=old.device)
    new[:, :, :filled].copy_(old[:, :, :filled])
    return new


class KVStore:
    """All layers' caches plus the retrieval head's K cache."""

    def __init__(self, layout: KVLayout, offloaded_layers=(), capacities: dict[int, int] | None = None,
                 head_kv_heads: int = 0, head_dim: int = 0):
        self.layout = layout
        capacities = capacities or {}
        self.layers = [LayerKV(layout, capacities.get(i, layout.max_len), i in set(offloaded_layers))
                       for i in range(layout.num_layers)]
        self.slot_pos = torch.full((layout.slots, layout.groups, layout.width), -1, dtype=torch.int32,
                                   device=layout.device)
        self.head_k = None
        if head_kv_heads:
            self.head_k = torch.empty((layout.slots, head_kv_heads, layout.max_len, head_dim),
                                      dtype=layout.dtype, device=layout.device)

    def offloaded_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.offloaded]

    def reset_slot(self, slot: int) -> None:
        """Forget what a request slot's budget buffers hold (a new request takes the slot)."""
        self.slot_pos[slot].fill_(-1)

    def device_bytes(self) -> int:
        """Bytes this store holds on the compute device."""
        total = 0
        for layer in self.layers:
            tensors = [layer.buf_k, layer.buf_v] if layer.offloaded else [layer.k, layer.v]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        if self.offloaded_layers():
            total += self.slot_pos.numel() * self.slot_pos.element_size()
        if self.head_k is not None:
            total += self.head_k.numel() * self.head_k.element_size()
        return total

    def host_bytes(self) -> int:
        """Bytes of offloaded history in (pinned) host memory."""
        return sum(layer.host.numel() * layer.host.element_size() for layer in self.layers if layer.offloaded)
