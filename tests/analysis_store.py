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


# ------------------------------------------------------------------------------------------------------------------
# studies with conditions, SPoT runs, a search and a transfer-only target, written without training
N_EXAMPLES = 8


def outcome(task: str, seed: int, condition: str | None) -> list[int]:
    """The constructed per-example correctness (both exact match and rank) of one prompt on its own task: ``k``
    of ``N_EXAMPLES`` right, the first ``k`` examples. text: 6 + seed; random: 2 + seed; from-<source>: 7 (a
    source other than cb) or 4 (from cb); a search trial: 5."""
    if condition == "text":
        k = 6 + seed
    elif condition == "random":
        k = 2 + seed
    elif condition and condition.startswith("from-"):
        k = 4 if condition == "from-cb" else 7
    else:
        k = 5
    return [1] * k + [0] * (N_EXAMPLES - k)


def _eval_result(correct: list[int]):
    from ptray.lm.evaluate import EvalResult

    acc = sum(correct) / len(correct)
    return EvalResult(loss=1.0 - acc, exact_match=acc, rank_accuracy=acc, num_examples=len(correct),
                      em_correct=list(correct), rank_correct=list(correct), rank_pred=[0] * len(correct))


def write_train_run(ctx, task: str, seed: int, condition: str | None, correct: list[int], prompt, *,
                    lr: float = 0.03, init: str = "text", init_from: str | None = None, best_epoch: int = 1,
                    epochs: int = 2, max_epochs: int = 2) -> str:
    """One finished train run through the writer (``ptray.study.trial.finish_train_run``): tags from
    ``layout.run_tags``, per-epoch metrics, the final metrics and save_run's files; ``correct`` is its per-example
    outcome (the baselines: none right)."""
    from ptray import layout
    from ptray.study import tracking
    from ptray.study.trial import finish_train_run
    from ptray.training.loop import TrainResult

    client = ctx.client()
    name = layout.train_run_name(task, seed, condition)
    run_id = tracking.create_run(client, ctx.experiment_id, name, layout.run_tags(
        ctx.study, layout.TRAIN, task, seed, condition=condition)).info.run_id
    if init_from:
        client.set_tag(run_id, layout.TAG_INIT_FROM, init_from)
    res = _eval_result(correct)
    for epoch in range(1, epochs + 1):
        tracking.log_metrics(client, run_id, {"eval_loss": res.loss + 0.1 * abs(epoch - best_epoch),
                                              "best_eval_loss": res.loss, "best_epoch": best_epoch}, step=epoch)
    resolved = {"task": task, "seed": seed, "model": ctx.train.model, "init": init,
                "init_text": "yes no maybe" if init == "text" else "", "init_source": init_from,
                "num_tokens": int(prompt.shape[0]), "lr": lr, "max_epochs": max_epochs, "study": ctx.study}
    none = _eval_result([0] * len(correct))
    result = TrainResult(prompt=prompt, metrics={**res.metrics(), "best_epoch": best_epoch, "epochs_run": epochs,
                                                 "num_tokens": int(prompt.shape[0]),
                                                 "num_eval_examples": len(correct)},
                         history=[], resolved=resolved, evals={"prompt": res, "no_prompt": none, "init_text": none},
                         eval_idx=list(range(len(correct))))
    finish_train_run(client, run_id, result, resolved)
    return run_id


def _context(root: Path, model_dir: Path, experiment: str, study: str, plan: dict):
    from mlflow.tracking import MlflowClient

    from ptray.config import TrainConfig
    from ptray.study import tracking
    from ptray.study.context import StudyContext

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp_id = MlflowClient(tracking_uri=uri).create_experiment(experiment,
                                                              artifact_location=(root / "artifacts").as_uri())
    train = TrainConfig(model=str(model_dir), max_epochs=2, device="cpu")
    ctx = StudyContext(study=study, experiment_id=exp_id, tracking_uri=uri, train=train,
                       model_label=str(model_dir), data_label=None, params={"study": study})
    tracking.write_plan(ctx.client(), exp_id, study, plan)
    return ctx, Store(uri, experiment, root)


def build_condition_store(root: Path, model_dir: Path, experiment: str = "conditions", tasks=("cb", "rte", "copa"),
                          seeds=(0, 1), held_out=("wsc",), spot: bool = True) -> Store:
    """A study with conditions ``text`` and ``random`` (and with ``spot``, SPoT conditions ``from-<source>``: each
    task's prompt started from another task's text prompt of the same seed, tagged ``ptray.init_from``), a
    transfer grid of the text and random prompts on every task and on the transfer-only targets ``held_out``, and
    a no-prompt baseline per target. Outcomes are ``outcome``'s; every transfer gets 3 of 8 right, every baseline
    1 (example 0). Prompts: random [3, 64] rows (the tiny BLOOM's width), seeded."""
    import torch

    from ptray.study.transfer import log_evaluation

    conditions = {"text": {"init": "text"}, "random": {"init": "random"}}
    if spot:
        conditions.update({f"from-{s}": {"init": "prompt", "init_source": f"{s}-seed{{seed}}-text"} for s in tasks})
    ctx, store = _context(root, model_dir, experiment, "conditions",
                          {"study": "conditions", "tasks": list(tasks), "seeds": list(seeds),
                           "targets": list(held_out), "conditions": conditions, "search": {}})
    gen = torch.Generator().manual_seed(0)
    for task in tasks:
        for cond in ("text", "random"):
            for seed in seeds:
                write_train_run(ctx, task, seed, cond, outcome(task, seed, cond), torch.randn(3, 64, generator=gen),
                                init="text" if cond == "text" else "random")
    if spot:
        for source in tasks:
            for task in tasks:
                for seed in seeds:
                    cond = f"from-{source}"
                    write_train_run(ctx, task, seed, cond, outcome(task, seed, cond),
                                    torch.randn(3, 64, generator=gen), init="prompt",
                                    init_from=f"{source}-seed{seed}-text")
    client = ctx.client()
    idx = list(range(N_EXAMPLES))
    base = _eval_result([1] + [0] * (N_EXAMPLES - 1))
    no_prompt = {"exact_match": base.exact_match, "rank_accuracy": base.rank_accuracy}
    for target in (*tasks, *held_out):
        log_evaluation(client, ctx, None, None, target, base, idx, no_prompt, {"source": "none"})
        for source in tasks:
            for cond in ("text", "random"):
                for seed in seeds:
                    if source != target:
                        log_evaluation(client, ctx, source, seed, target, _eval_result([1, 1, 1] + [0] * 5), idx,
                                       no_prompt, {"source": source, "source_seed": seed}, cond)
    return store


def build_search_store(root: Path, model_dir: Path, experiment: str = "search", tasks=("cb", "rte"),
                       lrs=(0.3, 0.03, 0.003)) -> Store:
    """An lr search (seed 0, one trial per lr, conditions ``sample0``, ``sample1``, ...): trial k has eval loss
    ``losses[task][k]``; the last trial of each task was stopped by ASHA after one epoch (KILLED,
    ``ptray.stopped_by`` asha, no artifacts), as ``ptray.study.tuner.finish_stopped`` leaves it."""
    import torch

    from ptray import layout
    from ptray.study import tracking

    ctx, store = _context(root, model_dir, experiment, "lr", {
        "study": "lr", "tasks": list(tasks), "seeds": [0], "conditions": {},
        "search": {"space": {"lr": {"distribution": "loguniform", "low": 1e-3, "high": 1.0}}, "scheduler": "asha",
                   "metric": "eval_loss", "mode": "min"}})
    gen = torch.Generator().manual_seed(1)
    client = ctx.client()
    for t, task in enumerate(tasks):
        for k, lr in enumerate(lrs):
            trial = f"sample{k}"
            if k == len(lrs) - 1:  # stopped by the scheduler after epoch 1
                name = layout.train_run_name(task, 0, trial)
                run_id = tracking.create_run(client, ctx.experiment_id, name, layout.run_tags(
                    ctx.study, layout.TRAIN, task, 0, condition=trial)).info.run_id
                tracking.log_params_once(client, run_id, {"task": task, "seed": 0, "lr": lr})
                tracking.log_metrics(client, run_id, {"eval_loss": 2.0, "best_eval_loss": 2.0, "best_epoch": 1},
                                     step=1)
                client.set_tag(run_id, layout.TAG_STOPPED_BY, "asha")
                client.set_terminated(run_id, status=layout.KILLED)
                continue
            # cb: sample1 (lr 0.03) is best (6 of 8 right); rte: sample0 (lr 0.3) is best
            k_right = (4, 6)[k] if t == 0 else (7, 3)[k]
            write_train_run(ctx, task, 0, trial, [1] * k_right + [0] * (N_EXAMPLES - k_right),
                            torch.randn(3, 64, generator=gen), lr=lr)
    return store
