"""``ptray publish STUDY_DIR``: a local study's run folders into MLflow, the experiment the Ray study would have made.

Every run folder (``ptray.study.local``) becomes one MLflow run with the layout contract of ``ptray.layout``
(docs/tracking.md): the same run name, tags and params, a train run's per-epoch metrics at their epochs, the final
metrics and the same artifacts, logged by the function the Ray study logs a finished run with
(``tracking.log_finished_run``). The plan goes into the experiment as the Ray study stores it, so ``python -m
analysis`` and ``ptray study --resume`` read the published study as any other.

Idempotent: a run already FINISHED in the experiment is skipped; an unfinished one (a publish stopped half-way) is
replaced; publishing twice creates nothing new.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ptray import layout
from ptray.cli import OneLineParser
from ptray.errors import PtrayError
from ptray.files import disk_full_from, is_disk_full
from ptray.plan import Plan
from ptray.study import store, tracking
from ptray.study.local import RUN_FILE, finished_runs, folder_lock, read_plan, run_dir

log = logging.getLogger("ptray")


def publish(study_dir: str | Path, tracking_uri: str | None = None, experiment: str | None = None) -> dict[str, Any]:
    """Log the finished runs of the local study in ``study_dir`` into MLflow; return ``{"experiment",
    "experiment_id", "tracking_uri", "published", "artifacts", "skipped"}`` (``artifacts``: where the runs' files
    are, ``tracking.artifact_location``).

    ``experiment`` defaults to ``ptray-<study>``, as the Ray study names it. Raises PtrayError (one line): not a
    study folder, one another process is running or publishing (``folder_lock``), an unreachable store, or an
    experiment that holds another plan under the same study id.
    """
    plan = read_plan(study_dir)
    with folder_lock(study_dir):  # not while another process trains or publishes it (this one's study: re-entrant)
        return _publish(plan, study_dir, tracking_uri, experiment)


def _publish(plan: Plan, study_dir: str | Path, tracking_uri: str | None, experiment: str | None) -> dict[str, Any]:
    uri = store.resolve_tracking_uri(tracking_uri)
    client = store.open_store(uri)  # a store MLflow refuses (a folder, not a database): one line
    experiment = experiment or f"ptray-{plan.study}"
    exp_id = tracking.get_or_create_experiment(client, experiment)
    stored = tracking.read_plan(client, experiment, plan.study)
    if stored is None:
        tracking.write_plan(client, exp_id, plan.study, plan.to_json())
    elif Plan.from_json(stored).compared() != plan.compared():
        raise PtrayError(f"experiment {experiment!r} at {uri} already holds a study {plan.study!r} with another "
                         f"plan; publish into another --experiment")
    published = skipped = 0
    run_ids: dict[str, str] = {}  # train run name -> its MLflow run id, which a transfer run names as its source
    runs = finished_runs(study_dir)
    for name, info in sorted(runs.items(), key=lambda kv: kv[1]["kind"] != layout.TRAIN):  # train runs first
        existing = tracking.replace_unfinished(client, exp_id, plan.study, name)
        if existing is not None:
            run_ids[name] = existing.info.run_id
            skipped += 1
            continue
        params = dict(info["params"])
        if info["kind"] == layout.TRANSFER:  # as the Ray study's transfer run names the train run it evaluated
            tags = info["tags"]
            source = layout.train_run_name(tags[layout.TAG_SOURCE], int(tags[layout.TAG_SEED]),
                                           tags.get(layout.TAG_CONDITION))
            params["source_run_id"] = run_ids.get(source, "")
        run_id = tracking.create_run(client, exp_id, name, info["tags"]).info.run_id
        run_ids[name] = run_id
        folder = run_dir(study_dir, name)
        metrics = json.loads((folder / layout.METRICS_FILE).read_text())
        if info["kind"] == layout.TRAIN:  # the per-epoch history at its epochs, as the trial logs it while training
            for row in json.loads((folder / layout.HISTORY_FILE).read_text()):
                tracking.log_metrics(client, run_id, tracking.epoch_metrics(row), step=row["epoch"])
        with tempfile.TemporaryDirectory(prefix="ptray-publish-") as tmp:  # the artifacts: the folder less run.json
            artifacts = Path(tmp) / name
            shutil.copytree(folder, artifacts, ignore=shutil.ignore_patterns(RUN_FILE))
            tracking.log_finished_run(client, run_id, params, layout.logged_metrics(info["kind"], metrics), artifacts)
        published += 1
    return {"experiment": experiment, "experiment_id": exp_id, "tracking_uri": uri, "published": published,
            "artifacts": tracking.artifact_location(client, exp_id),
            "skipped": skipped}


def build_parser(prog: str = "ptray publish") -> argparse.ArgumentParser:
    """``ptray publish``'s flags."""
    p = OneLineParser(prog=prog, description="Log a local study's run folders into MLflow (idempotent).")
    p.add_argument("study_dir", help="the folder `ptray study --local DIR` wrote")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (unset: $MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///./mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (unset: ptray-<study>)")
    return p


def main(argv: list[str] | None = None, prog: str = "ptray publish") -> int:
    """Publish a local study; returns the exit status (2 with one ``error:`` line on a PtrayError)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        out = publish(args.study_dir, args.tracking_uri, args.experiment)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk under MLflow's artifact copy: one line, not its traceback
        if not is_disk_full(err):
            raise
        print(f"error: {disk_full_from(err)}", file=sys.stderr)
        return 2
    print(f"published {out['published']} runs ({out['skipped']} already there) into experiment "
          f"{out['experiment']!r} at {out['tracking_uri']} (artifacts in {out['artifacts']}); "
          f"{store.ui_command(out['tracking_uri'])}")
    return 0
