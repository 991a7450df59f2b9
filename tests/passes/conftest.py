"""Fixtures for the pass tests: tiny Llama-shaped models captured fresh (passes edit in place)."""
import pytest
import torch


def tiny_config(num_kv_heads: int = 2, layers: int = 3):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=num_kv_heads, head_dim=16, vocab_size=256,
                       max_position_embeddings=512, tie_word_embeddings=False)


def capture(config=None):
    from specontext_compiler.capture import capture_decode_graph
    return capture_decode_graph(config or tiny_config(), dtype=torch.float32)


@pytest.fixture
def captured():
    """The tiny GQA model (3 layers, 4 query heads, 2 KV heads) freshly captured."""
    return capture()


@pytest.fixture
def annotated(captured):
    """Captured, cleaned and annotated by FindAttention."""
    from specontext_compiler.passes.clean_capture import CleanCapture
    from specontext_compiler.passes.find_attention import FindAttention
    CleanCapture()(captured.graph_module)
    FindAttention()(captured.graph_module)
    return captured


@pytest.fixture
def with_retrieve(annotated):
    from specontext_compiler.passes.insert_retrieval_head import InsertRetrievalHead
    InsertRetrievalHead()(annotated.graph_module)
    return annotated


@pytest.fixture
def rewritten(with_retrieve):
    from specontext_compiler.passes.rewrite_sparse_attention import RewriteSparseAttention
    RewriteSparseAttention()(with_retrieve.graph_module)
    return with_retrieve
