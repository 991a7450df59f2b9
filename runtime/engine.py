"""Engine: serve a plan: prefill, then decode with the plan's rewritten graph (paper Alg. 1).

bind (Engine.from_plan) does everything that depends only on the plan and the model: weights,
the graph, the KV store sized by the plan, the retrieval head, kernels, and on CUDA the captured
decode step. generate() fills request slots, prefills each prompt in chunks, then runs decode
steps over all slots, following the plan's residency segments as the sequences grow.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from specontext_compiler.errors import ModelMismatchError, RuntimeResourceError
from specontext_compiler.runtime import context, weights
from specontext_compiler.runtime.decode_step import DecodeStep
from specontext_compiler.runtime.graph_loader import load_graph
from specontext_compiler.runtime.memory_manager import MemoryManager
from specontext_compiler.runtime.sampling import sample
from specontext_compiler.runtime.step_context import StepContext

StreamCallback = Callable[[int, int], None]   # (request index, token id)


@dataclass
class Generation:
    """One request's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None


class Engine:
    """A plan bound to weights; generate() serves batches of requests."""

    def __init__(self, plan, model, graph_fn, params, ctx: StepContext, tokenizer, device, dtype,
                 use_cuda_graph: bool):
        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self.graph_fn, self.params, self.ctx = graph_fn, params, ctx
        self.device, self.dtype = device, dtype
        self.max_len = int(plan.workload["max_len"])
        self.slots = ctx.store.layout.slots
        self.memory = MemoryManager(plan, ctx)
        # A sliding-window layer's dense attention reads each request's length on the host, which a
        # CUDA graph cannot capture: such models decode eagerly.
        graphable = not any(ctx.windows)
        self.step = DecodeStep(self._forward, ctx, use_cuda_graph and graphable and device.type == "cuda")
        self.memory.on_change.append(self.step.invalidate)
        # Each decode step's tokens come back through a pinned buffer behind an event (_tokens_to_host).
        on_gpu = device.type == "cuda"
        self._token_buffer = torch.empty(self.slots, dtype=torch.long, pin_memory=True) if on_gpu else None
        self._token_event = torch.cuda.Event() if on_gpu else None
        # Prefill activations (logits of every chunk token, MLP intermediates) are outside the
        # decode-step memory model; 256-token chunks keep them under ~0.3 GB for an 8B model.
        self.prefill_chunk = 256

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_plan(cls, plan, model, dlm=None, tokenizer=None, device=None, dtype=None,
                  batch: int | None = None, use_cuda_graph: bool = True) -> "Engine":
        device = _pick_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        hf_model = weights.load_hf_model(model, dtype, device)
        weights.check_model_matches(plan.model, hf_model.config)
        graph_fn = load_graph(plan.directory / plan.graph["file"], plan.graph)
        params = weights.graph_params(hf_model, plan.graph["inputs"])
        head = _retrieval_head(plan, hf_model, dlm, device, dtype)
        ctx = _build_context(plan, head, batch, device, dtype)
        tokenizer = tokenizer or _tokenizer_for(model)
        return cls(plan, hf_model, graph_fn, params, ctx, tokenizer, device, dtype, use_cuda_graph)

    # -- serving -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, stream: StreamCallback | None = None,
                 stop_at_eos: bool = True, seed: int | None = None) -> list[Generation]:
        """Generate for every request (texts or token-id lists); greedy when temperature is 0."""
        requests = [Generation(prompt_ids=self._encode(p)) for p in prompts]
        for index, request in enumerate(requests):
            need = len(request.prompt_ids) + max_new_tokens
            if need > self.max_len:
                raise RuntimeResourceError(
                    f"request {index} needs {need} tokens (prompt {len(request.prompt_ids)} + {max_new_tokens} new), "
                    f"the plan's max-len is {self.max_len}; shorten it or compile with a larger --max-len")
            if not request.prompt_ids:
                raise RuntimeResourceError(f"request {index} has an empty prompt; give at least one token")
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        for wave_start in range(0, len(requests), self.slots):
            wave = list(enumerate(requests))[wave_start:wave_start + self.slots]
            self._serve_wave(wave, max_new_tokens, temperature, top_p, stream, stop_at_eos, generator)
        if self.tokenizer is not None:
            for request in requests:
                request.text = self.tokenizer.decode(request.token_ids, skip_special_tokens=True)
        return requests

    def _serve_wave(self, wave, max_new_tokens, temperature, top_p, stream, stop_at_eos, generator):
        ctx = self.ctx
        next_ids = torch.zeros(self.slots, 1, dtype=torch.long, device=self.device)
        done = [True] * self.slots
        for slot, (_, request) in enumerate(wave):
            ctx.reset_slot(slot)
            logits = self._prefill(slot, request.prompt_ids)
            next_ids[slot, 0] = sample(logits[-1:], temperature, top_p, generator)[0]
            done[slot] = False
        eos = getattr(self.tokenizer, "eos_token_id", None) if stop_at_eos else None
        # The longest slot's length, read once a wave and then counted here: reading it from the
        # device each step would wait for the step before, like reading the tokens would.
        longest = int(ctx.cache_len.max())
        pending = next_ids                       # tokens the host has not read yet
        for step in range(max_new_tokens):
            seen = self._tokens_to_host(pending)
            # Launch the next step before reading this one's tokens: the GPU decodes while the host
            # streams and bookkeeps (it idled for that work when the loop read first). The step is
            # launched before the host knows whether every request just ended, so a wave that ends
            # on end-of-sequence runs one step it discards.
            if step + 1 < max_new_tokens:
                self.memory.before_step(longest)
                logits = self.step.run(pending, ctx.cache_len.view(-1, 1).clone())
                self.last_logits = logits         # the newest step's, for tests comparing with HF
                following = sample(logits[:, -1], temperature, top_p, generator).view(-1, 1).to(self.device)
                longest += 1
            tokens = seen()
            for slot, (index, request) in enumerate(wave):
                if done[slot]:
                    continue
                token = tokens[slot]
                request.token_ids.append(token)
                if stream is not None:
                    stream(index, token)
                if token == eos or len(request.token_ids) >= max_new_tokens:
                    done[slot] = True
            if all(done):
                break
            pending = following

    def _tokens_to_host(self, ids: torch.Tensor):
        """Start copying ids [S, 1] to the host; returns a function that waits and gives the list.

        On CUDA the copy goes to a pinned buffer behind an event, so the launches that follow it are
        not held up; the buffer is reused once the previous list was read."""
        if self._token_buffer is None:
            return lambda: ids[:, 0].tolist()
        self._token_buffer.copy_(ids[:, 0], non_blocking=True)
        self._token_event.record()

        def wait() -> list[int]:
            self._token_event.synchronize()
            return self._token_buffer.tolist()
        return wait

    def _prefill(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        """Dense prefill of one request into its slot, in chunks; returns the last chunk's logits."""
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device).view(1, -1)
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            self.memory.before_step(start + chunk.shape[1] - 1)
            positions = torch.arange(start, start + chunk.shape[1], device=self.device).view(1, -1)
            self.ctx.begin(chunk, positions, slot_start=slot)
            logits = self._forward(chunk, positions)
            self.ctx.end()
        return logits[0]

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), context.active(self.ctx):
            return self.graph_fn(self.params, input_ids, position_ids)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RuntimeResourceError("text prompts need a tokenizer; pass tokenizer= to bind() or token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Elastic-loading statistics: rows requested and copied, and the reuse fraction."""
        fetcher = self.ctx.prefetcher
        requested, loaded = int(fetcher.rows_requested), int(fetcher.rows_loaded)
        return {"rows_requested": requested, "rows_loaded": loaded,
                "selection_overlap": (1 - loaded / requested) if requested else None,
                "device_kv_bytes": self.ctx.store.device_bytes(), "host_kv_bytes": self.ctx.store.host_bytes(),
                "offloaded_layers": self.ctx.store.offloaded_layers()}


def _pick_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn("no CUDA GPU found: running the plan on the CPU reference path (slow, for testing)",
                  stacklevel=3)
    return torch.device("cpu")


def _retrieval_head(plan, hf_model, dlm, device, dtype):
    from specontext_compiler.runtime.retrieval_head import RetrievalHead
    info = plan.retrieval_head or {}
    if dlm is not None:
        from specontext_compiler.dlm import extract_retrieval_head  # compiler side, only on request
        head, _ = extract_retrieval_head(dlm, hf_model.config, layer=info.get("layer"),
                                         level=plan.workload.get("level", "head"))
    elif info.get("file"):
        head = RetrievalHead.load(plan.directory / info["file"], device=device, dtype=dtype)
    else:
        from specontext_compiler.dlm import extract_retrieval_head
        head, _ = extract_retrieval_head(hf_model, hf_model.config, layer=info.get("layer"),
                                         level=plan.workload.get("level", "head"))
    if head.embedding is None:         # a head that shares the LLM's table: the bound weights
        head.attach_embedding(hf_model.get_input_embeddings().weight)
    _check_feature_layers(info, head)
    return head.to(device=device, dtype=dtype)


def _check_feature_layers(info: dict, head) -> None:
    """The graph taps the hidden states a fused head reads (plan) and the bound head reads those."""
    tapped = tuple(int(i) for i in info.get("feature_layers") or ())
    if tapped != head.feature_layers:
        raise ModelMismatchError(
            f"the plan's graph taps the LLM's hidden states entering layers {list(tapped)}, the retrieval "
            f"head reads layers {list(head.feature_layers)}; bind the head the plan was compiled with or "
            "recompile with --dlm pointing at this head")


def _build_context(plan, head, batch, device, dtype) -> StepContext:
    from specontext_compiler.cost_models.model_spec import ModelSpec
    from specontext_compiler.runtime.kernel_set import kernels_for
    spec = ModelSpec.from_dict(plan.model)
    work = plan.workload
    slots = batch or int(work["batch"])
    first = plan.segment_for(1)
    try:
        return StepContext.for_model(
            spec, slots, int(work["max_len"]), int(work["budget"]), int(work.get("sink_tokens", 1)),
            int(work.get("recent_tokens", 0)), head=head, offloaded_layers=first.offloaded_layers,
            capacity=min(first.to_len, int(work["max_len"])),
            device=device, dtype=dtype, level=work.get("level", "head"), kernels=kernels_for(device, plan, dtype),
            windows=plan.model.get("layer_windows") or ())
    except torch.cuda.OutOfMemoryError:
        in_use_gb = torch.cuda.memory_allocated(device) / 1e9
        raise RuntimeResourceError(f"out of GPU memory allocating the KV store for batch {slots} "
                                   f"({in_use_gb:.1f} GB already in use), "
                                   f"max-len {work['max_len']}; bind with a smaller batch= or compile "
                                   "for a smaller --max-len") from None
    except RuntimeError as exc:
        if "pin" in str(exc).lower() or "alloc" in str(exc).lower():
            raise RuntimeResourceError(f"out of pinned host memory for the offloaded KV ({exc}); "
                                       "use a smaller batch or --max-len") from None
        raise


def _tokenizer_for(model):
    if isinstance(model, torch.nn.Module):
        return None
    try:
        from pathlib import Path

        from transformers import AutoTokenizer
        path = Path(model)
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
