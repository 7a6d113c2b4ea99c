"""The SuperGLUE task registry: each task declared once, as data.

A task knows its fields, how one example becomes model text (a pure ``format``), the answer words for each
label (its verbalizer), the paper's init text and its metrics. Templates carry a ``version`` that every run logs,
so results from different templates are never mixed.

Verbalizers (template version 1). The model must produce exactly these words (after the ``Answer:`` cue, with a
leading space) and then EOS:

========  =========================================================
task      label -> answer words
========  =========================================================
cb        entailment -> "yes", contradiction -> "no", neutral -> "maybe"
rte       entailment -> "yes", not_entailment -> "no"
copa      choice1 -> "1", choice2 -> "2"
wsc       True -> "yes", False -> "no"
========  =========================================================

Short answer words keep exact match about the decision, not about spelling a long label; sharing "yes"/"no"
between tasks makes zero-shot transfer between them meaningful.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ptray.errors import PtrayError

ANSWER_CUE = "Answer:"


def _clean(text: str) -> str:
    """Collapse all whitespace runs (including the newline inside some WSC spans) to one space; strip the ends."""
    return " ".join(str(text).split())


def format_cb(ex: Mapping) -> str:
    r"""CB / RTE source text.

    >>> format_cb({"premise": "It rained.", "hypothesis": "the ground is wet"})
    'Premise: It rained.\nHypothesis: the ground is wet\nAnswer:'
    """
    return f"Premise: {_clean(ex['premise'])}\nHypothesis: {_clean(ex['hypothesis'])}\n{ANSWER_CUE}"


def format_copa(ex: Mapping) -> str:
    r"""COPA source text.

    >>> format_copa({"premise": "My eyes became red.", "question": "cause",
    ...              "choice1": "I was sobbing.", "choice2": "I was laughing."})
    'Premise: My eyes became red.\nWhat was the cause?\n1: I was sobbing.\n2: I was laughing.\nAnswer:'
    """
    question = {"cause": "What was the cause?", "effect": "What happened as a result?"}[ex["question"]]
    return (
        f"Premise: {_clean(ex['premise'])}\n{question}\n"
        f"1: {_clean(ex['choice1'])}\n2: {_clean(ex['choice2'])}\n{ANSWER_CUE}"
    )


def format_wsc(ex: Mapping) -> str:
    r"""WSC source text.

    >>> format_wsc({"text": "Jane gave Joan candy because she was hungry.", "span1_text": "Jane",
    ...             "span2_text": "she", "span1_index": 0, "span2_index": 5})
    'Text: Jane gave Joan candy because she was hungry.\nDoes the pronoun "she" refer to "Jane"?\nAnswer:'
    """
    return (
        f"Text: {_clean(ex['text'])}\n"
        f'Does the pronoun "{_clean(ex["span2_text"])}" refer to "{_clean(ex["span1_text"])}"?\n{ANSWER_CUE}'
    )


@dataclass(frozen=True)
class Task:
    """One SuperGLUE task, declared once.

    ``labels`` are the canonical label names (the official jsonl values as strings); records carry the label as
    an index into it. ``text_fields`` are the fields truncation may shorten, longest first. ``allowed_values``
    lists the only values a field may take (COPA's question), checked when a record is read.
    """

    name: str
    dir_name: str  # folder name in the official layout: <data_dir>/<dir_name>/<split>.jsonl
    hub_config: str  # config name in the Hub's aps/super_glue
    fields: tuple[str, ...]
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]
    verbalizer: Mapping[str, str]
    init_text: str
    formatter: Callable[[Mapping], str]
    allowed_values: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # per field, if closed
    version: int = 1

    def format(self, ex: Mapping) -> str:
        """Example fields -> model input text (ends with the answer cue)."""
        return self.formatter(ex)

    def target(self, label_index: int) -> str:
        """Label index -> target text: a space then the label's answer words."""
        return " " + self.verbalizer[self.labels[label_index]]

    @property
    def answers(self) -> tuple[str, ...]:
        """Target texts of all labels, in label order."""
        return tuple(self.target(i) for i in range(len(self.labels)))


_TASKS = (
    Task(
        name="cb",
        dir_name="CB",
        hub_config="cb",
        fields=("premise", "hypothesis"),
        text_fields=("premise", "hypothesis"),
        labels=("entailment", "contradiction", "neutral"),
        verbalizer={"entailment": "yes", "contradiction": "no", "neutral": "maybe"},
        init_text="Does the hypothesis entail, contradict or is neutral about the premise?",
        formatter=format_cb,
    ),
    Task(
        name="rte",
        dir_name="RTE",
        hub_config="rte",
        fields=("premise", "hypothesis"),
        text_fields=("premise", "hypothesis"),
        labels=("entailment", "not_entailment"),
        verbalizer={"entailment": "yes", "not_entailment": "no"},
        init_text="Does the hypothesis entail, or not entail the premise?",
        formatter=format_cb,
    ),
    Task(
        name="copa",
        dir_name="COPA",
        hub_config="copa",
        fields=("premise", "choice1", "choice2", "question"),
        text_fields=("premise", "choice1", "choice2"),
        labels=("0", "1"),
        verbalizer={"0": "1", "1": "2"},
        init_text="Pick the correct choice given the premise and the question.",
        formatter=format_copa,
        allowed_values={"question": ("cause", "effect")},
    ),
    Task(
        name="wsc",
        dir_name="WSC",
        hub_config="wsc.fixed",
        fields=("text", "span1_text", "span2_text", "span1_index", "span2_index"),
        text_fields=("text",),
        labels=("False", "True"),
        verbalizer={"False": "no", "True": "yes"},
        init_text="Given the following text, decide whether the span1_text is referenced by the pronoun in span2_text",
        formatter=format_wsc,
    ),
)


def _build_registry(tasks: tuple[Task, ...]) -> dict[str, Task]:
    registry: dict[str, Task] = {}
    for task in tasks:
        if task.name in registry:
            raise ValueError(f"duplicate task name {task.name!r}")
        registry[task.name] = task
    return registry


TASKS: Mapping[str, Task] = _build_registry(_TASKS)
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """Look a task up by name (case-insensitive); unknown names list the valid ones."""
    key = str(name).strip().lower()
    if key in TASKS:
        return TASKS[key]
    hint = difflib.get_close_matches(key, TASK_NAMES, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    raise PtrayError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}.{suggestion}")
