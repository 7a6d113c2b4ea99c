"""ptray's training step and evaluation, each fast path's slow counterpart, and the PEFT + Trainer reference.

Everything here takes a model and ptray-encoded examples and either runs timed steps or computes a value that
``tests/test_fast_paths.py`` compares with its reference:

* ``answer_loss`` (ptray: LM head at the answer positions) vs ``full_logits_loss`` (head everywhere, HF-style
  cross-entropy) vs the PEFT prompt-tuning model's own loss;
* ``train_batches`` (ptray: length-grouped) vs ``random_batches`` (what a plain shuffled DataLoader gives);
* ``packed_loss``: several trials' prompts and batches in one forward pass (``ptray.group``'s trial groups, vs
  one trial per forward);
* ``generate_exact_match``: exact match by batched greedy ``generate`` (the reference for ptray's one-pass
  ``evaluate``); ``ptray_evaluate(share_source=False)``: ``evaluate`` with one pass per label;
* ``sdpa_attention``: BLOOM's attention through ``F.scaled_dot_product_attention`` (ptray's fused attention,
  which a single trial does not use: a measured variant);
* ``reference_train``: ``get_peft_model(PromptTuningConfig(TEXT init))`` + ``transformers.Trainer``
  (``reference.py``).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.measure import PeakMemory, Shape, StepResult, sync
from ptray.data.batching import Batch, Encoded, collate, train_batches
from ptray.lm.attention import use_fused_attention
from ptray.lm.evaluate import evaluate
from ptray.lm.forward import answer_logprobs, group_answer_logprobs
from ptray.lm.load import compile_blocks
from ptray.lm.prompt import prepend
from ptray.seeds import epoch_seed

# ----------------------------------------------------------------------------------------------------- losses


def answer_loss(model, batch: Batch, prompt: torch.Tensor) -> torch.Tensor:
    """ptray's training loss (``ptray.training``): mean NLL of the answer tokens + EOS, head at those positions."""
    logp, _ = answer_logprobs(model, batch, prompt)
    return -logp.mean()


def full_logits_loss(model, batch: Batch, prompt: torch.Tensor) -> torch.Tensor:
    """The same loss computed the usual way: logits at every position, fp32 cross-entropy with -100 elsewhere."""
    embeds, mask = prepend(prompt, model.get_input_embeddings()(batch.input_ids), batch.attention_mask)
    logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    n = prompt.shape[0]
    labels = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    labels[batch.ans_seq, batch.ans_pos + n] = batch.ans_tokens  # the label sits at the predicting position
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def packed_loss(model, batches: list[Batch], prompts: list[torch.Tensor]) -> torch.Tensor:
    """Several trials in one forward pass, as a trial group trains (``group_answer_logprobs``): trial
    k's batch with trial k's prompt; returns the sum of their losses. The sum's gradient for prompt k is trial k's
    own gradient."""
    return sum(-logp.mean() for logp in group_answer_logprobs(model, list(zip(batches, prompts))))


# ---------------------------------------------------------------------------------------------------- batches


def random_batches(data: list[Encoded], batch_size: int, seed: int, epoch: int, pad_id: int, eos_id: int):
    """One epoch of gold-answer batches in plain shuffled order (no length grouping): the ablation of
    ``ptray.data.batching.train_batches``."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))  # train_batches' seed, never out of range
    order = torch.randperm(len(data), generator=gen).tolist()
    return [collate([(data[i].source, data[i].answers[data[i].label]) for i in order[s:s + batch_size]], pad_id,
                    eos_id) for s in range(0, len(order), batch_size)]


def batch_stream(data, batch_size, count, seed, pad_id, eos_id, grouped=True):
    """``count`` training batches, epoch after epoch, and the seconds spent making them."""
    make = train_batches if grouped else random_batches
    out, epoch = [], 1
    t0 = time.perf_counter()
    while len(out) < count:
        out += make(data, batch_size, seed, epoch, pad_id, eos_id)
        epoch += 1
    seconds = (time.perf_counter() - t0) * count / len(out)
    return out[:count], seconds


def batch_flops(shape: Shape, batch: Batch, n_prompt: int, train: bool = True) -> float:
    lengths = (batch.attention_mask.sum(dim=1) + n_prompt).tolist()
    answers = torch.bincount(batch.ans_seq, minlength=batch.num_seqs).tolist()
    f = shape.train_flops if train else shape.forward_flops
    return sum(f(t, a) for t, a in zip(lengths, answers))


# ------------------------------------------------------------------------------------------- ptray's train loop


def autocast_factory(device: str, precision: str):
    """The context ptray's accelerator.autocast() enters: bf16 autocast, or nothing for full precision."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def optimizer_step(compute_loss, optimizers, autocast) -> torch.Tensor:
    """One step of ptray's loop: ``compute_loss()`` under ``autocast()``, backward, then each optimizer's step
    and ``zero_grad``, in order. Returns the loss, detached (a 0-dim tensor on the device: no sync)."""
    with autocast():
        loss = compute_loss()
    loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def ptray_train(model, batches: list[Batch], init: torch.Tensor, *, device: str, precision: str, warmup: int,
                lr: float = 3e-2, loss_fn=answer_loss, shape: Shape | None = None, collate_s: float = 0.0,
                train_weights: bool = False, memory: bool | None = None) -> StepResult:
    """ptray's training loop body (``ptray/training/train.py``: autocast, loss, backward, Adam on the fp32 prompt only),
    run over ``batches``; the first ``warmup`` are not timed.

    ``collate_s``: seconds to collate one batch, added per timed step (the batches were made beforehand).
    ``train_weights``: the ablation in which every weight also gets a gradient and Adam state (lr 0, so the
    weights do not move). ``memory``: measure peak memory (default: on CUDA only, see ``PeakMemory``).
    """
    prompt = torch.nn.Parameter(init.detach().to(device=device, dtype=torch.float32).clone())
    optimizers = [torch.optim.Adam([prompt], lr=lr)]
    if train_weights:
        model.requires_grad_(True)
        optimizers.append(torch.optim.Adam(model.parameters(), lr=0.0))
    autocast = autocast_factory(device, precision)
    shape = shape or Shape.of(model)
    n = init.shape[0]
    timed_batches = batches[warmup:]  # accounting from the CPU copies, outside the timed loop
    tokens = sum(int(b.attention_mask.sum()) for b in timed_batches)
    examples = sum(b.num_seqs for b in timed_batches)
    flops = sum(batch_flops(shape, b, n) for b in timed_batches)
    losses = []
    try:
        with PeakMemory(device, memory) as mem:
            for step, batch in enumerate(batches):
                if step == warmup:
                    sync(device)
                    t0 = time.perf_counter()
                batch = batch.to(device)
                losses.append(optimizer_step(partial(loss_fn, model, batch, prompt), optimizers, autocast))
                int(batch.attention_mask.sum())  # ptray's loop counts its tokens so (a device sync): kept
            sync(device)
            seconds = time.perf_counter() - t0
    finally:
        if train_weights:
            model.requires_grad_(False)
            for p in model.parameters():
                p.grad = None
    timed_steps = len(batches) - warmup
    # batches were collated before the loop: add their share of that time, as the reference's collator is timed
    return StepResult(seconds + collate_s * timed_steps, tokens, examples, flops, mem.peak, timed_steps,
                      [float(x) for x in losses])


def ptray_train_packed(model, streams: list[list[Batch]], inits: list[torch.Tensor], *, device: str,
                       precision: str, warmup: int, lr: float = 3e-2, shape: Shape | None = None,
                       memory: bool | None = None) -> StepResult:
    """K trials trained together: step i runs batch i of every trial in one forward/backward (``packed_loss``);
    one Adam over the K prompts is K independent Adams (Adam is elementwise)."""
    prompts = [torch.nn.Parameter(i.detach().to(device=device, dtype=torch.float32).clone()) for i in inits]
    optimizer = torch.optim.Adam(prompts, lr=lr)
    autocast = autocast_factory(device, precision)
    shape = shape or Shape.of(model)
    steps = min(len(s) for s in streams)
    timed_batches = [(s[i], p.shape[0]) for s, p in zip(streams, inits) for i in range(warmup, steps)]
    tokens = sum(int(b.attention_mask.sum()) for b, _ in timed_batches)
    examples = sum(b.num_seqs for b, _ in timed_batches)
    flops = sum(batch_flops(shape, b, n) for b, n in timed_batches)
    with PeakMemory(device, memory) as mem:
        for step in range(steps):
            if step == warmup:
                sync(device)
                t0 = time.perf_counter()
            batches = [s[step].to(device) for s in streams]
            optimizer_step(partial(packed_loss, model, batches, prompts), [optimizer], autocast)
        sync(device)
        seconds = time.perf_counter() - t0
    return StepResult(seconds, tokens, examples, flops, mem.peak, steps - warmup)


# ------------------------------------------------------------------------------------------ evaluation paths


def gold_only(data: list[Encoded]) -> list[Encoded]:
    """The examples with only their gold answer: ``evaluate`` then computes exact match alone."""
    return [Encoded(d.idx, d.source, (d.answers[d.label],), 0, d.truncated) for d in data if d.label is not None]


def ptray_evaluate(model, data, prompt, *, batch_size, pad_id, eos_id, device, precision, share_source=None):
    """``ptray.lm.evaluate.evaluate`` as ``train`` calls it (exact match + rank accuracy, every label scored);
    ``share_source=False``: one pass per label instead of the shared source pass."""
    return evaluate(model, data, prompt, batch_size, pad_id, eos_id, device=device,
                    autocast=autocast_factory(device, precision) if precision == "bf16" else None,
                    share_source=share_source)


@torch.no_grad()
def generate_exact_match(model, data: list[Encoded], prompt: torch.Tensor | None, *, batch_size: int, pad_id: int,
                         eos_id: int, device: str, precision: str, sort: bool = False) -> list[int]:
    """Exact match per labeled example by batched greedy ``generate``: the reference for ptray's one-pass path.

    The way that works with a soft prompt on BLOOM (STACK-NOTES: PEFT's own ``generate`` fails on padded batches):
    left-pad the sources, prepend the prompt rows to ``inputs_embeds`` and call the base model's ``generate``.
    Correct = the new tokens start with the gold answer then EOS. ``sort`` batches by length (an ablation).
    """
    data = [d for d in data if d.label is not None]
    order = sorted(range(len(data)), key=lambda i: len(data[i].source)) if sort else list(range(len(data)))
    max_new = max(len(a) for d in data for a in d.answers) + 1
    emb = model.get_input_embeddings()
    autocast = autocast_factory(device, precision)
    correct = [0] * len(data)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        width = max(len(data[i].source) for i in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, i in enumerate(part):
            src = data[i].source
            ids[r, width - len(src):] = torch.tensor(src)
            mask[r, width - len(src):] = 1
        ids, mask = ids.to(device), mask.to(device)
        embeds = emb(ids)
        if prompt is not None:
            embeds, mask = prepend(prompt.to(device), embeds, mask)
        with autocast():
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id)
        for r, i in enumerate(part):
            target = data[i].answers[data[i].label] + [eos_id]
            correct[i] = int(out[r, :len(target)].tolist() == target)
    return correct


# ------------------------------------------------------------------------------------- SDPA attention variant


@contextlib.contextmanager
def sdpa_attention(model):
    """Within the block, ``model``'s BLOOM attention layers run through one SDPA call with ALiBi as an additive
    bias (``ptray.lm.attention.use_fused_attention``); they are eager again afterwards."""
    use_fused_attention(model)
    try:
        yield
    finally:
        use_fused_attention(model, enabled=False)


@contextlib.contextmanager
def compiled_blocks(model):
    """Within the block, the model runs as ptray's ``--compile`` makes it (``ptray.lm.load.compile_blocks``); the
    blocks are eager again afterwards."""
    compile_blocks(model)
    try:
        yield
    finally:
        for b in model.base_model.h:
            b._compiled_call_impl = None


# the PEFT + Trainer reference lives in reference.py; its names stay importable from here
from benchmarks.reference import lm_records, peft_model, reference_train  # noqa: E402, F401
