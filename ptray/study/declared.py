"""A declared study as a record: ``StudyDeclaration`` (its tasks, seeds, ``[train]``, conditions and search, as
``ptray.study.study_file`` reads and validates them from a study's TOML file), its grid (``StudyRun``: conditions x
tasks x seeds, condition-major) and each run's ``TrainConfig``, a searched field (``Search``) as Ray Tune's search
space, and the declaration's digest that ``--resume`` compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from ptray.config import TrainConfig

__all__ = ["Search", "StudyDeclaration", "StudyRun"]


@dataclasses.dataclass(frozen=True)
class Search:
    """One searched ``TrainConfig`` field: a distribution and its bounds (or values)."""

    field: str
    distribution: str  # one of ptray.study.study_file.DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()

    def to_tune(self):
        """This search as a Ray Tune search-space entry (``tune.loguniform(low, high)``, ...); imports Ray."""
        from ray import tune

        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.distribution)(self.low, self.high)


class StudyRun(NamedTuple):
    """One point of a study's grid: its condition (None in a study without conditions), the ``TrainConfig``
    overrides it trains with (``[train]`` then the condition's), its task and seed."""

    condition: str | None
    overrides: dict[str, Any]
    task: str
    seed: int


@dataclasses.dataclass(frozen=True)
class StudyDeclaration:
    """A validated study declaration (``load_study``); ``grid()`` lists its runs."""

    name: str
    description: str
    source: str  # the file it was read from
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    train: Mapping[str, Any]  # TrainConfig overrides of every run
    conditions: Mapping[str, Mapping[str, Any]]  # condition name -> its TrainConfig overrides, in file order
    search: Mapping[str, Search] = dataclasses.field(default_factory=dict)  # field -> its distribution
    num_samples: int = 1  # Tune trials per grid point (a search only)
    scheduler: str = "fifo"
    metric: str = "eval_loss"
    mode: str = "min"
    declaration: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # the file's content

    def grid(self) -> list[StudyRun]:
        """Every (condition, overrides, task, seed) of the study: condition-major, then task, then seed (a study
        without conditions is one slice, condition None). Each run's overrides are ``[train]`` updated by its
        condition's; the searched fields are not in them (Tune samples them)."""
        slices = [(name, {**self.train, **over}) for name, over in self.conditions.items()]
        slices = slices or [(None, dict(self.train))]
        return [StudyRun(name, dict(over), task, seed) for name, over in slices for task in self.tasks
                for seed in self.seeds]

    @property
    def size(self) -> int:
        """Grid points: conditions (at least 1) x tasks x seeds."""
        return max(len(self.conditions), 1) * len(self.tasks) * len(self.seeds)

    @property
    def num_trials(self) -> int:
        """Trainings the study runs: ``size`` x ``num_samples`` (a search samples each grid point that often)."""
        return self.size * self.num_samples

    def train_config(self, run: StudyRun, base: TrainConfig | None = None, **sampled: Any) -> TrainConfig:
        """The ``TrainConfig`` of ``run``: ``base`` (default: ``TrainConfig()``; e.g. the command line's settings,
        model and data) updated by the run's overrides, task and seed, then by ``sampled`` (a Tune trial's values
        of the searched fields). Raises PtrayError for a value ``TrainConfig`` refuses."""
        return dataclasses.replace(base or TrainConfig(), **{**run.overrides, **sampled, "task": run.task,
                                                            "seed": run.seed})

    def tune_search_space(self) -> dict[str, Any]:
        """The search as Ray Tune's ``param_space`` (field -> ``tune.loguniform(...)`` ...); empty without one."""
        return {name: s.to_tune() for name, s in self.search.items()}

    @property
    def digest(self) -> str:
        """sha256 of the declaration's content (canonical JSON): what a resumed study compares."""
        text = json.dumps(self.declaration, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()
