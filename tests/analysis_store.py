"""Build a real MLflow store the way docs/tracking.md says a study leaves one, from real short trainings.

Test fixture code (not library code): the analysis tests read it as a smoke study would have written it.

    python tests/analysis_store.py OUT_DIR --model TINY_MODEL_DIR --data-dir ../shared/data/superglue
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

TASKS = ("cb", "rte", "copa", "wsc")


@dataclass
class Store:
    tracking_uri: str
    experiment: str
    root: Path


def _log_json(client, run_id: str, name: str, obj, tmp: Path) -> None:
    path = tmp / name
    path.write_text(json.dumps(obj))
    client.log_artifact(run_id, str(path))


def build_store(root: Path, model_dir: Path, data_dir: Path, experiment: str = "analysis-smoke",
                study: str = "smoke", tasks=TASKS, seeds=(0, 1), max_examples: int = 16, max_epochs: int = 1,
                diagonal_transfers: bool = False, tracking_uri: str | None = None) -> Store:
    """Train ``tasks`` x ``seeds`` prompts on the tiny model, evaluate every prompt on every other task (and on
    its own when ``diagonal_transfers``) and no prompt on every task, and log it all to a sqlite store in
    ``root`` (or to ``tracking_uri``, e.g. a tracking server that stores the artifacts itself)."""
    from mlflow.tracking import MlflowClient

    from ptray.evaluate import evaluate_on_task
    from ptray.model import load_model
    from ptray.train import TrainConfig, save_run, train

    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(
        experiment, artifact_location=None if tracking_uri else (root / "artifacts").as_uri())
    model, tokenizer = load_model(str(model_dir))
    eval_kw = {"data_dir": str(data_dir), "max_examples": max_examples, "max_length": 128, "batch_size": 32}

    def tags(**kw):
        return {f"ptray.{k}": str(v) for k, v in {"study": study, **kw}.items()}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prompts = {}
        for task in tasks:
            for seed in seeds:
                cfg = TrainConfig(task=task, seed=seed, model=str(model_dir), data_dir=str(data_dir),
                                  max_epochs=max_epochs, max_train_examples=16, max_eval_examples=max_examples,
                                  max_length=128, batch_size=8, device="cpu")
                result = train(cfg)
                folder = save_run(result, tmp / f"{task}-seed{seed}")
                run = client.create_run(exp_id, run_name=f"{task}-seed{seed}",
                                        tags=tags(kind="train", task=task, seed=seed))
                client.log_artifacts(run.info.run_id, str(folder))
                client.log_metric(run.info.run_id, "exact_match", result.metrics["exact_match"])
                client.set_terminated(run.info.run_id, "FINISHED")
                prompts[(task, seed)] = result.prompt
        baselines = {}
        for target in tasks:
            res, idx = evaluate_on_task(model, tokenizer, target, None, **eval_kw)
            baselines[target] = res
            run = client.create_run(exp_id, run_name=f"baseline-none-on-{target}",
                                    tags=tags(kind="baseline", task=target, source="none", target=target))
            _eval_artifacts(client, run.info.run_id, None, None, target, res, idx, res, tmp)
        for (source, seed), prompt in prompts.items():
            for target in tasks:
                if target == source and not diagonal_transfers:
                    continue
                res, idx = evaluate_on_task(model, tokenizer, target, prompt, **eval_kw)
                run = client.create_run(exp_id, run_name=f"transfer-{source}-seed{seed}-on-{target}",
                                        tags=tags(kind="transfer", task=target, seed=seed, source=source,
                                                  target=target))
                _eval_artifacts(client, run.info.run_id, source, seed, target, res, idx, baselines[target], tmp)
    return Store(uri, experiment, root)


def _eval_artifacts(client, run_id, source, seed, target, res, idx, base, tmp: Path) -> None:
    metrics = {
        "source": source, "source_seed": seed, "target": target, "exact_match": res.exact_match,
        "rank_accuracy": res.rank_accuracy, "eval_loss": res.loss, "num_examples": res.num_examples,
        "no_prompt_exact_match": base.exact_match, "no_prompt_rank_accuracy": base.rank_accuracy,
        "delta_exact_match": res.exact_match - base.exact_match,
        "delta_rank_accuracy": res.rank_accuracy - base.rank_accuracy,
    }
    run_tmp = tmp / run_id
    run_tmp.mkdir()
    _log_json(client, run_id, "metrics.json", metrics, run_tmp)
    _log_json(client, run_id, "predictions.json", {"idx": idx, "em_correct": res.em_correct,
                                                   "rank_correct": res.rank_correct, "rank_pred": res.rank_pred},
              run_tmp)
    client.set_terminated(run_id, "FINISHED")


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
