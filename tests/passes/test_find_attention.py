import pytest
import torch

from specontext_compiler.passes.common import META_KEY, AttentionSite, PassError, attention_sites
from specontext_compiler.passes.find_attention import FindAttention, classify

from .conftest import capture, tiny_config


def test_finds_every_layer_with_heads_and_projections(annotated):
    sites = attention_sites(annotated.graph_module)
    assert [s.layer for s, _ in sites] == [0, 1, 2]
    for site, node in sites:
        assert isinstance(node.meta[META_KEY], AttentionSite)
        assert (site.num_heads, site.num_kv_heads, site.head_dim, site.v_head_dim) == (4, 2, 16, 16)
        assert site.kind == "gqa" and site.rope and site.rope_source == "model.rotary_emb.inv_freq"
        prefix = f"model.layers.{site.layer}.self_attn."
        assert (site.q_proj, site.k_proj, site.v_proj, site.o_proj) == tuple(
            prefix + f"{p}_proj.weight" for p in "qkvo")
        assert site.scaling == pytest.approx(16 ** -0.5)
    annotated.graph_module.graph.lint()


@pytest.mark.parametrize("kv_heads, kind", [(4, "mha"), (1, "mqa")])
def test_mha_and_mqa(kv_heads, kind):
    from specontext_compiler.passes.clean_capture import CleanCapture
    gm = capture(tiny_config(num_kv_heads=kv_heads, layers=2)).graph_module
    CleanCapture()(gm)
    finder = FindAttention()
    finder(gm)
    sites = [s for s, _ in attention_sites(gm)]
    assert [s.kind for s in sites] == [kind, kind] and sites[0].num_kv_heads == kv_heads
    assert finder.counters[f"kind_{kind}"] == 2


def test_classify_mla_shapes():
    # DeepSeek-V2: 16 heads, k/v expanded per head, q/k width 192 (128 nope + 64 rope), v width 128.
    assert classify(16, 16, 192, 128) == "mla"
    assert classify(32, 8, 128, 128) == "gqa"


def test_refuses_graph_without_attention():
    graph = torch.fx.Graph()
    x = graph.placeholder("input_ids")
    graph.output(graph.call_function(torch.ops.aten.neg.default, (x,)))
    with pytest.raises(PassError, match="no specontext::attention"):
        FindAttention()(torch.fx.GraphModule(torch.nn.Module(), graph))
