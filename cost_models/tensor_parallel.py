"""Tensor parallelism over the GPUs of one machine (Megatron-LM / vLLM layout), one function per equation.

Each of N ranks holds Hq/N query heads with their slice of q_proj (column-parallel) and o_proj
(row-parallel), the MLP's gate/up columns and down rows (I/N), and its own KV heads: Hkv/N of them,
or, when N exceeds Hkv, one KV head replicated on N/Hkv ranks (as vLLM does). The embedding, the
LM head and the norms are replicated. A decoder layer ends its attention and its MLP with one
all-reduce of the R x hidden activations each.

Head-level selection is per KV head, so a rank selects for its own KV heads with no communication:
the retrieval head is split the same way (its KV heads, with their query heads, over the ranks).
A head whose KV heads do not divide over the ranks, or batch-level selection (one token set shared
by every KV head), keeps the whole head on every rank: each rank computes the same selection.

The planner prices one rank (rank_spec, rank_workload): the memory and latency models then give
per-rank bytes and a per-rank step; the pinnable host memory, shared by the machine's ranks, is
divided by N (memory.pinnable_host_bytes), each rank copies over its own PCIe link, and every layer
adds two all-reduces (allreduce_ms) on the compute stream.
"""
from dataclasses import replace

from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.workload import RetrievalHead, Workload

MAX_GPUS_PER_MACHINE = 8
ALLREDUCES_PER_LAYER = 2     # after the attention's o_proj and after the MLP's down_proj


def query_heads_per_rank(num_heads: int, gpus: int) -> int:
    """Hq / N: query heads each rank computes."""
    return num_heads // gpus


def kv_heads_per_rank(num_kv_heads: int, gpus: int) -> int:
    """Hkv / N, at least 1: KV heads each rank stores and selects for."""
    return max(1, num_kv_heads // gpus)


def kv_head_replicas(num_kv_heads: int, gpus: int) -> int:
    """Ranks holding each KV head: N / Hkv when N exceeds Hkv (replicated), else 1."""
    return max(1, gpus // num_kv_heads)


def rank_kv_heads(num_kv_heads: int, gpus: int) -> list[list[int]]:
    """The KV heads of each rank, rank r first: contiguous blocks, or one replicated head."""
    per_rank, replicas = kv_heads_per_rank(num_kv_heads, gpus), kv_head_replicas(num_kv_heads, gpus)
    return [[r // replicas * per_rank + k for k in range(per_rank)] for r in range(gpus)]


def kv_heads_divide(num_kv_heads: int, gpus: int) -> bool:
    """The KV heads split evenly over the ranks, or (N > Hkv) each is replicated on N/Hkv ranks."""
    return num_kv_heads % gpus == 0 if gpus <= num_kv_heads else gpus % num_kv_heads == 0


def split_problem(spec: ModelSpec, gpus: int) -> str | None:
    """Why spec's heads or MLP cannot be split over gpus ranks (None when they can)."""
    if gpus < 1:
        return f"--gpus {gpus} must be a positive number of GPUs"
    if gpus == 1:
        return None
    if spec.attention_kind == "mla":
        return "tensor parallelism over an MLA model's latent cache is not supported"
    if spec.num_heads % gpus:
        return f"{gpus} does not divide the {spec.num_heads} query heads"
    if not kv_heads_divide(spec.num_kv_heads, gpus):
        return f"{gpus} GPUs and the {spec.num_kv_heads} KV heads do not divide one another"
    if spec.intermediate_size % gpus:
        return f"{gpus} does not divide the MLP width {spec.intermediate_size}"
    return None


def sharded_layer_params(spec: ModelSpec) -> int:
    """Parameters of one layer that tensor parallelism splits: Q/K/V/O 2·h·D·(Hq + Hkv) + MLP 3·h·I."""
    attn = 2 * spec.hidden_size * spec.head_dim * (spec.num_heads + spec.num_kv_heads)
    return attn + 3 * spec.hidden_size * spec.intermediate_size


def replicated_params(spec: ModelSpec) -> int:
    """Parameters every rank holds whole: embedding, LM head, norms (all but the layers' split part)."""
    return spec.param_count - spec.num_layers * sharded_layer_params(spec)


def rank_spec(spec: ModelSpec, gpus: int) -> ModelSpec:
    """The model as one rank sees it: its heads, KV heads, MLP width, cache row and parameters."""
    if gpus == 1:
        return spec
    kv = kv_heads_per_rank(spec.num_kv_heads, gpus)
    split = replace(spec, num_heads=query_heads_per_rank(spec.num_heads, gpus), num_kv_heads=kv,
                    intermediate_size=spec.intermediate_size // gpus,
                    kv_elems_per_token=spec.kv_elems_per_token * kv // spec.num_kv_heads)
    return replace(split, param_count=replicated_params(spec) + spec.num_layers * sharded_layer_params(split))


def head_is_split(head: RetrievalHead, gpus: int, level: str) -> bool:
    """True when the retrieval head's KV heads go over the ranks like the LLM's (see the module doc)."""
    divides = head.head_num_heads % gpus == 0 and kv_heads_divide(head.head_num_kv_heads, gpus)
    return gpus > 1 and level == "head" and divides


def rank_head(head: RetrievalHead, gpus: int, level: str) -> RetrievalHead:
    """The retrieval head one rank runs: its share of query and KV heads, or the whole head."""
    if not head_is_split(head, gpus, level):
        return head
    kv = kv_heads_per_rank(head.head_num_kv_heads, gpus)
    split = replace(head, head_num_heads=head.head_num_heads // gpus, head_num_kv_heads=kv, head_params=None)
    # a real checkpoint's extra parameters (e.g. a fused head's fc) are not split: every rank keeps them
    extra = 0 if head.head_params is None else max(0, head.head_params - replace(head, head_params=None).params)
    return replace(split, head_params=split.params + extra) if extra else split


def rank_workload(spec: ModelSpec, workload: Workload, level: str) -> Workload:
    """workload with the retrieval head one rank runs fixed (the whole model's EAGLE-3 shape if none)."""
    if workload.gpus == 1:
        return workload
    return replace(workload, head=rank_head(workload.head_for(spec), workload.gpus, level))


def ring_allreduce_bytes(message_bytes: float, gpus: int) -> float:
    """Bytes a ring all-reduce sends over each rank's link: 2(N-1)/N of the message."""
    return 2 * (gpus - 1) / gpus * message_bytes


def allreduce_ms(message_bytes: float, gpus: int, link_gbps: float, latency_us: float) -> float:
    """One all-reduce of message_bytes over gpus ranks: the link's latency + ring bytes / bandwidth, ms."""
    if gpus == 1:
        return 0.0
    return latency_us / 1e3 + ring_allreduce_bytes(message_bytes, gpus) / (link_gbps * 1e6)


def layer_allreduce_bytes(spec: ModelSpec, batch: int) -> int:
    """The message of one all-reduce: the R x hidden activations at the model's dtype."""
    return batch * spec.hidden_size * spec.dtype_bytes
