"""The sink and recent-window sizes mean the same everywhere: a plan that omits them binds with
the compiler's defaults, and the window the engine builds is the width the plan was compiled for."""
import json

from specontext_compiler import compile_model, load_plan
from specontext_compiler.runtime.plan_integrity import plan_manifest


def _drop_workload_fields(plan_dir, *names):
    """Rewrite plan.json without `names` in its workload and re-sign the manifest, as an older
    producer of this schema version could have written it."""
    data = json.loads((plan_dir / "plan.json").read_text())
    for name in names:
        del data["workload"][name]
    text = json.dumps(data, indent=2)
    (plan_dir / "plan.json").write_text(text)
    manifest = json.loads((plan_dir / "manifest.json").read_text())
    files = {rel: (plan_dir / rel).read_bytes() for rel in manifest["files"] if rel != "plan.json"}
    (plan_dir / "manifest.json").write_text(plan_manifest(text, files)["manifest.json"])


def test_a_plan_without_sinks_or_recent_binds_with_the_compile_defaults(tiny_model, tmp_path):
    out = tmp_path / "plan"
    compile_model("tiny-llama", target="h100", max_len=512, budget=64, out=out)
    compiled = load_plan(out).workload
    assert (compiled.sink_tokens, compiled.recent_tokens) == (1, 16)
    _drop_workload_fields(out, "sink_tokens", "recent_tokens")
    plan = load_plan(out)
    engine = plan.bind(tiny_model, device="cpu")
    config = engine.ctx.config
    assert (config.sink_tokens, config.recent_tokens) == (1, 16)
    assert config.width == compiled.width == 64 + 1 + 16
    assert engine.ctx.store.layout.width == compiled.width
