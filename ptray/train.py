"""Train one soft prompt on one SuperGLUE task and evaluate it (paper sections 3-5).

    python -m ptray.train --task cb --seed 0 --model PATH_OR_HUB_NAME --data-dir DIR --output-dir OUT

``train(cfg)`` is a plain function: it knows nothing of Ray or MLflow. A caller (the Ray trial) observes it through
``on_epoch_end(metrics, state)`` and resumes it from such a ``state``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ptray
from ptray import layout
from ptray.batching import check_fits, encode_all, pad_token_id, train_batches
from ptray.cli import OneLineParser, add_config_arguments, config_from_args
from ptray.config import TrainConfig, resolve_attention
from ptray.data import load_split
from ptray.errors import PtrayError
from ptray.evaluate import EvalResult, evaluate
from ptray.files import atomic_folder, write_json
from ptray.model import answer_logprobs, library_versions, load_model, model_dtype, resolve_device_precision
from ptray.prompt import SoftPrompt, init_prompt, save_adapter, text_token_ids
from ptray.tasks import get_task

log = logging.getLogger("ptray")


@dataclass
class TrainResult:
    """What ``train`` returns: the best prompt, its metrics, the history, the resolved config and per-example
    results (``save_run`` writes them as a run folder)."""

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
    """Seed Python, NumPy and torch (``seed`` in [0, 2**32 - 1], ``ptray.seeds.check_seed``)."""
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


def setup_model(name_or_path: str, device: str, precision: str, compile: bool = False, attention: str = "eager"):
    """The frozen model on its device, for training and evaluation alike: ``(model, tokenizer, accelerator)``.

    ``device`` and ``precision`` are resolved values (``resolve_device_precision``); weights load in
    ``model_dtype(precision)``; ``attention`` (resolved: eager or fused) "fused" runs BLOOM's attention through
    ``ptray.attention.use_fused_attention`` (other families are left as loaded); ``compile`` compiles each block
    (``compile_blocks``) after that. Raises ``PtrayError`` when the model cannot be loaded.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model, tokenizer = load_model(name_or_path, dtype=model_dtype(precision))
    model.to(accelerator.device)
    if attention == "fused":
        from ptray.attention import use_fused_attention

        use_fused_attention(model)
    if compile:
        compile_blocks(model)
    return model, tokenizer, accelerator


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

    attention = resolve_attention(cfg.attention, device)
    model, tokenizer, accelerator = setup_model(cfg.model, device, precision, cfg.compile, attention)
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    check_fits([task.name], tokenizer, model.config, cfg)  # a max length that cannot serve: refused before any work

    train_data = encode_all(task, train_examples, tokenizer, cfg.max_length)
    eval_data = encode_all(task, eval_examples, tokenizer, cfg.max_length)
    init_text = cfg.init_text if cfg.init_text is not None else task.init_text
    embedding = model.get_input_embeddings().weight
    # the module, not its rows: TEXT init must include any embedding scale (Gemma2), as the model's own input does
    prompt = SoftPrompt(init_prompt(model.get_input_embeddings(), tokenizer, cfg.init, init_text, cfg.num_tokens,
                                    cfg.seed))
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    prompt, optimizer = accelerator.prepare(prompt, optimizer)

    resolved = {
        **cfg.to_dict(),
        "init_text": init_text,
        "num_tokens": prompt.num_tokens,
        "hidden_size": embedding.shape[1],
        "template_version": task.version,
        "verbalizer": dict(task.verbalizer),
        "device": device,
        "precision": precision,
        "attention": attention,
        "code_version": code_version(),
        **library_versions(),  # torch_version, transformers_version, peft_version, accelerate_version
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
    eval_idx = [d.idx for d in eval_data if d.label is not None]
    return TrainResult(best["prompt"], final, history, resolved, evals, eval_idx)


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
    ``predictions.json`` follows ``layout.predictions`` (the prompt's lists, the baselines' under ``baselines``).
    Returns the folder; raises ``PtrayError`` when ``out_dir`` holds another run and ``overwrite`` is False.
    """
    out = check_output_dir(out_dir, overwrite)
    with atomic_folder(out) as tmp:
        save_adapter(result.prompt, tmp / layout.PROMPT_DIR, result.resolved["model"], result.resolved["init_text"],
                     result.resolved["init"])
        write_json(tmp / layout.METRICS_FILE, result.metrics)
        write_json(tmp / layout.HISTORY_FILE, result.history)
        write_json(tmp / layout.CONFIG_FILE, result.resolved)
        baselines = {name: res for name, res in result.evals.items() if name != "prompt"}
        write_json(tmp / layout.PREDICTIONS_FILE, layout.predictions(result.eval_idx, result.evals["prompt"],
                                                                     baselines))
    return out


def build_parser() -> argparse.ArgumentParser:
    """``python -m ptray.train``'s flags: one per ``TrainConfig`` field, plus the output folder."""
    p = OneLineParser(prog="python -m ptray.train", description="Train and evaluate one soft prompt.")
    add_config_arguments(p, TrainConfig, required=("task", "seed"))
    p.add_argument("--output-dir", required=True, help="folder to write the run to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train one prompt and write its run folder; returns the exit code (2 with one line on bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = config_from_args(TrainConfig, args)
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
