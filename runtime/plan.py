"""The plan: the contract between the compiler and the runtime (a directory, plan.json inside).

The schema is defined once, here and in plan_records.py, as plain dataclasses serialized with
stdlib json, so the runtime reads it without the compiler's dependencies; `Plan.from_dict` builds
every record once, at load. SCHEMA_VERSION is (major, minor): a newer major is refused with a
message naming both versions; an older minor is read with the records' defaults.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from specontext_compiler.errors import PlanError
from specontext_compiler.runtime.atomic_dir import DirectoryInUse, check_replaceable, nearest_existing, publish_dir
from specontext_compiler.runtime.plan_checks import check_plan, check_plan_data
from specontext_compiler.runtime.plan_integrity import verify_plan_files
from specontext_compiler.runtime.plan_records import (GraphRecord, HeadRecord, KernelRecord, PassRecord, PlanModel,
                                                      PlanWorkload)

SCHEMA_VERSION = (1, 0)
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Segment:
    """Residency for sequence lengths in [from_len, to_len): which layers keep full KV on GPU."""

    from_len: int
    to_len: int
    gpu_layers: list[int]
    offloaded_layers: list[int]
    predicted: dict[str, float] = field(default_factory=dict)  # step_ms, tokens_per_s, gpu_bytes, ...


@dataclass(frozen=True)
class PrefetchSlot:
    """Where an offloaded layer's prefetch is issued and waited on, in the decode step."""

    layer: int                # the wait sits right before this layer's attention
    issue_before_layer: int   # the prefetch-issue node sits before this layer's attention (0 = step start)


@dataclass
class Plan:
    """A compiled plan. `directory` is where it was loaded from (None while being built)."""

    schema_version: list[int]
    producer: dict[str, str]         # package -> version that wrote the plan
    model: PlanModel
    target: dict[str, Any]           # the Target's fields (for the report: the runtime never reads it)
    workload: PlanWorkload
    retrieval_head: HeadRecord
    segments: list[Segment]
    schedule: list[PrefetchSlot]
    prediction: dict[str, Any]       # the cost model's summary, memory breakdown and timeline (report)
    solver: dict[str, Any]           # the ILP's solver, status, time (report)
    graph: GraphRecord
    kernels: list[KernelRecord] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    # tensor-parallel split (gpus, heads per rank, the all-reduce); None, and absent from plan.json, on one GPU
    tensor_parallel: dict[str, Any] | None = None
    directory: Path | None = None

    # -- residency ---------------------------------------------------------------------------
    def segment_for(self, seq_len: int) -> Segment:
        """The residency segment that covers a sequence length (first before it, last past max_len)."""
        if seq_len < self.segments[0].from_len:
            return self.segments[0]        # a prompt shorter than planned: the first residency
        for seg in self.segments:
            if seg.from_len <= seq_len < seg.to_len:
                return seg
        return self.segments[-1]

    def residency_end(self, seq_len: int) -> int:
        """Where the residency at seq_len ends: the end of the run of consecutive segments that
        keep the same layers offloaded. A resident cache can be sized to it at once: the run's last
        segment holds the same layers at that length, and the memory model fits it."""
        segment = self.segment_for(seq_len)
        start = self.segments.index(segment)
        end = segment.to_len
        for later in self.segments[start + 1:]:
            if sorted(later.offloaded_layers) != sorted(segment.offloaded_layers):
                break
            end = later.to_len
        return end

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """plan.json's object (every record in its JSON form; no directory)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "directory"}
        data.update(model=asdict(self.model), workload=asdict(self.workload),
                    retrieval_head=self.retrieval_head.to_dict(), graph=asdict(self.graph),
                    segments=[asdict(s) for s in self.segments], schedule=[asdict(s) for s in self.schedule],
                    kernels=[asdict(k) for k in self.kernels], passes=[p.to_dict() for p in self.passes])
        if self.tensor_parallel is None:
            del data["tensor_parallel"]
        return data

    def to_json(self) -> str:
        """plan.json's text: strict JSON, so a NaN or infinity is refused here, naming its field."""
        data = self.to_dict()
        check_plan_data(data, "the plan being written")
        return json.dumps(data, indent=2, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The Plan and its typed records from plan.json's object (read once, here)."""
        _check_version(data.get("schema_version"))
        known = {f.name for f in fields(cls)} - {"directory"}
        missing = [name for name in known if name not in data and name not in ("kernels", "passes", "tensor_parallel")]
        if missing:
            raise PlanError(f"plan.json lacks {', '.join(sorted(missing))}; recompile the plan")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.update(model=PlanModel.from_dict(data["model"]), workload=PlanWorkload.from_dict(data["workload"]),
                      retrieval_head=HeadRecord.from_dict(data["retrieval_head"]),
                      graph=GraphRecord.from_dict(data["graph"]),
                      segments=[Segment(**s) for s in data["segments"]],
                      schedule=[_prefetch_slot(s) for s in data["schedule"]],
                      kernels=[KernelRecord.from_dict(k) for k in data.get("kernels") or ()],
                      passes=[PassRecord.from_dict(p) for p in data.get("passes") or ()])
        return cls(**kwargs)

    def bind(self, model, dlm=None, **options):
        """Bind weights (an HF model in memory or a local directory) and return an Engine."""
        from specontext_compiler.runtime.engine import Engine
        return Engine.from_plan(self, model, dlm=dlm, **options)


def _prefetch_slot(record: dict) -> PrefetchSlot:
    """A schedule entry; plans written before the wait layer was implied still carry
    wait_before_layer (always equal to layer), which is read past."""
    return PrefetchSlot(**{k: v for k, v in record.items() if k != "wait_before_layer"})


def _check_version(version: Any) -> None:
    if not (isinstance(version, list) and len(version) == 2 and all(isinstance(v, int) for v in version)):
        raise PlanError("plan.json has no valid schema_version; it is corrupted, recompile the plan")
    if version[0] > SCHEMA_VERSION[0]:
        raise PlanError(
            f"plan schema {version[0]}.{version[1]} is newer than this specontext "
            f"(reads {SCHEMA_VERSION[0]}.x); upgrade specontext or recompile the plan")
    if version[0] < SCHEMA_VERSION[0]:
        raise PlanError(
            f"plan schema {version[0]}.{version[1]} is older than this specontext reads "
            f"({SCHEMA_VERSION[0]}.x); recompile the plan")


def load_plan(directory: str | os.PathLike) -> Plan:
    """Read and validate a plan directory written by `specontext compile`.

    Every file is checked against the plan's manifest and the numbers against each other
    before anything is returned, so neither inspect nor bind reads a plan the compiler did not write.
    """
    path = Path(directory)
    plan_file = path / PLAN_FILE
    if not plan_file.is_file():
        raise PlanError(f"{path} is not a plan directory (no {PLAN_FILE}); run `specontext compile` first")
    try:
        data = json.loads(plan_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{plan_file} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                        "the plan is corrupted, recompile it") from None
    if not isinstance(data, dict):
        raise PlanError(f"{plan_file} is not a plan object; the plan is corrupted, recompile it")
    _check_version(data.get("schema_version"))     # first: a newer plan may have another manifest
    listed = verify_plan_files(path)
    check_plan_data(data, str(plan_file))
    try:
        plan = Plan.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise PlanError(f"{plan_file} does not match the plan schema ({exc}); recompile the plan") from None
    check_plan(plan, str(plan_file), set(listed))
    plan.directory = path
    return plan


def write_plan_dir(plan: Plan, directory: str | os.PathLike, files: dict[str, str | bytes]) -> Path:
    """Write plan.json and extra files as one directory, published atomically (runtime/atomic_dir).

    Only an existing specontext plan (or an empty directory) is replaced; any other existing path
    is refused before anything is written, so `-o` can never remove a user's files.
    """
    final = Path(directory).absolute()

    def write_into(staging: Path) -> None:
        for rel, content in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        (staging / PLAN_FILE).write_text(plan.to_json())

    try:
        publish_dir(final, write_into, may_replace=is_plan_dir)
    except DirectoryInUse as exc:
        raise PlanError(f"refusing to write the plan to {final}: {exc}; choose a new "
                        "-o path (specontext replaces only its own plan directories)") from None
    except OSError as exc:
        raise PlanError(f"cannot write the plan to {final}: {exc.strerror or exc}; "
                        "choose a writable -o path") from None
    plan.directory = final
    return final


def check_plan_output(directory: str | os.PathLike) -> None:
    """Refuse an output path that is not ours to replace or cannot be written, before any compile work."""
    final = Path(directory).absolute()
    try:
        check_replaceable(final, is_plan_dir)
    except DirectoryInUse as exc:
        raise PlanError(f"refusing to write the plan to {final}: {exc}; choose a new "
                        "-o path (specontext replaces only its own plan directories)") from None
    existing = nearest_existing(final)
    if not existing.is_dir():
        raise PlanError(f"cannot write the plan to {final}: {existing} is a file; choose another -o path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PlanError(f"cannot write the plan to {final}: {existing} is not writable (permissions or a "
                        "read-only file system); choose another -o directory")


def is_plan_dir(directory: Path) -> bool:
    """A directory holding a plan.json with this schema's shape (what specontext itself writes)."""
    plan_file = Path(directory) / PLAN_FILE
    try:
        data = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("schema_version"), list)
            and isinstance(data.get("producer"), dict) and isinstance(data.get("segments"), list))
