"""Automatic teacher layers: a tiny Llama whose layers 2 and 3 are made to copy from far back is
given those two layers; a layer that stares at one fixed far token (a sink) is not."""
import pytest
import torch

from specontext_compiler.distill import layer_choice
from specontext_compiler.errors import SpecontextError

RECENT = 16
SCALE = 10.0          # q.k = 100 / sqrt(32) ~ 18 for a match: the match takes nearly all the weight
HEAD_DIM = 32
# RoPE pairs (i, i + 16) with i >= 6 turn by < 1e-4 rad per position at theta 1e12: positions
# barely move them, so q.k along them is pure content.
SLOW_DIMS = [i for i in range(6, 16)] + [i + 16 for i in range(6, 16)]
VOCAB = 19            # token t lives on SLOW_DIMS[t]; SLOW_DIMS[19] is the sink direction


def built_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                         max_position_embeddings=1024, rope_theta=1e12, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    seen = {}
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.__setitem__("ids", args[0][0]))

    def rows(output, dims_of_position):
        """Replace a projection's output [1, T, heads * D] by SCALE on one slow dim per position."""
        out = torch.zeros_like(output).view(*output.shape[:2], -1, HEAD_DIM)
        for position, dim in enumerate(dims_of_position(seen["ids"])):
            if dim is not None:
                out[0, position, :, SLOW_DIMS[dim]] = SCALE
        return out.flatten(-2)

    def copy_query(ids):                     # query: "my token"
        return ids.tolist()

    def copy_key(ids):                       # key j: "the token before me" (an induction key)
        return [None] + ids[:-1].tolist()

    def sink_query(ids):                     # every query asks for the sink direction ...
        return [VOCAB] * len(ids)

    def sink_key(ids):                       # ... which only position 1 holds
        return [VOCAB if j == 1 else None for j in range(len(ids))]

    patterns = {0: (sink_query, sink_key), 2: (copy_query, copy_key), 3: (copy_query, copy_key)}
    for layer, (query, key) in patterns.items():
        attention = model.model.layers[layer].self_attn
        attention.q_proj.register_forward_hook(lambda m, a, out, f=query: rows(out, f))
        attention.k_proj.register_forward_hook(lambda m, a, out, f=key: rows(out, f))
    return model


def test_copy_targets_are_successors_of_earlier_occurrences_beyond_far():
    ids = torch.tensor([5, 7, 1, 2, 3, 5, 9, 4, 5])
    positions, targets = layer_choice.copy_targets(ids, far=2, limit=8)
    # 5 at 5 and 8; 7 follows the 5 at 0. Query 8 also has 9 (after the 5 at 5) but 6 is not < 8 - 2.
    assert positions.tolist() == [5, 8]
    assert targets[0].nonzero().flatten().tolist() == [1] and targets[1].nonzero().flatten().tolist() == [1]


def test_the_layers_that_copy_from_far_back_are_chosen_and_the_sink_layer_is_not():
    model = built_llama()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, VOCAB, (320,), generator=generator) for _ in range(2)]
    choice = layer_choice.auto_teacher_layers(model, sequences, RECENT)
    scores = choice["scores"]
    assert choice["layers"] == [2, 3], scores
    assert min(scores[2], scores[3]) > 0.5 and max(scores[0], scores[1]) < 0.1 * min(scores[2], scores[3])
    assert choice["probed_queries"] > 0 and choice["probe_sequences"] == 2 and "copy score" in choice["rule"]


def test_layer_zero_really_looks_far_so_far_mass_alone_would_pick_it():
    """The control: layer 0 puts nearly all its weight on position 1, far from late queries."""
    from specontext_compiler.distill import teacher
    model = built_llama()
    ids = torch.randint(0, VOCAB, (320,), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([300, 310])
    sample = teacher.collect(model, ids, positions, feature_layers=(1,), recent=RECENT, layers=(0,))
    assert float(sample.teacher.float()[..., 1].min()) > 0.9


def test_choice_keeps_layers_near_the_best_and_falls_back_to_all():
    assert layer_choice.choose_layers([0.01, 0.2, 0.04, 0.06]) == (1, 3)
    assert layer_choice.choose_layers([0.0, 0.0, 0.0]) == (0, 1, 2)


def test_text_without_far_repeats_keeps_all_layers(model):
    ids = torch.arange(1, 101)            # no token repeats
    choice = layer_choice.auto_teacher_layers(model, [ids], RECENT)
    assert choice["layers"] == list(range(model.config.num_hidden_layers)) and choice["probed_queries"] == 0
    assert "all layers" in choice["rule"]
    with pytest.raises(SpecontextError, match="at least one"):
        layer_choice.auto_teacher_layers(model, [], RECENT)
