"""Prefill attention: the SDPA path (GPU) against the plain per-request reference, on CPU tensors."""
import torch

from specontext_compiler.runtime.attention import _dense_causal_sdpa, dense_causal


def test_sdpa_path_matches_the_reference_for_ragged_starts_and_gqa():
    batch, q_heads, kv_heads, steps, dim, capacity = 3, 8, 2, 5, 16, 40
    q = torch.randn(batch, q_heads, steps, dim)
    cache_k = torch.randn(batch, kv_heads, capacity, dim)
    cache_v = torch.randn(batch, kv_heads, capacity, dim)
    starts = torch.tensor([0, 7, 30])         # a first chunk, a middle one, one near capacity
    expected = dense_causal(q, cache_k, cache_v, starts, scaling=0.25)     # CPU: the einsum path
    got = _dense_causal_sdpa(q, cache_k, cache_v, starts, scaling=0.25)
    assert got.shape == (batch, steps, q_heads, dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
