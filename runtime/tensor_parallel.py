"""One rank of a tensor-parallel plan (plan.tensor_parallel): its weight shards, its model view, its collectives.

The compiler's plan records the split (cost_models/tensor_parallel.py): a rank holds Hq/N query
heads, its KV heads (rank_kv_heads; one replicated head when N exceeds the KV heads), I/N of the
MLP width; q/k/v and gate/up are cut by rows (column-parallel), o_proj and down_proj by columns
(row-parallel, summed by the graph's specontext::all_reduce); everything else is replicated. Each
rank runs the same rewritten graph on its shards, its own KV store for its KV heads, and its own
retrieval head over those KV heads, so selection needs no communication. The ranks sample the same
logits; rank 0's tokens are broadcast so that they never drift apart.

The process group is the caller's (torchrun + NCCL on GPUs, gloo on CPU): bind only checks that it
exists and has the plan's number of ranks. Imports torch only (no compiler code).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.distributed as dist

from specontext_compiler.errors import ModelMismatchError, RuntimeResourceError

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # split by output rows
ROW_PARALLEL = ("o_proj", "down_proj")                                     # split by input columns


def all_reduce_sum(partial: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's partial (a new tensor; the input is left as it was)."""
    total = partial.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Rank 0's sampled ids on every rank (in place); unchanged outside a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(ids, src=0)
    return ids


def current_rank(record: dict) -> int:
    """This process's rank, after checking the process group matches the plan's GPU count."""
    gpus = int(record["gpus"])
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeResourceError(f"the plan is tensor parallel over {gpus} GPUs; bind it in each of {gpus} "
                                   "processes after torch.distributed.init_process_group (e.g. under torchrun)")
    if dist.get_world_size() != gpus:
        raise RuntimeResourceError(f"the plan is tensor parallel over {gpus} GPUs, the process group has "
                                   f"{dist.get_world_size()} ranks; launch {gpus} processes")
    return dist.get_rank()


def _rows(record: dict, head_dim: int, kind: str, rank: int) -> torch.Tensor:
    """Output rows of a column-parallel weight (or input columns of a row-parallel one) for rank."""
    if kind in ("q_proj", "o_proj"):
        per = record["query_heads_per_rank"] * head_dim
        return torch.arange(rank * per, (rank + 1) * per)
    if kind in ("k_proj", "v_proj"):
        heads = record["rank_kv_heads"][rank]
        return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    per = record["intermediate_per_rank"]
    return torch.arange(rank * per, (rank + 1) * per)


def shard(name: str, tensor: torch.Tensor, record: dict, head_dim: int, rank: int) -> torch.Tensor:
    """The part of the named weight (HF state-dict name) that rank holds."""
    parts = name.split(".")
    kind = parts[-2] if len(parts) >= 2 else ""
    if kind in COLUMN_PARALLEL:
        return tensor.index_select(0, _rows(record, head_dim, kind, rank).to(tensor.device)).contiguous()
    if kind in ROW_PARALLEL and parts[-1] == "weight":
        return tensor.index_select(1, _rows(record, head_dim, kind, rank).to(tensor.device)).contiguous()
    if kind in ROW_PARALLEL:
        raise ModelMismatchError(f"{name}: a row-parallel bias is not supported by tensor-parallel plans")
    return tensor


def rank_plan(plan):
    """The plan as one rank binds it: the model's heads, KV heads and MLP width are the rank's."""
    record, spec = plan.tensor_parallel, plan.model
    kv = record["kv_heads_per_rank"]
    model = replace(spec, num_heads=record["query_heads_per_rank"], num_kv_heads=kv,
                    intermediate_size=record["intermediate_per_rank"],
                    kv_elems_per_token=spec.kv_elems_per_token * kv // spec.num_kv_heads)
    return replace(plan, model=model)


def _rank_config(config, record: dict, head_dim: int):
    config = copy.deepcopy(config)
    config.num_attention_heads = record["query_heads_per_rank"]
    config.num_key_value_heads = record["kv_heads_per_rank"]
    config.intermediate_size = record["intermediate_per_rank"]
    config.head_dim = head_dim
    return config


def rank_model(hf_model: torch.nn.Module, plan, rank: int) -> torch.nn.Module:
    """A model of the rank's shape holding the rank's shards of hf_model's weights (by name)."""
    record, head_dim = plan.tensor_parallel, plan.model.head_dim
    with torch.device("meta"):
        shell = type(hf_model)(_rank_config(hf_model.config, record, head_dim))
    state = {name: shard(name, tensor, record, head_dim, rank) for name, tensor in hf_model.state_dict().items()}
    shell.load_state_dict(state, assign=True, strict=True)
    for name, buffer in hf_model.named_buffers():       # non-persistent ones (RoPE) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        shell.get_submodule(owner)._buffers[leaf] = buffer
    if getattr(hf_model.config, "tie_word_embeddings", False):
        shell.tie_weights()
    return shell.eval()


def bind_rank(plan, hf_model: torch.nn.Module, dlm, head_file: str | None):
    """(rank plan, rank model) for this process; a head from a file or a draft is not split yet."""
    rank = current_rank(plan.tensor_parallel)
    if dlm is not None or head_file:
        raise ModelMismatchError("tensor-parallel binding derives the retrieval head from each rank's own layer "
                                 "(self:0) so far; compile the plan with --dlm self:0")
    return rank_plan(plan), rank_model(hf_model, plan, rank)
