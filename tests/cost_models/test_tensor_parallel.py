"""Tensor-parallel arithmetic and checks: per-rank shares add up to the whole, the all-reduce, the errors."""
from dataclasses import replace

import pytest

from specontext_compiler.cost_models import latency, memory, tensor_parallel as tp
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import load_target
from specontext_compiler.cost_models.tensor_parallel_plan import (check_gpus, plan_record, rank_view,
                                                                  smallest_gpus_that_fit)
from specontext_compiler.cost_models.workload import RetrievalHead, Workload
from specontext_compiler.errors import InfeasiblePlanError

GPUS = (1, 2, 4, 8)


def llama31_70b() -> ModelSpec:
    return ModelSpec(name="llama-3.1-70b", architecture="LlamaForCausalLM", num_layers=80, hidden_size=8192,
                     intermediate_size=28672, vocab_size=128256, num_heads=64, num_kv_heads=8, head_dim=128,
                     attention_kind="gqa", kv_elems_per_token=2 * 8 * 128, max_positions=131072,
                     param_count=70553706496)


def workload(gpus: int, batch: int = 1, **kw) -> Workload:
    return Workload(max_len=131072, prompt_len=8192, batch=batch, gpus=gpus, **kw)


@pytest.mark.parametrize("gpus", GPUS)
def test_per_rank_weights_and_kv_add_up_to_the_whole(llama, gpus):
    rank = tp.rank_spec(llama, gpus)
    replicated = tp.replicated_params(llama) * llama.dtype_bytes
    assert memory.weight_bytes(rank) * gpus == memory.weight_bytes(llama) + (gpus - 1) * replicated
    w = workload(gpus)
    S, L = 131072, llama.num_layers
    assert memory.resident_kv_bytes(rank, w, L, S) * gpus == memory.resident_kv_bytes(llama, w, L, S)
    assert memory.host_bytes(rank, w, L, S) * gpus == memory.host_bytes(llama, w, L, S)
    assert memory.budget_buffer_bytes(rank, w, L) * gpus == memory.budget_buffer_bytes(llama, w, L)
    assert rank.num_heads * gpus == llama.num_heads and rank.intermediate_size * gpus == llama.intermediate_size
    heads = tp.rank_kv_heads(llama.num_kv_heads, gpus)
    assert sorted(h for rank_heads in heads for h in rank_heads) == list(range(llama.num_kv_heads))


def test_replicated_params_are_embedding_lm_head_and_norms(llama):
    # Llama-3.1-8B: untied embedding and LM head (2·V·h), two norms per layer and the final norm
    expected = 2 * llama.vocab_size * llama.hidden_size + (2 * llama.num_layers + 1) * llama.hidden_size
    assert tp.replicated_params(llama) == expected


def test_kv_heads_replicate_when_gpus_exceed_them(tiny):   # tiny: 8 query heads, 2 KV heads
    assert tp.split_problem(tiny, 8) is None
    assert tp.kv_heads_per_rank(2, 8) == 1 and tp.kv_head_replicas(2, 8) == 4
    assert tp.rank_kv_heads(2, 8) == [[0]] * 4 + [[1]] * 4
    rank = tp.rank_spec(tiny, 8)
    w = workload(8)
    # each rank keeps one whole KV head: the machine holds every head 4 times
    assert memory.resident_kv_bytes(rank, w, 4, 1000) * 8 == 4 * memory.resident_kv_bytes(tiny, w, 4, 1000)


@pytest.mark.parametrize("gpus, words", [(3, "does not divide the 32 query heads"),
                                         (16, "at most 8")])
def test_bad_split_is_one_line_naming_the_smallest_gpus(llama, gpus, words):
    with pytest.raises(InfeasiblePlanError) as err:
        check_gpus(llama, workload(gpus), load_target("h200"), "head")
    text = str(err.value)
    assert "\n" not in text and words in text and "the smallest --gpus that fits is 1" in text


def test_too_little_memory_per_rank_names_the_smallest_gpus():
    big, h100 = llama31_70b(), load_target("h100")     # 141 GB of bf16 weights, 80 GB GPUs
    assert smallest_gpus_that_fit(big, workload(1), h100, "head") == 2
    with pytest.raises(InfeasiblePlanError) as err:
        check_gpus(big, workload(1), h100, "head")
    assert "\n" not in str(err.value) and "the smallest --gpus that fits is 2" in str(err.value)
    check_gpus(big, workload(2), h100, "head")      # fits: no error
    a100 = load_target("a100-40gb")
    assert smallest_gpus_that_fit(big, workload(1), a100, "head") == 8
    with pytest.raises(InfeasiblePlanError, match=r"--gpus 4: per rank, .*smallest --gpus that fits is 8"):
        check_gpus(big, workload(4), a100, "head")


def test_a_target_without_interconnect_figures_is_refused(llama):
    with pytest.raises(InfeasiblePlanError, match="no nvlink_gbps"):
        check_gpus(llama, workload(2), load_target("l40s"), "head")


def test_allreduce_is_ring_bytes_over_the_link_plus_latency():
    assert tp.allreduce_ms(1e9, 1, 450.0, 10.0) == 0.0
    assert tp.ring_allreduce_bytes(8192, 2) == 8192 and tp.ring_allreduce_bytes(8192, 8) == 14336
    # 2 ranks move the message once: 1 GB at 450 GB/s is 2.222 ms, plus 10 us
    assert tp.allreduce_ms(1e9, 2, 450.0, 10.0) == pytest.approx(1e3 / 450 + 0.010)


def test_allreduce_term_grows_with_gpus_and_is_in_every_layer(llama):
    h200 = load_target("h200")
    terms = [latency.layer_allreduce_ms(tp.rank_spec(llama, n), workload(n, batch=16), h200) for n in GPUS]
    assert terms[0] == 0.0 and all(a < b for a, b in zip(terms, terms[1:]))
    for n, term in zip(GPUS, terms):
        view = rank_view(llama, workload(n, batch=16), "head")
        no_link = replace(view.workload, gpus=1)      # the same rank without its all-reduces
        with_ar = latency.step_components(view.spec, view.workload, h200, 65536).layer_ms
        without = latency.step_components(view.spec, no_link, h200, 65536).layer_ms
        assert with_ar - without == pytest.approx(term)


def test_pinnable_host_memory_is_shared_by_the_ranks():
    host = load_target("h200").host_memory_bytes
    assert memory.pinnable_host_bytes(host, 4) * 4 == pytest.approx(memory.pinnable_host_bytes(host))


def test_retrieval_head_split_per_kv_head_or_replicated(llama):
    head = RetrievalHead.eagle3_for(llama)
    split = tp.rank_head(head, 4, "head")
    assert (split.head_num_heads, split.head_num_kv_heads) == (8, 2)
    assert split.params * 4 == head.params
    assert tp.rank_head(head, 4, "batch") == head          # one shared set: every rank runs it whole
    odd = RetrievalHead(head_num_heads=14, head_num_kv_heads=2, head_dim=64, head_input_dim=1792)
    assert tp.rank_head(odd, 4, "head") == odd             # 4 does not divide its 14 query heads
    record = plan_record(llama, workload(4), load_target("h200"), "head", batch=1)
    assert record["retrieval_head"]["split"] == "per KV head"
    assert record["retrieval_head"]["rank_kv_heads"] == record["rank_kv_heads"]
    assert plan_record(llama, workload(1), load_target("h200"), "head", batch=1) is None
