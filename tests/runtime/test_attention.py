"""Dense prefill attention: the fused-SDPA path (used on CUDA) equals the explicit reference."""
import torch

from specontext_compiler.runtime.attention import _dense_causal_sdpa, dense_causal


def test_sdpa_path_with_lower_right_causal_bias_matches_the_reference():
    q = torch.randn(2, 8, 5, 16)                 # 5 new tokens, 8 query heads
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)     # 2 KV heads (GQA 4)
    starts = torch.tensor([10, 30])              # requests with different histories
    want = dense_causal(q, k, v, starts, 0.25)   # on CPU: the einsum reference
    got = _dense_causal_sdpa(q, k, v, starts, 0.25)
    assert got.shape == (2, 5, 8, 16)
    assert torch.allclose(got, want, atol=1e-5)
