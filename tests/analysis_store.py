"""Build a real MLflow store the way docs/tracking.md says a study leaves one, from real short trainings.

Test fixture code (not library code): the analysis tests read it as a smoke study would have written it.

    python tests/analysis_store.py OUT_DIR --model TINY_MODEL_DIR --data-dir ../shared/data/superglue
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

TASKS = ("cb", "rte", "copa", "wsc")


@dataclass
class Store:
    tracking_uri: str
    experiment: str
    root: Path


def build_store(root: Path, model_dir: Path, data_dir: Path, experiment: str = "analysis-smoke",
                study: str = "smoke", tasks=TASKS, seeds=(0, 1), max_examples: int = 16, max_epochs: int = 1,
                diagonal_transfers: bool = False, tracking_uri: str | None = None) -> Store:
    """Train ``tasks`` x ``seeds`` prompts on the tiny model, evaluate every prompt on every other task (and on
    its own when ``diagonal_transfers``) and no prompt on every task, and log it all to a sqlite store in
    ``root`` (or to ``tracking_uri``, e.g. a tracking server that stores the artifacts itself).

    The runs are written by the sweep's own functions (``ptray.study.trial.run_training``, ``ptray.transfer
    .transfer_target``), so the store holds exactly what a study leaves."""
    from mlflow.tracking import MlflowClient

    from ptray import layout
    from ptray.config import TrainConfig
    from ptray.study import tracking
    from ptray.study.context import StudyContext
    from ptray.study.transfer import transfer_target
    from ptray.study.trial import run_training

    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    exp_id = MlflowClient(tracking_uri=uri).create_experiment(
        experiment, artifact_location=None if tracking_uri else (root / "artifacts").as_uri())
    train = TrainConfig(model=str(model_dir), data_dir=str(data_dir), max_epochs=max_epochs, max_train_examples=16,
                        max_eval_examples=max_examples, max_length=128, batch_size=8, device="cpu")
    ctx = StudyContext(study=study, experiment_id=exp_id, tracking_uri=uri, train=train, model_label=str(model_dir),
                       data_label=str(data_dir), params={"study": study})
    sources = []
    for task in tasks:
        for seed in seeds:
            run_training({"task": task, "seed": seed}, ctx, None, lambda metrics, state, run_id: None)
            run = tracking.find_run(ctx.client(), exp_id, study, layout.train_run_name(task, seed))
            sources.append({"task": task, "seed": seed, "run_id": run.info.run_id})
    for target in tasks:
        transfer_target(target, [s for s in sources if diagonal_transfers or s["task"] != target], ctx)
    assert all(r.info.status == layout.FINISHED for r in MlflowClient(tracking_uri=uri).search_runs([exp_id]))
    return Store(uri, experiment, root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--examples", type=int, default=16)
    a = p.parse_args()
    store = build_store(Path(a.out_dir), Path(a.model), Path(a.data_dir), seeds=tuple(range(a.seeds)),
                        max_epochs=a.epochs, max_examples=a.examples)
    print(store)


if __name__ == "__main__":
    main()
