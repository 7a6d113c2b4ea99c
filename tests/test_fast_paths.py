"""Each fast path the benchmark measures, against the slower reference it replaces, on a tiny random BLOOM.

Random token ids stand in for text (the paths do not care what the ids mean); values are compared with
tolerances: fp32 paths to ~1e-5, bf16 autocast loosely.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import variants as V  # noqa: E402
from benchmarks.measure import PeakMemory, Shape  # noqa: E402
from ptray.data.batching import Encoded, collate, train_batches  # noqa: E402
from ptray.lm.forward import answer_logprobs  # noqa: E402
from ptray.lm.load import load_model  # noqa: E402
from ptray.lm.prompt import init_prompt  # noqa: E402

INIT_TEXT = "Does the hypothesis entail the premise?"


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    """A private copy of the tiny BLOOM (PEFT and the Trainer touch the model they wrap)."""
    return load_model(str(tiny_model_dir))


def random_examples(n: int, vocab: int, seed: int = 0, labels: int = 2) -> list[Encoded]:
    """Sources of 4-40 random ids and 1-2-token answers, with a random gold label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 40, (1,), generator=g))
        source = torch.randint(4, vocab, (length,), generator=g).tolist()
        answers = tuple(torch.randint(4, vocab, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g).tolist()
                        for _ in range(labels))
        out.append(Encoded(i, source, answers, int(torch.randint(0, labels, (1,), generator=g))))
    return out


def gold_batch(data: list[Encoded], tok):
    return collate([(d.source, d.answers[d.label]) for d in data], tok.pad_token_id, tok.eos_token_id)


def loss_and_grad(fn, model, batch, init):
    prompt = init.clone().requires_grad_(True)
    loss = fn(model, batch, prompt)
    (grad,) = torch.autograd.grad(loss, prompt)
    return loss.detach(), grad


def per_example_nll(model, batch, prompt):
    """Mean NLL of each sequence's answer tokens (+EOS), in batch order."""
    logp, _ = answer_logprobs(model, batch, prompt)
    sums = torch.zeros(batch.num_seqs, dtype=torch.float64).index_add(0, batch.ans_seq, -logp.double())
    return sums / torch.bincount(batch.ans_seq, minlength=batch.num_seqs)


# ------------------------------------------------------------------------------------- answer-only logits


def test_answer_only_loss_and_gradient_equal_peft_prompt_tuning(model_tok, tiny_model_dir):
    """ptray's loss (LM head at the answer positions) = PEFT's prompt-tuning model with -100 labels, and so does
    the prompt gradient; PEFT's TEXT init starts from ptray's init_prompt."""
    model, tok = model_tok
    base = copy.deepcopy(model)
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    pm = V.peft_model(base, str(tiny_model_dir), INIT_TEXT, init.shape[0])
    peft_prompt = pm.prompt_encoder["default"].embedding.weight
    assert torch.equal(peft_prompt.detach(), init)

    data = random_examples(6, len(tok), seed=1)
    recs = V.lm_records(data, tok.eos_token_id)
    width = max(len(r["input_ids"]) for r in recs)
    pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731 - right padding
    out = pm(input_ids=torch.tensor(pad([r["input_ids"] for r in recs], tok.pad_token_id)),
             attention_mask=torch.tensor(pad([r["attention_mask"] for r in recs], 0)),
             labels=torch.tensor(pad([r["labels"] for r in recs], -100)))
    out.loss.backward()

    loss, grad = loss_and_grad(V.answer_loss, model, gold_batch(data, tok), init)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, peft_prompt.grad, rtol=1e-4, atol=1e-6)


def test_full_logits_ablation_computes_the_same_loss_and_gradient(model_tok):
    model, tok = model_tok
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    batch = gold_batch(random_examples(8, len(tok), seed=2), tok)
    fast = loss_and_grad(V.answer_loss, model, batch, init)
    slow = loss_and_grad(V.full_logits_loss, model, batch, init)
    assert fast[0].item() == pytest.approx(slow[0].item(), rel=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ length grouping


def test_length_grouped_batches_give_the_same_per_example_losses_as_unsorted(model_tok):
    """Grouping by length changes only how much padding a row gets; with right padding a row's loss does not move."""
    model, tok = model_tok
    data = random_examples(40, len(tok), seed=3)
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def losses_by_example(batches_fn):
        got = {}
        for batch in batches_fn(data, 8, 0, 1, pad, eos):
            nll = per_example_nll(model, batch, init)
            for row, value in enumerate(nll.tolist()):
                key = (tuple(batch.input_ids[row][batch.attention_mask[row].bool()].tolist()))
                got[key] = value
        return got

    with torch.no_grad():
        grouped, unsorted = losses_by_example(train_batches), losses_by_example(V.random_batches)
        alone = {}
        for d in data:  # each example in a batch of its own: no padding at all
            alone[tuple(d.source + d.answers[d.label])] = per_example_nll(model, gold_batch([d], tok), init).item()
    assert grouped.keys() == unsorted.keys() == alone.keys() and len(alone) == len(data)
    for key, value in alone.items():
        assert grouped[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert unsorted[key] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_grouping_cuts_padding_and_both_orders_cover_every_example_once(model_tok):
    _, tok = model_tok
    data = random_examples(200, len(tok), seed=4)
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def stats(batches):
        seen = Counter(tuple(b.input_ids[r][b.attention_mask[r].bool()].tolist()) for b in batches
                       for r in range(b.num_seqs))
        padding = sum(int((1 - b.attention_mask).sum()) for b in batches)
        return seen, padding

    grouped, grouped_pad = stats(train_batches(data, 8, 0, 1, pad, eos))
    unsorted, unsorted_pad = stats(V.random_batches(data, 8, 0, 1, pad, eos))
    assert grouped == unsorted and sum(grouped.values()) == len(data)
    assert grouped_pad < unsorted_pad / 3


# ---------------------------------------------------------------------------------- bf16 and frozen weights


def test_bf16_autocast_with_fp32_prompt_is_close_to_fp32(model_tok):
    """bf16 weights + bf16 autocast (ptray's GPU precision) with the prompt kept in fp32: the prompt and its gradient
    stay fp32, the loss is within bf16 rounding of fp32's and the gradient points the same way."""
    model, tok = model_tok
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    batch = gold_batch(random_examples(8, len(tok), seed=5), tok)
    loss32, grad32 = loss_and_grad(V.answer_loss, model, batch, init)
    prompt = init.clone().requires_grad_(True)
    with V.autocast_factory("cpu", "bf16")():
        loss16 = V.answer_loss(model16, batch, prompt)
    loss16.backward()
    assert prompt.dtype == prompt.grad.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(prompt.grad.flatten(), grad32.flatten(), dim=0)
    assert cos > 0.98
    assert (prompt.grad.norm() / grad32.norm()).item() == pytest.approx(1.0, abs=0.1)


def test_ptray_step_trains_only_the_prompt_and_the_weights_ablation_restores_the_model(model_tok):
    model, tok = model_tok
    data = random_examples(24, len(tok), seed=6)
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    batches, _ = V.batch_stream(data, 8, 4, 0, tok.pad_token_id, tok.eos_token_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    frozen = V.ptray_train(model, batches, init, device="cpu", precision="no", warmup=1, memory=True)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert frozen.losses[-1] < frozen.losses[0]  # the prompt learns (same batches would do; these differ)
    assert frozen.tokens == sum(int(b.attention_mask.sum()) for b in batches[1:]) and frozen.steps == 3

    with_weights = V.ptray_train(model, batches, init, device="cpu", precision="no", warmup=1, memory=True,
                                 train_weights=True)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # lr 0: weights unchanged
    assert with_weights.losses == pytest.approx(frozen.losses, rel=1e-5)  # same prompt updates either way
    assert with_weights.peak_bytes > frozen.peak_bytes  # weight gradients + Adam state cost memory


# ---------------------------------------------------------------------------------- packed trials, SDPA


def test_packed_trials_equal_separate_trials(model_tok):
    """K prompts and K batches in one forward pass: the loss is the sum of the K losses and each prompt gets its own
    trial's gradient, whatever the other rows hold."""
    model, tok = model_tok
    emb = model.get_input_embeddings()
    inits = [init_prompt(emb, tok, "text", t) for t in (INIT_TEXT, "Which one?", "Is it so or not, really?")]
    batches = [gold_batch(random_examples(n, len(tok), seed=10 + n), tok) for n in (3, 5, 8)]
    prompts = [i.clone().requires_grad_(True) for i in inits]
    packed = V.packed_loss(model, batches, prompts)
    packed.backward()
    alone = [loss_and_grad(V.answer_loss, model, b, i) for b, i in zip(batches, inits)]
    assert packed.item() == pytest.approx(sum(loss.item() for loss, _ in alone), rel=1e-5)
    for p, (_, grad) in zip(prompts, alone):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6)


def test_sdpa_attention_variant_matches_bloom_eager_attention(model_tok):
    model, tok = model_tok
    init = init_prompt(model.get_input_embeddings(), tok, "text", INIT_TEXT)
    batch = gold_batch(random_examples(8, len(tok), seed=7), tok)
    eager = loss_and_grad(V.answer_loss, model, batch, init)
    with V.sdpa_attention(model):
        sdpa = loss_and_grad(V.answer_loss, model, batch, init)
    again = loss_and_grad(V.answer_loss, model, batch, init)  # the patch is undone
    assert sdpa[0].item() == pytest.approx(eager[0].item(), rel=1e-5)
    torch.testing.assert_close(sdpa[1], eager[1], rtol=1e-4, atol=1e-6)
    assert torch.equal(again[1], eager[1])


# --------------------------------------------------------------------------------------- exact match


def greedy_mix(model, tok, n=24, seed=8):
    """Examples built so that some are exact matches and some not, with the ``eos`` id that makes it so.

    A random model rarely ends with EOS, so the "EOS" here is a token the model often predicts second: an example
    whose greedy continuation is (g1, that token) with gold answer [g1] is an exact match. Returns
    ``(data, prompt, eos, expected exact match per example)``.
    """
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(3, model.config.hidden_size, generator=g)
    sources = [torch.randint(4, len(tok), (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    greedy = []
    with torch.no_grad():
        for src in sources:  # two greedy steps, one example at a time, no padding
            ids = list(src)
            for _ in range(2):
                x = torch.cat([prompt, emb(torch.tensor(ids))]).unsqueeze(0)
                hidden = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state[0, -1]
                ids.append(int(model.get_output_embeddings()(hidden).argmax()))
            greedy.append(ids[-2:])
    eos = Counter(g2 for g1, g2 in greedy if g1 != g2).most_common(1)[0][0]
    data = []
    for i, (src, (g1, _g2)) in enumerate(zip(sources, greedy)):
        if g1 == eos:
            continue
        other = next(t for t in range(4, len(tok)) if t not in (g1, eos))
        answers = ([g1], [other]) if i % 3 else ([other], [g1])  # the greedy answer is sometimes not gold
        data.append(Encoded(i, src, answers, 0))
    expected = [int(d.answers[0] == [greedy[d.idx][0]] and greedy[d.idx][1] == eos) for d in data]
    assert 0 < sum(expected) < len(expected)
    return data, prompt, eos, expected


def test_generate_reference_agrees_with_one_pass_exact_match_example_by_example(model_tok):
    """The benchmark's generate reference (left padding, prompt rows first) gives the same per-example exact match as
    ptray's one-pass evaluate, on examples of which some are right and some wrong."""
    model, tok = model_tok
    data, prompt, eos, expected = greedy_mix(model, tok)
    kw = dict(pad_id=tok.pad_token_id, eos_id=eos, device="cpu", precision="no")
    one_pass = V.ptray_evaluate(model, data, prompt, batch_size=7, **kw)
    assert one_pass.em_correct == expected
    assert V.generate_exact_match(model, data, prompt, batch_size=7, **kw) == expected
    assert V.generate_exact_match(model, data, prompt, batch_size=5, sort=True, **kw) == expected
    em_only = V.ptray_evaluate(model, V.gold_only(data), prompt, batch_size=7, **kw)
    assert em_only.em_correct == expected
    per_label = V.ptray_evaluate(model, data, prompt, batch_size=7, share_source=False, **kw)
    assert per_label.em_correct == expected


# ------------------------------------------------------------------------------------------ accounting


def test_flop_formula_and_cpu_peak_memory():
    shape = Shape.from_config(hidden=1024, n_layer=24, vocab=250880)
    assert shape.n_lin == 301_989_888  # bloomz-560m's block matmul weights
    # a 150-token sequence, 3 answer targets: 4 N_lin T dominates; the head counts only at the 3 targets
    assert shape.train_flops(150, 3) == 4 * shape.n_lin * 150 + 12 * 24 * 1024 * 150**2 + 4 * 1024 * 250880 * 3
    assert shape.train_flops(150, 3) == pytest.approx(2 * shape.forward_flops(150, 3), rel=0.05)

    with PeakMemory("cpu", True) as mem:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more
        del a
        c = torch.zeros(500, 1000)  # 2 MB while 4 MB are live
        del b, c
    assert mem.peak == pytest.approx(8e6, rel=0.01)
