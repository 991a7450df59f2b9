"""Tiny random Llamas and a one-token-per-character tokenizer for the distillation tests."""
import pytest
import torch


class CharTokenizer:
    """One token per character (ids below 128): lengths and contents are easy to check."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": [min(ord(c), 127) for c in text]})()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def tiny_llama(layers: int):
    """A random Llama with peaked attention: the default init (std 0.02) gives near-uniform
    attention, which leaves a student nothing to learn."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10000.0, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


@pytest.fixture(scope="module")
def deep_model():
    """Deep enough for the default feature layers (3, L//2+1, L-2) = (3, 5, 6)."""
    return tiny_llama(layers=8)
