"""Passkey prompt construction and answer parsing; the docstring text."""
import re

from specontext_compiler.eval.text import (docstring_paragraphs, long_text_ids, parse_answer, passkey,
                                           passkey_prompt)


class _CharTokenizer:
    """One token per character: lengths are easy to check."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_passkey_prompt_has_the_key_at_the_depth_and_the_length():
    tok = _CharTokenizer()
    key = passkey(3)
    for depth in (0.1, 0.5, 0.9):
        context, question = passkey_prompt(tok, 3000, depth, key)
        text = tok.decode(context)
        assert len(context) + len(question) == 3000
        where = text.index(key) / len(text)
        assert abs(where - depth) < 0.08
        assert tok.decode(question).strip().startswith("What is the pass key?")


def test_parse_answer():
    assert parse_answer(" 71432. Remember") == "71432"
    assert parse_answer("the key is 7 1 4 3 2") == "71432"
    assert parse_answer("I do not know") is None
    assert len(passkey(0)) == 5 and passkey(0) == passkey(0) != passkey(1)


def test_docstring_text_is_long_prose_without_keys():
    paragraphs = docstring_paragraphs()
    assert sum(len(p) for p in paragraphs) > 100_000
    ids = long_text_ids(_CharTokenizer(), 5000)
    assert len(ids) == 5000 and re.search(r"\d{5}", _CharTokenizer().decode(ids)) is None
