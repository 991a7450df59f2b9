"""Decode-step latency of a residency plan (paper s.5, Fig. 7(e): one retrieval, then overlapped prefetch).

Roofline per piece of work: time = max(FLOPs / bf16 peak, HBM bytes / (hbm_gbps x the target's
decode_hbm_efficiency, the share of copy bandwidth decode kernels reach, measured)); each decoder
layer adds the target's layer_fixed_us, the small kernels it runs whatever its bytes (measured:
they dominate a batch-1 step's gap to its bytes, benchmarks/calibrate_decode.py). One step for R
requests at length S runs, on the compute stream: the retrieval head (projections, q·K over its
S-token K cache, top-k), then layers 0..L-1, then the LM head. On one copy stream, every offloaded
layer's prefetch (the rows not selected at the previous step, gathered from pinned host memory)
starts after the retrieval head, in layer order; layer j's attention waits for its transfer.
stall_j = max(0, transfer end_j - attention start_j). Attention sits at the start of a layer
(its Q/K/V projections are charged to the layer, a slightly pessimistic placement).

The ILP (ilp.py) uses step_components() with continuous stall variables; step_time() and
timeline() evaluate the same components with the exact stall recursion, so the two agree.
"""
from dataclasses import dataclass

from specontext_compiler.cost_models import memory
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
    attn = 2 * spec.hidden_size * spec.head_dim * (spec.num_heads + spec.num_kv_heads)
    return attn + 3 * spec.hidden_size * spec.intermediate_size + 2 * spec.hidden_size


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


def layer_h2d_bytes(spec: ModelSpec, workload: Workload, seq_len: float) -> float:
    """Elastic delta of one offloaded layer: R·(1 - overlap)·W·4HD bytes copied host -> GPU."""
    rows = attended_rows(workload, seq_len)
    return workload.batch * (1 - workload.selection_overlap) * rows * memory.kv_bytes_per_token_layer(spec)


def layer_transfer_ms(spec: ModelSpec, workload: Workload, target: Target, seq_len: float) -> float:
    """Copy-stream time of one offloaded layer: delta gather + write-through of the new token."""
    write_through = workload.batch * memory.kv_bytes_per_token_layer(spec)
    return (layer_h2d_bytes(spec, workload, seq_len) / (target.pinned_gather_gbps * 1e6)
            + write_through / (target.h2d_gbps * 1e6)) / target.overlapped_copy_efficiency


def retrieval_cost(spec: ModelSpec, workload: Workload, seq_len: float) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the retrieval head: projections, q·K over S keys, fp32 top-k."""
    R, head = workload.batch, workload.head_for(spec)
    proj_flops = 2 * R * head.params
    proj_bytes = memory.head_weight_bytes(spec, workload) + R * head.head_input_dim * spec.dtype_bytes
    score_flops = 2 * R * head.head_num_heads * head.head_dim * seq_len
    k_bytes = memory.head_k_cache_bytes(spec, workload, seq_len)
    # scores written and read once, group maxima written and read by the top-k
    score_bytes = 2 * R * seq_len * (head.head_num_heads + head.head_num_kv_heads) * memory.FP32_BYTES
    return proj_flops + score_flops, proj_bytes + k_bytes + score_bytes


def tail_cost(spec: ModelSpec, workload: Workload) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the embedding lookup and the LM head with fp32 logits."""
    R, h, V = workload.batch, spec.hidden_size, spec.vocab_size
    return 2 * R * V * h, V * h * spec.dtype_bytes + R * h * spec.dtype_bytes + R * V * memory.FP32_BYTES


@dataclass(frozen=True)
class StepComponents:
    """Per-step constants at one length; the ILP and step_time() both build on these (ms, bytes)."""

    retrieval_ms: float
    layer_ms: float             # one decoder layer on the compute stream (same for every layer)
    transfer_ms: float          # one offloaded layer on the copy stream
    tail_ms: float              # LM head + embedding + graph launch overhead
    offload_ms: float           # extra compute-stream time of an offloaded layer (HBM contention)
    layer_h2d_bytes: float
    offload_hbm_bytes: float    # HBM bytes an offloaded layer's copies add (delta write, new-token read)
    hbm_bytes_no_transfer: float  # retrieval + all layers + tail


def step_components(spec: ModelSpec, workload: Workload, target: Target, seq_len: float) -> StepComponents:
    """The constants of one decode step at length seq_len for workload.batch requests."""
    r_flops, r_bytes = retrieval_cost(spec, workload, seq_len)
    t_flops, t_bytes = tail_cost(spec, workload)
    l_bytes = layer_hbm_bytes(spec, workload, seq_len)
    # the delta rows land in HBM and the new token is read for the write-through: this traffic
    # competes with the layer's own reads, so it lengthens the compute stream of offloaded layers
    offload_bytes = layer_h2d_bytes(spec, workload, seq_len) + workload.batch * memory.kv_bytes_per_token_layer(spec)
    launch_ms = GRAPH_LAUNCHES_PER_STEP * target.launch_overhead_us / 1e3
    return StepComponents(
        retrieval_ms=_ms(r_flops, r_bytes, target),
        layer_ms=_ms(layer_flops(spec, workload, seq_len), l_bytes, target) + target.layer_fixed_us / 1e3,
        transfer_ms=layer_transfer_ms(spec, workload, target, seq_len),
        tail_ms=_ms(t_flops, t_bytes, target) + launch_ms,
        offload_ms=_ms(0.0, offload_bytes, target),
        layer_h2d_bytes=layer_h2d_bytes(spec, workload, seq_len),
        offload_hbm_bytes=offload_bytes,
        hbm_bytes_no_transfer=r_bytes + spec.num_layers * l_bytes + t_bytes)


@dataclass(frozen=True)
class StepBreakdown:
    """One decode step: where the time goes (ms) and the bytes it moves."""

    compute_ms: float       # layers (with offload contention) + LM head + launch overhead, no retrieval
    transfer_ms: float      # busy time of the copy stream
    stall_ms: float         # compute waiting for transfers
    retrieval_ms: float
    step_ms: float          # retrieval + compute + stall
    tokens_per_s: float     # R / step
    h2d_bytes_per_step: float
    hbm_bytes_per_step: float


@dataclass(frozen=True)
class TimelineEvent:
    stream: str   # "compute" or "copy"
    label: str
    start_ms: float
    end_ms: float


def _simulate(c: StepComponents, num_layers: int, offloaded: set[int],
              issue_before: dict | None = None) -> tuple[list[TimelineEvent], float]:
    """Events of one step and its total stall (ms), with the FIFO copy stream.

    issue_before[j] = k: layer j's prefetch is issued when the compute stream reaches layer k
    (k <= j; default 0, i.e. right after the retrieval head).
    """
    events = [TimelineEvent("compute", "retrieval head", 0.0, c.retrieval_ms)]
    clock = copy_clock = c.retrieval_ms
    stall = 0.0
    layer_start = []
    for layer in range(num_layers):
        layer_start.append(clock)
        if layer in offloaded:
            issue_at = (issue_before or {}).get(layer, 0)
            assert issue_at <= layer, "a prefetch cannot be issued after its layer"
            copy_clock = max(copy_clock, layer_start[issue_at])
            events.append(TimelineEvent("copy", f"prefetch L{layer}", copy_clock, copy_clock + c.transfer_ms))
            copy_clock += c.transfer_ms
            if copy_clock > clock:
                events.append(TimelineEvent("compute", f"stall L{layer}", clock, copy_clock))
                stall += copy_clock - clock
                clock = copy_clock
        busy_ms = c.layer_ms + (c.offload_ms if layer in offloaded else 0.0)
        events.append(TimelineEvent("compute", f"layer {layer}", clock, clock + busy_ms))
        clock += busy_ms
    events.append(TimelineEvent("compute", "lm head", clock, clock + c.tail_ms))
    return events, stall


def step_time(spec: ModelSpec, workload: Workload, target: Target, seq_len: float,
              offloaded_layers=(), issue_before: dict | None = None) -> StepBreakdown:
    """Time of one decode step for workload.batch requests at length seq_len (tokens).

    offloaded_layers: indices of the layers whose KV lives in pinned host memory;
    issue_before: {layer: layer its prefetch is issued before}, default all right after retrieval.
    """
    offloaded = set(offloaded_layers)
    c = step_components(spec, workload, target, seq_len)
    _, stall = _simulate(c, spec.num_layers, offloaded, issue_before)
    compute = spec.num_layers * c.layer_ms + len(offloaded) * c.offload_ms + c.tail_ms
    step = c.retrieval_ms + compute + stall
    return StepBreakdown(
        compute_ms=compute, transfer_ms=len(offloaded) * c.transfer_ms, stall_ms=stall,
        retrieval_ms=c.retrieval_ms, step_ms=step, tokens_per_s=workload.batch * 1e3 / step,
        h2d_bytes_per_step=len(offloaded) * c.layer_h2d_bytes,
        hbm_bytes_per_step=c.hbm_bytes_no_transfer + len(offloaded) * c.offload_hbm_bytes)


def timeline(spec: ModelSpec, workload: Workload, target: Target, seq_len: float,
             offloaded_layers=(), issue_before: dict | None = None) -> list[TimelineEvent]:
    """Events (stream, label, start_ms, end_ms) of one decode step, for the overlap plot."""
    c = step_components(spec, workload, target, seq_len)
    events, _ = _simulate(c, spec.num_layers, set(offloaded_layers), issue_before)
    return events
