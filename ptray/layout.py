"""The contract between what a study writes to MLflow and what reads it back (docs/tracking.md).

Every tag name, run kind, run name, artifact file name and JSON key that a writer (``ptray.study.trial``,
``ptray.study.transfer``, ``ptray.training.run_folder.save_run``) and a reader (``analysis.mlflow_io``, the sweep's
summary, the tests) share is spelled here and nowhere else. This module imports no MLflow: it is plain names and
pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ------------------------------------------------------------------------------------------------------- tags
TAG_PREFIX = "ptray."
TAG_STUDY = TAG_PREFIX + "study"
TAG_KIND = TAG_PREFIX + "kind"
TAG_TASK = TAG_PREFIX + "task"
TAG_SEED = TAG_PREFIX + "seed"
TAG_SOURCE = TAG_PREFIX + "source"
TAG_TARGET = TAG_PREFIX + "target"
TAG_NODE = TAG_PREFIX + "node"  # host name of the last node that ran a train run
TAG_RAY_NODE_ID = TAG_PREFIX + "ray_node_id"
TAG_RESUMED_AFTER_EPOCH = TAG_PREFIX + "resumed_after_epoch"
TAG_REPLACES = TAG_PREFIX + "replaces"  # id of the run this one replaced (see tracking.sync_history)
# A study with conditions (ptray.study.declared): the condition of a train run, and of a transfer run's source prompt.
TAG_CONDITION = TAG_PREFIX + "condition"
# A train run stopped early by a Tune scheduler (ASHA, median stopping): the scheduler's name; the run is KILLED.
TAG_STOPPED_BY = TAG_PREFIX + "stopped_by"
# A train run whose prompt started from another trained prompt (SPoT): that prompt's train run name (STUDY/RUN for a
# run of another study of the experiment).
TAG_INIT_FROM = TAG_PREFIX + "init_from"
# Experiment tag holding a study's plan (JSON), so ``--resume`` continues exactly the study that was started.
PLAN_TAG_PREFIX = TAG_PREFIX + "plan."
# Experiment tag held while a driver runs the study (``ptray.study.lease``): who runs it and when it last said so.
LEASE_TAG_PREFIX = TAG_PREFIX + "running."

# ------------------------------------------------------------------------------------------------------ kinds
TRAIN = "train"
TRANSFER = "transfer"
BASELINE = "baseline"
ANALYSIS = "analysis"
KINDS = (TRAIN, TRANSFER, BASELINE, ANALYSIS)
EVAL_KINDS = (TRANSFER, BASELINE)
NO_SOURCE = "none"  # the source of a baseline run (no prompt)

# MLflow run statuses ptray sets and reads.
RUNNING = "RUNNING"
FINISHED = "FINISHED"
FAILED = "FAILED"
KILLED = "KILLED"  # stopped before its end on purpose: by a scheduler, or replaced on --resume

# ---------------------------------------------------------------------------------------------------- metrics
# Final metrics of a train run carry this prefix: the unprefixed names hold the per-epoch history (step = epoch),
# and a second "exact_match" at some step would read as one more epoch.
FINAL_PREFIX = "final_"
HISTORY_KEY = "eval_loss"  # logged once per epoch, in the same batch as every other per-epoch metric

# -------------------------------------------------------------------------------------------------- artifacts
PROMPT_DIR = "prompt"  # a PEFT prompt-tuning adapter folder (ptray.lm.prompt.save_adapter writes it):
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"  # one fp32 tensor "prompt_embeddings" [n, embed_dim]
PROMPT_FILES = (f"{PROMPT_DIR}/{PEFT_CONFIG}", f"{PROMPT_DIR}/{PEFT_WEIGHTS}")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
PREDICTIONS_FILE = "predictions.json"
TRAIN_FILES = (CONFIG_FILE, HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE, PROMPT_DIR)  # what save_run writes

# predictions.json (one schema for train and evaluation runs): per labeled validation example, in one order.
IDX = "idx"
EM_CORRECT = "em_correct"
RANK_CORRECT = "rank_correct"
RANK_PRED = "rank_pred"
PREDICTION_LISTS = (EM_CORRECT, RANK_CORRECT, RANK_PRED)
BASELINES = "baselines"  # train runs only: the same lists for each baseline ("no_prompt", "init_text")

# metrics.json of a transfer or baseline run.
EVAL_METRIC_KEYS = ("source", "source_seed", "target", "exact_match", "rank_accuracy", "eval_loss", "num_examples",
                    "no_prompt_exact_match", "no_prompt_rank_accuracy", "delta_exact_match", "delta_rank_accuracy")


# -------------------------------------------------------------------------------------------------- run names
def train_run_name(task: str, seed: int, condition: str | None = None) -> str:
    """Run name of the trial that trains ``task`` with ``seed``, e.g. ``cb-seed0``; in a study with conditions,
    ``cb-seed0-random`` (condition ``random``)."""
    return f"{task}-seed{seed}" + (f"-{condition}" if condition else "")


def transfer_run_name(source: str, seed: int, target: str, condition: str | None = None) -> str:
    """Run name of a source prompt evaluated on a target task, e.g. ``transfer-rte-seed1-on-wsc``; with the source
    prompt's condition, ``transfer-rte-seed1-random-on-wsc``."""
    return f"transfer-{train_run_name(source, seed, condition)}-on-{target}"


def baseline_run_name(target: str) -> str:
    """Run name of the no-prompt evaluation of ``target``, e.g. ``baseline-none-on-wsc``."""
    return f"baseline-{NO_SOURCE}-on-{target}"


ANALYSIS_RUN_NAME = ANALYSIS


def run_tags(study: str, kind: str, task: str | None = None, seed: int | None = None, source: str | None = None,
             target: str | None = None, condition: str | None = None) -> dict[str, str]:
    """The ``ptray.*`` tags of one run; ``task`` defaults to the target for transfer and baseline runs;
    ``condition`` (train and transfer runs of a study with conditions) is tagged when given.

    Raises:
        ValueError: ``kind`` is not one of ``KINDS``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tags = {TAG_STUDY: study, TAG_KIND: kind}
    if kind in EVAL_KINDS:
        task = task or target
        tags[TAG_TARGET] = str(target)
        tags[TAG_SOURCE] = NO_SOURCE if kind == BASELINE else str(source)
    if task is not None:
        tags[TAG_TASK] = str(task)
    if seed is not None and kind in (TRAIN, TRANSFER):
        tags[TAG_SEED] = str(seed)
    if condition and kind in (TRAIN, TRANSFER):
        tags[TAG_CONDITION] = str(condition)
    return tags


def eval_run(study: str, source: str | None, seed: int | None, target: str,
             condition: str | None = None) -> tuple[str, str, dict[str, str]]:
    """``(kind, run name, tags)`` of an evaluation on ``target``: a baseline (``source`` None) or a transfer run of
    ``source``'s prompt (``seed``, ``condition``): one spelling for the Ray study's transfer grid and the local
    study."""
    if source is None:
        return BASELINE, baseline_run_name(target), run_tags(study, BASELINE, target=target)
    return TRANSFER, transfer_run_name(source, seed, target, condition), run_tags(
        study, TRANSFER, seed=seed, source=source, target=target, condition=condition)


def run_key(tags: dict[str, str]) -> tuple[str | None, ...]:
    """What identifies a run within a study, from its tags: (kind, task, seed, source, target, condition)."""
    return tuple(tags.get(t) for t in (TAG_KIND, TAG_TASK, TAG_SEED, TAG_SOURCE, TAG_TARGET, TAG_CONDITION))


# ----------------------------------------------------------------------------------------------- JSON content
def predictions(idx: Sequence[int], result: Any, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``predictions.json`` of one run.

    Args:
        idx: the example ``idx`` of each labeled validation example, in evaluation order (length E).
        result: an ``EvalResult`` (lists ``em_correct``, ``rank_correct``, ``rank_pred`` of length E).
        baselines: train runs: ``{"no_prompt": EvalResult, "init_text": EvalResult}`` on the same examples.

    Returns:
        ``{"idx": [E], "em_correct": [E] 0/1, "rank_correct": [E] 0/1, "rank_pred": [E] label index}``, plus
        ``"baselines": {name: {the same three lists}}`` when ``baselines`` is given.
    """
    out: dict[str, Any] = {IDX: list(idx), **_lists(result)}
    if baselines:
        out[BASELINES] = {name: _lists(res) for name, res in baselines.items()}
    return out


def _lists(result: Any) -> dict[str, list[int]]:
    return {key: list(getattr(result, key)) for key in PREDICTION_LISTS}


def prediction_lists(preds: dict[str, Any], baseline: str | None = None) -> tuple[list[int], list[int], list[int]]:
    """``(idx, em_correct, rank_correct)`` from a ``predictions.json`` (empty lists where it has none).

    ``baseline`` picks a train run's baseline ("no_prompt", "init_text") instead of the run's own prompt.
    """
    lists = preds if baseline is None else preds.get(BASELINES, {}).get(baseline, {})
    return ([int(i) for i in preds.get(IDX, [])], list(lists.get(EM_CORRECT, [])),
            list(lists.get(RANK_CORRECT, [])))


def logged_metrics(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a finished run from its ``metrics.json``: a train run's final metrics get
    ``FINAL_PREFIX`` (its unprefixed names hold the per-epoch history), without task and seed; an evaluation's
    metrics as they are, without ``source_seed``; text and None values are no metrics."""
    if kind == TRAIN:
        pairs = ((FINAL_PREFIX + k, v) for k, v in metrics.items() if k not in ("task", "seed"))
    else:
        pairs = ((k, v) for k, v in metrics.items() if k != "source_seed")
    return {k: v for k, v in pairs if isinstance(v, (int, float))}


def eval_metrics(source: str | None, seed: int | None, target: str, result: Any,
                 no_prompt: dict[str, float]) -> dict[str, Any]:
    """The ``metrics.json`` of a transfer (``source`` given) or baseline (``source`` None) run.

    ``result`` is the ``EvalResult`` on ``target``; ``no_prompt`` holds the target's no-prompt ``exact_match`` and
    ``rank_accuracy`` (fractions in [0, 1]); the deltas are against it. Keys: ``EVAL_METRIC_KEYS``.
    """
    return {
        "source": source if source is not None else NO_SOURCE,
        "source_seed": seed,
        "target": target,
        "exact_match": result.exact_match,
        "rank_accuracy": result.rank_accuracy,
        "eval_loss": result.loss,
        "num_examples": result.num_examples,
        "no_prompt_exact_match": no_prompt["exact_match"],
        "no_prompt_rank_accuracy": no_prompt["rank_accuracy"],
        "delta_exact_match": result.exact_match - no_prompt["exact_match"],
        "delta_rank_accuracy": result.rank_accuracy - no_prompt["rank_accuracy"],
    }
