"""Shared test set-up: Triton's interpreter on CPU, the gpu marker, seeds, tolerances."""
import os

import pytest

# Must be set before any @triton.jit decorator runs (it reads the variable at decoration time).
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) per dtype, for kernels compared with their references.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (5e-3, 5e-3), "bfloat16": (3e-2, 2e-2)}


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def make_fused_head():
    """Builder of a fused retrieval head shaped for an HF config (same query heads, shared
    embedding), with random weights: make_fused_head(config, feature_layers)."""
    import torch

    from specontext_compiler.runtime.retrieval_head import RetrievalHead

    def build(config, feature_layers):
        hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        dim, width = getattr(config, "head_dim", None) or hidden // heads, len(feature_layers) * hidden
        return RetrievalHead(
            embedding=None, norm_weight=1 + 0.1 * torch.randn(hidden),
            q_weight=torch.randn(heads * dim, 2 * hidden) / hidden ** 0.5,
            k_weight=torch.randn(kv * dim, 2 * hidden) / hidden ** 0.5,
            num_heads=heads, num_kv_heads=kv, head_dim=dim, norm_eps=config.rms_norm_eps,
            rope=dict(getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}),
            max_position_embeddings=config.max_position_embeddings, embedding_shared=True,
            vocab_size=config.vocab_size, source="random-fused", feature_layers=feature_layers,
            fc_weight=torch.randn(hidden, width) / width ** 0.5, feature_norm_weight=1 + 0.1 * torch.randn(width))

    return build


@pytest.fixture(autouse=True)
def _private_head_cache(tmp_path_factory, monkeypatch):
    """No test reads or fills the user's head cache, and none distills on demand, even on a GPU
    machine (a compile of a model with weights would); the head-cache tests opt back in."""
    from specontext_compiler.distill import default_head, head_cache
    directory = tmp_path_factory.mktemp("heads")
    monkeypatch.setattr(head_cache, "heads_dir", lambda: directory)
    monkeypatch.setattr(default_head, "on_demand_device", lambda: None)
    yield
