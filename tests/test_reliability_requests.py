"""generate() and bind() refuse a bad request with RequestError, for the whole batch before any prefill."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specontext_compiler import compile_model, load_plan
from specontext_compiler.errors import RequestError
from specontext_compiler.models import load_preset_config


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("requests") / "plan"
    compile_model("tiny-llama", target="h100", max_len=256, budget=64, out=out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()
    return load_plan(out).bind(model, device="cpu")


GOOD = [[5, 6, 7]]


@pytest.mark.parametrize("prompts, options, words", [
    (GOOD, {"max_new_tokens": 0}, "max_new_tokens = 0"),
    (GOOD, {"max_new_tokens": -3}, "max_new_tokens = -3"),
    (GOOD, {"max_new_tokens": 2.5}, "max_new_tokens = 2.5"),
    (GOOD, {"temperature": -0.5}, "temperature = -0.5"),
    (GOOD, {"temperature": float("nan")}, "temperature = nan"),
    (GOOD, {"top_p": 1.5}, "top_p = 1.5"),
    (GOOD, {"top_p": -0.1}, "top_p = -0.1"),
    (GOOD, {"top_p": 0.0}, "top_p = 0.0"),
    ([[5, 6.0, 7]], {}, "request 0, token 1 is 6.0"),
    ([[5, 6, 256]], {}, "token 2 is 256, outside the vocabulary [0, 256)"),
    ([[5, -1]], {}, "token 1 is -1"),
    ("hello", {}, "prompts must be a list"),
    ([5, 6, 7], {}, "request 0 is a int"),
    ([[5], None], {}, "request 1 is a NoneType"),
])
def test_a_bad_request_is_refused_with_one_line(engine, prompts, options, words):
    with pytest.raises(RequestError) as info:
        engine.generate(prompts, **{"max_new_tokens": 2, **options})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_whole_batch_is_checked_before_any_prefill(engine, monkeypatch):
    prefilled = []
    real_prefill = engine.prefill_chunk_into
    monkeypatch.setattr(engine, "prefill_chunk_into",
                        lambda slot, chunk, start: prefilled.append(slot) or real_prefill(slot, chunk, start))
    with pytest.raises(RequestError, match="request 2, token 0 is 999"):
        engine.generate([[5, 6], [7, 8], [999]], max_new_tokens=2)
    assert prefilled == []
    out = engine.generate([[5, 6], [7, 8]], max_new_tokens=2, stop_at_eos=False)   # still usable
    assert [len(r.token_ids) for r in out] == [2, 2] and prefilled


def test_a_tensor_prompt_is_accepted(engine):
    out = engine.generate([torch.tensor([5, 6, 7])], max_new_tokens=2, stop_at_eos=False)
    assert len(out[0].token_ids) == 2


@pytest.mark.parametrize("batch", [0, -1, 1.5])
def test_bind_refuses_a_batch_that_is_not_a_positive_count(engine, batch):
    with pytest.raises(RequestError, match=f"batch = {batch!r}"):
        engine.plan.bind(engine.model, device="cpu", batch=batch)
