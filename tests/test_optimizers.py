"""New training options: the optimizer choice (ptray.config.OPTIMIZERS, built per prompt by
ptray.training.loop.make_optimizer; resolved lr; checkpoint state that resumes bit for bit) and the class-label
prompt init (ptray.lm.prompt.init_prompt)."""

import pytest
import torch

from ptray.config import OPTIMIZER_NAMES, OPTIMIZERS, PromptInit, TrainConfig, optimizer_settings
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.lm import families
from ptray.lm.prompt import init_prompt, save_adapter
from ptray.training.loop import make_optimizer, train_group
from ptray.training.train import train


def _cfg(tiny_model_dir, data_dir, **kw):
    base = dict(task="cb", seed=0, model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=2, patience=50,
                max_train_examples=16, max_eval_examples=8, batch_size=8, max_length=128, baselines=False)
    return TrainConfig(**{**base, **kw})


def test_each_optimizer_has_a_sourced_default_lr():
    assert OPTIMIZER_NAMES == ("adam", "adamw", "adafactor", "sgd")
    assert {n: OPTIMIZERS[n].lr for n in OPTIMIZER_NAMES} == {"adam": 3e-2, "adamw": 3e-2, "adafactor": 0.3,
                                                              "sgd": 0.1}
    assert all(OPTIMIZERS[n].source for n in OPTIMIZER_NAMES)
    assert TrainConfig().optimizer == "adam" and TrainConfig().lr is None  # the paper's optimizer, its default lr
    assert optimizer_settings("adam", None) == {"lr": 3e-2}
    assert optimizer_settings("sgd", 0.5) == {"lr": 0.5, "momentum": 0.9}  # a given lr wins
    assert optimizer_settings("adamw", None) == {"lr": 3e-2, "weight_decay": 0.01}
    with pytest.raises(PtrayError, match="optimizer must be one of adam, adamw, adafactor, sgd, got 'lamb'"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(PtrayError, match="lr must be a positive number or unset, got -1"):
        TrainConfig(optimizer="sgd", lr=-1)


def test_make_optimizer_builds_the_declared_one():
    from transformers.optimization import Adafactor

    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adafactor": Adafactor, "sgd": torch.optim.SGD}
    for name in OPTIMIZER_NAMES:
        weight = torch.nn.Parameter(torch.zeros(3, 4))
        opt = make_optimizer(TrainConfig(optimizer=name), weight)
        assert type(opt) is kinds[name] and opt.param_groups[0]["params"] == [weight]
        group = opt.param_groups[0]
        assert group["lr"] == OPTIMIZERS[name].lr
        for key, value in OPTIMIZERS[name].options:
            assert group[key] == value, (name, key)
    assert make_optimizer(TrainConfig(optimizer="adafactor", lr=0.01), torch.nn.Parameter(torch.zeros(2))) \
        .param_groups[0]["lr"] == 0.01
    assert type(make_optimizer(TrainConfig(), torch.nn.Parameter(torch.zeros(2)))) is torch.optim.Adam


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_resume_continues_bit_for_bit(tiny_model_dir, data_dir, tmp_path, name):
    """Two epochs straight == one epoch, its checkpoint state through a safe torch.load, then the second epoch."""
    cfg = _cfg(tiny_model_dir, data_dir, optimizer=name)
    states = []
    full = train(cfg, on_epoch_end=lambda metrics, state: states.append(state))
    assert full.resolved["optimizer"] == name and full.resolved["lr"] == OPTIMIZERS[name].lr
    assert full.resolved["optimizer_options"] == dict(OPTIMIZERS[name].options)
    assert states[0]["optimizer_kind"] == name and states[0]["optimizer"]["state"]  # the optimizer has state
    torch.save(states[0], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = train(cfg, resume=state)
    assert torch.equal(resumed.prompt, full.prompt)
    assert [h["eval_loss"] for h in resumed.history] == [h["eval_loss"] for h in full.history]
    assert not torch.equal(full.prompt, states[0]["prompt"])  # the second epoch moved the prompt


def test_optimizers_train_differently_and_lr_is_resolved(tiny_model_dir, data_dir):
    a = train(_cfg(tiny_model_dir, data_dir, max_epochs=1))
    b = train(_cfg(tiny_model_dir, data_dir, max_epochs=1, optimizer="adamw"))
    c = train(_cfg(tiny_model_dir, data_dir, max_epochs=1, optimizer="sgd", lr=0.7))
    assert not torch.equal(a.prompt, b.prompt)  # weight decay
    assert a.resolved["lr"] == 3e-2 and c.resolved["lr"] == 0.7
    assert c.resolved["optimizer_options"] == {"momentum": 0.9}


def test_resume_with_another_optimizer_is_refused(tiny_model_dir, data_dir):
    states = []
    train(_cfg(tiny_model_dir, data_dir, max_epochs=1, optimizer="sgd"),
          on_epoch_end=lambda metrics, state: states.append(state))
    with pytest.raises(PtrayError, match=r"^cannot resume cb seed 0 with optimizer adam: its checkpoint was trained "
                                         r"with sgd; resume with --optimizer sgd or start a new run$"):
        train(_cfg(tiny_model_dir, data_dir), resume=states[0])


def test_checkpoints_without_an_optimizer_kind_are_adams(tiny_model_dir, data_dir):
    """States written before ``optimizer_kind`` existed hold Adam's state (string "0" keys, as some stores keep)."""
    cfg = _cfg(tiny_model_dir, data_dir)
    states = []
    full = train(cfg, on_epoch_end=lambda metrics, state: states.append(state))
    old = {k: v for k, v in states[0].items() if k != "optimizer_kind"}
    old["optimizer"] = {**old["optimizer"], "state": {str(k): v for k, v in old["optimizer"]["state"].items()}}
    assert torch.equal(train(cfg, resume=old).prompt, full.prompt)


def test_a_group_gives_each_prompt_its_own_optimizer(tiny_model_dir, data_dir):
    cfgs = [_cfg(tiny_model_dir, data_dir, optimizer="adafactor"),
            _cfg(tiny_model_dir, data_dir, task="rte", seed=1, optimizer="sgd", max_epochs=3),
            _cfg(tiny_model_dir, data_dir, seed=2)]
    single = [train(c) for c in cfgs]
    states = {}
    group = train_group(cfgs, on_epoch_end=lambda i, metrics, state: states.setdefault((i, metrics["epoch"]), state))
    for s, g in zip(single, group):
        torch.testing.assert_close(g.prompt, s.prompt, rtol=1e-5, atol=1e-5)
        assert g.resolved["lr"] == s.resolved["lr"] and g.resolved["optimizer"] == s.resolved["optimizer"]
    assert states[(1, 1)]["optimizer_kind"] == "sgd" and states[(0, 1)]["optimizer_kind"] == "adafactor"
    # a group prompt's state resumes as a single trial
    resumed = train(cfgs[1], resume=states[(1, 2)])
    torch.testing.assert_close(resumed.prompt, group[1].prompt, rtol=1e-5, atol=1e-5)


def _answer_rows(model, tok, task, n):
    cue = tok(task.answer_cue, add_special_tokens=False)["input_ids"]
    rows = []
    for answer in task.answers:
        ids = tok(task.answer_cue + answer, add_special_tokens=False)["input_ids"][len(cue):]
        rows.append(families.embed(model, torch.tensor(ids)).float().mean(dim=0))
    return torch.stack([rows[k % len(rows)] for k in range(n)])


@pytest.mark.parametrize("task_name, n", [("cb", 7), ("copa", 2), ("rte", 1)])
def test_class_labels_init_is_the_answer_words_embeddings(tiny, task_name, n):
    model, tok = tiny
    task = get_task(task_name)
    rows = init_prompt(model.get_input_embeddings(), tok, "class_labels", task.init_text, n, task=task)
    with torch.no_grad():
        expected = _answer_rows(model, tok, task, n)
    assert rows.shape == (n, families.embed_dim(model)) and rows.dtype == torch.float32
    assert torch.equal(rows, expected)
    if n > len(task.labels):  # cycled: row k is label k mod the label count
        assert torch.equal(rows[len(task.labels)], rows[0]) and not torch.equal(rows[0], rows[1])


def test_class_labels_init_includes_the_embedding_scale_and_defaults_n_to_the_init_text(tiny):
    model, tok = tiny
    task = get_task("cb")

    class Scaled(torch.nn.Module):  # an embedding module with a scale inside (as Gemma2's)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.weight = inner, inner.weight

        def forward(self, ids):
            return self.inner(ids) * 4.0

    plain = init_prompt(model.get_input_embeddings(), tok, PromptInit.CLASS_LABELS, task.init_text, task=task)
    scaled = init_prompt(Scaled(model.get_input_embeddings()), tok, PromptInit.CLASS_LABELS, task.init_text,
                         task=task)
    n_text = len(tok(task.init_text, add_special_tokens=False)["input_ids"])
    assert plain.shape[0] == n_text  # unset n: the init text's token count, as TEXT
    torch.testing.assert_close(scaled, plain * 4.0)
    with pytest.raises(PtrayError, match="init 'class_labels' needs the task"):
        init_prompt(model.get_input_embeddings(), tok, "class_labels", task.init_text, 3)


def test_class_labels_init_trains_and_saves_as_an_adapter(tiny_model_dir, data_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, data_dir, max_epochs=1, init="class_labels", num_tokens=5)
    assert cfg.init is PromptInit.CLASS_LABELS
    result = train(cfg)
    assert result.resolved["init"] == "class_labels" and result.prompt.shape[0] == 5
    save_adapter(result.prompt, tmp_path / "prompt", str(tiny_model_dir), result.resolved["init_text"],
                 result.resolved["init"])
    assert (tmp_path / "prompt" / "adapter_model.safetensors").is_file()


def test_fp16_scaler_steps_each_prompts_optimizer_and_updates_once(tiny_model_dir, data_dir, monkeypatch):
    """fp16's path on CPU: one GradScaler (accelerate's) scales the group's loss, unscales and steps each prompt's
    optimizer and updates once per step; an inf gradient skips only its own prompt's step."""
    import ptray.training.loop as loop

    cfgs = [_cfg(tiny_model_dir, data_dir, max_epochs=1, optimizer="adafactor"),
            _cfg(tiny_model_dir, data_dir, max_epochs=1, seed=1, optimizer="sgd")]
    plain = train_group(cfgs)
    scalers, steps = [], []
    setup = loop._setup_model

    def with_scaler(*args):
        run = setup(*args)
        run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scalers.append(run.accelerator.scaler)
        return run

    monkeypatch.setattr(loop, "_setup_model", with_scaler)
    real_step = loop._step
    monkeypatch.setattr(loop, "_step", lambda run, active, size: steps.append(1) or real_step(run, active, size))
    scaled = train_group(cfgs)
    for a, b in zip(plain, scaled):  # scaling by a power of two and back is exact
        torch.testing.assert_close(b.prompt, a.prompt, rtol=1e-6, atol=1e-7)
    assert int(scalers[0]._growth_tracker) == len(steps) == 2  # one update per step, not one per optimizer

    # an inf in the sgd prompt's gradient: its step is skipped, the adafactor prompt's is not
    weights = []

    def poisoned_step(run, active, size):
        before = [m.weight.detach().clone() for m in active]
        hook = active[1].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        real_step(run, active, size)
        hook.remove()
        weights.append([(b, m.weight.detach().clone()) for b, m in zip(before, active)])

    monkeypatch.setattr(loop, "_step", poisoned_step)
    train_group(cfgs)
    for (a_before, a_after), (b_before, b_after) in weights:
        assert not torch.equal(a_before, a_after) and torch.equal(b_before, b_after)
    assert scalers[-1].get_scale() == 2.0**10 / 2 ** len(weights)  # halved once per step
