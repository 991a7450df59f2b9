"""sparse_decode: kernel == reference on random selections; full selection == SDPA."""
import pytest
import torch
import torch.nn.functional as F

from specontext_compiler.runtime.kernels import sparse_decode as sd
from tests.conftest import TOLERANCE


def _random_idx(batch, groups, width, n_rows, pad):
    """Ascending distinct rows per group, the last `pad` entries -1 (as select() returns)."""
    idx = torch.stack([torch.stack([torch.randperm(n_rows)[:width].sort().values
                                    for _ in range(groups)]) for _ in range(batch)])
    if pad:
        idx[..., width - pad:] = -1
    return idx.to(torch.int32)


def _inputs(batch, heads, kv_heads, n_rows, dim, dim_v, dtype):
    q = torch.randn(batch, heads, dim).to(dtype)
    k = torch.randn(batch + 1, kv_heads, n_rows, dim).to(dtype)[:batch]   # a view over slots
    v = torch.randn(batch + 1, kv_heads, n_rows, dim_v).to(dtype)[:batch]
    k_new = torch.randn(batch, kv_heads, dim).to(dtype)
    v_new = torch.randn(batch, kv_heads, dim_v).to(dtype)
    return q, k, v, k_new, v_new


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,shared", [(8, 2, False), (8, 2, True), (3, 3, False), (4, 1, True)])
def test_kernel_matches_reference(dtype, heads, kv_heads, shared):
    batch, n_rows, width, dim, dim_v = 2, 37, 21, 20, 12
    q, k, v, k_new, v_new = _inputs(batch, heads, kv_heads, n_rows, dim, dim_v, dtype)
    idx = _random_idx(batch, 1 if shared else kv_heads, width, n_rows, pad=5)
    scaling = dim ** -0.5
    expected = sd.sparse_decode_reference(q, k, v, idx, k_new, v_new, scaling)
    got = sd.sparse_decode(q, k, v, idx, k_new, v_new, scaling)
    atol, rtol = TOLERANCE[str(dtype).removeprefix("torch.")]
    assert got.dtype == dtype and got.shape == (batch, heads, dim_v)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


def test_all_padding_attends_only_new_token():
    q, k, v, k_new, v_new = _inputs(1, 4, 2, 9, 8, 8, torch.float32)
    idx = torch.full((1, 2, 6), -1, dtype=torch.int32)
    got = sd.sparse_decode(q, k, v, idx, k_new, v_new, 0.3)
    torch.testing.assert_close(got, v_new.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_full_selection_equals_sdpa(heads, kv_heads):
    batch, n_rows, dim = 2, 30, 16
    q, k, v, k_new, v_new = _inputs(batch, heads, kv_heads, n_rows, dim, dim, torch.float32)
    idx = torch.arange(n_rows, dtype=torch.int32).expand(batch, kv_heads, n_rows).contiguous()
    got = sd.sparse_decode(q, k, v, idx, k_new, v_new, dim ** -0.5)
    k_all = torch.cat([k, k_new.unsqueeze(2)], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    v_all = torch.cat([v, v_new.unsqueeze(2)], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    expected = F.scaled_dot_product_attention(q.unsqueeze(2), k_all, v_all).squeeze(2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd.sparse_decode_reference(q, k, v, idx, k_new, v_new, dim ** -0.5),
                               expected, atol=1e-5, rtol=1e-5)


def test_bytes_counts_selected_rows():
    q, k, v, _, _ = _inputs(1, 4, 2, 9, 8, 8, torch.float16)
    idx = torch.zeros(1, 2, 5, dtype=torch.int32)
    assert sd.sparse_decode_bytes(q, k, v, idx) == 2 * 5 * 16 * 2 + 40 + 2 * 32 * 2
