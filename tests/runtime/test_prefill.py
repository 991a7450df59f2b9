"""Prefill: the plan sizes its chunk, the engine uses it, and one chunk or several give HF's tokens."""
import copy
import dataclasses

import pytest
import torch

from specontext_compiler import compile_model, load_plan
from specontext_compiler.cost_models import memory
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.models import resolve_model, spec_from_config
from specontext_compiler.runtime.plan_records import DEFAULT_PREFILL_CHUNK_TOKENS
from specontext_compiler.runtime.kv_store import KVLayout, LayerKV
from specontext_compiler.runtime.plan import Segment

PROMPT = 150          # several chunks of CHUNK, plus a tail
CHUNK = 64
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    pytest.importorskip("pulp", reason="compiling a plan needs PuLP")
    out = tmp_path_factory.mktemp("plans") / "dense"
    compile_model("tiny-llama", target="h100", max_len=512, budget=512, recent_tokens=0, out=out)
    return load_plan(out)


def offloaded_from_the_start(plan, layers):
    """The same plan with `layers` on the host from the first token (prefill writes their history)."""
    num = plan.model.num_layers
    keep = [i for i in range(num) if i not in layers]
    moved = dataclasses.replace(plan, segments=[Segment(0, 1, list(range(num)), [], {}),
                                                Segment(1, plan.workload.max_len, keep, list(layers), {})])
    moved.directory = plan.directory
    return moved


def llama_8b():
    return spec_from_config(resolve_model("llama-3.1-8b").config, "llama-3.1-8b")


def test_the_chunk_fills_the_memory_the_plan_leaves_free():
    spec, work = llama_8b(), Workload(max_len=131072, prompt_len=32768)
    per_token = memory.prefill_bytes_per_token(spec, work)
    read_back = work.max_len * spec.kv_bytes_per_token_layer
    assert memory.prefill_fixed_bytes(spec, work) == read_back
    assert memory.prefill_chunk_tokens(spec, work, 0) == memory.PREFILL_CHUNK_TOKENS
    assert memory.prefill_chunk_tokens(spec, work, 1e15) == work.max_len
    free = 3 * 10**9
    chunk = memory.prefill_chunk_tokens(spec, work, free)
    extra = chunk - memory.PREFILL_CHUNK_TOKENS
    assert extra * per_token + read_back <= free < (extra + 1) * per_token + read_back
    # A sliding-window layer's explicit mask costs bytes per key: fewer tokens fit.
    assert memory.prefill_chunk_tokens(spec, work, free, masked=True) < chunk


def test_free_bytes_at_peak_is_the_memory_left_by_the_fullest_segment():
    spec, work = llama_8b(), Workload(max_len=131072, prompt_len=32768)
    residency = [(32, 32768), (28, 65536), (20, 131072)]
    peak = max(memory.gpu_bytes(spec, work, n, s) for n, s in residency)
    assert memory.free_bytes_at_peak(spec, work, 150 * 10**9, residency) == 150 * 10**9 - peak
    # On a unified-memory target the offloaded KV shares the pool: less is left.
    assert memory.free_bytes_at_peak(spec, work, 150 * 10**9, residency, unified=True) < 150 * 10**9 - peak


def test_the_plan_records_its_chunk_and_the_engine_uses_it(plan, tiny_model):
    from specontext_compiler.cost_models.target import load_target
    spec = spec_from_config(resolve_model("tiny-llama").config, "tiny-llama")
    work = Workload(max_len=512, prompt_len=plan.workload.prompt_len, batch=plan.workload.batch,
                    budget=512, recent_tokens=0)
    residency = [(len(s.gpu_layers), s.to_len) for s in plan.segments]
    free = memory.free_bytes_at_peak(spec, work, load_target("h100").gpu_memory_bytes, residency)
    assert plan.workload.prefill_chunk_tokens == memory.prefill_chunk_tokens(spec, work, free) == 512
    engine = plan.bind(tiny_model, device="cpu")
    assert engine.prefill_chunk == 512 and engine.scheduler.prefill_tokens == 512
    engine.generate([torch.randint(3, 256, (300,)).tolist()], max_new_tokens=2, stop_at_eos=False)
    assert engine.scheduler.prefill_chunks == 1          # a 300-token prompt in one forward


def test_a_plan_without_the_field_prefills_in_chunks_of_256(plan, tiny_model):
    old = dataclasses.replace(plan, workload=dataclasses.replace(plan.workload, prefill_chunk_tokens=None))
    old.directory = plan.directory
    engine = old.bind(tiny_model, device="cpu")
    assert engine.prefill_chunk == DEFAULT_PREFILL_CHUNK_TOKENS == memory.PREFILL_CHUNK_TOKENS == 256
    engine.generate([torch.randint(3, 256, (300,)).tolist()], max_new_tokens=2, stop_at_eos=False)
    assert engine.scheduler.prefill_chunks == 2


@pytest.mark.parametrize("offloaded", [(), (1, 2)], ids=["resident", "offloaded"])
def test_one_chunk_and_several_give_hf_greedy_tokens(plan, tiny_model, hf_greedy, offloaded, monkeypatch):
    reads = []
    history = LayerKV.history
    monkeypatch.setattr(LayerKV, "history", lambda self, *a, **k: reads.append(1) or history(self, *a, **k))
    bound = offloaded_from_the_start(plan, offloaded) if offloaded else plan
    prompt = torch.randint(3, 256, (PROMPT,)).tolist()
    expected = hf_greedy(tiny_model, prompt, NEW_TOKENS)
    head_k = {}
    for chunk in (None, CHUNK):
        engine = bound.bind(tiny_model, device="cpu")
        if chunk:
            engine.prefill_chunk = chunk
        reads.clear()
        result = engine.generate([prompt], max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0]
        assert result.token_ids == expected
        assert engine.ctx.store.offloaded_layers() == list(offloaded)
        assert engine.scheduler.prefill_chunks == (1 if chunk is None else -(-PROMPT // CHUNK))
        # One chunk never reads an offloaded history back; later chunks do.
        assert bool(reads) == (bool(offloaded) and chunk is not None)
        head_k[chunk] = engine.ctx.store.head_k[0, :, :PROMPT].clone()
    # The retrieval head's K cache is filled in the same pass, the same whichever the chunking.
    torch.testing.assert_close(head_k[None], head_k[CHUNK])


def test_write_history_puts_each_span_at_its_offset_and_drops_rows_past_max_len():
    layout = KVLayout(num_layers=1, slots=3, max_len=10, num_kv_heads=2, head_dim=4, v_head_dim=3,
                      width=4, groups=2, dtype=torch.float32, device=torch.device("cpu"))
    layer = LayerKV(layout, capacity=10, offloaded=True)
    layer.host.zero_()
    k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 3)
    layer.write_history(slice(1, 3), k, v, [0, 7])
    torch.testing.assert_close(layer.k[1, :, :6], k[0])
    torch.testing.assert_close(layer.v[1, :, :6], v[0])
    torch.testing.assert_close(layer.k[2, :, 7:], k[1, :, :3])          # 3 of 6 rows fit before max_len
    torch.testing.assert_close(layer.v[2, :, 7:], v[1, :, :3])
    assert not layer.host[0].any() and not layer.host[2, :, :7].any()


@pytest.mark.gpu
def test_write_history_on_a_copy_stream_lands_once_the_compute_stream_waits():
    layout = KVLayout(num_layers=1, slots=2, max_len=64, num_kv_heads=2, head_dim=8, v_head_dim=8,
                      width=4, groups=2, dtype=torch.bfloat16, device=torch.device("cuda"))
    layer = LayerKV(layout, capacity=64, offloaded=True)
    assert layer.host.is_pinned()
    k, v = (torch.randn(2, 2, 40, 8, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    stream = torch.cuda.Stream()
    layer.write_history(slice(0, 2), k, v, [0, 24], stream)
    del k, v                                     # the packed copy stays alive for the stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    host_k = layer.k.float()
    assert host_k[0, :, :40].abs().sum() > 0 and host_k[1, :, 24:].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("offloaded", [(), (1, 2)], ids=["resident", "offloaded"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])   # bf16: flash
def test_on_the_gpu_one_chunk_and_several_give_hf_logits(plan, tiny_model, offloaded, dtype, tol):
    """The CUDA paths (SDPA causal and lower-right, host DMA on the copy stream, history read-back)."""
    model = copy.deepcopy(tiny_model).to("cuda", dtype)
    bound = offloaded_from_the_start(plan, offloaded) if offloaded else plan
    engine = bound.bind(model, device="cuda", dtype=dtype)
    prompt = torch.randint(3, 256, (PROMPT,)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
    for chunk in (PROMPT, CHUNK):
        engine.ctx.reset_slot(0)
        for start in range(0, PROMPT, chunk):
            logits = engine.prefill_chunk_into(0, prompt[start:start + chunk], start)
        torch.testing.assert_close(logits.float(), expected.float(), atol=tol, rtol=tol)
    assert engine.ctx.store.offloaded_layers() == list(offloaded)
