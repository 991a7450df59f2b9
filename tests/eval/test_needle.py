"""The needle diagnosis on a tiny random model: digit ranks at the question and at each answer step."""
import torch

from specontext_compiler.eval.needle import key_positions, needle_ranks
from specontext_compiler.eval.prefix_head import make_head
from specontext_compiler.eval.recall import context_qk
from specontext_compiler.eval.text import passkey, passkey_prompt
from specontext_compiler.runtime import selection

from .test_passkey import CharTokenizer


def test_ranks_at_the_question_and_at_each_answer_step(tiny_llama):
    tokenizer, length, seed = CharTokenizer(), 400, 7
    out = needle_ranks(tiny_llama, tokenizer, ["self:0"], length=length, seed=seed, budget=64)
    key = passkey(seed)
    context, question = passkey_prompt(tokenizer, length - 8, 0.5, key)
    digits = key_positions(tokenizer, context, key)
    assert out["digits"] == len(digits) == 2 * len(key)        # the needle says the key twice
    # One answer step per digit: " " predicts the first, each digit but the last the next one.
    steps = out["heads_at_answer"]["self:0"]
    assert len(steps) == len(key) == len(out["llm_group_share_at_answer"])
    groups = tiny_llama.config.num_key_value_heads
    assert all(len(ranks) == groups for ranks in [out["heads"]["self:0"], *steps])

    # Recomputed by hand for the last answer step: the head's scores over the keys before it.
    ids = torch.tensor([context + question + tokenizer(" " + key).input_ids])
    head = make_head(tiny_llama, "self:0")
    q, k = context_qk(head, ids)
    t = ids.shape[1] - 2
    grouped = selection.group_scores(selection.attention_weights(q[:, :, t], k[:, :, :t], head.scaling), groups)[0]
    rank = grouped.argsort(-1, descending=True).argsort(-1)[:, digits].amax(-1)
    assert steps[-1] == rank.tolist()
    layers = tiny_llama.config.num_hidden_layers
    assert all(0 <= share <= layers + 1e-6 for row in out["llm_group_share_at_answer"] for share in row)
