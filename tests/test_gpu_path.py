"""The GPU-path changes, each against the reference it replaces, on CPU in fp32 with random inputs: the fused tanh
GELU (ptray/lm/attention.py), no host syncs in a training step (host-side lengths, staged batches, one index copy,
right-padded passes declared), fused Adam/AdamW (ptray/training/optimizers.py), a task's seeds evaluated together
and splits encoded once (ptray/training/loop.py, ptray/lm/evaluate.py), what one pass shares in the fused
attention. No timing here: ``benchmarks/gpu.py`` measures."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import ptray.lm.attention as attention
import ptray.lm.evaluate as evaluate_module
from ptray.config import TrainConfig
from ptray.data.batching import collate, stage
from ptray.lm.attention import right_padded_rows, use_fused_attention, use_fused_gelu
from ptray.lm.evaluate import evaluate, evaluate_together
from ptray.lm.forward import answer_logprobs, group_answer_logprobs
from ptray.training.loop import train_group
from ptray.training.optimizers import load_optimizer_state, make_optimizer
from ptray.training.train import train


def _bloom(n_head: int = 4, seed: int = 0, n_layer: int = 3):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=300, hidden_size=8 * n_head, n_layer=n_layer, n_head=n_head, pad_token_id=3,
                         eos_token_id=2, bos_token_id=1, initializer_range=0.3)
    return BloomForCausalLM(config).eval().requires_grad_(False)


def _batch(seed: int, rows: int):
    """Right-padded random rows of 3-29 source ids and a 1-2 token answer."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(rows):
        source = torch.randint(4, 300, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
        seqs.append((source, torch.randint(4, 300, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)
                     .tolist()))
    return collate(seqs, 3, 2)


def _parts(model, sizes=((3, 4), (5, 6), (2, 3))):
    return [(_batch(10 + k, rows), torch.randn(n, model.config.hidden_size,
                                               generator=torch.Generator().manual_seed(k)))
            for k, (rows, n) in enumerate(sizes)]


def _logprobs_and_grads(model, parts, max_tokens):
    prompts = [p.clone().requires_grad_(True) for _, p in parts]
    logps = group_answer_logprobs(model, [(b, p) for (b, _), p in zip(parts, prompts)], max_tokens)
    grads = torch.autograd.grad(sum(-lp.mean() for lp in logps), prompts)
    return [lp.detach() for lp in logps], grads


def _assert_same(got, ref):
    for lp, ref_lp in zip(got[0], ref[0]):
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(got[1], ref[1]):
        assert ref_grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


# ----------------------------------------------------------------------------------------------------- a. GELU


def test_fused_tanh_gelu_equals_bloom_gelu_values_and_gradient():
    from transformers.models.bloom.modeling_bloom import BloomGelu

    x = (torch.randn(64, 257, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    ref = BloomGelu()(x)
    (ref_grad,) = torch.autograd.grad(ref, x, torch.linspace(-1, 1, x.numel()).view_as(x))
    out = torch.nn.GELU(approximate="tanh")(x)
    (grad,) = torch.autograd.grad(out, x, torch.linspace(-1, 1, x.numel()).view_as(x))
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)  # fp32 rounding of two orders of operations
    torch.testing.assert_close(grad, ref_grad, rtol=2e-6, atol=2e-6)


def test_fused_gelu_swaps_in_and_out_with_the_fused_attention():
    from transformers.models.bloom.modeling_bloom import BloomGelu

    model = _bloom()
    parts = _parts(model)
    eager = _logprobs_and_grads(model, parts, 0)
    assert use_fused_gelu(model) == 3
    assert all(type(b.mlp.gelu_impl) is torch.nn.GELU for b in model.transformer.h)
    _assert_same(_logprobs_and_grads(model, parts, 0), eager)  # the GELU alone: eager attention
    assert use_fused_gelu(model, enabled=False) == 3
    assert all(type(b.mlp.gelu_impl) is BloomGelu for b in model.transformer.h)
    assert all(torch.equal(a, b) for a, b in zip(_logprobs_and_grads(model, parts, 0)[0], eager[0]))  # restored

    use_fused_attention(model)  # the GELU goes with the fused attention, and comes back with eager
    assert all(type(b.mlp.gelu_impl) is torch.nn.GELU for b in model.transformer.h)
    _assert_same(_logprobs_and_grads(model, parts, 0), eager)
    use_fused_attention(model, enabled=False)
    assert all(type(b.mlp.gelu_impl) is BloomGelu for b in model.transformer.h)
    assert use_fused_gelu(torch.nn.Linear(2, 2)) == 0  # not BLOOM: nothing to swap


# ------------------------------------------------------------------------------------------- b. host syncs


class _Syncs:
    """Counts the tensor methods that read a value back to the host (on a GPU: a sync)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.count = collections.Counter()
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(tensor, *args, **kwargs):
            self.count[name] += 1
            return real(tensor, *args, **kwargs)
        return counted


def test_batches_carry_host_side_lengths_and_stage_keeps_them():
    batch = _batch(0, 5)
    assert list(batch.lengths) == batch.attention_mask.sum(1).tolist()
    assert batch.num_tokens == int(batch.attention_mask.sum()) and batch.row_lengths() == list(batch.lengths)
    unknown = dataclasses.replace(batch, lengths=None)  # built elsewhere: read from the mask
    assert unknown.num_tokens == batch.num_tokens and unknown.row_lengths() == list(batch.lengths)
    (staged,) = stage([batch], "cpu")
    assert staged.lengths == batch.lengths
    assert all(torch.equal(a, b) for a, b in zip(staged._tensors(), batch._tensors()))


@pytest.mark.parametrize("fold_alibi", [False, True])
def test_a_group_step_reads_nothing_back_from_the_device(monkeypatch, fold_alibi):
    """Forward and backward of a step with a token budget (several passes) read no tensor value on the host: the
    lengths come with the batches, the pass indices are copied once, the folded path needs no mask check."""
    model = _bloom(6)
    parts = _parts(model)
    eager = _logprobs_and_grads(model, parts, 100)
    use_fused_attention(model, fold_alibi=fold_alibi)
    syncs = _Syncs(monkeypatch)
    got = _logprobs_and_grads(model, parts, 100)
    assert not syncs.count, syncs.count
    _assert_same(got, eager)
    if fold_alibi:  # outside ptray's declared passes the folded path still checks the mask (a read per pass)
        model(input_ids=parts[0][0].input_ids, attention_mask=parts[0][0].attention_mask)
        assert syncs.count["__bool__"] >= 1


def test_right_padded_rows_skips_the_mask_check_only_where_declared(monkeypatch):
    model = _bloom()
    use_fused_attention(model, fold_alibi=True)
    checks, folded = [], []
    real_check, real_fold = attention._right_padded, attention._folded_alibi_attention
    monkeypatch.setattr(attention, "_right_padded", lambda *a: checks.append(1) or real_check(*a))
    monkeypatch.setattr(attention, "_folded_alibi_attention", lambda *a: folded.append(1) or real_fold(*a))
    batch = _batch(3, 4)
    prompt = torch.randn(3, model.config.hidden_size)
    answer_logprobs(model, batch, prompt)  # ptray's pass: declared right-padded
    assert (len(checks), len(folded)) == (0, 3)
    with right_padded_rows():
        pass
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # not declared: checked once per pass
    assert (len(checks), len(folded)) == (1, 6)


# --------------------------------------------------------------------------------------------- c. fused Adam


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_steps_equal_the_default_implementation(name):
    cfg = TrainConfig(optimizer=name, lr=0.05)
    init = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    weights = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    fused, plain = make_optimizer(cfg, weights[0]), make_optimizer(cfg, weights[1], fused=False)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]  # CPU has the kernel here
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        grad = torch.randn(7, 16, generator=g)
        for w, opt in zip(weights, (fused, plain)):
            w.grad = grad.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(weights[0].detach(), weights[1].detach(), rtol=0, atol=1e-6)
    assert not torch.equal(weights[0].detach(), init)
    # the state of one reads into the other, which keeps its own implementation; the next step agrees
    cross = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    a, b = make_optimizer(cfg, cross[0], fused=False), make_optimizer(cfg, cross[1])
    load_optimizer_state(a, cfg, {"optimizer": fused.state_dict(), "optimizer_kind": name})
    load_optimizer_state(b, cfg, {"optimizer": plain.state_dict(), "optimizer_kind": name})
    assert not a.param_groups[0]["fused"] and b.param_groups[0]["fused"]
    grad = torch.randn(7, 16, generator=g)
    for w, opt in zip(cross, (a, b)):
        w.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(cross[0].detach(), cross[1].detach(), rtol=0, atol=1e-6)


def test_fused_adam_trains_as_the_default_implementation(tiny_model_dir, data_dir, monkeypatch):
    import ptray.training.optimizers as optimizers

    cfg = TrainConfig(task="cb", seed=0, model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=2,
                      max_train_examples=16, max_eval_examples=8, batch_size=4, max_length=128, baselines=False,
                      precision="no")
    fused = train(cfg)
    real = optimizers.make_optimizer
    monkeypatch.setattr(optimizers, "make_optimizer", lambda c, w, fused=None: real(c, w, fused=False))
    plain = train(cfg)
    torch.testing.assert_close(fused.prompt, plain.prompt, rtol=1e-5, atol=1e-5)
    assert [h["eval_loss"] for h in fused.history] == pytest.approx([h["eval_loss"] for h in plain.history],
                                                                    rel=1e-5)


# ------------------------------------------------------------------------------- d. evaluation at epoch ends


def test_seeds_of_a_task_are_evaluated_together_as_single_trials_would_be(tiny_model_dir, data_dir, monkeypatch):
    base = dict(task="cb", model=str(tiny_model_dir), data_dir=str(data_dir), max_length=128, max_train_examples=16,
                max_eval_examples=12, eval_batch_size=16, batch_size=4, max_epochs=3, lr=0.1, precision="no")
    cfgs = [TrainConfig(seed=s, **base) for s in range(4)]
    single = [train(c) for c in cfgs]

    evaluate_module._ENCODED.clear()
    encoded, together = [], []
    real_encode, real_together = evaluate_module.encode_all, evaluate_module.evaluate_prompts
    monkeypatch.setattr(evaluate_module, "encode_all", lambda *a: encoded.append(1) or real_encode(*a))
    monkeypatch.setattr(evaluate_module, "evaluate_prompts",
                        lambda m, d, prompts, *a, **k: together.append(len(prompts)) or real_together(m, d, prompts,
                                                                                                       *a, **k))
    group = train_group(cfgs)
    assert len(encoded) == 2  # train and val, once for the four seeds
    assert together == [4, 4, 4]  # every epoch ends on the same step for all four: one evaluation each
    for s, g in zip(single, group):
        assert len(g.history) == len(s.history) == 3
        for hs, hg in zip(s.history, g.history):
            for key in ("train_loss", "eval_loss", "best_eval_loss"):
                assert hg[key] == pytest.approx(hs[key], rel=1e-5), key
            for key in ("epoch", "exact_match", "rank_accuracy", "best_epoch"):
                assert hg[key] == hs[key], key
        torch.testing.assert_close(g.prompt, s.prompt, rtol=1e-5, atol=1e-5)
        for key, value in s.metrics.items():  # the baselines (evaluated once for the four) included
            assert g.metrics[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    train_group(cfgs[:1])
    assert len(encoded) == 2  # a later group in the same process: encoded already


def test_evaluate_together_equals_evaluate_job_by_job(tiny, data_dir):
    from ptray.data.superglue import load_split
    from ptray.data.tasks import get_task

    model, tok = tiny
    task = get_task("cb")
    data = evaluate_module.encoded_split(task, "val", tok, 128, str(data_dir), max_examples=10)
    other = evaluate_module.encoded_split(task, "train", tok, 128, str(data_dir), max_examples=6)
    assert evaluate_module.encoded_split(task, "val", tok, 128, str(data_dir), max_examples=10) is data
    assert [d.source for d in data] == [d.source for d in evaluate_module.encode_all(
        task, load_split(task, "val", str(data_dir), limit=10), tok, 128)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, model.config.hidden_size, generator=g) for n in (4, 4, 6)]
    jobs = [(data, prompts[0], 8), (other, prompts[1], 8), (data, prompts[2], 8), (data, None, 8),
            (data, prompts[1], 5)]
    got = evaluate_together(model, jobs, tok.pad_token_id, tok.eos_token_id)
    for (d, p, bs), res in zip(jobs, got):
        ref = evaluate(model, d, p, bs, tok.pad_token_id, tok.eos_token_id)
        assert res.loss == pytest.approx(ref.loss, rel=1e-5)
        assert res.rank_pred == ref.rank_pred and res.em_correct == ref.em_correct


# ------------------------------------------------------------------------------- e. what one pass shares


def test_bias_and_folded_columns_are_built_once_per_pass(monkeypatch):
    built = collections.Counter()
    real_bias, real_columns = attention._bias, attention._folded_columns
    monkeypatch.setattr(attention, "_bias", lambda *a: built.update(["bias"]) or real_bias(*a))
    monkeypatch.setattr(attention, "_folded_columns", lambda *a: built.update(["folded"]) or real_columns(*a))
    model = _bloom(6)
    parts = _parts(model)
    eager = _logprobs_and_grads(model, parts, 100)
    passes = []
    real_forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward", lambda *a, **k: passes.append(1) or real_forward(*a, **k))
    for fold in (False, True):
        use_fused_attention(model, fold_alibi=fold)
        built.clear()
        passes.clear()
        _assert_same(_logprobs_and_grads(model, parts, 100), eager)
        assert len(passes) > 1 and built == {"folded" if fold else "bias": len(passes)}  # 3 layers, one per pass


def test_fused_training_equals_eager_training(tiny_model_dir, data_dir):
    """A few steps of a group through every changed piece at once (fused attention and GELU, staged batches,
    token-budget passes, fused Adam, grouped evaluation) against the eager run."""
    base = dict(model=str(tiny_model_dir), data_dir=str(data_dir), max_length=128, max_eval_examples=8,
                eval_batch_size=16, batch_size=4, max_epochs=2, baselines=False, max_tokens_per_forward=100,
                precision="no")  # equal to fp32 rounding: bf16 rounds each pass's shape differently
    cfgs = [TrainConfig(task="cb", seed=0, max_train_examples=12, **base),
            TrainConfig(task="cb", seed=1, max_train_examples=12, **base),
            TrainConfig(task="copa", seed=0, max_train_examples=8, **base)]
    eager = train_group(cfgs, fused_attention=False)
    fused = train_group(cfgs, fused_attention=True)
    for e, f in zip(eager, fused):
        torch.testing.assert_close(f.prompt, e.prompt, rtol=1e-5, atol=1e-5)
        assert [h["eval_loss"] for h in f.history] == pytest.approx([h["eval_loss"] for h in e.history], rel=1e-5)
