"""A separate draft model as the DLM: its own embedding, width, heads and layers, one vocabulary.

The LLM has 12 query / 2 KV heads, the draft 14 query / 2 KV heads (the shapes of a real 1.5B /
0.5B pair): selection maps the draft's KV heads onto the LLM's, so both compile and serve.
"""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

from specontext_compiler import cli, compile_model, load_plan
from specontext_compiler.errors import ModelError
from specontext_compiler.runtime import selection
from specontext_compiler.runtime.retrieval_head import RetrievalHead

VOCAB, BUDGET, SINKS, RECENT = 256, 8, 1, 4


def _llama(hidden, heads, kv_heads, layers, vocab=VOCAB):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(LLM directory, draft directory): 96 wide, 12/2 heads, 3 layers; 56 wide, 14/2 heads, 2 layers."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(1)
    _llama(96, 12, 2, 3).save_pretrained(root / "llm")
    _llama(56, 14, 2, 2).save_pretrained(root / "draft")
    return root / "llm", root / "draft"


def _compile(llm, out, **options):
    return compile_model(str(llm), target="h100", max_len=256, budget=BUDGET, sink_tokens=SINKS,
                         recent_tokens=RECENT, out=out, **options)


def _draft_qk(draft_dir, ids):
    """The draft's layer-0 post-RoPE q, k as Hugging Face computes them (its own embedding)."""
    draft = LlamaForCausalLM.from_pretrained(draft_dir).eval()
    attn, layer = draft.model.layers[0].self_attn, draft.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(draft.model.embed_tokens(ids))
        cos, sin = draft.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
        q = attn.q_proj(x).view(1, -1, 14, 4).transpose(1, 2)
        k = attn.k_proj(x).view(1, -1, 2, 4).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_draft_with_other_width_and_head_count_compiles_binds_and_selects(pair, tmp_path):
    llm_dir, draft_dir = pair
    plan = _compile(llm_dir, tmp_path / "plan", dlm=str(draft_dir))
    info = plan.retrieval_head.to_dict()
    assert info["kind"] == "draft model" and info["source"] == str(draft_dir)
    assert info["selection_groups"] == 2 and not info["embedding_shared"]
    stored = RetrievalHead.load(tmp_path / "plan" / info["file"])
    assert (stored.hidden_size, stored.num_heads, stored.num_kv_heads) == (56, 14, 2)

    engine = load_plan(tmp_path / "plan").bind(LlamaForCausalLM.from_pretrained(llm_dir).eval(), device="cpu")
    prompt = torch.randint(3, VOCAB, (40,)).tolist()
    tokens = engine.generate([prompt], max_new_tokens=5, stop_at_eos=False)[0].token_ids
    assert len(tokens) == 5 and all(0 <= t < VOCAB for t in tokens)
    # the last decode step's selection is the draft's own: its q over its K of every earlier token
    ids = torch.tensor([prompt + tokens[:-1]])
    q, k = _draft_qk(draft_dir, ids)
    scores = selection.attention_weights(q[:, :, -1], k[:, :, :-1], 4 ** -0.5)
    expected = selection.select_tokens(scores, 2, BUDGET, sink_tokens=SINKS, recent_tokens=RECENT)
    assert torch.equal(engine.ctx.last_indices.long(), expected)


def test_unmappable_groups_are_refused_from_the_config_before_any_weight(pair, tmp_path):
    llm_dir, _ = pair
    draft = tmp_path / "three-kv"
    draft.mkdir()       # a config and no weights: the refusal must come before any load
    config = _llama(48, 6, 3, 1).config
    (draft / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ModelError, match=r"3 KV heads \(6 query heads\).*2 KV-head groups.*--level batch"):
        _compile(llm_dir, tmp_path / "p", dlm=str(draft))
    result = CliRunner().invoke(cli.app, ["compile", str(llm_dir), "--max-len", "256", "--dlm", str(draft),
                                          "-o", str(tmp_path / "p")], env={"SPECONTEXT_DEBUG": None})
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--level batch" in lines[0]
    assert not (tmp_path / "p").exists()


def test_unmappable_groups_work_at_batch_level(pair, tmp_path):
    llm_dir, _ = pair
    _llama(48, 6, 3, 1).save_pretrained(tmp_path / "three-kv")
    plan = _compile(llm_dir, tmp_path / "p", dlm=str(tmp_path / "three-kv"), level="batch")
    assert plan.workload.level == "batch" and plan.retrieval_head.facts["selection_groups"] == 1
    engine = load_plan(tmp_path / "p").bind(LlamaForCausalLM.from_pretrained(llm_dir).eval(), device="cpu")
    assert len(engine.generate([list(range(3, 40))], max_new_tokens=3, stop_at_eos=False)[0].token_ids) == 3
    assert engine.ctx.last_indices.shape[1] == 1


def test_another_vocabulary_is_refused_before_any_weight(pair, tmp_path):
    llm_dir, _ = pair
    draft = tmp_path / "small-vocab"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps(_llama(56, 14, 2, 1, vocab=128).config.to_dict()))
    with pytest.raises(ModelError, match="vocabulary has 128 tokens, the LLM's 256"):
        _compile(llm_dir, tmp_path / "p", dlm=str(draft))
