"""Plan schema: round trip, version checks, atomic writes."""
import json

import pytest

from specontext_compiler import compile_model
from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.plan import SCHEMA_VERSION, Plan, PrefetchSlot, load_plan
from specontext_compiler.runtime.plan_records import (GraphRecord, HeadRecord, KernelRecord, PassRecord, PlanModel,
                                                      PlanWorkload)
from specontext_compiler.runtime.plan import write_plan_dir as _write_plan_dir
from specontext_compiler.runtime.plan_integrity import plan_manifest


def write_plan_dir(plan, directory, files):
    """Write a plan as the driver does: the files plus the manifest over them and plan.json."""
    return _write_plan_dir(plan, directory, {**files, **plan_manifest(plan.to_json(), files)})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A plan the compiler wrote (tiny-llama), and the files beside its plan.json."""
    out = tmp_path_factory.mktemp("compiled") / "plan"
    compile_model("tiny-llama", target="h100", max_len=2048, budget=256, out=out)
    files = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*")
             if f.is_file() and f.name not in ("plan.json", "manifest.json")}
    return out, files


@pytest.fixture
def plan(compiled):
    return load_plan(compiled[0])


def test_round_trip_keeps_every_field(tmp_path, plan, compiled):
    write_plan_dir(plan, tmp_path / "p", compiled[1])
    loaded = load_plan(tmp_path / "p")
    assert loaded.to_dict() == plan.to_dict() and loaded.to_json() == plan.to_json()
    assert loaded.directory == tmp_path / "p"
    assert (tmp_path / "p" / "decode_graph.py").read_bytes() == compiled[1]["decode_graph.py"]
    middle = plan.segments[len(plan.segments) // 2]
    assert loaded.segment_for(middle.from_len) == middle
    assert loaded.segment_for(10_000).to_len == 2048     # past max-len: the last segment


def test_records_are_typed_once_at_load(plan):
    """Below load_plan nothing reads plan.json's objects: each is a record with its fields."""
    assert isinstance(plan.model, PlanModel) and plan.model.num_layers == 3 and plan.model.preset == "tiny-llama"
    assert isinstance(plan.workload, PlanWorkload) and plan.workload.width == 256 + 1 + 16
    assert isinstance(plan.retrieval_head, HeadRecord) and plan.retrieval_head.source == "self:0"
    assert isinstance(plan.graph, GraphRecord) and plan.graph.file == "decode_graph.py"
    assert all(isinstance(k, KernelRecord) for k in plan.kernels) and plan.kernels
    assert all(isinstance(p, PassRecord) for p in plan.passes) and plan.passes[0].name == "CleanCapture"
    assert "accuracy" in plan.retrieval_head.facts          # the head's notes, kept for the report


def test_a_plan_of_this_version_without_the_optional_workload_fields_loads(plan):
    """Fields later producers of schema 1.x added have one default, in plan_records.py."""
    data = json.loads(plan.to_json())
    for name in ("prompt_len", "sink_tokens", "recent_tokens", "width", "selection_overlap", "level", "dtype"):
        del data["workload"][name]
    work = Plan.from_dict(data).workload
    assert (work.sink_tokens, work.recent_tokens, work.level, work.dtype) == (1, 16, "head", "bfloat16")
    assert work.width == 256 + 1 + 16 and work.prompt_len is None


def test_reads_a_schedule_that_still_names_the_wait_layer(plan):
    """Older plans wrote wait_before_layer (always the layer itself); they still load."""
    data = json.loads(plan.to_json())
    data["schedule"] = [{"layer": 1, "issue_before_layer": 0, "wait_before_layer": 1}]
    assert Plan.from_dict(data).schedule == [PrefetchSlot(1, 0)]


def test_refuses_newer_schema_naming_both_versions(tmp_path, plan, compiled):
    write_plan_dir(plan, tmp_path / "p", compiled[1])
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    data["schema_version"] = [SCHEMA_VERSION[0] + 1, 0]
    (tmp_path / "p" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"newer than this specontext.*upgrade"):
        load_plan(tmp_path / "p")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema_version": [1, 0]}'])
def test_refuses_corrupted_plan(tmp_path, content):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(PlanError, match="recompile"):
        load_plan(tmp_path)


def test_missing_directory_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="not a plan directory"):
        load_plan(tmp_path / "nowhere")


def test_failed_write_leaves_no_partial_plan(tmp_path, plan):
    with pytest.raises(TypeError):
        _write_plan_dir(plan, tmp_path / "p", {"bad": 12345})   # not str/bytes
    assert not (tmp_path / "p").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_rewrite_replaces_an_existing_plan_whole(tmp_path, plan):
    _write_plan_dir(plan, tmp_path / "p", {"old.txt": "x"})
    _write_plan_dir(plan, tmp_path / "p", {"new.txt": "y"})
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["new.txt", "plan.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
