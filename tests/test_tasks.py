"""Task registry: one golden string per formatter, invariants over every task, registry errors."""

import doctest

import pytest

from ptray.data.superglue import Example
from ptray.data.tasks import BUILTIN_TASK_NAMES, TASK_NAMES, TASKS, _build_registry, get_task
from ptray.errors import PtrayError


def test_golden_cb():
    ex = {"premise": "B: They just love kittens. A: Yeah.", "hypothesis": "this is a cat"}
    assert get_task("cb").format(ex) == (
        "Premise: B: They just love kittens. A: Yeah.\nHypothesis: this is a cat\nAnswer:")
    assert get_task("cb").answers == (" yes", " no", " maybe")


def test_golden_rte():
    ex = {"premise": "There has been a lot of concern.", "hypothesis": "Bacteria is winning."}
    assert get_task("rte").format(ex) == (
        "Premise: There has been a lot of concern.\nHypothesis: Bacteria is winning.\nAnswer:")
    assert get_task("rte").target(1) == " no"  # not_entailment


def test_golden_copa():
    ex = {"premise": "My eyes became red and puffy.", "choice1": " I was sobbing.", "choice2": "I was laughing.",
          "question": "effect"}
    assert get_task("copa").format(ex) == (
        "Premise: My eyes became red and puffy.\nWhat happened as a result?\n1: I was sobbing.\n2: I was laughing.\n"
        "Answer:"
    )  # the leading space of an official COPA choice (train idx 128) is dropped
    assert get_task("copa").answers == (" 1", " 2")


def test_golden_wsc():
    ex = {"text": "Jane gave Joan candy because she was hungry.", "span1_text": "Jane\nGave", "span2_text": "she",
          "span1_index": 0, "span2_index": 5}
    assert get_task("wsc").format(ex) == (
        'Text: Jane gave Joan candy because she was hungry.\nDoes the pronoun "she" refer to "Jane Gave"?\nAnswer:'
    )  # the newline inside an official WSC span (train idx 234) becomes a space
    assert get_task("wsc").target(get_task("wsc").labels.index("True")) == " yes"


def test_golden_wic():
    ex = {"word": "class", "sentence1": "An emerging professional class.",
          "sentence2": "Apologizing for losing your temper,  even though\nyou were badly provoked, showed real class.",
          "start1": 25, "end1": 30, "start2": 85, "end2": 90}
    assert get_task("wic").format(ex) == (
        "Sentence 1: An emerging professional class.\n"
        "Sentence 2: Apologizing for losing your temper, even though you were badly provoked, showed real class.\n"
        'Is the word "class" used with the same meaning in both sentences?\nAnswer:'
    )  # whitespace runs are cleaned as in the other tasks
    assert get_task("wic").answers == (" no", " yes")
    assert get_task("wic").target(get_task("wic").labels.index("True")) == " yes"


def test_wic_is_built_in_but_not_in_the_papers_study():
    assert "wic" in BUILTIN_TASK_NAMES and "wic" not in TASK_NAMES and "wic" not in TASKS
    assert get_task("WiC").init_text == "Is the word used with the same meaning in both sentences?"
    assert (get_task("wic").dir_name, get_task("wic").hub_config) == ("WiC", "wic")


def test_wic_answer_ids(tiny):
    """WiC's answers tokenise after its cue as WSC's do: the shared words are the same ids, so transfer compares
    like with like."""
    from ptray.data.tokens import answer_ids_in_context

    _, tok = tiny
    wic, wsc = get_task("wic"), get_task("wsc")
    source = wic.format({"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "The bank closed."})
    ids = answer_ids_in_context(tok, source, wic.answers)
    assert [tok.decode(i) for i in ids] == [" no", " yes"] and all(ids)
    wsc_source = wsc.format({"text": "Jane gave Joan candy.", "span1_text": "Jane", "span2_text": "she"})
    assert ids == answer_ids_in_context(tok, wsc_source, wsc.answers)


@pytest.mark.parametrize("name", [n for n in BUILTIN_TASK_NAMES if n not in TASK_NAMES])
def test_invariants_of_the_other_built_in_tasks(name, data_dir):
    from ptray.data.superglue import load_split

    task = get_task(name)
    assert set(task.verbalizer) == set(task.labels) and len(set(task.answers)) == len(task.answers)
    assert task.version >= 1 and task.init_text
    for ex in load_split(task, "val", data_dir)[:30]:
        text = task.format(ex.fields)
        assert text.endswith("Answer:") and text == text.strip()
        assert "  " not in text and " \n" not in text and "\n " not in text
        assert 0 <= ex.label < len(task.labels)


def test_init_texts_are_the_papers():
    assert TASKS["cb"].init_text == "Does the hypothesis entail, contradict or is neutral about the premise?"
    assert TASKS["rte"].init_text == "Does the hypothesis entail, or not entail the premise?"
    assert TASKS["copa"].init_text == "Pick the correct choice given the premise and the question."
    assert TASKS["wsc"].init_text == (
        "Given the following text, decide whether the span1_text is referenced by the pronoun in span2_text")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_invariants(name, data_dir):
    from ptray.data.superglue import load_split

    task = TASKS[name]
    assert set(task.verbalizer) == set(task.labels)
    assert len(set(task.answers)) == len(task.answers), "answers must be distinct"
    for answer in task.answers:
        assert answer.startswith(" ") and answer == " " + answer.strip() and "\n" not in answer
    assert task.version >= 1 and task.init_text
    for ex in load_split(task, "val", data_dir)[:30]:
        text = task.format(ex.fields)
        assert text.endswith("Answer:") and text == text.strip()
        assert "  " not in text and " \n" not in text and "\n " not in text
        assert 0 <= ex.label < len(task.labels)


def test_unknown_task_lists_valid_and_suggests():
    message = r"unknown task 'rtee'; valid tasks: cb, rte, copa, wsc\. Did you mean 'rte'\?"
    with pytest.raises(PtrayError, match=message):
        get_task("rtee")
    assert get_task("COPA").name == "copa"


def test_duplicate_task_name_is_an_error():
    with pytest.raises(ValueError, match="duplicate task name 'cb'"):
        _build_registry((TASKS["cb"], TASKS["cb"]))


def test_example_is_hashable_by_identity_fields():
    a = Example("cb", "val", 0, {"premise": "a", "hypothesis": "b"}, 1)
    same_id = Example("cb", "val", 0, {"premise": "other text", "hypothesis": "b"}, 1)
    assert hash(a) == hash(same_id)  # the fields dict (unhashable) is left out of the hash
    assert len({a, Example("cb", "val", 1, {"premise": "a", "hypothesis": "b"}, 1)}) == 2
    assert a != same_id  # equality still compares the text


def test_docstring_examples_run():
    """The formatters' docstrings show one literal input and its output: they must stay true."""
    import ptray.data.tasks

    result = doctest.testmod(ptray.data.tasks, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0


def test_copa_question_is_checked_by_its_declaration():
    from ptray.data.superglue import _normalise

    record = {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0, "idx": 3}
    with pytest.raises(PtrayError, match=r"x:1: field 'question' must be 'cause' or 'effect', got 'why'"):
        _normalise(TASKS["copa"], record, "val", "x:1")
    assert TASKS["copa"].allowed_values == {"question": ("cause", "effect")}
    assert all(not TASKS[t].allowed_values for t in ("cb", "rte", "wsc"))
