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

    ``prompt`` is [n, hidden] fp32; ``config`` / ``metrics`` / ``predictions`` / ``history`` are the run's JSON
    artifacts (``predictions`` and ``history`` may be empty; ``history``: per epoch ``epoch``, ``eval_loss``,
    ``exact_match``, ``rank_accuracy``, ...).
    """

    run_id: str
    task: str
    seed: int
    prompt: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)
    condition: str | None = None  # ``ptray.condition``: the study's condition (None in a study without conditions)
    init_from: str | None = None  # ``ptray.init_from``: a SPoT run's source prompt (its train run name)
    lr: float | None = None  # the learning rate it trained with (the run's ``lr`` param / config.json)
    trial: str | None = None  # a search's trial: its ``ptray.condition`` tag (``sample3``, ``random-sample3``)
    history: list[dict[str, Any]] = field(default_factory=list)  # history.json: one dict per epoch run

    @property
    def label(self) -> str:
        """The prompt's name in tables and figures: its train run's name, e.g. ``cb-seed0`` (``cb-seed0-random``
        with a condition, ``cb-seed0-sample3`` for a search's trial)."""
        return layout.train_run_name(self.task, self.seed, self.trial or self.condition)

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
    condition: str | None = None  # a transfer run's source prompt's (declared) condition
    trial: str | None = None  # a search: the source prompt's trial (its ``ptray.condition`` tag)


@dataclass(frozen=True)
class Trial:
    """One train run as a search trial: finished, or stopped early by a Tune scheduler (``KILLED`` with
    ``ptray.stopped_by``, which may have no artifacts). ``metrics``: ``best_eval_loss`` (the lowest eval loss it
    reached), ``eval_loss`` (its last epoch's), ``best_epoch``, ``epochs_run``, and for a finished run its final
    ``exact_match`` / ``rank_accuracy``."""

    run_id: str
    task: str
    seed: int
    status: str  # layout.FINISHED or layout.KILLED
    lr: float | None = None
    condition: str | None = None
    stopped_by: str | None = None
    init_from: str | None = None
    run_name: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    trial: str | None = None  # its ``ptray.condition`` tag in a search (``sample3``)


@dataclass(frozen=True)
class RunStatus:
    """One train or evaluation run of the experiment as MLflow lists it, whatever its status, deleted runs too:
    what the coverage section (``analysis.coverage``) holds against the stored plans."""

    study: str  # its ``ptray.study`` tag
    kind: str  # layout.TRAIN, layout.TRANSFER or layout.BASELINE
    name: str  # its run name (``ptray.layout``'s spelling)
    status: str  # FINISHED, FAILED, KILLED, RUNNING, SCHEDULED, or DELETED (a deleted run, still in the store)
    stopped_by: str | None = None  # a KILLED train run a Tune scheduler stopped (``ptray.stopped_by``)


DELETED = "DELETED"  # the status ``RunStatus`` gives a deleted run


@dataclass
class Study:
    """Everything one experiment holds that the analysis uses."""

    experiment: str
    study: str  # the ``ptray.study`` tag ("" when the runs carry none)
    prompts: list[PromptRun]
    evals: list[EvalRun] = field(default_factory=list)
    experiment_id: str | None = None
    trials: list[Trial] = field(default_factory=list)  # every train run, stopped ones too (the search section)
    declared_conditions: list[str] = field(default_factory=list)  # the plan's conditions, in declared order
    search: dict[str, Any] = field(default_factory=dict)  # the plan's Tune search (space, metric, mode, scheduler)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # study id -> its stored plan (``Plan.to_json``)
    runs: list[RunStatus] = field(default_factory=list)  # every train/evaluation run, any status (coverage)

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

    @property
    def conditions(self) -> list[str]:
        """The study's (declared) conditions that have train runs: in ``declared_conditions`` order, then any others
        in the order their runs appear (the loader lists runs by start time; the stored plan keeps no order); []
        for a study without conditions."""
        present = list(dict.fromkeys(p.condition for p in self.prompts if p.condition is not None))
        return [c for c in self.declared_conditions if c in present] + [
            c for c in present if c not in self.declared_conditions]

    @property
    def transfer_only_targets(self) -> list[str]:
        """Tasks evaluated in the transfer grid (transfer or baseline runs on them) that have no train runs:
        held-out targets, registry order then alphabetical."""
        from ptray.data.tasks import TASK_NAMES

        held = {e.target for e in self.evals} - set(self.tasks)
        return [t for t in TASK_NAMES if t in held] + sorted(held - set(TASK_NAMES))

    def select(self, prompts: list[PromptRun]) -> Study:
        """The same study with only ``prompts`` as train runs: transfer runs kept when their source prompt is one
        of them (task, seed, condition and trial), baselines always. ``trials`` and ``search`` are left out."""
        keep = {(p.task, p.seed, p.condition, p.trial) for p in prompts}
        evals = [e for e in self.evals if e.kind != layout.TRANSFER
                 or (e.source, e.source_seed, e.condition, e.trial) in keep]
        return Study(self.experiment, self.study, list(prompts), evals, experiment_id=self.experiment_id,
                     declared_conditions=list(self.declared_conditions))
