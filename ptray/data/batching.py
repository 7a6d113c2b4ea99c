"""Examples -> token ids (with truncation that never cuts the answer) -> length-grouped batches.

A source starts with the special tokens the tokenizer puts before a text by default (``special_prefix``: a BOS for
Llama- and Gemma-family tokenizers, nothing for BLOOM and GPT-2), so every length check and the truncation count
them; a prompt is prepended before them, as PEFT does (prompt rows, BOS, text).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ptray.data.superglue import Example
from ptray.data.tasks import Task, get_task
from ptray.data.tokens import answer_ids_in_context, source_ids, special_prefix, token_ids
from ptray.errors import PtrayError
from ptray.seeds import epoch_seed


@dataclass
class Batch:
    """Right-padded sequences and where their answer tokens are.

    input_ids, attention_mask: [B, L] (prompt not included; a BOS, where the tokenizer adds one, is input_ids' first
    token). ans_seq, ans_pos: [A] sequence index and the position (in input_ids) whose next-token prediction is an
    answer token; ans_tokens: [A] the token to predict (the answer words, then the EOS trained on); ans_end: [A] bool,
    whether that target is the answer's end (where exact match accepts any of the model's EOS ids). lengths: [B]
    host ints, each row's real tokens (``attention_mask``'s row sums, counted when the batch was built, so that
    nothing reads them back from a device; None: unknown, read from the mask).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ans_seq: torch.Tensor
    ans_pos: torch.Tensor
    ans_tokens: torch.Tensor
    ans_end: torch.Tensor
    lengths: tuple[int, ...] | None = None

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch (B)."""
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch, from the host-side ``lengths`` (no device sync) where known."""
        if self.lengths is not None:
            return sum(self.lengths)
        return int(self.attention_mask.sum())

    def row_lengths(self) -> list[int]:
        """Each row's real tokens [B] as host ints: ``lengths``, or the mask's row sums (one device sync)."""
        return list(self.lengths) if self.lengths is not None else self.attention_mask.sum(1).tolist()

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.ans_seq, self.ans_pos, self.ans_tokens, self.ans_end

    def to(self, device) -> Batch:
        """The batch with every tensor on ``device``; the copies are asynchronous only from pinned memory
        (``pin_memory``), where ``non_blocking`` means something."""
        return Batch(*(t.to(device, non_blocking=t.is_pinned()) for t in self._tensors()), lengths=self.lengths)

    def pin_memory(self) -> Batch:
        """The batch with every tensor in page-locked host memory (needs CUDA), so ``to`` copies asynchronously."""
        return Batch(*(t.pin_memory() for t in self._tensors()), lengths=self.lengths)


def stage(batches: list[Batch], device) -> list[Batch]:
    """``batches`` on ``device`` all at once (an epoch's, before its first step): on CUDA from pinned memory with
    asynchronous copies, so no step waits on a host-to-device copy; elsewhere plain ``Batch.to``. The host-side
    ``lengths`` go along (token counts need no device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return [b.pin_memory().to(device) for b in batches]
    return [b.to(device) for b in batches]


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, eos_id: int) -> Batch:
    """(source_ids, answer_ids) pairs -> a right-padded Batch. The input is source + answer; ``eos_id`` (the one EOS
    id trained on, ``ptray.lm.special.end_ids(...)[0]``) is only predicted, after the answer."""
    lengths = [len(s) + len(a) for s, a in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ans_seq, ans_pos, ans_tokens, ans_end = [], [], [], []
    for i, (src, ans) in enumerate(seqs):
        ids = src + ans
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        targets = ans + [eos_id]
        ans_seq += [i] * len(targets)
        ans_pos += range(len(src) - 1, len(src) - 1 + len(targets))
        ans_tokens += targets
        ans_end += [False] * len(ans) + [True]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(input_ids, attention_mask, as_long(ans_seq), as_long(ans_pos), as_long(ans_tokens),
                 torch.tensor(ans_end, dtype=torch.bool), tuple(lengths))


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: the source (the tokenizer's BOS if it adds one, then the text ending with the answer
    cue) and every label's answer ids."""

    idx: int
    source: list[int]
    answers: tuple[list[int], ...]
    label: int | None
    truncated: bool = False

    @property
    def length(self) -> int:
        """Tokens of the source plus the longest answer (what ``max_length`` bounds)."""
        return len(self.source) + max(len(a) for a in self.answers)


def _prefix_chars(tokenizer, text: str, ids: list[int], keep: int) -> int:
    """How many leading characters of ``text`` its first ``keep`` tokens ``ids[:keep]`` cover, never ending inside
    a character. Decoding a cut token list instead can end in half a multi-byte character, which decodes to U+FFFD."""
    if keep <= 0:
        return 0
    if keep >= len(ids):
        return len(text)
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).get("offset_mapping")
    except NotImplementedError:  # Python (slow) tokenizers have no offsets
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        return offsets[keep][0]  # where the first dropped token starts (byte-level: its whole character)
    # no offsets: the common prefix of the decoded tokens and the text, so nothing foreign enters the text
    return len(os.path.commonprefix([tokenizer.decode(ids[:keep]), text]))


def check_lengths(task: Task, tokenizer, max_length: int) -> None:
    """Refuse a ``max_length`` that cannot hold ``task``'s answer cue and its longest answer, after the special
    tokens the tokenizer starts a text with (its BOS; no truncation can make any example fit then). Raises
    PtrayError naming the limit."""
    bos = len(special_prefix(tokenizer))
    cue = len(token_ids(tokenizer, task.answer_cue))
    answer = max(len(a) for a in answer_ids_in_context(tokenizer, task.answer_cue, task.answers))  # as encode counts
    if bos + cue + answer > max_length:
        counts = f"{bos} BOS + {cue} + {answer}" if bos else f"{cue} + {answer}"
        raise PtrayError(
            f"--max-length {max_length} cannot hold {task.name}'s answer cue {task.answer_cue!r} and longest answer "
            f"({counts} tokens) with any text; raise --max-length (the examples need far more, e.g. 512)"
        )


def check_positions(model_config, prompt_tokens: int, max_length: int) -> None:
    """Refuse a prompt + ``max_length`` longer than the model's positions (``max_position_embeddings``; models
    without one, like BLOOM with ALiBi, have no limit). Raises PtrayError naming the limit."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + max_length > limit:
        raise PtrayError(
            f"{prompt_tokens} prompt tokens + --max-length {max_length} exceed the model's {limit} "
            f"positions (max_position_embeddings); lower --max-length to at most {limit - prompt_tokens}"
        )


def check_fits(task_names, tokenizer, model_config, cfg) -> None:
    """Every length check a run of ``cfg`` (a ``TrainConfig``) on each of ``task_names`` needs, before any work:
    ``check_lengths``, and ``check_positions`` with the longest prompt the run puts before a source (the soft
    prompt: ``cfg.num_tokens`` rows or the init text's length; with ``cfg.baselines`` also the init text itself as
    a hard prompt). ``train`` runs it first; a study's driver runs it for every task before any trial starts."""
    for name in task_names:
        task = get_task(name)
        check_lengths(task, tokenizer, cfg.max_length)
        init_tokens = len(token_ids(tokenizer, cfg.init_text if cfg.init_text is not None else task.init_text))
        soft = cfg.num_tokens or init_tokens
        check_positions(model_config, max(soft, init_tokens if cfg.baselines else 0), cfg.max_length)


def encode(task: Task, example: Example, tokenizer, max_length: int) -> Encoded:
    """Tokenise one example so that source + longest answer fits ``max_length`` (the prompt is not counted; the
    tokenizer's BOS, which starts the source where the tokenizer adds one by default, is).

    When it does not fit, the longest text field (in tokens) is cut at a character boundary by about the overflow
    and the example formatted again, until it fits; the answer cue, the other fields and the answer are never cut,
    and no character is added (no U+FFFD from a cut inside a multi-byte character). Every pass removes at least one
    character, so it always ends. Raises PtrayError when the example with every text field empty does not fit.
    """
    # the answer ids as the tokenizer produces them after the cue, which greedy decoding must reproduce
    answers = answer_ids_in_context(tokenizer, task.format(example.fields), task.answers)
    budget = max_length - max(len(a) for a in answers)
    fields = dict(example.fields)
    prefix = special_prefix(tokenizer)
    source = source_ids(tokenizer, task.format(fields), prefix)
    if len(source) <= budget:
        return Encoded(example.idx, source, answers, example.label)
    floor = len(source_ids(tokenizer, task.format({**fields, **{f: "" for f in task.text_fields}}), prefix))
    if floor > budget:
        raise PtrayError(
            f"{task.name} example {example.idx}: even with its text cut away, the template and the longest answer "
            f"take {floor + max(len(a) for a in answers)} tokens, over --max-length {max_length}; raise --max-length"
        )
    while len(source) > budget:  # ends: each pass shortens a field; with all of them empty the source is `floor`
        field_ids = {f: token_ids(tokenizer, fields[f]) for f in task.text_fields}
        longest = max(task.text_fields, key=lambda f: (len(field_ids[f]), len(fields[f])))
        text, ids = fields[longest], field_ids[longest]
        keep = max(0, len(ids) - (len(source) - budget))
        fields[longest] = text[:min(_prefix_chars(tokenizer, text, ids, keep), len(text) - 1)]
        source = source_ids(tokenizer, task.format(fields), prefix)
    return Encoded(example.idx, source, answers, example.label, truncated=True)


def encode_all(task: Task, examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    """``encode`` each example, after refusing a ``max_length`` too short for any (``check_lengths``)."""
    check_lengths(task, tokenizer, max_length)
    return [encode(task, ex, tokenizer, max_length) for ex in examples]


def train_batches(data: list[Encoded], batch_size: int, seed: int, epoch: int, pad_id: int, eos_id: int,
                  group: int = 50) -> list[Batch]:
    """One epoch of gold-answer batches: shuffled, then grouped by length to cut padding.

    The order depends only on (seed, epoch), so a run resumed at any epoch sees the same batches. Examples are
    shuffled, cut into pools of ``group`` batches, sorted by length inside a pool, batched, and the batches
    shuffled again (the HF Trainer's group_by_length idea).
    """
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(len(data), generator=gen).tolist()
    pool = batch_size * group
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: data[i].length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [collate([(data[i].source, data[i].answers[data[i].label]) for i in batches[j]], pad_id, eos_id)
            for j in perm]


def eval_batches(data: list[Encoded], batch_size: int, pad_id: int, eos_id: int):
    """Every (example, label) sequence, sorted by length, in batches of ``batch_size`` sequences.

    Yields ``(batch, keys)`` with ``keys[i] = (example position, label index)`` of sequence i.
    """
    keys = sorted(((e, k) for e, enc in enumerate(data) for k in range(len(enc.answers))),
                  key=lambda key: len(data[key[0]].source) + len(data[key[0]].answers[key[1]]))
    for start in range(0, len(keys), batch_size):
        part = keys[start:start + batch_size]
        yield collate([(data[e].source, data[e].answers[k]) for e, k in part], pad_id, eos_id), part
