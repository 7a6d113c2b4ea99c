"""One-pass exact match against greedy `generate`, rank accuracy against a naive loop, on random inputs; both ways
of scoring the labels (one pass per label, one shared source pass) against those references and each other."""

import pytest
import torch

from ptray.data.batching import Encoded
from ptray.lm.evaluate import evaluate, shares_source


def _greedy(model, src, prompt, max_new, eos, pad):
    x = model.get_input_embeddings()(torch.tensor([src]))
    x = torch.cat([prompt[None], x], 1)
    out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0].tolist()


@pytest.mark.parametrize("share_source", [True, False])
def test_one_pass_exact_match_equals_generate(tiny, share_source):
    """Per example: EM from one teacher-forced pass == (greedy generate gives exactly answer + EOS).

    Each group shares one EOS token, taken from a real greedy continuation, so the group holds examples that
    are right (answer = greedy prefix, then EOS), wrong in the answer, wrong at EOS, and random ones.
    """
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(4, model.config.hidden_size, generator=gen) * 0.5
    vocab, pad = len(tok), tok.pad_token_id
    checked = right = 0
    for _ in range(6):
        src = torch.randint(4, vocab, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen).tolist()
        g = _greedy(model, src, prompt, 4, None, pad)  # the greedy continuation, no early stop
        eos = g[2]
        if eos in g[:2]:
            continue  # generate would stop early; the group then tests nothing new
        examples = [
            (src, [g[0], g[1]]),  # greedy answer then EOS: right
            (src, [g[0], (g[1] + 1) % vocab or 5]),  # second answer token wrong
            (src, [g[0]]),  # greedy continues with g[1], not EOS: wrong
        ]
        for _ in range(5):
            s = torch.randint(4, vocab, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
            examples.append((s, torch.randint(4, vocab, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                              generator=gen).tolist()))
        data = [Encoded(i, s, (a,), 0) for i, (s, a) in enumerate(examples)]
        res = evaluate(model, data, prompt, batch_size=3, pad_id=pad, eos_id=eos, share_source=share_source)
        for (s, a), em in zip(examples, res.em_correct):
            ref = _greedy(model, s, prompt, len(a) + 1, eos, pad)[: len(a) + 1] == a + [eos]
            assert em == int(ref), (s, a, eos)
            checked += 1
            right += em
    assert checked >= 24 and right >= 3  # both outcomes really occurred


@pytest.mark.parametrize("share_source", [True, False])
def test_rank_accuracy_and_loss_equal_naive_loop(tiny, share_source):
    model, tok = tiny
    gen = torch.Generator().manual_seed(5)
    vocab, pad, eos = len(tok), tok.pad_token_id, tok.eos_token_id
    answers = ([10, 11], [12], [13, 14, 15])
    data = []
    for i in range(9):
        s = torch.randint(4, vocab, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
        data.append(Encoded(i, s, answers, i % 3))
    res = evaluate(model, data, None, batch_size=4, pad_id=pad, eos_id=eos, share_source=share_source)
    preds, nll, count = [], 0.0, 0
    with torch.no_grad():
        for d in data:
            scores = []
            for k, a in enumerate(d.answers):
                logits = model(input_ids=torch.tensor([d.source + a])).logits[0]
                lp = torch.log_softmax(logits[len(d.source) - 1:], -1)
                tok_lp = lp.gather(1, torch.tensor(a + [eos])[:, None]).squeeze(1)
                scores.append(tok_lp.sum().item())
                if k == d.label:
                    nll -= tok_lp.sum().item()
                    count += len(a) + 1
            preds.append(max(range(3), key=scores.__getitem__))
    assert res.rank_pred == preds
    assert res.rank_accuracy == sum(p == d.label for p, d in zip(preds, data)) / len(data)
    assert abs(res.loss - nll / count) < 1e-5


def test_unlabeled_examples_are_skipped(tiny):
    model, tok = tiny
    data = [Encoded(0, [5, 6, 7], ([8],), 0), Encoded(1, [5, 6], ([8],), None)]
    res = evaluate(model, data, None, 8, tok.pad_token_id, tok.eos_token_id)
    assert res.num_examples == 1 and len(res.em_correct) == 1


def _random_examples(n, vocab, seed):
    """Sources of 1-40 random ids; 2 or 3 labels of 1-3-token answers (the label count varies within a batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src = torch.randint(4, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        labels = 2 + i % 2
        answers = tuple(torch.randint(4, vocab, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
                        for _ in range(labels))
        out.append(Encoded(i, src, answers, int(torch.randint(0, labels, (1,), generator=g))))
    return out


@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_shared_source_pass_equals_one_pass_per_label(tiny, batch_size):
    """The shared source pass (KV cache repeated per label) gives the per-label path's loss, exact match and
    rank prediction, with a prompt and without, on random inputs of uneven lengths."""
    model, tok = tiny
    assert shares_source(model)  # the tiny model is a BLOOM: evaluate's default is the shared pass
    data = _random_examples(23, len(tok), seed=batch_size)
    prompt = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    for p in (prompt, None):
        kw = dict(batch_size=batch_size, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        ref = evaluate(model, data, p, share_source=False, **kw)
        got = evaluate(model, data, p, share_source=True, **kw)
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        assert got.em_correct == ref.em_correct and got.rank_pred == ref.rank_pred
        assert got.rank_accuracy == ref.rank_accuracy


def test_shared_source_pass_refuses_sequences_longer_than_a_sliding_window(tiny):
    """A sliding window counts cache slots, padding included: sharing is exact only when everything fits in it."""
    model, tok = tiny
    data = [Encoded(0, [5, 6, 7], ([8],), 0)]
    model.config.sliding_window = 3  # prompt-free length 3 + 1 = 4 > 3
    try:
        assert not shares_source(model, data) and shares_source(model, data[:0] or None) is False
        with pytest.raises(ValueError, match="is not exact"):
            evaluate(model, data, None, 8, tok.pad_token_id, tok.eos_token_id, share_source=True)
        assert evaluate(model, data, None, 8, tok.pad_token_id, tok.eos_token_id).num_examples == 1  # per label
        model.config.sliding_window = 4
        assert shares_source(model, data)
    finally:
        del model.config.sliding_window


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_many_prompts_per_pass_equal_each_prompt_alone(tiny, batch_size):
    """The transfer grid's grouped evaluation (prompts of different lengths and no prompt, rows of several prompts
    in one pass) gives each prompt's own evaluation: the per-label reference's loss, exact match and ranking."""
    from ptray.lm.evaluate import evaluate_prompts

    model, tok = tiny
    data = _random_examples(17, len(tok), seed=10 + batch_size)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, model.config.hidden_size, generator=g) * 0.5 for n in (5, 2, 9)]
    prompts.insert(1, None)
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    got = evaluate_prompts(model, data, prompts, batch_size, **kw)
    assert len(got) == 4
    for p, res in zip(prompts, got):
        ref = evaluate(model, data, p, batch_size, share_source=False, **kw)
        assert res.loss == pytest.approx(ref.loss, rel=1e-5)
        assert res.em_correct == ref.em_correct and res.rank_pred == ref.rank_pred
        assert res.rank_accuracy == ref.rank_accuracy and res.num_examples == ref.num_examples
    assert len({r.loss for r in got}) == 4  # the prompts really differ: a mixed-up row would show
    assert evaluate_prompts(model, data, [], batch_size, **kw) == []
