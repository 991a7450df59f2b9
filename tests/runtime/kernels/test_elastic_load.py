"""elastic_diff invariants, equality with the set-based reference, compact_loads, gathers, buffer_indices."""
import pytest
import torch

from specontext_compiler.runtime.kernels import elastic_load as el


def _selection(batch, groups, width, seq, pad):
    """Random ascending distinct positions per row, `pad` trailing -1 (as select() returns)."""
    rows = [torch.randperm(seq)[:width].sort().values for _ in range(batch * groups)]
    idx = torch.stack(rows).view(batch, groups, width).to(torch.int32)
    if pad:
        idx[..., width - pad:] = -1
    return idx


def _slot_pos(batch, groups, width, seq, empty):
    """A buffer state: distinct positions in random slot order, `empty` slots -1."""
    held = _selection(batch, groups, width, seq, empty)
    perm = torch.argsort(torch.rand(batch, groups, width), dim=-1)
    return torch.gather(held, -1, perm)


def _overlapping(slot_pos, seq, keep_share):
    """A new selection that keeps about keep_share of the held positions (adjacent steps)."""
    out = []
    for held in slot_pos.reshape(-1, slot_pos.shape[-1]).tolist():
        kept = [p for p in held if p >= 0 and torch.rand(()) < keep_share]
        fresh = [p for p in torch.randperm(seq).tolist() if p not in held][:len(held) - len(kept) - 1]
        row = sorted(kept + fresh) + [-1] * (len(held) - len(kept) - len(fresh))
        out.append(row)
    return torch.tensor(out, dtype=torch.int32).view_as(slot_pos)


@pytest.mark.parametrize("groups,empty", [(3, 0), (1, 4), (2, 11)])
def test_elastic_diff_invariants(groups, empty):
    batch, width, seq = 2, 11, 40
    slot_pos = _slot_pos(batch, groups, width, seq, empty)
    new_idx = _overlapping(slot_pos, seq, keep_share=0.7)
    load_pos, load_slot, new_slot_pos = el.elastic_diff(slot_pos, new_idx)
    expected = el.elastic_diff_reference(slot_pos, new_idx)
    for got, ref in zip((load_pos, load_slot, new_slot_pos), expected):
        assert got.dtype == torch.int32 and torch.equal(got, ref)
    for row in range(batch * groups):
        held = slot_pos.view(-1, width)[row].tolist()
        new = new_idx.view(-1, width)[row].tolist()
        after = new_slot_pos.view(-1, width)[row].tolist()
        wanted = {p for p in new if p >= 0}
        assert {p for p in after if p >= 0} == wanted and len([p for p in after if p >= 0]) == len(wanted)
        loads = [(p, s) for p, s in zip(load_pos.view(-1, width)[row].tolist(),
                                         load_slot.view(-1, width)[row].tolist()) if p >= 0]
        assert len(loads) == len(wanted - set(held))
        assert len({s for _, s in loads}) == len(loads)
        for s, p in enumerate(held):           # kept slots are untouched
            if p in wanted:
                assert after[s] == p and s not in {slot for _, slot in loads}
    share = el.overlap_fraction(slot_pos, new_idx)
    valid = int((new_idx >= 0).sum())
    assert share.dim() == 0 and abs(float(share) - (valid - int((load_pos >= 0).sum())) / valid) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups", [(3, 3), (4, 1)])
def test_gather_rows_matches_reference(dtype, heads, groups):
    batch, width, seq, dim, dim_v = 2, 13, 50, 20, 12
    host_k = torch.randn(batch, heads, seq, dim).to(dtype)
    host_v = torch.randn(batch, heads, seq, dim_v).to(dtype)
    buf_k = torch.randn(batch + 1, heads, width, dim).to(dtype)
    buf_v = torch.randn(batch + 1, heads, width, dim_v).to(dtype)
    slot_pos = _slot_pos(batch, groups, width, seq, empty=3)
    load_pos, load_slot, new_slot_pos = el.elastic_diff(slot_pos, _overlapping(slot_pos, seq, 0.6))
    ref_k, ref_v = buf_k.clone(), buf_v.clone()
    el.gather_rows_reference(host_k, host_v, ref_k[:batch], ref_v[:batch], load_pos, load_slot)
    el.gather_rows(host_k, host_v, buf_k[:batch], buf_v[:batch], load_pos, load_slot)
    assert torch.equal(buf_k, ref_k) and torch.equal(buf_v, ref_v)
    b, g, j = [int(x[0]) for x in torch.nonzero(load_pos >= 0, as_tuple=True)]
    h = g if groups == heads else heads - 1
    assert torch.equal(buf_k[b, h, load_slot[b, g, j]], host_k[b, h, load_pos[b, g, j]])
    assert int(el.gather_rows_bytes(load_pos, heads // groups, dim, dim_v, 2)) == \
        int((load_pos >= 0).sum()) * (heads // groups) * (dim + dim_v) * 4


def test_buffer_indices_after_load_cover_the_selection():
    slot_pos = _slot_pos(1, 2, 9, 30, empty=2)
    new_idx = _overlapping(slot_pos, 30, 0.5)
    _, _, new_slot_pos = el.elastic_diff(slot_pos, new_idx)
    idx = el.buffer_indices(new_slot_pos)
    assert idx.dtype == torch.int32
    for row in range(2):
        slots = [s for s in idx[0, row].tolist() if s >= 0]
        assert sorted(new_slot_pos[0, row, slots].tolist()) == sorted(p for p in new_idx[0, row].tolist() if p >= 0)


@pytest.mark.parametrize("programs", [1, 3, -1])
def test_gather_rows_persistent_grid_covers_every_block(monkeypatch, programs):
    """Fewer programs than row blocks (4-row blocks, 3 per row, 12 in all): each program loops
    over its share; -1 launches one program per block. Same result as the reference either way."""
    monkeypatch.setattr(el, "BLOCK_R", 4)
    monkeypatch.setattr(el, "PROGRAMS", programs)
    batch, heads, width, seq, dim = 2, 2, 11, 40, 8
    host_k, host_v = torch.randn(batch, heads, seq, dim), torch.randn(batch, heads, seq, dim)
    buf_k, buf_v = torch.randn(batch, heads, width, dim), torch.randn(batch, heads, width, dim)
    slot_pos = _slot_pos(batch, heads, width, seq, empty=2)
    load_pos, load_slot, _ = el.elastic_diff(slot_pos, _overlapping(slot_pos, seq, 0.3))
    assert int((load_pos[..., 8:] >= 0).sum()) > 0, "the last block of a row must have work"
    ref_k, ref_v = buf_k.clone(), buf_v.clone()
    el.gather_rows_reference(host_k, host_v, ref_k, ref_v, load_pos, load_slot)
    el.gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot)
    assert torch.equal(buf_k, ref_k) and torch.equal(buf_v, ref_v)


@pytest.mark.parametrize("groups,keep", [(3, 0.8), (1, 0.0), (2, 1.0)])
def test_compact_loads_packs_every_load_in_order(groups, keep):
    """Same list as the nonzero() reference: (row, position, slot) of each load, then -1."""
    batch, width, seq = 3, 17, 60
    slot_pos = _slot_pos(batch, groups, width, seq, empty=2)
    load_pos, load_slot, _ = el.elastic_diff(slot_pos, _overlapping(slot_pos, seq, keep))
    got, expected = el.compact_loads(load_pos, load_slot), el.compact_loads_reference(load_pos, load_slot)
    assert got.entries.dtype == got.count.dtype == torch.int32
    assert torch.equal(got.entries, expected.entries) and torch.equal(got.count, expected.count)
    assert int(got.count) == int((load_pos >= 0).sum())
    assert got.entries.shape == (3, batch * groups * width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups", [(4, 4), (3, 1)])
def test_gather_compact_matches_reference(dtype, heads, groups):
    """The Triton gather and the compact reference both equal the [B, G, W] reference."""
    batch, width, seq, dim, dim_v = 2, 19, 70, 16, 24
    host_k = torch.randn(batch, heads, seq, dim).to(dtype)
    host_v = torch.randn(batch, heads, seq, dim_v).to(dtype)
    slot_pos = _slot_pos(batch, groups, width, seq, empty=5)
    load_pos, load_slot, _ = el.elastic_diff(slot_pos, _overlapping(slot_pos, seq, 0.5))
    loads = el.compact_loads(load_pos, load_slot)
    bufs = [(torch.randn(batch, heads, width, dim).to(dtype), torch.randn(batch, heads, width, dim_v).to(dtype))]
    bufs += [tuple(t.clone() for t in bufs[0]) for _ in range(2)]
    el.gather_rows_reference(host_k, host_v, *bufs[0], load_pos, load_slot)
    el.gather_compact_reference(host_k, host_v, *bufs[1], loads, groups)
    el.gather_compact(host_k, host_v, *bufs[2], loads, groups)
    for got in bufs[1:]:
        assert torch.equal(got[0], bufs[0][0]) and torch.equal(got[1], bufs[0][1])
