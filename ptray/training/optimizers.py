"""Each prompt's optimizer: built from ``TrainConfig.optimizer`` (``ptray.config.OPTIMIZERS``), its checkpoint state
saved and loaded.

One optimizer per prompt (``train_group`` gives every prompt its own), so its ``state_dict()`` is the prompt's
checkpoint state and a group's checkpoint resumes as a single trial and the other way round. Adam and AdamW run
torch's fused kernel (one kernel for the whole update) wherever torch has one for the prompt's device (CUDA; CPU in
recent torch); ``tests/test_gpu_path.py`` checks it against the for-loop implementation step by step.
"""

from __future__ import annotations

import torch

from ptray.config import TrainConfig, optimizer_settings
from ptray.errors import PtrayError

FUSED_KINDS = ("adam", "adamw")  # the choices with a fused torch kernel used by default


def make_optimizer(cfg: TrainConfig, weight: torch.nn.Parameter, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer of one prompt: ``cfg.optimizer`` over ``weight`` [n, embed_dim] alone, with
    ``optimizer_settings`` (the lr, its default when ``cfg.lr`` is unset, and the choice's fixed options; sources in
    ``ptray.config.OPTIMIZERS``).

    ``fused``: for Adam and AdamW, None uses torch's fused kernel where torch supports it for ``weight``'s device
    and dtype (else the default implementation), False never, True always (raises RuntimeError where unsupported).
    The other optimizers ignore it. The lr stays this prompt's own (one optimizer per prompt).
    """
    settings = optimizer_settings(cfg.optimizer, cfg.lr)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor([weight], **settings)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.optimizer]
    if cfg.optimizer in FUSED_KINDS and fused is not False:
        try:
            return kind([weight], fused=True, **settings)
        except RuntimeError:  # torch has no fused kernel for this device or dtype
            if fused:
                raise
    return kind([weight], **settings)


def optimizer_state(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> dict:
    """The checkpoint entries of a prompt's optimizer: ``{"optimizer": its state dict, "optimizer_kind": its
    name}`` (the state dict shares tensors with the optimizer; the caller copies it)."""
    return {"optimizer": optimizer.state_dict(), "optimizer_kind": cfg.optimizer}


def load_optimizer_state(optimizer: torch.optim.Optimizer, cfg: TrainConfig, state: dict) -> None:
    """Continue a prompt's optimizer from its checkpoint ``state`` (``state["optimizer"]``, a one-prompt optimizer's
    state dict; checkpoints written before ``optimizer_kind`` was saved are Adam's). The saved options (its lr)
    are restored with it, as ``torch.optim.Optimizer.load_state_dict`` does; the fused setting stays the one
    ``optimizer`` was built with (a fused and an unfused Adam read each other's state).

    Raises:
        PtrayError: the checkpoint's optimizer is not ``cfg.optimizer``.
    """
    kind = state.get("optimizer_kind", "adam")
    if kind != cfg.optimizer:
        raise PtrayError(f"cannot resume {cfg.task} seed {cfg.seed} with optimizer {cfg.optimizer}: its checkpoint "
                         f"was trained with {kind}; resume with --optimizer {kind} or start a new run")
    saved = state["optimizer"]
    saved = {**saved, "state": {int(k): v for k, v in saved["state"].items()}}  # JSON-like "0" keys too
    fused = {k: g[k] for g in optimizer.param_groups for k in ("fused", "foreach") if k in g}
    saved["param_groups"] = [{**g, **fused} for g in saved["param_groups"]]
    optimizer.load_state_dict(saved)


def resolved_settings(cfg: TrainConfig) -> dict:
    """What a run records of its optimizer: ``{"lr": the lr it trains with, "optimizer_options": the fixed
    options}`` (``optimizer_settings``)."""
    settings = optimizer_settings(cfg.optimizer, cfg.lr)
    return {"lr": settings.pop("lr"), "optimizer_options": settings}


def prompt_optimizer(cfg: TrainConfig, weight: torch.nn.Parameter,
                     state: dict | None = None) -> tuple[torch.optim.Optimizer, dict]:
    """A prompt's optimizer (``make_optimizer``), continued from its checkpoint ``state`` where given
    (``load_optimizer_state``), and what the run records of it (``resolved_settings``). Raises PtrayError as
    ``load_optimizer_state`` does."""
    optimizer = make_optimizer(cfg, weight)
    if state is not None:
        load_optimizer_state(optimizer, cfg, state)
    return optimizer, resolved_settings(cfg)


def step_all(optimizers: list[torch.optim.Optimizer], scaler=None) -> None:
    """One step of every prompt's optimizer, then their gradients cleared. ``scaler`` (fp16's
    ``torch.amp.GradScaler``, or None): unscales each prompt's gradient and skips only that prompt's step if it
    holds inf/nan, then updates the scale once (GradScaler's many-optimizer use)."""
    for optimizer in optimizers:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    if scaler is not None:
        scaler.update()  # once per step, after every optimizer
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
