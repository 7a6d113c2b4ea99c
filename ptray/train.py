"""Train one soft prompt on one SuperGLUE task and evaluate it (paper sections 3-5).

    python -m ptray.train --task cb --seed 0 --model PATH_OR_HUB_NAME --data-dir DIR --output-dir OUT

``train(cfg)`` is a plain function: it knows nothing of Ray or MLflow. A caller (the Ray trial) observes it through
``on_epoch_end(metrics, state)`` and resumes it from such a ``state``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import ptray
from ptray.batching import check_positions, encode_all, train_batches
from ptray.cli import OneLineParser, positive_float, positive_int, seed_int
from ptray.data import DEFAULT_HUB_DATASET, SPLITS, load_split
from ptray.errors import PtrayError
from ptray.evaluate import EvalResult, evaluate
from ptray.model import DEFAULT_MODEL, answer_logprobs, load_model, model_dtype, resolve_device_precision
from ptray.prompt import PromptInit, SoftPrompt, init_prompt, save_adapter, text_token_ids
from ptray.seeds import check_seed
from ptray.tasks import get_task

log = logging.getLogger("ptray")

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that defines one training run. Stored, resolved, with every run's outputs."""

    task: str = "cb"  # one of ptray.tasks.TASK_NAMES
    seed: int = 0  # seeds the prompt init (random modes), data order and torch
    model: str = DEFAULT_MODEL  # Hub name or local folder of a causal LM
    data_dir: str | None = None  # official SuperGLUE jsonl layout; None reads the Hub
    hub_dataset: str = DEFAULT_HUB_DATASET  # Hub dataset id used when data_dir is None
    max_epochs: int = 50  # the paper trains up to 50 epochs
    patience: int = 5  # early stopping on eval loss, the paper's patience
    batch_size: int = 8  # training examples per step
    eval_batch_size: int = 32  # sequences per evaluation step (each example is scored once per label)
    lr: float = 3e-2  # Adam learning rate (PEFT's bloomz-560m prompt-tuning example uses 3e-2)
    max_length: int = 512  # tokens of source + answer, prompt not counted; longer examples are truncated
    init: PromptInit = PromptInit.TEXT  # text (the paper), random or sample_vocab
    init_text: str | None = None  # None: the task's init text from the paper
    num_tokens: int | None = None  # None: the init text's token count (the paper's choice)
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp16; fp32 ("no") on CPU
    device: str = "auto"  # auto, cpu or cuda
    eval_split: str = "val"  # split for evaluation and early stopping
    max_train_examples: int | None = None  # keep the first N training examples (smoke runs)
    max_eval_examples: int | None = None  # keep the first N evaluation examples (smoke runs)
    baselines: bool = True  # also evaluate no prompt and the init text as a hard prompt
    compile: bool = False  # torch.compile each transformer block (regional; BENCHMARKS.md: 1.2x on CPU after
    # ~20 s of compiling, GPU unmeasured)

    def __post_init__(self):
        try:
            self.init = PromptInit(self.init)
        except ValueError:
            _bad(f"init must be one of {[i.value for i in PromptInit]}, got {self.init!r}")
        for name in ("max_epochs", "patience", "batch_size", "eval_batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _bad(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            _bad(f"lr must be a positive number, got {self.lr!r}")
        for name in ("num_tokens", "max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                _bad(f"{name} must be a positive integer or unset, got {value!r}")
        if self.precision not in PRECISIONS:
            _bad(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            _bad(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.eval_split not in SPLITS or self.eval_split == "test":
            _bad(f"eval_split must be train or val (test has no labels), got {self.eval_split!r}")
        get_task(self.task)  # unknown names fail here, listing the valid ones
        check_seed(self.seed)  # here, not as an overflow in the data order after the baselines ran

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["init"] = self.init.value
        return d


def _bad(message: str):
    raise PtrayError(message)


@dataclass
class TrainResult:
    prompt: torch.Tensor  # best prompt rows [n, hidden], fp32, CPU
    metrics: dict[str, Any]  # final metrics (see ``metrics.json``)
    history: list[dict[str, Any]]  # per-epoch metrics
    resolved: dict[str, Any]  # the fully resolved config
    evals: dict[str, EvalResult] = field(default_factory=dict)  # "prompt", "no_prompt", "init_text"
    eval_idx: list[int] = field(default_factory=list)  # example idx for the per-example lists in ``evals``


def code_version() -> str:
    """ptray's version, plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{ptray.__version__}+{sha}" if sha else ptray.__version__


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_blocks(model) -> None:
    """``torch.compile`` each transformer block in place (regional compilation: the identical blocks share one
    compiled graph, so compiling takes seconds, not minutes); dynamic shapes, as batch lengths vary."""
    blocks = getattr(model.base_model, "h", None) or getattr(model.base_model, "layers", None)
    if blocks is None:
        raise PtrayError(f"--compile does not know where {type(model).__name__}'s transformer blocks are "
                         f"(base_model.h or base_model.layers); run without --compile")
    for block in blocks:
        block.compile(dynamic=True)


def train(
    cfg: TrainConfig,
    on_epoch_end: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg.task``'s soft prompt; early-stop on eval loss; return the best prompt and its metrics.

    ``on_epoch_end(metrics, state)`` is called after every epoch; ``state`` (tensors and plain values, loadable with
    ``torch.load(weights_only=True)``) passed back as ``resume`` continues the run after that epoch.
    """
    task = get_task(cfg.task)
    train_examples = load_split(task, "train", cfg.data_dir, cfg.hub_dataset, cfg.max_train_examples)
    eval_examples = load_split(task, cfg.eval_split, cfg.data_dir, cfg.hub_dataset, cfg.max_eval_examples)
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    set_seed(cfg.seed)

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model, tokenizer = load_model(cfg.model, dtype=model_dtype(precision))
    model.to(accelerator.device)
    if cfg.compile:
        compile_blocks(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id

    train_data = encode_all(task, train_examples, tokenizer, cfg.max_length)
    eval_data = encode_all(task, eval_examples, tokenizer, cfg.max_length)
    init_text = cfg.init_text if cfg.init_text is not None else task.init_text
    embedding = model.get_input_embeddings().weight
    prompt = SoftPrompt(init_prompt(embedding, tokenizer, cfg.init, init_text, cfg.num_tokens, cfg.seed))
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    prompt, optimizer = accelerator.prepare(prompt, optimizer)
    check_positions(model.config, prompt.num_tokens, cfg.max_length)  # before the baselines and training

    resolved = {
        **cfg.to_dict(),
        "init_text": init_text,
        "num_tokens": prompt.num_tokens,
        "hidden_size": embedding.shape[1],
        "template_version": task.version,
        "verbalizer": dict(task.verbalizer),
        "device": device,
        "precision": precision,
        "code_version": code_version(),
        "num_train_examples": len(train_data),
        "num_eval_examples": len(eval_data),
        "num_truncated": sum(d.truncated for d in train_data + eval_data),
    }

    def run_eval(weight):
        return evaluate(model, eval_data, weight, cfg.eval_batch_size, pad_id, eos_id,
                        device=accelerator.device, autocast=accelerator.autocast)

    baselines: dict[str, EvalResult] = {}
    if resume is not None:
        prompt.weight.data.copy_(resume["prompt"].to(prompt.weight.device))
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        best = dict(resume["best"])
        history = list(resume["history"])
        start_epoch = resume["epoch"] + 1
        baselines = {k: EvalResult(**v) for k, v in resume.get("baselines", {}).items()}
        log.info("resuming %s seed %d after epoch %d", task.name, cfg.seed, resume["epoch"])
    else:
        best = {"eval_loss": math.inf, "epoch": 0, "prompt": prompt.weight.detach().cpu().clone(), "bad_epochs": 0}
        history = []
        start_epoch = 1
    if cfg.baselines and not baselines:
        hard = embedding[torch.tensor(text_token_ids(tokenizer, init_text), device=embedding.device)]
        baselines = {"no_prompt": run_eval(None), "init_text": run_eval(hard)}
        for name, res in baselines.items():
            log.info("baseline %-9s eval_loss %.4f exact_match %.4f rank_accuracy %.4f",
                     name, res.loss, res.exact_match, res.rank_accuracy)

    best_eval: EvalResult | None = None
    for epoch in range(start_epoch, cfg.max_epochs + 1):
        if best["bad_epochs"] >= cfg.patience:
            break
        t0 = time.perf_counter()
        batches = train_batches(train_data, cfg.batch_size, cfg.seed, epoch, pad_id, eos_id)
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = 0
        for step, batch in enumerate(batches, start=1):
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                logp, _ = answer_logprobs(model, batch, prompt.weight)
                loss = -logp.mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            tokens += int(batch.attention_mask.sum())
            if (step % 20 == 0 or step == len(batches)) and not torch.isfinite(loss_sum):
                raise PtrayError(
                    f"the training loss became {loss_sum.item()} at epoch {epoch}, step {step} ({task.name}, seed "
                    f"{cfg.seed}); lower --lr (now {cfg.lr}) or use a more stable precision (--precision bf16/no)"
                )
        train_time = time.perf_counter() - t0
        result = run_eval(prompt.weight.detach())
        improved = result.loss < best["eval_loss"]
        if improved:
            best = {"eval_loss": result.loss, "epoch": epoch, "prompt": prompt.weight.detach().cpu().clone(),
                    "bad_epochs": 0}
            best_eval = result
        else:
            best["bad_epochs"] += 1
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / len(batches),
            **result.metrics(),
            "best_eval_loss": best["eval_loss"],
            "best_epoch": best["epoch"],
            "train_tokens_per_s": tokens / train_time,
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(metrics)
        log.info("epoch %d/%d train_loss %.4f eval_loss %.4f exact_match %.4f rank_accuracy %.4f%s (%.1fs)",
                 epoch, cfg.max_epochs, metrics["train_loss"], result.loss, result.exact_match,
                 result.rank_accuracy, " *" if improved else "", metrics["epoch_seconds"])
        if on_epoch_end is not None:
            # A snapshot: the optimizer's state tensors, ``best`` and ``history`` change in place next epoch.
            state = copy.deepcopy({
                "epoch": epoch,
                "prompt": prompt.weight.detach().cpu(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "best": best,
                "history": history,
                "baselines": {k: dataclasses.asdict(v) for k, v in baselines.items()},
            })
            on_epoch_end(metrics, state)

    if best_eval is None:  # resumed after the best epoch: evaluate the restored best prompt again
        best_eval = run_eval(best["prompt"])
    final = {
        "task": task.name,
        "seed": cfg.seed,
        **best_eval.metrics(),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.max_epochs,
        "num_tokens": int(best["prompt"].shape[0]),
        "num_eval_examples": best_eval.num_examples,
    }
    for name, res in baselines.items():
        final.update({f"{name}_{k}": v for k, v in res.metrics().items()})
    evals = {"prompt": best_eval, **baselines}
    return TrainResult(best["prompt"], final, history, resolved, evals, [d.idx for d in eval_data if d.label is not None])


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that already holds something, unless ``overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise PtrayError(f"output path {str(out)!r} exists and is not a folder; choose another --output-dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PtrayError(
            f"output folder {str(out)!r} already holds another run; choose a new --output-dir or pass --overwrite"
        )
    return out


def save_run(result: TrainResult, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write prompt/ (PEFT adapter), metrics.json, history.json, predictions.json and config.json atomically.

    Files go to a sibling temp folder renamed into place at the end, so a failure never leaves a half-written run.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_adapter(result.prompt, tmp / "prompt", result.resolved["model"], result.resolved["init_text"],
                     result.resolved["init"])
        _write_json(tmp / "metrics.json", result.metrics)
        _write_json(tmp / "history.json", result.history)
        _write_json(tmp / "config.json", result.resolved)
        _write_json(tmp / "predictions.json", {
            "idx": result.eval_idx,
            **{f"{name}_{key}": getattr(res, key) for name, res in result.evals.items()
               for key in ("em_correct", "rank_correct", "rank_pred")},
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(prog="python -m ptray.train", description="Train and evaluate one soft prompt.")
    p.add_argument("--task", required=True, help="cb, rte, copa or wsc")
    p.add_argument("--seed", type=seed_int, required=True, help="random seed, 0 to 2**32 - 1")
    p.add_argument("--model", default=d.model, help=f"Hub name or local folder (default {d.model})")
    p.add_argument("--data-dir", default=None, help="folder with <TASK>/{train,val,test}.jsonl; default: the Hub")
    p.add_argument("--output-dir", required=True, help="folder to write the run to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument("--max-epochs", type=positive_int, default=d.max_epochs, help="epochs at most (default 50)")
    p.add_argument("--patience", type=positive_int, default=d.patience, help="early-stopping patience (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="training batch size")
    p.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size, help="eval sequences/step")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--max-length", type=positive_int, default=d.max_length, help="max source+answer tokens")
    p.add_argument("--init", default=d.init.value, choices=[i.value for i in PromptInit], help="prompt init")
    p.add_argument("--num-tokens", type=positive_int, default=None, help="prompt rows (default: init text length)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="mixed precision")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--max-train-examples", type=positive_int, default=None, help="use the first N train examples")
    p.add_argument("--max-eval-examples", type=positive_int, default=None, help="use the first N eval examples")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (see BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = TrainConfig(
            task=args.task, seed=args.seed, model=args.model, data_dir=args.data_dir, max_epochs=args.max_epochs,
            patience=args.patience, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
            max_length=args.max_length, init=args.init, num_tokens=args.num_tokens, precision=args.precision,
            device=args.device, max_train_examples=args.max_train_examples,
            max_eval_examples=args.max_eval_examples, compile=args.compile,
        )
        check_output_dir(args.output_dir, args.overwrite)  # before hours of training, not after
        result = train(cfg)
        out = save_run(result, args.output_dir, overwrite=args.overwrite)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"done: {m['task']} seed {m['seed']}: exact_match {m['exact_match']:.4f} rank_accuracy "
          f"{m['rank_accuracy']:.4f} eval_loss {m['eval_loss']:.4f} (best epoch {m['best_epoch']} of "
          f"{m['epochs_run']}); no prompt exact_match {m.get('no_prompt_exact_match', float('nan')):.4f}, "
          f"init text exact_match {m.get('init_text_exact_match', float('nan')):.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
