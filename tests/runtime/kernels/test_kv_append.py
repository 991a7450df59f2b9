"""kv_append: the Triton kernel writes the same rows as the reference (interpreter on CPU)."""
import pytest
import torch

from specontext_compiler.runtime.kernels import kv_append as ka


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 5])
def test_append_matches_reference(dtype, steps):
    batch, heads, seq_max, dim, dim_v = 3, 2, 19, 24, 16
    cache_k = torch.randn(batch + 1, heads, seq_max, dim).to(dtype)
    cache_v = torch.randn(batch + 1, heads, seq_max, dim_v).to(dtype)
    k_new = torch.randn(batch, heads, steps, dim).to(dtype)
    v_new = torch.randn(batch, heads, steps, dim_v).to(dtype)
    start = torch.tensor([0, 7, seq_max - 2], dtype=torch.int32)   # the last one overflows S_max
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ka.kv_append_reference(ref_k[:batch], ref_v[:batch], k_new, v_new, start)
    ka.kv_append(cache_k[:batch], cache_v[:batch], k_new, v_new, start)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)
    assert torch.equal(cache_k[1, :, 7:7 + steps], k_new[1])


def test_append_k_only_int64_start():
    cache = torch.randn(2, 3, 11, 8)
    k_new = torch.randn(2, 3, 1, 8)
    start = torch.tensor([4, 10], dtype=torch.int64)
    ref = cache.clone()
    ka.kv_append_reference(ref, None, k_new, None, start)
    ka.kv_append(cache, None, k_new, None, start)
    assert torch.equal(cache, ref)
    assert ka.kv_append_bytes(k_new) == 2 * k_new.numel() * 4
