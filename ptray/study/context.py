"""What every trial and evaluation of one study shares, shipped to the workers once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ptray.config import EvalConfig, TrainConfig, expand_init_source
from ptray.data.tasks import register_declarations
from ptray.study import store
from ptray.study.bundle import Bundle


@dataclass(frozen=True)
class StudyContext:
    """Reaches the workers once (``tune.with_parameters`` / the object store), so no node needs a shared disk.

    ``train`` is the config every trial starts from (its task and seed are replaced per trial).
    """

    study: str
    experiment_id: str
    tracking_uri: str
    train: TrainConfig
    model_label: str  # the model as the user named it (logged; the smoke model's files travel in model_bundle)
    data_label: str | None  # the data folder as the user named it, None for the Hub
    model_bundle: Bundle | None = None
    data_bundle: Bundle | None = None
    params: dict[str, Any] = field(default_factory=dict)  # study-level params logged with every run
    # the plan's user tasks (``Plan.task_declarations``): registered in every worker before a task is looked up
    task_declarations: tuple[dict[str, Any], ...] = ()
    # torch's CPU threads in each trial and evaluation (``Options.torch_threads``); 0: leave the process's own
    threads: int = 0

    def register_tasks(self) -> None:
        """Register the study's user tasks in this process (a worker never read their files); idempotent."""
        register_declarations(self.task_declarations, f"study {self.study!r}'s plan")

    def _on_this_node(self) -> TrainConfig:
        """``train`` with the bundles written to this node and their folders as model and data."""
        changes = {}
        if self.model_bundle is not None:
            changes["model"] = str(self.model_bundle.materialize())
        if self.data_bundle is not None:
            changes["data_dir"] = str(self.data_bundle.materialize())
        return dataclasses.replace(self.train, **changes)

    def train_config(self, task: str, seed: int) -> TrainConfig:
        """The ``TrainConfig`` of one trial, with the bundles written to this node (an init_source's ``{seed}`` is
        the trial's seed)."""
        base = self._on_this_node()
        return dataclasses.replace(base, task=task, seed=seed, init_source=expand_init_source(base.init_source, seed))

    def eval_config(self) -> EvalConfig:
        """How the transfer grid evaluates on this node: the trials' model, data and evaluation settings."""
        return EvalConfig.from_train(self._on_this_node())

    def client(self):
        """An ``MlflowClient`` on the study's tracking store."""
        return store.client(self.tracking_uri)

    def logged_config(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """A resolved config as logged: the model and data as the user named them, not a node's cache folder."""
        out = dict(resolved)
        out["model"] = self.model_label
        out["data_dir"] = self.data_label
        if self.data_bundle is not None:
            out["data_digest"] = self.data_bundle.digest
        if self.model_bundle is not None:
            out["model_digest"] = self.model_bundle.digest
        return {**self.params, **out}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU threads set to ``n`` (None or 0: as they are), then restore them.

    Set explicitly rather than left to the environment: a Ray worker gets ``OMP_NUM_THREADS`` = its CPUs, a plain
    process every core, and the same config sums in another order, with other last digits, under another count.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet() -> None:
    """No download/loading progress bars in workers: with many trials they bury Tune's progress table."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Tune's worker-side "Checkpoint successfully created at ..." after every epoch (the plan says each trial
    # checkpoints every epoch)
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
