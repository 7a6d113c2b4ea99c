"""Print RESULTS.md's per-task table (bootstrap CIs over seeds and examples), the transfer means and the label
balance, from a study's MLflow experiment. The figures, Table 1, distances and nearest tokens come from the analysis.

    python docs/results/tables.py sqlite:///outputs/real-study-2/mlflow.db ptray-smollm2-cpu ../shared/data/superglue
"""
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from ptray.layout import BASELINES, EM_CORRECT, IDX, RANK_CORRECT, RANK_PRED

uri, experiment, data_dir = sys.argv[1], sys.argv[2], sys.argv[3]
client = MlflowClient(uri)
exp = client.get_experiment_by_name(experiment)
runs = client.search_runs([exp.experiment_id], max_results=1000)
TASKS = ["cb", "rte", "copa", "wsc"]
rng = np.random.default_rng(0)
B = 2000


def art(run, name):
    """A run's JSON artifact, parsed."""
    with tempfile.TemporaryDirectory() as d:
        p = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=d,
                                                tracking_uri=uri)
        return json.loads(Path(p).read_text())


def boot(mat):
    """mat [seeds, examples] of 0/1 -> (mean, lo, hi): bootstrap over examples, mean over seeds."""
    mat = np.asarray(mat, float)
    k, n = mat.shape
    idx = rng.integers(0, n, size=(B, n))
    sidx = rng.integers(0, k, size=(B, k))  # seeds resampled too (hierarchical), as analysis/transfer does
    stats = np.array([mat[sidx[b]][:, idx[b]].mean() for b in range(B)])
    return mat.mean(), *np.percentile(stats, [2.5, 97.5])


def fmt(t):
    """(mean, lo, hi) -> 'm [lo, hi]'."""
    m, lo, hi = t
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


train = {}
for r in runs:
    if r.data.tags.get("ptray.kind") == "train" and r.info.status == "FINISHED":
        train[(r.data.tags["ptray.task"], int(r.data.tags["ptray.seed"]))] = r
print(f"train runs finished: {len(train)}")
print("\n| task | n eval | metric | no prompt | init text (hard prompt) | trained prompt (4 seeds) "
      "| trained - no prompt | per seed |")
print("|---|---|---|---|---|---|---|---|")
for task in TASKS:
    rs = [train[(task, s)] for s in range(4) if (task, s) in train]
    if not rs:
        continue
    preds = [art(r, "predictions.json") for r in rs]
    n = len(preds[0][IDX])
    for metric, key in (("exact match", EM_CORRECT), ("rank accuracy", RANK_CORRECT)):
        trained = np.array([p[key] for p in preds])
        nop = np.array([preds[0][BASELINES]["no_prompt"][key]])
        ini = np.array([preds[0][BASELINES]["init_text"][key]])
        delta = trained - nop
        per_seed = ", ".join(f"{x:.2f}" for x in trained.mean(axis=1))
        print(f"| {task} | {n} | {metric} | {fmt(boot(nop))} | {fmt(boot(ini))} | {fmt(boot(trained))} | "
              f"{fmt(boot(delta))} | {per_seed} |")
print("\nEval loss (mean over seeds): ")
for task in TASKS:
    rs = [train[(task, s)] for s in range(4) if (task, s) in train]
    if rs:
        def m(k, rs=rs):
            """Mean of a final metric over the seeds."""
            return np.mean([r.data.metrics[k] for r in rs])

        print(f"- {task}: trained {m('final_eval_loss'):.3f}, no prompt {m('final_no_prompt_eval_loss'):.3f}, "
              f"init text {m('final_init_text_eval_loss'):.3f}; epoch_seconds "
              f"{np.mean([client.get_metric_history(r.info.run_id, 'epoch_seconds')[-1].value for r in rs]):.0f}")

# transfer: source task (mean over seeds) x target, delta vs no prompt
tr = {}
base = {}
for r in runs:
    k = r.data.tags.get("ptray.kind")
    if r.info.status != "FINISHED":
        continue
    if k == "transfer":
        tr.setdefault((r.data.tags["ptray.source"], r.data.tags["ptray.target"]), []).append(r.data.metrics)
    elif k == "baseline":
        base[r.data.tags["ptray.target"]] = r.data.metrics
for metric in ("exact_match", "rank_accuracy"):
    print(f"\nTransfer, {metric} (rows: source prompt, mean of seeds; columns: target task; last row: no prompt)")
    print("| source \\ target | " + " | ".join(TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    for s in TASKS:
        cells = []
        for t in TASKS:
            v = tr.get((s, t))
            cells.append(f"{np.mean([x[metric] for x in v]):.2f} ({np.mean([x['delta_' + metric] for x in v]):+.2f})"
                         if v else "-")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("| no prompt | " + " | ".join(f"{base[t][metric]:.2f}" if t in base else "-" for t in TASKS) + " |")

print("\nLabel balance of the evaluated examples and how often the trained prompts predict their most frequent label:")
for task in TASKS:
    rs = [train[(task, s)] for s in range(4) if (task, s) in train]
    preds = [art(r, "predictions.json") for r in rs]
    rows = [json.loads(line) for line in open(Path(data_dir) / task.upper() / "val.jsonl")]
    idx = preds[0][IDX]
    byidx = {r["idx"]: r for r in rows}
    gold = Counter(str(byidx[i]["label"]) for i in idx)
    share = [Counter(p[RANK_PRED]).most_common(1)[0][1] / len(idx) for p in preds]
    print(f"- {task}: gold labels {dict(gold)}; majority share {max(gold.values())/len(idx):.2f}; "
          f"per seed, share of the most-predicted label (rank): {', '.join(f'{x:.2f}' for x in share)}")
