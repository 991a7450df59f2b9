"""Training text for distilling a retrieval head: stdlib docstring prose, some with recall questions.

The prose is the docstrings of TRAIN_MODULES, a list of standard-library modules chosen apart from
the eval's (`eval/text.py` MODULES): the head is never trained on the text it is measured on, and
any paragraph that the eval's text also holds is dropped. Half the sequences are recall documents:
short facts ("Note that the blue gate number is 4711.") inserted into the prose and asked for
later, so the teacher shows the head long-range lookups. Their templates differ on purpose from
the passkey eval's wording (its "pass key" needle and question), so passkey results measure
retrieval, not a memorized phrase.

A tokenizer here is anything whose call `tokenizer(text, add_special_tokens=False)` returns an
object with `input_ids` (a Hugging Face tokenizer, or a stand-in in tests).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

from specontext_compiler.errors import SpecontextError
from specontext_compiler.eval.text import MODULES as EVAL_MODULES
from specontext_compiler.eval.text import docstring_paragraphs as eval_paragraphs
from specontext_compiler.eval.text import module_paragraphs

TRAIN_MODULES = (
    "urllib.request", "urllib.parse", "urllib.robotparser", "http.client", "http.server", "http.cookies",
    "xml.etree.ElementTree", "sqlite3", "multiprocessing", "concurrent.futures", "ast", "dis", "tokenize",
    "configparser", "optparse", "gettext", "locale", "mailbox", "mimetypes", "base64", "hashlib", "hmac",
    "secrets", "sched", "queue", "selectors", "signal", "code", "pdb", "profile", "timeit", "trace",
    "traceback", "weakref", "types", "operator", "numbers", "array", "graphlib", "gzip", "bz2", "lzma",
    "netrc", "plistlib", "html.parser", "uuid", "ipaddress", "smtplib", "imaplib", "ftplib",
    "socketserver", "xmlrpc.client", "cmd", "shlex", "pydoc", "doctest", "sysconfig", "importlib",
    "pkgutil", "runpy", "filecmp", "fnmatch", "glob", "linecache", "platform", "ctypes", "tracemalloc",
    "warnings", "zipimport", "wave", "colorsys", "quopri")


def _top_level(names) -> set[str]:
    return {name.split(".")[0] for name in names}


# Compared by top-level package: the eval reads `email`, whose members include `email.message`.
assert not _top_level(TRAIN_MODULES) & _top_level(EVAL_MODULES), "training text overlaps the eval's"

FACT = " Note that the {name} number is {number}. "
QUESTION = "\nQuestion: which number belongs to the {name}? Answer: the {name} number is"
ANSWER = " {number}.\n"
ADJECTIVES = ("blue", "north", "silver", "quiet", "old", "green", "east", "small", "red", "west")
NOUNS = ("door", "gate", "locker", "account", "project", "garden", "bridge", "server", "library card",
         "invoice")
FACTS_PER_DOCUMENT = 3            # per 2048 tokens of document (at least 3)
# Query positions kept per answer: the question's last tokens and the answer's, where the model
# has to look back at the fact.
QUESTION_TAIL_TOKENS = 3


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def training_paragraphs() -> list[str]:
    """Distinct prose paragraphs of TRAIN_MODULES, in a fixed order, none of them in the eval's text."""
    with warnings.catch_warnings():       # the eval's text reads deprecated aliases (typing.io)
        warnings.simplefilter("ignore", DeprecationWarning)
        seen = set(eval_paragraphs())
    paragraphs = []
    for name in TRAIN_MODULES:
        for text in module_paragraphs(name):
            if text not in seen:
                seen.add(text)
                paragraphs.append(text)
    return paragraphs


def token_stream(tokenizer, num_tokens: int, seed: int = 0) -> list[int]:
    """num_tokens ids of training prose: the paragraphs shuffled by `seed`, wrapping if too short."""
    paragraphs = training_paragraphs()
    random.Random(seed).shuffle(paragraphs)
    ids: list[int] = []
    index = 0
    while len(ids) < num_tokens:
        ids += _encode(tokenizer, paragraphs[index % len(paragraphs)] + "\n\n")
        index += 1
    return ids[:num_tokens]


@dataclass
class RecallDocument:
    """Token ids with facts inserted and asked for later; answer_positions index into ids."""

    ids: list[int]
    facts: list[tuple[str, str]]          # (name, number)
    answer_positions: list[int]


def facts_for(length: int) -> int:
    """Facts in a recall document of `length` tokens: FACTS_PER_DOCUMENT per 2048, at least that."""
    return max(FACTS_PER_DOCUMENT, FACTS_PER_DOCUMENT * length // 2048)


def _facts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    names = rng.sample([f"{a} {n}" for a in ADJECTIVES for n in NOUNS], count)
    return [(name, str(rng.randint(100, 999_999))) for name in names]


def recall_document(tokenizer, prose: list[int], seed: int) -> RecallDocument:
    """len(prose) tokens: prose with facts_for(len(prose)) facts in its first half, questions and
    answers (in another order) in its second half; prose fills the rest."""
    rng = random.Random(seed)
    facts = _facts(rng, facts_for(len(prose)))
    inserts = [_encode(tokenizer, FACT.format(name=n, number=v)) for n, v in facts]
    asked = rng.sample(facts, len(facts))
    questions = [(_encode(tokenizer, QUESTION.format(name=n)), _encode(tokenizer, ANSWER.format(number=v)))
                 for n, v in asked]
    inserted = sum(map(len, inserts)) + sum(len(q) + len(a) for q, a in questions)
    base = len(prose) - inserted
    if base < 4 * len(facts):
        raise SpecontextError(f"a recall document of {len(prose)} tokens cannot hold its facts and "
                              f"questions ({inserted} tokens); use a longer sequence")
    fact_cuts = sorted(rng.sample(range(1, base // 2), len(inserts)))
    question_cuts = sorted(rng.sample(range(base // 2, base), len(questions)))
    ids: list[int] = []
    answers: list[int] = []
    previous = 0
    for cut, piece in zip(fact_cuts, inserts):
        ids += prose[previous:cut] + piece
        previous = cut
    for cut, (question, answer) in zip(question_cuts, questions):
        ids += prose[previous:cut] + question
        answers += range(len(ids) - QUESTION_TAIL_TOKENS, len(ids) + len(answer))
        ids += answer
        previous = cut
    ids += prose[previous:base]
    return RecallDocument(ids=ids, facts=facts, answer_positions=answers)


def training_sequences(tokenizer, count: int, seq_len: int, seed: int = 0,
                       recall_documents: bool = False) -> list[tuple[list[int], list[int]]]:
    """`count` (ids, must-query positions) pairs of seq_len tokens of plain prose; with
    recall_documents, every odd one is a recall document whose answer positions must be among the
    teacher's queries (on SmolLM2 this lowered held-out recall: benchmarks/ACCURACY.md)."""
    stream = token_stream(tokenizer, count * seq_len, seed)
    sequences = []
    for index in range(count):
        prose = stream[index * seq_len:(index + 1) * seq_len]
        if recall_documents and index % 2:
            document = recall_document(tokenizer, prose, seed=1000 * (seed + 1) + index)
            sequences.append((document.ids, document.answer_positions))
        else:
            sequences.append((prose, []))
    return sequences
