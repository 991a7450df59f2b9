"""Asynchronous prefetch with elastic loading (paper s.5).

Selection happens once, before layer 0, for every layer; so each offloaded layer's rows can be
copied from pinned host memory while earlier layers compute. Only rows not held by the layer's
GPU budget buffer are copied (S_now - S_last), into the slots freed by S_last - S_now.

On CUDA the copies run on a side stream, one event per layer; the layer's attention waits on its
event (prefetch_wait). On CPU the copies run inline. If a layer's prefetch was not issued this
step (the graph has no prefetch node for it), ensure_loaded() loads it synchronously.
"""
from __future__ import annotations

import torch


class Prefetcher:
    """Per-layer elastic-loading state of one KV store."""

    def __init__(self, store, kernels):
        self.store = store
        self.kernels = kernels
        device = store.layout.device
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.events: dict[int, torch.cuda.Event] = {}
        self._loaded: set[int] = set()
        # Rows copied and rows requested, accumulated on the device (read outside the hot loop).
        self.rows_loaded = torch.zeros((), dtype=torch.int64, device=device)
        self.rows_requested = torch.zeros((), dtype=torch.int64, device=device)

    def new_step(self) -> None:
        self._loaded.clear()

    def issue(self, layer: int, indices: torch.Tensor, rows: slice, decode: bool = True) -> None:
        """Start loading `indices` into layer's budget buffer (no-op for resident layers)."""
        kv = self.store.layers[layer]
        if not (decode and kv.offloaded) or layer in self._loaded:
            return
        self._loaded.add(layer)
        if self.copy_stream is None:
            self._load(kv, indices, rows)
            return
        compute = torch.cuda.current_stream(self.copy_stream.device)
        self.copy_stream.wait_stream(compute)      # the indices come from the compute stream
        with torch.cuda.stream(self.copy_stream):
            self._load(kv, indices, rows)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.events[layer] = event

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for the layer's copy (nothing to wait for on CPU)."""
        event = self.events.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream(self.copy_stream.device).wait_event(event)

    def ensure_loaded(self, layer: int, indices: torch.Tensor, rows: slice) -> None:
        """Load synchronously if no prefetch was issued for this layer in this step."""
        if layer not in self._loaded:
            self._loaded.add(layer)
            self._load(self.store.layers[layer], indices, rows)
        self.wait(layer)

    def buffer_rows(self, layer: int, rows: slice) -> torch.Tensor:
        """Row indices into the layer's budget buffer for sparse_decode ([B, G, W], -1 empty)."""
        return self.kernels.buffer_indices(self.store.layers[layer].slot_pos[rows])

    def _load(self, kv, indices: torch.Tensor, rows: slice) -> None:
        slot_pos = kv.slot_pos[rows]
        load_pos, load_slot, new_slot_pos = self.kernels.elastic_diff(slot_pos, indices.to(torch.int32))
        self.kernels.gather_rows(kv.k[rows], kv.v[rows], kv.buf_k[rows], kv.buf_v[rows], load_pos, load_slot)
        slot_pos.copy_(new_slot_pos)
        self.rows_loaded += (load_pos >= 0).sum()
        self.rows_requested += (indices >= 0).sum()
