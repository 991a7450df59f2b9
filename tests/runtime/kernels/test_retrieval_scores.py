"""retrieval_scores and select: the kernel == selection.py's scores; select == select_tokens."""
import pytest
import torch

from specontext_compiler.runtime import selection
from specontext_compiler.runtime.kernels import retrieval_scores as rs
from tests.conftest import TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,groups", [(8, 2, 2), (8, 2, 1), (3, 3, 3), (4, 1, 1), (14, 2, 2),
                                                   (8, 4, 2)])
def test_scores_match_reference(dtype, heads, kv_heads, groups):
    batch, seq_max, dim = 2, 45, 24
    q = torch.randn(batch, heads, dim).to(dtype)
    k_cache = torch.randn(batch + 1, kv_heads, seq_max, dim).to(dtype)[:batch]
    seq_lens = torch.tensor([seq_max, 17], dtype=torch.int32)
    scaling = dim ** -0.5
    expected = rs.retrieval_scores_reference(q, k_cache, seq_lens, scaling, groups)
    got = rs.retrieval_scores(q, k_cache, seq_lens, scaling, groups)
    atol, rtol = TOLERANCE[str(dtype).removeprefix("torch.")]
    assert got.shape == (batch, groups, seq_max) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    assert torch.all(got[1, :, 17:] == 0)


def test_a_draft_with_more_kv_heads_merges_consecutive_ones():
    """8 query / 4 KV heads selecting for 2 groups: group g is the max over query heads 4g..4g+3."""
    q, k_cache = torch.randn(1, 8, 16), torch.randn(1, 4, 30, 16)
    seq_lens = torch.tensor([30])
    weights = selection.attention_weights(q, k_cache, 0.25, seq_lens=seq_lens)          # [1, 8, 30]
    scores = rs.retrieval_scores_reference(q, k_cache, seq_lens, 0.25, 2)
    torch.testing.assert_close(scores[0, 1], weights[0, 4:].amax(dim=0))
    torch.testing.assert_close(rs.retrieval_scores(q, k_cache, seq_lens, 0.25, 2), scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,level", [(8, 2, "head"), (8, 2, "batch"), (4, 4, "head"), (4, 1, "head")])
@pytest.mark.parametrize("budget,sinks,recent", [(5, 1, 3), (40, 2, 4)])
def test_select_equals_select_tokens(heads, kv_heads, level, budget, sinks, recent):
    batch, seq = 3, 33
    weights = torch.rand(batch, heads, seq).softmax(-1)
    seq_lens = torch.tensor([seq, 20, 6], dtype=torch.int32)
    expected = selection.select_tokens(weights, kv_heads, budget, level=level, sink_tokens=sinks,
                                       recent_tokens=recent, seq_lens=seq_lens)
    grouped = selection.group_scores(weights, kv_heads, level)
    got = rs.select(grouped, seq_lens, budget, sinks, recent)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), expected)


def test_kernel_scores_drive_the_same_selection():
    batch, heads, kv_heads, seq, dim = 1, 4, 2, 40, 16
    q = torch.randn(batch, heads, dim)
    k_cache = torch.randn(batch, kv_heads, seq, dim)
    seq_lens = torch.tensor([31], dtype=torch.int32)
    scores = rs.retrieval_scores(q, k_cache, seq_lens, 0.25, kv_heads)
    got = rs.select(scores, seq_lens, budget=8, sink_tokens=1, recent_tokens=2)
    weights = selection.attention_weights(q, k_cache, 0.25, seq_lens)
    expected = selection.select_tokens(weights, kv_heads, 8, sink_tokens=1, recent_tokens=2, seq_lens=seq_lens)
    assert torch.equal(got.long(), expected)
    assert rs.retrieval_scores_bytes(q, k_cache, kv_heads) > k_cache.numel() * 4
