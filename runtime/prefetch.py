"""Asynchronous prefetch with elastic loading (paper s.5).

Selection happens once, before layer 0, for every layer; so each offloaded layer's rows can be
copied from pinned host memory while earlier layers compute. Only rows not held by the budget
buffers are copied (S_now - S_last), into the slots freed by S_last - S_now.

One index set serves every layer, so all offloaded layers' buffers hold the same positions in the
same slots, recorded once in the store's slot table. The first load of a step computes the diff
against that table, packs the rows to copy into one compact list (kernels/elastic_load.py says
why) and then updates the table; every later load of the step copies the same list into its own
buffer. A layer offloaded after the table was filled starts
with an empty buffer: its first load copies every position the updated table names instead.

On CUDA the diff and the copies run on a side stream, in issue order, one event per layer; the
layer's attention waits on its event (prefetch_wait). On CPU they run inline. If a layer's
prefetch was not issued this step (the graph has no prefetch node for it), ensure_loaded() issues
it and waits at once. Which load computes the diff is Python control flow: a captured CUDA graph
records that choice and replays it every step, which holds because the graph is recaptured
whenever the set of offloaded layers changes (runtime/decode_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepDiff:
    """The elastic diff of one step, shared by every offloaded layer's load."""

    rows: object               # CompactLoads: (row, position, slot) of each copy, and their count
    groups: int                # G of the [B, G, W] selection the rows index
    loads: torch.Tensor        # 0-d: rows one layer copies
    wanted: torch.Tensor       # 0-d: rows selected
    source: tuple              # (indices address, rows): what the diff was computed for


class Prefetcher:
    """Elastic-loading state of one KV store: the per-step diff and the copy stream."""

    def __init__(self, store, kernels):
        self.store = store
        self.kernels = kernels
        device = store.layout.device
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.events: dict[int, torch.cuda.Event] = {}
        # Grid of the n-th gather of a step (None past the end: the kernel's default). A gather that
        # runs beside the layers' compute slows it (more programs, more slowdown), one that runs
        # after the resident layers have finished should take the whole link.
        self.gather_grids: tuple[int, ...] = ()
        self._loaded: set[int] = set()
        self._diff: StepDiff | None = None
        # Rows copied and rows selected, summed over layers on the device (read outside the hot loop).
        self.rows_loaded = torch.zeros((), dtype=torch.int64, device=device)
        self.rows_requested = torch.zeros((), dtype=torch.int64, device=device)

    def new_step(self) -> None:
        self._loaded.clear()
        self._diff = None

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
        """Load now if no prefetch was issued for this layer in this step, then wait for it.

        Going through issue() keeps the step's diff and every copy on one stream, in order.
        """
        self.issue(layer, indices, rows)
        self.wait(layer)

    def buffer_rows(self, layer: int, rows: slice) -> torch.Tensor:
        """Row indices into the layer's budget buffer for sparse_decode ([B, G, W], -1 empty)."""
        return self.kernels.buffer_indices(self.store.slot_pos[rows])

    def _load(self, kv, indices: torch.Tensor, rows: slice) -> None:
        diff = self._step_diff(indices, rows)
        if kv.needs_full_load:
            self._full_load(kv)
        else:
            order = len(self._loaded) - 1            # this layer's place among the step's gathers
            programs = self.gather_grids[order] if order < len(self.gather_grids) else None
            self.kernels.gather_compact(kv.k[rows], kv.v[rows], kv.buf_k[rows], kv.buf_v[rows],
                                        diff.rows, diff.groups, programs)
            self.rows_loaded += diff.loads
        self.rows_requested += diff.wanted

    def _step_diff(self, indices: torch.Tensor, rows: slice) -> StepDiff:
        """This step's diff: computed by the first load, which also moves the table forward."""
        source = (indices.data_ptr(), tuple(indices.shape), rows.start, rows.stop)
        if self._diff is not None:
            if self._diff.source != source:
                raise ValueError("elastic loading needs one selection per step for every offloaded layer")
            return self._diff
        table = self.store.slot_pos[rows]
        load_pos, load_slot, new_table = self.kernels.elastic_diff(table, indices.to(torch.int32))
        table.copy_(new_table)    # later loads of this step use the compact list, not the table
        self._diff = StepDiff(self.kernels.compact_loads(load_pos, load_slot), table.shape[1],
                              (load_pos >= 0).sum(), (indices >= 0).sum(), source)
        return self._diff

    def _full_load(self, kv) -> None:
        """Fill a newly offloaded layer's empty buffer with everything the table names (all slots).

        Runs once: on CUDA in the graph's eager warm-up, so the captured graph holds only the
        elastic copy (were it captured, replaying it would be correct, only slower).
        """
        table = self.store.slot_pos
        every_slot = self.kernels.compact_loads(table, self.kernels.buffer_indices(table))
        self.kernels.gather_compact(kv.k, kv.v, kv.buf_k, kv.buf_v, every_slot, table.shape[1])
        self.rows_loaded += (table >= 0).sum()
        kv.needs_full_load = False
