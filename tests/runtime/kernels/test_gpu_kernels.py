"""GPU-only checks: real shapes in bf16, pinned host memory read/written by the kernels, CUDA graphs."""
import pytest
import torch

from specontext_compiler.runtime.kernels import elastic_load as el
from specontext_compiler.runtime.kernels import kv_append as ka
from specontext_compiler.runtime.kernels import retrieval_scores as rs
from specontext_compiler.runtime.kernels import sparse_decode as sd
from tests.conftest import TOLERANCE

pytestmark = pytest.mark.gpu
BF16 = TOLERANCE["bfloat16"]


def _step_inputs(batch=2, heads=32, kv_heads=8, seq=3000, dim=128, budget=500, recent=16):
    dev = "cuda"
    q = torch.randn(batch, heads, dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, seq, dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, seq, dim, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([seq, seq - 777][:batch], device=dev, dtype=torch.int32)
    return q, k, v, lens, budget, recent


def test_scores_select_decode_match_references():
    q, k, v, lens, budget, recent = _step_inputs()
    scaling = q.shape[-1] ** -0.5
    scores = rs.retrieval_scores(q, k, lens, scaling, k.shape[1])
    expected = rs.retrieval_scores_reference(q, k, lens, scaling, k.shape[1])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=BF16[1])
    idx = rs.select(expected, lens, budget, 1, recent)
    k_new, v_new = k[:, :, 0].contiguous(), v[:, :, 1].contiguous()
    got = sd.sparse_decode(q, k, v, idx, k_new, v_new, scaling)
    ref = sd.sparse_decode_reference(q, k, v, idx, k_new, v_new, scaling)
    torch.testing.assert_close(got.float(), ref.float(), atol=BF16[0], rtol=BF16[1])


def test_pinned_host_gather_and_append():
    batch, heads, seq, width, dim = 2, 8, 4096, 300, 128
    host_k = torch.randn(batch, heads, seq, dim, dtype=torch.bfloat16, device="cpu").pin_memory()
    host_v = torch.randn(batch, heads, seq, dim, dtype=torch.bfloat16, device="cpu").pin_memory()
    buf_k = torch.zeros(batch, heads, width, dim, device="cuda", dtype=torch.bfloat16)
    buf_v = torch.zeros_like(buf_k)
    slot_pos = torch.full((batch, heads, width), -1, device="cuda", dtype=torch.int32)
    for step in range(2):
        new_idx = torch.stack([torch.randperm(seq, device="cuda")[:width].sort().values
                               for _ in range(batch * heads)]).view(batch, heads, width).to(torch.int32)
        load_pos, load_slot, new_slot_pos = el.elastic_diff(slot_pos, new_idx)
        ref = el.elastic_diff_reference(slot_pos.cpu(), new_idx.cpu())
        assert all(torch.equal(a.cpu(), b) for a, b in zip((load_pos, load_slot, new_slot_pos), ref))
        el.gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot)
        slot_pos = new_slot_pos
        held = slot_pos.long().clamp(min=0).cpu()
        want_k = torch.gather(host_k, 2, held.unsqueeze(-1).expand(-1, -1, -1, dim))
        assert torch.equal(buf_k.cpu()[slot_pos.cpu() >= 0], want_k[slot_pos.cpu() >= 0])
    k_new = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    start = torch.tensor([5, 4095], device="cuda", dtype=torch.int32)
    ka.kv_append(host_k, host_v, k_new, k_new, start)
    torch.cuda.synchronize()
    assert torch.equal(host_k[0, :, 5], k_new[0, :, 0].cpu()) and torch.equal(host_v[1, :, 4095], k_new[1, :, 0].cpu())


def test_decode_step_is_graph_capturable():
    q, k, v, lens, budget, recent = _step_inputs(batch=1, seq=2048)
    scaling = q.shape[-1] ** -0.5
    k_new, v_new = k[:, :, 0].contiguous(), v[:, :, 0].contiguous()
    slot_pos = torch.full((1, 8, budget + 1 + recent), -1, device="cuda", dtype=torch.int32)
    buf_k = torch.zeros(1, 8, slot_pos.shape[-1], 128, device="cuda", dtype=torch.bfloat16)
    buf_v = torch.zeros_like(buf_k)

    def step():
        idx = rs.select(rs.retrieval_scores(q, k, lens, scaling, 8), lens, budget, 1, recent)
        load_pos, load_slot, new_slot_pos = el.elastic_diff(slot_pos, idx)
        el.gather_rows(k, v, buf_k, buf_v, load_pos, load_slot)
        slot_pos.copy_(new_slot_pos)
        return idx, sd.sparse_decode(q, buf_k, buf_v, el.buffer_indices(slot_pos), k_new, v_new, scaling)

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()                                     # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    slot_pos.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, out = step()
    slot_pos.fill_(-1)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref = sd.sparse_decode_reference(q, k, v, idx, k_new, v_new, scaling)
    torch.testing.assert_close(out.float(), ref.float(), atol=BF16[0], rtol=BF16[1])
