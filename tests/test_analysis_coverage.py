"""A partial study is analysed as partial: the report's first section says what the stored plan asked for, what
was found and what is missing (FAILED, KILLED, deleted, never run), per task and seed (issue 32)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from analysis_store import build_store

from analysis.coverage import coverage_section, plan_rows
from analysis.records import DELETED, RunStatus, Study
from ptray import layout
from ptray.plan import Plan


def _plan(**kw) -> dict:
    return Plan(study="s", **kw).to_json()


def test_rows_name_every_missing_run_with_why():
    plan = _plan(tasks=("cb", "rte"), seeds=(0, 1, 2))
    runs = [RunStatus("s", "train", "cb-seed0", layout.FINISHED),
            RunStatus("s", "train", "cb-seed1", layout.FAILED),
            RunStatus("s", "train", "cb-seed1", layout.FINISHED),  # failed, then finished on --resume: found
            RunStatus("s", "train", "cb-seed2", DELETED),
            RunStatus("s", "train", "rte-seed0", layout.KILLED),
            RunStatus("s", "train", "rte-seed1", layout.RUNNING),
            RunStatus("other", "train", "rte-seed2", layout.FINISHED),  # another study's run is not this one's
            *[RunStatus("s", "transfer", layout.transfer_run_name("cb", s, t), layout.FINISHED)
              for s, t in ((0, "cb"), (0, "rte"), (1, "cb"))],
            RunStatus("s", "transfer", "transfer-cb-seed1-on-rte", layout.FAILED),
            RunStatus("s", "baseline", "baseline-none-on-cb", layout.FINISHED)]
    rows = {(r["task"], r["seed"]): r for r in plan_rows("s", plan, runs)}
    assert list(rows) == [("cb", "0"), ("cb", "1"), ("cb", "2"), ("rte", "0"), ("rte", "1"), ("rte", "2"),
                          ("no prompt", "-")]
    # (planned, found, missing): a train run and its 2 transfer runs per (task, seed)
    assert {k: (r["planned"], r["found"], r["missing"]) for k, r in rows.items()} == {
        ("cb", "0"): (3, 3, 0), ("cb", "1"): (3, 2, 1), ("cb", "2"): (3, 0, 3), ("rte", "0"): (3, 0, 3),
        ("rte", "1"): (3, 0, 3), ("rte", "2"): (3, 0, 3), ("no prompt", "-"): (2, 1, 1)}
    assert rows[("cb", "0")]["missing_runs"] == ""
    assert rows[("cb", "1")]["missing_runs"] == "transfer-cb-seed1-on-rte (FAILED)"
    assert rows[("cb", "2")]["missing_runs"] == "cb-seed2 (deleted; and its 2 evaluations)"
    assert rows[("rte", "0")]["missing_runs"] == "rte-seed0 (KILLED; and its 2 evaluations)"
    assert rows[("rte", "1")]["missing_runs"] == "rte-seed1 (RUNNING; and its 2 evaluations)"
    assert rows[("rte", "2")]["missing_runs"] == "rte-seed2 (no run; and its 2 evaluations)"
    assert rows[("no prompt", "-")]["missing_runs"] == "baseline-none-on-rte (no run)"


def test_a_search_trial_stopped_by_its_scheduler_is_found_and_has_no_transfer_runs():
    plan = _plan(tasks=("cb",), seeds=(0,), search={"space": {"lr": {}}, "scheduler": "asha"}, num_samples=2)
    runs = [RunStatus("s", "train", "cb-seed0-sample0", layout.KILLED, stopped_by="asha"),
            RunStatus("s", "train", "cb-seed0-sample1", layout.FINISHED),
            RunStatus("s", "transfer", "transfer-cb-seed0-sample1-on-cb", layout.FINISHED),
            RunStatus("s", "baseline", "baseline-none-on-cb", layout.FINISHED)]
    section = coverage_section(Study("e", "s", [], plans={"s": plan}, runs=runs))
    assert section.summary["coverage"]["complete"] and section.summary["coverage"]["planned"] == 4
    assert section.meta["coverage_headline"] == "complete: the 4 runs the plan asked for were all found"


def test_no_plan_and_an_unreadable_plan_are_said():
    assert coverage_section(Study("e", "s", [])).notes == [
        "the experiment holds no stored plan (ptray.plan.<study>): the report cannot say what the study asked for, "
        "nor what is missing"]
    bad = coverage_section(Study("e", "s", [], plans={"s": {"tasks": ["nosuchtask"], "seeds": [0]}}))
    assert bad.outputs == [] and "the stored plan of study 's' could not be read" in bad.notes[0]


@pytest.fixture(scope="module")
def partial_store(tmp_path_factory, tiny_model_dir, data_dir):
    """A study whose plan asks for cb x seeds 0-3: seed 0 finished (with its transfer run and the baseline), seed 1
    FAILED, seed 2 finished but its runs deleted, seed 3 never ran."""
    from mlflow.tracking import MlflowClient

    from ptray.study import tracking

    store = build_store(tmp_path_factory.mktemp("partial"), tiny_model_dir, data_dir, experiment="partial",
                        study="partial", tasks=("cb",), seeds=(0,), max_examples=8, diagonal_transfers=True)
    client = MlflowClient(tracking_uri=store.tracking_uri)
    exp_id = client.get_experiment_by_name(store.experiment).experiment_id
    tracking.write_plan(client, exp_id, "partial", Plan(study="partial", tasks=("cb",), seeds=(0, 1, 2, 3)).to_json())
    failed = client.create_run(exp_id, run_name="cb-seed1", tags=layout.run_tags("partial", "train", "cb", 1))
    client.set_terminated(failed.info.run_id, layout.FAILED)
    gone = client.create_run(exp_id, run_name="cb-seed2", tags=layout.run_tags("partial", "train", "cb", 2))
    client.set_terminated(gone.info.run_id, layout.FINISHED)
    client.delete_run(gone.info.run_id)
    return store


def test_the_report_says_first_what_the_plan_asked_for_and_what_is_missing(partial_store, tmp_path, caplog):
    from analysis import run

    with caplog.at_level("WARNING", logger="ptray.analysis"):
        out = run(partial_store.experiment, tracking_uri=partial_store.tracking_uri, out_dir=tmp_path / "r",
                  n_boot=10, faithfulness=False, log_to_mlflow=False)
    headline = ("INCOMPLETE: the plan asked for 9 runs, 3 were found and 6 are missing (in cb seed 1, cb seed 2, "
                "cb seed 3); every section below reads only the runs found")
    assert f"warning: {headline}; the report's first section names the missing runs" in caplog.text
    cov = json.loads((out / "analysis.json").read_text())["coverage"]
    assert (cov["complete"], cov["planned"], cov["found"], cov["missing"]) == (False, 9, 3, 6)
    table = pd.read_csv(out / "coverage.csv", dtype={"seed": str}, keep_default_na=False)
    assert table[["task", "seed", "planned", "found", "missing"]].values.tolist() == [
        ["cb", "0", 2, 2, 0], ["cb", "1", 2, 0, 2], ["cb", "2", 2, 0, 2], ["cb", "3", 2, 0, 2],
        ["no prompt", "-", 1, 1, 0]]
    assert table["missing_runs"].tolist() == ["", "cb-seed1 (FAILED; and its 1 evaluations)",
                                              "cb-seed2 (deleted; and its 1 evaluations)",
                                              "cb-seed3 (no run; and its 1 evaluations)", ""]
    page = (out / "report.html").read_text()
    # first: the headline and the section, before the introduction and every other section
    assert page.index(headline) < page.index("The plan and what was found") < page.index("cb-seed3 (no run")
    assert page.index("cb-seed3 (no run") < page.index("This page recomputes") < page.index("Nearest tokens")
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == f"**{headline}.**" and md[4] == "## The plan and what was found"
