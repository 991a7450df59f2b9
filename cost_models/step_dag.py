"""One decode step as a DAG of operations on CUDA streams: its schedule and its critical path.

A node is one operation on one stream (the compute stream's retrieval head, top-k and layers; the
copy stream's elastic diff and per-layer gathers). Two kinds of edge order them, as the runtime
does (runtime/prefetch.py): stream order (operations of one stream run one after another, in issue
order) and events (the copy stream waits for the top-k that made the indices; layer j's attention
waits for layer j's gather). An operation starts when all its predecessors have ended.

Durations are not fixed: copies and compute share HBM and SMs. While a gather runs, compute
kernels progress compute_slowdown times slower; while compute runs, a gather progresses
gather_slowdown times slower (measured on an H200: a decode-like HBM loop 1.1-2.1x slower beside
the zero-copy gather, the gather 33 -> 21-27 GB/s beside GEMMs). schedule() therefore simulates the
step as a fluid: between two events (an operation starting or ending) every running operation
advances at its rate, then the next event is taken. Each operation still starts exactly when its
last predecessor ends, so the step's length is the longest path through the DAG weighted by the
simulated durations; networkx finds that critical path, which names what sets the step (the copy
chain, or the layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

COMPUTE_STREAM, COPY_STREAM = "compute", "copy"
ROLES = ("compute", "gather", "other")   # who slows whom; "other" neither slows nor is slowed
_EPS_MS = 1e-12


@dataclass(frozen=True)
class Op:
    """One operation: its stream, its duration alone (ms) and its contention role."""

    name: str
    stream: str
    work_ms: float
    role: str = "compute"


@dataclass(frozen=True)
class Contention:
    """How much slower each role runs while the other role runs beside it (1 = not at all)."""

    compute_slowdown: float = 1.0   # compute kernels beside a gather
    gather_slowdown: float = 1.0    # a gather beside compute kernels (alone rate / beside rate)


@dataclass(frozen=True)
class ScheduledOp:
    name: str
    stream: str
    start_ms: float
    end_ms: float
    critical: bool     # on the critical path


@dataclass(frozen=True)
class StepSchedule:
    """The simulated step: every operation's span, the critical path and the step's length."""

    ops: list[ScheduledOp]
    critical_path: list[str]
    step_ms: float

    def busy_ms(self, stream: str) -> float:
        return sum(op.end_ms - op.start_ms for op in self.ops if op.stream == stream)

    def span(self, name: str) -> ScheduledOp:
        return next(op for op in self.ops if op.name == name)


def build_dag(ops: list[Op], events: list[tuple[str, str]]) -> nx.DiGraph:
    """The step's DAG: ops in issue order per stream (stream edges) plus cross-stream events."""
    graph = nx.DiGraph()
    last_on: dict[str, str] = {}
    for op in ops:
        assert op.role in ROLES and op.work_ms >= 0, op
        graph.add_node(op.name, op=op)
        if op.stream in last_on:
            graph.add_edge(last_on[op.stream], op.name, kind="stream")
        last_on[op.stream] = op.name
    for before, after in events:
        assert before in graph and after in graph, (before, after)
        if not graph.has_edge(before, after):
            graph.add_edge(before, after, kind="event")
    if not nx.is_directed_acyclic_graph(graph):
        raise ValueError("the step's operations wait on each other in a cycle")
    return graph


def _rate(op: Op, running: list[Op], contention: Contention) -> float:
    """Progress per ms of op (1 alone) given the other operations running now.

    Gathers on several copy streams share one host link: each gets an equal part of it."""
    roles = [other.role for other in running if other is not op]
    if op.role == "compute" and "gather" in roles:
        return 1.0 / contention.compute_slowdown
    if op.role == "gather":
        share = 1.0 / (1 + roles.count("gather"))
        return share / contention.gather_slowdown if "compute" in roles else share
    return 1.0


def simulate(graph: nx.DiGraph, contention: Contention) -> dict[str, tuple[float, float]]:
    """(start, end) ms of every operation under contention, each started when its predecessors end."""
    order = list(nx.topological_sort(graph))
    ends: dict[str, float] = {}
    starts: dict[str, float] = {}
    left: dict[str, float] = {}
    clock = 0.0
    while len(ends) < len(order):
        for name in order:   # start everything whose predecessors have all ended
            if name not in starts and all(p in ends for p in graph.predecessors(name)):
                starts[name], left[name] = clock, graph.nodes[name]["op"].work_ms
        running = [graph.nodes[n]["op"] for n in left]
        rates = {op.name: _rate(op, running, contention) for op in running}
        step = min(left[n] / rates[n] for n in left)
        clock += step
        for name in list(left):
            left[name] -= rates[name] * step
            if left[name] <= _EPS_MS * max(1.0, graph.nodes[name]["op"].work_ms):
                ends[name] = clock
                del left[name]
    return {name: (starts[name], ends[name]) for name in order}


def critical_path(graph: nx.DiGraph, spans: dict[str, tuple[float, float]]) -> list[str]:
    """The chain of operations that sets the step: the DAG's longest path by simulated duration."""
    weighted = nx.DiGraph()
    weighted.add_nodes_from(graph.nodes)
    duration = {name: end - start for name, (start, end) in spans.items()}
    for before, after in graph.edges:
        weighted.add_edge(before, after, weight=duration[before])
    for name in graph.nodes:   # the sink carries the last operation's own duration
        weighted.add_edge(name, "<end>", weight=duration[name])
    return [name for name in nx.dag_longest_path(weighted, weight="weight") if name != "<end>"]


def schedule(ops: list[Op], events: list[tuple[str, str]], contention: Contention = Contention()) -> StepSchedule:
    """Build the DAG, simulate it under contention and mark its critical path."""
    graph = build_dag(ops, events)
    spans = simulate(graph, contention)
    path = critical_path(graph, spans)
    on_path = set(path)
    scheduled = [ScheduledOp(op.name, op.stream, *spans[op.name], op.name in on_path) for op in ops]
    return StepSchedule(scheduled, path, max((end for _, end in spans.values()), default=0.0))
