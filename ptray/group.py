"""Trial groups: train K soft prompts on one frozen model, every step carrying rows of every prompt.

A single trial (``ptray.train.train``) leaves most of a GPU idle: one prompt's batch of 8 is far too small for the
model. A group trains K prompts (any tasks, seeds, learning rates, batch sizes, patiences) in one process on one
copy of the frozen model. Each step concatenates one batch of every prompt still training, each row with its own
prompt prepended, and runs the model once. Each prompt keeps everything a single trial has:

- its data order: the batches ``train_batches`` gives its own (seed, epoch), in the same order;
- its loss: the group's loss is the sum of each prompt's own batch mean, so (rows never attend to each other and
  the model is frozen) each prompt's gradient is exactly its single-trial gradient;
- its Adam state: one Adam with one parameter group per prompt (its own lr; Adam's state is per parameter);
- its epochs: a prompt's epoch ends when its own batches run out (tasks have different sizes); it is then
  evaluated, early stopping and the best prompt are tracked as in a single trial, and ``on_epoch_end`` gets the
  same metrics and resumable state ``train`` gives;
- its end: a prompt that stops (patience or max epochs) leaves the group; the others go on.

This is ptray's one training loop: a single trial, ``ptray.train.train(cfg)``, is ``train_group([cfg])``.

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

from ptray import families
from ptray.batching import Batch, check_fits, encode_all, pad_token_id, train_batches
from ptray.config import resolve_attention
from ptray.data import load_split
from ptray.errors import PtrayError
from ptray.evaluate import EvalResult, evaluate
from ptray.model import library_versions, resolve_device_precision
from ptray.prompt import init_prompt, prepend, text_token_ids
from ptray.tasks import get_task
from ptray.train import TrainConfig, TrainResult, code_version, set_seed, setup_model

log = logging.getLogger("ptray")

# what the prompts of one group must agree on: the frozen model and how each step runs it
SHARED_FIELDS = ("model", "precision", "device", "compile", "attention", "max_tokens_per_forward")


WIDTH_BUCKET = 32  # with a token budget, a forward pass's width is a multiple of this many tokens


def forward_passes(lengths: list[int], max_tokens: int, bucket: int = WIDTH_BUCKET,
                   limit: int | None = None) -> list[tuple[list[int], int]]:
    """Split rows of ``lengths`` tokens into forward passes of at most ``max_tokens`` padded tokens (rows x width).

    Rows go in order of length, shortest first, so rows of like length share a pass and little is padding. A
    pass's width is its longest row rounded up to a multiple of ``bucket`` (at most ``limit``, the model's
    positions, when given): few distinct shapes mean few recompilations under ``torch.compile`` or CUDA graphs, and
    the caching allocator reuses the same blocks step after step. A row wider than the budget gets a pass of its
    own, so every row is in exactly one non-empty pass. Returns ``[(row indices, width), ...]``.
    """
    def width(length: int) -> int:
        w = -(-length // bucket) * bucket
        return max(length, min(w, limit)) if limit else w

    passes: list[tuple[list[int], int]] = []
    rows: list[int] = []
    for r in sorted(range(len(lengths)), key=lengths.__getitem__):
        if rows and (len(rows) + 1) * width(lengths[r]) > max_tokens:  # r is the longest so far: it sets the width
            passes.append((rows, width(lengths[rows[-1]])))
            rows = []
        rows.append(r)
    if rows:
        passes.append((rows, width(lengths[rows[-1]])))
    return passes


def group_answer_logprobs(model, parts: list[tuple[Batch, torch.Tensor]], max_tokens: int = 0,
                          bucket: int = WIDTH_BUCKET) -> list[torch.Tensor]:
    """One step's forward for several (batch, prompt) pairs; each batch's rows get their own prompt [n_i, hidden].

    Rows are right-padded to the longest prompt + sequence (causal attention: a row's real tokens never see the
    padding after them). ``max_tokens`` 0 runs all rows in one forward pass; > 0 splits them, by length, into
    passes of at most that many padded tokens, each pass's width a multiple of ``bucket`` (``forward_passes``):
    prompts of different tasks have very different lengths (COPA ~30 tokens, RTE up to 512), and one pass pads
    every row to the longest. Returns, per pair, the log-probability of each answer token [A_i] (fp32), as
    ``ptray.model.answer_logprobs(model, batch_i, prompt_i)[0]`` would.
    """
    embeds, masks, seqs, positions, tokens, counts = [], [], [], [], [], []
    offset = 0
    for batch, prompt in parts:
        e, m = prepend(prompt, families.embed(model, batch.input_ids), batch.attention_mask)
        embeds.append(e)
        masks.append(m)
        seqs.append(batch.ans_seq + offset)
        positions.append(batch.ans_pos + prompt.shape[0])
        tokens.append(batch.ans_tokens)
        counts.append(batch.ans_tokens.shape[0])
        offset += batch.num_seqs
    width = max(e.shape[1] for e in embeds)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e in embeds])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    seqs, positions = torch.cat(seqs), torch.cat(positions)
    if max_tokens <= 0:
        hidden = families.base_forward(model, embeds, mask).last_hidden_state
        selected = hidden[seqs, positions]
    else:
        # Each pass's hidden states are flattened to [rows * its width, hidden]; an answer of row r at position p
        # is then row r's base (its pass's offset + its index in the pass x the pass's width) + p.
        lengths = mask.sum(1).tolist()  # one device sync per step
        passes = forward_passes(lengths, max_tokens, bucket, getattr(model.config, "max_position_embeddings", None))
        widest = max(w for _, w in passes)
        if widest > width:  # bucketed widths may pass the step's longest row: pad (masked) up to them
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, widest - width))
            mask = torch.nn.functional.pad(mask, (0, widest - width))
        base = torch.zeros(len(lengths), dtype=torch.long)
        flat, start = [], 0
        for rows, w in passes:
            idx = torch.tensor(rows, device=embeds.device)
            h = families.base_forward(model, embeds[idx, :w], mask[idx, :w]).last_hidden_state
            flat.append(h.reshape(-1, h.shape[-1]))
            base[rows] = start + torch.arange(len(rows)) * w
            start += len(rows) * w
        selected = torch.cat(flat)[base.to(embeds.device)[seqs] + positions]
    logits = families.logits(model, selected)
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.cat(tokens).unsqueeze(1)).squeeze(1)
    return list(logp.split(counts))


@dataclasses.dataclass
class _Member:
    """One prompt of the group and its single-trial state."""

    index: int
    cfg: TrainConfig
    weight: torch.nn.Parameter
    param_group: dict  # its Adam parameter group (set once the optimizer is prepared)
    train_data: list
    eval_data: list
    resolved: dict
    init_text: str
    baselines: dict
    best: dict
    history: list
    epoch: int  # the epoch now running (or about to start)
    batches: list | None = None
    step: int = 0
    loss_sum: torch.Tensor | None = None
    tokens: int = 0
    t0: float = 0.0
    best_eval: EvalResult | None = None
    result: TrainResult | None = None


def _check_group(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise PtrayError("a trial group needs at least one TrainConfig")
    for name in SHARED_FIELDS:
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
    follows the configs' ``attention`` (auto: ``ptray.attention.use_fused_attention`` on GPUs only; ``fold_alibi``
    is passed to it). Each step's rows run in forward passes of at most the configs' ``max_tokens_per_forward``
    padded tokens (0: one pass; ``group_answer_logprobs``; the same numbers within rounding).
    ``on_prompt_end(i, result)`` is called as soon as prompt i leaves the group (stopped early or out of epochs),
    while the others go on: a Tune trial finishes that prompt's MLflow run there.
    ``model_and_tokenizer`` reuses a loaded frozen model (the benchmark's; the fused attention, if turned on, stays
    on it); the model must be the one ``cfgs[0].model`` names. Raises PtrayError when the configs disagree on a
    shared field (``SHARED_FIELDS``) or a loss becomes non-finite.
    """
    _check_group(cfgs)
    resume = list(resume) if resume is not None else [None] * len(cfgs)
    if len(resume) != len(cfgs):
        raise PtrayError(f"resume has {len(resume)} states for {len(cfgs)} prompts; pass one (or None) per prompt")
    first = cfgs[0]
    device, precision = resolve_device_precision(first.device, first.precision)
    set_seed(first.seed)  # nothing random happens in a frozen model in eval mode; set for any dropout
    if fused_attention is None:
        fused_attention = resolve_attention(first.attention, device) == "fused"
    attention = "fused" if fused_attention else "eager"
    if model_and_tokenizer is None:
        model, tokenizer, accelerator = setup_model(first.model, device, precision, first.compile, attention,
                                                    fold_alibi)
    else:
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
        model, tokenizer = model_and_tokenizer
        if fused_attention:
            from ptray.attention import use_fused_attention

            use_fused_attention(model, fold_alibi=fold_alibi)
    resumed = [state for state in resume if state is not None]
    if resumed:  # nothing draws from it while training; restored so a resumed run continues train's RNG stream
        torch.set_rng_state(resumed[0]["rng"])
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    embedding = model.get_input_embeddings().weight

    def run_eval(cfg, data, weight):
        return evaluate(model, data, weight, cfg.eval_batch_size, pad_id, eos_id, device=accelerator.device,
                        autocast=accelerator.autocast)

    members: list[_Member] = []
    no_prompt_cache: dict[tuple, EvalResult] = {}
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)  # a placeholder group, removed
    optimizer.param_groups.clear()
    for cfg in cfgs:  # every member's lengths, before any work
        check_fits([cfg.task], tokenizer, model.config, cfg)
    for i, (cfg, state) in enumerate(zip(cfgs, resume)):
        task = get_task(cfg.task)
        train_data = encode_all(task, load_split(task, "train", cfg.data_dir, cfg.hub_dataset,
                                                 cfg.max_train_examples), tokenizer, cfg.max_length)
        eval_data = encode_all(task, load_split(task, cfg.eval_split, cfg.data_dir, cfg.hub_dataset,
                                                cfg.max_eval_examples), tokenizer, cfg.max_length)
        init_text = cfg.init_text if cfg.init_text is not None else task.init_text
        # the module, not its rows: TEXT init must include any embedding scale (Gemma2), as the model's own input does
        rows = init_prompt(model.get_input_embeddings(), tokenizer, cfg.init, init_text, cfg.num_tokens, cfg.seed)
        weight = torch.nn.Parameter(rows.to(accelerator.device))
        optimizer.add_param_group({"params": [weight], "lr": cfg.lr})
        resolved = {
            **cfg.to_dict(), "init_text": init_text, "num_tokens": weight.shape[0], "hidden_size": embedding.shape[1],
            "template_version": task.version, "verbalizer": dict(task.verbalizer), "device": device,
            "precision": precision, "attention": attention,
            "code_version": code_version(), **library_versions(),
            "num_train_examples": len(train_data),
            "num_eval_examples": len(eval_data), "num_truncated": sum(d.truncated for d in train_data + eval_data),
            "group_size": len(cfgs), "group_index": i,
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
            key = (cfg.task, cfg.data_dir, cfg.hub_dataset, cfg.eval_split, cfg.max_eval_examples, cfg.max_length)
            if key not in no_prompt_cache:  # the same for every prompt of a task: evaluate it once
                no_prompt_cache[key] = run_eval(cfg, eval_data, None)
            hard = embedding[torch.tensor(text_token_ids(tokenizer, init_text), device=embedding.device)]
            baselines = {"no_prompt": no_prompt_cache[key], "init_text": run_eval(cfg, eval_data, hard)}
            for name, res in baselines.items():
                log.info("baseline %-9s eval_loss %.4f exact_match %.4f rank_accuracy %.4f",
                         name, res.loss, res.exact_match, res.rank_accuracy)
        members.append(_Member(i, cfg, weight, {}, train_data, eval_data, resolved, init_text, baselines, best,
                               history, epoch))
    optimizer = accelerator.prepare(optimizer)
    adam = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it; param groups live on the torch one
    for m, state in zip(members, resume):  # found after prepare, which may rebuild the group dicts
        m.param_group = next(g for g in adam.param_groups if g["params"][0] is m.weight)
        if state is not None:
            _load_adam_state(adam, m.param_group, m.weight, state["optimizer"])

    def leave(m: _Member) -> None:
        """Finish ``m`` as ``train`` does: its best prompt, re-evaluated if resumed after the best epoch."""
        if m.best_eval is None:
            m.best_eval = run_eval(m.cfg, m.eval_data, m.best["prompt"])
        m.result = _result(m)
        adam.param_groups.remove(m.param_group)
        adam.state.pop(m.weight, None)
        if on_prompt_end is not None:
            on_prompt_end(m.index, m.result)

    def start_epoch(m: _Member) -> bool:
        """Set up ``m``'s next epoch; False (and ``m`` leaves) when it is done."""
        if m.epoch > m.cfg.max_epochs or m.best["bad_epochs"] >= m.cfg.patience:
            leave(m)
            return False
        m.batches = train_batches(m.train_data, m.cfg.batch_size, m.cfg.seed, m.epoch, pad_id, eos_id)
        m.step, m.tokens, m.t0 = 0, 0, time.perf_counter()
        m.loss_sum = torch.zeros((), device=accelerator.device)
        return True

    def end_epoch(m: _Member) -> None:
        train_time = time.perf_counter() - m.t0
        result = run_eval(m.cfg, m.eval_data, m.weight.detach())
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
            "train_tokens_per_s": m.tokens / train_time,  # this prompt's tokens over the group's wall time
            "epoch_seconds": time.perf_counter() - m.t0,
        }
        m.history.append(metrics)
        log.info("%sepoch %d/%d train_loss %.4f eval_loss %.4f exact_match %.4f rank_accuracy %.4f%s (%.1fs)",
                 f"[{m.index}] {m.cfg.task} seed {m.cfg.seed} " if len(members) > 1 else "", m.epoch,
                 m.cfg.max_epochs, metrics["train_loss"], result.loss, result.exact_match, result.rank_accuracy,
                 " *" if improved else "", metrics["epoch_seconds"])
        if on_epoch_end is not None:
            state = copy.deepcopy({
                "epoch": m.epoch,
                "prompt": m.weight.detach().cpu(),
                "optimizer": _adam_state_of(adam, m.param_group, m.weight),
                "rng": torch.get_rng_state(),
                "best": m.best,
                "history": m.history,
                "baselines": {k: dataclasses.asdict(v) for k, v in m.baselines.items()},
            })
            on_epoch_end(m.index, metrics, state)
        m.epoch += 1
        m.batches = None

    active = [m for m in members if start_epoch(m)]
    while active:
        parts = [(m.batches[m.step].to(accelerator.device), m.weight) for m in active]
        with accelerator.autocast():
            logps = group_answer_logprobs(model, parts, first.max_tokens_per_forward)
            losses = [-lp.mean() for lp in logps]
        accelerator.backward(torch.stack(losses).sum())  # each prompt's gradient is its own mean's gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        still = []
        for m, (batch, _), loss in zip(active, parts, losses):
            m.loss_sum += loss.detach()
            m.tokens += int(batch.attention_mask.sum())
            m.step += 1
            if (m.step % 20 == 0 or m.step == len(m.batches)) and not torch.isfinite(m.loss_sum):
                raise PtrayError(
                    f"the training loss became {m.loss_sum.item()} at epoch {m.epoch}, step {m.step} "
                    f"({m.cfg.task}, seed {m.cfg.seed}{f', group prompt {m.index}' if len(members) > 1 else ''}); "
                    f"lower --lr (now {m.cfg.lr}) or use a more stable precision (--precision bf16/no)")
            if m.step == len(m.batches):
                end_epoch(m)
                if not start_epoch(m):
                    continue
            still.append(m)
        active = still
    return [m.result for m in members]


def _adam_state_of(adam: torch.optim.Optimizer, group: dict, weight: torch.Tensor) -> dict:
    """Prompt ``weight``'s Adam state as the state dict of a one-prompt ``torch.optim.Adam`` (what ``train``
    saves), so a group's checkpoint resumes as a single trial and the other way round."""
    options = {k: v for k, v in group.items() if k != "params"}
    state = {0: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in adam.state[weight].items()}} \
        if weight in adam.state else {}
    return {"state": state, "param_groups": [{**options, "params": [0]}]}


def _load_adam_state(adam: torch.optim.Optimizer, group: dict, weight: torch.Tensor, saved: dict) -> None:
    """Load a one-prompt Adam state dict (``_adam_state_of``'s or ``train``'s) into ``weight``'s parameter group."""
    group.update({k: v for k, v in saved["param_groups"][0].items() if k != "params"})
    state = saved["state"].get(0, saved["state"].get("0"))
    if state:
        adam.state[weight] = {k: v.to(weight.device) if torch.is_tensor(v) and v.dim() > 0 else v
                              for k, v in state.items()}


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
