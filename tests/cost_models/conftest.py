"""ModelSpecs built by hand for the cost-model tests (no Hugging Face config needed)."""
import pytest

from specontext_compiler.cost_models.model_spec import ModelSpec


def llama31_8b() -> ModelSpec:
    return ModelSpec(name="llama-3.1-8b", architecture="LlamaForCausalLM", num_layers=32,
                     hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_heads=32,
                     num_kv_heads=8, head_dim=128, attention_kind="gqa", kv_elems_per_token=2 * 8 * 128,
                     max_positions=131072, param_count=8030261248)


def tiny_gqa() -> ModelSpec:
    """4 layers, small enough that the ILP without symmetry breaking solves instantly."""
    layer = 2 * 256 * 64 * (8 + 2) + 3 * 256 * 512 + 2 * 256
    return ModelSpec(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=256,
                     intermediate_size=512, vocab_size=1000, num_heads=8, num_kv_heads=2, head_dim=64,
                     attention_kind="gqa", kv_elems_per_token=2 * 2 * 64, max_positions=32768,
                     param_count=4 * layer + 2 * 1000 * 256 + 256)


@pytest.fixture
def llama() -> ModelSpec:
    return llama31_8b()


@pytest.fixture
def tiny() -> ModelSpec:
    return tiny_gqa()
