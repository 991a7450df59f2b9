"""A DeepSeek-V2-style (MLA) model served by the runtime: the graph decompresses the latent per
head before attention, the KV store keeps each head's K (nope + rope) and V, and generation
matches Hugging Face's token for token on CPU."""
import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specontext_compiler import compile_model, load_plan
from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.errors import ModelMismatchError
from specontext_compiler.runtime.plan import Segment


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    """(model, plan, head): random tiny DeepSeek-V2, its plan (dense budget), a draft model's head."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "deepseek_v2", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("mla")
    model.save_pretrained(root / "tiny-dsv2")
    compile_model(str(root / "tiny-dsv2"), target="h100", max_len=512, budget=512, recent_tokens=0,
                  out=root / "plan")
    # An MLA model has no plain q/k projections to derive a head from: a draft model of its vocabulary.
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                                         max_position_embeddings=512)).eval()
    head, _ = extract_retrieval_head(draft, model)
    return model, load_plan(root / "plan"), head


def test_the_plan_is_for_mla_and_fixes_no_attention_kernel(mla):
    _, plan, _ = mla
    assert plan.model.attention_kind == "mla" and plan.model.v_head_dim == 16 and plan.model.head_dim == 24
    assert sorted(k.family for k in plan.kernels) == ["elastic_load", "kv_append", "retrieval_scores"]


@pytest.mark.parametrize("offload_from", [None, 24])
def test_generation_matches_hugging_face(mla, hf_greedy, offload_from):
    model, plan, head = mla
    if offload_from is not None:     # layer 1's KV moves to the host mid-generation
        plan = dataclasses.replace(plan, segments=[Segment(0, offload_from, [0, 1], [], {}),
                                                   Segment(offload_from, 512, [0], [1], {})])
    engine = plan.bind(model, dlm=head, device="cpu")
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 20)]
    results = engine.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(model, prompt, 10)
    assert engine.stats()["offloaded_layers"] == ([] if offload_from is None else [1])


def test_binding_without_a_head_names_the_fix(mla):
    model, plan, _ = mla
    with pytest.raises(ModelMismatchError, match="MLA model does not have; bind with dlm="):
        plan.bind(model, device="cpu")
