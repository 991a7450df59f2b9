"""The runtime stands alone: a plan compiled here binds and generates in a process where the
compiler side (and PuLP, typer, rich, networkx) cannot be imported, as on a serving machine.

The child blocks the compiler's modules with a meta-path finder that raises ImportError, and
marks the compiler's third-party packages absent in sys.modules, so that libraries probing for
them (transformers looks for rich) see them uninstalled rather than broken."""
import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM

from specontext_compiler import compile_model
from specontext_compiler.models import load_preset_config

COMPILER_SIDE = [f"specontext_compiler.{name}" for name in (
    "dlm", "dlm_geometry", "head_info", "driver", "cli", "codegen", "passes", "cost_models", "distill",
    "eval", "models", "report", "plot", "pipeline", "capture", "serve")]
THIRD_PARTY = ["pulp", "typer", "rich", "networkx"]

CHILD = textwrap.dedent("""
    import json, sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is compiler-side: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    for package in {absent!r}:       # not installed, as on the GPU machine: probes find nothing
        sys.modules[package] = None
    import torch
    from specontext_compiler.runtime.plan import load_plan

    engine = load_plan({plan!r}).bind({model!r}, device="cpu", dtype=torch.float32)
    result = engine.generate([{prompt!r}], max_new_tokens={new_tokens}, stop_at_eos=False)[0]
    leaked = sorted(m for m, module in sys.modules.items()
                    if module is not None and any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps({{"tokens": result.token_ids, "leaked": leaked}}))
""")


def test_plan_binds_and_generates_without_the_compiler_side(tmp_path):
    plan_dir = tmp_path / "plan"
    compile_model("tiny-llama", target="h100", max_len=512, budget=512, recent_tokens=0, out=plan_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "model")
    prompt, new_tokens = torch.randint(3, 256, (11,)).tolist(), 6
    expected = _greedy(model, prompt, new_tokens)
    script = CHILD.format(blocked=COMPILER_SIDE + THIRD_PARTY, absent=THIRD_PARTY, plan=str(plan_dir), model=str(tmp_path / "model"),
                          prompt=prompt, new_tokens=new_tokens)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["tokens"] == expected


def _greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding with full recomputation (HF generate's min_new_tokens would mask EOS)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_package_init_is_lazy():
    """`import specontext_compiler` alone loads nothing beyond the standard library."""
    script = ("import sys, specontext_compiler\n"
              "print(sorted(m for m in sys.modules if m.startswith('specontext_compiler')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['specontext_compiler']"
