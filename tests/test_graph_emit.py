"""decode_graph.py: emitted source == GraphModule, sha256 check, and the rewritten graph's numerics.

Equivalence: with a budget at least the context length, the rewritten graph (retrieve, sparse
attention, prefetch of offloaded layers) gives the original graph's logits over a prompt and
several decode steps. Tolerance: float32 on CPU, atol = rtol = 1e-5 (both run the same ops; only
attention's summation order over the selected rows differs).
"""
import pytest
import torch

from specontext_compiler import models
from specontext_compiler.capture import capture_decode_graph
from specontext_compiler.codegen.emit_graph import emit_graph_source
from specontext_compiler.errors import PlanError
from specontext_compiler.passes.clean_capture import CleanCapture
from specontext_compiler.pipeline import run_pipeline
from specontext_compiler.runtime import context
from specontext_compiler.runtime.graph_loader import load_graph
from specontext_compiler.runtime.plan_records import GraphRecord

BATCH, PROMPT, DECODE_STEPS, MAX_LEN = 2, 12, 5, 64


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM
    source = models.resolve_model("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32).eval()
    return source, model


def _compile(config, tmp_path, offloaded=None):
    """(GraphModule, loaded forward, record); offloaded=None keeps the dense captured graph."""
    captured = capture_decode_graph(config, dtype=torch.float32)
    gm = captured.graph_module
    if offloaded is None:
        CleanCapture()(gm)
    else:
        gm, _ = run_pipeline(gm, offloaded, {layer: 0 for layer in offloaded})
    source, record = emit_graph_source(gm, model="tiny-llama")
    path = tmp_path / record["file"]
    path.write_text(source)
    return gm, load_graph(path, GraphRecord.from_dict(record)), record


def _params(model, record):
    from specontext_compiler.runtime.weights import graph_params
    return graph_params(model, record["inputs"])


def test_record_and_header(tiny, tmp_path):
    source, model = tiny
    _, _, record = _compile(source.config, tmp_path, offloaded=[1])
    text = (tmp_path / record["file"]).read_text()
    assert text.startswith('"""Decode graph of tiny-llama') and "def forward(params, input_ids, position_ids)" in text
    assert record["op_counts"] == {"specontext.prefetch_issue.default": 1, "specontext.prefetch_wait.default": 1,
                                   "specontext.retrieve.default": 1, "specontext.sparse_attention.default": 3,
                                   # FuseElementwise: 2 norms a layer (all but the first after a residual add)
                                   "specontext.rms_norm.default": 1, "specontext.add_rms_norm.default": 6,
                                   "specontext.rotary.default": 6, "specontext.silu_mul.default": 3}
    assert record["inputs"][0] == {"placeholder": "p_model_embed_tokens_weight",
                                   "target": "model.embed_tokens.weight", "kind": "parameter"}
    assert [i["kind"] for i in record["inputs"][-2:]] == ["user_input", "user_input"]
    # MergeProjections: q/k/v and gate/up of each layer are one input each, bound as one tensor
    assert [i["target"] for i in record["inputs"] if i["kind"] == "merged"] == [
        f"model.layers.{layer}.{part}.weight" for layer in range(3)
        for part in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")]
    params = _params(model, record)
    assert len(params) == len(record["inputs"]) - 2
    assert params[1].shape == (64 + 2 * 2 * 16, 64)          # q (4 heads) + k, v (2 KV heads) of width 16


def test_loaded_source_equals_graph_module(tiny, tmp_path):
    from specontext_compiler.runtime.step_context import StepContext
    source, model = tiny
    spec = models.spec_from_config(source.config, source.name)
    gm, forward, record = _compile(source.config, tmp_path)
    params = _params(model, record)
    ids = torch.randint(0, source.config.vocab_size, (BATCH, PROMPT))
    pos = torch.arange(PROMPT).expand(BATCH, -1)
    outs = []
    for run in (lambda: gm(*params, ids, pos)[0], lambda: forward(params, ids, pos)):
        ctx = StepContext.for_model(spec, batch=BATCH, max_len=MAX_LEN, budget=MAX_LEN)
        ctx.begin(ids, pos)
        with torch.no_grad(), context.active(ctx):
            outs.append(run())
        ctx.end()
    assert outs[0].shape == (BATCH, 1, source.config.vocab_size)     # the last token's logits
    assert torch.equal(outs[0], outs[1])


def test_tampered_file_refused(tiny, tmp_path):
    _, _, record = _compile(tiny[0].config, tmp_path)
    path = tmp_path / record["file"]
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(PlanError, match="decode_graph.py"):
        load_graph(path, GraphRecord.from_dict(record))


def _generate(forward, params, spec, ids, offloaded=()):
    """Logits of a prompt's last token (one prefill), then of DECODE_STEPS single-token steps: [B, 1+steps, vocab]."""
    from specontext_compiler.runtime.step_context import StepContext
    ctx = StepContext.for_model(spec, batch=BATCH, max_len=MAX_LEN, budget=MAX_LEN, sink_tokens=1,
                                recent_tokens=4, offloaded_layers=offloaded)
    outs = []
    for start, end in [(0, PROMPT)] + [(PROMPT + i, PROMPT + i + 1) for i in range(DECODE_STEPS)]:
        x, pos = ids[:, start:end], torch.arange(start, end).expand(BATCH, -1)
        ctx.begin(x, pos)
        with torch.no_grad(), context.active(ctx):
            outs.append(forward(params, x, pos))
        ctx.end()
    return torch.cat(outs, dim=1)


def test_rewritten_graph_matches_original_with_full_budget(tiny, tmp_path):
    pytest.importorskip("specontext_compiler.runtime.step_context")
    source, model = tiny
    spec = models.spec_from_config(source.config, source.name)
    ids = torch.randint(0, source.config.vocab_size, (BATCH, PROMPT + DECODE_STEPS))
    (tmp_path / "dense").mkdir()
    (tmp_path / "sparse").mkdir()
    _, dense, dense_record = _compile(source.config, tmp_path / "dense")
    _, sparse, sparse_record = _compile(source.config, tmp_path / "sparse", offloaded=[1, 2])
    expected = _generate(dense, _params(model, dense_record), spec, ids)
    got = _generate(sparse, _params(model, sparse_record), spec, ids, offloaded=(1, 2))
    with torch.no_grad():
        hf = model(ids).logits[:, PROMPT - 1:]
    torch.testing.assert_close(expected, hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
