"""Examples -> token ids (with truncation that never cuts the answer) -> length-grouped batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptray.data import Example
from ptray.errors import PtrayError
from ptray.tasks import Task


@dataclass
class Batch:
    """Right-padded sequences and where their answer tokens are.

    input_ids, attention_mask: [B, L] (prompt not included).
    ans_seq, ans_pos: [A] sequence index and the position (in input_ids) whose next-token prediction is an answer
    token; ans_tokens: [A] the token to predict (the answer words, then EOS).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ans_seq: torch.Tensor
    ans_pos: torch.Tensor
    ans_tokens: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.attention_mask, self.ans_seq, self.ans_pos, self.ans_tokens)))


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, eos_id: int) -> Batch:
    """(source_ids, answer_ids) pairs -> a right-padded Batch. The input is source + answer; EOS is only predicted."""
    lengths = [len(s) + len(a) for s, a in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ans_seq, ans_pos, ans_tokens = [], [], []
    for i, (src, ans) in enumerate(seqs):
        ids = src + ans
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        targets = ans + [eos_id]
        ans_seq += [i] * len(targets)
        ans_pos += range(len(src) - 1, len(src) - 1 + len(targets))
        ans_tokens += targets
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(input_ids, attention_mask, as_long(ans_seq), as_long(ans_pos), as_long(ans_tokens))


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: the source (ends with the answer cue) and every label's answer ids."""

    idx: int
    source: list[int]
    answers: tuple[list[int], ...]
    label: int | None
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.source) + max(len(a) for a in self.answers)


def encode(task: Task, example: Example, tokenizer, max_length: int) -> Encoded:
    """Tokenise one example so that source + longest answer fits ``max_length`` (the prompt is not counted).

    When it does not fit, the longest text field is shortened (by tokens, from its end) and the example is
    formatted again, until it fits; the answer cue and the answer are never cut.
    """
    answers = tuple(tokenizer(t, add_special_tokens=False)["input_ids"] for t in task.answers)
    budget = max_length - max(len(a) for a in answers)
    fields = dict(example.fields)
    source = tokenizer(task.format(fields), add_special_tokens=False)["input_ids"]
    truncated = False
    while len(source) > budget:
        truncated = True
        field_ids = {f: tokenizer(fields[f], add_special_tokens=False)["input_ids"] for f in task.text_fields}
        longest = max(field_ids, key=lambda f: len(field_ids[f]))
        if not field_ids[longest]:
            raise PtrayError(
                f"{task.name} example {example.idx}: the template alone is longer than max_length={max_length} "
                f"tokens; raise --max-length"
            )
        keep = max(0, len(field_ids[longest]) - (len(source) - budget))
        fields[longest] = tokenizer.decode(field_ids[longest][:keep])
        source = tokenizer(task.format(fields), add_special_tokens=False)["input_ids"]
    return Encoded(example.idx, source, answers, example.label, truncated)


def encode_all(task: Task, examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    return [encode(task, ex, tokenizer, max_length) for ex in examples]


def train_batches(data: list[Encoded], batch_size: int, seed: int, epoch: int, pad_id: int, eos_id: int,
                  group: int = 50) -> list[Batch]:
    """One epoch of gold-answer batches: shuffled, then grouped by length to cut padding.

    The order depends only on (seed, epoch), so a run resumed at any epoch sees the same batches. Examples are
    shuffled, cut into pools of ``group`` batches, sorted by length inside a pool, batched, and the batches
    shuffled again (the HF Trainer's group_by_length idea).
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
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
