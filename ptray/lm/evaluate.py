"""Evaluate a prompt (soft, hard or none) on encoded examples: loss, exact match and rank accuracy in one pass.

Exact match (the paper's metric): greedy decoding produces exactly the gold label's answer words, then ends.
Under teacher forcing this is "every answer position's argmax is the answer token, and the argmax after the last
answer token is one of the model's EOS ids" (any of them, as ``generate`` stops at any: ``ptray.lm.special``), so
one forward pass replaces ``generate`` (tests/test_evaluate.py and tests/test_special_tokens.py check it against
``model.generate`` example by example). Generated text that matches no label is simply wrong. The loss scores one
EOS id, the one trained on (``ptray.lm.special.end_ids``).

Rank accuracy: the label whose answer words + EOS have the highest total log-likelihood is the prediction.
Every label is scored; the gold one also gives the loss and exact match.

Two ways to score the labels, with the same numbers (tests/test_evaluate.py checks one against the other):
- per label (any causal LM): prompt + source + answer once per label, in length-sorted batches;
- source shared (BLOOM, the default there): prompt + source once per example, keeping its KV cache; the last
  source position scores every label's first answer token, then one short pass over the labels' answer tokens
  (the cache repeated per label) scores the rest and EOS. This saves (labels - 1) source passes: 2.5x less
  evaluation time over the four tasks in BENCHMARKS.md's CPU run. The padding between a short source and its
  answers must change nothing: positions skip it (from the mask, or ``position_ids`` passed explicitly, see
  ``ptray.families``); where that is not exact (a sliding window shorter than the sequences, an untested family
  that failed the check) the per-label path is used.

``evaluate_prompts`` scores many prompts at once (the transfer grid: every prompt of a study on one target): the
rows of the shared source pass are (prompt, example) pairs, each with its own prompt, so a pass serves several
prompts (tests/test_evaluate.py checks each prompt's result against its own per-label evaluation).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptray.data.batching import Encoded, encode_all, eval_batches
from ptray.data.superglue import DEFAULT_HUB_DATASET, load_split
from ptray.data.tasks import Task, get_task
from ptray.data.tokens import pad_token_id, special_prefix
from ptray.lm import families
from ptray.lm.attention import right_padded_rows
from ptray.lm.forward import answer_logprobs, greedy_ok
from ptray.lm.special import answer_ends, end_ids


@dataclass
class EvalResult:
    """One evaluation's metrics and per-example outcomes (lists in the order of the labeled input examples)."""

    loss: float  # mean token NLL over the gold answers (+EOS), as the training loss
    exact_match: float
    rank_accuracy: float
    num_examples: int
    em_correct: list[int] = field(default_factory=list)  # per example, in input order
    rank_correct: list[int] = field(default_factory=list)
    rank_pred: list[int] = field(default_factory=list)  # predicted label index per example

    def metrics(self) -> dict[str, float]:
        """``eval_loss`` (mean token NLL), ``exact_match`` and ``rank_accuracy`` (fractions in [0, 1])."""
        return {"eval_loss": self.loss, "exact_match": self.exact_match, "rank_accuracy": self.rank_accuracy}


def shares_source(model, data: list[Encoded] | None = None, num_prompt_tokens: int = 0) -> bool:
    """Whether ``evaluate`` can score all labels of ``data`` from one source pass on ``model`` exactly
    (``ptray.lm.families.shares_source_up_to``; None: for any data)."""
    length = None
    if data:
        length = num_prompt_tokens + max(len(d.source) for d in data) + max(len(a) for d in data for a in d.answers)
    return families.shares_source_up_to(model, length)


@torch.no_grad()
def evaluate(model, data: list[Encoded], prompt: torch.Tensor | None, batch_size: int, pad_id: int,
             eos_id: int | Sequence[int], device=None, autocast=None, share_source: bool | None = None) -> EvalResult:
    """Score every label of every (labeled) example with ``prompt`` [n, embed_dim] prepended (None: no prompt).

    ``eos_id``: the ids that end an answer, the first scored in the loss (``ptray.lm.special.end_ids(model,
    tokenizer)``); an int that is one of the model's EOS ids stands for all of them (``answer_ends``), so exact
    match accepts whichever greedy ``generate`` would stop at. ``batch_size`` counts sequences (example x label),
    in both ways. ``autocast`` is a context-manager factory
    (accelerate's) for mixed precision; None runs in the model's dtype. ``share_source``: None picks the shared
    source pass where the model allows it (``shares_source``), False forces one pass per label.
    """
    data = [d for d in data if d.label is not None]
    if not data:
        raise ValueError("no labeled examples to evaluate")
    n = 0 if prompt is None else prompt.shape[0]
    if share_source is None:
        share_source = shares_source(model, data, n)
    elif share_source and not shares_source(model, data, n):
        raise ValueError(f"share_source=True is not exact on this {getattr(model.config, 'model_type', None)!r} "
                         f"model for these lengths (see ptray.lm.families.shares_source); use share_source=None")
    device = device or next(model.parameters()).device
    prompt = prompt.to(device) if prompt is not None else None
    eos_id = answer_ends(model, eos_id)
    if share_source:
        scored = _score_shared_many(model, data, [prompt], batch_size, pad_id, eos_id, device, autocast)
    else:
        per_label = _score_per_label(model, data, prompt, batch_size, pad_id, eos_id, device, autocast)
        scored = (([(0, e, k) for e, k in keys], logp, wrong) for keys, logp, wrong in per_label)
    return _results(data, 1, scored)[0]


@torch.no_grad()
def evaluate_prompts(model, data: list[Encoded], prompts: list[torch.Tensor | None], batch_size: int, pad_id: int,
                     eos_id: int | Sequence[int], device=None, autocast=None) -> list[EvalResult]:
    """``[evaluate(model, data, p, ...) for p in prompts]`` (the same numbers), with many prompts per forward: the
    transfer grid evaluates every prompt of a study on one target task this way.

    Each prompt is [n_p, embed_dim] (lengths may differ) or None (no prompt). Where the model shares the source pass
    (``shares_source``, BLOOM), its rows are (prompt, example) pairs sorted by length across all prompts, so a pass
    holds ``batch_size`` sequences of several prompts (``_score_shared_many``); elsewhere each prompt is evaluated
    on its own. Raises ValueError when ``data`` has no labeled example.
    """
    data = [d for d in data if d.label is not None]
    if not data:
        raise ValueError("no labeled examples to evaluate")
    longest = max((p.shape[0] for p in prompts if p is not None), default=0)
    if not prompts or not shares_source(model, data, longest):
        return [evaluate(model, data, p, batch_size, pad_id, eos_id, device=device, autocast=autocast)
                for p in prompts]
    device = device or next(model.parameters()).device
    prompts = [p.to(device) if p is not None else None for p in prompts]
    eos_id = answer_ends(model, eos_id)
    scored = _score_shared_many(model, data, prompts, batch_size, pad_id, eos_id, device, autocast)
    return _results(data, len(prompts), scored)


def evaluate_together(model, jobs: list[tuple[list[Encoded], torch.Tensor | None, int]], pad_id: int,
                      eos_id: int | Sequence[int], device=None, autocast=None) -> list[EvalResult]:
    """Each job ``(data, prompt, batch_size)`` evaluated as ``evaluate(model, data, prompt, batch_size, ...)``;
    jobs on the same data (the same list object) and batch size run together, several prompts per pass
    (``evaluate_prompts``: the same numbers within fp32 rounding), a job alone through ``evaluate`` itself. Returns
    the results in the order of ``jobs``. Raises ValueError when a job's data has no labeled example."""
    together: dict[tuple, list[int]] = {}
    for j, (data, _, batch_size) in enumerate(jobs):
        together.setdefault((id(data), batch_size), []).append(j)
    results: list[EvalResult | None] = [None] * len(jobs)
    for js in together.values():
        data, _, batch_size = jobs[js[0]]
        if len(js) == 1:
            out = [evaluate(model, data, jobs[js[0]][1], batch_size, pad_id, eos_id, device, autocast)]
        else:
            out = evaluate_prompts(model, data, [jobs[j][1] for j in js], batch_size, pad_id, eos_id, device, autocast)
        for j, r in zip(js, out):
            results[j] = r
    return results


def _results(data: list[Encoded], num_prompts: int, scored) -> list[EvalResult]:
    """Each prompt's ``EvalResult`` from scored sequences: ``(keys, logp, wrong)`` with keys (prompt, example,
    label), every (prompt, example, label) once."""
    score = [[[0.0] * len(d.answers) for d in data] for _ in range(num_prompts)]
    em = [[0] * len(data) for _ in range(num_prompts)]
    nll = [[0.0, 0] for _ in range(num_prompts)]  # summed NLL and its token count, per prompt
    for keys, seq_logp, seq_wrong in scored:
        for i, (p, e, k) in enumerate(keys):
            score[p][e][k] = seq_logp[i]
            if k == data[e].label:
                em[p][e] = int(seq_wrong[i] == 0)
                nll[p][0] -= seq_logp[i]
                nll[p][1] += len(data[e].answers[k]) + 1
    results = []
    for p in range(num_prompts):
        pred = [max(range(len(s)), key=s.__getitem__) for s in score[p]]
        rank = [int(q == d.label) for q, d in zip(pred, data)]
        results.append(EvalResult(
            loss=nll[p][0] / nll[p][1],
            exact_match=sum(em[p]) / len(data),
            rank_accuracy=sum(rank) / len(data),
            num_examples=len(data),
            em_correct=em[p],
            rank_correct=rank,
            rank_pred=pred,
        ))
    return results


def _autocast(autocast):
    return autocast() if autocast is not None else contextlib.nullcontext()


def _uncompiled():
    """Passes with a KV cache run blocks compiled by ``--compile`` (``ptray.lm.load.compile_blocks``) eagerly: a
    compiled block specialises on each layer's cache state (one graph per layer and state, 60 for a 30-layer model),
    past dynamo's recompile limit, for the forward-only evaluation that is a small share of a study's time."""
    return torch.compiler.set_stance("force_eager")


def _score_per_label(model, data, prompt, batch_size, pad_id, ends, device, autocast):
    """Yields ``(keys, logp, wrong)``: per (example, label) sequence its summed log-probability and its count of
    non-greedy answer tokens (0: exact match), one teacher-forced pass per sequence. ``ends``: the ids that end an
    answer, the first scored."""
    accepted = torch.tensor(ends, device=device)
    for batch, keys in eval_batches(data, batch_size, pad_id, ends[0]):
        batch = batch.to(device)
        with _autocast(autocast):
            logp, ok = answer_logprobs(model, batch, prompt, accepted)
        per_seq = torch.zeros(2, batch.num_seqs, device=device, dtype=torch.float64)
        per_seq[0].index_add_(0, batch.ans_seq, logp.double())
        per_seq[1].index_add_(0, batch.ans_seq, (~ok).double())
        seq_logp, seq_wrong = per_seq.tolist()  # one device sync per batch
        yield keys, seq_logp, seq_wrong


def _score_shared_many(model, data, prompts, batch_size, pad_id, ends, device, autocast):
    """As ``_score_per_label``, with one prompt + source pass per (prompt, example) and a short pass over the
    answers (the cache repeated per label), for several prompts (each [n_p, embed_dim] or None) at once: each row has
    its own prompt before its source (rows differ in prompt length as in source length, both right-padded), so one
    forward serves many prompts. Yields ``(keys, logp, wrong)`` with keys ``(prompt index, example, label)``.
    ``ends``: the ids that end an answer, the first scored."""
    eos_id, accepted = ends[0], torch.tensor(ends, device=device)
    labels = max(len(d.answers) for d in data)
    per_batch = max(1, batch_size // labels)  # the answer pass has rows x labels rows, as many as batch_size
    lengths = [0 if p is None else p.shape[0] for p in prompts]
    items = sorted(((p, e) for p in range(len(prompts)) for e in range(len(data))),
                   key=lambda pe: lengths[pe[0]] + len(data[pe[1]].source))
    for start in range(0, len(items), per_batch):
        part = items[start:start + per_batch]
        b, k = len(part), max(len(data[e].answers) for _, e in part)
        m = max(len(a) for _, e in part for a in data[e].answers)
        width = max(lengths[p] + len(data[e].source) for p, e in part)
        src = torch.full((b, width), pad_id, dtype=torch.long)  # token ids after each row's prompt rows
        src_mask = torch.zeros((b, width), dtype=torch.long)
        last = torch.zeros(b, dtype=torch.long)  # the last source position (predicts the first answer token)
        ans = torch.full((b * k, m), pad_id, dtype=torch.long)  # row r * k + j: item r, label j
        ans_mask = torch.zeros((b * k, m), dtype=torch.long)
        first = torch.zeros(b * k, dtype=torch.long)  # each row's first answer token
        rest = torch.full((b * k, m), -1, dtype=torch.long)  # answer position t predicts token t + 1, then EOS
        rest_end = torch.zeros((b * k, m), dtype=torch.bool)  # where ``rest`` is the answer's end
        keys = []
        for r, (p, e) in enumerate(part):
            s, n = data[e].source, lengths[p]
            src[r, n:n + len(s)] = torch.tensor(s)
            src_mask[r, :n + len(s)] = 1
            last[r] = n + len(s) - 1
            for j in range(k):
                keys.append((p, e, j))
                if j >= len(data[e].answers):  # a label this example lacks: scored, never read
                    continue
                a = data[e].answers[j]
                ans[r * k + j, :len(a)] = torch.tensor(a)
                ans_mask[r * k + j, :len(a)] = 1
                first[r * k + j] = a[0]
                rest[r * k + j, :len(a)] = torch.tensor(a[1:] + [eos_id])
                rest_end[r * k + j, len(a) - 1] = True
        rows, pos = (rest >= 0).nonzero(as_tuple=True)  # every answer token and EOS to score
        targets, is_end = rest[rows, pos], rest_end[rows, pos].to(device)
        src, src_mask, last = src.to(device), src_mask.to(device), last.to(device)
        ans, ans_mask, first = ans.to(device), ans_mask.to(device), first.to(device)
        rows, pos, targets = rows.to(device), pos.to(device), targets.to(device)
        embeds = families.embed(model, src)
        for p in sorted({p for p, _ in part if lengths[p]}):  # each prompt's rows over its rows' first positions
            sel = torch.tensor([r for r, (q, _) in enumerate(part) if q == p], device=device)
            embeds[sel, :lengths[p]] = prompts[p].to(device=device, dtype=embeds.dtype)
        with _autocast(autocast), _uncompiled():
            with right_padded_rows():  # each row: its prompt, its source, then padding
                out = families.base_forward(model, embeds, src_mask,
                                            position_ids=families.position_ids(model, src_mask), use_cache=True)
            logits = families.logits(model, out.last_hidden_state[torch.arange(b, device=device), last])  # [b, V]
            cache = families.output_cache(out)
            cache.batch_repeat_interleave(k)
            mask = torch.cat([src_mask.repeat_interleave(k, dim=0), ans_mask], dim=1)
            hidden = families.base_forward(
                model, families.embed(model, ans), mask, cache=cache,
                position_ids=families.position_ids(model, mask, past=src_mask.shape[1]), use_cache=True,
            ).last_hidden_state  # [b * k, m, hidden]
            rest_logits = families.logits(model, hidden[rows, pos])  # [answer tokens + EOS of every row, V]
        logits = logits.repeat_interleave(k, dim=0)  # [b * k, V]
        first_lp = logits.log_softmax(-1).gather(1, first.unsqueeze(1)).squeeze(1)
        rest_lp = rest_logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        per_seq = torch.zeros(2, b * k, device=device, dtype=torch.float64)
        per_seq[0] = first_lp.double()
        per_seq[1] = (logits.argmax(-1) != first).double()
        per_seq[0].index_add_(0, rows, rest_lp.double())
        per_seq[1].index_add_(0, rows, (~greedy_ok(rest_logits.argmax(-1), targets, is_end, accepted)).double())
        seq_logp, seq_wrong = per_seq.tolist()  # one device sync per batch
        keep = [i for i, (_, e, j) in enumerate(keys) if j < len(data[e].answers)]
        yield [keys[i] for i in keep], [seq_logp[i] for i in keep], [seq_wrong[i] for i in keep]


_ENCODED: collections.OrderedDict = collections.OrderedDict()  # encoded splits, most recently used last
_ENCODED_MAX = 16  # splits kept per process
_TOKENIZER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_key(tokenizer) -> tuple:
    """What identifies a tokenizer's output: a digest of a fast tokenizer's whole definition (vocabulary, merges,
    normalisation, added tokens), so a tokenizer loaded again from the same files hits the cache; other tokenizers
    by identity (the cache entry holds them, so their id is not reused)."""
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
        key = (type(tokenizer).__name__, digest, tuple(special_prefix(tokenizer)))
    else:
        key = ("object", id(tokenizer))
    with contextlib.suppress(TypeError):
        _TOKENIZER_KEYS[tokenizer] = key
    return key


def encoded_split(task: Task, split: str, tokenizer, max_length: int, data_dir: str | None = None,
                  hub_dataset: str = DEFAULT_HUB_DATASET, max_examples: int | None = None) -> list[Encoded]:
    """``encode_all(task, load_split(task, split, data_dir, hub_dataset, max_examples), tokenizer, max_length)``,
    read and encoded once per process: the prompts of a group (seeds of one task) and later groups in the same
    process share one list (read-only: do not change it). Keyed by the task's declaration (its digest), the split,
    the data file (path, size, modification time) or Hub dataset, ``max_examples``, ``max_length`` and the
    tokenizer (``_tokenizer_key``); the ``_ENCODED_MAX`` most recently used splits are kept. Raises what
    ``load_split`` and ``encode_all`` raise (PtrayError), and caches nothing then.
    """
    where: tuple = (hub_dataset,)
    if data_dir is not None:
        path = Path(data_dir) / getattr(task, "dir_name", task.name) / f"{split}.jsonl"
        stat = path.stat() if path.is_file() else None
        where = (str(Path(data_dir).resolve()), stat and stat.st_size, stat and stat.st_mtime_ns)
    key = (task.name, getattr(task, "digest", None), split, where, max_examples, max_length,
           _tokenizer_key(tokenizer))
    if key in _ENCODED:
        _ENCODED.move_to_end(key)
        return _ENCODED[key][1]
    data = encode_all(task, load_split(task, split, data_dir, hub_dataset, max_examples), tokenizer, max_length)
    _ENCODED[key] = (tokenizer, data)  # the tokenizer held: an identity key stays its own
    while len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return data


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
    data = encoded_split(task, split, tokenizer, max_length, data_dir, hub_dataset, max_examples)
    result = evaluate(model, data, prompt, batch_size, pad_token_id(tokenizer), end_ids(model, tokenizer),
                      autocast=autocast)
    return result, [d.idx for d in data if d.label is not None]
