"""Distillation end to end on a tiny Llama: the validation loss falls and the head round-trips."""
import pytest
import torch

from specontext_compiler.distill import default_feature_layers, distill_retrieval_head
from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.retrieval_head import RetrievalHead


def test_default_feature_layers_follow_eagle3_and_refuse_shallow_models():
    assert default_feature_layers(30) == (3, 16, 28)
    with pytest.raises(SpecontextError, match="feature_layers"):
        default_feature_layers(2)


def test_training_lowers_validation_loss_and_the_saved_head_loads_back(model, tokenizer, tmp_path):
    epochs = []
    head, report = distill_retrieval_head(model, tokenizer, sequences=8, seq_len=512, feature_layers=(0, 1, 2),
                                          epochs=3, queries=32, name="tiny", progress=epochs.append)
    assert report["after"]["loss"] < report["before"]["loss"]
    assert [entry["epoch"] for entry in report["history"]] == [0, 1, 2, 3]
    assert sum(line.startswith("epoch") for line in epochs) == 4
    assert 0 < report["after"]["recall@128"] <= 1 + 1e-3
    assert head.fused and head.feature_layers == (0, 1, 2) and head.source == "distilled:tiny" and head.layer == 0
    assert report["params"] == head.param_count()

    embedding = model.model.embed_tokens.weight.detach()
    loaded = RetrievalHead.load(head.save(tmp_path / "head.safetensors"), embedding=embedding)
    assert loaded.feature_layers == head.feature_layers and loaded.source == head.source
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    positions = torch.arange(40)[None]
    features = RetrievalHead.shift_features(torch.randn(1, 40, head.feature_width))
    for got, want in zip(loaded.project(ids, positions, features), head.project(ids, positions, features)):
        assert torch.equal(got, want)


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(SpecontextError, match="at least 2"):
        distill_retrieval_head(model, tokenizer, sequences=1, feature_layers=(0,))
    with pytest.raises(SpecontextError, match="exceeds"):
        distill_retrieval_head(model, tokenizer, seq_len=4096, feature_layers=(0,))
    with pytest.raises(SpecontextError, match="hidden-state indices"):
        distill_retrieval_head(model, tokenizer, seq_len=512, feature_layers=(0, 3))
    with pytest.raises(SpecontextError, match="teacher layers"):
        distill_retrieval_head(model, tokenizer, seq_len=512, feature_layers=(0,),
                               teacher_layers=(model.config.num_hidden_layers,))
