"""A plan runs code: every file in it is checked against manifest.json, the numbers against each other.

One real plan of the tiny preset is compiled once; each test copies it, changes one thing and
asserts that load_plan (the path of inspect, run, eval and bind) refuses it with one line that
names the file, and that `specontext inspect` exits 2 with that line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specontext_compiler import cli
from specontext_compiler.driver import compile_model
from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.plan import load_plan
from specontext_compiler.runtime.plan_integrity import MANIFEST_FILE, plan_manifest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "tiny"
    compile_model("tiny-llama", target="h100", max_len=512, budget=256, out=out)
    return out


@pytest.fixture
def plan_copy(compiled, tmp_path) -> Path:
    return Path(shutil.copytree(compiled, tmp_path / "plan"))


def refused(plan_dir: Path, *words: str) -> str:
    with pytest.raises(PlanError) as info:
        load_plan(plan_dir)
    message = str(info.value)
    assert "\n" not in message and "recompile" in message
    for word in words:
        assert word in message, message
    result = CliRunner().invoke(cli.app, ["inspect", str(plan_dir)], env={"SPECONTEXT_DEBUG": None})
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    return message


def edit_plan_json(plan_dir: Path, change) -> None:
    data = json.loads((plan_dir / "plan.json").read_text())
    change(data)
    (plan_dir / "plan.json").write_text(json.dumps(data, indent=2))


def reseal(plan_dir: Path) -> None:
    """Rewrite the manifest over the edited files: what passes the integrity check but not the semantic one."""
    files = {str(p.relative_to(plan_dir)): p.read_bytes() for p in plan_dir.rglob("*")
             if p.is_file() and p.name not in (MANIFEST_FILE, "plan.json") and "__pycache__" not in p.parts}
    (plan_dir / MANIFEST_FILE).write_text(plan_manifest((plan_dir / "plan.json").read_text(), files)[MANIFEST_FILE])


def test_the_compiled_plan_loads_and_its_manifest_covers_every_file(compiled):
    plan = load_plan(compiled)
    listed = set(json.loads((compiled / MANIFEST_FILE).read_text())["files"])
    on_disk = {str(p.relative_to(compiled)) for p in compiled.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert listed == on_disk and "plan.json" in listed and {k.file for k in plan.kernels} <= listed


@pytest.mark.parametrize("change, field", [
    (lambda d: d["graph"].update(sha256=""), "graph.sha256 blanked"),
    (lambda d: d["workload"].update(budget=0), "budget 0"),
    (lambda d: d["workload"].update(max_len=4096), "max_len"),
    (lambda d: d["segments"].pop(), "a segment removed"),
    (lambda d: d["kernels"][0].update(sha256="0" * 64), "a kernel hash"),
])
def test_an_edit_to_plan_json_is_refused_naming_it(plan_copy, change, field):
    edit_plan_json(plan_copy, change)
    refused(plan_copy, "plan.json", "changed after compilation")


def plan_files(plan_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(plan_dir)) for p in plan_dir.rglob("*")
                  if p.is_file() and p.name not in ("plan.json", MANIFEST_FILE))


@pytest.mark.parametrize("name", ["decode_graph.py", "report.md", "kernels/elastic_load.py", "kernels/kv_append.py",
                                  "kernels/retrieval_scores.py", "kernels/sparse_decode.py"])
def test_an_edit_to_any_other_file_is_refused_naming_it(plan_copy, name):
    assert name in plan_files(plan_copy)
    path = plan_copy / name
    path.write_text(path.read_text() + "\nprint('not what the compiler wrote')\n")
    refused(plan_copy, name, "changed after compilation")


def test_a_deleted_file_is_refused_naming_it(plan_copy):
    (plan_copy / "kernels" / "sparse_decode.py").unlink()
    refused(plan_copy, "sparse_decode.py", "missing")


def test_a_missing_or_edited_manifest_is_refused(plan_copy):
    manifest = plan_copy / MANIFEST_FILE
    record = json.loads(manifest.read_text())
    record["files"]["report.md"] = "0" * 64
    manifest.write_text(json.dumps(record))
    refused(plan_copy, MANIFEST_FILE, "changed after compilation")
    manifest.write_text("{")
    refused(plan_copy, MANIFEST_FILE, "corrupted")
    manifest.unlink()
    refused(plan_copy, MANIFEST_FILE)


def test_a_manifest_entry_outside_the_plan_is_refused(plan_copy):
    outside = plan_manifest((plan_copy / "plan.json").read_text(), {"../../outside.txt": b"x"})
    (plan_copy / MANIFEST_FILE).write_text(outside[MANIFEST_FILE])
    refused(plan_copy, MANIFEST_FILE, "outside the plan directory")


@pytest.mark.parametrize("change, words", [
    (lambda d: d["workload"].update(budget=0), ["workload.budget is 0", "at least 1"]),
    (lambda d: d["workload"].update(budget=100000), ["workload.budget 100000 is larger than workload.max_len 512"]),
    (lambda d: d["workload"].update(max_len=4096), ["last segment ends at 512", "max_len 4096"]),
    (lambda d: d["workload"].update(max_len="512"), ["workload.max_len is a str"]),
    (lambda d: d["segments"].pop(0), ["segments[0] starts at", "after workload.prompt_len 32"]),
    (lambda d: d["segments"][1].update(from_len=d["segments"][1]["from_len"] + 1), ["segments[1] starts at"]),
    (lambda d: d["segments"][0].update(gpu_layers=[0, 1, 7]), ["segments[0]", "each of the 3 layers"]),
    (lambda d: d["schedule"].append({"layer": 9, "issue_before_layer": 0, "wait_before_layer": 9}),
     ["schedule[0].layer is 9"]),
    (lambda d: d["target"].update(hbm_gbps=float("nan")), ["plan.target.hbm_gbps is nan", "finite"]),
    (lambda d: d.update(prediction=None), ["prediction is null"]),
    (lambda d: d.update(segments={"from_len": 0}), ["segments is a dict"]),
    (lambda d: d["model"].update(num_layers=True), ["model.num_layers is a bool"]),
])
def test_a_resealed_but_inconsistent_plan_is_refused(plan_copy, change, words):
    edit_plan_json(plan_copy, change)
    reseal(plan_copy)
    message = refused(plan_copy, "plan.json", *words)
    assert "inconsistent" in message or "schema" in message


def test_the_decode_graph_loader_refuses_a_blank_digest(compiled):
    from specontext_compiler.runtime.graph_loader import load_graph
    plan = load_plan(compiled)
    with pytest.raises(PlanError, match="decode_graph.py does not match"):
        load_graph(compiled / "decode_graph.py", dataclasses.replace(plan.graph, sha256=""))


def test_plan_code_is_compiled_from_its_checked_bytes_never_from_a_bytecode_cache(plan_copy):
    from specontext_compiler.runtime.graph_loader import load_graph
    from specontext_compiler.runtime.plan_integrity import spec_for_verified_source
    plan = load_plan(plan_copy)
    load_graph(plan_copy / "decode_graph.py", plan.graph)
    assert not (plan_copy / "__pycache__").exists()       # nothing written that a later load could read
    spec = spec_for_verified_source("swapped_graph", plan_copy / "decode_graph.py", "0" * 64)
    with pytest.raises(PlanError, match="changed while the plan was loading"):
        spec.loader.exec_module(__import__("types").ModuleType("swapped_graph"))
