"""Evaluate a prompt (soft, hard or none) on encoded examples: loss, exact match and rank accuracy in one pass.

Exact match (the paper's metric): greedy decoding produces exactly the gold label's answer words, then EOS.
Under teacher forcing this is "every answer position's argmax is the answer token, and the argmax after the last
answer token is EOS", so one forward pass replaces ``generate`` (tests/test_evaluate.py checks it against
``model.generate`` example by example). Generated text that matches no label is simply wrong.

Rank accuracy: the label whose answer words + EOS have the highest total log-likelihood is the prediction.
Every label's sequence is scored in the same pass; the gold one also gives the loss and exact match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptray.batching import Encoded, encode_all, eval_batches
from ptray.data import DEFAULT_HUB_DATASET, load_split
from ptray.model import answer_logprobs
from ptray.tasks import get_task


@dataclass
class EvalResult:
    loss: float  # mean token NLL over the gold answers (+EOS), as the training loss
    exact_match: float
    rank_accuracy: float
    num_examples: int
    em_correct: list[int] = field(default_factory=list)  # per example, in input order
    rank_correct: list[int] = field(default_factory=list)
    rank_pred: list[int] = field(default_factory=list)  # predicted label index per example

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}eval_loss": self.loss, f"{prefix}exact_match": self.exact_match,
                f"{prefix}rank_accuracy": self.rank_accuracy}


@torch.no_grad()
def evaluate(model, data: list[Encoded], prompt: torch.Tensor | None, batch_size: int, pad_id: int, eos_id: int,
             device=None, autocast=None) -> EvalResult:
    """Score every label of every (labeled) example with ``prompt`` [n, hidden] prepended (None: no prompt).

    ``autocast`` is a context-manager factory (accelerate's) for mixed precision; None runs in the model's dtype.
    """
    data = [d for d in data if d.label is not None]
    if not data:
        raise ValueError("no labeled examples to evaluate")
    device = device or next(model.parameters()).device
    prompt = prompt.to(device) if prompt is not None else None
    score = [[0.0] * len(d.answers) for d in data]
    em = [0] * len(data)
    nll_sum, nll_tokens = 0.0, 0
    for batch, keys in eval_batches(data, batch_size, pad_id, eos_id):
        batch = batch.to(device)
        if autocast is not None:
            with autocast():
                logp, ok = answer_logprobs(model, batch, prompt)
        else:
            logp, ok = answer_logprobs(model, batch, prompt)
        n = batch.num_seqs
        per_seq = torch.zeros(3, n, device=device, dtype=torch.float64)
        per_seq[0].index_add_(0, batch.ans_seq, logp.double())
        per_seq[1].index_add_(0, batch.ans_seq, (~ok).double())
        per_seq[2].index_add_(0, batch.ans_seq, torch.ones_like(logp, dtype=torch.float64))
        seq_logp, seq_wrong, seq_tokens = per_seq.tolist()  # one device sync per batch
        for i, (e, k) in enumerate(keys):
            score[e][k] = seq_logp[i]
            if k == data[e].label:
                em[e] = int(seq_wrong[i] == 0)
                nll_sum -= seq_logp[i]
                nll_tokens += int(seq_tokens[i])
    pred = [max(range(len(s)), key=s.__getitem__) for s in score]
    rank = [int(p == d.label) for p, d in zip(pred, data)]
    return EvalResult(
        loss=nll_sum / nll_tokens,
        exact_match=sum(em) / len(data),
        rank_accuracy=sum(rank) / len(data),
        num_examples=len(data),
        em_correct=em,
        rank_correct=rank,
        rank_pred=pred,
    )


def evaluate_on_task(
    model,
    tokenizer,
    task_name: str,
    prompt: torch.Tensor | None,
    data_dir: str | None = None,
    split: str = "val",
    hub_dataset: str = DEFAULT_HUB_DATASET,
    max_examples: int | None = None,
    max_length: int = 512,
    batch_size: int = 32,
    autocast=None,
) -> tuple[EvalResult, list[int]]:
    """Evaluate ``prompt`` (any task's, or None) on ``task_name``'s ``split``: the zero-shot transfer step.

    Returns the result and the ``idx`` of each evaluated example (the order of the per-example lists).
    """
    task = get_task(task_name)
    data = encode_all(task, load_split(task, split, data_dir, hub_dataset, max_examples), tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = evaluate(model, data, prompt, batch_size, pad_id, tokenizer.eos_token_id, autocast=autocast)
    return result, [d.idx for d in data if d.label is not None]
