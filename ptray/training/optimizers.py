"""Each prompt's optimizer: built from ``TrainConfig.optimizer`` (``ptray.config.OPTIMIZERS``), its checkpoint state
saved and loaded.

One optimizer per prompt (``train_group`` gives every prompt its own), so its ``state_dict()`` is the prompt's
checkpoint state and a group's checkpoint resumes as a single trial and the other way round.
"""

from __future__ import annotations

import torch

from ptray.config import TrainConfig, optimizer_settings
from ptray.errors import PtrayError


def make_optimizer(cfg: TrainConfig, weight: torch.nn.Parameter) -> torch.optim.Optimizer:
    """The optimizer of one prompt: ``cfg.optimizer`` over ``weight`` [n, embed_dim] alone, with
    ``optimizer_settings`` (the lr, its default when ``cfg.lr`` is unset, and the choice's fixed options; sources in
    ``ptray.config.OPTIMIZERS``).
    """
    settings = optimizer_settings(cfg.optimizer, cfg.lr)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor([weight], **settings)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.optimizer]
    return kind([weight], **settings)


def optimizer_state(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> dict:
    """The checkpoint entries of a prompt's optimizer: ``{"optimizer": its state dict, "optimizer_kind": its
    name}`` (the state dict shares tensors with the optimizer; the caller copies it)."""
    return {"optimizer": optimizer.state_dict(), "optimizer_kind": cfg.optimizer}


def load_optimizer_state(optimizer: torch.optim.Optimizer, cfg: TrainConfig, state: dict) -> None:
    """Continue a prompt's optimizer from its checkpoint ``state`` (``state["optimizer"]``, a one-prompt optimizer's
    state dict; checkpoints written before ``optimizer_kind`` was saved are Adam's). The saved options (its lr)
    are restored with it, as ``torch.optim.Optimizer.load_state_dict`` does.

    Raises:
        PtrayError: the checkpoint's optimizer is not ``cfg.optimizer``.
    """
    kind = state.get("optimizer_kind", "adam")
    if kind != cfg.optimizer:
        raise PtrayError(f"cannot resume {cfg.task} seed {cfg.seed} with optimizer {cfg.optimizer}: its checkpoint "
                         f"was trained with {kind}; resume with --optimizer {kind} or start a new run")
    saved = state["optimizer"]
    saved = {**saved, "state": {int(k): v for k, v in saved["state"].items()}}  # JSON-like "0" keys too
    optimizer.load_state_dict(saved)


def resolved_settings(cfg: TrainConfig) -> dict:
    """What a run records of its optimizer: ``{"lr": the lr it trains with, "optimizer_options": the fixed
    options}`` (``optimizer_settings``)."""
    settings = optimizer_settings(cfg.optimizer, cfg.lr)
    return {"lr": settings.pop("lr"), "optimizer_options": settings}
