"""GPU and host memory of a plan, one function per quantity (paper s.6, Table 3, Eqs. 6-8, Alg. 2).

Every function is plain arithmetic (+, -, * by constants) so it accepts floats for predictions
and reports, and PuLP affine expressions (e.g. a sum of residency binaries as num_gpu_layers) for
the ILP's constraints: the planner and the prediction share one formula. All results are bytes.
R is workload.batch, S a sequence length in tokens, W = workload.window_tokens.

Our model (gpu_bytes) differs from the paper's Eq. 7 on purpose: the head keeps K only, offloaded
layers reserve W = budget + sinks + recent rows (not B), and the workspace is itemised instead of
the paper's 30%-of-weights; the paper's equations are kept below for the report to compare.
"""
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.runtime.plan_records import DEFAULT_PREFILL_CHUNK_TOKENS

GIB = 1024 ** 3
FIXED_RESERVE_BYTES = 9 * GIB // 2   # CUDA context (0.55 GB measured on our H100), cuBLAS, graph pool, allocator slack;
#   a smaller reserve lets a plan packed near full HBM fail to allocate: about 3.2 GiB is in use
#   outside PyTorch's allocations and a layer's growth in decode needs headroom beside it
#   (benchmarks/RESULTS.md has the measurements)
PINNABLE_HOST_FRACTION = 0.65   # measured on the H100 host (135 GB): 77.3 GB pinned ran, 96.6 GB killed the process
FP32_BYTES = 4
# The prefill chunk the workspace reserves (one source with the runtime's default for older plans);
# the plan's chunk is this or more.
PREFILL_CHUNK_TOKENS = DEFAULT_PREFILL_CHUNK_TOKENS
INDEX_BYTES = 8                 # int64 token indices


def kv_bytes_per_token_layer(spec: ModelSpec) -> int:
    """Bytes one token adds to one layer's KV cache: the 4·H·D of Eqs. 6-7 (Llama-3.1-8B: 4096)."""
    return spec.kv_bytes_per_token_layer


def kv_bytes_per_token(spec: ModelSpec) -> int:
    """Bytes one token adds to the whole model's KV cache: L·4·H·D (Llama-3.1-8B: 131072)."""
    return spec.num_layers * kv_bytes_per_token_layer(spec)


def weight_bytes(spec: ModelSpec) -> int:
    """M_O: bytes of the LLM's weights at its dtype (Llama-3.1-8B bf16: 16.06 GB)."""
    return spec.param_count * spec.dtype_bytes


def head_weight_bytes(spec: ModelSpec, workload: Workload) -> int:
    """M_D: bytes of the retrieval head's kept weights (Q/K projections; see RetrievalHead)."""
    return workload.head_for(spec).params * spec.dtype_bytes


def head_k_cache_bytes(spec: ModelSpec, workload: Workload, seq_len):
    """The retrieval head's K cache (K only, paper s.4.3): R·S·H_head·D_head·dtype bytes."""
    head = workload.head_for(spec)
    return workload.batch * seq_len * head.head_num_kv_heads * head.head_dim * spec.dtype_bytes


def resident_kv_bytes(spec: ModelSpec, workload: Workload, num_gpu_layers, seq_len):
    """Full KV of the GPU-resident layers: L_GPU·R·S·4HD bytes (the L_GPU·S term of Eq. 7)."""
    return num_gpu_layers * (workload.batch * seq_len * kv_bytes_per_token_layer(spec))


def budget_buffer_bytes(spec: ModelSpec, workload: Workload, num_offloaded_layers):
    """GPU buffers of the offloaded layers: L_CPU·R·W·4HD bytes (Eq. 7's L_CPU·B term, W for B)."""
    per_layer = workload.batch * workload.window_tokens * kv_bytes_per_token_layer(spec)
    return num_offloaded_layers * per_layer


def workspace_bytes(spec: ModelSpec, workload: Workload, seq_len):
    """Decode-step working memory (bytes); replaces the paper's 0.3·(M_O + M_D) allowance.

    Items: fp32 logits R·V; the head's fp32 scores R·Hq·S plus their group maxima R·Hkv·S;
    selected indices (this step's and the last, for the elastic diff) 2·R·Hkv·W int64; one layer's
    gathered rows R·W·4HD; fp32 activations R·(4·hidden + 2·intermediate); a fixed reserve for
    the CUDA context, cuBLAS, the CUDA-graph pool and allocator slack (FIXED_RESERVE_BYTES).
    """
    R, head = workload.batch, workload.head_for(spec)
    logits = R * spec.vocab_size * FP32_BYTES
    scores = R * seq_len * (head.head_num_heads + head.head_num_kv_heads) * FP32_BYTES
    indices = 2 * R * spec.num_kv_heads * workload.window_tokens * INDEX_BYTES
    gathered = R * workload.window_tokens * kv_bytes_per_token_layer(spec)
    activations = R * (4 * spec.hidden_size + 2 * spec.intermediate_size) * FP32_BYTES
    # Growing a resident layer at a segment boundary holds its old and new K (then V) at once,
    # and a prefill chunk's logits and MLP activations outlive the decode step's (found on the
    # H100: a plan packed without these ran out of memory at a boundary). The smallest chunk is
    # priced with every token's fp32 logits: an upper bound for a graph that keeps the last only;
    # prefill_chunk_tokens adds what the plan leaves free on top.
    grow_transient = R * seq_len * kv_bytes_per_token_layer(spec) / 2
    prefill = PREFILL_CHUNK_TOKENS * (spec.vocab_size * FP32_BYTES + 4 * spec.intermediate_size * 2)
    return logits + scores + indices + gathered + activations + grow_transient + prefill + FIXED_RESERVE_BYTES


def prefill_bytes_per_token(spec: ModelSpec, workload: Workload, masked: bool = False) -> int:
    """Activation bytes one prompt token holds while a prefill forward runs (one request, eager graph).

    Items, per token: the residual stream and its norm's fp32 temporaries 4·hidden·4; q, k, v and
    the attention output, plus an offloaded layer's packed K|V for its host copy (2Hq + 4Hkv)·D·b;
    the MLP's gate, up and their product 3·I·b; the retrieval head's input, q and k. Flash
    attention keeps no [T, S] scores; a sliding-window layer's explicit mask does (masked: bool
    plus a bf16 bias, 3 bytes per key up to max_len). The logits are the last token's only.
    """
    b, head = spec.dtype_bytes, workload.head_for(spec)
    residual = 4 * spec.hidden_size * FP32_BYTES
    attention = (2 * spec.num_heads + 4 * spec.num_kv_heads) * spec.head_dim * b
    mlp = 3 * spec.intermediate_size * b
    retrieval = (head.head_input_dim + (head.head_num_heads + head.head_num_kv_heads) * head.head_dim) * b
    mask = 3 * workload.max_len if masked else 0
    return residual + attention + mlp + retrieval + mask


def prefill_fixed_bytes(spec: ModelSpec, workload: Workload, masked: bool = False) -> int:
    """Bytes of a prefill forward that do not grow with its tokens: a later chunk of a longer prompt
    reads one offloaded layer's history back, max_len·4HD; an explicit mask (masked) attends over
    KV heads expanded to the query heads, max_len·Hq·2D·b."""
    read_back = workload.max_len * kv_bytes_per_token_layer(spec)
    expanded = workload.max_len * spec.num_heads * 2 * spec.head_dim * spec.dtype_bytes if masked else 0
    return read_back + expanded


def prefill_chunk_tokens(spec: ModelSpec, workload: Workload, free_bytes, masked: bool = False) -> int:
    """Prompt tokens one prefill forward may take: the PREFILL_CHUNK_TOKENS the workspace reserves,
    plus as many more as fit in free_bytes, the GPU memory the plan leaves free at its fullest
    (free_bytes_at_peak), once prefill_fixed_bytes is set aside; at most max_len."""
    fixed = prefill_fixed_bytes(spec, workload, masked)
    extra = max(0, int(free_bytes) - fixed) // prefill_bytes_per_token(spec, workload, masked)
    return int(min(workload.max_len, PREFILL_CHUNK_TOKENS + extra))


def free_bytes_at_peak(spec: ModelSpec, workload: Workload, gpu_memory_bytes: int,
                       residency: list[tuple[int, int]], unified: bool = False) -> float:
    """GPU bytes a plan leaves free at its fullest: the target's memory minus the largest gpu_bytes
    over its segments, residency = [(num_gpu_layers, segment end length), ...] (unified: pool_bytes)."""
    def need(num_gpu: int, seq_len: int):
        if unified:
            return pool_bytes(spec, workload, num_gpu, seq_len, workload.max_len)
        return gpu_bytes(spec, workload, num_gpu, seq_len)
    return gpu_memory_bytes - max(need(num_gpu, seq_len) for num_gpu, seq_len in residency)


def host_bytes(spec: ModelSpec, workload: Workload, num_offloaded_layers, seq_len):
    """Pinned host KV of the offloaded layers: L_CPU·R·S·4HD bytes (allocate at S = max_len)."""
    return num_offloaded_layers * (workload.batch * seq_len * kv_bytes_per_token_layer(spec))


def gpu_bytes(spec: ModelSpec, workload: Workload, num_gpu_layers, seq_len):
    """Total GPU bytes at length S with num_gpu_layers layers resident (the rest offloaded)."""
    num_offloaded = spec.num_layers - num_gpu_layers
    return (weight_bytes(spec) + head_weight_bytes(spec, workload)
            + head_k_cache_bytes(spec, workload, seq_len)
            + resident_kv_bytes(spec, workload, num_gpu_layers, seq_len)
            + budget_buffer_bytes(spec, workload, num_offloaded)
            + workspace_bytes(spec, workload, seq_len))


def pool_bytes(spec: ModelSpec, workload: Workload, num_gpu_layers, seq_len, host_seq_len):
    """Unified-memory targets (Jetson): GPU bytes plus the offloaded KV, which share one pool."""
    num_offloaded = spec.num_layers - num_gpu_layers
    return gpu_bytes(spec, workload, num_gpu_layers, seq_len) + host_bytes(
        spec, workload, num_offloaded, host_seq_len)


def pinnable_host_bytes(host_memory_bytes: int, gpus: int = 1) -> float:
    """Host bytes one rank may pin for KV: PINNABLE_HOST_FRACTION of the target's RAM, shared
    evenly by the gpus ranks of the machine (each pins its own KV heads' history)."""
    return PINNABLE_HOST_FRACTION * host_memory_bytes / gpus


# --- The paper's own model (s.6), for comparison in the report -------------------------------

PAPER_RUNTIME_FACTOR = 1.3  # "we select 30% of the model size as the runtime memory"


def _paper_hd(spec: ModelSpec) -> float:
    """H·D of the paper, taken as half the KV elements per token so that 4·H·D = KV bytes (fp16)."""
    return spec.kv_elems_per_token / 2


def eq6_all_gpu_bytes(spec: ModelSpec, workload: Workload, seq_len):
    """Eq. 6: M_all = 1.3(M_O + M_D) + 4R(L + 1 + α)·S·H·D, every layer's KV on the GPU."""
    alpha = spec.gqa_group
    models = PAPER_RUNTIME_FACTOR * (weight_bytes(spec) + head_weight_bytes(spec, workload))
    return models + 2 * spec.dtype_bytes * workload.batch * (spec.num_layers + 1 + alpha) * seq_len * _paper_hd(spec)


def eq7_partial_bytes(spec: ModelSpec, workload: Workload, seq_len, num_cpu_layers):
    """Eq. 7: M_part = 1.3(M_O + M_D) + 4R[(L_GPU + 1 + α)·S + L_CPU·B]·H·D, B = workload.budget."""
    alpha, num_gpu = spec.gqa_group, spec.num_layers - num_cpu_layers
    models = PAPER_RUNTIME_FACTOR * (weight_bytes(spec) + head_weight_bytes(spec, workload))
    tokens = (num_gpu + 1 + alpha) * seq_len + num_cpu_layers * workload.budget
    return models + 2 * spec.dtype_bytes * workload.batch * tokens * _paper_hd(spec)


def alg2_thresholds(spec: ModelSpec, workload: Workload, gpu_memory_bytes: int,
                    b_term_factor: float = 4.0) -> list[int]:
    """Alg. 2: S^T_i, the longest length that fits with the last i layers offloaded, i = 0..L.

    The printed Alg. 2 line 3 subtracts (i·B)·R·H·D with no factor 4, while solving Eq. 7 for S
    gives 4·i·B·R·H·D: one is a typo. We default to Eq. 7's 4 (2 tensors x 2 bytes, as the
    S term has), the conservative choice that makes S^T_i the exact root of Eq. 7; pass
    b_term_factor=1 to reproduce the printed algorithm.
    """
    alpha, L, R, B = spec.gqa_group, spec.num_layers, workload.batch, workload.budget
    hd, coef = _paper_hd(spec), 2 * spec.dtype_bytes
    free = gpu_memory_bytes - PAPER_RUNTIME_FACTOR * (weight_bytes(spec) + head_weight_bytes(spec, workload))
    thresholds = []
    for i in range(L + 1):
        numerator = free - b_term_factor / 4 * coef * i * B * R * hd
        thresholds.append(int(numerator // (coef * (L + 1 + alpha - i) * R * hd)))
    return thresholds


def paper_offloaded_layers(thresholds: list[int], seq_len: int) -> int:
    """L_CPU at length S under Alg. 1, read consistently: min{i : S < S^T_i} (L if none)."""
    for i, limit in enumerate(thresholds):
        if seq_len < limit:
            return i
    return len(thresholds) - 1


# --- Closed-form feasibility, for diagnosis and the batch search ------------------------------

def min_offloaded_layers(spec: ModelSpec, workload: Workload, gpu_memory_bytes: int, seq_len: int,
                         unified: bool = False, host_seq_len: int | None = None) -> int | None:
    """Fewest offloaded layers whose plan fits gpu_memory_bytes at length S; None if none fits.

    unified: the offloaded KV (at host_seq_len) shares the pool, as on Jetson.
    """
    for num_offloaded in range(spec.num_layers + 1):
        num_gpu = spec.num_layers - num_offloaded
        need = (pool_bytes(spec, workload, num_gpu, seq_len, host_seq_len or seq_len) if unified
                else gpu_bytes(spec, workload, num_gpu, seq_len))
        if need <= gpu_memory_bytes:
            return num_offloaded
    return None
