"""Trial groups (ptray/training/loop.py) against single trials (ptray.training.train.train), on CPU in fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptray.config import TrainConfig
from ptray.data.batching import encode_all, train_batches
from ptray.data.superglue import load_split
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.lm.forward import answer_logprobs, forward_passes, group_answer_logprobs
from ptray.training.loop import train_group
from ptray.training.train import train


def _cfgs(model_dir, data_dir):
    # fp32: a group equals single trials to fp32 rounding; in bf16 a matmul's rounding depends on its row count
    base = dict(model=str(model_dir), data_dir=str(data_dir), max_length=128, max_eval_examples=12,
                eval_batch_size=16, precision="no")
    return [
        # lr 0.3 with patience 1: its eval loss rises after epoch 1, so it stops after epoch 2 and restores epoch 1
        TrainConfig(task="cb", seed=3, max_train_examples=16, batch_size=4, max_epochs=4, lr=0.3, patience=1, **base),
        TrainConfig(task="rte", seed=1, max_train_examples=40, batch_size=8, max_epochs=4, lr=0.1, **base),  # 5 steps
        TrainConfig(task="copa", seed=2, max_train_examples=12, batch_size=4, max_epochs=3, lr=0.01, **base),  # 3
    ]


# token budgets: 0 = one pass; 1 is smaller than any row (each row its own pass); 256 and 600 pack a few rows
@pytest.mark.parametrize("max_tokens", [0, 1, 256, 600])
def test_one_forward_gives_each_prompt_its_own_logprobs_and_gradient(tiny, data_dir, max_tokens, monkeypatch):
    model, tok = tiny
    parts, refs = [], []
    for k, (name, n, seed) in enumerate([("cb", 3, 0), ("rte", 7, 1), ("wsc", 5, 2)]):
        task = get_task(name)
        data = encode_all(task, load_split(task, "train", str(data_dir), limit=12), tok, 128)
        batch = train_batches(data, 4 + k, seed, 1, tok.pad_token_id, tok.eos_token_id)[0]
        prompt = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(k),
                             requires_grad=True)
        lp = answer_logprobs(model, batch, prompt)[0]
        (grad,) = torch.autograd.grad(-lp.mean(), prompt)
        refs.append((lp.detach(), grad))
        parts.append((batch, prompt))
    shapes = []
    real = model.base_model.forward
    monkeypatch.setattr(model.base_model, "forward",
                        lambda *a, **k: shapes.append(tuple(k["inputs_embeds"].shape[:2])) or real(*a, **k))
    logps = group_answer_logprobs(model, parts, max_tokens)  # a token budget: rows by length in passes, same numbers
    rows = sum(b.num_seqs for b, _ in parts)
    assert sum(r for r, _ in shapes) == rows and all(r > 0 for r, _ in shapes)
    if max_tokens == 0:
        assert len(shapes) == 1
    else:  # bucketed widths, within the budget unless a row alone is wider
        assert all(w % 32 == 0 and (r * w <= max_tokens or r == 1) for r, w in shapes), shapes
        assert len(shapes) == rows if max_tokens == 1 else 1 < len(shapes) < rows, shapes
    grads = torch.autograd.grad(sum(-lp.mean() for lp in logps), [p for _, p in parts])
    for lp, grad, (ref_lp, ref_grad) in zip(logps, grads, refs):
        assert ref_grad.abs().max() > 1e-3
        torch.testing.assert_close(lp.detach(), ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


def test_group_equals_single_trials(tiny_model_dir, data_dir):
    cfgs = _cfgs(tiny_model_dir, data_dir)
    single = [train(c) for c in cfgs]
    calls, states = [], {}

    def on_epoch_end(i, metrics, state):
        calls.append((i, metrics["epoch"]))
        states[(i, metrics["epoch"])] = state

    group = train_group(cfgs, on_epoch_end=on_epoch_end)
    # the early stopper really stopped early and left; the others ran all their epochs
    assert [r.metrics["epochs_run"] for r in single] == [2, 4, 3]
    assert single[0].metrics["best_epoch"] == 1 and single[0].metrics["stopped_early"]
    # prompts end their epochs at their own steps (5 steps for rte, 4 for cb, 3 for copa): copa's epoch 1 first
    assert calls[:3] == [(2, 1), (0, 1), (1, 1)]
    assert sorted(calls) == sorted((i, e) for i, r in enumerate(single) for e in range(1, r.metrics["epochs_run"] + 1))
    for s, g in zip(single, group):
        assert len(g.history) == len(s.history)
        for hs, hg in zip(s.history, g.history):
            for key in ("train_loss", "eval_loss", "best_eval_loss"):
                assert hg[key] == pytest.approx(hs[key], rel=1e-5), key
            for key in ("epoch", "exact_match", "rank_accuracy", "best_epoch"):
                assert hg[key] == hs[key], key
        torch.testing.assert_close(g.prompt, s.prompt, rtol=1e-5, atol=1e-5)
        for key, value in s.metrics.items():
            assert g.metrics[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
        assert g.eval_idx == s.eval_idx
        assert g.evals["prompt"].rank_pred == s.evals["prompt"].rank_pred
        assert g.resolved["group_size"] == 3 and g.resolved["num_tokens"] == s.resolved["num_tokens"]

    # a group prompt's epoch state resumes as a single trial (same Adam state format) and ends where it did
    resumed = train(cfgs[1], resume=states[(1, 2)])
    torch.testing.assert_close(resumed.prompt, group[1].prompt, rtol=1e-5, atol=1e-5)
    assert [h["eval_loss"] for h in resumed.history] == pytest.approx([h["eval_loss"] for h in group[1].history],
                                                                      rel=1e-5)


def test_group_resumes_from_states(tiny_model_dir, data_dir):
    """Stop a group after some epochs (the states its callback got), resume it: it ends as the uninterrupted one."""
    cfgs = [c for c in _cfgs(tiny_model_dir, data_dir)[1:]]
    for c in cfgs:
        c.baselines = False
    # run with a token budget per forward pass, interrupted with one pass per step, resumed with another budget:
    # all the same numbers
    full = train_group([dataclasses.replace(c, max_tokens_per_forward=256) for c in cfgs])
    latest: dict[int, dict] = {}

    class Stop(Exception):
        pass

    def on_epoch_end(i, metrics, state):
        latest[i] = state
        if len(latest) == 2 and min(s["epoch"] for s in latest.values()) >= 2:
            raise Stop

    with pytest.raises(Stop):
        train_group(cfgs, on_epoch_end=on_epoch_end)
    # resumed on the fused attention with ALiBi folded into Q and K: the same numbers as eager, within fp32 rounding
    resumed = train_group([dataclasses.replace(c, max_tokens_per_forward=100) for c in cfgs],
                          resume=[latest[0], latest[1]], fused_attention=True, fold_alibi=True)
    for r, f in zip(resumed, full):
        torch.testing.assert_close(r.prompt, f.prompt, rtol=1e-5, atol=1e-5)
        assert [h["eval_loss"] for h in r.history] == pytest.approx([h["eval_loss"] for h in f.history], rel=1e-5)


def test_group_refuses_prompts_that_do_not_share_the_model(tiny_model_dir, data_dir):
    a = TrainConfig(task="cb", model=str(tiny_model_dir), data_dir=str(data_dir))
    b = TrainConfig(task="rte", model=str(tiny_model_dir), data_dir=str(data_dir), precision="bf16")
    with pytest.raises(PtrayError, match="precision must be the same for all"):
        train_group([a, b])
    with pytest.raises(PtrayError, match="at least one"):
        train_group([])
    with pytest.raises(PtrayError, match="resume has 2 states for 1 prompts"):
        train_group([a], resume=[None, None])
    with pytest.raises(PtrayError, match="max_tokens_per_forward must be the same for all"):
        train_group([a, dataclasses.replace(a, max_tokens_per_forward=512)])
    with pytest.raises(PtrayError, match="max_tokens_per_forward must be a non-negative integer .*got -1"):
        dataclasses.replace(a, max_tokens_per_forward=-1)


def test_forward_passes_fill_a_token_budget_with_bucketed_widths():
    lengths = [70, 5, 33, 31, 64, 200, 40, 1]
    passes = forward_passes(lengths, 128)
    assert sorted(r for rows, _ in passes for r in rows) == list(range(len(lengths)))  # each row exactly once
    # shortest first; widths rounded up to 32; rows x width within the budget, the 200-token row alone (224 > 128)
    assert passes == [([7, 1, 3], 32), ([2, 6], 64), ([4], 64), ([0], 96), ([5], 224)]
    assert forward_passes(lengths, 1) == [([r], -(-lengths[r] // 32) * 32) for r in [7, 1, 3, 2, 6, 4, 0, 5]]
    assert forward_passes(lengths, 10_000) == [([7, 1, 3, 2, 6, 4, 0, 5], 224)]
    assert forward_passes(lengths, 10_000, limit=210) == [([7, 1, 3, 2, 6, 4, 0, 5], 210)]  # the model's positions
    assert forward_passes([], 64) == []
