"""Shared by the engine tests: the tiny random Llama and Hugging Face's own greedy decoding of it."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from specontext_compiler.models import load_preset_config


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: HF generate, greedy, exactly new_tokens tokens after the prompt."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


@pytest.fixture
def hf_greedy():
    """hf_greedy(model, prompt, new_tokens) -> the token ids HF's greedy decoding generates."""
    return _hf_greedy
