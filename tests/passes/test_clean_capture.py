import pytest
import torch

from specontext_compiler.passes.clean_capture import CleanCapture
from specontext_compiler.passes.common import PassError, count_ops


def _meta_mentions(gm):
    meta = torch.device("meta")
    found = []
    for node in gm.graph.nodes:
        values = list(node.args) + list(node.kwargs.values())
        if any(isinstance(v, torch.device) and v == meta for v in values):
            found.append(node)
    return found


def test_removes_asserts_and_meta_devices(captured):
    gm = captured.graph_module
    assert count_ops(gm)["aten._assert_tensor_metadata.default"] > 0 and _meta_mentions(gm)
    cleaner = CleanCapture()
    cleaner(gm)
    gm.graph.lint()
    assert count_ops(gm)["aten._assert_tensor_metadata.default"] == 0
    assert not _meta_mentions(gm)
    assert count_ops(gm)["aten.to.device"] == 0
    assert cleaner.counters["asserts_removed"] > 0 and cleaner.counters["devices_retargeted"] >= 1
    assert "meta" not in gm.code


def test_factory_ops_follow_the_input():
    # A graph with arange(device=meta), as DeepSeek's MoE routing exports.
    graph = torch.fx.Graph()
    ids = graph.placeholder("input_ids")
    n = graph.call_function(torch.ops.aten.sym_size.int, (ids, 1))
    ar = graph.call_function(torch.ops.aten.arange.default, (n,), {"device": torch.device("meta")})
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (ar, ids)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    CleanCapture()(gm)
    x = torch.randint(0, 9, (2, 5))
    assert torch.equal(gm(x), torch.arange(5) + x)


def test_refuses_graph_without_input_ids():
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    with pytest.raises(PassError, match="input_ids"):
        CleanCapture()(torch.fx.GraphModule(torch.nn.Module(), graph))
