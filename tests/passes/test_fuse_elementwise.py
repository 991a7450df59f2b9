"""FuseElementwise: the norms, RoPE and MLP activation of a captured graph become fused ops that
compute the same values, and look-alike runs that compute something else are left alone."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from specontext_compiler.capture import capture_decode_graph
from specontext_compiler.passes.common import count_ops
from specontext_compiler.passes.fuse_elementwise import FuseElementwise
from specontext_compiler.pipeline import run_pipeline

aten = torch.ops.aten


def _exported(module, *args):
    """The module as an aten GraphModule with shape facts on its nodes, as the capture makes,
    cleaned as the pipeline's first pass cleans it (export's runtime asserts removed)."""
    gm = torch.export.export(module, args, strict=False).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _fused(module, *args):
    gm = _exported(module, *args)
    fusion = FuseElementwise()
    fusion(gm)
    return gm, fusion.counters


class Block(torch.nn.Module):
    """Residual add, Llama RMSNorm, rotate-half RoPE of a [B, H, T, D] view and silu(gate) * up."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = LlamaRMSNorm(width, eps=1e-6)
        self.norm.weight.data = torch.randn(width)
        self.gate, self.up = torch.nn.Linear(width, 48), torch.nn.Linear(width, 48)

    def forward(self, x, delta, cos, sin):
        total = x + delta
        normed = self.norm(total)
        batch, steps, width = normed.shape
        q = normed.view(batch, steps, self.heads, width // self.heads).transpose(1, 2)
        k = (normed * 2).view(batch, steps, self.heads, width // self.heads).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mlp = torch.nn.functional.silu(self.gate(normed)) * self.up(normed)
        return total, q, k, mlp


def _block_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    x, delta = torch.randn(3, 1, 32, dtype=dtype), torch.randn(3, 1, 32, dtype=dtype)
    angles = torch.randn(3, 1, 16)
    return x, delta, angles.cos().to(dtype), angles.sin().to(dtype)


def test_fuses_the_block_and_computes_the_same_values():
    block = Block().eval()
    inputs = _block_inputs()
    gm, counters = _fused(block, *inputs)
    assert dict(counters) == {"rms_norm": 1, "add_rms_norm": 1, "rotary": 2, "silu_mul": 1}
    ops = count_ops(gm)
    for gone in ("aten.rsqrt.default", "aten.neg.default", "aten.silu.default", "aten.pow.Tensor_Scalar"):
        assert ops[gone] == 0, gone
    with torch.no_grad():
        for fused, unfused in zip(gm(*inputs), block(*inputs)):
            torch.testing.assert_close(fused, unfused, atol=0, rtol=0)   # the CPU ops are the same ops


def test_bfloat16_norm_keeps_its_casts():
    block = Block().to(torch.bfloat16).eval()
    inputs = _block_inputs(torch.bfloat16)
    gm, counters = _fused(block, *inputs)
    assert counters["add_rms_norm"] == 1
    with torch.no_grad():
        for fused, unfused in zip(gm(*inputs), block(*inputs)):
            assert fused.dtype == unfused.dtype
            torch.testing.assert_close(fused, unfused, atol=0, rtol=0)


class GemmaNorm(torch.nn.Module):
    """Gemma's RMSNorm scales by (1 + w) in float32 before its cast: not Llama's, so not fused."""

    def __init__(self):
        super().__init__()
        self.norm = Gemma3RMSNorm(32)

    def forward(self, x):
        return self.norm(x)


class Interleaved(torch.nn.Module):
    """A RoPE that rotates (even, odd) pairs (GPT-J style): a cat and a neg, but not rotate_half."""

    def forward(self, x, cos, sin):
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


class SiluTwice(torch.nn.Module):
    """A silu whose output is read twice: fusing it into one product would drop the other reader."""

    def forward(self, gate, up):
        activated = torch.nn.functional.silu(gate)
        return activated * up, activated + 1


@pytest.mark.parametrize("module, inputs", [
    (GemmaNorm(), (torch.randn(2, 1, 32),)),
    (Interleaved(), (torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))),
    (SiluTwice(), (torch.randn(2, 8), torch.randn(2, 8))),
])
def test_look_alikes_are_left_alone(module, inputs):
    gm, counters = _fused(module.eval(), *inputs)
    assert not counters
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(*inputs))


def test_pipeline_fuses_every_layer_of_a_captured_llama_unless_told_not_to():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    layers = config.num_hidden_layers
    gm, records = run_pipeline(capture_decode_graph(config, dtype=torch.bfloat16).graph_module, [1], {1: 0})
    assert records[-2]["pass"] == "FuseElementwise"
    assert records[-2]["counters"] == {"rms_norm": 2 * layers + 1, "add_rms_norm": 2 * layers,
                                       "rotary": 2 * layers, "silu_mul": layers}
    counts = count_ops(gm)
    assert counts["specontext.rms_norm.default"] == 1      # the first norm: no residual add before it
    assert counts["aten.rsqrt.default"] == 0
    unfused, records = run_pipeline(capture_decode_graph(config, dtype=torch.bfloat16).graph_module, [1], {1: 0},
                                    fuse=False)
    assert not {"MergeProjections", "FuseElementwise"} & {r["pass"] for r in records}
    assert count_ops(unfused)["aten.rsqrt.default"] == 2 * layers + 1
