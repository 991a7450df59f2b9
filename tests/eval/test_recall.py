"""Attention recall mechanics: head level beats batch level where groups look at different tokens."""
from types import SimpleNamespace

import torch

from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.eval.methods import Budget, method_mask
from specontext_compiler.eval.recall import _kept_mass, attention_recall, query_positions
from specontext_compiler.runtime import selection


def test_head_level_recall_beats_batch_level_on_disjoint_groups():
    seq, dim = 40, 8
    keys = torch.randn(1, 2, seq, dim) * 0.1
    keys[0, 0, 10:18, 0] += 3.0           # KV group 0 cares about positions 10..17
    keys[0, 1, 20:28, 1] += 3.0           # KV group 1 about 20..27
    query = torch.zeros(1, 4, dim)
    query[0, :2, 0], query[0, 2:, 1] = 4.0, 4.0
    query += torch.randn_like(query) * 0.05
    head = SimpleNamespace(scaling=dim ** -0.5, selection_kv_heads=2)
    weights = selection.attention_weights(query, keys, head.scaling)[0]          # the "LLM" attention
    weights = torch.cat([weights * 0.9, torch.full((4, 1), 0.1)], -1)             # + the new token
    recall = {}
    for method in ("spec-head", "spec-batch"):
        keep = method_mask(method, Budget(budget=8, sink=1), query=None, keys=None, head_q=query,
                           head_k=keys, head=head, generator=torch.Generator())
        recall[method] = _kept_mass(weights, keep)
    assert recall["spec-head"] > recall["spec-batch"] + 0.1
    assert 0 < recall["spec-batch"] < recall["spec-head"] <= 1.0 + 1e-6


def test_recall_on_tiny_model_is_bounded_and_full_is_one(tiny_llama):
    head, _ = extract_retrieval_head("self:0", tiny_llama)
    ids = torch.randint(0, 97, (200,)).tolist()
    out = attention_recall(tiny_llama, head, ids, budgets=[16, 256], queries=4,
                           methods=("full", "spec-head", "spec-batch", "streaming", "quest", "random"))
    assert all(v == 1.0 for v in out["full"][16]) and len(out["full"][16]) == 2
    for method, per in out.items():
        assert all(0.0 < v <= 1.0 + 1e-5 for v in per[16]), method
        assert all(abs(v - 1.0) < 1e-6 for v in per[256]), "a budget covering the context keeps all"
    assert query_positions(200, 4) == [100, 133, 166, 199]
