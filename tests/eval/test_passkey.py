"""Passkey mechanics on a tiny random model with a character tokenizer: how the question is asked
("prompt": prefilled with the context; "decode": fed as decode steps) and several keys per depth."""
from types import SimpleNamespace

import pytest
import torch

from specontext_compiler.eval.passkey import passkey_cases

CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))     # the tiny model's 97 ids


class CharTokenizer:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[CHARS.index(c) for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(CHARS[i] for i in ids)


def _greedy(model, ids: list[int], new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return CharTokenizer().decode(out[0, len(ids):].tolist())


@pytest.mark.parametrize("mode", ["prompt", "decode"])
def test_full_attention_answers_as_hf_greedy_does_in_either_mode(tiny_llama, mode):
    from specontext_compiler.eval.text import passkey_prompt
    tok = CharTokenizer()
    records = passkey_cases(tiny_llama, tok, None, lengths=[300], depths=[0.5], budgets=[64],
                            methods=("full", "streaming"), question_mode=mode)
    full = next(r for r in records if r["method"] == "full")
    context, question = passkey_prompt(tok, 300 - 8, 0.5, full["key"])
    assert all(r["question"] == mode for r in records)
    # Dense attention everywhere: the answer is HF's greedy continuation of context + question,
    # whether the question was prefilled or fed one token per decode step.
    assert full["text"] == _greedy(tiny_llama, context + question, 8)


def test_keys_per_depth_gives_distinct_keys_and_keeps_the_first(tiny_llama):
    tok = CharTokenizer()
    one = passkey_cases(tiny_llama, tok, None, lengths=[300], depths=[0.2, 0.8], budgets=[32], methods=("full",))
    three = passkey_cases(tiny_llama, tok, None, lengths=[300], depths=[0.2, 0.8], budgets=[32],
                          methods=("full",), keys_per_depth=3)
    assert len(one) == 2 and len(three) == 6
    for depth in (0.2, 0.8):
        keys = [r["key"] for r in three if r["depth"] == depth]
        assert len(set(keys)) == 3 and keys[0] == next(r["key"] for r in one if r["depth"] == depth)


def test_unknown_question_mode_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="question_mode 'later'"):
        passkey_cases(tiny_llama, CharTokenizer(), None, lengths=[300], depths=[0.5], budgets=[32],
                      methods=("full",), question_mode="later")
