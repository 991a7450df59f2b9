"""A tensor-parallel plan run by 2 and 4 processes over gloo on the CPU: each rank binds its shards by
name, keeps its own KV heads and selects for them; greedy tokens equal the single-process engine's."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from specontext_compiler import compile_model, load_plan
from specontext_compiler.errors import RuntimeResourceError
from specontext_compiler.models import load_preset_config

REPO_ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
PLAN_OPTIONS = dict(target="h100", max_len=512, budget=32, recent_tokens=8, dlm="self:0")   # sparse: prompt 120


def _rank_main(rank: int, world: int, port: int, plan_dir: str, model_dir: str, prompt: list[int], out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine = load_plan(plan_dir).bind(model, device="cpu")
        tokens = engine.generate([prompt], max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0].token_ids
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "tokens": tokens, "kv_heads": engine.ctx.store.layout.num_kv_heads,
            "weights": sum(p.numel() for p in engine.params)}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """A tiny random Llama with 8 query and 4 KV heads, saved; its single-process plan and greedy tokens."""
    root = tmp_path_factory.mktemp("tp_gloo")
    config = load_preset_config("tiny-llama")
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 128, 8, 4
    config.intermediate_size = 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(root / "model")
    compile_model(str(root / "model"), out=root / "p1", **PLAN_OPTIONS)
    prompt = torch.randint(3, 256, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = load_plan(root / "p1").bind(model, device="cpu")
    reference = engine.generate([prompt], max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0].token_ids
    return root, model, prompt, reference


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_over_gloo_generate_the_single_process_tokens(four_kv_heads, world, monkeypatch):
    root, model, prompt, reference = four_kv_heads
    monkeypatch.syspath_prepend(str(REPO_ROOT))      # spawned ranks import this module as tests.runtime....
    plan_dir, out = root / f"p{world}", root / f"out{world}"
    compile_model(str(root / "model"), out=plan_dir, gpus=world, **PLAN_OPTIONS)
    assert "specontext.all_reduce.default x6" in (plan_dir / "decode_graph.py").read_text()   # 3 layers x 2
    out.mkdir()
    mp.spawn(_rank_main, args=(world, _free_port(), str(plan_dir), str(root / "model"), prompt, str(out)),
             nprocs=world)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["tokens"] == reference for r in ranks), (reference, [r["tokens"] for r in ranks])
    assert all(r["kv_heads"] == 4 // world for r in ranks)
    record = load_plan(plan_dir).tensor_parallel
    replicated = record["replicated_weight_bytes"] // 2            # the plan counts bf16 bytes
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())               # RoPE's, whole on every rank
    # N ranks hold the split weights once, the replicated ones (embedding, LM head, norms) N times
    assert all(r["weights"] * world == params + (world - 1) * replicated + world * buffers for r in ranks)


def test_binding_without_a_process_group_is_one_clear_error(four_kv_heads):
    root, model, _, _ = four_kv_heads
    compile_model(str(root / "model"), out=root / "p2_alone", gpus=2, **PLAN_OPTIONS)
    with pytest.raises(RuntimeResourceError, match="init_process_group"):
        load_plan(root / "p2_alone").bind(model, device="cpu")
