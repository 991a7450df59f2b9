"""The residency planner: an ILP over sequence-length segments (paper s.6, Eq. 8, Algs. 1-2 generalised).

The paper precomputes thresholds S^T_i and offloads the last layer first as S grows, maximising
L_GPU (Eq. 8). We instead minimise the predicted decode time of a whole request batch:

  variables   on_gpu[s, j] in {0, 1}: layer j keeps its full KV on the GPU in segment s;
              stall[s, j] >= 0 (ms): compute waiting for layer j's prefetch in one step of segment s.
  constraints gpu_memory_s: memory.gpu_bytes at the segment's end length <= the target's memory
              (unified targets: plus the offloaded KV, which shares the pool);
              host_memory: the offloaded KV at max_len <= the pinnable host memory (a rank's share);
              monotone: once offloaded, a layer stays offloaded (the runtime never moves KV back);
              overlap: layer j's attention starts after its transfer on the one FIFO copy stream.
  objective   sum over segments of (tokens in segment) x (step time at its mid length), seconds.

The constraints hold a linear form of the step (latency.step_components: the copy priced at its
rate beside compute, the compute slowdown charged to each offloaded layer). The predictions the
Solution reports, and the batch search's tokens/s, are the step DAG's critical path at the
chosen residency (latency.step_time, step_dag.py), which simulates the contention exactly; with
no contention figures in the target the two agree.

Prefetch schedule, an argued simplification: indices exist once the retrieval head has run, each
offloaded layer owns its budget buffer, and the copy stream is FIFO in layer order, so issuing a
prefetch earlier never delays anything in this model. Every prefetch is therefore issued right
after the retrieval head (issue_before_layer 0) and the copy stream's start times are continuous
expressions (cumulative transfer times), not binaries.

Symmetry breaking (on by default): all layers cost the same, and a later layer has more compute
ahead of its attention to hide its transfer, so the offloaded set can be a suffix (the paper's
last-layer-first rule) without losing optimality; the constraint on_gpu[s, j+1] <= on_gpu[s, j]
removes the equivalent permutations. tests check it changes no objective on a small model.
"""
from dataclasses import dataclass, field, replace

from specontext_compiler.cost_models import latency, memory
from specontext_compiler.cost_models import solver as lp
from specontext_compiler.cost_models.feasibility import infeasibility_message, max_feasible_batch
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import Target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import InfeasiblePlanError
from specontext_compiler.runtime.plan import Segment     # the plan's record; predicted: see _predict_segment
from specontext_compiler.sizes import parse_batch

NUM_SEGMENTS = 8


@dataclass(frozen=True)
class Solution:
    """The planner's answer for one batch size."""

    batch: int
    segments: list[Segment]
    schedule: list[tuple[int, int]]     # (offloaded layer, layer its prefetch is issued before)
    solver: dict                        # name, status, time_s, objective (seconds of decode)
    predicted: dict                     # decode_s, tokens_per_s over the whole generation
    batch_search: list[dict] = field(default_factory=list)  # auto: {batch, tokens_per_s} tried


def segment_bounds(prompt_len: int, max_len: int, num_segments: int = NUM_SEGMENTS) -> list[tuple[int, int]]:
    """Geometric length segments [(from, to)] covering prompt_len..max_len."""
    count = max(1, min(num_segments, max_len - prompt_len))
    ratio = max_len / prompt_len
    points = sorted({prompt_len, max_len, *(round(prompt_len * ratio ** (k / count)) for k in range(1, count))})
    return list(zip(points[:-1], points[1:]))


def _mid(bounds: tuple[int, int]) -> float:
    return (bounds[0] + bounds[1]) / 2


def _add_memory(problem, spec, workload, target, bounds, on_gpu) -> None:
    """gpu_memory_s per segment (at its end length) and host_memory (offloaded KV at max_len)."""
    gb = 1e-9   # constraints in GB keep CBC's coefficients near 1
    for s, (_, to_len) in enumerate(bounds):
        num_gpu = lp.lp_sum(on_gpu[s])
        if target.unified_memory:
            need = memory.pool_bytes(spec, workload, num_gpu, to_len, workload.max_len)
        else:
            need = memory.gpu_bytes(spec, workload, num_gpu, to_len)
        problem.constrain(need * gb <= target.gpu_memory_bytes * gb, f"gpu_memory_s{s}")
    if not target.unified_memory:
        offloaded = spec.num_layers - lp.lp_sum(on_gpu[-1])
        pinned = memory.host_bytes(spec, workload, offloaded, workload.max_len)
        problem.constrain(pinned * gb <= memory.pinnable_host_bytes(target.host_memory_bytes, workload.gpus) * gb,
                          "host_memory")


def _add_order(problem, on_gpu, symmetry_breaking: bool) -> None:
    """monotone residency across segments; optional suffix rule inside a segment."""
    for s, row in enumerate(on_gpu):
        for j, var in enumerate(row):
            if s + 1 < len(on_gpu):
                problem.constrain(on_gpu[s + 1][j] <= var, f"monotone_s{s}_L{j}")
            if symmetry_breaking and j + 1 < len(row):
                problem.constrain(row[j + 1] <= var, f"suffix_s{s}_L{j}")


def _add_overlap(problem, comps, on_gpu_row, stall_row, s: int) -> None:
    """Layer j's attention (at r + j·c + h·(offloaded layers < j) + stalls so far) waits for the
    FIFO copy stream's end r + d + tr·(offloaded layers <= j), d the elastic diff; big-M =
    d + tr·(j+1) releases it when layer j is resident."""
    c, tr, h, d = comps.layer_ms, comps.transfer_ms, comps.offload_ms, comps.diff_ms
    for j in range(len(on_gpu_row)):
        contention = h * j - h * lp.lp_sum(on_gpu_row[:j])
        started = j * c + contention + lp.lp_sum(stall_row[: j + 1])
        copied = d + tr * (j + 1) - tr * lp.lp_sum(on_gpu_row[: j + 1])
        problem.constrain(started - copied + (d + tr * (j + 1)) * on_gpu_row[j] >= 0, f"overlap_s{s}_L{j}")


def _predict_segment(spec, workload, target, bounds, offloaded) -> dict:
    """Float predictions for one segment, with the same functions the ILP's constraints use."""
    step = latency.step_time(spec, workload, target, _mid(bounds), offloaded)
    num_gpu = spec.num_layers - len(offloaded)
    predicted = {k: getattr(step, k) for k in ("step_ms", "tokens_per_s", "h2d_bytes_per_step",
                                               "hbm_bytes_per_step", "compute_ms", "transfer_ms",
                                               "stall_ms", "retrieval_ms", "selection_overlap",
                                               "critical_path")}
    predicted["gpu_bytes"] = float(memory.gpu_bytes(spec, workload, num_gpu, bounds[1]))
    predicted["host_bytes"] = float(memory.host_bytes(spec, workload, len(offloaded), workload.max_len))
    return predicted


def _solve_batch(spec: ModelSpec, workload: Workload, target: Target, time_limit_s: float,
                 symmetry_breaking: bool = True, resident_layers=()) -> Solution:
    """Build and solve the ILP for workload.batch; raise InfeasiblePlanError if nothing fits."""
    reason = infeasibility_message(spec, workload, target)
    if reason:
        raise InfeasiblePlanError(reason)
    bounds = segment_bounds(workload.prompt_len, workload.max_len)
    L = spec.num_layers
    problem = lp.Problem(f"residency_b{workload.batch}")
    on_gpu = [[problem.binary(f"on_gpu_s{s}_L{j}") for j in range(L)] for s in range(len(bounds))]
    stall = [[problem.continuous(f"stall_s{s}_L{j}") for j in range(L)] for s in range(len(bounds))]
    _add_memory(problem, spec, workload, target, bounds, on_gpu)
    _add_order(problem, on_gpu, symmetry_breaking)
    for j in resident_layers:        # sliding-window layers: dense over their window, never offloaded
        for s, row in enumerate(on_gpu):
            problem.constrain(row[j] >= 1, f"resident_s{s}_L{j}")
    decode_ms = []
    for s, seg in enumerate(bounds):
        comps = latency.step_components(spec, workload, target, _mid(seg))
        _add_overlap(problem, comps, on_gpu[s], stall[s], s)
        fixed_ms = comps.retrieval_ms + L * comps.layer_ms + comps.tail_ms
        offload_ms = comps.offload_ms * (L - lp.lp_sum(on_gpu[s]))
        decode_ms.append((seg[1] - seg[0]) * (fixed_ms + offload_ms + lp.lp_sum(stall[s])))
    problem.minimize(lp.lp_sum(decode_ms) * 1e-3)
    stats = problem.solve(time_limit_s)
    if not stats.has_solution:
        raise InfeasiblePlanError(
            f"the residency ILP found no plan ({stats.status}) at batch {workload.batch}; "
            f"lower --batch or --max-len")
    return _solution(spec, workload, target, bounds, on_gpu, stats)


def _solution(spec, workload, target, bounds, on_gpu, stats) -> Solution:
    """Read the residency, evaluate every segment with the float functions, assemble a Solution."""
    segments, total_s = [], 0.0
    for s, seg in enumerate(bounds):
        gpu = [j for j, v in enumerate(on_gpu[s]) if lp.value(v) > 0.5]
        off = [j for j in range(spec.num_layers) if j not in gpu]
        predicted = _predict_segment(spec, workload, target, seg, off)
        total_s += (seg[1] - seg[0]) * predicted["step_ms"] / 1e3
        segments.append(Segment(seg[0], seg[1], gpu, off, predicted))
    offloaded_ever = sorted({j for seg in segments for j in seg.offloaded_layers})
    tokens = workload.batch * workload.generated_tokens
    return Solution(
        batch=workload.batch, segments=segments, schedule=[(j, 0) for j in offloaded_ever],
        solver={"name": stats.solver, "status": stats.status, "time_s": stats.time_s,
                "objective": stats.objective},
        predicted={"decode_s": total_s, "tokens_per_s": tokens / total_s})


def plan_residency(spec: ModelSpec, workload: Workload, target: Target, batch: int | str = 1,
                   time_limit_s: float = 10, symmetry_breaking: bool = True, resident_layers=()) -> Solution:
    """Plan layer residency per length segment for batch requests (int) or the best batch ("auto").

    auto: solve for 1, 2, 4, ... up to the largest batch whose memory fits, then search between
    the best power of two's neighbours; keep the highest predicted tokens/s (all of them listed
    in Solution.batch_search). resident_layers stay on the GPU in every segment.
    """
    batch = parse_batch(batch)
    if batch != "auto":
        return _solve_batch(spec, replace(workload, batch=batch), target, time_limit_s, symmetry_breaking,
                            resident_layers)
    largest = max_feasible_batch(spec, workload, target)
    if largest == 0:
        _solve_batch(spec, replace(workload, batch=1), target, time_limit_s)  # raises with the reason
    tried: dict[int, Solution] = {}

    def solve(b: int) -> float:
        if b not in tried:
            tried[b] = _solve_batch(spec, replace(workload, batch=b), target, time_limit_s, symmetry_breaking,
                                    resident_layers)
        return tried[b].predicted["tokens_per_s"]

    candidates = sorted({2 ** k for k in range(largest.bit_length()) if 2 ** k <= largest} | {largest})
    best = max(candidates, key=solve)
    i = candidates.index(best)
    low, high = candidates[max(i - 1, 0)], candidates[min(i + 1, len(candidates) - 1)]
    while high - low > 2:   # ternary search on the unimodal tokens/s between the neighbours
        a, b = low + (high - low) // 3, high - (high - low) // 3
        if solve(a) < solve(b):
            low = a
        else:
            high = b
    best = max(range(low, high + 1), key=solve)
    search = [{"batch": b, "tokens_per_s": s.predicted["tokens_per_s"]} for b, s in sorted(tried.items())]
    return replace(tried[best], batch_search=search)
