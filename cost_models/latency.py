"""Decode-step latency of a residency plan (paper s.5, Fig. 7(e): one retrieval, then overlapped prefetch).

Roofline per piece of work: time = max(FLOPs / bf16 peak, HBM bytes / (hbm_gbps x the target's
decode_hbm_efficiency, the share of copy bandwidth decode kernels reach, measured)); each decoder
layer adds the target's layer_fixed_us, the small kernels it runs whatever its bytes (measured:
they dominate a batch-1 step's gap to its bytes, benchmarks/calibrate_decode.py).

One step for R requests at length S is a DAG of operations on two streams (step_dag.py), as the
runtime issues them: on the compute stream the retrieval head (projections, q·K over its S-token
K cache), the top-k, layers 0..L-1 and the LM head; on the copy stream, once the top-k has made the
indices, the elastic diff and then every offloaded layer's gather (the rows not selected at the
previous step, (1 - selection_overlap) of the budget, from pinned host memory) in layer order;
layer j's attention waits for its gather. Attention sits at the start of a layer (its Q/K/V
projections are charged to the layer, a slightly pessimistic placement). Under tensor parallelism
(workload.gpus > 1) the spec is one rank's and every layer adds its two all-reduces
(layer_allreduce_ms) to the compute stream. Copies and compute slow
each other (the target's contention figures), so the step is simulated and its length is the
DAG's critical path: it moves with the selection overlap through the gathers' bytes.

The ILP (ilp.py) cannot hold the contention; it uses step_components(), the same pieces with the
gather priced at its rate beside compute and the compute slowdown charged to each offloaded layer,
and every prediction it reports is re-evaluated here with the DAG.
"""
from dataclasses import dataclass

from specontext_compiler.cost_models import memory, step_dag, tensor_parallel
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import Target
from specontext_compiler.cost_models.workload import Workload

GRAPH_LAUNCHES_PER_STEP = 2   # one CUDA-graph replay for the step, one host sync to read the tokens


def _ms(flops: float, hbm_bytes: float, target: Target) -> float:
    """Roofline time in ms: the larger of compute time and HBM time."""
    return max(flops / (target.bf16_tflops * 1e9),
               hbm_bytes / (target.hbm_gbps * target.decode_hbm_efficiency * 1e6))


def layer_params(spec: ModelSpec) -> float:
    """Parameters of one decoder layer: Q/K/V/O, a gated MLP and two norms (MLA: the average)."""
    if spec.attention_kind == "mla":
        return (spec.param_count - 2 * spec.vocab_size * spec.hidden_size) / spec.num_layers
    return tensor_parallel.sharded_layer_params(spec) + 2 * spec.hidden_size


def attended_rows(workload: Workload, seq_len: float) -> float:
    """Rows each sparse attention reads per KV group: W, or all S while S < W."""
    return min(workload.window_tokens, seq_len)


def layer_hbm_bytes(spec: ModelSpec, workload: Workload, seq_len: float) -> float:
    """HBM bytes of one layer: its weights + R·W selected KV rows + the new token's KV write."""
    kv_row = memory.kv_bytes_per_token_layer(spec)
    rows = attended_rows(workload, seq_len)
    return layer_params(spec) * spec.dtype_bytes + workload.batch * (rows + 1) * kv_row


def layer_flops(spec: ModelSpec, workload: Workload, seq_len: float) -> float:
    """FLOPs of one layer: 2·R·params of matmuls + 4·R·Hq·D·(W+1) for q·K and p·V."""
    rows = attended_rows(workload, seq_len) + 1
    return 2 * workload.batch * layer_params(spec) + 4 * workload.batch * spec.num_heads * spec.head_dim * rows


def layer_allreduce_ms(spec: ModelSpec, workload: Workload, target: Target) -> float:
    """One layer's all-reduces over the target's NVLink (after attention, after the MLP); 0 on one GPU."""
    if workload.gpus == 1:
        return 0.0
    message = tensor_parallel.layer_allreduce_bytes(spec, workload.batch)
    return tensor_parallel.ALLREDUCES_PER_LAYER * tensor_parallel.allreduce_ms(
        message, workload.gpus, target.nvlink_gbps, target.nvlink_latency_us)


def layer_h2d_bytes(spec: ModelSpec, workload: Workload, seq_len: float) -> float:
    """Elastic delta of one offloaded layer: R·(1 - overlap)·W·4HD bytes copied host -> GPU."""
    rows = attended_rows(workload, seq_len)
    return workload.batch * (1 - workload.selection_overlap) * rows * memory.kv_bytes_per_token_layer(spec)


def gather_alone_ms(spec: ModelSpec, workload: Workload, target: Target, seq_len: float) -> float:
    """Copy-stream time of one offloaded layer with nothing beside it: delta gather + write-through."""
    write_through = workload.batch * memory.kv_bytes_per_token_layer(spec)
    return (layer_h2d_bytes(spec, workload, seq_len) / (target.pinned_gather_gbps * 1e6)
            + write_through / (target.write_through_gbps * 1e6) + target.gather_fixed_us / 1e3)


def layer_transfer_ms(spec: ModelSpec, workload: Workload, target: Target, seq_len: float) -> float:
    """The same copy while the compute stream runs beside it (at the target's contended rate)."""
    slowdown = target.pinned_gather_gbps / target.gather_gbps_overlapped
    return gather_alone_ms(spec, workload, target, seq_len) * slowdown


def retrieval_cost(spec: ModelSpec, workload: Workload, seq_len: float) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the retrieval head: projections, q·K over S keys, fp32 scores written."""
    R, head = workload.batch, workload.head_for(spec)
    proj_flops = 2 * R * head.params
    proj_bytes = memory.head_weight_bytes(spec, workload) + R * head.head_input_dim * spec.dtype_bytes
    score_flops = 2 * R * head.head_num_heads * head.head_dim * seq_len
    k_bytes = memory.head_k_cache_bytes(spec, workload, seq_len)
    scores_written = R * seq_len * head.head_num_heads * memory.FP32_BYTES
    return proj_flops + score_flops, proj_bytes + k_bytes + scores_written


def topk_bytes(spec: ModelSpec, workload: Workload, seq_len: float) -> float:
    """HBM bytes of the selection: fp32 scores read, per-group maxima written and read by the top-k."""
    head = workload.head_for(spec)
    return workload.batch * seq_len * (head.head_num_heads + 2 * head.head_num_kv_heads) * memory.FP32_BYTES


# The elastic diff (kernels/elastic_load.py: sorts, searchsorted, cumsum, scatters, compaction)
# passes over the [B, G, W] int32 slot tables about this many times.
DIFF_TABLE_PASSES = 24


def diff_bytes(spec: ModelSpec, workload: Workload) -> float:
    """HBM bytes of one step's elastic diff on the copy stream."""
    groups = spec.num_kv_heads
    return DIFF_TABLE_PASSES * workload.batch * groups * workload.window_tokens * 4


def tail_cost(spec: ModelSpec, workload: Workload) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the embedding lookup and the LM head with fp32 logits."""
    R, h, V = workload.batch, spec.hidden_size, spec.vocab_size
    return 2 * R * V * h, V * h * spec.dtype_bytes + R * h * spec.dtype_bytes + R * V * memory.FP32_BYTES


@dataclass(frozen=True)
class StepComponents:
    """Per-step constants at one length; the ILP and step_ops() both build on these (ms, bytes)."""

    retrieval_ms: float         # retrieval head + top-k, on the compute stream
    topk_ms: float              # the top-k's share of retrieval_ms
    diff_ms: float              # the elastic diff, first on the copy stream
    layer_ms: float             # one decoder layer on the compute stream (same for every layer)
    gather_alone_ms: float      # one offloaded layer's copy with nothing beside it
    transfer_ms: float          # the same copy beside compute (the ILP's copy-stream time)
    tail_ms: float              # LM head + embedding + graph launch overhead
    offload_hbm_ms: float       # an offloaded layer's own extra HBM time (its delta write, new-token read)
    offload_ms: float           # the ILP's extra compute time of an offloaded layer (HBM + contention)
    layer_h2d_bytes: float
    offload_hbm_bytes: float    # HBM bytes an offloaded layer's copies add (delta write, new-token read)
    hbm_bytes_no_transfer: float  # retrieval + all layers + tail


def step_components(spec: ModelSpec, workload: Workload, target: Target, seq_len: float) -> StepComponents:
    """The constants of one decode step at length seq_len for workload.batch requests."""
    r_flops, r_bytes = retrieval_cost(spec, workload, seq_len)
    k_bytes = topk_bytes(spec, workload, seq_len)
    t_flops, t_bytes = tail_cost(spec, workload)
    l_bytes = layer_hbm_bytes(spec, workload, seq_len)
    layer_ms = (_ms(layer_flops(spec, workload, seq_len), l_bytes, target) + target.layer_fixed_us / 1e3
                + layer_allreduce_ms(spec, workload, target))
    # the delta rows land in HBM and the new token is read for the write-through: this traffic
    # competes with the layer's own reads, so it lengthens the compute stream of offloaded layers
    offload_bytes = layer_h2d_bytes(spec, workload, seq_len) + workload.batch * memory.kv_bytes_per_token_layer(spec)
    offload_hbm_ms = _ms(0.0, offload_bytes, target)
    alone_ms = gather_alone_ms(spec, workload, target, seq_len)
    # the ILP's linear form of the contention: each offloaded layer's gather slows the compute it
    # overlaps, at most one layer's worth (the DAG simulates it exactly)
    slowed_ms = (target.compute_slowdown_beside_gather - 1) * min(layer_ms, alone_ms)
    launch_ms = GRAPH_LAUNCHES_PER_STEP * target.launch_overhead_us / 1e3
    topk_ms = _ms(0.0, k_bytes, target)
    return StepComponents(
        retrieval_ms=_ms(r_flops, r_bytes, target) + topk_ms, topk_ms=topk_ms,
        diff_ms=_ms(0.0, diff_bytes(spec, workload), target),
        layer_ms=layer_ms, gather_alone_ms=alone_ms,
        transfer_ms=layer_transfer_ms(spec, workload, target, seq_len),
        tail_ms=_ms(t_flops, t_bytes, target) + launch_ms,
        offload_hbm_ms=offload_hbm_ms, offload_ms=offload_hbm_ms + slowed_ms,
        layer_h2d_bytes=layer_h2d_bytes(spec, workload, seq_len),
        offload_hbm_bytes=offload_bytes,
        hbm_bytes_no_transfer=r_bytes + k_bytes + spec.num_layers * l_bytes + t_bytes)


@dataclass(frozen=True)
class StepBreakdown:
    """One decode step: where the time goes (ms) and the bytes it moves."""

    compute_ms: float       # busy time of the compute stream after the retrieval head (with contention)
    transfer_ms: float      # busy time of the copy stream
    stall_ms: float         # compute stream idle, waiting for gathers
    retrieval_ms: float     # retrieval head + top-k
    step_ms: float          # the critical path
    tokens_per_s: float     # R / step
    h2d_bytes_per_step: float
    hbm_bytes_per_step: float
    selection_overlap: float = 0.8
    critical_path: str = ""   # what sets the step, e.g. "retrieval > top-k > diff > gather L20..L31 > ..."


@dataclass(frozen=True)
class TimelineEvent:
    stream: str   # "compute" or "copy"
    label: str
    start_ms: float
    end_ms: float
    critical: bool = False


def step_ops(spec: ModelSpec, workload: Workload, target: Target, seq_len: float, offloaded_layers=(),
             issue_before: dict | None = None,
             copy_streams: int = 1) -> tuple[list[step_dag.Op], list[tuple[str, str]]]:
    """The step's operations in issue order and its cross-stream events (step_dag.build_dag).

    issue_before[j] = k: layer j's gather is issued when the compute stream reaches layer k
    (k <= j; default 0, right after the top-k). copy_streams > 1 deals the gathers round-robin
    over that many copy streams (they then share the host link), each waiting for the diff.
    """
    c = step_components(spec, workload, target, seq_len)
    offloaded = sorted(set(offloaded_layers))
    ops = [step_dag.Op("retrieval", "compute", c.retrieval_ms - c.topk_ms),
           step_dag.Op("top-k", "compute", c.topk_ms)]
    events = []
    if offloaded:
        ops.append(step_dag.Op("diff", "copy", c.diff_ms, role="other"))
        events.append(("top-k", "diff"))
    for k, layer in enumerate(offloaded):
        issue_at = (issue_before or {}).get(layer, 0)
        assert issue_at <= layer, "a prefetch cannot be issued after its layer"
        stream = "copy" if k % copy_streams == 0 else f"copy {k % copy_streams + 1}"
        ops.append(step_dag.Op(f"gather L{layer}", stream, c.gather_alone_ms, role="gather"))
        events.append(("top-k" if issue_at == 0 else f"layer {issue_at - 1}", f"gather L{layer}"))
        events.append(("diff", f"gather L{layer}"))     # every load copies the diff's list
        events.append((f"gather L{layer}", f"layer {layer}"))
    for layer in range(spec.num_layers):
        extra = c.offload_hbm_ms if layer in offloaded else 0.0
        ops.append(step_dag.Op(f"layer {layer}", "compute", c.layer_ms + extra))
    ops.append(step_dag.Op("lm head", "compute", c.tail_ms))
    return ops, events


def contention(target: Target) -> step_dag.Contention:
    """The target's copy/compute contention as the DAG's slowdown factors."""
    return step_dag.Contention(compute_slowdown=target.compute_slowdown_beside_gather,
                               gather_slowdown=target.pinned_gather_gbps / target.gather_gbps_overlapped)


def step_schedule(spec: ModelSpec, workload: Workload, target: Target, seq_len: float, offloaded_layers=(),
                  issue_before: dict | None = None, copy_streams: int = 1) -> step_dag.StepSchedule:
    """The simulated step (every operation's span and the critical path)."""
    ops, events = step_ops(spec, workload, target, seq_len, offloaded_layers, issue_before, copy_streams)
    return step_dag.schedule(ops, events, contention(target))


def _stalls(sched: step_dag.StepSchedule) -> list[TimelineEvent]:
    """Gaps in the compute stream: the layer after each one waits for its gather."""
    compute = [op for op in sched.ops if op.stream == "compute"]
    return [TimelineEvent("compute", f"stall {b.name.replace('layer ', 'L')}", a.end_ms, b.start_ms)
            for a, b in zip(compute, compute[1:]) if b.start_ms > a.end_ms + 1e-9]


def describe_path(path: list[str]) -> str:
    """'retrieval > top-k > diff > gather L20..L31 > layer 31 > lm head': runs of one kind folded."""
    runs: list[list[str]] = []   # [kind, first index, last index]
    for name in path:
        kind, _, index = name.rpartition(" ")
        if kind and index.lstrip("L").isdigit():
            if runs and runs[-1][0] == kind:
                runs[-1][2] = index
            else:
                runs.append([kind, index, index])
        else:
            runs.append([name, "", ""])
    return " > ".join(k if not a else (f"{k} {a}" if a == b else f"{k} {a}..{b}") for k, a, b in runs)


def step_time(spec: ModelSpec, workload: Workload, target: Target, seq_len: float,
              offloaded_layers=(), issue_before: dict | None = None, copy_streams: int = 1) -> StepBreakdown:
    """Time of one decode step for workload.batch requests at length seq_len (tokens).

    offloaded_layers: indices of the layers whose KV lives in pinned host memory;
    issue_before: {layer: layer its prefetch is issued before}, default all right after the top-k;
    copy_streams: streams the gathers are dealt over (the runtime uses one).
    """
    offloaded = set(offloaded_layers)
    c = step_components(spec, workload, target, seq_len)
    sched = step_schedule(spec, workload, target, seq_len, offloaded, issue_before, copy_streams)
    head = sched.span("top-k").end_ms
    copy_streams_used = {op.stream for op in sched.ops} - {"compute"}
    return StepBreakdown(
        compute_ms=sched.busy_ms("compute") - head,
        transfer_ms=sum(sched.busy_ms(stream) for stream in copy_streams_used),
        stall_ms=sum(e.end_ms - e.start_ms for e in _stalls(sched)),
        retrieval_ms=head, step_ms=sched.step_ms, tokens_per_s=workload.batch * 1e3 / sched.step_ms,
        h2d_bytes_per_step=len(offloaded) * c.layer_h2d_bytes,
        hbm_bytes_per_step=c.hbm_bytes_no_transfer + len(offloaded) * c.offload_hbm_bytes,
        selection_overlap=workload.selection_overlap, critical_path=describe_path(sched.critical_path))


def timeline(spec: ModelSpec, workload: Workload, target: Target, seq_len: float,
             offloaded_layers=(), issue_before: dict | None = None) -> list[TimelineEvent]:
    """Events (stream, label, start_ms, end_ms, critical) of one simulated step, stalls included."""
    sched = step_schedule(spec, workload, target, seq_len, offloaded_layers, issue_before)
    events = [TimelineEvent(op.stream, op.name, op.start_ms, op.end_ms, op.critical) for op in sched.ops]
    return sorted(events + _stalls(sched), key=lambda e: (e.start_ms, e.stream))
