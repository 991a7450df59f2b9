"""On a CUDA GPU: a plan's specialized kernels, imported through the verified-source loader,
compile with Triton and match the template reference. Prints one line; exit 1 on a mismatch.

    python3 benchmarks/check_verified_kernels_gpu.py
"""
import tempfile
from pathlib import Path

import torch

from specontext_compiler.codegen.emit_kernels import emit_kernels
from specontext_compiler.runtime.kernel_loader import load_plan_kernels
from specontext_compiler.runtime.kernels import sparse_decode as template
from specontext_compiler.runtime.plan_records import KernelRecord

SPEC = {"name": "tiny-gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "attention_kind": "gqa",
        "kv_lora_rank": 0, "qk_rope_head_dim": 0}
WORK = {"width": 12, "budget": 9, "sink_tokens": 1, "recent_tokens": 2, "level": "head", "dtype": "float32"}


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    files, records = emit_kernels(SPEC, WORK)
    for rel, source in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(source)
    kernels = load_plan_kernels(folder, [KernelRecord.from_dict(r) for r in records])
    cuda = torch.device("cuda")
    batch, n_rows = 2, 25
    q = torch.randn(batch, 4, 16, device=cuda)
    k, v = torch.randn(batch, 2, n_rows, 16, device=cuda), torch.randn(batch, 2, n_rows, 16, device=cuda)
    k_new, v_new = torch.randn(batch, 2, 16, device=cuda), torch.randn(batch, 2, 16, device=cuda)
    idx = torch.stack([torch.randperm(n_rows)[:12].sort().values for _ in range(batch * 2)])
    idx = idx.view(batch, 2, 12).to(torch.int32).to(cuda)
    got = kernels["sparse_decode"].sparse_decode(q, k, v, idx, k_new, v_new, 0.25)
    want = template.sparse_decode_reference(q, k, v, idx, k_new, v_new, 0.25)
    error = (got - want).abs().max().item()
    print(f"verified-source plan kernel on {torch.cuda.get_device_name()}: max abs error {error:.2e}; "
          f"__pycache__ written: {(folder / 'kernels' / '__pycache__').exists()}")
    raise SystemExit(0 if error < 1e-2 else 1)


if __name__ == "__main__":
    main()
