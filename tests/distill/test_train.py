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


@pytest.mark.parametrize("level", ["head", "group"])
def test_training_lowers_validation_loss_and_the_saved_head_loads_back(model, tokenizer, tmp_path, level):
    events = []
    head, report = distill_retrieval_head(model, tokenizer, sequences=8, seq_len=512, feature_layers=(0, 1, 2),
                                          epochs=3, queries=32, name="tiny", loss_level=level,
                                          progress=lambda *event: events.append(event))
    assert report["after"]["loss"] < report["before"]["loss"] and report["loss_level"] == level
    assert [entry["epoch"] for entry in report["history"]] == [0, 1, 2, 3]
    notes = [note for stage, _, _, note in events if note]
    assert sum(note.startswith("epoch") for note in notes) == 4
    assert {stage for stage, *_ in events} == {"layers", "teacher", "training"}
    assert ("teacher", 8, 8, "") in events and events[-1][1:3] == (21, 21)     # 7 training sequences x 3
    assert report["teacher_layer_choice"]["layers"] == report["teacher_layers"]
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
    with pytest.raises(SpecontextError, match="loss level"):
        distill_retrieval_head(model, tokenizer, seq_len=512, feature_layers=(0,), loss_level="layer")


def test_group_loss_is_the_cross_entropy_of_each_group_mixture():
    from specontext_compiler.distill.train import cross_entropy
    torch.manual_seed(0)
    heads, groups, queries, keys = 6, 2, 3, 10
    log_probs = torch.randn(heads, queries, keys).log_softmax(-1)
    teacher = torch.rand(heads, queries, keys).softmax(-1)
    # Head level: per head, per query, -sum(teacher * log p), averaged.
    want_head = -(teacher * log_probs).sum(-1).mean()
    assert torch.allclose(cross_entropy(teacher, log_probs, groups, "head"), want_head)
    # Group level, written out: the group's mean distribution against the mean of its heads' targets.
    terms = []
    for g in range(groups):
        members = range(g * heads // groups, (g + 1) * heads // groups)
        mixture = torch.stack([log_probs[h].exp() for h in members]).mean(0)
        target = torch.stack([teacher[h] for h in members]).mean(0)
        terms.append(-(target * mixture.log()).sum(-1))
    assert torch.allclose(cross_entropy(teacher, log_probs, groups, "group"), torch.stack(terms).mean(), atol=1e-6)


def test_group_loss_lets_heads_of_a_group_split_the_target():
    """Two heads, one on each of two keys, fit a group target that spreads over both: the group
    loss is at its minimum (the target's entropy); the per-head loss against an even per-head
    target is not."""
    from specontext_compiler.distill.train import cross_entropy
    split = torch.tensor([[[0.999, 0.001]], [[0.001, 0.999]]]).log()      # [2 heads, 1 query, 2 keys]
    even = torch.full((2, 1, 2), 0.5)
    entropy = torch.tensor(2.0).log()
    assert torch.allclose(cross_entropy(even, split, 1, "group"), entropy, atol=1e-3)
    assert cross_entropy(even, split, 1, "head") > entropy + 1.0
