"""MergeProjections: the linears over one input become one GEMM over the concatenated weight that
computes the same values; look-alikes (other inputs, a bias, a weight read elsewhere) are left."""
import pytest
import torch

from specontext_compiler.codegen.emit_graph import emit_graph_source
from specontext_compiler.passes.common import META_KEY, PassError, WeightInput, count_ops, weight_inputs
from specontext_compiler.passes.merge_projections import MergeProjections, merged_name
from specontext_compiler.runtime.weights import graph_params

aten = torch.ops.aten


def _exported(module, *args):
    """The module's aten graph with its parameters as annotated placeholders, as capture leaves them."""
    program = torch.export.export(module, args, strict=False)
    gm = program.graph_module
    targets = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs
               if spec.kind.name == "PARAMETER"}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in targets:
            node.meta[META_KEY] = WeightInput(targets[node.name], "parameter")
    return gm


def _merged(module, *args):
    """(outputs before, outputs after, counters): the module run as captured, then merged and
    run with the weights bound as the runtime binds them."""
    gm = _exported(module, *args)
    with torch.no_grad():
        before = gm(*graph_params(module, weight_inputs(gm)), *args)
    merge = MergeProjections()
    merge(gm)
    with torch.no_grad():
        after = gm(*graph_params(module, weight_inputs(gm)), *args)
    return before, after, merge.counters, gm


class Projections(torch.nn.Module):
    """q/k/v over one input, gate/up over another: a layer's two merges."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, n, bias=False) for n in (32, 16, 16))
        self.gate, self.up = (torch.nn.Linear(32, 48, bias=False) for _ in range(2))

    def forward(self, x, y):
        q = self.q(x).view(x.shape[0], x.shape[1], 2, 16)      # a view of the q slice's rows
        return q.transpose(1, 2), self.k(x), self.v(x), torch.nn.functional.silu(self.gate(y)) * self.up(y)


def test_merges_each_input_group_and_computes_the_same_values():
    module = Projections().eval()
    inputs = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    before, after, counters, gm = _merged(module, *inputs)
    assert dict(counters) == {"merges": 2, "parts": 5}
    assert count_ops(gm)["aten.linear.default"] == 2 and count_ops(gm)["aten.slice.Tensor"] == 5
    for got, expected in zip(after, before):
        torch.testing.assert_close(got, expected)
    merged = [i for i in weight_inputs(gm) if i["kind"] == "merged"]
    assert [(i["target"], i["parts"]) for i in merged] == [
        ("q+k+v.weight", ["q.weight", "k.weight", "v.weight"]), ("gate+up.weight", ["gate.weight", "up.weight"])]
    for node in gm.graph.nodes:                  # shape facts on the new nodes
        if node.op == "placeholder" and getattr(node.meta.get(META_KEY), "kind", None) == "merged":
            assert tuple(node.meta["val"].shape) == ((64, 32) if "q" in node.name else (96, 32))
        if node.op == "call_function" and node.target is aten.slice.Tensor:
            assert node.meta["val"].shape[-1] in (32, 16, 48)


class DifferentInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)

    def forward(self, x, y):
        return self.a(x), self.b(y)


class Biased(torch.nn.Module):
    """Qwen2's q/k/v: a bias each (a merge would need the biases merged too)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    def forward(self, x, y):
        return self.a(x), self.b(x)


class SharedWeight(torch.nn.Module):
    """b's weight is read by a second linear: merging it would keep it twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)

    def forward(self, x, y):
        return self.a(x), self.b(x), torch.nn.functional.linear(y, self.b.weight)


@pytest.mark.parametrize("module", [DifferentInputs(), Biased(), SharedWeight()])
def test_look_alikes_are_left_alone(module):
    inputs = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    before, after, counters, gm = _merged(module.eval(), *inputs)
    assert not counters and all(i["kind"] == "parameter" for i in weight_inputs(gm))
    for got, expected in zip(after, before):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_merges_two_layers_of_a_captured_llama_per_layer(rewritten):
    gm, layers = rewritten.graph_module, 3
    linears = count_ops(gm)["aten.linear.default"]
    merge = MergeProjections()
    merge(gm)
    assert dict(merge.counters) == {"merges": 2 * layers, "parts": 5 * layers}
    assert count_ops(gm)["aten.linear.default"] == linears - 3 * layers
    source, record = emit_graph_source(gm)
    inputs = record["inputs"]
    assert inputs[1] == {"placeholder": "p_model_layers_0_self_attn_q_proj_k_proj_v_proj_weight",
                         "target": "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight", "kind": "merged",
                         "parts": [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"], "dim": 0}
    assert sum(i["kind"] == "merged" for i in inputs) == 2 * layers
    assert len(inputs) == len(rewritten.param_names) - 3 * layers + 2      # 5 parts -> 2 a layer, + ids, pos
    assert [i["placeholder"] for i in inputs[-2:]] == ["input_ids", "position_ids"]
    assert f"NUM_PARAMS = {len(inputs) - 2}" in source


def test_refuses_a_tensor_parallel_graph(annotated):
    from specontext_compiler.passes.insert_all_reduce import InsertAllReduce
    InsertAllReduce()(annotated.graph_module)
    with pytest.raises(PassError, match="tensor-parallel"):
        MergeProjections()(annotated.graph_module)


def test_merged_names_read_like_state_dict_names():
    assert merged_name(("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")) \
        == "model.layers.3.mlp.gate_proj+up_proj.weight"
    assert merged_name(("a.weight", "a.b.weight")) == "a.weight+a.b.weight"
