"""Load the plan's decode graph (decode_graph.py) after checking it is the file the compiler wrote.

The graph is plain Python over torch ops and the specontext:: ops; it is imported from its file
(not exec'd from a string) so tracebacks point at real lines. The sha256 in plan.json guards
against a plan directory whose graph was edited or truncated after compilation.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Callable

from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.plan_integrity import spec_for_verified_source
from specontext_compiler.runtime.weights import WEIGHT_KINDS


def load_graph(path: str | Path, record) -> Callable:
    """forward(params: list[Tensor], input_ids [B,T], position_ids [B,T]) -> logits [B,1,vocab] (the
    last token's; [B,T,vocab] from plans compiled before the capture kept only it)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"the plan's decode graph {path} is missing; recompile the plan with `specontext compile`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record.sha256:      # a blank digest is refused too
        raise PlanError(f"{path.name} does not match plan.json (sha256 {digest[:12]} != "
                        f"{str(record.sha256)[:12]}); the file was changed: recompile the plan")
    module_name = f"specontext_decode_graph_{digest[:16]}"
    spec = spec_for_verified_source(module_name, path, digest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = sum(1 for i in record.inputs if i.get("kind") in WEIGHT_KINDS)
    if record.inputs and expected != module.NUM_PARAMS:
        raise PlanError(f"{path.name} takes {module.NUM_PARAMS} weight tensors but plan.json lists {expected}; "
                        "recompile the plan")
    return module.forward
