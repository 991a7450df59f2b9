"""Elastic loading of an offloaded layer's budget buffer (paper s.5.4, digest s.3.5).

Each (request, group) row of the buffer has W slots; slot_pos [B, G, W] int32 says which position
each slot holds (-1 empty). Given the new selection new_idx [B, G, W] (-1 padded), only positions
not already held are copied (S_now - S_last), into the slots whose positions left the selection
(S_last - S_now) or were empty. The two sets have the same size counting -1 as empty, so the swap
is one-to-one. Slots whose position left the selection and received nothing become empty, so
afterwards the set of held positions equals the set of new indices.

elastic_diff: which rows to copy where (sort / searchsorted / cumsum: no host sync, static shapes).
compact_loads: the same loads as a dense list (row, position, slot) and its length, so the copy
  visits only rows that move: at the paper's ~80% step-to-step overlap, four of five entries of
  load_pos are -1, and a copy that walks [B, G, W] spends most of its PCIe round trips on nothing.
gather_compact: the copy itself. On CUDA host_k/host_v are pinned host tensors that the kernel
  reads directly through unified virtual addressing (zero-copy; scattered rows need no staging).
  For G = Hkv, group g addresses head g; for G = 1 (MQA / batch level), a row is copied for every
  head. gather_rows = compact_loads + gather_compact, for callers with one layer to load.

Bytes moved by a gather ~ 2 * loads * heads_per_group * (D + Dv) * b (read host, write device).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import check_dtype, check_fixed, pow2, row_major

# --- specialization: begin ---
HEAD_DIM = 0          # D (0: from the inputs)
V_HEAD_DIM = 0        # Dv
GROUPS = 0            # G
WIDTH = 0             # W
BLOCK_R = 0           # list entries per block (0: chosen by _block_rows)
PROGRAMS = 0          # programs looping over the blocks (0: a sixteenth of the SMs; -1: one per block)
DTYPE = None
# --- specialization: end ---


class CompactLoads(NamedTuple):
    """The rows one step copies, as a dense list (shared by every offloaded layer's gather).

    entries [3, N] int32: (row = b * G + g, position, slot) of each load in its first `count`
    columns (N = B * G * W, the most a step can load; -1 past count). count [1] int32.
    """

    entries: torch.Tensor
    count: torch.Tensor


def _held(sorted_values: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values[..., j] >= 0 and present in the ascending rows of sorted_values (batched)."""
    at = torch.searchsorted(sorted_values, values).clamp(max=sorted_values.shape[-1] - 1)
    return (values >= 0) & (torch.gather(sorted_values, -1, at) == values)


def elastic_diff(slot_pos: torch.Tensor, new_idx: torch.Tensor):
    """(load_pos, load_slot, new_slot_pos), each [B, G, W] int32.

    Entry j of load_pos/load_slot belongs to new_idx[..., j]: the position to copy and the slot
    to copy it into, or -1 when it is held already or padding. The k-th position to load (in
    new_idx order) goes to the k-th free slot (ascending slot id).
    """
    width = slot_pos.shape[-1]
    slot_pos, new_idx = slot_pos.to(torch.int32), new_idx.to(torch.int32)
    need = (new_idx >= 0) & ~_held(slot_pos.sort(dim=-1).values, new_idx)
    keep = _held(new_idx.sort(dim=-1).values, slot_pos)
    slots = torch.arange(width, device=slot_pos.device, dtype=torch.int32)
    free_first = torch.where(keep, slots + width, slots).sort(dim=-1).values   # free slot ids first
    rank = (need.cumsum(dim=-1) - 1).clamp(min=0)
    load_slot = torch.where(need, torch.gather(free_first, -1, rank), -1).to(torch.int32)
    load_pos = torch.where(need, new_idx, -1)
    padded = torch.cat([torch.where(keep, slot_pos, -1), torch.full_like(slot_pos[..., :1], -1)], -1)
    target = torch.where(need, load_slot, width).long()    # non-loads land in a spare column
    padded.scatter_(-1, target, load_pos)
    return load_pos, load_slot, padded[..., :width].contiguous()


def elastic_diff_reference(slot_pos: torch.Tensor, new_idx: torch.Tensor):
    """The same as elastic_diff, row by row with Python sets (the specification)."""
    load_pos = torch.full_like(new_idx, -1, dtype=torch.int32)
    load_slot = torch.full_like(load_pos, -1)
    new_slot_pos = slot_pos.clone().to(torch.int32)
    flat_pos, flat_new = slot_pos.reshape(-1, slot_pos.shape[-1]), new_idx.reshape(-1, new_idx.shape[-1])
    out_pos, out_slot, out_held = load_pos.view_as(flat_new), load_slot.view_as(flat_new), new_slot_pos.view_as(flat_pos)
    for row, (held, new) in enumerate(zip(flat_pos.tolist(), flat_new.tolist())):
        wanted = {p for p in new if p >= 0}
        free = [s for s, p in enumerate(held) if p not in wanted]
        for s in free:
            out_held[row, s] = -1
        held_set = set(held)
        loads = [(j, p) for j, p in enumerate(new) if p >= 0 and p not in held_set]
        for (j, p), s in zip(loads, free):
            out_pos[row, j], out_slot[row, j], out_held[row, s] = p, s, p
    return load_pos, load_slot, new_slot_pos


def overlap_fraction(slot_pos: torch.Tensor, new_idx: torch.Tensor) -> torch.Tensor:
    """0-d fp32 tensor: share of valid new indices already held (paper: >80% between steps).

    0 when there are no valid new indices. No host sync; call .item() outside the hot loop.
    """
    held = _held(slot_pos.to(torch.int32).sort(dim=-1).values, new_idx.to(torch.int32))
    wanted = (new_idx >= 0).sum().clamp(min=1)
    return held.sum().float() / wanted.float()


def buffer_indices(slot_pos: torch.Tensor) -> torch.Tensor:
    """idx [B, G, W] int32 into an offloaded layer's budget buffer for sparse_decode (-1 empty)."""
    slots = torch.arange(slot_pos.shape[-1], device=slot_pos.device, dtype=torch.int32)
    return torch.where(slot_pos >= 0, slots, -1).to(torch.int32).contiguous()


def gather_rows_reference(host_k, host_v, buf_k, buf_v, load_pos, load_slot) -> None:
    """buf[b, h, slot] = host[b, h, pos] for every valid (pos, slot) entry (in place)."""
    heads = host_k.shape[1]
    per_group = heads // load_pos.shape[1]
    pos = load_pos.long().repeat_interleave(per_group, dim=1)        # [B, Hkv, W]: group -> heads
    slot = load_slot.long().repeat_interleave(per_group, dim=1)
    b, h, j = torch.nonzero(pos >= 0, as_tuple=True)
    src_b, src_h, src_p = b.cpu(), h.cpu(), pos[b, h, j].cpu()
    buf_k[b, h, slot[b, h, j]] = host_k[src_b, src_h, src_p].to(buf_k.device)
    buf_v[b, h, slot[b, h, j]] = host_v[src_b, src_h, src_p].to(buf_v.device)


def gather_compact_reference(host_k, host_v, buf_k, buf_v, loads: CompactLoads, groups: int) -> None:
    """gather_compact in plain PyTorch (host sync on the count; the specification)."""
    entries = loads.entries[:, :int(loads.count)].long()
    per_group = host_k.shape[1] // groups
    for hh in range(per_group):
        b, h = entries[0] // groups, entries[0] % groups * per_group + hh
        pos, slot = entries[1], entries[2]
        src_b, src_h, src_p = b.to(host_k.device), h.to(host_k.device), pos.to(host_k.device)
        buf_k[b, h, slot] = host_k[src_b, src_h, src_p].to(buf_k.device)
        buf_v[b, h, slot] = host_v[src_b, src_h, src_p].to(buf_v.device)


def gather_rows_bytes(load_pos: torch.Tensor, heads_per_group: int, head_dim: int, v_head_dim: int,
                      elem_bytes: int) -> torch.Tensor:
    """0-d tensor: bytes read from the host plus bytes written to the buffer for these loads."""
    return (load_pos >= 0).sum() * heads_per_group * (head_dim + v_head_dim) * elem_bytes * 2


def compact_loads(load_pos: torch.Tensor, load_slot: torch.Tensor) -> CompactLoads:
    """The valid (load_pos, load_slot) entries of [B, G, W] in row-major order, packed to the front.

    A cumsum assigns each load its place, a scatter puts it there: static shapes, no host sync.
    """
    need = (load_pos >= 0).reshape(-1)
    total = need.numel()
    width = load_pos.shape[-1]
    place = torch.where(need, need.cumsum(0) - 1, total)            # non-loads go to a spare column
    rows = torch.arange(total, device=load_pos.device, dtype=torch.int32) // width
    entries = torch.full((3, total + 1), -1, dtype=torch.int32, device=load_pos.device)
    for field, values in enumerate((rows, load_pos.reshape(-1), load_slot.reshape(-1))):
        entries[field].scatter_(0, place, values.to(torch.int32))
    count = need.sum().to(torch.int32).reshape(1)
    return CompactLoads(entries[:, :total], count)


def compact_loads_reference(load_pos: torch.Tensor, load_slot: torch.Tensor) -> CompactLoads:
    """compact_loads with nonzero() (host sync; the specification)."""
    width = load_pos.shape[-1]
    flat_pos, flat_slot = load_pos.reshape(-1), load_slot.reshape(-1)
    (where,) = torch.nonzero(flat_pos >= 0, as_tuple=True)
    entries = torch.full((3, flat_pos.numel()), -1, dtype=torch.int32, device=load_pos.device)
    entries[:, :where.numel()] = torch.stack([where // width, flat_pos[where], flat_slot[where]]).to(torch.int32)
    return CompactLoads(entries, torch.tensor([where.numel()], dtype=torch.int32, device=load_pos.device))


# 128 rows of 128-wide K and V per block, 8 warps: every offloaded layer's gather reads a cold
# stretch of host memory, so each row waits on address translation as much as on PCIe, and the
# more rows a program has in flight the more of that wait overlaps. Rotating over twelve 5.9 GB
# stores as the 128k step does, 8 programs moved 20.0 GB/s with 64 rows and 4 warps, 23.2 with
# 128 rows and 8 warps; more programs or larger blocks did not pass ~24 GB/s
# (benchmarks/bench_host_pages.py --probes blocks). In the batch-11 128k step the two gave the
# same 14.5 ms; the layers beside the gathers are the step's cost at batch 9 (RESULTS.md).
NUM_WARPS = 8


def _block_rows(block_d: int) -> int:
    return BLOCK_R or max(1, 16384 // block_d)


def _programs(max_blocks: int, device: torch.device, programs: int) -> int:
    """Programs to launch: a bounded persistent grid, not one per row block.

    The rows come from pinned host memory over PCIe, so each program mostly waits; one program per
    block filled every SM and slowed the compute stream's kernels running beside the copy
    (benchmarks/RESULTS.md). A bounded grid that loops over the blocks keeps the PCIe link busy and
    leaves the SMs to the layers. The default, a sixteenth of the SMs (8 on an H200), gave the
    shortest 128k step of 4, 8 and 16 programs: fewer leave the link idle, more slow the layers
    beside the copy more than they speed the copy.
    """
    if programs < 0:
        return max_blocks
    if programs:
        return max(1, min(max_blocks, programs))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(max_blocks, sms // 16))


@triton.jit
def _gather_rows_kernel(hk_ptr, hv_ptr, bk_ptr, bv_ptr, entries_ptr, count_ptr,
                        num_groups, heads_per_group, entries_stride,
                        hk_sb, hk_sh, hk_ss, hv_sb, hv_sh, hv_ss,
                        bk_sb, bk_sh, bk_ss, bv_sb, bv_sh, bv_ss,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    count = tl.load(count_ptr)
    # Persistent: program p copies blocks p, p + P, ... of the compact list, up to its length
    # (read on the device, so the launch is the same every step and fits a CUDA graph).
    for block in range(tl.program_id(0), tl.cdiv(count, BLOCK_R), tl.num_programs(0)):
        e = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = e < count
        row = tl.load(entries_ptr + e, mask=ok, other=0)
        pos = tl.load(entries_ptr + entries_stride + e, mask=ok, other=0).to(tl.int64)
        slot = tl.load(entries_ptr + 2 * entries_stride + e, mask=ok, other=0).to(tl.int64)
        b = (row // num_groups).to(tl.int64)
        grp = (row % num_groups).to(tl.int64)
        mask_k = ok[:, None] & (d[None, :] < D)
        mask_v = ok[:, None] & (dv[None, :] < DV)
        for hh in range(0, heads_per_group):
            h = grp * heads_per_group + hh
            # Both host reads are issued before either store: twice the bytes in flight over PCIe.
            k = tl.load(hk_ptr + (b * hk_sb + h * hk_sh + pos * hk_ss)[:, None] + d[None, :], mask=mask_k)
            v = tl.load(hv_ptr + (b * hv_sb + h * hv_sh + pos * hv_ss)[:, None] + dv[None, :], mask=mask_v)
            tl.store(bk_ptr + (b * bk_sb + h * bk_sh + slot * bk_ss)[:, None] + d[None, :], k, mask=mask_k)
            tl.store(bv_ptr + (b * bv_sb + h * bv_sh + slot * bv_ss)[:, None] + dv[None, :], v, mask=mask_v)


def gather_compact(host_k, host_v, buf_k, buf_v, loads: CompactLoads, groups: int, *,
                   programs: int | None = None, block_rows: int | None = None,
                   num_warps: int | None = None) -> None:
    """Copy the compact list's rows from host K/V into the budget buffers (Triton).

    host_k [B, Hkv, S_max, D], host_v [B, Hkv, S_max, Dv] (pinned host memory on CUDA);
    buf_k [B, Hkv, W, D], buf_v [B, Hkv, W, Dv]; loads from compact_loads over [B, groups, W].
    programs, block_rows, num_warps: override PROGRAMS / BLOCK_R / NUM_WARPS (benchmarks sweep them).
    """
    heads, dim, dim_v = host_k.shape[1], host_k.shape[3], host_v.shape[3]
    for name, t in (("host_k", host_k), ("host_v", host_v), ("buf_k", buf_k), ("buf_v", buf_v)):
        row_major(t, name)
        assert t.dtype == buf_k.dtype and t.shape[1] == heads, f"{name}: dtype or head count differs"
    check_dtype(__name__, DTYPE, buf_k)
    entries, count = loads
    assert entries.dtype == count.dtype == torch.int32 and entries.stride(1) == 1 and groups in (1, heads)
    for name, fixed, actual in (("HEAD_DIM", HEAD_DIM, dim), ("V_HEAD_DIM", V_HEAD_DIM, dim_v),
                                ("GROUPS", GROUPS, groups), ("WIDTH", WIDTH, buf_k.shape[2])):
        check_fixed(__name__, name, fixed, actual)
    block_d, block_dv = pow2(dim), pow2(dim_v)
    block_r = block_rows or _block_rows(max(block_d, block_dv))
    max_blocks = triton.cdiv(entries.shape[1], block_r)
    grid = _programs(max_blocks, buf_k.device, PROGRAMS if programs is None else programs)
    _gather_rows_kernel[(grid,)](
        host_k, host_v, buf_k, buf_v, entries, count, groups, heads // groups, entries.stride(0),
        host_k.stride(0), host_k.stride(1), host_k.stride(2), host_v.stride(0), host_v.stride(1),
        host_v.stride(2), buf_k.stride(0), buf_k.stride(1), buf_k.stride(2),
        buf_v.stride(0), buf_v.stride(1), buf_v.stride(2),
        D=dim, DV=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_R=block_r,
        num_warps=num_warps or NUM_WARPS)


def gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot) -> None:
    """Triton version of gather_rows_reference: compact_loads, then gather_compact.

    load_pos, load_slot: [B, G, W] int32 as elastic_diff returns them.
    """
    assert load_pos.dtype == load_slot.dtype == torch.int32 and load_pos.shape == load_slot.shape
    assert buf_k.shape[0] >= load_pos.shape[0]
    gather_compact(host_k, host_v, buf_k, buf_v, compact_loads(load_pos, load_slot), load_pos.shape[1])
