"""Elastic loading with one slot table per store: the step's diff, shared by every offloaded layer.

The reference is the obvious path: fill each layer's buffer from scratch with every position the
table names (gather_rows_reference), and count copies as if each layer kept its own table.
"""
import pytest
import torch

from specontext_compiler.runtime.kernel_set import KernelSet
from specontext_compiler.runtime.kernels import elastic_load as el
from specontext_compiler.runtime.kv_store import KVLayout, KVStore
from specontext_compiler.runtime.prefetch import Prefetcher

SLOTS, HEADS, WIDTH, SEQ, DIM, V_DIM = 2, 3, 6, 14, 8, 5
LAYERS = 4


def _store(offloaded, groups=HEADS, device="cpu"):
    layout = KVLayout(num_layers=LAYERS, slots=SLOTS, max_len=SEQ, num_kv_heads=HEADS, head_dim=DIM,
                      v_head_dim=V_DIM, width=WIDTH, groups=groups, dtype=torch.float32,
                      device=torch.device(device))
    store = KVStore(layout, offloaded)
    for layer in store.layers:          # fresh random history, resident or on the host
        layer.k.copy_(torch.randn_like(layer.k))
        layer.v.copy_(torch.randn_like(layer.v))
    return store


def _selection(groups=HEADS):
    """[SLOTS, G, WIDTH] distinct ascending positions from a short history (so steps overlap), some -1."""
    rows = []
    for _ in range(SLOTS * groups):
        count = int(torch.randint(WIDTH - 2, WIDTH + 1, ()))
        picked = torch.randperm(SEQ)[:count].sort().values.tolist()
        rows.append(picked + [-1] * (WIDTH - count))
    return torch.tensor(rows, dtype=torch.int32).view(SLOTS, groups, WIDTH)


def _from_scratch(store, layer):
    """The layer's buffer as a full load of everything the table names would leave it."""
    kv, table = store.layers[layer], store.slot_pos.cpu()       # the reference runs on the CPU
    ref_k, ref_v = torch.zeros_like(kv.buf_k, device="cpu"), torch.zeros_like(kv.buf_v, device="cpu")
    el.gather_rows_reference(kv.k.cpu(), kv.v.cpu(), ref_k, ref_v, table, el.buffer_indices(table))
    return ref_k, ref_v


def _assert_buffers_match(store):
    held = (store.slot_pos.cpu() >= 0).repeat_interleave(HEADS // store.layout.groups, dim=1)   # [SLOTS, HEADS, WIDTH]
    for layer in store.offloaded_layers():
        kv = store.layers[layer]
        ref_k, ref_v = _from_scratch(store, layer)
        assert torch.equal(kv.buf_k.cpu()[held], ref_k[held]), f"layer {layer} K"
        assert torch.equal(kv.buf_v.cpu()[held], ref_v[held]), f"layer {layer} V"


class CountingKernels(KernelSet):
    """A KernelSet that counts elastic_diff calls."""

    def __init__(self, reference):
        super().__init__(reference=reference)
        self.diffs = 0

    def elastic_diff(self, slot_pos, new_idx):
        self.diffs += 1
        return super().elastic_diff(slot_pos, new_idx)


def _step(fetcher, indices, issue_order, late=()):
    """One decode step: prefetch issued for issue_order, loaded on demand for `late`."""
    rows = slice(0, SLOTS)
    fetcher.new_step()
    for layer in issue_order:
        fetcher.issue(layer, indices, rows)
    for layer in list(issue_order) + list(late):
        fetcher.ensure_loaded(layer, indices, rows)


@pytest.mark.parametrize("groups", [HEADS, 1], ids=["head-level", "one-set"])
@pytest.mark.parametrize("reference", [True, False], ids=["reference", "triton"])
def test_shared_diff_matches_loading_each_layer_from_scratch(reference, groups):
    # Compiled Triton needs device buffers and pinned host history: the real layout, on a GPU.
    device = "cuda" if not reference and torch.cuda.is_available() else "cpu"
    store = _store(offloaded=(1, 2, 3), groups=groups, device=device)
    kernels = CountingKernels(reference)
    fetcher = Prefetcher(store, kernels)
    own_tables = {i: torch.full_like(store.slot_pos, -1) for i in range(LAYERS)}   # the per-layer path
    expected_loaded = expected_requested = 0
    steps = 6
    for step in range(steps):
        if step == 2:      # layer 0 moves to the host mid-generation; its buffer starts empty (NaN)
            store.layers[0].offload(filled=SEQ)
            store.layers[0].buf_k.fill_(float("nan"))
            store.layers[0].buf_v.fill_(float("nan"))
        if step == 4:      # a new request in slot 1: its history is new, stale rows must not survive
            store.reset_slot(1)
            own_tables = {i: t.index_fill(0, torch.tensor([1], device=t.device), -1) for i, t in own_tables.items()}
            for layer in store.layers:
                layer.k[1].copy_(torch.randn_like(layer.k[1]))
                layer.v[1].copy_(torch.randn_like(layer.v[1]))
        indices = _selection(groups).to(device)
        _step(fetcher, indices, issue_order=[3, 1],
              late=[i for i in (0, 2) if store.layers[i].offloaded])
        for layer in store.offloaded_layers():
            load_pos, _, own_tables[layer] = el.elastic_diff_reference(own_tables[layer], indices)
            load_pos = load_pos.cpu()
            expected_loaded += int((load_pos >= 0).sum())
            expected_requested += int((indices >= 0).sum())
        _assert_buffers_match(store)
        for row, table_row in zip(indices.view(-1, WIDTH).tolist(), store.slot_pos.view(-1, WIDTH).tolist()):
            assert sorted(p for p in table_row if p >= 0) == [p for p in row if p >= 0]
    assert kernels.diffs == steps                       # once per step, not once per layer
    assert not store.layers[0].needs_full_load
    assert int(fetcher.rows_loaded) == expected_loaded
    assert int(fetcher.rows_requested) == expected_requested


def test_diff_once_per_step_however_the_layers_are_loaded():
    store = _store(offloaded=(0, 1, 2, 3))
    kernels = CountingKernels(reference=True)
    fetcher = Prefetcher(store, kernels)
    _step(fetcher, _selection(), issue_order=[0, 1, 2, 3])
    _step(fetcher, _selection(), issue_order=[], late=[3, 2, 1, 0])
    _step(fetcher, _selection(), issue_order=[2], late=[0, 1, 3])
    assert kernels.diffs == 3
    _assert_buffers_match(store)


def test_a_second_selection_in_one_step_is_refused():
    store = _store(offloaded=(1, 2))
    fetcher = Prefetcher(store, KernelSet(reference=True))
    fetcher.new_step()
    first = _selection()
    fetcher.issue(1, first, slice(0, SLOTS))
    # The shared diff is only right for the indices it was computed from. (Both tensors stay
    # alive: a freed first one could lend its address to the second, which the guard compares.)
    second = _selection()
    with pytest.raises(ValueError, match="one selection per step"):
        fetcher.issue(2, second, slice(0, SLOTS))
    assert first.data_ptr() != second.data_ptr()


def test_offloaded_history_comes_back_exactly_for_the_requested_rows():
    from specontext_compiler.runtime.kv_store import KVLayout, LayerKV
    layout = KVLayout(num_layers=1, slots=3, max_len=20, num_kv_heads=2, head_dim=4, v_head_dim=3, width=5,
                      groups=2, dtype=torch.float32, device=torch.device("cpu"))
    layer = LayerKV(layout, capacity=20, offloaded=True)
    layer.k.copy_(torch.randn_like(layer.k))
    layer.v.copy_(torch.randn_like(layer.v))
    k, v = layer.history(slice(1, 3), 7, torch.device("meta"))     # another device: the per-head copy path
    assert k.shape == (2, 2, 7, 4) and v.shape == (2, 2, 7, 3) and k.device.type == "meta"
    k, v = layer.history(slice(1, 3), 7, torch.device("cpu"))      # same device: a view
    assert torch.equal(k, layer.k[1:3, :, :7]) and torch.equal(v, layer.v[1:3, :, :7])


class GridRecordingKernels(KernelSet):
    """A KernelSet that records the grid asked of each gather."""

    def __init__(self):
        super().__init__(reference=True)
        self.grids = []

    def gather_compact(self, host_k, host_v, buf_k, buf_v, loads, groups, programs=None):
        self.grids.append(programs)
        super().gather_compact(host_k, host_v, buf_k, buf_v, loads, groups, programs)


def test_each_gather_of_a_step_gets_its_grid_in_issue_order():
    store = _store(offloaded=(0, 1, 2, 3))
    kernels = GridRecordingKernels()
    fetcher = Prefetcher(store, kernels)
    fetcher.gather_grids = (4, 8, 32)
    _step(fetcher, _selection(), issue_order=[0, 1, 2, 3])    # the first step fills the empty buffers
    kernels.grids.clear()
    _step(fetcher, _selection(), issue_order=[2, 0], late=[3, 1])
    assert kernels.grids == [4, 8, 32, None]                   # past the schedule: the kernel's default
    _assert_buffers_match(store)
