"""The training text: apart from the eval's text; recall documents hold their facts and answers."""
import pytest

from specontext_compiler.distill import corpus
from specontext_compiler.errors import SpecontextError
from specontext_compiler.eval import text as eval_text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the eval text reads typing.io
def test_training_modules_and_paragraphs_are_disjoint_from_the_eval():
    top = {name.split(".")[0] for name in corpus.TRAIN_MODULES}
    assert not top & {name.split(".")[0] for name in eval_text.MODULES}
    paragraphs = corpus.training_paragraphs()
    assert len(paragraphs) > 100
    assert not set(paragraphs) & set(eval_text.docstring_paragraphs())


def test_recall_document_holds_each_fact_before_its_answer(tokenizer):
    prose = corpus.token_stream(tokenizer, 1024, seed=0)
    document = corpus.recall_document(tokenizer, prose, seed=5)
    text = tokenizer.decode(document.ids)
    assert len(document.ids) == len(prose)
    assert len(document.facts) == corpus.facts_for(len(document.ids))
    for name, number in document.facts:
        fact = text.index(corpus.FACT.format(name=name, number=number))
        question = text.index(corpus.QUESTION.format(name=name) + corpus.ANSWER.format(number=number))
        assert fact < question
    # Answer positions cover the answers' digits (one token per character here).
    answered = "".join(text[p] for p in document.answer_positions)
    for _, number in document.facts:
        assert number in answered


def test_templates_differ_from_the_passkey_eval():
    for template in (corpus.FACT, corpus.QUESTION, corpus.ANSWER):
        assert "pass key" not in template.lower()
    assert corpus.QUESTION.strip() not in eval_text.QUESTION


def test_sequences_are_prose_or_alternate_with_recall_and_short_ones_are_refused(tokenizer):
    prose = corpus.training_sequences(tokenizer, 4, 600, seed=0)
    assert [len(ids) for ids, _ in prose] == [600] * 4 and not any(must for _, must in prose)
    sequences = corpus.training_sequences(tokenizer, 4, 600, seed=0, recall_documents=True)
    assert [len(ids) for ids, _ in sequences] == [600] * 4
    assert [bool(must) for _, must in sequences] == [False, True, False, True]
    with pytest.raises(SpecontextError, match="longer sequence"):
        corpus.training_sequences(tokenizer, 2, 100, seed=0, recall_documents=True)
