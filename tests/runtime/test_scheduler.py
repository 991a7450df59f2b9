"""The continuous-batching scheduler on CPU: joining, interleaving, step counts, exactness."""
import dataclasses

import pytest
import torch

from specontext_compiler import compile_model, load_plan
from specontext_compiler.runtime.plan import Segment
from specontext_compiler.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "dense"
    compile_model("tiny-llama", target="h100", max_len=512, budget=512, recent_tokens=0, out=out)
    return load_plan(out)


@pytest.fixture(scope="module")
def alone(tiny_model, plan):
    """alone(prompt, n): the greedy tokens of a request served by itself (batch 1, no offload).

    HF's generate is not the reference here: min_new_tokens masks end-of-sequence, which a random
    model sometimes ranks first."""
    engine = plan.bind(tiny_model, device="cpu", batch=1)
    return lambda prompt, n: engine.generate([prompt], max_new_tokens=n, stop_at_eos=False)[0].token_ids


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def run_until_first_token(scheduler, request, limit=50):
    steps = 0
    while not request.token_ids:
        scheduler.step()
        steps += 1
        assert steps < limit
    return steps


def test_a_late_request_joins_while_others_run(tiny_model, plan):
    engine = plan.bind(tiny_model, device="cpu", batch=2)
    scheduler = engine.scheduler
    first = scheduler.add([5, 6, 7, 8], greedy(40))
    for _ in range(5):
        scheduler.step()
    late = scheduler.add([9, 10, 11], greedy(4))
    steps = run_until_first_token(scheduler, late)
    assert steps <= 2 and not first.finished and len(first.token_ids) < 10
    while not late.finished:
        scheduler.step()
    assert not first.finished and len(late.token_ids) == 4


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny_model, alone, plan):
    engine = plan.bind(tiny_model, device="cpu", batch=2)
    engine.prefill_chunk = 8
    scheduler = engine.scheduler
    short = scheduler.add([3, 4, 5], greedy(30))
    scheduler.step()
    scheduler.step()
    prompt = torch.randint(3, 256, (40,)).tolist()
    long = scheduler.add(prompt, greedy(8))
    before = len(short.token_ids)
    steps = run_until_first_token(scheduler, long)
    assert steps >= 5                                   # 40 tokens, 8 a step
    assert len(short.token_ids) - before >= steps - 1   # the running request kept decoding
    while not (long.finished and short.finished):
        scheduler.step()
    assert long.token_ids == alone(prompt, 8)
    assert short.token_ids == alone([3, 4, 5], 30)


def wave_decode_steps(max_tokens, slots):
    """Decode steps of the fixed-wave schedule: each wave runs until its longest request ends."""
    waves = [max_tokens[i:i + slots] for i in range(0, len(max_tokens), slots)]
    return sum(max(wave) - 1 for wave in waves)


def test_mixed_lengths_take_fewer_steps_than_waves_and_stay_exact(tiny_model, alone, plan):
    engine = plan.bind(tiny_model, device="cpu", batch=2)
    lengths = [16, 2, 3, 2, 16, 2]
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 9, 4, 12, 7, 3)]
    scheduler = engine.scheduler
    requests = [scheduler.add(p, greedy(n)) for p, n in zip(prompts, lengths)]
    while scheduler.has_work():
        scheduler.step()
    assert scheduler.decode_steps < wave_decode_steps(lengths, 2)
    for prompt, n, request in zip(prompts, lengths, requests):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(prompt, n)


def test_offload_while_another_request_is_prefilled_in_chunks(tiny_model, alone, plan):
    """Layers move to the host mid-run while a second request's prompt arrives in chunks."""
    num = plan.model.num_layers
    moved = dataclasses.replace(plan, segments=[Segment(0, 24, list(range(num)), [], {}),
                                                Segment(24, 512, [0], [1, 2], {})])
    moved.directory = plan.directory
    engine = moved.bind(tiny_model, device="cpu", batch=2)
    engine.prefill_chunk = 6
    first = torch.randint(3, 256, (10,)).tolist()
    second = torch.randint(3, 256, (30,)).tolist()
    scheduler = engine.scheduler
    a = scheduler.add(first, greedy(20))
    for _ in range(3):
        scheduler.step()
    b = scheduler.add(second, greedy(6))
    while scheduler.has_work():
        scheduler.step()
    assert engine.ctx.store.offloaded_layers() == [1, 2]
    assert a.token_ids == alone(first, 20)
    assert b.token_ids == alone(second, 6)


def test_seeded_sampling_does_not_depend_on_batch_company(tiny_model, plan):
    engine = plan.bind(tiny_model, device="cpu", batch=3)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=11, ignore_eos=True)
    alone = engine.generate([[4, 5, 6]], max_new_tokens=8, temperature=0.9, top_k=20, seed=11,
                            stop_at_eos=False)[0].token_ids
    scheduler = engine.scheduler
    others = [scheduler.add([7] * n, SamplingParams(max_tokens=5, temperature=1.0)) for n in (3, 6)]
    mine = scheduler.add([4, 5, 6], params)
    while scheduler.has_work():
        scheduler.step()
    assert mine.token_ids == alone and all(len(o.token_ids) == 5 for o in others)


def test_abort_frees_the_slot_for_the_queue(tiny_model, plan):
    engine = plan.bind(tiny_model, device="cpu", batch=1)
    scheduler = engine.scheduler
    stuck = scheduler.add([3, 4], greedy(100))
    waiting = scheduler.add([5, 6], greedy(3))
    scheduler.step()
    assert scheduler.running == 1 and list(scheduler.waiting) == [waiting]
    scheduler.abort(stuck)
    while not waiting.finished:
        scheduler.step()
    assert stuck.finish_reason == "abort" and len(waiting.token_ids) == 3


class _Letters:
    """A tokenizer stand-in: token t decodes to chr(t); 0 is end-of-sequence."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) for t in ids if not (skip_special_tokens and t == 0))


def test_stream_gives_text_deltas_and_stops_at_a_stop_string(tiny_model, plan):
    engine = plan.bind(tiny_model, device="cpu")
    free = engine.generate([[70, 71]], max_new_tokens=12, stop_at_eos=False)[0].token_ids
    engine.tokenizer = _Letters()
    stop = "".join(chr(t) for t in free[4:6])
    text = "".join(chr(t) for t in free)
    cut = text.index(stop) if stop else len(text)
    deltas = list(engine.stream([70, 71], max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert "".join(deltas) == text[:cut] and len(deltas) >= 2
    result = engine.generate([[70, 71]], max_new_tokens=12, stop_at_eos=False, stop=[stop])[0]
    assert result.text == text[:cut] and result.finish_reason == "stop"


@pytest.mark.gpu
def test_gpu_scheduler_with_cuda_graph_matches_the_cpu(tiny_model, alone, plan):
    """On the GPU: captured decode steps over slots that join, prefill in chunks and end at
    different times, tokens read back one step late through the pinned buffer, sampled on device."""
    import copy
    engine = plan.bind(copy.deepcopy(tiny_model), device="cuda", dtype=torch.float32, batch=3)
    engine.prefill_chunk = 8
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 30, 9, 17, 4)]
    lengths = [14, 3, 9, 6, 11]
    scheduler = engine.scheduler
    requests = [scheduler.add(p, greedy(n)) for p, n in zip(prompts[:2], lengths[:2])]
    for _ in range(4):
        scheduler.step()
    requests += [scheduler.add(p, greedy(n)) for p, n in zip(prompts[2:], lengths[2:])]
    while scheduler.has_work():
        scheduler.step()
    assert engine.step.captures >= 1
    for prompt, n, request in zip(prompts, lengths, requests):
        assert request.token_ids == alone(prompt, n)
    seeded = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=30, seed=4, ignore_eos=True)
    on_gpu = engine.generate([[4, 5, 6]], max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=30, seed=4,
                             stop_at_eos=False)[0].token_ids
    assert len(on_gpu) == seeded.max_tokens
