"""Engine: serve a plan: prefill, then decode with the plan's rewritten graph (paper Alg. 1).

bind (Engine.from_plan) does everything that depends only on the plan and the model: weights,
the graph, the KV store sized by the plan, the retrieval head, kernels, and on CUDA the captured
decode step. Serving goes through runtime/scheduler.py (continuous batching), which calls the
two primitives here: prefill_chunk_into (one request's prompt chunk) and decode (one step over
every slot), while the memory manager follows the plan's residency segments as sequences grow.
generate() and stream() are thin clients of the scheduler.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from collections import deque
from typing import Callable, Iterator, Sequence

import torch

from specontext_compiler.errors import ModelMismatchError, RequestError, RuntimeResourceError
from specontext_compiler.runtime import context, weights
from specontext_compiler.runtime.caller import caller_stacklevel
from specontext_compiler.runtime.decode_step import DecodeStep
from specontext_compiler.runtime.graph_loader import load_graph
from specontext_compiler.runtime.memory_manager import MemoryManager
from specontext_compiler.runtime.plan_records import DEFAULT_PREFILL_CHUNK_TOKENS
from specontext_compiler.runtime.request_validation import validate_bind_options, validate_requests
from specontext_compiler.runtime.sampling_params import SamplingParams
from specontext_compiler.runtime.step_context import StepContext

StreamCallback = Callable[[int, int], None]   # (request index, token id)


@dataclass
class Generation:
    """One request's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None     # "stop" (end-of-sequence or a stop string) or "length"


class Engine:
    """A plan bound to weights; generate() serves batches of requests."""

    def __init__(self, plan, model, graph_fn, params, ctx: StepContext, tokenizer, device, dtype,
                 use_cuda_graph: bool):
        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self.graph_fn, self.params, self.ctx = graph_fn, params, ctx
        self.device, self.dtype = device, dtype
        self.max_len = plan.workload.max_len
        self.slots = ctx.store.layout.slots
        self.memory = MemoryManager(plan, ctx)
        # A sliding-window layer's dense attention reads each request's length on the host, which a
        # CUDA graph cannot capture: such models decode eagerly.
        graphable = not any(ctx.windows)
        self.step = DecodeStep(self._forward, ctx, use_cuda_graph and graphable and device.type == "cuda")
        self.memory.on_change.append(self.step.invalidate)
        # Each decode step's tokens come back through a pinned buffer behind an event (tokens_to_host).
        on_gpu = device.type == "cuda"
        self._token_buffer = torch.empty(self.slots, dtype=torch.long, pin_memory=True) if on_gpu else None
        self._token_event = torch.cuda.Event() if on_gpu else None
        # Prompt tokens per prefill forward: the plan's memory model sized it to the memory the
        # plan leaves free (cost_models/memory.py); plans compiled before it say nothing: 256.
        self.prefill_chunk = int(plan.workload.prefill_chunk_tokens or DEFAULT_PREFILL_CHUNK_TOKENS)
        self.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        self._scheduler = None
        self._mask_key, self._mask = None, None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_plan(cls, plan, model, dlm=None, tokenizer=None, device=None, dtype=None,
                  batch: int | None = None, use_cuda_graph: bool = True) -> "Engine":
        validate_bind_options(batch=batch)
        device = _pick_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        hf_model = weights.load_hf_model(model, dtype, device)
        weights.check_model_matches(plan.model, hf_model.config)
        if plan.tensor_parallel:            # this process is one rank: its shards, heads and KV store
            from specontext_compiler.runtime import tensor_parallel
            plan, hf_model = tensor_parallel.bind_rank(plan, hf_model, dlm, plan.retrieval_head.file)
        graph_fn = load_graph(plan.directory / plan.graph.file, plan.graph)
        params = weights.graph_params(hf_model, plan.graph.inputs)
        head = _retrieval_head(plan, hf_model, dlm, device, dtype)
        ctx = _build_context(plan, head, batch, device, dtype)
        tokenizer = tokenizer or _tokenizer_for(model)
        return cls(plan, hf_model, graph_fn, params, ctx, tokenizer, device, dtype, use_cuda_graph)

    # -- serving -----------------------------------------------------------------------------
    @property
    def scheduler(self):
        """The continuous-batching scheduler every request goes through (runtime/scheduler.py)."""
        if self._scheduler is None:
            from specontext_compiler.runtime.scheduler import Scheduler
            self._scheduler = Scheduler(self)
        return self._scheduler

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, stream: StreamCallback | None = None,
                 stop_at_eos: bool = True, seed: int | None = None, top_k: int = 0,
                 stop: Sequence[str] = ()) -> list[Generation]:
        """Generate for every request (texts or token-id lists); greedy when temperature is 0.

        All requests are checked before any starts; they then share the scheduler's slots, each
        joining as soon as one frees. stream(request index, token id) sees every kept token; with a
        seed, request i samples with seed + i."""
        validate_requests(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          vocab_size=self.plan.model.vocab_size, seed=seed, stream=stream)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=None if seed is None else seed + i, stop=tuple(stop),
                                 ignore_eos=not stop_at_eos) for i in range(len(prompts))]
        encoded = [self._encode(p) for p in prompts]
        for index, (ids, request_params) in enumerate(zip(encoded, params)):
            try:
                self.scheduler.check(ids, request_params)
            except RequestError as exc:
                raise RequestError(f"request {index}: {exc}") from None
        requests = [self.scheduler.add(ids, p, _index_callback(stream, i))
                    for i, (ids, p) in enumerate(zip(encoded, params))]
        self._serve(requests)
        return [Generation(r.prompt_ids, r.token_ids, r.text.text if r.text is not None else None,
                           r.finish_reason) for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **fields) -> Iterator[str]:
        """Text deltas of one request as they are generated (SamplingParams fields as keywords)."""
        deltas: deque[str] = deque()
        request = self.scheduler.add(self._encode(prompt), params or SamplingParams(**fields),
                                     lambda _request, _token, delta, _reason: deltas.append(delta))
        try:
            while deltas or not request.finished:
                if deltas:
                    delta = deltas.popleft()
                    if delta:
                        yield delta
                else:
                    self.scheduler.step()
        finally:
            self.scheduler.abort(request)

    def _serve(self, requests) -> None:
        """Step the scheduler until these requests end; on an error they are dropped, then it re-raises."""
        try:
            while not all(r.finished for r in requests):
                self.scheduler.step()
        except BaseException:
            for request in requests:
                self.scheduler.abort(request)
            raise

    def decode(self, ids: torch.Tensor, decoding: Sequence[bool], longest: int) -> torch.Tensor:
        """One decode step over every slot (ids [S, 1]); logits [S, 1, V].

        The step runs all slots (it is one captured graph), so afterwards the slots that were not
        decoding (free, or between prefill chunks) get back their cache length and a fused head's
        features: their token was a placeholder, and the next prefill chunk overwrites its K/V."""
        self.memory.before_step(longest)
        everyone = all(decoding)
        if not everyone:
            mask = self._decoding_mask(tuple(decoding))
            lengths = self.ctx.cache_len.clone()
            features = self.ctx.features.last.clone() if self.ctx.features is not None else None
        logits = self.step.run(ids, self.ctx.cache_len.view(-1, 1).clone())
        if not everyone:
            self.ctx.cache_len.copy_(torch.where(mask, self.ctx.cache_len, lengths))
            if features is not None:
                last = self.ctx.features.last
                last.copy_(torch.where(mask.view(-1, 1), last, features))
        self.last_logits = logits              # the newest step's, for tests comparing with HF
        return logits

    def _decoding_mask(self, decoding: tuple[bool, ...]) -> torch.Tensor:
        """[S] bool on the device; rebuilt only when the set of decoding slots changes."""
        if self._mask_key != decoding:
            self._mask = torch.tensor(decoding, dtype=torch.bool, device=self.device)
            self._mask_key = decoding
        return self._mask

    def tokens_to_host(self, ids: torch.Tensor):
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

    def prefill_chunk_into(self, slot: int, chunk: Sequence[int], start: int) -> torch.Tensor:
        """Dense prefill of prompt tokens [start, start + len(chunk)) into a slot; the last token's logits [V].

        The plan's graph in one forward: SDPA over the chunk (and the slot's history, if any), new
        K/V appended in place (offloaded layers: copied to pinned host memory), the retrieval head's
        K rows added, and the LM head on the last token only (the capture's logits_to_keep)."""
        ids = torch.tensor(list(chunk), dtype=torch.long, device=self.device).view(1, -1)
        self.memory.before_step(start + ids.shape[1] - 1)
        positions = torch.arange(start, start + ids.shape[1], device=self.device).view(1, -1)
        self.ctx.begin(ids, positions, slot_start=slot, host_starts=[start])
        logits = self._forward(ids, positions)
        self.ctx.end()
        return logits[0, -1]

    def shared_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Sampled ids as every rank will use them: rank 0's under a tensor-parallel plan."""
        if self.plan.tensor_parallel:
            from specontext_compiler.runtime.tensor_parallel import broadcast_tokens
            return broadcast_tokens(ids)
        return ids

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), context.active(self.ctx):
            return self.graph_fn(self.params, input_ids, position_ids)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RuntimeResourceError("text prompts need a tokenizer; pass tokenizer= to bind() or token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def warm_up(self, prompt_tokens: int = 16) -> float:
        """Serve one short throwaway request, then zero the counters; returns its seconds.

        On a GPU the first request otherwise pays for compiling every Triton kernel of prefill and
        decode and for capturing the step (5.9 s on an H200 for the 8B graph, inside the first
        token's latency: benchmarks/RESULTS.md, "Calls 3-5"); a server warms up before it listens,
        as vLLM does. The request runs at the first residency, so the captured step is the one the
        first real requests replay; its slot is reset when a request next takes it."""
        started = time.perf_counter()
        prompt = [1 + i % max(1, self.plan.model.vocab_size - 1) for i in range(prompt_tokens)]
        self.generate([prompt], max_new_tokens=2, stop_at_eos=False)
        scheduler, fetcher = self.scheduler, self.ctx.prefetcher
        scheduler.decode_steps = scheduler.prefill_chunks = scheduler.generated_tokens = 0
        fetcher.rows_loaded.zero_()
        fetcher.rows_requested.zero_()
        return time.perf_counter() - started

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Elastic-loading statistics: rows requested and copied, and the reuse fraction."""
        fetcher = self.ctx.prefetcher
        requested, loaded = int(fetcher.rows_requested), int(fetcher.rows_loaded)
        return {"rows_requested": requested, "rows_loaded": loaded,
                "selection_overlap": (1 - loaded / requested) if requested else None,
                "device_kv_bytes": self.ctx.store.device_bytes(), "host_kv_bytes": self.ctx.store.host_bytes(),
                "offloaded_layers": self.ctx.store.offloaded_layers()}


def _index_callback(stream: StreamCallback | None, index: int):
    """The scheduler's on_output for generate()'s stream(request index, token id)."""
    if stream is None:
        return None
    return lambda _request, token, _delta, _reason: stream(index, token)


def _pick_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    warnings.warn("no CUDA GPU found: running the plan on the CPU reference path (slow, for testing)",
                  stacklevel=caller_stacklevel())
    return torch.device("cpu")


def _retrieval_head(plan, hf_model, dlm, device, dtype):
    """The head bind uses: dlm= (a RetrievalHead, a head file or an HF model in memory), else the
    plan's head file, else one derived from the bound LLM at the plan's layer."""
    from specontext_compiler.runtime import head_extract
    from specontext_compiler.runtime.retrieval_head import RetrievalHead
    info = plan.retrieval_head
    level = plan.workload.level
    geometry = head_extract.llm_geometry(hf_model.config)
    if isinstance(dlm, RetrievalHead):
        head = head_extract.fit_to_llm(dlm, geometry, level)
    elif _is_head_file(dlm):
        head = RetrievalHead.load(dlm)
        head_extract.check_head_file(head, geometry, dlm)
        head = head_extract.fit_to_llm(head, geometry, level)
    elif dlm is not None and not isinstance(dlm, torch.nn.Module):
        raise ModelMismatchError(
            f"bind(dlm={dlm!r}) takes a RetrievalHead, a retrieval-head .safetensors file or an HF model in "
            "memory; extract a head from a checkpoint directory or GGUF file with "
            "specontext_compiler.dlm.extract_retrieval_head (the CLI's --dlm does this)")
    elif info.file and dlm is None:
        head = RetrievalHead.load(plan.directory / info.file, device=device, dtype=dtype)
    elif dlm is None and geometry["kind"] == "mla":
        raise ModelMismatchError(
            "the plan's head is derived at bind time from the LLM's own Q/K projections, which an MLA model "
            "does not have; bind with dlm= a draft model's head (specontext_compiler.dlm.extract_retrieval_head) "
            "or compile the plan with --dlm")
    else:
        head = head_extract.head_from_model(dlm if dlm is not None else hf_model, geometry,
                                            info.layer, level)
    if head.embedding is None:         # a head that shares the LLM's table: the bound weights
        head.attach_embedding(hf_model.get_input_embeddings().weight)
    _check_feature_layers(info, head)
    return head.to(device=device, dtype=dtype)


def _is_head_file(dlm) -> bool:
    return isinstance(dlm, (str, os.PathLike)) and str(dlm).endswith(".safetensors")


def _check_feature_layers(info, head) -> None:
    """The graph taps the hidden states a fused head reads (plan) and the bound head reads those."""
    tapped = tuple(info.feature_layers)
    if tapped != head.feature_layers:
        raise ModelMismatchError(
            f"the plan's graph taps the LLM's hidden states entering layers {list(tapped)}, the retrieval "
            f"head reads layers {list(head.feature_layers)}; bind the head the plan was compiled with or "
            "recompile with --dlm pointing at this head")


def _build_context(plan, head, batch, device, dtype) -> StepContext:
    from specontext_compiler.runtime.kernel_set import kernels_for
    from specontext_compiler.runtime import memory_check, selection
    spec, work = plan.model, plan.workload
    slots = batch or work.batch
    first = plan.segment_for(1)
    width = selection.selection_width(work.budget, work.sink_tokens, work.recent_tokens)
    groups = selection.selection_groups(spec.num_heads, spec.num_kv_heads, work.level)
    memory_check.check_fits(slots, memory_check.slot_bytes(plan, spec, width, groups, head, dtype), device)
    try:
        return StepContext.for_model(
            spec, slots, work.max_len, work.budget, work.sink_tokens, work.recent_tokens, head=head,
            offloaded_layers=first.offloaded_layers, capacity=min(first.to_len, work.max_len),
            device=device, dtype=dtype, level=work.level, kernels=kernels_for(device, plan, dtype),
            windows=plan.model.layer_windows)
    except torch.cuda.OutOfMemoryError:
        in_use_gb = torch.cuda.memory_allocated(device) / 1e9
        raise RuntimeResourceError(f"out of GPU memory allocating the KV store for batch {slots} "
                                   f"({in_use_gb:.1f} GB already in use), "
                                   f"max-len {work.max_len}; bind with a smaller batch= or compile "
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
