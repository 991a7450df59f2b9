"""@triton.jit helpers shared by the kernels: which (request, head) a program serves, and its queries.

Every attention-like kernel here runs one program per (request, head) pair on grid axis 0; these
helpers keep that convention in one place. Offsets are int64 because a 128k-token cache of a batch
overflows int32 pointer arithmetic.
"""
import triton
import triton.language as tl


@triton.jit
def request_and_head(pid, num_heads):
    """(b, h) as int64 for program `pid` of a [batch * num_heads] grid axis."""
    return (pid // num_heads).to(tl.int64), (pid % num_heads).to(tl.int64)


@triton.jit
def load_query_group(q_ptr, b, h, q_sb, q_sh, GROUP: tl.constexpr, D: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_G, BLOCK_D] query rows of KV head h's group (query heads h*GROUP .. h*GROUP+GROUP-1),
    zero-padded: one read of a KV head serves its whole GQA group. Native dtype."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    return tl.load(q_ptr + b * q_sb + (h * GROUP + g)[:, None] * q_sh + d[None, :],
                   mask=(g[:, None] < GROUP) & (d[None, :] < D), other=0.0)
