"""A fused retrieval head (EAGLE-3 style) end to end on CPU: plan, taps, head K cache and selection.

The head has random weights and reads the tiny Llama's hidden states entering layers 0 and 2 (the
embedding output and a deep layer). References come from Hugging Face directly: its
output_hidden_states give the features, RetrievalHead.shift_features / project the head's K and Q.
Tolerance: float32 on CPU; the engine and HF run the same ops in a different order (chunked
prefill, attention over selected rows), so 1e-5.
"""
import pytest
import torch

from specontext_compiler import compile_model, load_plan
from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.errors import ModelMismatchError
from specontext_compiler.models import load_preset_config
from specontext_compiler.runtime import selection
from specontext_compiler.runtime.retrieval_head import RetrievalHead

FEATURE_LAYERS = (0, 2)
ATOL = 1e-5


@pytest.fixture(scope="module")
def head_file(tmp_path_factory, make_fused_head):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("heads") / "fused.safetensors"
    make_fused_head(load_preset_config("tiny-llama"), FEATURE_LAYERS).save(path)
    return path


def fused_plan(tmp_path_factory, head_file, name, **workload):
    # The GPU machine has no PuLP: skip there rather than error, unless its wheel was carried
    # (benchmarks/device_run.sh says how).
    pytest.importorskip("pulp", reason="compiling a plan needs PuLP")
    out = tmp_path_factory.mktemp("plans") / name
    compile_model("tiny-llama", target="h100", max_len=512, dlm=str(head_file), out=out, **workload)
    return load_plan(out)


@pytest.fixture(scope="module")
def covering_plan(tmp_path_factory, head_file):
    """Selection runs (width 65 < max-len) but covers every token of the short sequences used here."""
    return fused_plan(tmp_path_factory, head_file, "covering", budget=64, sink_tokens=1, recent_tokens=0)


def hf_head_qk(model, head, ids):
    """The head's q, k over a whole sequence [1, N], from HF's hidden states."""
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    previous = RetrievalHead.shift_features(head.features_of(states))
    return head.project(torch.tensor([ids]), torch.arange(len(ids))[None], previous)


def test_plan_stores_the_fused_head_and_taps_its_layers(covering_plan):
    info = covering_plan.retrieval_head.to_dict()
    assert info["feature_layers"] == list(FEATURE_LAYERS) and info["format"] == "head-file"
    stored = RetrievalHead.load(covering_plan.directory / info["file"])
    assert stored.fused and stored.feature_layers == FEATURE_LAYERS and stored.embedding_shared
    assert covering_plan.graph.op_counts["specontext.record_features.default"] == len(FEATURE_LAYERS)
    assert "record_features.default(" in (covering_plan.directory / "decode_graph.py").read_text()


def test_head_k_cache_after_chunked_prefill_and_decode_equals_hf(tiny_model, hf_greedy, covering_plan):
    engine = covering_plan.bind(tiny_model, device="cpu", batch=2)
    engine.prefill_chunk = 16            # 33 tokens: chunks of 16, 16 and a 1-token tail; 20: 16 and 4
    engine.generate([torch.randint(3, 256, (12,)).tolist()], max_new_tokens=3, stop_at_eos=False)  # a used slot
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (33, 20)]
    results = engine.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    head = engine.ctx.head
    for slot, (prompt, result) in enumerate(zip(prompts, results)):
        sequence = prompt + result.token_ids[:-1]          # the last token is sampled, never fed
        assert int(engine.ctx.cache_len[slot]) == len(sequence)
        _, ref_k = hf_head_qk(tiny_model, head, sequence)
        cached = engine.ctx.store.head_k[slot:slot + 1, :, :len(sequence)]
        torch.testing.assert_close(cached, ref_k, atol=ATOL, rtol=ATOL)
        with torch.no_grad():
            states = tiny_model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(engine.ctx.features.last[slot], head.features_of(states)[0, -1],
                                   atol=ATOL, rtol=ATOL)
        # selection covered every token, so decoding stayed exact
        assert result.token_ids == hf_greedy(tiny_model, prompt, 6)


def test_dense_budget_with_fused_head_matches_hf_greedy(tiny_model, hf_greedy, tmp_path_factory, head_file):
    plan = fused_plan(tmp_path_factory, head_file, "dense", budget=512, recent_tokens=0)
    engine = plan.bind(tiny_model, device="cpu")
    engine.prefill_chunk = 8
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 23)]
    results = engine.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 10)


def test_sparse_selection_follows_the_head_on_hf_hidden_states(tiny_model, tmp_path_factory, head_file):
    budget, sinks, recent = 8, 1, 4
    plan = fused_plan(tmp_path_factory, head_file, "sparse", budget=budget, sink_tokens=sinks, recent_tokens=recent)
    engine = plan.bind(tiny_model, device="cpu")
    engine.prefill_chunk = 32
    prompt = torch.randint(3, 256, (100,)).tolist()
    # Two new tokens: one decode step, fed the first generated token; prefill was dense, so the
    # features it read (the prompt's) are HF's exactly.
    first = engine.generate([prompt], max_new_tokens=2, stop_at_eos=False)[0].token_ids[0]
    head = engine.ctx.head
    q, k = hf_head_qk(tiny_model, head, prompt + [first])
    scores = selection.attention_weights(q[:, :, -1], k[:, :, :len(prompt)], head.scaling)
    expected = selection.select_tokens(scores, head.selection_kv_heads, budget, sink_tokens=sinks,
                                       recent_tokens=recent)
    assert torch.equal(engine.ctx.last_indices[0:1].long(), expected)
    # The features matter: the same head without them (zeros) would pick other tokens.
    q0, k0 = head.project(torch.tensor([prompt + [first]]), torch.arange(len(prompt) + 1)[None])
    blind = selection.select_tokens(selection.attention_weights(q0[:, :, -1], k0[:, :, :len(prompt)], head.scaling),
                                    head.selection_kv_heads, budget, sink_tokens=sinks, recent_tokens=recent)
    assert not torch.equal(blind, expected)


def test_binding_a_plain_head_to_a_tapped_plan_names_the_layers(tiny_model, covering_plan, tmp_path):
    plain, _ = extract_retrieval_head("self:0", tiny_model)
    path = plain.save(tmp_path / "plain.safetensors")
    with pytest.raises(ModelMismatchError, match=r"entering layers \[0, 2\].*reads layers \[\]"):
        covering_plan.bind(tiny_model, device="cpu", dlm=str(path))


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_last_steps_features(tiny_model, covering_plan):
    """Capture's warm-up runs overwrite the features; the first replay must still read the last step's."""
    import copy
    prompt = torch.randint(3, 256, (40,)).tolist()
    runs = []
    for use_cuda_graph in (False, True):
        engine = covering_plan.bind(copy.deepcopy(tiny_model), device="cuda", dtype=torch.float32,
                                    use_cuda_graph=use_cuda_graph)
        tokens = engine.generate([prompt], max_new_tokens=6, stop_at_eos=False)[0].token_ids
        # The caches grow at 45 tokens (a residency segment's end), which recaptures: 2 on the H100.
        assert (engine.step.captures >= 1) == use_cuda_graph
        runs.append((tokens, engine.ctx.store.head_k[0, :, :45].cpu(), engine.ctx.features.last[0].cpu()))
    (eager_tokens, eager_k, eager_last), (graph_tokens, graph_k, graph_last) = runs
    assert graph_tokens == eager_tokens
    torch.testing.assert_close(graph_k, eager_k, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(graph_last, eager_last, atol=ATOL, rtol=ATOL)


def test_prefill_chunks_between_decode_steps_keep_the_fused_features(tiny_model, covering_plan):
    """A decode step runs every slot, so a request between prefill chunks gets a placeholder step;
    its features (the fused head's F_{j-1}) must be the prompt's when the next chunk starts."""
    from specontext_compiler.runtime.sampling_params import SamplingParams
    solo = covering_plan.bind(tiny_model, device="cpu", batch=1)
    first, second = torch.randint(3, 256, (9,)).tolist(), torch.randint(3, 256, (30,)).tolist()
    expected = [solo.generate([p], max_new_tokens=n, stop_at_eos=False)[0].token_ids
                for p, n in ((first, 12), (second, 4))]
    engine = covering_plan.bind(tiny_model, device="cpu", batch=2)
    engine.prefill_chunk = 8
    scheduler = engine.scheduler
    running = scheduler.add(first, SamplingParams(max_tokens=12, ignore_eos=True))
    scheduler.step()
    chunked = scheduler.add(second, SamplingParams(max_tokens=4, ignore_eos=True))
    while scheduler.has_work():
        scheduler.step()
    assert scheduler.prefill_chunks >= 5 and [running.token_ids, chunked.token_ids] == expected
    sequence = second + chunked.token_ids[:-1]
    _, ref_k = hf_head_qk(tiny_model, engine.ctx.head, sequence)
    torch.testing.assert_close(engine.ctx.store.head_k[chunked.slot:chunked.slot + 1, :, :len(sequence)],
                               ref_k, atol=ATOL, rtol=ATOL)
