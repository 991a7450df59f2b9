"""ModelSpec: the numbers of a model that the cost models, the plan and the runtime need (no torch here).

Built from a Hugging Face config by specontext_compiler.models.spec_from_config; read back from
plan.json by the runtime. Sizes are per layer unless a name says otherwise.
"""
from dataclasses import asdict, dataclass, fields

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")


def attention_kind(num_heads: int, num_kv_heads: int, *, latent: bool = False) -> str:
    """One of ATTENTION_KINDS: mla when the cache holds a compressed latent, else by head counts."""
    if latent:
        return "mla"
    if num_kv_heads == num_heads:
        return "mha"
    return "mqa" if num_kv_heads == 1 else "gqa"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only LLM as the planner sees it."""

    name: str                    # preset name or directory the user gave
    architecture: str            # e.g. "LlamaForCausalLM"
    num_layers: int              # L
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int               # query heads
    num_kv_heads: int            # H in the paper (KV heads); equals num_heads for MHA and MLA
    head_dim: int                # D
    attention_kind: str          # one of ATTENTION_KINDS
    kv_elems_per_token: int      # elements one token adds to one layer's cache (K+V; MLA: latent + rope key)
    max_positions: int           # max_position_embeddings
    param_count: int             # all parameters (embedding and LM head included)
    dtype_bytes: int = 2         # bf16 / fp16
    rope_theta: float = 10000.0
    kv_lora_rank: int = 0        # MLA only: width of the cached latent c
    qk_rope_head_dim: int = 0    # MLA only: width of the decoupled RoPE key
    v_head_dim: int = 0          # MLA only: width of a head's value (0: head_dim, as in MHA/GQA)

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head (the paper's alpha)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of KV one token adds to one layer (Llama-3.1-8B: 2*8*128*2 = 4096)."""
        return self.kv_elems_per_token * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one token adds to the whole model (Llama-3.1-8B: 131072)."""
        return self.num_layers * self.kv_bytes_per_token_layer

    @property
    def weight_bytes(self) -> int:
        """M_O: bytes of all weights at the model dtype."""
        return self.param_count * self.dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
