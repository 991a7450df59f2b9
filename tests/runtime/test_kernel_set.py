"""Which kernels an engine gets: references on CPU, the plan's specialized files on CUDA, and the
packaged generic kernels when the engine's dtype differs from the one the plan's files are fixed to."""
from types import SimpleNamespace

import pytest
import torch

from specontext_compiler.runtime.kernel_set import FAMILIES, kernels_for
from specontext_compiler.runtime.plan_records import KernelRecord


def _plan(tmp_path):
    # A record naming a file that is not there: loading the plan's kernels would raise PlanError.
    return SimpleNamespace(kernels=[KernelRecord("elastic_load", "kernels/missing.py", "0")],
                           directory=tmp_path, workload=SimpleNamespace(dtype="bfloat16"))


def test_cpu_engines_use_the_references(tmp_path):
    assert kernels_for(torch.device("cpu"), _plan(tmp_path), torch.bfloat16).reference


def test_another_dtype_on_cuda_uses_the_packaged_kernels_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="specialized to bfloat16.*float32.*generic"):
        kernels = kernels_for(torch.device("cuda"), _plan(tmp_path), torch.float32)
    assert not kernels.reference
    assert all(kernels.modules[f].__name__ == f"specontext_compiler.runtime.kernels.{f}" for f in FAMILIES)


def test_the_plans_dtype_on_cuda_loads_the_plans_files(tmp_path):
    from specontext_compiler.errors import PlanError
    with pytest.raises(PlanError, match="missing"):
        kernels_for(torch.device("cuda"), _plan(tmp_path), torch.bfloat16)
