"""The typed records inside a plan: what the runtime reads, each built once from plan.json.

`Plan.from_dict` turns each object of plan.json into one of these; nothing below it re-reads a
dict with defaults. A field that older plans of this schema version may lack has its default
here, and only here. Records the runtime never reads (producer, target, prediction, solver) stay
plain JSON objects for the report; the compiler types them on its side (Target, Solution).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from specontext_compiler.runtime.model_spec import ModelSpec

# The always-attended window around the selected tokens: the compiler's defaults, and what a
# plan's workload means when it omits them.
DEFAULT_SINK_TOKENS = 1
DEFAULT_RECENT_TOKENS = 16
# Prompt tokens per prefill forward that every plan's workspace reserves; a plan written before
# prefill_chunk_tokens existed was sized for this many (cost_models/memory.py adds what is free).
DEFAULT_PREFILL_CHUNK_TOKENS = 256


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    """data's entries that are fields of cls (a record written by a newer minor may hold more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class _FromJson:
    """from_dict for a record whose JSON object holds its fields by name."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class PlanModel(ModelSpec):
    """The model a plan is for: its ModelSpec plus what bind checks the weights against
    (ModelSpec.from_dict reads it)."""

    layer_windows: list[int] = field(default_factory=list)   # per layer: sliding window (0: global)
    config_sha256: str = ""
    source: str | None = None       # the directory or GGUF file compiled from; None for a preset
    preset: str | None = None


@dataclass(frozen=True)
class PlanWorkload(_FromJson):
    """What the plan serves: lengths, batch, selection budget and window, level and dtype."""

    max_len: int
    batch: int
    budget: int
    prompt_len: int | None = None
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    width: int | None = None              # W = budget + sinks + recent; filled in when absent
    selection_overlap: float | None = None
    level: str = "head"                   # selection per KV-head group ("head") or per request ("batch")
    dtype: str = "bfloat16"               # what the plan's kernels are specialized to
    prefill_chunk_tokens: int | None = None   # prompt tokens per prefill forward (None: older plans)

    def __post_init__(self):
        if self.width is None and all(isinstance(v, int) for v in (self.budget, self.sink_tokens,
                                                                    self.recent_tokens)):
            object.__setattr__(self, "width", self.budget + self.sink_tokens + self.recent_tokens)


@dataclass(frozen=True)
class HeadRecord:
    """The retrieval head: where bind gets it (a file in the plan, or the LLM's own `layer`) and the
    LLM layers a fused head reads; `facts` holds what the compiler measured and noted, for the report."""

    source: str
    file: str | None = None
    layer: int | None = None
    feature_layers: list[int] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadRecord":
        known = _known(cls, data)
        known.pop("facts", None)
        return cls(**known, facts={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object plan.json holds."""
        data = asdict(self)
        return {**data.pop("facts"), **data}


@dataclass(frozen=True)
class GraphRecord(_FromJson):
    """The rewritten decode-step graph: its file, digest and the parameter each placeholder binds."""

    file: str
    sha256: str
    inputs: list[dict[str, Any]] = field(default_factory=list)   # {name, kind, target, ...} per placeholder
    op_counts: dict[str, int] = field(default_factory=dict)
    nodes: int | None = None


@dataclass(frozen=True)
class KernelRecord(_FromJson):
    """One specialized kernel file of the plan and the constants it was specialized to."""

    family: str
    file: str
    sha256: str
    constexprs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassRecord:
    """What one compiler pass did: its name, time, counters and the graph's size after it."""

    name: str
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)
    nodes: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassRecord":
        return cls(name=data["pass"], seconds=data["seconds"], counters=dict(data.get("counters") or {}),
                   nodes=data.get("nodes"))

    def to_dict(self) -> dict[str, Any]:
        """plan.json's form, where the name is written "pass"."""
        return {"pass": self.name, "seconds": self.seconds, "counters": self.counters, "nodes": self.nodes}
