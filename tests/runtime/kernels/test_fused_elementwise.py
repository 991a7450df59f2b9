"""The fused graph's elementwise kernels (rms_norm, add_rms_norm, rotary, silu_mul) against their
PyTorch references: on the GPU compiled, on CPU through Triton's interpreter (small shapes).

float32 must agree to rounding of the reduction order; 16-bit types to about one unit in the last
place of the stored type (the interpreter's casts to bfloat16 truncate where torch rounds).
"""
import pytest
import torch

from specontext_compiler.runtime.kernels import rms_norm as rn
from specontext_compiler.runtime.kernels import rotary as ro
from specontext_compiler.runtime.kernels import silu_mul as sm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, rounded_to=None):
    """rounded_to: the narrowest type the computation rounds through (default: the output's)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
    atol, rtol = tol[rounded_to or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 96])          # a power of two, and one that needs a mask
def test_rms_norm_matches_reference(dtype, width):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, width) * 3).to(dtype)
    weight = (torch.randn(width) + 1).to(dtype)
    assert_close(rn.rms_norm(x, weight, 1e-5, dtype), rn.rms_norm_reference(x, weight, 1e-5, dtype))


def test_rms_norm_keeps_the_graphs_casts():
    """An fp32 weight with a bf16 cast: the product is fp32 of the bf16-rounded normalized value."""
    torch.manual_seed(1)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    weight = torch.randn(32)
    out = rn.rms_norm(x, weight, 1e-6, torch.bfloat16)
    expected = rn.rms_norm_reference(x, weight, 1e-6, torch.bfloat16)
    assert out.dtype == torch.float32 == expected.dtype
    assert_close(out, expected, rounded_to=torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_the_sum_and_its_norm(dtype):
    torch.manual_seed(2)
    a, b = (torch.randn(5, 1, 48).to(dtype) for _ in range(2))
    weight = torch.randn(48).to(dtype)
    total, normed = rn.add_rms_norm(a, b, weight, 1e-5, dtype)
    ref_total, ref_normed = rn.add_rms_norm_reference(a, b, weight, 1e-5, dtype)
    assert_close(total, ref_total)
    assert_close(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [1, 3])
def test_rotary_matches_reference_on_transposed_views(dtype, steps):
    torch.manual_seed(3)
    batch, heads, dim = 2, 3, 16
    # as in the graph: a projection [B, T, H*D] viewed as [B, T, H, D] and transposed to [B, H, T, D]
    x = torch.randn(batch, steps, heads * dim).to(dtype).view(batch, steps, heads, dim).transpose(1, 2)
    angles = torch.randn(batch, steps, dim)
    cos, sin = angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)
    out = ro.rotary(x, cos, sin)
    expected = ro.rotary_reference(x, cos, sin)
    assert out.stride() == x.stride()            # the layout the unfused elementwise ops give
    assert_close(out, expected)


def test_rotary_of_heads_not_a_power_of_two_with_shared_angles():
    torch.manual_seed(4)
    x = torch.randn(1, 5, 2, 8)
    angles = torch.randn(2, 8)                   # [T, D]: one set for every request and head
    assert_close(ro.rotary(x, angles.cos(), angles.sin()), ro.rotary_reference(x, angles.cos(), angles.sin()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(dtype):
    torch.manual_seed(5)
    gate, up = (torch.randn(3, 1, 700).mul(4).to(dtype) for _ in range(2))   # 2100: a partial last block
    assert_close(sm.silu_mul(gate, up), sm.silu_mul_reference(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [1, 3])
def test_silu_mul_reads_the_halves_of_a_merged_gate_up_in_place(dtype, steps):
    """As MergeProjections leaves them: gate and up are the two halves of one [B, T, 2I] output,
    views whose rows are 2I apart; the kernel reads them without a copy."""
    torch.manual_seed(6)
    width = 1100                                 # two blocks a row, the second one partial
    merged = torch.randn(2, steps, 2 * width).mul(4).to(dtype)
    gate, up = merged[..., :width], merged[..., width:]
    assert not gate.is_contiguous() and gate.stride()[-2:] == (2 * width, 1)
    for half in (gate, up):                      # what the kernel is handed: the same memory, strided rows
        rows = sm._rows(half, width)
        assert rows.data_ptr() == half.data_ptr() and rows.stride() == (2 * width, 1)
    out = sm.silu_mul(gate, up)
    assert out.is_contiguous()
    assert_close(out, sm.silu_mul_reference(gate, up))


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, 16)
    assert rn.rms_norm(x, torch.ones(16), 1e-5, torch.float32).shape == (0, 16)
    assert sm.silu_mul(x, x).shape == (0, 16)
