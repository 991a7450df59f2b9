"""Distilling from a Gemma-3-style model: a tiny random Gemma-3 with sliding-window layers.

Only its global layers select tokens, so only they may teach; and the student starts as Gemma's
own layer-0 head, with its per-head q/k norms and (1 + w) norms.
"""
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from specontext_compiler.distill import distill_retrieval_head, layer_choice
from specontext_compiler.distill.train import fused_student
from specontext_compiler.dlm import extract_retrieval_head
from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.retrieval_head import RetrievalHead

RECENT = 16
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GLOBAL_LAYERS = [2, 4]


@pytest.fixture(scope="module")
def gemma():
    """A random Gemma-3 whose norm weights are random too (Gemma initializes them to 0, where
    the (1 + w) offset would go unnoticed)."""
    torch.manual_seed(5)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=64,
                              layer_types=LAYER_TYPES, max_position_embeddings=1024, query_pre_attn_scalar=16,
                              initializer_range=0.3)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.normal_(0, 0.5)
    return model


def test_the_student_starts_as_gemmas_layer_zero_head(gemma):
    base, _ = extract_retrieval_head("self:0", gemma, llm=gemma)
    assert base.norm_offset == 1.0 and base.q_norm_weight is not None
    student = fused_student(base, feature_layers=(1, 3), seed=0)
    with torch.no_grad():      # silence the fresh feature half: what is left must be the base head
        student.q_weight[:, base.hidden_size:] = 0
        student.k_weight[:, base.hidden_size:] = 0
    ids, positions = torch.randint(0, 128, (1, 30)), torch.arange(30)[None]
    features = RetrievalHead.shift_features(torch.randn(1, 30, student.feature_width))
    for got, want in zip(student.project(ids, positions, features), base.project(ids, positions)):
        torch.testing.assert_close(got, want)


def test_automatic_teacher_layers_are_global_layers_only(gemma):
    sequences = [torch.randint(0, 40, (400,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    choice = layer_choice.auto_teacher_layers(gemma, sequences, RECENT)
    assert choice["probed_queries"] > 0 and set(choice["layers"]) <= set(GLOBAL_LAYERS) and choice["layers"]
    assert [i for i, score in enumerate(choice["scores"]) if score is not None] == GLOBAL_LAYERS
    assert "global layers only" in choice["rule"]
    assert layer_choice.choose_layers([None, 0.0, None, 0.0]) == (1, 3)       # none looks far: all scored


def test_all_teacher_layers_means_the_global_ones_and_a_local_layer_is_refused(gemma, tokenizer, tmp_path):
    head, report = distill_retrieval_head(gemma, tokenizer, sequences=4, seq_len=256, feature_layers=(1, 3),
                                          epochs=2, queries=16, teacher_layers=None, name="tiny-gemma")
    assert report["teacher_layers"] == GLOBAL_LAYERS and report["after"]["loss"] < report["before"]["loss"]
    embedding = gemma.model.embed_tokens.weight.detach()
    loaded = RetrievalHead.load(head.save(tmp_path / "head.safetensors"), embedding=embedding)
    assert loaded.norm_offset == 1.0 and torch.equal(loaded.q_norm_weight, head.q_norm_weight)
    with pytest.raises(SpecontextError, match=r"teacher layers \[1\] are sliding-window layers"):
        distill_retrieval_head(gemma, tokenizer, sequences=4, seq_len=256, feature_layers=(1, 3),
                               teacher_layers=(1, 2))


def test_the_cli_summary_lists_copy_scores_of_global_layers_only(gemma, tokenizer, tmp_path):
    import io

    from rich.console import Console

    from specontext_compiler.cli.distill_command import _distill_summary
    _, report = distill_retrieval_head(gemma, tokenizer, sequences=2, seq_len=256, feature_layers=(1, 3),
                                       epochs=1, queries=16, name="tiny-gemma")
    assert report["teacher_layer_choice"]["scores"][0] is None
    text = io.StringIO()
    Console(file=text, width=200).print(_distill_summary(report, tmp_path / "head.safetensors"))
    row = next(line for line in text.getvalue().splitlines() if "copy score, best layers" in line)
    assert [int(item.split(":")[0]) for item in row.split("layers", 1)[1].split(",")] in ([2, 4], [4, 2])
