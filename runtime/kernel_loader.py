"""Load a plan's specialized kernel modules (plan_dir/kernels/*.py) after checking their hashes.

The files were written by specontext_compiler/codegen/emit_kernels.py and hashed in plan.json;
a file that was edited, truncated or swapped is refused before any of its code runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.plan_integrity import spec_for_verified_source


def load_plan_kernels(plan_dir, records) -> dict[str, ModuleType]:
    """{family: module} for the plan's kernel records (plan_records.KernelRecord)."""
    modules = {}
    for record in records:
        path = Path(plan_dir) / record.file
        if not path.is_file():
            raise PlanError(f"plan kernel {record.file} is missing from {plan_dir}; recompile the plan")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != record.sha256:
            raise PlanError(f"plan kernel {record.file} does not match the sha256 in plan.json "
                            f"(edited or corrupted); recompile the plan")
        modules[record.family] = _import(path, f"specontext_plan_kernels.{record.family}_{digest[:16]}", digest)
    return modules


def _import(path: Path, name: str, digest: str) -> ModuleType:
    """Import a file under a name unique to its content, so two plans can be loaded side by side."""
    if name in sys.modules:
        return sys.modules[name]
    spec = spec_for_verified_source(name, path, digest)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # Triton's @jit looks the source up through the module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
