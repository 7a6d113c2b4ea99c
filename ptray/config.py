"""Every config, declared once: each field carries its default and one-line help, from which the command lines
(``python -m ptray.train``, ``sweeps/all.py``) are built (``ptray.cli.add_config_arguments``).

- ``TrainConfig``: one training run (``ptray.training.train.train``).
- ``EvalConfig``: evaluating prompts on a task's validation split (the transfer grid).
- ``PromptInit`` and the optimizer choices (``OPTIMIZERS``), with their sources.

A study's ``Plan`` and ``Options`` are ``ptray.plan``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ptray.cli import (
    check_config,
    config_field,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from ptray.data.superglue import DEFAULT_HUB_DATASET
from ptray.data.tasks import TASK_NAMES, get_task
from ptray.errors import PtrayError

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
    on CPU (Hugging Face's eager attention, every family: faster there than SDPA's CPU kernels for short
    sequences, BENCHMARKS.md)."""
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
              "of the same study (e.g. rte-seed0; {seed} stands for the trial's seed) or of another study of its "
              "experiment (STUDY/RUN, e.g. spot-sources/rte-seed0); the prompt takes the source's rows and length "
              "(num_tokens set: its first rows, cycled when longer)")
    num_tokens: int | None = config_field(None, "prompt rows (unset: the init text's token count, the paper's choice)",
                                          type=positive_int)
    precision: str = config_field("auto", "mixed precision: auto is bf16 on GPUs that support it, else fp16; "
                                          "on CPU bf16 where the CPU has native bf16 (AVX512-BF16 or AMX), else fp32 "
                                          "(no); the prompt and its optimizer state stay fp32", choices=PRECISIONS)
    device: str = config_field("auto", "where to run", choices=DEVICES)
    eval_split: str = config_field("val", "split for evaluation and early stopping", choices=("train", "val"))
    max_train_examples: int | None = config_field(None, "keep the first N training examples (unset: all)",
                                                  type=positive_int)
    max_eval_examples: int | None = config_field(None, "keep the first N evaluation examples (unset: all)",
                                                 type=positive_int)
    baselines: bool = config_field(True, "also evaluate no prompt and the init text as a hard prompt",
                                   off_help="skip the no-prompt and init-text baselines")
    compile: bool = config_field(False, "torch.compile each transformer block (regional; see BENCHMARKS.md)")
    attention: str = config_field("auto", "attention: fused (BLOOM: ALiBi as a scaled_dot_product_attention bias, "
                                          "ptray.attention, tested equal to eager; other families: the attention "
                                          "Hugging Face picks, SDPA where it can) or eager (Hugging Face's eager "
                                          "attention, every family); auto is fused on CUDA, eager on CPU (faster "
                                          "there for short sequences, BENCHMARKS.md)",
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
    attention: str = config_field("auto", "attention, as TrainConfig.attention", choices=ATTENTIONS)

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> EvalConfig:
        """The evaluation settings of a training config (its model, data, eval examples, length and precision)."""
        return cls(model=cfg.model, data_dir=cfg.data_dir, hub_dataset=cfg.hub_dataset, split=cfg.eval_split,
                   max_examples=cfg.max_eval_examples, max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                   precision=cfg.precision, device=cfg.device, compile=cfg.compile, attention=cfg.attention)

# What the prompts of one trial group must agree on (the frozen model and how each step runs it): the training
# loop refuses a group that differs, the plan (ptray.plan.Plan.groups) groups by them.
GROUP_SHARED_FIELDS = ("model", "precision", "device", "compile", "attention", "max_tokens_per_forward")
