"""A tiny random Llama (GQA: 4 query heads, 2 KV heads) shared by the eval tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0)
    return LlamaForCausalLM(config).eval()
