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
    """How the prompt rows start: the init text's token embeddings (the paper), random, random vocab rows, or the
    embeddings of the task's answer words (Lester et al. 2021's class-label init)."""

    TEXT = "text"
    RANDOM = "random"
    SAMPLE_VOCAB = "sample_vocab"
    CLASS_LABELS = "class_labels"


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
                                                     "rows, rows of random vocabulary tokens, or the embeddings of "
                                                     "the task's answer words (class_labels, Lester et al. 2021)")
    init_text: str | None = config_field(None, "init text (unset: the task's init text from the paper)")
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
        get_task(self.task)  # unknown names fail here, listing the valid ones

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


@dataclass
class Plan:
    """What defines a study. Stored in the study's MLflow experiment; ``--resume`` continues exactly this."""

    study: str = config_field("paper", "study id, the tag ptray.study on every run", cli=False)
    tasks: tuple[str, ...] = config_field(TASK_NAMES, "comma-separated tasks to train (and the transfer targets)")
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
    model_digest: str | None = config_field(None, "of the files of a model built on the fly", cli=False)
    data_digest: str | None = config_field(None, "of the data files read from data_dir", cli=False)

    # Fields that are not part of what --resume compares with the command line (the digests are checked
    # against the files themselves).
    NOT_COMPARED = ("study", "train", "model_digest", "data_digest")

    def __post_init__(self):
        for seed in self.seeds:  # here, not in each trial: also a stored plan, before --resume starts anything
            check_seed(seed, "every seed of a study")
        check_config(self)

    def to_json(self) -> dict[str, Any]:
        """The plan as stored in MLflow: plain JSON values, the train config without its per-trial fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        d["tasks"], d["seeds"] = list(self.tasks), list(self.seeds)
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
    def trials(self) -> list[tuple[str, int]]:
        """(task, seed) of every trial, task-major."""
        return [(t, s) for t in self.tasks for s in self.seeds]

    def groups(self, size: int | None = None) -> list[tuple[tuple[str, int], ...]]:
        """The (task, seed) prompts packed into Tune trials of ``size`` (default ``group_size``, which must then be
        resolved): consecutive trials of the task-major order, so a group mostly holds one task's seeds, whose
        epochs are equally long and whose rows equally wide (no member waits for, or pads to, another task's)."""
        size = size or self.group_size
        if not size:
            raise PtrayError("the plan's group_size is not resolved yet (1 on CPUs, more with GPUs); pass a size")
        trials = self.trials
        return [tuple(trials[i:i + size]) for i in range(0, len(trials), size)]

    @property
    def num_evaluations(self) -> int:
        """Transfer runs (every prompt on every task) plus one no-prompt baseline per task."""
        return len(self.trials) * len(self.tasks) + len(self.tasks)




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

    def __post_init__(self):
        check_config(self)
