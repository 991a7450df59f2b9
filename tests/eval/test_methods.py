"""Each selection method: mask shape and size, and equal budgets reproduce full attention."""
import pytest
import torch

from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.eval.methods import METHODS, Budget, method_mask, quest_mask
from specontext_compiler.eval.passkey import sparse_generate


def _inputs(seq=64, hq=4, hkv=2, dim=8):
    return (torch.randn(1, hq, dim), torch.randn(1, hkv, seq, dim), torch.randn(1, hq, dim),
            torch.randn(1, hkv, seq, dim))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_mask_keeps_exactly_the_width(tiny_llama, method):
    head, _ = extract_retrieval_head("self:0", tiny_llama)
    q, k, hq, hk = _inputs(hq=head.num_heads, hkv=head.num_kv_heads, dim=head.head_dim)
    limit = Budget(budget=16, sink=1, recent=4)
    mask = method_mask(method, limit, query=q, keys=k, head_q=hq, head_k=hk, head=head,
                       generator=torch.Generator().manual_seed(0))
    groups = {"spec-head": 2, "quest": 2}.get(method, 1)
    assert mask.shape == (1, groups, 64) and mask.dtype == torch.bool
    if method == "quest":       # whole pages, as many as fit in the width
        assert (mask.sum(-1) == limit.width // limit.page_size * limit.page_size).all()
    else:
        assert (mask.sum(-1) == limit.width).all()
    if method != "quest":
        assert mask[..., 0].all(), "the sink is always kept"


def test_budget_covering_the_context_is_dense():
    q, k, hq, hk = _inputs(seq=20)
    for method in METHODS:
        assert method_mask(method, Budget(budget=32), query=q, keys=k, head_q=hq, head_k=hk, head=None,
                           generator=torch.Generator()) is None


def test_quest_prefers_the_page_with_the_matching_key():
    keys = torch.randn(1, 1, 64, 8) * 0.1
    query = torch.randn(1, 2, 8)
    keys[0, 0, 37] = query[0, 0] * 10                       # page 2 (positions 32..47) holds it
    mask = quest_mask(query, keys, width=16, page_size=16)
    assert mask[0, 0, 32:48].all() and mask.sum() == 16


@pytest.mark.parametrize("method", METHODS)
def test_full_budget_decode_matches_dense_generation(tiny_llama, method):
    from transformers import DynamicCache
    from specontext_compiler.eval import sparse_attention
    head, _ = extract_retrieval_head("self:0", tiny_llama)
    context = torch.randint(0, 97, (1, 30))
    sparse_attention.install(tiny_llama)
    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad(), sparse_attention.active():
        tiny_llama(input_ids=context, past_key_values=cache, use_cache=True)
    _, head_k = head.project(context, torch.arange(30)[None])
    out = sparse_generate(tiny_llama, head, cache, 30, [5, 6], method=method, limit=Budget(64),
                          head_k=head_k, max_new_tokens=4, generator=torch.Generator())
    full = torch.cat([context, torch.tensor([[5, 6]])], 1)
    with torch.no_grad():
        tiny_llama.set_attn_implementation("eager")
        reference = tiny_llama.generate(full, max_new_tokens=4, do_sample=False)[0, 32:].tolist()
        tiny_llama.set_attn_implementation(sparse_attention.ATTN_NAME)
    assert out == reference
