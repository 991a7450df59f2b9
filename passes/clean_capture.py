"""Clean the captured graph: drop export's metadata asserts, make devices follow the input.

The graph was exported on the meta device, so export recorded `device=meta` in its
`_assert_tensor_metadata` checks, in `aten.to.device` casts and in factory ops (arange, ...).
At run time every weight and input sits on one device, so:
  - `_assert_tensor_metadata` nodes are removed (they would fail on any real device);
  - `to.device(x, meta, dtype)` becomes `to.dtype(x, dtype)` and `to.dtype_layout` loses its device;
  - factory ops take the device of `input_ids`;
  - casts to the capture dtype (e.g. RMSNorm's `.to(input_dtype)`) take the dtype of the bound
    embedding weight instead, so one plan runs in bf16 on the GPU and in fp32 on the CPU.

Requires: the graph has an `input_ids` placeholder.
Ensures:  no node argument names the meta device; no `_assert_tensor_metadata` remains.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import PassError, finish

_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default)
_META = torch.device("meta")


def _names_meta(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_names_meta(v) for v in value)
    return isinstance(value, torch.device) and value == _META


class CleanCapture(PassBase):
    """Remove meta-device traces of the capture so the graph runs on any one device."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if not any(n.op == "placeholder" and n.name == "input_ids" for n in gm.graph.nodes):
            raise PassError("CleanCapture: the graph has no input_ids placeholder; capture it with "
                            "specontext_compiler.capture.capture_decode_graph")

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        input_ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
        device_node = None
        self._follow_weight_dtype(graph)
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _ASSERTS and not node.users and _names_meta(list(node.kwargs.values())):
                graph.erase_node(node)
                self.counters["asserts_removed"] += 1
            elif node.target is torch.ops.aten.to.device:
                self._to_dtype(node)
            elif _names_meta(node.kwargs.get("device")):
                if node.target is torch.ops.aten.to.dtype_layout:
                    node.update_kwarg("device", None)
                else:
                    device_node = device_node or self._device_of(graph, input_ids)
                    node.update_kwarg("device", device_node)
                self.counters["devices_retargeted"] += 1
        finish(gm)
        return PassResult(gm, True)

    def _to_dtype(self, node: Node) -> None:
        # aten.to.device(self, device, dtype, non_blocking, copy, memory_format)
        x, _device, dtype, *rest = node.args
        non_blocking = rest[0] if rest else node.kwargs.get("non_blocking", False)
        copy = rest[1] if len(rest) > 1 else node.kwargs.get("copy", False)
        node.target = torch.ops.aten.to.dtype
        node.args = (x, dtype, non_blocking, copy)
        node.kwargs = {}
        self.counters["devices_retargeted"] += 1

    def _follow_weight_dtype(self, graph) -> None:
        weights = [n for n in graph.nodes if n.op == "placeholder" and "embed" in n.name]
        val = weights[0].meta.get("val") if weights else None
        if val is None:
            return
        model_dtype = val.dtype
        with graph.inserting_after(weights[0]):
            dtype_node = graph.call_function(getattr, (weights[0], "dtype"))
        swap = lambda value: dtype_node if value is model_dtype else value  # noqa: E731
        for node in list(graph.nodes):
            if node.op != "call_function" or node is dtype_node:
                continue
            args = tuple(swap(a) for a in node.args)
            kwargs = {k: swap(v) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                self.counters["dtypes_follow_weights"] += 1

    @staticmethod
    def _device_of(graph, input_ids: Node) -> Node:
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            return graph.call_function(getattr, (input_ids, "device"))

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_function":
                assert node.target not in _ASSERTS or not _names_meta(list(node.kwargs.values())), node
                assert not _names_meta(list(node.args)) and not _names_meta(list(node.kwargs.values())), \
                    f"CleanCapture left a meta device in {node.format_node()}"
