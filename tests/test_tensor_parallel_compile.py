"""`compile --gpus N` end to end: plans for N = 1..8 of the llama-3.1-8b preset on h200 are consistent,
an infeasible N is one line (exit 2) naming the smallest N that fits, a one-GPU plan carries nothing new."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli, driver
from specontext_compiler.cost_models import memory
from specontext_compiler.cost_models.target import INTERCONNECT_KEYS
from specontext_compiler.models import load_preset_config
from specontext_compiler.runtime.plan import load_plan

GPUS = (1, 2, 4, 8)
runner = CliRunner()


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """One compiled plan per N (the same workload: 128k, batch 8, which offloads layers on one H200)."""
    root = tmp_path_factory.mktemp("tp")
    compiled = {}
    for gpus in GPUS:
        driver.compile_model("llama-3.1-8b", "h200", "128k", batch=8, dlm="self:0", out=root / f"g{gpus}",
                             gpus=gpus)
        compiled[gpus] = load_plan(root / f"g{gpus}")
    return compiled


def _last_memory(plan) -> dict:
    return plan.prediction["memory_breakdown"][-1]


def test_one_gpu_plan_carries_no_tensor_parallel_record(plans):
    data = json.loads((plans[1].directory / "plan.json").read_text())
    assert "tensor_parallel" not in data
    assert not set(INTERCONNECT_KEYS) & (set(data["target"]) | set(data["target"]["sources"]))


def test_only_the_one_gpu_plan_merges_projections(plans):
    """A rank shards each weight by its own name (runtime/tensor_parallel.py): no merged inputs there."""
    for gpus, plan in plans.items():
        merged = [i for i in plan.graph.inputs if i["kind"] == "merged"]
        assert len(merged) == (2 * plan.model.num_layers if gpus == 1 else 0)
        assert ("MergeProjections" in [p.name for p in plan.passes]) == (gpus == 1)


@pytest.mark.parametrize("gpus", GPUS[1:])
def test_per_rank_memory_adds_up_to_the_whole(plans, gpus):
    whole, plan = plans[1], plans[gpus]
    tp = plan.tensor_parallel
    assert tp["gpus"] == gpus and plan.model == whole.model     # the model recorded whole
    assert tp["kv_heads_per_rank"] * gpus == whole.model.num_kv_heads
    assert tp["query_heads_per_rank"] * gpus == whole.model.num_heads
    assert sorted(h for heads in tp["rank_kv_heads"] for h in heads) == list(range(whole.model.num_kv_heads))
    rank_weights, whole_weights = _last_memory(plan)["weights"], _last_memory(whole)["weights"]
    assert rank_weights == tp["weight_bytes_per_rank"]
    assert rank_weights * gpus == whole_weights + (gpus - 1) * tp["replicated_weight_bytes"]
    # KV per resident layer and per offloaded layer, summed over the ranks, is the one-GPU plan's
    for key, layers in (("resident_kv", "gpu_layers"), ("host_pinned", "offloaded_layers")):
        rank_seg, whole_seg = plan.segments[-1], whole.segments[-1]
        if getattr(rank_seg, layers) and getattr(whole_seg, layers):
            per_layer = _last_memory(plan)[key] / len(getattr(rank_seg, layers))
            assert per_layer * gpus == pytest.approx(_last_memory(whole)[key] / len(getattr(whole_seg, layers)))
    assert tp["retrieval_head"]["split"] == "per KV head"
    assert tp["retrieval_head"]["kv_heads_per_rank"] == tp["kv_heads_per_rank"]


@pytest.mark.parametrize("gpus", GPUS)
def test_every_rank_fits_its_gpu_and_its_share_of_host_memory(plans, gpus):
    plan = plans[gpus]
    pinnable = memory.pinnable_host_bytes(plan.target["host_memory_bytes"], gpus)
    for entry in plan.prediction["memory_breakdown"]:
        assert entry["total"] <= plan.target["gpu_memory_bytes"]
        assert entry["host_pinned"] <= pinnable


def test_allreduce_grows_with_gpus_and_more_gpus_offload_less(plans):
    terms = [plans[n].tensor_parallel["allreduce_ms_per_layer"] for n in GPUS[1:]]
    assert all(a < b for a, b in zip(terms, terms[1:]))
    offloaded = [len(plans[n].segments[-1].offloaded_layers) for n in GPUS]
    assert offloaded[0] > 0, "the workload should offload on one GPU for this test to mean anything"
    assert all(a >= b for a, b in zip(offloaded, offloaded[1:]))


def test_inspect_shows_the_split(plans):
    result = runner.invoke(cli.app, ["inspect", str(plans[4].directory)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "4, tensor parallel: 8 query heads, 2 KV heads" in result.stdout
    assert "rank 3: KV 6,7" in result.stdout and "split per KV head" in result.stdout
    assert "GPU memory per segment (GiB, per rank)" in result.stdout


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def llama_70b_dir(tmp_path):
    """A Llama-3.1-70B config (no weights): 141 GB of bf16 weights."""
    config = load_preset_config("llama-3.1-8b").to_dict()
    config.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
    directory = tmp_path / "llama-70b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("target, gpus, smallest", [("h100", "1", "2"), ("a100-40gb", "4", "8")])
def test_too_little_memory_per_rank_is_one_line_naming_the_smallest_gpus(llama_70b_dir, tmp_path, target, gpus,
                                                                         smallest):
    out = tmp_path / "plan"
    result = runner.invoke(cli.app, ["compile", str(llama_70b_dir), "--target", target, "--gpus", gpus,
                                     "--dlm", "self:0", "-o", str(out)])
    _one_line_error(result, f"--gpus {gpus}:", f"the smallest --gpus that fits is {smallest}")
    assert not out.exists()


def test_gpus_not_dividing_the_query_heads_is_one_line(tmp_path):
    out = tmp_path / "plan"
    result = runner.invoke(cli.app, ["compile", "llama-3.1-8b", "--target", "h200", "--gpus", "3",
                                     "--dlm", "self:0", "-o", str(out)])
    _one_line_error(result, "3 does not divide the 32 query heads", "the smallest --gpus that fits is 1")
    assert not out.exists()
