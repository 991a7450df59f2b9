"""Long English text available offline, and the passkey prompts built from it.

The text is the docstrings of a fixed list of Python standard-library modules, read at run time
(real prose, present on every machine, nothing shipped); it varies slightly between Python
versions, so results record the version. A passkey case hides a 5-digit number at a relative
depth of such filler and asks for it at the end.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
import warnings

MODULES = ("collections", "functools", "itertools", "os", "pathlib", "json", "re", "string", "textwrap",
           "argparse", "logging", "subprocess", "typing", "dataclasses", "inspect", "unittest", "email",
           "threading", "asyncio", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "csv",
           "zipfile", "tarfile", "shutil", "tempfile", "datetime", "calendar", "difflib", "pprint",
           "contextlib", "abc", "enum", "copy", "pickle", "socket", "ssl", "codecs", "io", "struct")
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
# The passkey haystack repeats plain sentences (the classic passkey set-up, our own wording): a 135M
# model misses keys in a docstring haystack even with full attention, which would measure the model.
FILLER = "The river runs to the sea. The hills are quiet at night. The road goes on and the day is long. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"


def module_paragraphs(name: str) -> list[str]:
    """Prose paragraphs (>= 80 characters, no doctest) of one module's and its public members'
    docstrings, in a fixed order; none if the module is missing (a trimmed Python build)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(name)
    except ImportError:
        return []
    objects = [module] + [getattr(module, member, None) for member in sorted(dir(module))
                          if not member.startswith("_")]
    paragraphs = []
    for obj in objects:
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        for block in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
            text = " ".join(block.split())
            if len(text) >= 80 and ">>>" not in text:
                paragraphs.append(text)
    return paragraphs


def docstring_paragraphs() -> list[str]:
    """Prose paragraphs from the docstrings of MODULES and their public members, in a fixed order."""
    seen, paragraphs = set(), []
    for name in MODULES:
        for text in module_paragraphs(name):
            # No 5-digit numbers: one could pose as the passkey.
            if re.search(r"\d{5}", text) or text in seen:
                continue
            seen.add(text)
            paragraphs.append(text)
    return paragraphs


def long_text_ids(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    """num_tokens token ids of docstring prose, starting `offset` paragraphs in (wraps around)."""
    paragraphs = docstring_paragraphs()
    ids: list[int] = []
    index = offset
    while len(ids) < num_tokens:
        ids += tokenizer(paragraphs[index % len(paragraphs)] + "\n\n", add_special_tokens=False).input_ids
        index += 1
    return ids[:num_tokens]


def passkey_prompt(tokenizer, total_tokens: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): about total_tokens in all, the needle at `depth` (0..1) of the filler.

    The eval prefills the context, and the question with it or as decode steps (eval/passkey.py).
    """
    intro = tokenizer(INTRO, add_special_tokens=False).input_ids
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    filler_len = total_tokens - len(intro) - len(needle) - len(question)
    if filler_len < 16:
        raise ValueError(f"passkey prompt of {total_tokens} tokens leaves no room for filler")
    unit = tokenizer(FILLER, add_special_tokens=False).input_ids
    filler = (unit * (filler_len // len(unit) + 1))[:filler_len]
    cut = _sentence_boundary(tokenizer, filler, int(filler_len * depth))
    return intro + filler[:cut] + needle + filler[cut:], question


def _sentence_boundary(tokenizer, ids: list[int], near: int) -> int:
    """The first position at or after `near` that follows a sentence end (else `near`)."""
    for pos in range(max(near, 1), min(len(ids), near + 64)):
        if tokenizer.decode(ids[pos - 1:pos]).rstrip().endswith((".", "\n")):
            return pos
    return near


def passkey(seed: int) -> str:
    """A 5-digit key (no leading zero), reproducible from the seed."""
    return str(random.Random(seed).randint(10000, 99999))


def parse_answer(text: str) -> str | None:
    """The first run of 5 digits in the generated text, or None."""
    match = re.search(r"\d{5}", text.replace(",", "").replace(" ", ""))
    return match.group(0) if match else None


def python_version() -> str:
    """The interpreter whose docstrings made the text."""
    return ".".join(map(str, sys.version_info[:3]))
