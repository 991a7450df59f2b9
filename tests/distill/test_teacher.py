"""Teacher rows: the mean or max over layers of each layer's attention, over the selectable keys only."""
import pytest
import torch

from specontext_compiler.distill import teacher
from specontext_compiler.errors import SpecontextError

RECENT = 16


def test_teacher_is_a_distribution_over_selectable_keys(model):
    seq_len = 200
    ids = torch.randint(0, model.config.vocab_size, (seq_len,))
    positions = teacher.query_positions(seq_len, 24, must=[150, 5], recent=RECENT, min_context=8, seed=0)
    assert 150 in positions.tolist() and 5 not in positions.tolist()     # too early to teach anything
    sample = teacher.collect(model, ids, positions, feature_layers=(0, 2), recent=RECENT)
    rows = sample.teacher.float()
    assert sample.teacher.dtype == torch.float16 and rows.shape == (4, len(positions), seq_len)
    assert torch.all(rows[..., 0] == 0)
    for index, position in enumerate(positions.tolist()):
        assert torch.all(rows[:, index, position - RECENT + 1:] == 0)
    torch.testing.assert_close(rows.sum(-1), torch.ones(4, len(positions)), atol=2e-3, rtol=0)


@pytest.mark.parametrize("aggregate,layers", [("mean", None), ("max", None), ("mean", (1,)), ("max", (0, 1))])
def test_teacher_matches_eager_attention_and_features_match_hidden_states(model, aggregate, layers):
    seq_len = 120
    ids = torch.randint(0, model.config.vocab_size, (seq_len,))
    positions = torch.tensor([40, 77, 119])
    sample = teacher.collect(model, ids, positions, feature_layers=(1, 2), recent=RECENT, aggregate=aggregate,
                             layers=layers)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(previous)
    allowed = teacher.selectable_keys(positions, seq_len, RECENT)
    per_layer = [a[0][:, positions] * allowed for i, a in enumerate(out.attentions)
                 if layers is None or i in layers]
    per_layer = [w / w.sum(-1, keepdim=True) for w in per_layer]
    stacked = torch.stack(per_layer)
    expected = stacked.amax(0) if aggregate == "max" else stacked.mean(0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(sample.teacher.float(), expected, atol=2e-3, rtol=1e-2)
    features = torch.cat([out.hidden_states[1][0], out.hidden_states[2][0]], -1)
    torch.testing.assert_close(sample.features.float(), features, atol=1e-2, rtol=1e-2)


def test_a_query_without_selectable_keys_is_refused(model):
    with pytest.raises(SpecontextError, match="no selectable key"):
        teacher.collect(model, torch.zeros(64, dtype=torch.long), torch.tensor([RECENT]), (0,), RECENT)
    with pytest.raises(SpecontextError, match="longer sequence"):
        teacher.query_positions(50, 8, [], recent=RECENT, min_context=64, seed=0)


def test_a_bf16_model_gives_bf16_features_and_about_the_fp32_teacher(model):
    import copy
    seq_len, positions = 120, torch.tensor([60, 119])
    ids = torch.randint(0, model.config.vocab_size, (seq_len,))
    want = teacher.collect(model, ids, positions, feature_layers=(1,), recent=RECENT)
    low = copy.deepcopy(model).to(torch.bfloat16)
    got = teacher.collect(low, ids, positions, feature_layers=(1,), recent=RECENT)
    assert got.features.dtype == torch.bfloat16 and got.teacher.dtype == torch.float16
    assert float((got.teacher.float() - want.teacher.float()).abs().sum(-1).max()) < 0.1    # total variation


def test_hidden_states_beyond_fp16_range_are_stored_in_bf16_not_as_inf(model):
    """Gemma-3-270M's fp32 hidden states reach ~76,000, past fp16's 65,504: stored in fp16 they
    became inf and the head's feature norm NaN (validation loss nan)."""
    import copy
    seq_len, positions = 120, torch.tensor([60, 119])
    ids = torch.randint(0, model.config.vocab_size, (seq_len,))
    assert teacher.collect(model, ids, positions, feature_layers=(0,), recent=RECENT).features.dtype == torch.float16
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.model.embed_tokens.weight.mul_(1e6)        # feature 0 is the embedding output itself
    sample = teacher.collect(loud, ids, positions, feature_layers=(0,), recent=RECENT)
    assert sample.features.dtype == torch.bfloat16 and torch.isfinite(sample.features).all()
    assert float(sample.features.float().abs().max()) > torch.finfo(torch.float16).max
