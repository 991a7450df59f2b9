"""Dense causal prefill attention: the CPU reference against the GPU's SDPA paths."""
import pytest
import torch

from specontext_compiler.runtime.attention import causal_sdpa, dense_causal


def _inputs(start, steps, device):
    gen = torch.Generator().manual_seed(start + steps)
    q = torch.randn(2, 8, steps, 16, generator=gen)
    k = torch.randn(2, 2, start + steps + 5, 16, generator=gen)     # cache longer than the chunk's end
    v = torch.randn(2, 2, start + steps + 5, 16, generator=gen)
    return q.to(device), k.to(device), v.to(device)


def test_a_chunk_attends_to_its_history_and_itself_causally():
    q, k, v = _inputs(0, 6, "cpu")
    first = dense_causal(q[:, :, :3], k, v, [0, 0], 0.25)
    whole = dense_causal(q, k, v, [0, 0], 0.25)
    later = dense_causal(q[:, :, 3:], k, v, [3, 3], 0.25)          # the same rows, cached history
    torch.testing.assert_close(torch.cat([first, later], dim=1), whole)


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 7])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])   # bf16: flash
def test_sdpa_matches_the_reference(start, dtype, tol):
    q, k, v = _inputs(start, 9, "cpu")
    expected = dense_causal(q, k, v, [start, start], 0.25)
    got = dense_causal(*(t.to("cuda", dtype) for t in (q, k, v)), [start, start], 0.25).float().cpu()
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])   # bf16: lower-right bias
@pytest.mark.parametrize("starts,window", [([0, 0], 0), ([7, 7], 0), ([0, 7], 0), ([7, 7], 4)])
def test_the_fused_sdpa_path_matches_the_reference_on_cpu(starts, window, dtype, tol):
    """The GPU's code path (first chunk causal, later chunk lower-right causal, windows masked), run
    by PyTorch's CPU SDPA: the same outputs as the reference's explicit masks."""
    q, k, v = _inputs(7, 9, "cpu")
    expected = dense_causal(q, k, v, starts, 0.25, window)
    got = causal_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), starts, 0.25, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
