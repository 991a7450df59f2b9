"""The self-prefix head: N = 0 is the layer-0 head, the prefix is the LLM's first N layers, its cache steps."""
import pytest
import torch

from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.eval.methods import Budget
from specontext_compiler.eval.passkey import sparse_generate
from specontext_compiler.eval.prefix_head import PrefixHead, make_head


def _hf_hidden_entering(model, ids, layer):
    """The hidden state HF's own forward feeds into decoder layer `layer` (a pre-hook grabs it)."""
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["x"] = args[0] if args else kwargs["hidden_states"]

    hook = model.model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return grabbed["x"]


def test_prefix_zero_is_the_layer_zero_head(tiny_llama):
    ids = torch.randint(0, 97, (1, 11))
    pos = torch.arange(11)[None]
    prefix = PrefixHead(tiny_llama, 0)
    plain, _ = extract_retrieval_head("self:0", tiny_llama)
    for got, want in zip(prefix.project(ids, pos), plain.project(ids, pos)):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert prefix.param_report()["params"] == plain.param_count(include_embedding=False)


def test_prefix_equals_the_models_first_layers_and_projects_layer_n(tiny_llama):
    ids = torch.randint(0, 97, (1, 13))
    pos = torch.arange(13)[None]
    prefix = PrefixHead(tiny_llama, 1)
    hidden = prefix.hidden(ids, pos)
    assert torch.allclose(hidden, _hf_hidden_entering(tiny_llama, ids, 1), atol=1e-5)
    q, k = prefix.project(ids, pos)
    assert q.shape == (1, 4, 13, 8) and k.shape == (1, 2, 13, 8)
    # Layer 1's post-RoPE k from the dense forward is what the head's k must be.
    keys = {}
    from specontext_compiler.eval import sparse_attention
    with torch.no_grad(), sparse_attention.active(capture=lambda layer, qq, kk: keys.setdefault(layer, kk)):
        tiny_llama(input_ids=ids, use_cache=False)
    assert torch.allclose(k, keys[1], atol=1e-5)
    report = prefix.param_report()
    layer0 = sum(p.numel() for p in tiny_llama.model.layers[0].parameters())
    assert report["params"] == layer0 + 32 + 32 * 32 + 16 * 32 and 0 < report["reduction"] < 1


def test_prefix_cache_steps_and_restarts_like_one_pass(tiny_llama):
    ids = torch.randint(0, 97, (1, 12))
    prefix = PrefixHead(tiny_llama, 1)
    _, k_all = prefix.project(ids, torch.arange(12)[None])
    prefix.project(ids[:, :10], torch.arange(10)[None])
    for restart in range(2):          # the second pass crops back to 10 first
        steps = [prefix.project(ids[:, t:t + 1], torch.tensor([[t]]))[1] for t in (10, 11)]
        assert torch.allclose(torch.cat(steps, 2), k_all[:, :, 10:], atol=1e-5), restart


def test_prefix_head_drives_sparse_decode_and_bad_depth_is_refused(tiny_llama):
    from transformers import DynamicCache
    head = make_head(tiny_llama, "self-prefix:1")
    context = torch.randint(0, 97, (1, 40))
    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(input_ids=context, past_key_values=cache, use_cache=True)
    _, head_k = head.project(context, torch.arange(40)[None])
    out = sparse_generate(tiny_llama, head, cache, 40, [3, 4], method="spec-head",
                          limit=Budget(budget=8, sink=1, recent=4), head_k=head_k, max_new_tokens=3,
                          generator=torch.Generator())
    assert len(out) == 3 and head.cache.length() == 40 + 2 + 2
    with pytest.raises(ValueError, match="layers"):
        PrefixHead(tiny_llama, 2)
