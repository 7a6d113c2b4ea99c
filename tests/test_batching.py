"""Truncation never cuts the answer or its cue; epoch batches cover every example once, in a seed-fixed order."""

from ptray.batching import encode, eval_batches, train_batches, Encoded
from ptray.data import Example
from ptray.tasks import get_task


def test_truncation_shortens_longest_field_and_keeps_answer(tiny):
    _, tok = tiny
    task = get_task("rte")
    ex = Example("rte", "val", 0, {"premise": "The cat sat on the mat. " * 40, "hypothesis": "A cat sat."}, 1)
    full = encode(task, ex, tok, 10_000)
    assert not full.truncated
    enc = encode(task, ex, tok, 60)
    assert enc.truncated and enc.length <= 60
    text = tok.decode(enc.source)
    assert text.endswith("\nHypothesis: A cat sat.\nAnswer:")  # the short field and the cue are intact
    assert text.startswith("Premise: The cat sat on the mat.")
    assert enc.answers == full.answers and tok.decode(enc.answers[enc.label]) == " no"


def test_truncation_balances_two_long_fields(tiny):
    _, tok = tiny
    task = get_task("cb")
    ex = Example("cb", "val", 0, {"premise": "word " * 50, "hypothesis": "other " * 45}, 0)
    enc = encode(task, ex, tok, 40)
    text = tok.decode(enc.source)
    assert enc.length <= 40 and "Hypothesis: other" in text and text.endswith("\nAnswer:")


def test_train_batches_cover_each_example_once(tiny):
    _, tok = tiny
    data = [Encoded(i, [5] * (3 + i % 17), ([6],), 0) for i in range(103)]
    batches = train_batches(data, 8, seed=3, epoch=2, pad_id=3, eos_id=2, group=4)
    assert sum(b.num_seqs for b in batches) == 103
    # every example appears once: count sequences by their real length
    lengths = sorted(int(n) for b in batches for n in b.attention_mask.sum(1))
    assert lengths == sorted(len(d.source) + 1 for d in data)
    again = train_batches(data, 8, seed=3, epoch=2, pad_id=3, eos_id=2, group=4)
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(batches, again))
    other = train_batches(data, 8, seed=3, epoch=3, pad_id=3, eos_id=2, group=4)
    assert any(a.input_ids.shape != b.input_ids.shape or (a.input_ids != b.input_ids).any()
               for a, b in zip(batches, other))
    # grouping by length: padding is a small share of the tokens
    padded = sum(b.input_ids.numel() for b in batches)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    assert real / padded > 0.8


def test_eval_batches_hold_every_label_sequence():
    data = [Encoded(i, [5] * (2 + i), ([6], [7, 8], [9]), i % 3) for i in range(5)]
    keys = [k for _, ks in eval_batches(data, 4, 3, 2) for k in ks]
    assert sorted(keys) == [(e, k) for e in range(5) for k in range(3)]
