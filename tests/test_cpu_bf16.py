"""Mixed precision on CPU: bf16 frozen weights and autocast where the CPU has native bf16, fp32 elsewhere.

What is checked: how ``--precision`` resolves on a CPU with and without a bf16 unit; exact match under bf16 equals
greedy ``generate`` of the same bf16 model (as the fp32 test in test_evaluate.py); bf16 evaluation through both
scoring paths against fp32; bf16 training keeps the prompt and the optimizer state in fp32 and records what ran;
a bf16 run resumed from an epoch's state equals the uninterrupted run bit for bit; and the quality tolerance held
between bf16 and fp32 training (BENCHMARKS.md's real-model table measures the same on SmolLM2).
"""

from __future__ import annotations

import logging

import pytest
import torch

import ptray.lm.load as load
from ptray.config import TrainConfig
from ptray.data.batching import Encoded
from ptray.lm.evaluate import evaluate
from ptray.training.train import train

BF16 = torch.bfloat16


# ------------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("amx, avx512_bf16, unit", [(False, False, None), (False, True, "avx512_bf16"),
                                                    (True, True, "amx")])
def test_the_bf16_unit_is_read_from_torchs_cpu_checks(monkeypatch, amx, avx512_bf16, unit):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert load.cpu_bf16_unit() == unit


def test_auto_is_bf16_on_a_cpu_with_bf16_and_fp32_without(monkeypatch, caplog):
    monkeypatch.setattr(load, "_said", set())
    monkeypatch.setattr(load, "cpu_bf16_unit", lambda: "avx512_bf16")
    with caplog.at_level(logging.INFO, logger="ptray"):
        assert load.resolve_device_precision("cpu", "auto") == ("cpu", "bf16")
        assert load.resolve_device_precision("auto", "auto") == ("cpu", "bf16")
        assert load.resolve_device_precision("cpu", "auto") == ("cpu", "bf16")
    said = [r.getMessage() for r in caplog.records]
    assert said == ["precision bf16 on cpu (asked: auto; this CPU's bf16 unit: avx512_bf16)"]  # once
    assert load.resolve_device_precision("cpu", "no") == ("cpu", "no")  # exact fp32 stays exact
    assert load.resolve_device_precision("cpu", "bf16") == ("cpu", "bf16")

    monkeypatch.setattr(load, "cpu_bf16_unit", lambda: None)  # a CPU reported without bf16
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptray"):
        assert load.resolve_device_precision("cpu", "auto") == ("cpu", "no")
        assert load.resolve_device_precision("cpu", "bf16") == ("cpu", "bf16")  # honoured, with a warning
    text = caplog.text
    assert "precision no on cpu (asked: auto; this CPU has no native bf16 unit)" in text
    assert "--precision bf16 on a CPU without native bf16" in text and "slower than fp32" in text


def test_two_precisions_in_one_process(tiny_model_dir):
    """accelerate's one AcceleratorState refused a second mixed precision in a process (a reused Ray worker, the
    benchmark); each setup now gets the precision it asked for."""
    for precision in ("no", "bf16", "no"):
        model, _, acc = load.setup_model(str(tiny_model_dir), "cpu", precision)
        assert acc.mixed_precision == precision
        assert model.dtype == (BF16 if precision == "bf16" else torch.float32)


# ------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model_dir):
    return load.load_model(str(tiny_model_dir), dtype=BF16)


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _greedy(model, src, prompt, max_new, eos, pad):
    with _autocast():
        x = model.get_input_embeddings()(torch.tensor([src]))
        x = torch.cat([prompt[None].to(x.dtype), x], 1)
        out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0].tolist()


@pytest.mark.parametrize("share_source", [True, False])
def test_bf16_exact_match_equals_generate(tiny_bf16, share_source):
    """Per example, EM from one teacher-forced bf16 pass == (greedy bf16 ``generate`` gives answer + EOS), on
    right, wrong-answer, wrong-EOS and random examples (test_evaluate.py's construction, bf16 throughout)."""
    model, tok = tiny_bf16
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(4, model.config.hidden_size, generator=gen) * 0.5  # fp32, as a trained prompt
    vocab, pad = len(tok), tok.pad_token_id
    checked = right = 0
    for _ in range(12):
        src = torch.randint(4, vocab, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen).tolist()
        g = _greedy(model, src, prompt, 4, None, pad)
        eos = g[2]
        if eos in g[:2]:
            continue
        examples = [(src, [g[0], g[1]]), (src, [g[0], (g[1] + 1) % vocab or 5]), (src, [g[0]])]
        for _ in range(5):
            s = torch.randint(4, vocab, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
            examples.append((s, torch.randint(4, vocab, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                              generator=gen).tolist()))
        data = [Encoded(i, s, (a,), 0) for i, (s, a) in enumerate(examples)]
        res = evaluate(model, data, prompt, batch_size=3, pad_id=pad, eos_id=eos, share_source=share_source,
                       autocast=_autocast)
        for (s, a), em in zip(examples, res.em_correct):
            ref = _greedy(model, s, prompt, len(a) + 1, eos, pad)[: len(a) + 1] == a + [eos]
            assert em == int(ref), (s, a, eos)
            checked += 1
            right += em
    assert checked >= 24 and right >= 3


def test_bf16_evaluation_is_fp32s_within_bf16_rounding(tiny, tiny_bf16, data_dir):
    """Real CB examples scored by both paths in bf16 agree with each other and with fp32: loss within 2%
    (bf16 keeps 8 bits of mantissa; the loss is an fp32 log-softmax of bf16 logits), rank accuracy within one
    example in ten."""
    from ptray.data.tasks import get_task
    from ptray.lm.evaluate import encoded_split

    model32, tok = tiny
    model16, _ = tiny_bf16
    data = encoded_split(get_task("cb"), "val", tok, 128, str(data_dir), None, 24)
    prompt = torch.randn(6, model32.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.3
    ref = evaluate(model32, data, prompt, batch_size=8, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    got = [evaluate(model16, data, prompt, batch_size=8, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                    share_source=share, autocast=_autocast) for share in (True, False)]
    for res in got:
        assert res.loss == pytest.approx(ref.loss, rel=0.02)
        assert abs(res.rank_accuracy - ref.rank_accuracy) <= 0.1
    assert got[0].loss == pytest.approx(got[1].loss, rel=0.01)


# ------------------------------------------------------------------------------------------- training


def _cfg(tiny_model_dir, data_dir, **kw):
    base = dict(task="cb", seed=0, model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=3, patience=50,
                max_train_examples=48, max_eval_examples=24, batch_size=8, precision="bf16", lr=0.1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir, data_dir):
    states = []
    result = train(_cfg(tiny_model_dir, data_dir), on_epoch_end=lambda metrics, state: states.append(state))
    return result, states


def test_bf16_training_keeps_the_prompt_and_its_optimizer_in_fp32(bf16_run, tmp_path):
    from ptray.training.run_folder import save_run

    result, states = bf16_run
    assert result.resolved["precision"] == "bf16" and result.resolved["device"] == "cpu"
    assert result.prompt.dtype == torch.float32
    for state in states:
        assert state["prompt"].dtype == torch.float32
        moments = [v for s in state["optimizer"]["state"].values() for v in s.values()
                   if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0]
        assert moments and all(m.dtype == torch.float32 for m in moments)
    out = save_run(result, tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(out / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert saved.dtype == torch.float32 and torch.equal(saved, result.prompt)
    import json

    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert result.history[-1]["eval_loss"] < result.metrics["no_prompt_eval_loss"]  # it learnt something


def test_bf16_resume_equals_uninterrupted_bit_for_bit(bf16_run, tiny_model_dir, data_dir, tmp_path):
    full, states = bf16_run
    torch.save(states[0], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = train(_cfg(tiny_model_dir, data_dir), resume=state)
    assert torch.equal(resumed.prompt, full.prompt)
    timing = ("train_tokens_per_s", "epoch_seconds")
    for after, ref in zip(resumed.history[1:], full.history[1:]):
        assert {k: v for k, v in after.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}


def test_bf16_trains_as_fp32_within_the_stated_tolerance(bf16_run, tiny_model_dir, data_dir):
    """The tolerance held between bf16 and fp32 (README and BENCHMARKS.md state it). The same prompt evaluated:
    within 1% (the baselines; bf16 keeps 8 mantissa bits, ~0.4% per rounding, and the loss is an fp32
    log-softmax of bf16 logits). Training: each epoch's eval loss within 20% of fp32's, and learning by a like
    amount. Not closer, and not the same prompt: Adam divides each step by the gradient's running RMS, so bf16's
    rounding of the gradient turns into a different trajectory (on this tiny model at lr 0.1 the two prompts end at
    cosine ~0.7, eval losses 4.54 vs 4.61; on SmolLM2 after 2 epochs of 64 examples the four tasks differ by
    -17% to +16%, in both directions: BENCHMARKS.md's quality table)."""
    bf16, _ = bf16_run
    fp32 = train(_cfg(tiny_model_dir, data_dir, precision="no"))
    for name in ("no_prompt_eval_loss", "init_text_eval_loss"):
        assert bf16.metrics[name] == pytest.approx(fp32.metrics[name], rel=0.01)
    for a, b in zip(bf16.history, fp32.history, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=0.20)
    drop = [r.metrics["init_text_eval_loss"] - r.history[-1]["eval_loss"] for r in (bf16, fp32)]
    assert min(drop) > 0.5 * max(drop) > 0
