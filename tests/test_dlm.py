"""Retrieval-head extraction: self heads, HF directories, EAGLE-3 shape, geometry refusal, counts."""
import json

import pytest
import torch
from safetensors.torch import save_file

from specontext_compiler.dlm import extract_retrieval_head, llm_geometry
from specontext_compiler.errors import ModelError


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _hf_qk(model, ids, layer):
    """Layer `layer`'s post-RoPE q, k as HF computes them, fed the embedding (exact for layer 0)."""
    attn = model.model.layers[layer].self_attn
    x = model.model.layers[layer].input_layernorm(model.model.embed_tokens(ids))
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = model.model.rotary_emb(x, pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q = attn.q_proj(x).view(1, -1, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, 2, 8).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def test_self_head_matches_the_llm_layer_and_counts(llama):
    head, report = extract_retrieval_head("self:1", llama)
    ids = torch.randint(0, 64, (1, 9))
    q, k = head.project(ids, torch.arange(9)[None])
    ref_q, ref_k = _hf_qk(llama, ids, 1)
    assert torch.allclose(q, ref_q, atol=1e-5) and torch.allclose(k, ref_k, atol=1e-5)
    kept = 32 + 32 * 32 + 16 * 32
    assert report["head_params"] == kept and report["embedding_shared"]
    assert report["head_params_with_embedding"] == kept + 64 * 32
    total = sum(p.numel() for p in llama.parameters())
    assert report["dlm_params"] == total and report["reduction"] == pytest.approx(1 - kept / total)
    assert report["selection_groups"] == 2 and head.selection_kv_heads == 2


def test_directory_is_read_lazily_and_same_as_in_memory(llama, tmp_path):
    llama.save_pretrained(tmp_path / "llm")
    from_dir, rep_dir = extract_retrieval_head(tmp_path / "llm", llama.config, layer=2, llm=tmp_path / "llm")
    from_mem, _ = extract_retrieval_head(llama, llama.config, layer=2)
    assert torch.equal(from_dir.q_weight, from_mem.q_weight) and rep_dir["format"] == "hf-directory"
    assert rep_dir["kind"] == "draft model" and rep_dir["recall_note"] == "not measured"
    assert torch.equal(from_dir.embedding, llama.model.embed_tokens.weight.detach())


def test_eagle3_directory_keeps_the_embedding_half(llama, tmp_path):
    hidden, directory = 32, tmp_path / "eagle3"
    directory.mkdir()
    tensors = {"midlayer.self_attn.q_proj.weight": torch.randn(32, 2 * hidden),
               "midlayer.self_attn.k_proj.weight": torch.randn(16, 2 * hidden),
               "midlayer.self_attn.v_proj.weight": torch.randn(16, 2 * hidden),
               "midlayer.input_layernorm.weight": torch.rand(hidden), "midlayer.hidden_norm.weight": torch.rand(hidden),
               "fc.weight": torch.randn(hidden, 3 * hidden), "lm_head.weight": torch.randn(64, hidden)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": hidden, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 32}))
    head, report = extract_retrieval_head(directory, llama, extend_to=128)
    assert report["format"] == "eagle3-embedding-half" and report["embedding_shared"]
    assert torch.equal(head.q_weight, tensors["midlayer.self_attn.q_proj.weight"][:, :hidden])
    assert head.rope["rope_type"] == "yarn" and head.rope["factor"] == 4.0
    assert report["dlm_params"] == sum(t.numel() for t in tensors.values())
    q, k = head.project(torch.randint(0, 64, (1, 5)), torch.arange(5)[None] + 100)
    assert q.shape == (1, 4, 5, 8) and torch.isfinite(k).all()


def test_head_count_mismatch_is_refused_for_head_level_only(llama):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ModelError, match="1 KV heads .*2 KV-head groups.*--level batch"):
        extract_retrieval_head(other, llama)
    head, report = extract_retrieval_head(other, llama, level="batch")
    assert report["level"] == "batch" and report["selection_groups"] == 1 and head.num_heads == 2


def test_geometry_kinds_and_bad_sources(llama):
    assert llm_geometry({"num_attention_heads": 8, "num_key_value_heads": 1})["kind"] == "mqa"
    assert llm_geometry({"num_attention_heads": 8, "kv_lora_rank": 512})["kind"] == "mla"
    with pytest.raises(ModelError, match="weights"):
        extract_retrieval_head("self", llama.config)
    with pytest.raises(ModelError):
        extract_retrieval_head("/nonexistent/dlm", llama)


def test_head_file_keeps_a_fused_head_and_its_geometry(llama, tmp_path, make_fused_head):
    saved = make_fused_head(llama.config, (0, 2))
    path = saved.save(tmp_path / "fused.safetensors")
    head, report = extract_retrieval_head(str(path), llama)
    assert head.fused and head.feature_layers == (0, 2)
    assert torch.equal(head.fc_weight, saved.fc_weight) and torch.equal(head.k_weight, saved.k_weight)
    # the shared embedding comes from the LLM's weights
    assert torch.equal(head.embedding, llama.model.embed_tokens.weight.detach())
    assert report["format"] == "head-file" and report["kind"] == "distilled"
    assert report["feature_layers"] == [0, 2]
    assert report["head_params"] == saved.param_count() and report["dlm_params"] is None
    assert report["reduction"] is None and report["selection_groups"] == 2


def test_head_file_for_another_model_is_refused(llama, tmp_path, make_fused_head):
    from transformers import LlamaConfig
    wider = LlamaConfig(vocab_size=64, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=3, max_position_embeddings=128)
    path = make_fused_head(wider, (1,)).save(tmp_path / "wide.safetensors")
    with pytest.raises(ModelError, match="hidden_size 48, the LLM 32"):
        extract_retrieval_head(str(path), llama.config)
    deep = make_fused_head(llama.config, (1, 5)).save(tmp_path / "deep.safetensors")
    with pytest.raises(ModelError, match=r"layers \[5\].*0..2"):
        extract_retrieval_head(str(deep), llama.config)
