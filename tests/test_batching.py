"""Truncation never cuts the answer or its cue; epoch batches cover every example once, in a seed-fixed order."""

import random
import re
from types import SimpleNamespace

import pytest

from ptray.data.batching import Encoded, check_fits, check_positions, encode, encode_all, eval_batches, train_batches
from ptray.data.superglue import Example
from ptray.data.tasks import get_task
from ptray.data.tokens import token_ids
from ptray.errors import PtrayError
from ptray.seeds import MAX_SEED, epoch_seed


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


EMOJI = "\U0001F600"  # four bytes in UTF-8: the byte-level tokenizer spells it in several tokens


def test_truncation_inside_a_multibyte_character_ends_without_replacement_characters(tiny):
    # issue 12: cutting the emoji's tokens in the middle decoded to U+FFFD, which re-encoded as long: a hang
    _, tok = tiny
    ex = Example("cb", "val", 0, {"premise": EMOJI * 60, "hypothesis": "h"}, 0)
    enc = encode(get_task("cb"), ex, tok, 30)
    assert enc.truncated and enc.length <= 30
    assert tok.decode(enc.source) == f"Premise: {EMOJI * 4}\nHypothesis: h\nAnswer:"  # a fifth emoji would not fit


class _NoOffsets:
    """The tiny tokenizer as a Python (slow) tokenizer looks to ``encode``: no offset mapping."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tok(text, **kwargs)

    def decode(self, ids):
        return self.tok.decode(ids)


FIELD = re.compile(r"Premise: (.*)\nHypothesis: (.*)\nAnswer:", re.S)


def test_truncation_on_random_multibyte_text_fits_and_keeps_prefixes_of_the_fields(tiny):
    """Random fields of ASCII, accented, CJK and emoji text: every result fits, each field is a prefix of the
    original (nothing added, no U+FFFD), a field that was not cut is whole, and a tokenizer without offsets (the
    fallback) gives text of the same kind."""
    _, tok = tiny
    task = get_task("cb")
    rng = random.Random(0)
    alphabet = ["the", "cat", " ", " ", "é", "中文", EMOJI, "ß", "naïve", "\u00e2\u0080\u0099"]
    for i in range(40):
        fields = {f: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))).strip() or "x"
                  for f in ("premise", "hypothesis")}
        max_length = rng.randint(16, 90)
        for tokenizer in (tok, _NoOffsets(tok)):
            enc = encode(task, Example("cb", "val", i, fields, 0), tokenizer, max_length)
            assert enc.length <= max_length
            text = tok.decode(enc.source)
            premise, hypothesis = FIELD.fullmatch(text).groups()
            full_p, full_h = (" ".join(fields[f].split()) for f in ("premise", "hypothesis"))
            assert full_p.startswith(premise) and full_h.startswith(hypothesis), (fields, max_length, text)
            assert "\ufffd" not in text
            assert enc.truncated == ((premise, hypothesis) != (full_p, full_h))


def test_max_length_that_cannot_hold_the_cue_and_answer_is_refused_before_encoding(tiny):
    _, tok = tiny
    ex = Example("cb", "val", 0, {"premise": "p", "hypothesis": "h"}, 0)
    with pytest.raises(PtrayError, match=r"--max-length 3 cannot hold cb's answer cue 'Answer:' and longest answer"):
        encode_all(get_task("cb"), [ex], tok, 3)


def test_example_whose_fixed_fields_do_not_fit_is_refused_naming_the_limit(tiny):
    # WSC's pronoun and span are not text fields: they are never cut, so such an example cannot fit
    _, tok = tiny
    ex = Example("wsc", "val", 7, {"text": "Jane gave Joan candy.", "span1_text": "Jane " * 40, "span2_text": "she",
                                   "span1_index": 0, "span2_index": 5}, 1)
    with pytest.raises(PtrayError, match=r"wsc example 7: even with its text cut away, .* over --max-length 40"):
        encode(get_task("wsc"), ex, tok, 40)


def test_prompt_and_max_length_beyond_the_models_positions_are_refused():
    check_positions(SimpleNamespace(max_position_embeddings=64), 20, 44)  # exactly fits
    with pytest.raises(PtrayError, match=r"20 prompt tokens \+ --max-length 45 exceed the model's 64 positions .* "
                                         r"at most 44"):
        check_positions(SimpleNamespace(max_position_embeddings=64), 20, 45)
    check_positions(SimpleNamespace(), 100, 10**6)  # BLOOM (ALiBi) has no position limit


def test_check_fits_counts_the_longest_prompt_a_run_puts_before_a_source(tiny):
    _, tok = tiny
    init = len(token_ids(tok, get_task("cb").init_text))
    gpt2 = SimpleNamespace(max_position_embeddings=64)
    run = dict(max_length=64 - init, init_text=None, num_tokens=None, baselines=True)
    check_fits(["cb"], tok, gpt2, SimpleNamespace(**run))  # the init text's length + max length = 64: fits
    with pytest.raises(PtrayError, match=rf"^{init} prompt tokens \+ --max-length {65 - init} exceed"):
        check_fits(["cb"], tok, gpt2, SimpleNamespace(**{**run, "max_length": 65 - init}))
    with pytest.raises(PtrayError, match=rf"^{init} prompt tokens"):  # the init-text baseline is the longest
        check_fits(["cb"], tok, gpt2, SimpleNamespace(**{**run, "max_length": 65 - init, "num_tokens": 2}))
    check_fits(["cb"], tok, gpt2, SimpleNamespace(**{**run, "max_length": 62, "num_tokens": 2, "baselines": False}))
    with pytest.raises(PtrayError, match=r"^40 prompt tokens \+ --max-length 25"):  # more rows than the init text
        check_fits(["cb"], tok, gpt2, SimpleNamespace(**{**run, "max_length": 25, "num_tokens": 40}))
    with pytest.raises(PtrayError, match="--max-length 2 cannot hold copa's answer cue"):
        check_fits(["copa", "cb"], tok, SimpleNamespace(), SimpleNamespace(**{**run, "max_length": 2}))


def test_epoch_seeds_keep_the_old_order_and_never_overflow():
    data = [Encoded(i, [5] * (3 + i % 7), ([6],), 0) for i in range(20)]
    assert epoch_seed(3, 2) == 3 * 100_003 + 2 == 300_011  # the formula every run so far used
    assert epoch_seed(MAX_SEED, 50) == MAX_SEED * 100_003 + 50  # every valid seed and epoch: unchanged
    assert epoch_seed(184461906879890, 1) == (184461906879890 * 100_003 + 1) % 2**64  # over 2**64 before wrapping
    train_batches(data, 4, seed=184461906879890, epoch=1, pad_id=3, eos_id=2)  # issue 12: overflowed in torch
