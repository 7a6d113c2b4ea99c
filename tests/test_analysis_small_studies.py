"""Studies of one task and/or one seed are analysed: every section computes what it can and the report says what it
cannot. Then a one-prompt study written by the real writer code (tests/analysis_store.py) through ``analysis.run``:
the report, what analysis.json records (every input that changes a number, the time of each section), and the
report folder's handling."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_store import build_store

from analysis import geometry, report, stochasticity
from analysis.pipeline import AnalysisOptions, compute
from analysis.records import EvalRun, PromptRun, Study
from ptray import layout


def _study(tasks: list[str], seeds: list[int]) -> Study:
    """Random 3-row prompts of the tiny BLOOM (hidden 64), with per-example train predictions, transfer runs
    between distinct tasks and a baseline per task (6 examples each)."""
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    idx = list(range(6))

    def outcomes():
        return rng.integers(0, 2, 6).tolist()

    prompts = [PromptRun(f"{t}{s}", t, s, torch.randn(3, 64, generator=gen), {"init": "text", "init_text": "yes no"},
                         {"exact_match": 0.5, "rank_accuracy": 0.5},
                         {layout.IDX: idx, layout.EM_CORRECT: outcomes(), layout.RANK_CORRECT: outcomes(),
                          layout.BASELINES: {"no_prompt": {layout.EM_CORRECT: [0] * 6, layout.RANK_CORRECT: [1] * 6}}})
               for t in tasks for s in seeds]
    evals = [EvalRun(f"{a}{s}{b}", "transfer", b, a, s, idx=idx, em_correct=outcomes(), rank_correct=outcomes())
             for a in tasks for s in seeds for b in tasks if a != b]
    evals += [EvalRun(f"base-{b}", "baseline", b, idx=idx, em_correct=[0] * 6, rank_correct=[1] * 6) for b in tasks]
    return Study("e", "s", prompts, evals)


SHAPES = {
    "one task, one seed": (["cb"], [0]),
    "one task, three seeds": (["cb"], [0, 1, 2]),
    "three tasks, one seed": (["cb", "rte", "copa"], [0]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_section_handles_one_task_or_one_seed(shape, tiny, tmp_path):
    tasks, seeds = SHAPES[shape]
    model, tokenizer = tiny
    results = compute(_study(tasks, seeds), model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=20))
    report.write_all(results, tmp_path)
    notes = "\n".join(results.meta["notes"])
    names = {o.name for o in results.outputs}
    # what every study has: nearest tokens, Table 1, norms, transfer (its own task at least)
    assert {f"nearest_{t}" for t in tasks} | {"table1_norms", "norms", "transfer"} <= names
    t1 = pd.read_csv(tmp_path / "table1_norms.csv")
    assert t1["frobenius_raw_mean"].notna().all() and t1["rms_row_norm_effective_mean"].notna().all()
    summary = json.loads((tmp_path / "analysis.json").read_text())
    transfer = pd.DataFrame(summary["transfer"])
    assert len(transfer) == len(tasks) ** 2 * 2 and transfer["delta_mean"].notna().all()
    if len(seeds) == 1:
        assert t1["frobenius_raw_var_ddof0"].isna().all()  # no spread across one seed (not a variance of 0)
        assert f"variance and spread across seeds: n/a for {', '.join(tasks)} (one seed)" in notes
        assert "transfer spread across seeds (delta_sd_ddof1): n/a" in notes
        assert transfer["delta_sd_ddof1"].isna().all()
    else:
        assert t1["frobenius_raw_var_ddof0"].notna().all() and "n/a for cb (one seed)" not in notes
    if len(tasks) * len(seeds) == 1:
        assert "distances between prompts (Figure 7): n/a (the study has one prompt)" in notes
        assert "t-SNE map (Figure 6) not computed: it needs 3 or more prompts, the study has 1" in notes
        assert not names & {"distances", "within_task", "distance_pairs", "prompt_maps"}
    else:
        assert {"distances", "within_task", "distance_pairs", "prompt_maps"} <= names
        assert len(pd.read_csv(tmp_path / "distance_pairs.csv")) == 3  # 3 prompts: 3 pairs
        maps = pd.read_csv(tmp_path / "prompt_maps.csv")
        assert maps[["tsne_raw_x", "pca_raw_x", "tsne_effective_y"]].notna().all().all()
    if len(tasks) == 1:
        assert "transfer between tasks: n/a (one task)" in notes
        assert "distance vs transfer and the predictors' correlations not tested" in notes
        assert "correlation" not in names
    else:  # 3 tasks with one seed each: the Mantel test over the 3! relabellings runs
        stats = pd.read_csv(tmp_path / "correlation_stats.csv")
        assert (stats["mantel_permutations"] == 6).all()
        assert "within-task distances (the diagonal of Figure 7): n/a for cb, rte, copa (one seed)" in notes


def _identical(study: Study, task: str) -> Study:
    """``study`` with every seed of ``task`` holding the same prompt (its first seed's), as when a tiny learning
    rate leaves each seed at the init text."""
    first = next(p.prompt for p in study.prompts if p.task == task)
    prompts = [dataclasses.replace(p, prompt=first.clone()) if p.task == task else p for p in study.prompts]
    return dataclasses.replace(study, prompts=prompts)


@pytest.mark.parametrize("tasks", [["cb"], ["cb", "rte", "copa"]], ids=["all coincide", "one task's seeds"])
def test_coinciding_prompts_coincide_in_every_map(tasks, tiny, tmp_path):
    """Four seeds with one prompt: one point in t-SNE and PCA (t-SNE used to spread them ~200 units apart), no NaN
    and no warning (PCA's explained variance was 0/0), and the figure and the report say what is shown."""
    model, tokenizer = tiny
    study = _identical(_study(tasks, [0, 1, 2, 3]), "cb")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        results = compute(study, model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=20))
        report.write_all(results, tmp_path)
    maps = pd.read_csv(tmp_path / "prompt_maps.csv")
    cb = maps[maps.task == "cb"]
    columns = [c for c in maps if c.startswith(("tsne_", "pca_"))]
    assert len(columns) == 8 and maps[columns].notna().all().all()
    assert (cb[columns].nunique() == 1).all()  # every map draws the four cb prompts as one point
    notes = "\n".join(results.meta["notes"])
    figure = next(o.figure for o in results.outputs if o.name == "prompt_maps")
    axis_notes = [ax.get_xlabel() for ax in figure.axes if ax.get_title()]
    within = pd.read_csv(tmp_path / "within_task.csv")
    cb_within = within[within.task == "cb"]
    assert (cb_within["mean"] == 0).all() and (cb_within["sd_ddof1"] == 0).all()
    assert cb_within["cv_ddof1"].isna().all()  # 0 / 0: no spread to compare with its mean
    if len(tasks) == 1:
        assert (cb[columns] == 0).all().all()
        assert "the maps (Figure 6) have zero spread: all 4 prompts coincide" in notes
        assert axis_notes == [stochasticity.ZERO_SPREAD, f"first 3 rows flattened; {stochasticity.ZERO_SPREAD}"] * 2
        assert results.meta["inputs"]["tsne"]["perplexity"] is None  # no t-SNE ran
        t1 = pd.read_csv(tmp_path / "table1_norms.csv")
        assert t1["frobenius_raw_var_ddof0"].tolist() == [0.0]  # no spread across seeds: a variance of 0, not n/a
    else:
        assert "4 of the 12 prompts coincide with another (distance 0) and share one point in every map: cb seed 0, " \
               "cb seed 1, cb seed 2, cb seed 3" in notes
        assert "zero spread" not in notes and not any(ZERO in a for a in axis_notes for ZERO in ["zero spread"])
        assert results.meta["inputs"]["tsne"]["perplexity"] == geometry.tsne_perplexity(9)  # 9 distinct points
        assert axis_notes[0].startswith(f"perplexity {geometry.tsne_perplexity(9):g}, ")
        assert maps.loc[maps.task != "cb", columns].nunique().min() == 8  # the other prompts stay apart


def test_a_map_with_no_spread_is_zero_not_nan():
    prompts = [torch.ones(3, 4)] * 4
    d = geometry.distance_matrix(prompts)
    assert (geometry.coinciding(d) == 0).all() and (geometry.tsne_map(d) == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        coords, ratio = geometry.pca_map(geometry.common_length_features(prompts)[0])
    assert (coords == 0).all() and ratio.tolist() == [0.0, 0.0]
    # truncated distances: A = B[:2] is at distance 0 from B without being B (C tells them apart)
    a, b, c = torch.zeros(2, 4), torch.zeros(3, 4), torch.ones(3, 4)
    assert geometry.coinciding(geometry.distance_matrix([a, b, c, b])).tolist() == [0, 1, 2, 1]


# ----------------------------------------------------------------------------------------------- through run()
@pytest.fixture(scope="module")
def one_prompt_store(tmp_path_factory, tiny_model_dir, data_dir):
    """``--tasks cb --seeds 0``: one train run, its baseline, no transfer run."""
    return build_store(tmp_path_factory.mktemp("store1"), tiny_model_dir, data_dir, experiment="one-prompt",
                       tasks=("cb",), seeds=(0,), max_examples=8)


def test_a_one_prompt_study_is_analysed_and_records_what_it_used(one_prompt_store, tmp_path):
    from analysis import run
    from analysis.correlation import MANTEL_MAX_EXACT, MANTEL_RANDOM

    out = run(one_prompt_store.experiment, tracking_uri=one_prompt_store.tracking_uri, out_dir=tmp_path / "r",
              n_boot=30, seed=7, log_to_mlflow=False)
    summary = json.loads((out / "analysis.json").read_text())
    meta = summary["meta"]
    assert meta["tasks"] == ["cb"] and meta["num_prompts"] == 1
    assert any("distances between prompts (Figure 7): n/a" in n for n in meta["notes"])
    # the faithfulness check ran on the real examples: the soft prompt's accuracy is the recorded one
    faith = pd.read_csv(out / "faithfulness.csv")
    assert len(faith) == 1 and faith["soft_exact_match"].iloc[0] == pytest.approx(faith["recorded_exact_match"][0])
    # every input that changes a number
    inputs = meta["inputs"]
    assert inputs["seed"] == 7 and inputs["options"]["seed"] == 7 and inputs["options"]["n_boot"] == 30
    assert inputs["bootstrap"] == {"seed": 7, "n_boot": 30, "level": 0.95}
    assert inputs["mantel"] == {"seed": 7, "max_exact": MANTEL_MAX_EXACT, "n_random": MANTEL_RANDOM}
    assert inputs["tsne"]["seed"] == 7 and inputs["tsne"]["perplexity"] is None  # one prompt: no t-SNE
    assert inputs["options"]["distance"] == "truncate" and inputs["options"]["top_k"] == 3
    model = inputs["model"]
    assert model["name"] == meta["model"] and model["source"] == "the train runs' config.json"
    assert model["model_type"] == "bloom" and model["dtype"] == "float32" and model["device"] == "cpu"
    assert model["num_parameters"] > 0 and "torch_version" in inputs["versions"] and inputs["versions"]["code"]
    # the wall time of every section, in seconds
    seconds = meta["seconds"]
    assert {"load_study", "load_model", "prepare", "nearest", "stochasticity", "distances", "transfer",
            "predictors", "faithfulness"} <= set(seconds)
    assert all(isinstance(v, float) and v >= 0 for v in seconds.values())
    # a re-run replaces the earlier report whole; a folder holding anything else is refused
    (out / "stale.csv").write_text("old")
    again = run(one_prompt_store.experiment, tracking_uri=one_prompt_store.tracking_uri, out_dir=out, n_boot=30,
                seed=8, faithfulness=False, log_to_mlflow=False)
    assert again == out and not (out / "stale.csv").exists()
    assert json.loads((out / "analysis.json").read_text())["meta"]["inputs"]["seed"] == 8
    assert not list(out.parent.glob(".*partial*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    from ptray.errors import PtrayError

    with pytest.raises(PtrayError, match="already holds files; choose a new --out or pass --overwrite"):
        run(one_prompt_store.experiment, tracking_uri=one_prompt_store.tracking_uri, out_dir=other,
            log_to_mlflow=False)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


def test_a_store_lost_while_logging_says_where_the_report_is_and_how_to_log_it(one_prompt_store, tmp_path,
                                                                               monkeypatch, capsys):
    """The tracking server stops once the report is written: one line says that it was written, where, and the
    command that logs it later; that command (``--log-only``) then logs the same files and metrics, computing
    nothing."""
    import requests
    from mlflow.tracking import MlflowClient

    from analysis.__main__ import main

    def server_gone(self, run_id, local_dir, artifact_path=None):
        raise requests.exceptions.ConnectionError("Connection refused")

    out = tmp_path / "report"
    argv = ["--experiment", one_prompt_store.experiment, "--tracking-uri", one_prompt_store.tracking_uri, "--out",
            str(out), "--bootstrap", "20"]  # with the faithfulness check: it gives metrics
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "log_artifacts", server_gone)
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    again = f"ptray analyse --experiment {one_prompt_store.experiment} --tracking-uri " \
            f"{one_prompt_store.tracking_uri} --out {out} --log-only"
    assert "\n" not in err and err.startswith(f"error: the MLflow store {one_prompt_store.tracking_uri} cannot be "
                                              f"used: ConnectionError: Connection refused"), err
    assert err.endswith(f" -- the report was written to {out / 'report.html'} but not logged to MLflow; to log it "
                        f"once the store answers (computing nothing again): {again}"), err
    assert (out / "report.html").is_file()
    client = MlflowClient(tracking_uri=one_prompt_store.tracking_uri)
    exp = client.get_experiment_by_name(one_prompt_store.experiment)
    kind = f"tags.`{layout.TAG_KIND}` = '{layout.ANALYSIS}'"
    assert [r.info.status for r in client.search_runs([exp.experiment_id], kind)] == [layout.FAILED]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert main(again.split()[2:]) == 0
    assert capsys.readouterr().out.strip().endswith(f"logged the report {out}/report.html to MLflow")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing computed or rewritten
    runs = client.search_runs([exp.experiment_id], kind + " and attributes.status = 'FINISHED'")
    assert len(runs) == 1
    assert {f.path for f in client.list_artifacts(runs[0].info.run_id)} == set(before)
    metrics = json.loads((out / "analysis.json").read_text())["mlflow_metrics"]
    assert metrics and runs[0].data.metrics == metrics


def test_log_only_without_a_report_is_one_line(one_prompt_store, tmp_path, capsys):
    from analysis.__main__ import main

    argv = ["--experiment", one_prompt_store.experiment, "--tracking-uri", one_prompt_store.tracking_uri, "--out",
            str(tmp_path / "none"), "--log-only"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'none'} holds no report (analysis.json and "
                                               f"report.html) to log; run ptray analyse without --log-only to "
                                               f"write one")
