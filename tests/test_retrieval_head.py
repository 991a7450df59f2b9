"""RetrievalHead: projection vs HF, RoPE scaling vs transformers, save/load round trip, counts."""
import pytest
import torch

from specontext_compiler.errors import ModelError
from specontext_compiler.runtime.retrieval_head import RetrievalHead, rope_inv_freq


def _head(**over):
    torch.manual_seed(1)
    args = dict(embedding=torch.randn(50, 16), norm_weight=torch.rand(16) + 0.5, q_weight=torch.randn(4 * 8, 16),
                k_weight=torch.randn(2 * 8, 16), q_bias=torch.randn(32), num_heads=4, num_kv_heads=2,
                head_dim=8, norm_eps=1e-6, rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 64},
                max_position_embeddings=256)
    return RetrievalHead(**(args | over))


def test_project_shapes_and_save_load_round_trip(tmp_path):
    head = _head()
    ids, pos = torch.randint(0, 50, (2, 7)), torch.arange(7).repeat(2, 1) + 100
    q, k = head.project(ids, pos)
    assert q.shape == (2, 4, 7, 8) and k.shape == (2, 2, 7, 8)
    loaded = RetrievalHead.load(head.save(tmp_path / "head.safetensors"))
    q2, k2 = loaded.project(ids, pos)
    assert torch.equal(q, q2) and torch.equal(k, k2) and loaded.rope == head.rope
    assert loaded.param_count() == head.param_count() == 50 * 16 + 16 + 32 * 16 + 16 * 16 + 32


def test_shared_embedding_is_not_stored_and_must_be_attached(tmp_path):
    head = _head(embedding_shared=True)
    path = head.save(tmp_path / "shared.safetensors")
    full_size = _head().save(tmp_path / "full.safetensors").stat().st_size
    assert full_size - path.stat().st_size >= 50 * 16 * 4          # the table was not stored
    bare = RetrievalHead.load(path)
    with pytest.raises(ModelError, match="embedding"):
        bare.project(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ModelError, match="needs"):
        bare.attach_embedding(torch.randn(49, 16))
    again = RetrievalHead.load(path, embedding=head.embedding, dtype=torch.float64)
    assert again.q_weight.dtype == torch.float64 and again.embedding is head.embedding
    assert head.param_count() == 16 + 32 * 16 + 16 * 16 + 32
    assert head.param_count(include_embedding=True) == head.param_count() + 50 * 16


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048},
])
def test_rope_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=8192,
                         rope_parameters=dict(rope))
    ours, scale = rope_inv_freq(rope, 128, 8192)
    if rope["rope_type"] == "default":
        ref, ref_scale = 1.0 / rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128), 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    assert torch.allclose(ours, ref.float(), rtol=1e-5) and scale == pytest.approx(ref_scale)


def test_unknown_rope_is_refused():
    with pytest.raises(ModelError, match="not supported"):
        rope_inv_freq({"rope_type": "longrope", "factor": 2.0}, 8, 64)


def _fused(plain: RetrievalHead, zero_feature_path: bool = False) -> RetrievalHead:
    """A fused head (2 feature blocks) whose embedding half is `plain`'s projections."""
    torch.manual_seed(2)
    hidden = plain.hidden_size
    q_extra, k_extra = torch.randn(plain.q_weight.shape[0], hidden), torch.randn(plain.k_weight.shape[0], hidden)
    if zero_feature_path:
        q_extra, k_extra = q_extra * 0, k_extra * 0
    return RetrievalHead(embedding=plain.embedding, norm_weight=plain.norm_weight,
                         q_weight=torch.cat([plain.q_weight, q_extra], 1), k_weight=torch.cat([plain.k_weight, k_extra], 1),
                         q_bias=plain.q_bias, num_heads=4, num_kv_heads=2, head_dim=8, norm_eps=1e-6,
                         rope=plain.rope, max_position_embeddings=256, feature_layers=(1, 3),
                         fc_weight=torch.randn(hidden, 2 * hidden), feature_norm_weight=torch.rand(2 * hidden) + 0.5)


def test_fused_head_reads_previous_features_and_round_trips(tmp_path):
    plain = _head()
    fused = _fused(plain)
    assert fused.fused and not plain.fused and fused.feature_width == 32 and fused.input_width == 32
    ids, pos = torch.randint(0, 50, (1, 6)), torch.arange(6)[None]
    hidden_states = [torch.randn(1, 6, 16) for _ in range(4)]
    features = fused.features_of(hidden_states)
    assert torch.equal(features, torch.cat([hidden_states[1], hidden_states[3]], -1))
    shifted = RetrievalHead.shift_features(features)
    assert torch.equal(shifted[:, 0], torch.zeros(1, 32)) and torch.equal(shifted[:, 1:], features[:, :-1])
    q, k = fused.project(ids, pos, shifted)
    # Projecting the last two tokens alone, with the features before them carried in, gives the same rows.
    tail = RetrievalHead.shift_features(features[:, 4:], before=features[:, 3])
    q_tail, k_tail = fused.project(ids[:, 4:], pos[:, 4:], tail)
    assert torch.allclose(q_tail, q[:, :, 4:], atol=1e-5) and torch.allclose(k_tail, k[:, :, 4:], atol=1e-5)
    assert not torch.allclose(fused.project(ids, pos)[1], k)        # the features matter
    loaded = RetrievalHead.load(fused.save(tmp_path / "fused.safetensors"))
    assert loaded.feature_layers == (1, 3)
    assert torch.equal(loaded.project(ids, pos, shifted)[1], k)
    # wider q/k (the feature half), fc [16, 32] and the feature norm [32]
    assert loaded.param_count() == fused.param_count() == plain.param_count() + (32 + 16) * 16 + 16 * 32 + 32


def test_fused_head_with_a_zero_feature_path_equals_the_plain_head():
    plain = _head()
    fused = _fused(plain, zero_feature_path=True)
    ids, pos = torch.randint(0, 50, (2, 5)), torch.arange(5).repeat(2, 1)
    for got, want in zip(fused.project(ids, pos, torch.randn(2, 5, 32)), plain.project(ids, pos)):
        assert torch.allclose(got, want, atol=1e-5)
