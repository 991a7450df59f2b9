"""mla_sparse_decode: absorbed-form kernel == explicit up-projection of the gathered latents."""
import pytest
import torch

from specontext_compiler.runtime.kernels import mla_sparse_decode as mla
from tests.conftest import TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    batch, heads, seq, width = 2, 3, 29, 11
    dn, dr, dv, latent = 12, 6, 10, 20
    q_nope = torch.randn(batch, heads, dn).to(dtype)
    q_rope = torch.randn(batch, heads, dr).to(dtype)
    c = torch.randn(batch, seq, latent).to(dtype)
    kr = torch.randn(batch, seq, dr).to(dtype)
    w_uk = (torch.randn(heads, dn, latent) / latent ** 0.5).to(dtype)
    w_uv = (torch.randn(heads, dv, latent) / latent ** 0.5).to(dtype)
    idx = torch.stack([torch.stack([torch.randperm(seq)[:width].sort().values for _ in range(heads)])
                       for _ in range(batch)]).to(torch.int32)
    idx[:, :, -3:] = -1
    scaling = (dn + dr) ** -0.5
    expected = mla.mla_sparse_decode_reference(q_nope, q_rope, c, kr, idx, w_uk, w_uv, scaling)
    got = mla.mla_sparse_decode(q_nope, q_rope, c, kr, idx, w_uk, w_uv, scaling)
    atol, rtol = TOLERANCE[str(dtype).removeprefix("torch.")]
    assert got.shape == (batch, heads, dv) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)
    assert mla.mla_sparse_decode_bytes(c, kr, idx, w_uk, w_uv) > idx.numel() * (latent + dr)
