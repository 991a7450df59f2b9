"""Plan schema: round trip, version checks, atomic writes."""
import json

import pytest

from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.plan import SCHEMA_VERSION, Plan, PrefetchSlot, Segment, load_plan
from specontext_compiler.runtime.plan import write_plan_dir as _write_plan_dir
from specontext_compiler.runtime.plan_integrity import plan_manifest


def write_plan_dir(plan, directory, files):
    """Write a plan as the driver does: the files plus the manifest over them and plan.json."""
    return _write_plan_dir(plan, directory, {**files, **plan_manifest(plan.to_json(), files)})


def make_plan() -> Plan:
    return Plan(schema_version=list(SCHEMA_VERSION), producer={"specontext": "test"},
                model={"name": "tiny", "num_layers": 2}, target={"name": "h100"},
                workload={"max_len": 64, "batch": 1, "budget": 8},
                retrieval_head={"source": "self:0"},
                segments=[Segment(0, 32, [0, 1], [], {"step_ms": 1.0}),
                          Segment(32, 64, [0], [1], {"step_ms": 2.0})],
                schedule=[PrefetchSlot(1, 0)], prediction={}, solver={"status": "Optimal"},
                graph={"file": "decode_graph.py"})


def test_round_trip_keeps_every_field(tmp_path):
    plan = make_plan()
    write_plan_dir(plan, tmp_path / "p", {"decode_graph.py": "# graph\n"})
    loaded = load_plan(tmp_path / "p")
    assert loaded.segments == plan.segments and loaded.schedule == plan.schedule
    assert loaded.workload == plan.workload
    assert loaded.directory == tmp_path / "p"
    assert (tmp_path / "p" / "decode_graph.py").read_text() == "# graph\n"
    assert loaded.segment_for(40).offloaded_layers == [1]
    assert loaded.segment_for(10_000).to_len == 64     # past max-len: the last segment


def test_reads_a_schedule_that_still_names_the_wait_layer():
    """Older plans wrote wait_before_layer (always the layer itself); they still load."""
    data = json.loads(make_plan().to_json())
    data["schedule"] = [{"layer": 1, "issue_before_layer": 0, "wait_before_layer": 1}]
    assert Plan.from_dict(data).schedule == [PrefetchSlot(1, 0)]


def test_refuses_newer_schema_naming_both_versions(tmp_path):
    write_plan_dir(make_plan(), tmp_path / "p", {})
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


def test_failed_write_leaves_no_partial_plan(tmp_path):
    with pytest.raises(TypeError):
        _write_plan_dir(make_plan(), tmp_path / "p", {"bad": 12345})   # not str/bytes
    assert not (tmp_path / "p").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_rewrite_replaces_an_existing_plan_whole(tmp_path):
    _write_plan_dir(make_plan(), tmp_path / "p", {"old.txt": "x"})
    _write_plan_dir(make_plan(), tmp_path / "p", {"new.txt": "y"})
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["new.txt", "plan.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
