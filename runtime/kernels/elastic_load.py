"""Elastic loading of an offloaded layer's budget buffer (paper s.5.4, digest s.3.5).

Each (request, group) row of the buffer has W slots; slot_pos [B, G, W] int32 says which position
each slot holds (-1 empty). Given the new selection new_idx [B, G, W] (-1 padded), only positions
not already held are copied (S_now - S_last), into the slots whose positions left the selection
(S_last - S_now) or were empty. The two sets have the same size counting -1 as empty, so the swap
is one-to-one. Slots whose position left the selection and received nothing become empty, so
afterwards the set of held positions equals the set of new indices.

elastic_diff: which rows to copy where (sort / searchsorted / cumsum: no host sync, static shapes).
gather_rows: the copy itself. On CUDA host_k/host_v are pinned host tensors that the kernel reads
directly through unified virtual addressing (zero-copy; scattered rows need no staging). For
G = Hkv, group g addresses head g; for G = 1 (MQA / batch level), a row is copied for every head.

Bytes moved by gather_rows ~ 2 * loads * heads_per_group * (D + Dv) * b (read host, write device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import check_dtype, check_fixed, pow2, row_major
from specontext_compiler.runtime.kernels._program import request_and_head

# --- specialization: begin ---
HEAD_DIM = 0          # D (0: from the inputs)
V_HEAD_DIM = 0        # Dv
GROUPS = 0            # G
WIDTH = 0             # W
BLOCK_R = 0           # rows per block (0: chosen by _block_rows)
PROGRAMS = 0          # programs looping over the blocks (0: an eighth of the SMs; -1: one per block)
DTYPE = None
# --- specialization: end ---


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


def gather_rows_bytes(load_pos: torch.Tensor, heads_per_group: int, head_dim: int, v_head_dim: int,
                      elem_bytes: int) -> torch.Tensor:
    """0-d tensor: bytes read from the host plus bytes written to the buffer for these loads."""
    return (load_pos >= 0).sum() * heads_per_group * (head_dim + v_head_dim) * elem_bytes * 2


def _block_rows(width: int, block_d: int) -> int:
    return BLOCK_R or max(1, min(pow2(width), 8192 // block_d))


def _programs(items: int, device: torch.device) -> int:
    """Programs to launch: a few per SM's worth, not one per row block.

    The rows come from pinned host memory over PCIe, so each program mostly waits; one program per
    block (1848 at 128k, batch 7) filled every SM and slowed the compute stream's kernels running
    beside the copy (measured: runs 19-20 in benchmarks/RESULTS.md). A bounded grid that loops
    over the blocks keeps the PCIe link busy and leaves the SMs to the layers.
    """
    if PROGRAMS < 0:
        return items
    if PROGRAMS:
        return max(1, min(items, PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(items, sms // 8))


@triton.jit
def _gather_rows_kernel(hk_ptr, hv_ptr, bk_ptr, bv_ptr, pos_ptr, slot_ptr,
                        num_groups, width, heads_per_group, num_items, blocks_per_row,
                        hk_sb, hk_sh, hk_ss, hv_sb, hv_sh, hv_ss,
                        bk_sb, bk_sh, bk_ss, bv_sb, bv_sh, bv_ss, i_sb, i_sg,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    # Persistent: program p handles row blocks p, p + P, p + 2P, ... of all (request, group) rows.
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        b, grp = request_and_head(item // blocks_per_row, num_groups)
        j = (item % blocks_per_row) * BLOCK_R + tl.arange(0, BLOCK_R)
        pos = tl.load(pos_ptr + b * i_sb + grp * i_sg + j, mask=j < width, other=-1).to(tl.int64)
        slot = tl.load(slot_ptr + b * i_sb + grp * i_sg + j, mask=j < width, other=-1).to(tl.int64)
        ok = (pos >= 0) & (slot >= 0)
        mask_k = ok[:, None] & (d[None, :] < D)
        mask_v = ok[:, None] & (dv[None, :] < DV)
        for hh in range(0, heads_per_group):
            h = grp * heads_per_group + hh
            # Both host reads are issued before either store: twice the bytes in flight over PCIe.
            k = tl.load(hk_ptr + b * hk_sb + h * hk_sh + pos[:, None] * hk_ss + d[None, :], mask=mask_k)
            v = tl.load(hv_ptr + b * hv_sb + h * hv_sh + pos[:, None] * hv_ss + dv[None, :], mask=mask_v)
            tl.store(bk_ptr + b * bk_sb + h * bk_sh + slot[:, None] * bk_ss + d[None, :], k, mask=mask_k)
            tl.store(bv_ptr + b * bv_sb + h * bv_sh + slot[:, None] * bv_ss + dv[None, :], v, mask=mask_v)


def gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot) -> None:
    """Triton version of gather_rows_reference.

    host_k [B, Hkv, S_max, D], host_v [B, Hkv, S_max, Dv] (pinned host memory on CUDA);
    buf_k [B, Hkv, W, D], buf_v [B, Hkv, W, Dv]; load_pos, load_slot [B, G, W] int32.
    """
    batch, groups, width = load_pos.shape
    heads, dim, dim_v = host_k.shape[1], host_k.shape[3], host_v.shape[3]
    for name, t in (("host_k", host_k), ("host_v", host_v), ("buf_k", buf_k), ("buf_v", buf_v)):
        row_major(t, name)
        assert t.dtype == buf_k.dtype and t.shape[1] == heads, f"{name}: dtype or head count differs"
    check_dtype(__name__, DTYPE, buf_k)
    assert load_pos.dtype == load_slot.dtype == torch.int32 and load_pos.stride() == load_slot.stride()
    assert load_pos.stride(-1) == 1 and groups in (1, heads) and buf_k.shape[0] >= batch
    for name, fixed, actual in (("HEAD_DIM", HEAD_DIM, dim), ("V_HEAD_DIM", V_HEAD_DIM, dim_v),
                                ("GROUPS", GROUPS, groups), ("WIDTH", WIDTH, width)):
        check_fixed(__name__, name, fixed, actual)
    block_d, block_dv = pow2(dim), pow2(dim_v)
    block_r = _block_rows(width, max(block_d, block_dv))
    blocks_per_row = triton.cdiv(width, block_r)
    items = batch * groups * blocks_per_row
    _gather_rows_kernel[(_programs(items, buf_k.device),)](
        host_k, host_v, buf_k, buf_v, load_pos, load_slot, groups, width, heads // groups, items, blocks_per_row,
        host_k.stride(0), host_k.stride(1), host_k.stride(2), host_v.stride(0), host_v.stride(1),
        host_v.stride(2), buf_k.stride(0), buf_k.stride(1), buf_k.stride(2),
        buf_v.stride(0), buf_v.stride(1), buf_v.stride(2), load_pos.stride(0), load_pos.stride(1),
        D=dim, DV=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_R=block_r)
