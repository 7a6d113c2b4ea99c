"""Training: loss goes down on real CB data, outputs complete, bit-exact on CPU, resume, early stopping, NaN."""

import json

import pytest
import torch

import ptray.lm.load
import ptray.training.loop
import ptray.training.train
from ptray.config import TrainConfig
from ptray.errors import PtrayError
from ptray.lm.evaluate import EvalResult
from ptray.training.run_folder import save_run
from ptray.training.train import train


def _cfg(tiny_model_dir, data_dir, **kw):
    base = dict(task="cb", seed=0, model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=3,
                max_train_examples=48, max_eval_examples=24, batch_size=8, precision="no")
    return TrainConfig(**{**base, **kw})


def test_short_training_on_cb(tiny_model_dir, data_dir, tmp_path):
    result = train(_cfg(tiny_model_dir, data_dir, max_train_examples=None, max_eval_examples=None))
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    m = result.metrics
    for key in ("exact_match", "rank_accuracy", "eval_loss", "best_epoch", "epochs_run", "no_prompt_exact_match",
                "no_prompt_rank_accuracy", "init_text_exact_match", "init_text_rank_accuracy"):
        assert key in m
    assert m["epochs_run"] == 3 and m["num_eval_examples"] == 56 and 0 <= m["exact_match"] <= 1
    assert result.resolved["num_tokens"] == result.prompt.shape[0] == m["num_tokens"]

    out = save_run(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "history.json", "metrics.json", "predictions.json", "prompt"]
    assert sorted(p.name for p in (out / "prompt").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["exact_match"] == m["exact_match"]
    preds = json.loads((out / "predictions.json").read_text())
    # One schema with the transfer runs: the prompt's lists at the top, each baseline's under "baselines".
    assert set(preds) == {"idx", "em_correct", "rank_correct", "rank_pred", "baselines"}
    assert len(preds["idx"]) == 56 and sum(preds["em_correct"]) / 56 == pytest.approx(m["exact_match"])
    assert sum(preds["rank_correct"]) / 56 == pytest.approx(m["rank_accuracy"])
    for name in ("no_prompt", "init_text"):
        assert sum(preds["baselines"][name]["rank_correct"]) / 56 == pytest.approx(m[f"{name}_rank_accuracy"])
        assert len(preds["baselines"][name]["rank_pred"]) == 56
    config = json.loads((out / "config.json").read_text())
    assert config["template_version"] == 1 and config["init_text"].startswith("Does the hypothesis")
    assert not list(tmp_path.glob(".run.partial-*"))


def test_same_seed_same_prompt_bit_for_bit(tiny_model_dir, data_dir):
    a = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, baselines=False))
    b = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, baselines=False))
    assert torch.equal(a.prompt, b.prompt)
    c = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, baselines=False, seed=1))
    assert not torch.equal(a.prompt, c.prompt)  # another seed shuffles differently


def test_resume_from_epoch_state_equals_uninterrupted(tiny_model_dir, data_dir, tmp_path):
    states = []
    full = train(_cfg(tiny_model_dir, data_dir, patience=50),
                 on_epoch_end=lambda metrics, state: states.append(state))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    torch.save(states[0], tmp_path / "state.pt")  # what a checkpoint holds must survive a safe load
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = train(_cfg(tiny_model_dir, data_dir, patience=50), resume=state)
    assert torch.equal(resumed.prompt, full.prompt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    # The epochs trained after the resume reproduce the uninterrupted run's (timings aside).
    timing = ("train_tokens_per_s", "epoch_seconds")
    for after, ref in zip(resumed.history[1:], full.history[1:]):
        assert {k: v for k, v in after.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}
    assert resumed.metrics == full.metrics


def test_early_stopping_restores_best(tiny_model_dir, data_dir, monkeypatch):
    losses = iter([5.0, 3.0, 1.0, 2.0, 2.5, 0.5])  # baselines take the first two
    real_evaluate = ptray.training.loop.evaluate  # train is a group of one: the group evaluates

    def fake_evaluate(*args, **kwargs):
        res = real_evaluate(*args, **kwargs)
        return EvalResult(next(losses), res.exact_match, res.rank_accuracy, res.num_examples, res.em_correct,
                          res.rank_correct, res.rank_pred)

    monkeypatch.setattr(ptray.training.loop, "evaluate", fake_evaluate)
    states = []
    result = train(_cfg(tiny_model_dir, data_dir, max_epochs=10, patience=2),
                   on_epoch_end=lambda m, s: states.append(s))
    # epoch losses 1.0, 2.0, 2.5: two epochs without improvement -> stop after epoch 3, best epoch 1
    assert result.metrics["epochs_run"] == 3 and result.metrics["best_epoch"] == 1
    assert result.metrics["eval_loss"] == 1.0 and result.metrics["stopped_early"]
    assert torch.equal(result.prompt, states[0]["prompt"]) and not torch.equal(result.prompt, states[2]["prompt"])


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, data_dir, monkeypatch):
    real = ptray.training.loop.group_answer_logprobs  # train is a group of one: its forward is the group's

    def nan_logprobs(model, parts, *args, **kwargs):
        return [logp * float("nan") for logp in real(model, parts, *args, **kwargs)]

    monkeypatch.setattr(ptray.training.loop, "group_answer_logprobs", nan_logprobs)
    message = r"the training loss became nan at epoch 1, step \d+ \(cb, seed 0\); lower --lr"
    with pytest.raises(PtrayError, match=message):
        train(_cfg(tiny_model_dir, data_dir, baselines=False))


@pytest.mark.parametrize("field,value,message", [
    ("max_epochs", 0, "max_epochs must be a positive integer, got 0"),
    ("batch_size", -2, "batch_size must be a positive integer, got -2"),
    ("lr", 0.0, "lr must be a positive number or unset, got 0.0"),
    ("lr", float("nan"), "lr must be a positive number or unset, got nan"),
    ("task", "boolq", "unknown task 'boolq'; valid tasks: cb, rte, copa, wsc"),
    ("init", "zeros", "init must be one of"),
    ("eval_split", "test", "eval_split must be train or val"),
])
def test_config_validation(field, value, message):
    with pytest.raises(PtrayError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


@pytest.mark.slow  # compiling takes ~20 s on CPU
def test_compiled_blocks_train_the_same_prompt(tiny_model_dir, data_dir):
    """--compile (torch.compile of each block) is a speed option only: the same prompt and metrics as eager,
    up to floating-point reordering."""
    eager = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, baselines=False))
    compiled = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, baselines=False, compile=True))
    assert compiled.resolved["compile"] is True
    torch.testing.assert_close(compiled.prompt, eager.prompt, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager.history, compiled.history):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["exact_match"] == a["exact_match"] and b["rank_accuracy"] == a["rank_accuracy"]


@pytest.mark.slow  # compiling takes seconds on CPU
def test_compile_blocks_compiles_every_block_in_place(tiny_model_dir):
    from ptray.lm.load import load_model

    model, _ = load_model(str(tiny_model_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    eager = model(input_ids=ids).logits
    ptray.lm.load.compile_blocks(model)
    assert all(block._compiled_call_impl is not None for block in model.base_model.h)
    torch.testing.assert_close(model(input_ids=ids).logits, eager, rtol=1e-4, atol=1e-5)


def test_compile_refuses_a_model_without_known_blocks():
    class Model:
        base_model = torch.nn.Linear(2, 2)

    with pytest.raises(PtrayError, match="does not know where"):
        ptray.lm.load.compile_blocks(Model())


def test_fused_attention_is_a_train_setting_recorded_in_the_config(tiny_model_dir, data_dir, monkeypatch):
    from ptray.config import resolve_attention
    from ptray.lm import attention

    assert resolve_attention("auto", "cuda") == "fused" and resolve_attention("auto", "cpu") == "eager"
    assert resolve_attention("eager", "cuda") == "eager"
    patched = []
    real = attention.use_fused_attention
    monkeypatch.setattr(attention, "use_fused_attention", lambda model, **kw: patched.append(real(model, **kw)))
    eager = train(_cfg(tiny_model_dir, data_dir, max_epochs=2))  # auto on CPU: eager
    assert eager.resolved["attention"] == "eager" and patched == []
    assert eager.resolved["attention_implementation"] == "eager"  # what ran, recorded beside what was asked
    fused = train(_cfg(tiny_model_dir, data_dir, max_epochs=2, attention="fused"))
    assert fused.resolved["attention"] == "fused" and patched == [fused_model_layers(tiny_model_dir)]
    assert fused.resolved["attention_implementation"] == "ptray-fused"
    # The fused path trains the same prompt (fp32 on CPU; tests/test_attention.py checks logits and gradients).
    for a, b in zip(eager.history, fused.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert torch.allclose(fused.prompt, eager.prompt, atol=1e-5)
    assert fused.metrics["no_prompt_eval_loss"] == pytest.approx(eager.metrics["no_prompt_eval_loss"], rel=1e-5)
    with pytest.raises(PtrayError, match="attention must be one of"):
        TrainConfig(attention="flash")


def fused_model_layers(tiny_model_dir) -> int:
    """The tiny BLOOM's attention modules (one per layer): how many ``use_fused_attention`` patches."""
    return json.loads((tiny_model_dir / "config.json").read_text())["n_layer"]
