"""StepContext: the state behind the specontext:: ops while the decode graph runs.

The graph is a pure function of (weights, input_ids, position_ids); the ops it contains call the
methods below, which own the KV store, the retrieval head's K cache, the elastic-loading state
and (on CUDA) the copy stream. One forward is bracketed by begin() and end():

    ctx.begin(input_ids, position_ids, slot_start)   # which request slots, how many new tokens
    with context.active(ctx): logits = graph(params, input_ids, position_ids)
    ctx.end()                                          # the new tokens are now cached

Prefill (T > 1) attends densely; decode (T == 1) attends over the selected rows (paper s.4-5).
A fused retrieval head also reads the LLM's hidden states, which the graph's record_features taps
hand over (runtime/head_features.py); for a prefill chunk its K rows are appended in end().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specontext_compiler.runtime import attention as ref
from specontext_compiler.runtime import selection
from specontext_compiler.runtime.head_features import HeadFeatures
from specontext_compiler.runtime.kernel_set import KernelSet
from specontext_compiler.runtime.kv_store import KVLayout, KVStore
from specontext_compiler.runtime.plan_records import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from specontext_compiler.runtime.prefetch import Prefetcher


@dataclass(frozen=True)
class SelectionConfig:
    """How many tokens each group attends to: budget + sinks + recent window (plan parameters)."""

    budget: int
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    level: str = "head"

    @property
    def width(self) -> int:
        return selection.selection_width(self.budget, self.sink_tokens, self.recent_tokens)


class StepContext:
    """Implements the specontext:: ops over a KVStore for one engine."""

    def __init__(self, store: KVStore, config: SelectionConfig, num_heads: int, head=None,
                 kernels=None, windows=()):
        self.store = store
        self.windows = [int(w) for w in windows]      # per layer: sliding window (0: global)
        self.config = config
        self.num_heads = num_heads
        self.head = head
        self.kernels = kernels or KernelSet(reference=True)   # Triton on CUDA, references on CPU
        layout = store.layout
        self.cache_len = torch.zeros(layout.slots, dtype=torch.int64, device=layout.device)
        self.starts = torch.zeros(layout.slots, dtype=torch.int64, device=layout.device)
        self.last_indices = torch.full((layout.slots, layout.groups, layout.width), -1,
                                       dtype=torch.int32, device=layout.device)
        self.prefetcher = Prefetcher(store, self.kernels)
        self.features = (HeadFeatures(head, layout.slots, layout.dtype, layout.device)
                         if head is not None and head.fused else None)
        self._rows = slice(0, layout.slots)
        self._steps = 1
        self._chunk_to_project = None    # a fused head's prefill chunk (input_ids, position_ids)
        self._host_starts = None
        self._host_writes = False        # a prefill wrote offloaded rows on the copy stream

    @classmethod
    def for_model(cls, spec, batch: int, max_len: int, budget: int, sink_tokens: int = DEFAULT_SINK_TOKENS,
                  recent_tokens: int = DEFAULT_RECENT_TOKENS, head=None, offloaded_layers=(), capacity: int | None = None,
                  device="cpu",
                  dtype=torch.float32, level: str = "head", kernels=None, windows=()) -> "StepContext":
        """A context sized for a ModelSpec (tests and the engine use this)."""
        config = SelectionConfig(budget, sink_tokens, recent_tokens, level)
        v_dim = getattr(spec, "v_head_dim", 0) or spec.head_dim
        layout = KVLayout(num_layers=spec.num_layers, slots=batch, max_len=max_len,
                          num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, v_head_dim=v_dim,
                          width=config.width,
                          groups=selection.selection_groups(spec.num_heads, spec.num_kv_heads, level),
                          dtype=dtype, device=torch.device(device))
        capacities = {i: capacity for i in range(spec.num_layers)} if capacity else None
        store = KVStore(layout, offloaded_layers, capacities=capacities,
                        head_kv_heads=head.num_kv_heads if head is not None else 0,
                        head_dim=head.head_dim if head is not None else 0)
        return cls(store, config, spec.num_heads, head=head, kernels=kernels, windows=windows)

    # -- step bracketing ---------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              slot_start: int = 0, host_starts: list[int] | None = None) -> None:
        """Declare the request slots [slot_start, slot_start+B) and T new tokens of this forward.

        host_starts: the slots' cached lengths, if the caller knows them (the scheduler does for a
        prefill chunk); dense attention then never reads them back from the device, which would
        wait for every kernel queued before it, once per layer."""
        self._host_starts = list(host_starts) if host_starts is not None else None
        batch, steps = input_ids.shape
        if slot_start + batch > self.store.layout.slots:
            raise ValueError(f"slots {slot_start}..{slot_start + batch} exceed the store's {self.store.layout.slots}")
        self._rows = slice(slot_start, slot_start + batch)
        self._steps = steps
        self.starts[self._rows].copy_(self.cache_len[self._rows])
        self.prefetcher.new_step()
        self._chunk_to_project = None
        if self.features is not None:
            self.features.drop_chunk()

    def end(self) -> None:
        """The forward is done: its tokens count as cached (a fused head's prefill K rows added now)."""
        if self._chunk_to_project is not None:
            input_ids, position_ids = self._chunk_to_project
            self._chunk_to_project = None
            with torch.inference_mode():
                k = self.features.project_chunk(input_ids, position_ids, self._rows)
                self._append_head(k, self.starts[self._rows])
        self._wait_host_writes()
        self.cache_len[self._rows] += self._steps

    def reset_slot(self, slot: int) -> None:
        """Free a request slot for a new request."""
        self.cache_len[slot] = 0
        self.last_indices[slot].fill_(-1)
        self.store.reset_slot(slot)
        if self.features is not None:
            self.features.reset(slot)

    # -- the ops -----------------------------------------------------------------------------
    def dense_attention(self, q, k, v, layer: int, scaling: float) -> torch.Tensor:
        """specontext::attention: append, then attend over everything cached (the original graph),
        or over the layer's window (a sliding-window layer, which the plan leaves dense).

        A forward from an empty cache (a whole prompt, or its first chunk) attends over its own k, v:
        nothing is read back from the cache. An offloaded layer's prefill rows go straight to its
        pinned history (runtime/kv_store.py), which a later chunk reads back."""
        kv = self.store.layers[layer]
        starts = self.starts[self._rows]
        host_starts = self._host_starts or [int(s) for s in starts.tolist()]
        if kv.offloaded and self._steps > 1:
            kv.write_history(self._rows, k, v, host_starts, self.prefetcher.copy_stream)
            self._host_writes = True
        else:
            self._append(kv, k, v, starts)
        window = self.windows[layer] if layer < len(self.windows) else 0
        if not any(host_starts):
            return ref.dense_causal(q, k, v, host_starts, scaling, window)
        if kv.offloaded:
            self._wait_host_writes()
            cache_k, cache_v = kv.history(self._rows, max(host_starts) + q.shape[2], q.device)
        else:
            cache_k, cache_v = kv.k[self._rows], kv.v[self._rows]
        return ref.dense_causal(q, cache_k, cache_v, host_starts, scaling, window)

    def retrieve(self, input_ids, position_ids) -> torch.Tensor:
        """specontext::retrieve: run the retrieval head, select W rows per group for every layer."""
        rows, starts = self._rows, self.starts[self._rows]
        batch, lay = input_ids.shape[0], self.store.layout
        if self._steps > 1:                          # prefill attends densely: only feed the head's K
            if self.features is not None:            # needs this chunk's hidden states: in end()
                self._chunk_to_project = (input_ids, position_ids)
            elif self.head is not None:
                self._append_head(self.head.project(input_ids, position_ids)[1], starts)
            out = torch.full((batch, lay.groups, lay.width), -1, dtype=torch.int32, device=input_ids.device)
        elif self.config.width >= lay.max_len:
            out = self._all_positions(starts)          # dense budget: nothing to choose
        elif self.head is None:                      # no head (tests): sinks and recent window, ties
            out = self.kernels.select(torch.zeros(batch, lay.groups, lay.max_len, device=input_ids.device),
                                      starts, self.config)
        else:
            previous = self.features.previous(rows) if self.features is not None else None
            q, k = self.head.project(input_ids, position_ids, previous)
            self._append_head(k, starts)
            scores = self.kernels.group_scores(q[:, :, -1], self.store.head_k[rows], starts,
                                               self.head.scaling, lay.groups)
            out = self.kernels.select(scores, starts, self.config)
        self.last_indices[rows].copy_(out)
        return out

    def sparse_attention(self, q, k, v, indices, layer: int, scaling: float) -> torch.Tensor:
        """specontext::sparse_attention: dense for prefill, selected rows + new token for decode."""
        kv = self.store.layers[layer]
        rows, starts = self._rows, self.starts[self._rows]
        if self._steps > 1:
            return self.dense_attention(q, k, v, layer, scaling)
        if kv.offloaded:
            self.prefetcher.ensure_loaded(layer, indices, rows)
            k_src, v_src = kv.buf_k[rows], kv.buf_v[rows]
            src_rows = self.prefetcher.buffer_rows(layer, rows)
        else:
            k_src, v_src, src_rows = kv.k[rows], kv.v[rows], indices
        out = self.kernels.sparse_decode(q[:, :, 0], k_src, v_src, src_rows, k[:, :, 0], v[:, :, 0], scaling)
        self._append(kv, k, v, starts)        # after attending: the new token is passed directly
        return out.unsqueeze(1)

    def record_features(self, hidden, block: int) -> None:
        """specontext::record_features: the hidden state entering a fused head's feature layer."""
        if self.features is None:
            raise RuntimeError("the graph taps the LLM's hidden states for a fused retrieval head, but this "
                               "step context's head is not fused; bind the head the plan was compiled with")
        self.features.record(hidden, block, self._rows, decode=self._steps == 1)

    def prefetch_issue(self, indices, layer: int) -> torch.Tensor:
        """specontext::prefetch_issue: start the elastic load of an offloaded layer."""
        self.prefetcher.issue(layer, indices, self._rows, decode=self._steps == 1)
        return torch.zeros(1, dtype=torch.int64, device=indices.device)

    def prefetch_wait(self, ticket, layer: int) -> torch.Tensor:
        """specontext::prefetch_wait: the compute stream waits for that layer's copy."""
        self.prefetcher.wait(layer)
        return torch.zeros(1, dtype=torch.int64, device=ticket.device)

    # -- helpers -------------------------------------------------------------------------------
    def _all_positions(self, starts):
        """[B, G, W] every cached position (ascending), -1 past each request's length."""
        lay = self.store.layout
        positions = torch.arange(lay.width, device=starts.device, dtype=torch.int32).view(1, 1, -1)
        out = torch.where(positions < starts.view(-1, 1, 1), positions, torch.full_like(positions, -1))
        return out.expand(starts.shape[0], lay.groups, lay.width).contiguous()

    def _wait_host_writes(self) -> None:
        """Order the compute stream after the prefill's host writes (no host wait), before anything
        reads the history back."""
        stream = self.prefetcher.copy_stream
        if self._host_writes and stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        self._host_writes = False

    def _append(self, kv, k, v, starts):
        self.kernels.append(kv.k[self._rows], kv.v[self._rows], k, v, starts)

    def _append_head(self, k, starts):
        self.kernels.append_one(self.store.head_k[self._rows], k, starts)
