"""capture_decode_graph: inputs, weight names, dynamic batch/tokens, and the logits of HF's forward."""
import time

import pytest
import torch

from specontext_compiler import models
from specontext_compiler.capture import capture_decode_graph
from specontext_compiler.passes.clean_capture import CleanCapture
from specontext_compiler.passes.common import count_ops
from specontext_compiler.runtime import context


class _FreshPrefill:
    """A stand-in StepContext for one forward from an empty cache: causal attention over the new tokens."""

    def dense_attention(self, q, k, v, layer, scaling):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()


def test_tiny_capture_matches_hf_forward():
    config = models.resolve_model("tiny-llama").config
    captured = capture_decode_graph(config, dtype=torch.float32)
    gm = captured.graph_module
    assert count_ops(gm)["specontext.attention.default"] == config.num_hidden_layers
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-2:] == ["input_ids", "position_ids"]
    assert "use_cache" not in placeholders and "logits_to_keep" not in placeholders
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert {p["target"] for p in captured.param_names} <= set(named)
    assert {p["kind"] for p in captured.param_names} == {"parameter", "buffer"}
    CleanCapture()(gm)
    params = [named[p["target"]] for p in captured.param_names]
    for batch, tokens in [(1, 1), (3, 5)]:            # one graph: decode-sized and prefill-sized
        ids = torch.randint(0, config.vocab_size, (batch, tokens))
        pos = torch.arange(tokens).expand(batch, -1)
        with torch.no_grad(), context.active(_FreshPrefill()):
            (logits,) = gm(*params, ids, pos)
            expected = model(input_ids=ids, position_ids=pos).logits[:, -1:]
        assert logits.shape == (batch, 1, config.vocab_size)       # the LM head sees the last token only
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_llama31_8b_on_meta_is_fast():
    start = time.perf_counter()
    captured = capture_decode_graph(models.resolve_model("llama-3.1-8b").config)
    assert count_ops(captured.graph_module)["specontext.attention.default"] == 32
    assert len(captured.param_names) >= 32 * 9 + 3
    assert 0 < captured.seconds <= time.perf_counter() - start


def test_unsupported_attention_refused(monkeypatch):
    from specontext_compiler.errors import ModelError
    config = models.resolve_model("tiny-llama").config

    def refuse(self, *args, **kwargs):
        raise ValueError("no attention interface")
    from transformers import PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    with pytest.raises(ModelError, match="AttentionInterface"):
        capture_decode_graph(config)
