"""Workload: what the user asks the plan to serve (paper Table 3 "Workload": R, S, B).

Also the retrieval head's shape (paper s.4.1, s.4.3): the DLM is an EAGLE-3 one-layer draft
whose pruned form keeps the embedding and the Q/K projections only.
"""
from dataclasses import dataclass

from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.plan_records import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from specontext_compiler.sizes import parse_batch


@dataclass(frozen=True)
class RetrievalHead:
    """Shape of the retrieval head (M_D of the paper is its weight bytes).

    What we count: q_proj and k_proj with EAGLE-3's input width 2 x hidden (the head's input is
    [token embedding ; fc(target hidden states)]). Not counted: the embedding table (shared with
    the LLM, already in M_O), the EAGLE-3 fc (3h -> h), v/o projections, FFN and LM head (pruned).
    For Llama-3.1-8B: 8192 x (32 + 8) x 128 = 41.9 M params = 84 MB in bf16, near the paper's
    "about 60MB". Set head_params to override the count with a real checkpoint's.
    """

    head_num_heads: int
    head_num_kv_heads: int
    head_dim: int
    head_input_dim: int
    head_params: int | None = None

    @property
    def params(self) -> int:
        """Parameters of the kept projections (q_proj + k_proj), or the given override."""
        if self.head_params is not None:
            return self.head_params
        return self.head_input_dim * (self.head_num_heads + self.head_num_kv_heads) * self.head_dim

    @classmethod
    def eagle3_for(cls, spec) -> "RetrievalHead":
        """The EAGLE-3 draft shape of a target model: same heads, Q/K input 2 x hidden."""
        return cls(head_num_heads=spec.num_heads, head_num_kv_heads=spec.num_kv_heads,
                   head_dim=spec.head_dim, head_input_dim=2 * spec.hidden_size)


@dataclass(frozen=True)
class Workload:
    """Lengths, batch and sparsity budget of one serving configuration.

    budget is B of the paper: tokens selected per KV group beyond the always-kept sinks and recent
    window; every sparse attention reads W = budget + sink_tokens + recent_tokens rows per group.
    selection_overlap is the expected fraction of a step's selected rows already selected at the
    previous step (paper s.5.4: ">80%"); elastic loading copies only the rest.
    head None means the EAGLE-3 shape of the served model (RetrievalHead.eagle3_for).
    """

    max_len: int
    prompt_len: int
    batch: int = 1
    budget: int = 2048
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    selection_overlap: float = 0.8
    head: RetrievalHead | None = None
    gpus: int = 1      # tensor-parallel ranks; the cost models then price one rank (tensor_parallel.py)

    def __post_init__(self):
        if self.prompt_len <= 0 or self.max_len <= self.prompt_len:
            raise SpecontextError(
                f"--max-len {self.max_len} must exceed the prompt length {self.prompt_len} (> 0); "
                "raise --max-len or shorten --prompt-len")
        if parse_batch(self.batch) == "auto":
            raise SpecontextError("Workload.batch is a request count; 'auto' is plan_residency's to resolve")
        if self.budget < 1 or self.sink_tokens < 0 or self.recent_tokens < 0:
            raise SpecontextError(
                f"--budget {self.budget}, sinks {self.sink_tokens}, recent {self.recent_tokens}: "
                "budget must be >= 1 and sinks/recent >= 0")
        if self.budget > self.max_len:
            raise SpecontextError(
                f"--budget {self.budget} is larger than --max-len {self.max_len}: no sequence has that many "
                f"tokens to select from; pass --budget {self.max_len} or less")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise SpecontextError(f"--gpus {self.gpus!r} must be a positive whole number of GPUs")
        if not 0.0 <= self.selection_overlap <= 1.0:
            raise SpecontextError(
                f"selection overlap {self.selection_overlap} must lie in [0, 1] (a fraction of rows)")

    @property
    def window_tokens(self) -> int:
        """W: rows each sparse attention reads per KV group (budget + sinks + recent)."""
        return self.budget + self.sink_tokens + self.recent_tokens

    @property
    def generated_tokens(self) -> int:
        """Decode steps per request: max_len - prompt_len."""
        return self.max_len - self.prompt_len

    def head_for(self, spec) -> RetrievalHead:
        """The retrieval head to cost: the given one, or the EAGLE-3 shape of spec."""
        return self.head if self.head is not None else RetrievalHead.eagle3_for(spec)
