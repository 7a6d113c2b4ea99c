"""Trial groups: train K soft prompts on one frozen model, every step carrying rows of every prompt.

A single trial (``ptray.training.train``) leaves most of a GPU idle: one prompt's batch of 8 is far too small for the
model. A group trains K prompts (any tasks, seeds, learning rates, batch sizes, patiences) in one process on one
copy of the frozen model. Each step concatenates one batch of every prompt still training, each row with its own
prompt prepended, and runs the model once. Each prompt keeps everything a single trial has:

- its data order: the batches ``train_batches`` gives its own (seed, epoch), in the same order;
- its loss: the group's loss is the sum of each prompt's own batch mean, so (rows never attend to each other and
  the model is frozen) each prompt's gradient is exactly its single-trial gradient;
- its optimizer: one per prompt (``TrainConfig.optimizer``, its own lr), stepped in the same step; under fp16
  one gradient scaler unscales each and updates once per step (``torch.amp.GradScaler``'s many-optimizer use);
- its epochs: a prompt's epoch ends when its own batches run out (tasks have different sizes); it is then
  evaluated, early stopping and the best prompt are tracked as in a single trial, and ``on_epoch_end`` gets the
  same metrics and resumable state ``train`` gives;
- its end: a prompt that stops (patience or max epochs) leaves the group; the others go on.

This is ptray's one training loop: a single trial, ``ptray.training.train.train(cfg)``, is ``train_group([cfg])``.

``tests/test_group.py`` checks a group of prompts of different tasks and seeds against single trials: per-epoch
losses, gradients and final prompts within fp32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ptray.config import GROUP_SHARED_FIELDS, TrainConfig, resolve_attention
from ptray.data.batching import check_fits, stage, train_batches
from ptray.data.tasks import get_task
from ptray.data.tokens import pad_token_id, special_prefix, token_ids
from ptray.errors import PtrayError
from ptray.lm import families
from ptray.lm.attention import attention_implementation
from ptray.lm.evaluate import EvalResult, encoded_split, evaluate, evaluate_together
from ptray.lm.forward import group_answer_logprobs
from ptray.lm.load import resolve_device_precision, setup_model
from ptray.lm.prompt import init_prompt, source_prompt
from ptray.lm.special import end_ids
from ptray.seeds import set_seed
from ptray.training.optimizers import (
    make_optimizer,  # noqa: F401 - its old home: callers import it from here
    optimizer_state,
    prompt_optimizer,
    step_all,
)
from ptray.versions import code_version, compute_settings, library_versions

log = logging.getLogger("ptray")


@dataclasses.dataclass
class TrainResult:
    """What ``train`` (and each prompt of ``train_group``) returns: the best prompt, its metrics, the history, the
    resolved config and per-example results (``ptray.training.run_folder.save_run`` writes them as a run folder)."""

    prompt: torch.Tensor  # best prompt rows [n, embed_dim], fp32, CPU
    metrics: dict[str, Any]  # final metrics (see ``metrics.json``)
    history: list[dict[str, Any]]  # per-epoch metrics
    resolved: dict[str, Any]  # the fully resolved config
    evals: dict[str, EvalResult] = dataclasses.field(default_factory=dict)  # "prompt", "no_prompt", "init_text"
    eval_idx: list[int] = dataclasses.field(default_factory=list)  # example idx of the per-example lists in ``evals``


@dataclasses.dataclass
class _Member:
    """One prompt of the group and its single-trial state."""

    index: int
    cfg: TrainConfig
    weight: torch.nn.Parameter
    train_data: list
    eval_data: list
    resolved: dict
    init_text: str
    baselines: dict
    best: dict
    history: list
    epoch: int  # the epoch now running (or about to start)
    batches: list | None = None  # this epoch's, on the device
    step: int = 0
    loss_sum: torch.Tensor | None = None
    tokens: int = 0  # real tokens trained on this epoch (counted on the host)
    t0: float = 0.0
    train_time: float = 0.0  # seconds of this epoch's training, evaluation excluded
    best_eval: EvalResult | None = None
    result: TrainResult | None = None
    optimizer: torch.optim.Optimizer | None = None  # its own (``prompt_optimizer``), once every member is set up


def _check_group(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise PtrayError("a trial group needs at least one TrainConfig")
    for name in GROUP_SHARED_FIELDS:
        values = {getattr(c, name) for c in cfgs}
        if len(values) > 1:
            raise PtrayError(f"the prompts of one group share the frozen model, so {name} must be the same for all; "
                             f"got {sorted(map(str, values))}; split them into groups by {name}")


def train_group(
    cfgs: list[TrainConfig],
    on_epoch_end: Callable[[int, dict[str, Any], dict[str, Any]], None] | None = None,
    resume: list[dict[str, Any] | None] | None = None,
    fused_attention: bool | None = None,
    model_and_tokenizer=None,
    fold_alibi: bool = False,
    on_prompt_end: Callable[[int, TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train the prompts of ``cfgs`` together; return each one's ``TrainResult`` as ``train(cfg)`` would.

    ``on_epoch_end(i, metrics, state)`` is called when prompt i finishes an epoch, with ``train``'s metrics and
    state; ``resume[i]`` (such a state, or None) continues prompt i after that epoch. ``fused_attention``: None
    follows the configs' ``attention`` (auto: ``ptray.lm.attention.use_fused_attention`` on GPUs only; ``fold_alibi``
    is passed to it). Each step's rows run in forward passes of at most the configs' ``max_tokens_per_forward``
    padded tokens (0: one pass; ``group_answer_logprobs``; the same numbers within rounding).
    ``on_prompt_end(i, result)`` is called as soon as prompt i leaves the group (stopped early or out of epochs),
    while the others go on: a Tune trial finishes that prompt's MLflow run there.
    ``model_and_tokenizer`` reuses a loaded frozen model (the benchmark's; the fused attention, if turned on, stays
    on it); the model must be the one ``cfgs[0].model`` names. Raises PtrayError when the configs disagree on a
    shared field (``GROUP_SHARED_FIELDS``) or a loss becomes non-finite.

    The steps, in order: ``_setup_model`` (the frozen model, once), ``_setup_member`` (each prompt: data, init,
    resume, baselines), then until every prompt has left: ``_step`` (one optimizer step of every active prompt),
    ``_evaluate_ends`` (the prompts whose epochs ended on this step, those on the same data in one evaluation),
    ``_end_epoch`` (early stopping, the checkpoint state) and ``_start_epoch`` (the next epoch's batches on the
    device, or ``_leave``).
    """
    _check_group(cfgs)
    resume = list(resume) if resume is not None else [None] * len(cfgs)
    if len(resume) != len(cfgs):
        raise PtrayError(f"resume has {len(resume)} states for {len(cfgs)} prompts; pass one (or None) per prompt")
    run = _setup_model(cfgs[0], fused_attention, model_and_tokenizer, fold_alibi)
    resumed = [state for state in resume if state is not None]
    if resumed:  # nothing draws from it while training; restored so a resumed run continues train's RNG stream
        torch.set_rng_state(resumed[0]["rng"])
    for cfg in cfgs:  # every member's lengths, before any work
        check_fits([cfg.task], run.tokenizer, run.model.config, cfg)
    no_prompt_cache: dict[tuple, EvalResult] = {}
    members = [_setup_member(run, i, cfg, state, len(cfgs), no_prompt_cache)
               for i, (cfg, state) in enumerate(zip(cfgs, resume))]
    for m, state in zip(members, resume):  # each its own; the lr it trains with recorded
        m.optimizer, settings = prompt_optimizer(m.cfg, m.weight, state)
        m.resolved.update(settings)

    def next_epoch(m: _Member) -> bool:
        if _start_epoch(run, m):
            return True
        _leave(run, m, on_prompt_end)
        return False

    active = [m for m in members if next_epoch(m)]
    while active:
        _step(run, active, len(members))
        ending = [m for m in active if m.step == len(m.batches)]
        results = _evaluate_ends(run, ending) if ending else {}
        still = []
        for m in active:
            if m.step == len(m.batches):
                _end_epoch(run, m, on_epoch_end, len(members), results[m.index])
                if not next_epoch(m):
                    continue
            still.append(m)
        active = still
    return [m.result for m in members]


@dataclasses.dataclass
class _Run:
    """What every prompt of a group shares: the frozen model, how it runs, and its token ids."""

    model: Any
    tokenizer: Any
    accelerator: Any
    device: str
    precision: str
    attention: str
    pad_id: int
    end_ids: tuple[int, ...]  # the ids that end an answer, the one trained on first (``ptray.lm.special.end_ids``)
    max_tokens_per_forward: int

    @property
    def eos_id(self) -> int:
        """The EOS id trained on after each answer (the first of ``end_ids``)."""
        return self.end_ids[0]

    def evaluate(self, cfg: TrainConfig, data: list, weight: torch.Tensor | None) -> EvalResult:
        """``weight`` (or no prompt) on ``data`` with ``cfg``'s evaluation batch size."""
        return evaluate(self.model, data, weight, cfg.eval_batch_size, self.pad_id, self.end_ids,
                        device=self.accelerator.device, autocast=self.accelerator.autocast)


def _setup_model(first: TrainConfig, fused_attention: bool | None, loaded, fold_alibi: bool) -> _Run:
    """The frozen model of the group (the configs agree on ``GROUP_SHARED_FIELDS``), set up once."""
    device, precision = resolve_device_precision(first.device, first.precision)
    set_seed(first.seed)  # nothing random happens in a frozen model in eval mode; set for any dropout
    if fused_attention is None:
        fused_attention = resolve_attention(first.attention, device) == "fused"
    attention = "fused" if fused_attention else "eager"
    model, tokenizer, accelerator = setup_model(first.model, device, precision, first.compile, attention, fold_alibi,
                                                loaded=loaded)
    return _Run(model, tokenizer, accelerator, device, precision, attention, pad_token_id(tokenizer),
                end_ids(model, tokenizer), first.max_tokens_per_forward)


def _setup_member(run: _Run, i: int, cfg: TrainConfig, state: dict | None, group_size: int,
                  no_prompt_cache: dict) -> _Member:
    """Prompt ``i``: its data, its initial (or resumed) rows (its optimizer comes after), its baselines."""
    tokenizer, embedding = run.tokenizer, run.model.get_input_embeddings().weight
    task = get_task(cfg.task)
    # read and encoded once per process: the seeds of a task share these lists
    train_data = encoded_split(task, "train", tokenizer, cfg.max_length, cfg.data_dir, cfg.hub_dataset,
                               cfg.max_train_examples)
    eval_data = encoded_split(task, cfg.eval_split, tokenizer, cfg.max_length, cfg.data_dir, cfg.hub_dataset,
                              cfg.max_eval_examples)
    init_text = cfg.init_text if cfg.init_text is not None else task.init_text
    # the module, not its rows: TEXT init must include any embedding scale (Gemma2), as the model's own input does
    source = source_prompt(cfg.init_source) if cfg.init_source else None  # init 'prompt' (SPoT)
    rows = init_prompt(run.model.get_input_embeddings(), tokenizer, cfg.init, init_text, cfg.num_tokens, cfg.seed,
                       task=task, source=source)
    weight = torch.nn.Parameter(rows.to(run.accelerator.device))
    resolved = {
        **cfg.to_dict(), "init_text": init_text, "num_tokens": weight.shape[0], "hidden_size": embedding.shape[1],
        "template_version": task.version, "task_digest": task.digest, "verbalizer": dict(task.verbalizer),
        "device": run.device,
        "precision": run.precision, "attention": run.attention,
        "attention_implementation": attention_implementation(run.model),  # what ran: eager for Gemma 2 asked fused
        "code_version": code_version(), **library_versions(),
        **compute_settings(),  # threads, BLAS, oneDNN: the same config computes other last digits under others
        "num_train_examples": len(train_data),
        "num_eval_examples": len(eval_data), "num_truncated": sum(d.truncated for d in train_data + eval_data),
        "group_size": group_size, "group_index": i,
        **({"init_source_tokens": int(source.shape[0])} if source is not None else {}),  # n_s; num_tokens is n_t
        # the special tokens: BOS ids before each source, the EOS trained on, every id that ends an answer, pad
        "bos_token_ids": special_prefix(tokenizer), "eos_token_id": run.eos_id, "end_token_ids": list(run.end_ids),
        "pad_token_id": run.pad_id,
    }
    baselines: dict[str, EvalResult] = {}
    if state is not None:
        with torch.no_grad():
            weight.copy_(state["prompt"].to(weight.device))
        best, history, epoch = dict(state["best"]), list(state["history"]), state["epoch"] + 1
        baselines = {k: EvalResult(**v) for k, v in state.get("baselines", {}).items()}
        log.info("resuming %s seed %d after epoch %d", task.name, cfg.seed, state["epoch"])
    else:
        best = {"eval_loss": math.inf, "epoch": 0, "prompt": weight.detach().cpu().clone(), "bad_epochs": 0}
        history, epoch = [], 1
    if cfg.baselines and not baselines:
        key = (cfg.task, cfg.data_dir, cfg.hub_dataset, cfg.eval_split, cfg.max_eval_examples, cfg.max_length,
               cfg.eval_batch_size)
        if key not in no_prompt_cache:  # the same for every prompt of a task: evaluate it once
            no_prompt_cache[key] = run.evaluate(cfg, eval_data, None)
        if key + (init_text,) not in no_prompt_cache:  # and the same init text (the task's, for its seeds): once
            # the init text as a hard prompt: the model's own input vectors of its tokens (Gemma's scale included)
            hard = families.embed(run.model, torch.tensor(token_ids(tokenizer, init_text)))
            no_prompt_cache[key + (init_text,)] = run.evaluate(cfg, eval_data, hard)
        baselines = {"no_prompt": no_prompt_cache[key], "init_text": no_prompt_cache[key + (init_text,)]}
        for name, res in baselines.items():
            log.info("baseline %-9s eval_loss %.4f exact_match %.4f rank_accuracy %.4f",
                     name, res.loss, res.exact_match, res.rank_accuracy)
    return _Member(i, cfg, weight, train_data, eval_data, resolved, init_text, baselines, best, history, epoch)


def _start_epoch(run: _Run, m: _Member) -> bool:
    """Set up ``m``'s next epoch; False when it is done (out of epochs or patience)."""
    if m.epoch > m.cfg.max_epochs or m.best["bad_epochs"] >= m.cfg.patience:
        return False
    batches = train_batches(m.train_data, m.cfg.batch_size, m.cfg.seed, m.epoch, run.pad_id, run.eos_id)
    m.step, m.tokens, m.t0 = 0, 0, time.perf_counter()
    m.batches = stage(batches, run.accelerator.device)  # the whole epoch on the device at once (pinned on CUDA)
    m.loss_sum = torch.zeros((), device=run.accelerator.device)
    return True


def _step(run: _Run, active: list[_Member], group_size: int) -> None:
    """One optimizer step: the next batch of every active prompt in one forward, each loss its own batch mean."""
    parts = [(m.batches[m.step], m.weight) for m in active]  # staged on the device by ``_start_epoch``
    with run.accelerator.autocast():
        logps = group_answer_logprobs(run.model, parts, run.max_tokens_per_forward)
        losses = [-lp.mean() for lp in logps]
    run.accelerator.backward(torch.stack(losses).sum())  # each prompt's gradient is its own mean's gradient
    step_all([m.optimizer for m in active], getattr(run.accelerator, "scaler", None))  # a scaler: fp16 only
    for m, (batch, _), loss in zip(active, parts, losses):
        m.loss_sum += loss.detach()
        m.tokens += batch.num_tokens  # host-side lengths: no device sync
        m.step += 1
        if (m.step % 20 == 0 or m.step == len(m.batches)) and not torch.isfinite(m.loss_sum):
            raise PtrayError(
                f"the training loss became {m.loss_sum.item()} at epoch {m.epoch}, step {m.step} "
                f"({m.cfg.task}, seed {m.cfg.seed}{f', group prompt {m.index}' if group_size > 1 else ''}); "
                f"lower --lr (now {m.resolved['lr']}) or use a more stable precision (--precision bf16/no)")


def _evaluate_ends(run: _Run, ending: list[_Member]) -> dict[int, EvalResult]:
    """Evaluate the prompts whose epochs ended on this step (their training clocks stopped first), those on the same
    data (the seeds of a task) together (``evaluate_together``); each member's result by its index."""
    now = time.perf_counter()
    for m in ending:
        m.train_time = now - m.t0
    if len(ending) == 1:  # as a single trial: through this module's ``evaluate``
        return {ending[0].index: run.evaluate(ending[0].cfg, ending[0].eval_data, ending[0].weight.detach())}
    results = evaluate_together(run.model, [(m.eval_data, m.weight.detach(), m.cfg.eval_batch_size) for m in ending],
                                run.pad_id, run.end_ids, device=run.accelerator.device,
                                autocast=run.accelerator.autocast)
    return {m.index: r for m, r in zip(ending, results)}


def _end_epoch(run: _Run, m: _Member, on_epoch_end, group_size: int, result: EvalResult | None = None) -> None:
    """``m``'s epoch is over: with its evaluation ``result`` (None: evaluate it now), track early stopping and the
    best prompt, report metrics and state."""
    if result is None:
        m.train_time = time.perf_counter() - m.t0
        result = run.evaluate(m.cfg, m.eval_data, m.weight.detach())
    if not math.isfinite(result.loss):  # else the untrained init prompt would be "best" and the run end as done
        raise PtrayError(
            f"the evaluation loss became {result.loss} at epoch {m.epoch} ({m.cfg.task}, seed {m.cfg.seed}"
            f"{f', group prompt {m.index}' if group_size > 1 else ''}); the prompt diverged: lower --lr (now "
            f"{m.resolved['lr']}) or use a more stable precision (--precision bf16/no)")
    improved = result.loss < m.best["eval_loss"]
    if improved:
        m.best = {"eval_loss": result.loss, "epoch": m.epoch, "prompt": m.weight.detach().cpu().clone(),
                  "bad_epochs": 0}
        m.best_eval = result
    else:
        m.best["bad_epochs"] += 1
    metrics = {
        "epoch": m.epoch,
        "train_loss": m.loss_sum.item() / len(m.batches),
        **result.metrics(),
        "best_eval_loss": m.best["eval_loss"],
        "best_epoch": m.best["epoch"],
        "train_tokens_per_s": m.tokens / m.train_time,  # this prompt's tokens over the group's wall time
        "epoch_seconds": time.perf_counter() - m.t0,
    }
    m.history.append(metrics)
    log.info("%sepoch %d/%d train_loss %.4f eval_loss %.4f exact_match %.4f rank_accuracy %.4f%s (%.1fs)",
             f"[{m.index}] {m.cfg.task} seed {m.cfg.seed} " if group_size > 1 else "", m.epoch,
             m.cfg.max_epochs, metrics["train_loss"], result.loss, result.exact_match, result.rank_accuracy,
             " *" if improved else "", metrics["epoch_seconds"])
    if on_epoch_end is not None:
        state = copy.deepcopy({
            "epoch": m.epoch,
            "prompt": m.weight.detach().cpu(),
            **optimizer_state(m.optimizer, m.cfg),  # a one-prompt optimizer: its state is this prompt's
            "rng": torch.get_rng_state(),
            "best": m.best,
            "history": m.history,
            "baselines": {k: dataclasses.asdict(v) for k, v in m.baselines.items()},
        })
        on_epoch_end(m.index, metrics, state)
    m.epoch += 1
    m.batches = None


def _leave(run: _Run, m: _Member, on_prompt_end) -> None:
    """Finish ``m`` as ``train`` does: its best prompt, re-evaluated if resumed after the best epoch."""
    if m.best_eval is None:
        m.best_eval = run.evaluate(m.cfg, m.eval_data, m.best["prompt"])
    m.result = _result(m)
    m.optimizer = None  # its state is freed with it
    if on_prompt_end is not None:
        on_prompt_end(m.index, m.result)


def _result(m: _Member) -> TrainResult:
    """``train``'s result for member ``m`` (same metrics keys)."""
    final = {
        "task": m.cfg.task,
        "seed": m.cfg.seed,
        **m.best_eval.metrics(),
        "best_epoch": m.best["epoch"],
        "epochs_run": len(m.history),
        "stopped_early": len(m.history) < m.cfg.max_epochs,
        "num_tokens": int(m.best["prompt"].shape[0]),
        "num_eval_examples": m.best_eval.num_examples,
    }
    for name, res in m.baselines.items():
        final.update({f"{name}_{k}": v for k, v in res.metrics().items()})
    return TrainResult(m.best["prompt"], final, m.history, m.resolved, {"prompt": m.best_eval, **m.baselines},
                       [d.idx for d in m.eval_data if d.label is not None])
