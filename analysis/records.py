"""What the analysis reads from a study: plain records, built by ``mlflow_io`` (or by hand in tests).

The analysis functions take these records (and tensors), never MLflow objects, so every number can be recomputed
from the artifacts alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ptray import layout


@dataclass(frozen=True)
class PromptRun:
    """One trained prompt (an MLflow ``train`` run).

    ``prompt`` is [n, hidden] fp32; ``config`` / ``metrics`` / ``predictions`` are the run's JSON artifacts
    (``predictions`` may be empty).
    """

    run_id: str
    task: str
    seed: int
    prompt: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The prompt's name in tables and figures: its train run's name, e.g. ``cb-seed0``."""
        return layout.train_run_name(self.task, self.seed)

    @property
    def num_tokens(self) -> int:
        """Prompt rows n."""
        return int(self.prompt.shape[0])


@dataclass(frozen=True)
class EvalRun:
    """One zero-shot evaluation: a source prompt (``transfer``) or no prompt (``baseline``) on a target task.

    ``idx``, ``em_correct`` and ``rank_correct`` are per example of the target's validation split, in one order.
    """

    run_id: str
    kind: str  # layout.TRANSFER or layout.BASELINE
    target: str
    source: str | None = None  # None for a baseline
    source_seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    idx: list[int] = field(default_factory=list)
    em_correct: list[int] = field(default_factory=list)
    rank_correct: list[int] = field(default_factory=list)


@dataclass
class Study:
    """Everything one experiment holds that the analysis uses."""

    experiment: str
    study: str  # the ``ptray.study`` tag ("" when the runs carry none)
    prompts: list[PromptRun]
    evals: list[EvalRun] = field(default_factory=list)
    experiment_id: str | None = None

    @property
    def tasks(self) -> list[str]:
        """Tasks in the registry's order (cb, rte, copa, wsc), then any others alphabetically."""
        from ptray.data.tasks import TASK_NAMES

        present = {p.task for p in self.prompts}
        return [t for t in TASK_NAMES if t in present] + sorted(present - set(TASK_NAMES))

    def sorted_prompts(self) -> list[PromptRun]:
        """Prompts ordered by task (registry order), then seed: the row/column order of every matrix."""
        order = {t: i for i, t in enumerate(self.tasks)}
        return sorted(self.prompts, key=lambda p: (order[p.task], p.seed))
