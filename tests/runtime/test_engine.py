"""The engine end to end on CPU: compile a plan for a tiny model, bind random weights, generate."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from specontext_compiler import compile_model, load_plan
from specontext_compiler.errors import ModelMismatchError, RequestError, RuntimeResourceError
from specontext_compiler.models import load_preset_config
from specontext_compiler.runtime.plan import Segment


@pytest.fixture(scope="module")
def dense_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "dense"
    compile_model("tiny-llama", target="h100", max_len=512, budget=512, recent_tokens=0, out=out)
    return load_plan(out)


def with_offload_at(plan, length, layers):
    """The same plan, but layers go to the host once the sequence reaches `length`."""
    num = plan.model.num_layers
    keep = [i for i in range(num) if i not in layers]
    plan = dataclasses.replace(plan, segments=[Segment(0, length, list(range(num)), [], {}),
                                               Segment(length, plan.workload.max_len, keep, list(layers), {})])
    plan.directory = plan.directory
    return plan


def test_dense_budget_matches_hf_greedy_token_for_token(tiny_model, hf_greedy, dense_plan):
    engine = dense_plan.bind(tiny_model, device="cpu")
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 23)]
    results = engine.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 12)


def _argmax_tokens(model, prompt: list[int], new_tokens: int) -> list[int]:
    """HF's forward, greedy, with no logits processor (HF's generate keeps the end-of-sequence token
    out until min_new_tokens; the engine with stop_at_eos=False does not)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_merged_projections_give_the_unmerged_plans_tokens(tiny_model, dense_plan, tmp_path):
    """dense_plan merges each layer's q/k/v and gate/up (MergeProjections); a --no-fuse plan keeps
    the captured linears: both generate HF's greedy tokens, exactly."""
    compile_model("tiny-llama", target="h100", max_len=512, budget=512, recent_tokens=0, out=tmp_path / "u",
                  fuse=False)
    unmerged = load_plan(tmp_path / "u")
    assert not [i for i in unmerged.graph.inputs if i["kind"] == "merged"]
    assert len([i for i in dense_plan.graph.inputs if i["kind"] == "merged"]) == 2 * 3
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 23)]
    tokens = [[r.token_ids for r in plan.bind(tiny_model, device="cpu").generate(prompts, max_new_tokens=12,
                                                                              stop_at_eos=False)]
              for plan in (dense_plan, unmerged)]
    assert tokens[0] == tokens[1] == [_argmax_tokens(tiny_model, p, 12) for p in prompts]


def _held_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind the tensors (shared ones counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_bind_holds_each_merged_weight_once(dense_plan):
    """plan.json names each merged input's parts; bind builds the merged tensor and re-points the
    parts' Parameters to its rows, so no weight is held twice (the plan's memory model counts the
    weights once) and the HF model object still computes with the same values."""
    data = json.loads((dense_plan.directory / "plan.json").read_text())
    weights = [i for i in data["graph"]["inputs"] if i["kind"] != "user_input"]
    merged = [(n, i) for n, i in enumerate(weights) if i["kind"] == "merged"]
    assert merged[0][1] == {"placeholder": "p_model_layers_0_self_attn_q_proj_k_proj_v_proj_weight",
                            "target": "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight", "kind": "merged",
                            "parts": [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"], "dim": 0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    held = _held_bytes(*model.parameters(), *model.buffers())
    engine = dense_plan.bind(model, device="cpu")
    named = dict(model.named_parameters())
    for index, spec in merged:
        tensor, start = engine.params[index], 0
        for name in spec["parts"]:
            part = named[name]
            assert part.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()   # a view of it
            assert torch.equal(part, values[name]) and torch.equal(tensor[start:start + part.shape[0]], part)
            start += part.shape[0]
        assert start == tensor.shape[0]
    assert _held_bytes(*model.parameters(), *model.buffers(), *engine.params) == held
    again = dense_plan.bind(model, device="cpu")            # a second bind reuses the merged tensors
    assert _held_bytes(*model.parameters(), *model.buffers(), *engine.params, *again.params) == held
    prompt = torch.randint(3, 256, (11,)).tolist()
    assert engine.generate([prompt], max_new_tokens=8, stop_at_eos=False)[0].token_ids \
        == _argmax_tokens(model, prompt, 8)


def test_layers_offloaded_mid_generation_still_match_hf(tiny_model, hf_greedy, dense_plan):
    plan = with_offload_at(dense_plan, 20, [1, 2])
    plan.directory = dense_plan.directory
    engine = plan.bind(tiny_model, device="cpu")
    prompt = torch.randint(3, 256, (15,)).tolist()
    result = engine.generate([prompt], max_new_tokens=12, stop_at_eos=False)[0]
    assert engine.ctx.store.offloaded_layers() == [1, 2]
    assert engine.memory.moves and all(length >= 15 for length, _ in engine.memory.moves)
    assert result.token_ids == hf_greedy(tiny_model, prompt, 12)
    stats = engine.stats()
    assert stats["rows_loaded"] > 0 and 0.0 <= stats["selection_overlap"] <= 1.0


@pytest.mark.slow
def test_sparse_budget_keeps_real_model_logits_close(tmp_path):
    """SmolLM2-135M on 1024 tokens of real text: budget 512 (+1 sink, +16 recent) vs dense.

    Stated bound: relative L2 error of the next-token logits under 0.2, same top-1 token
    (measured 0.13 with the self-derived layer-0 head; 0.37 at budget 128).
    """
    from specontext_compiler.eval.text import long_text_ids
    from specontext_compiler.smollm2 import load_causal_lm
    model, tokenizer, hf_dir = load_causal_lm(dtype=torch.float32)
    prompt = long_text_ids(tokenizer, 1024)
    compile_model(str(hf_dir), target="h100", max_len=2048, budget=512, recent_tokens=16, out=tmp_path / "s")
    engine = load_plan(tmp_path / "s").bind(model, device="cpu", tokenizer=tokenizer)
    result = engine.generate([prompt], max_new_tokens=3, stop_at_eos=False)[0]
    with torch.no_grad():
        dense = model(torch.tensor([prompt + result.token_ids[:-1]])).logits[0, -1]
    sparse = engine.last_logits[0, -1]
    assert torch.linalg.norm(sparse - dense) / torch.linalg.norm(dense) < 0.2
    assert int(sparse.argmax()) == int(dense.argmax())


def test_prompt_longer_than_max_len_is_refused_and_engine_stays_usable(tiny_model, dense_plan):
    engine = dense_plan.bind(tiny_model, device="cpu")
    with pytest.raises(RequestError, match="request 0: .*max-len is 512"):
        engine.generate([[5] * 600], max_new_tokens=4)
    assert len(engine.generate([[5, 6, 7]], max_new_tokens=3, stop_at_eos=False)[0].token_ids) == 3


def test_plan_for_another_model_names_the_mismatch(dense_plan):
    config = load_preset_config("tiny-llama")
    config.num_hidden_layers = 2
    other = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with pytest.raises(ModelMismatchError, match="num_layers=3, the model has 2"):
        dense_plan.bind(other, device="cpu")


def test_sampling_with_seed_is_reproducible_and_streams(tiny_model, dense_plan):
    engine = dense_plan.bind(tiny_model, device="cpu")
    seen = []
    first = engine.generate([[4, 5, 6]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3,
                            stop_at_eos=False, stream=lambda i, t: seen.append((i, t)))[0]
    second = engine.generate([[4, 5, 6]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3,
                             stop_at_eos=False)[0]
    assert first.token_ids == second.token_ids
    assert seen == [(0, t) for t in first.token_ids]


class _EosOnly:
    """A tokenizer stand-in: only an end-of-sequence id (and decode, which generate calls)."""

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_end_of_sequence_stops_each_request_at_its_own_token(tiny_model, dense_plan):
    """The decode loop launches a step before reading the last one's tokens; a request still ends
    at its first end-of-sequence token, the others run on, and the stream sees exactly the kept ones."""
    engine = dense_plan.bind(tiny_model, device="cpu")
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (7, 15)]
    free = engine.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    eos = free[0].token_ids[3]               # request 0's fourth token ends it
    engine.tokenizer = _EosOnly(eos)
    seen = []
    stopped = engine.generate(prompts, max_new_tokens=10, stream=lambda i, t: seen.append((i, t)))
    for before, after in zip(free, stopped):
        ends = [i for i, t in enumerate(before.token_ids) if t == eos]
        assert after.token_ids == before.token_ids[:ends[0] + 1 if ends else 10]
    assert len(stopped[0].token_ids) <= 4
    assert sorted(seen) == sorted((i, t) for i, r in enumerate(stopped) for t in r.token_ids)
    assert [t for i, t in seen if i == 1] == stopped[1].token_ids


def with_growth_at(plan, length):
    """The same plan, but every layer starts with room for `length` tokens and grows there."""
    num = plan.model.num_layers
    plan = dataclasses.replace(plan, segments=[Segment(0, length, list(range(num)), [], {}),
                                               Segment(length, plan.workload.max_len, list(range(num)), [], {})])
    return plan


def test_out_of_gpu_memory_in_a_grow_is_one_error_and_the_engine_serves_on(tiny_model, hf_greedy, dense_plan, monkeypatch):
    from specontext_compiler.runtime import kv_store
    plan = with_growth_at(dense_plan, 16)
    plan.directory = dense_plan.directory
    engine = plan.bind(tiny_model, device="cpu")
    prompt = torch.randint(3, 256, (12,)).tolist()
    real_regrown, calls = kv_store._regrown, []

    def v_runs_out(old, capacity, filled):    # K grows, then V's allocation fails
        calls.append(capacity)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.14 GiB")
        return real_regrown(old, capacity, filled)

    monkeypatch.setattr(kv_store, "_regrown", v_runs_out)
    with pytest.raises(RuntimeResourceError, match="growing layer 0's KV cache to 512 tokens for 1 request slots .* smaller --batch"):
        engine.generate([prompt], max_new_tokens=10, stop_at_eos=False)
    layer = engine.ctx.store.layers[0]
    assert (layer.k.shape[2], layer.v.shape[2], layer.capacity) == (512, 16, 16)   # usable as it was
    # The next request grows what is left (V of layer 0 alone, then the others) and matches HF.
    result = engine.generate([prompt], max_new_tokens=10, stop_at_eos=False)[0]
    assert result.token_ids == hf_greedy(tiny_model, prompt, 10)
    assert all(layer.capacity == 512 for layer in engine.ctx.store.layers)


@pytest.mark.gpu
def test_gpu_engine_with_cuda_graph_matches_hf_greedy(tiny_model, hf_greedy, dense_plan):
    """On the GPU: the captured step, the plan-less generic kernels (float32) and the decode loop
    that launches a step before reading the last one's tokens still give HF's greedy tokens."""
    import copy
    engine = dense_plan.bind(copy.deepcopy(tiny_model), device="cuda", dtype=torch.float32)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 23)]
    results = engine.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    assert engine.step.captures >= 1
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 12)      # HF on the CPU


def test_bind_refuses_a_batch_that_does_not_fit_and_names_the_largest_that_does(tiny_model, dense_plan, monkeypatch):
    from specontext_compiler.runtime import memory_check
    with pytest.raises(RuntimeResourceError, match=r"batch 100000000 needs .* the largest batch that fits is \d+"):
        dense_plan.bind(tiny_model, device="cpu", batch=100_000_000)     # refused before allocating
    per_slot = memory_check.slot_bytes(dense_plan, _spec(dense_plan), 513, 4, None, torch.float32)
    monkeypatch.setattr(memory_check, "_host_available_bytes",
                        lambda: 3.5 * (per_slot.device + per_slot.host) / (1 - memory_check.HOST_RESERVE_FRACTION))
    with pytest.raises(RuntimeResourceError, match="largest batch that fits is 3: bind with batch=3"):
        dense_plan.bind(tiny_model, device="cpu", batch=4)
    assert dense_plan.bind(tiny_model, device="cpu", batch=3).slots == 3


def _spec(plan):
    return plan.model          # a PlanModel is the plan's ModelSpec


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without a GPU")
def test_the_cpu_warning_names_the_callers_line(tiny_model, dense_plan):
    with pytest.warns(UserWarning, match="no CUDA GPU found") as caught:
        dense_plan.bind(tiny_model)
    assert [w.filename for w in caught if "no CUDA GPU" in str(w.message)] == [__file__]


def test_a_residency_grows_once_to_its_end_not_per_segment(tiny_model, dense_plan, monkeypatch):
    """Segments that keep the same layers resident differ only in length: the caches grow once, to
    where the residency ends (each grow copies every layer and recaptures the step), and a change
    of residency still grows to the next run's end."""
    from specontext_compiler.runtime import kv_store
    num, max_len = dense_plan.model.num_layers, dense_plan.workload.max_len
    keep = list(range(1, num))
    plan = dataclasses.replace(dense_plan, segments=[
        Segment(0, 16, list(range(num)), [], {}), Segment(16, 24, list(range(num)), [], {}),
        Segment(24, 32, list(range(num)), [], {}), Segment(32, max_len, keep, [0], {})])
    plan.directory = dense_plan.directory
    assert [plan.residency_end(n) for n in (1, 15, 16, 31, 32, max_len + 5)] == [32, 32, 32, 32, max_len, max_len]
    grown = []
    real_regrown = kv_store._regrown
    monkeypatch.setattr(kv_store, "_regrown", lambda old, capacity, filled: grown.append(capacity)
                        or real_regrown(old, capacity, filled))
    engine = plan.bind(tiny_model, device="cpu")
    prompt = torch.randint(3, 256, (12,)).tolist()
    result = engine.generate([prompt], max_new_tokens=30, stop_at_eos=False)[0]
    monkeypatch.setattr(kv_store, "_regrown", real_regrown)
    # the same tokens as the plan with one residency and room for every token from the start
    # (hf_greedy's generate would refuse an end-of-sequence token that the engine may pick)
    whole = dense_plan.bind(tiny_model, device="cpu").generate([prompt], max_new_tokens=30, stop_at_eos=False)[0]
    assert result.token_ids == whole.token_ids
    # K and V of every layer grew from 16 to 32 once (not to 24, then 32), then the resident ones to max-len
    assert grown == [32] * (2 * num) + [max_len] * (2 * len(keep))


def test_warm_up_leaves_the_engine_as_a_fresh_one(tiny_model, dense_plan):
    """A throwaway request compiles and captures on a GPU; afterwards the counters are zero and
    requests get the tokens a fresh engine gives them."""
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 23)]
    fresh = dense_plan.bind(tiny_model, device="cpu").generate(prompts, max_new_tokens=8, stop_at_eos=False)
    engine = dense_plan.bind(tiny_model, device="cpu")
    assert engine.warm_up() > 0
    scheduler = engine.scheduler
    assert (scheduler.decode_steps, scheduler.prefill_chunks, scheduler.generated_tokens) == (0, 0, 0)
    assert engine.stats()["rows_requested"] == 0 and not scheduler.has_work()
    warmed = engine.generate(prompts, max_new_tokens=8, stop_at_eos=False)
    assert [g.token_ids for g in warmed] == [g.token_ids for g in fresh]
