"""A study's plan and how it runs, declared as config fields like ``ptray.config``'s (the study's command line is
built from them):

- ``Plan``: what defines a study: its tasks, transfer-only targets, seeds, conditions or search, and the
  ``TrainConfig`` every trial starts from; its trials and how they are packed into groups. Stored in the study's
  MLflow experiment; ``--resume`` continues exactly this.
- ``Options``: how to run a study; free to change between a run and its ``--resume``.

Importing it loads no torch (``tests/test_layers.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ptray.cli import check_config, config_field, non_negative_float, non_negative_int, positive_float, positive_int
from ptray.config import (
    DEFAULT_GPU_GROUP_SIZE,
    DEFAULT_GPUS_PER_TRIAL,
    DEFAULT_MODEL,
    GROUP_SHARED_FIELDS,
    TrainConfig,
    optimizer_settings,
)
from ptray.data.tasks import TASK_NAMES, get_task
from ptray.errors import PtrayError
from ptray.seeds import check_seed

# A trial's task and seed come from the plan's grid; --compile is a run option (Options), free on --resume.
PER_TRIAL_FIELDS = ("task", "seed", "compile")

# The tiny tokenizer spells CB and RTE premises in 200-500 tokens; 128 keeps every smoke batch short.
SMOKE_TRAIN = dict(max_epochs=2, max_train_examples=32, max_eval_examples=32, max_length=128)

# A trial of the plan: (task, seed), or (task, seed, condition) in a study with conditions or a search; its run
# name is ``ptray.layout.train_run_name(*member)``.
Member = tuple


def sample_condition(condition: str | None, sample: int) -> str:
    """The condition of a search's ``sample``-th trial of a grid point: ``sample3``, or ``random-sample3``."""
    return f"{condition}-sample{sample}" if condition else f"sample{sample}"


@dataclass
class Plan:
    """What defines a study. Stored in the study's MLflow experiment; ``--resume`` continues exactly this."""

    study: str = config_field("paper", "study id, the tag ptray.study on every run", cli=False)
    tasks: tuple[str, ...] = config_field(TASK_NAMES, "comma-separated tasks to train (and the transfer targets)")
    targets: tuple[str, ...] = config_field(
        (), "comma-separated transfer-only targets: tasks every trained prompt (and no prompt) is evaluated on, "
            "never trained (e.g. a task file declaring only a validation split)")
    seeds: tuple[int, ...] = config_field((0, 1, 2, 3), "seeds, e.g. 0-3 or 0,2,5; one trial per (task, seed)")
    smoke: bool = config_field(False, "the whole pipeline in minutes on CPUs: a tiny random BLOOM built on the fly, "
                                      f"{SMOKE_TRAIN['max_epochs']} epochs, {SMOKE_TRAIN['max_train_examples']} "
                                      f"examples")
    tiny_model: bool = config_field(False, "train a tiny random BLOOM built on the fly (--smoke without --model)",
                                    cli=False)
    group_size: int | None = config_field(
        None, f"prompts per Tune trial, trained together on one frozen model (ptray.group; each keeps its own MLflow "
              f"run); unset: 1 on CPUs, {DEFAULT_GPU_GROUP_SIZE} when trials get GPUs", type=positive_int)
    train: TrainConfig = field(default_factory=TrainConfig)  # every trial's config, but its task and seed
    model_digest: str | None = config_field(
        None, "of the model's files: the smoke model's bundle, a local folder's files (model_files), or a Hub name's "
              "cached revision (hub:NAME@COMMIT); --resume refuses another", cli=False)
    model_files: dict[str, str] | None = config_field(None, "a local model folder's files, each with its fingerprint "
                                                            "(ptray.study.fingerprint.model_fingerprint)", cli=False)
    data_digest: str | None = config_field(None, "of the data files read from data_dir", cli=False)
    data_files: dict[str, str] | None = config_field(None, "each data file read from data_dir with its digest "
                                                           "(ptray.study.bundle.Bundle.file_digests)", cli=False)
    # The declarations of the plan's user tasks (``ptray.data.tasks.user_declarations``: tasks and targets read
    # from --task-file): every worker registers them before it looks a task up, and --resume without the files.
    task_declarations: tuple[dict[str, Any], ...] = config_field((), "user task declarations", cli=False)
    # A declared study (ptray.study.declared): its conditions (name -> TrainConfig overrides over ``train``), its
    # Tune search ({"space": field -> distribution, "scheduler", "metric", "mode"}; empty: none) and its file.
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"help": "conditions", "cli": False})
    search: dict[str, Any] = field(default_factory=dict, metadata={"help": "a Tune search", "cli": False})
    num_samples: int | None = config_field(None, "trials per (condition, task, seed) of a declared search (unset: the "
                                                 "declaration's num_samples)", type=positive_int)
    declaration: dict[str, str] | None = config_field(None, "name, source and digest of the declaration", cli=False)

    # Fields that are not part of what --resume compares with the command line (the digests are checked
    # against the files themselves; a user task's declaration by its digest).
    NOT_COMPARED = ("study", "train", "model_digest", "model_files", "data_digest", "data_files",
                    "task_declarations", "declaration")

    def __post_init__(self):
        for seed in self.seeds:  # here, not in each trial: also a stored plan, before --resume starts anything
            check_seed(seed, "every seed of a study")
        check_config(self)
        self.tasks, self.targets = tuple(self.tasks), tuple(self.targets)
        self.task_declarations = tuple(dict(d) for d in self.task_declarations)
        check_study_tasks(self.tasks, self.targets)

    @property
    def transfer_targets(self) -> tuple[str, ...]:
        """Every task the transfer grid evaluates on: the trained tasks, then the transfer-only targets."""
        return self.tasks + self.targets

    def to_json(self) -> dict[str, Any]:
        """The plan as stored in MLflow: plain JSON values, the train config without its per-trial fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        d["tasks"], d["seeds"], d["targets"] = list(self.tasks), list(self.seeds), list(self.targets)
        d["task_declarations"] = [dict(x) for x in self.task_declarations]
        d["train"] = {k: v for k, v in self.train.to_dict().items() if k not in PER_TRIAL_FIELDS}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        """Inverse of ``to_json``; also reads the flat plans stored before the plan held a ``TrainConfig``."""
        d = dict(d)
        train_names = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_TRIAL_FIELDS)
        train = dict(d.pop("train", None) or {k: d[k] for k in train_names if k in d})
        if train.get("model") == "tiny":  # flat plans named the smoke model "tiny"
            d["tiny_model"], train["model"] = True, DEFAULT_MODEL
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["tasks"], d["seeds"] = tuple(d["tasks"]), tuple(d["seeds"])
        d["targets"] = tuple(d.get("targets", ()))  # plans stored before transfer-only targets had none
        d["task_declarations"] = tuple(d.get("task_declarations", ()))
        d.setdefault("group_size", 1)  # plans stored before trial groups trained one prompt per trial
        return cls(train=TrainConfig(**{k: v for k, v in train.items() if k in train_names}), **d)

    def compared(self) -> dict[str, Any]:
        """Everything ``--resume`` checks against the command line: plan fields and train fields, by field name."""
        plan = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NOT_COMPARED}
        train = {k: getattr(self.train, k) for k in self.train.to_dict() if k not in PER_TRIAL_FIELDS}
        # the lr it trains with: an unset lr is the optimizer's default, the same as that value given as --lr
        train["lr"] = optimizer_settings(self.train.optimizer, self.train.lr)["lr"]
        return {**plan, **train}

    @property
    def trials(self) -> list[Member]:
        """Every trial: (task, seed), task-major; with conditions (task, seed, condition), task, then condition, then
        seed; a search's grid points ``num_samples`` times each (conditions ``sample0``, ``sample1``, ...)."""
        conditions = list(self.conditions) or [None]
        samples = range(self.num_samples or 1) if self.search else None
        return [(t, s) if c is None and samples is None else
                (t, s, c) if samples is None else (t, s, sample_condition(c, k))
                for t in self.tasks for c in conditions for s in self.seeds for k in (samples or [0])]

    def condition_of(self, member: Member) -> str | None:
        """The declared condition of a trial (its sample suffix removed), None in a study without conditions."""
        if len(member) < 3 or not self.conditions:
            return None
        return member[2].rsplit("-sample", 1)[0] if self.search else member[2]

    def trial_config(self, member: Member) -> TrainConfig:
        """A trial's config (but a search's sampled values): ``train`` with its condition's overrides, task, seed."""
        over = self.conditions.get(self.condition_of(member), {}) if self.conditions else {}
        return dataclasses.replace(self.train, **over, task=member[0], seed=member[1])

    def groups(self, size: int | None = None) -> list[tuple[Member, ...]]:
        """The prompts packed into Tune trials of ``size`` (default ``group_size``, which must then be resolved):
        consecutive trials of the task-major order, so a group mostly holds one task's seeds, whose epochs are
        equally long and whose rows equally wide (no member waits for, or pads to, another task's). Conditions that
        change the frozen model (``GROUP_SHARED_FIELDS``) are packed apart; a search trains one prompt per trial."""
        size = 1 if self.search else size or self.group_size
        if not size:
            raise PtrayError("the plan's group_size is not resolved yet (1 on CPUs, more with GPUs); pass a size")
        parts: dict[tuple, list[Member]] = {}
        for member in self.trials:
            cfg = self.trial_config(member) if self.conditions else self.train
            parts.setdefault(tuple(str(getattr(cfg, f)) for f in GROUP_SHARED_FIELDS), []).append(member)
        return [tuple(ms[i:i + size]) for ms in parts.values() for i in range(0, len(ms), size)]

    @property
    def num_evaluations(self) -> int:
        """Transfer runs (every prompt on every target: the tasks and the transfer-only targets) plus one no-prompt
        baseline per target."""
        return len(self.trials) * len(self.transfer_targets) + len(self.transfer_targets)




def check_study_tasks(tasks: tuple[str, ...], targets: tuple[str, ...]) -> None:
    """A study trains ``tasks`` (each needs a training and a validation split) and evaluates every prompt on them
    and on the transfer-only ``targets`` (each needs a validation split; none of them trained).

    Raises:
        PtrayError: one line: a task to train without a training split, a target without a validation split, a
            target that is also trained, or a name given twice.
    """
    for name in tasks:
        task = get_task(name)
        if "train" not in task.splits:
            raise PtrayError(f"task {task.name!r} has no training split (its splits: {', '.join(task.splits)}), so "
                             f"it cannot be trained; give it as a transfer-only target (--targets {task.name})")
    for name in targets:
        task = get_task(name)
        if "val" not in task.splits:
            raise PtrayError(f"transfer target {task.name!r} has no validation split (its splits: "
                             f"{', '.join(task.splits)}); the transfer grid evaluates on the validation split")
        if task.name in tasks:
            raise PtrayError(f"--targets lists {task.name!r}, which --tasks trains; every trained task is a "
                             f"transfer target already")
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise PtrayError(f"--targets lists {', '.join(dup)} more than once")


@dataclass
class Options:
    """How to run a study; free to change between a run and its ``--resume``."""

    experiment: str | None = config_field(None, "MLflow experiment (unset: ptray-<study>)")
    tracking_uri: str | None = config_field(None, "MLflow tracking URI (unset: $MLFLOW_TRACKING_URI, else "
                                                  "sqlite:///./mlflow.db)")
    storage_path: str | None = config_field(None, "Tune results: absolute path or s3://...; shared storage on a "
                                                  "cluster (unset: ./outputs/ray_results)")
    address: str | None = config_field(None, "Ray cluster address, e.g. auto (unset: $RAY_ADDRESS, else an "
                                             "embedded Ray)")
    gpus_per_trial: float | None = config_field(None, f"GPU fraction per trial/evaluation task (unset: "
                                                      f"{DEFAULT_GPUS_PER_TRIAL} where the cluster has or can add "
                                                      f"GPUs, else 0; a group's trial: that times its prompts, at "
                                                      f"most 1)", type=non_negative_float)
    cpus_per_trial: float = config_field(1.0, "CPUs per trial and evaluation task", type=positive_float)
    threads: int | None = config_field(
        None, "torch CPU threads of each trial and evaluation, and of --local (unset: a trial's --cpus-per-trial "
              "rounded down, at least 1; --local: torch's own, every core); give the same N to both to reproduce a "
              "Ray trial's numbers locally (more threads sum in another order)", type=positive_int)
    max_failures: int = config_field(3, "retries of a failed trial, a lost node included", type=non_negative_int)
    compile: bool = config_field(False, "torch.compile each transformer block in the trials (see BENCHMARKS.md)")
    resume: bool = config_field(False, "finish the study named by --study; rerun nothing done")
    accept_new_data: bool = config_field(False, "with --resume: finish the study on data files that changed since "
                                                "it started (its finished runs keep what the old files gave)")
    dry_run: bool = config_field(False, "make the run's checks, print the plan (with --resume: what is left) and "
                                        "exit; creates nothing")
    verbose: bool = config_field(False, "Ray Tune's own output: its trial tables, each trial's config and results, "
                                        "its INFO lines (default: a line per trial epoch and per failure)")
    analysis: bool = config_field(True, "run the analysis at the end", off_help="skip the analysis step")
    analysis_dir: str | None = config_field(None, "where the analysis writes its report (unset: its own)")
    local: str | None = config_field(None, "run the whole study in this process on one device (no Ray) into this "
                                           "folder of run folders; published to MLflow at the end when MLflow is "
                                           "installed and the store reachable (later: ptray publish DIR)")

    def __post_init__(self):
        check_config(self)

    @property
    def torch_threads(self) -> int:
        """torch's intra-op threads in every trial, evaluation and ``--local`` run: ``threads``, else the trial's
        CPUs rounded down (at least 1), which is what Ray gives a trial (it sets ``OMP_NUM_THREADS`` to its CPUs)."""
        return self.threads or max(1, int(self.cpus_per_trial))
