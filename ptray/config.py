"""Every config, declared once: each field carries its default and one-line help, from which the command lines
(``python -m ptray.train``, ``sweeps/all.py``) are built (``ptray.cli.add_config_arguments``).

- ``TrainConfig``: one training run (``ptray.training.train.train``).
- ``EvalConfig``: evaluating prompts on a task's validation split (the transfer grid).
- ``Plan``: what defines a study; it holds the ``TrainConfig`` every trial starts from. Stored in the study's MLflow
  experiment; ``--resume`` continues exactly this.
- ``Options``: how to run a study; free to change between a run and its ``--resume``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ptray.cli import (
    check_config,
    config_field,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from ptray.data.superglue import DEFAULT_HUB_DATASET
from ptray.data.tasks import TASK_NAMES, get_task
from ptray.errors import PtrayError
from ptray.seeds import check_seed

DEFAULT_MODEL = "bigscience/bloomz-560m"  # the paper's model


class PromptInit(str, Enum):
    """How the prompt rows start: the init text's token embeddings (the paper), random, random vocab rows, the
    embeddings of the task's answer words (Lester et al. 2021's class-label init), or another trained prompt's rows
    (``prompt``: SPoT, Vu et al. 2021; ``TrainConfig.init_source`` names it)."""

    TEXT = "text"
    RANDOM = "random"
    SAMPLE_VOCAB = "sample_vocab"
    CLASS_LABELS = "class_labels"
    PROMPT = "prompt"


SEED_PLACEHOLDER = "{seed}"  # in a study's init_source: each trial's own seed (SPoT: source seed s -> target seed s)


def expand_init_source(init_source: str | None, seed: int) -> str | None:
    """A study's ``init_source`` for the trial of ``seed``: ``"rte-seed{seed}"`` -> ``"rte-seed3"``."""
    return None if init_source is None else init_source.replace(SEED_PLACEHOLDER, str(seed))


@dataclass(frozen=True)
class OptimizerDefaults:
    """One optimizer choice of ``TrainConfig.optimizer``: its learning rate when ``lr`` is unset, its fixed
    constructor options, and where both come from."""

    lr: float
    options: tuple[tuple[str, Any], ...]
    source: str


# Every prompt gets its own optimizer (ptray.training.loop builds it); the settings of each choice, with sources.
OPTIMIZERS: dict[str, OptimizerDefaults] = {
    "adam": OptimizerDefaults(
        3e-2, (), "torch.optim.Adam, the paper's optimizer; lr 3e-2 from PEFT's bloomz-560m prompt-tuning example"),
    "adamw": OptimizerDefaults(
        3e-2, (("weight_decay", 0.01),), "torch.optim.AdamW; Adam's lr 3e-2 (PEFT's example), weight decay 0.01 "
                                          "(torch.optim.AdamW's default)"),
    "adafactor": OptimizerDefaults(
        0.3, (("relative_step", False), ("scale_parameter", False), ("warmup_init", False), ("weight_decay", 1e-5)),
        "transformers.optimization.Adafactor with Lester et al. 2021's prompt-tuning settings (appendix A): "
        "constant lr 0.3, weight decay 1e-5, parameter scaling off; beta2 decay 0.8 is transformers' default "
        "decay_rate -0.8"),
    "sgd": OptimizerDefaults(
        0.1, (("momentum", 0.9),), "torch.optim.SGD with momentum 0.9; lr 0.1 is ptray's choice, not from a source "
                                   "(no prompt-tuning paper we know trains with SGD): with momentum 0.9 a step is "
                                   "about 10 x lr x gradient; the lr study (sweeps/studies/lr.toml) searches it"),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def optimizer_settings(optimizer: str, lr: float | None) -> dict[str, Any]:
    """The constructor keyword arguments of ``optimizer`` (a name in ``OPTIMIZERS``): ``lr``, its default when None,
    then the choice's fixed options. What a run records as its resolved ``lr`` and ``optimizer_options``.

    Raises:
        PtrayError: an unknown optimizer name.
    """
    if optimizer not in OPTIMIZERS:
        raise PtrayError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {optimizer!r}")
    spec = OPTIMIZERS[optimizer]
    return {"lr": spec.lr if lr is None else lr, **dict(spec.options)}


PRECISIONS = ("auto", "no", "bf16", "fp16")
DEFAULT_GPUS_PER_TRIAL = 0.25  # four trials share a GPU: one bloomz-560m prompt-tuning run leaves most of it idle
# Prompts per trial group on a GPU: 4, so a group gets a whole GPU (4 x DEFAULT_GPUS_PER_TRIAL). An estimate: no
# ptray code has run on a GPU yet, so no group size is measured (BENCHMARKS.md); the GPU benchmark measures groups
# of 1/4/8/16 prompts when a GPU run happens.
DEFAULT_GPU_GROUP_SIZE = 4
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("auto", "eager", "fused")


def resolve_attention(attention: str, device: str) -> str:
    """``TrainConfig.attention`` on a resolved ``device``: auto is fused on CUDA (where SDPA's kernels pay), eager
    on CPU (PyTorch's reference SDPA there is no faster than Hugging Face's eager BLOOM)."""
    if attention == "auto":
        return "fused" if device == "cuda" else "eager"
    return attention


@dataclass
class TrainConfig:
    """Everything that defines one training run. Stored, resolved, with every run's outputs.

    Raises:
        PtrayError: a field is out of range (the message names the field and the value).
    """

    task: str = config_field("cb", f"SuperGLUE task: {', '.join(TASK_NAMES)}")
    seed: int = config_field(0, "seeds the prompt init (random modes), the data order and torch",
                             type=seed_int)
    model: str = config_field(DEFAULT_MODEL, "Hub name or local folder of a causal LM (a study needs the folder on "
                                             "every node)")
    data_dir: str | None = config_field(None, "folder of official SuperGLUE jsonl files, <TASK>/{train,val,test}.jsonl "
                                              "(unset: the Hugging Face Hub; a study ships the folder to every node)")
    hub_dataset: str = config_field(DEFAULT_HUB_DATASET, "Hub dataset read when data_dir is unset")
    max_epochs: int = config_field(50, "epochs at most (the paper's budget)", type=positive_int)
    patience: int = config_field(5, "early stopping: epochs without a better eval loss (the paper's)",
                                 type=positive_int)
    batch_size: int = config_field(8, "training examples per step", type=positive_int)
    eval_batch_size: int = config_field(32, "sequences per evaluation step (each example is scored once per label)",
                                        type=positive_int)
    optimizer: str = config_field(
        "adam", "each prompt's optimizer: adam (the paper's), adamw (weight decay 0.01), adafactor (transformers', "
                "with Lester et al. 2021's prompt-tuning settings) or sgd (momentum 0.9); sources in "
                "ptray.config.OPTIMIZERS", choices=OPTIMIZER_NAMES)
    lr: float | None = config_field(
        None, "learning rate (unset: the optimizer's default: adam 3e-2 and adamw 3e-2, from PEFT's bloomz-560m "
              "prompt-tuning example; adafactor 0.3, Lester et al. 2021; sgd 0.1, ptray's choice); the run records "
              "the resolved value", type=positive_float)
    max_length: int = config_field(512, "tokens of source + answer, prompt not counted; longer sources are truncated",
                                   type=positive_int)
    init: PromptInit = config_field(PromptInit.TEXT, "prompt init: the init text's embeddings (the paper), random "
                                                     "rows, rows of random vocabulary tokens, the embeddings of "
                                                     "the task's answer words (class_labels, Lester et al. 2021), or "
                                                     "a trained prompt's rows (prompt: SPoT, Vu et al. 2021; see "
                                                     "--init-source)")
    init_text: str | None = config_field(None, "init text (unset: the task's init text from the paper)")
    init_source: str | None = config_field(
        None, "init=prompt: the prompt to start from: a run folder or PEFT adapter folder, or in a study a train run "
              "of the same study (e.g. rte-seed0; {seed} stands for the trial's seed); the prompt takes the source's "
              "rows and length (num_tokens set: its first rows, cycled when longer)")
    num_tokens: int | None = config_field(None, "prompt rows (unset: the init text's token count, the paper's choice)",
                                          type=positive_int)
    precision: str = config_field("auto", "mixed precision: auto is bf16 on GPUs that support it, else fp16; "
                                          "fp32 (no) on CPU", choices=PRECISIONS)
    device: str = config_field("auto", "where to run", choices=DEVICES)
    eval_split: str = config_field("val", "split for evaluation and early stopping", choices=("train", "val"))
    max_train_examples: int | None = config_field(None, "keep the first N training examples (unset: all)",
                                                  type=positive_int)
    max_eval_examples: int | None = config_field(None, "keep the first N evaluation examples (unset: all)",
                                                 type=positive_int)
    baselines: bool = config_field(True, "also evaluate no prompt and the init text as a hard prompt",
                                   off_help="skip the no-prompt and init-text baselines")
    compile: bool = config_field(False, "torch.compile each transformer block (regional; see BENCHMARKS.md)")
    attention: str = config_field("auto", "BLOOM's attention: fused (ALiBi as a scaled_dot_product_attention bias, "
                                          "ptray.attention, tested equal to eager) or Hugging Face's eager; auto is "
                                          "fused on CUDA, eager on CPU (other families pick SDPA themselves)",
                                  choices=ATTENTIONS)
    max_tokens_per_forward: int = config_field(
        0, "padded tokens (rows x width) per forward pass of a training step: the step's rows, by length, in passes "
           "of at most this many, widths in multiples of 32 (0: one pass per step; the same numbers)",
        type=non_negative_int, hint="0: one forward pass per step")

    def __post_init__(self):
        check_config(self)  # every field against its declared type, range and choices
        task = get_task(self.task)  # unknown names fail here, listing the valid ones
        if "train" not in task.splits:
            raise PtrayError(f"task {task.name!r} has no training split (its splits: {', '.join(task.splits)}); it "
                             f"can only be a transfer target (a study's --targets)")
        if PromptInit(self.init) is PromptInit.PROMPT and not self.init_source:
            raise PtrayError("init 'prompt' needs --init-source: the trained prompt to start from (a run folder, a "
                             "PEFT adapter folder, or in a study a train run name such as rte-seed0)")
        if self.init_source is not None and PromptInit(self.init) is not PromptInit.PROMPT:
            raise PtrayError(f"--init-source {self.init_source!r} is read only with init 'prompt', not "
                             f"{PromptInit(self.init).value!r}; pass --init prompt or leave --init-source out")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``init`` as its string)."""
        d = dataclasses.asdict(self)
        d["init"] = self.init.value
        return d


@dataclass(frozen=True)
class EvalConfig:
    """How prompts are evaluated on a task's validation split (the transfer grid): the training run's model, data
    and evaluation settings, nothing about training."""

    model: str = config_field(DEFAULT_MODEL, "Hub name or local folder of the model the prompts were trained on")
    data_dir: str | None = config_field(None, "folder of official SuperGLUE jsonl files (unset: the Hub)")
    hub_dataset: str = config_field(DEFAULT_HUB_DATASET, "Hub dataset read when data_dir is unset")
    split: str = config_field("val", "split the prompts are scored on", choices=("train", "val"))
    max_examples: int | None = config_field(None, "keep the first N examples (unset: all)", type=positive_int)
    max_length: int = config_field(512, "tokens of source + answer, prompt not counted", type=positive_int)
    batch_size: int = config_field(32, "sequences per evaluation step", type=positive_int)
    precision: str = config_field("auto", "mixed precision, as TrainConfig.precision", choices=PRECISIONS)
    device: str = config_field("auto", "where to run", choices=DEVICES)
    compile: bool = config_field(False, "torch.compile each transformer block")
    attention: str = config_field("auto", "BLOOM's attention, as TrainConfig.attention", choices=ATTENTIONS)

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> EvalConfig:
        """The evaluation settings of a training config (its model, data, eval examples, length and precision)."""
        return cls(model=cfg.model, data_dir=cfg.data_dir, hub_dataset=cfg.hub_dataset, split=cfg.eval_split,
                   max_examples=cfg.max_eval_examples, max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                   precision=cfg.precision, device=cfg.device, compile=cfg.compile, attention=cfg.attention)


# A trial's task and seed come from the plan's grid; --compile is a run option (Options), free on --resume.
PER_TRIAL_FIELDS = ("task", "seed", "compile")

# The tiny tokenizer spells CB and RTE premises in 200-500 tokens; 128 keeps every smoke batch short.
SMOKE_TRAIN = dict(max_epochs=2, max_train_examples=32, max_eval_examples=32, max_length=128)

# What the prompts of one trial group must agree on (the frozen model and how each step runs it): the training
# loop refuses a group that differs (ptray.training.loop.SHARED_FIELDS, tested equal), the plan groups by them.
GROUP_SHARED_FIELDS = ("model", "precision", "device", "compile", "attention", "max_tokens_per_forward")

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
    NOT_COMPARED = ("study", "train", "model_digest", "model_files", "data_digest", "task_declarations", "declaration")

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
    max_failures: int = config_field(3, "retries of a failed trial, a lost node included", type=non_negative_int)
    compile: bool = config_field(False, "torch.compile each transformer block in the trials (see BENCHMARKS.md)")
    resume: bool = config_field(False, "finish the study named by --study; rerun nothing done")
    dry_run: bool = config_field(False, "print the plan and exit")
    analysis: bool = config_field(True, "run the analysis at the end", off_help="skip the analysis step")
    analysis_dir: str | None = config_field(None, "where the analysis writes its report (unset: its own)")
    local: str | None = config_field(None, "run the whole study in this process on one device (no Ray) into this "
                                           "folder of run folders; published to MLflow at the end when MLflow is "
                                           "installed and the store reachable (later: ptray publish DIR)")

    def __post_init__(self):
        check_config(self)
