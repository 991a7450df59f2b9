"""Sliding-window layers (Gemma-3 style) keep their window: a tiny random Gemma-3 on CPU.

Layers 0 and 1 see the last 8 tokens, layer 2 everything: the plan leaves 0 and 1 dense (no
selection), the runtime masks them to their window, so decoding matches Hugging Face's.
"""
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from specontext_compiler import compile_model, load_plan
from specontext_compiler.runtime import attention

WINDOW = 8


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    torch.manual_seed(3)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256, query_pre_attn_scalar=16)
    model = Gemma3ForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("gemma") / "tiny-gemma3"
    model.save_pretrained(directory)
    return directory


def test_window_layers_stay_dense_and_decoding_matches_hf(gemma_dir, tmp_path):
    plan = compile_model(str(gemma_dir), target="h100", max_len=64, budget=64, recent_tokens=4, out=tmp_path / "p")
    assert plan.model.layer_windows == [WINDOW, WINDOW, 0]
    assert plan.graph.op_counts["specontext.sparse_attention.default"] == 1
    assert plan.graph.op_counts["specontext.attention.default"] == 2
    model = Gemma3ForCausalLM.from_pretrained(gemma_dir).eval()
    engine = load_plan(tmp_path / "p").bind(model, device="cpu")
    prompt = torch.randint(3, 256, (21,)).tolist()              # longer than the window
    ours = engine.generate([prompt], max_new_tokens=6, stop_at_eos=False)[0].token_ids
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                min_new_tokens=6)[0, 21:].tolist()
    assert ours == theirs


def test_dense_causal_window_sees_only_the_last_keys():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 12, 4), torch.randn(1, 1, 12, 4)
    starts = torch.tensor([7])                                  # queries at positions 7..11
    out = attention.dense_causal(q, k, v, starts, 0.5, window=3)
    for t, position in enumerate(range(7, 12)):
        keys = slice(position - 2, position + 1)               # (p - 3, p]
        weights = (q[0, :, t] @ k[0, 0, keys].T * 0.5).softmax(-1)
        torch.testing.assert_close(out[0, t], weights @ v[0, 0, keys])


def test_self_head_of_a_gemma_layer_is_its_q_k(gemma_dir):
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    from specontext_compiler.dlm import extract_retrieval_head
    model = Gemma3ForCausalLM.from_pretrained(gemma_dir).eval()
    for layer_index, kind in ((0, "sliding_attention"), (2, "full_attention")):
        head, _ = extract_retrieval_head(f"self:{layer_index}", model.config, llm=model)
        ids, positions = torch.randint(3, 256, (1, 10)), torch.arange(10)[None]
        layer = model.model.layers[layer_index]
        with torch.no_grad():
            x = layer.input_layernorm(model.model.embed_tokens(ids))
            attn = layer.self_attn
            q = attn.q_norm(attn.q_proj(x).view(1, 10, 2, 16)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(1, 10, 1, 16)).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, positions, layer_type=kind)
            ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
            got_q, got_k = head.project(ids, positions)
        torch.testing.assert_close(got_q, ref_q, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_k, ref_k, atol=1e-5, rtol=1e-4)
