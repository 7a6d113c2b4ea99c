"""Studies with conditions, a search, SPoT runs and transfer-only targets: stores written through the writer code
(tests/analysis_store.py: constructed outcomes, no training), read back and analysed; the numbers are the
constructed ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from analysis_store import build_condition_store, build_search_store

from analysis import paired, report, views
from analysis.mlflow_io import load_study
from analysis.pipeline import AnalysisOptions, compute


# ----------------------------------------------------------------------------------------------- statistics
def test_paired_bootstrap_on_constructed_outcomes():
    a, b = np.ones((2, 10)), np.zeros((3, 10))
    r = paired.paired_bootstrap(a, b, n_boot=999, seed=0)
    assert r["diff"] == 1.0 and (r["ci95_low"], r["ci95_high"]) == (1.0, 1.0)
    assert r["p_boot"] == pytest.approx(2 / 1000)  # no resample <= 0: the add-one floor, two-sided
    same = paired.paired_bootstrap(a, a, n_boot=200, seed=0)
    assert same["diff"] == 0.0 and same["p_boot"] == 1.0
    # paired on the examples: B is A one example behind on every seed; hard and easy examples shared by both
    x = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 1, 0]] * 2, dtype=float)
    y = x.copy()
    y[:, 0] = 0
    r = paired.paired_bootstrap(x, y, n_boot=2000, seed=1)
    assert r["diff"] == pytest.approx(0.1) and r["ci95_low"] >= 0.0  # never below: the pairs are kept
    assert paired.paired_bootstrap(x, y, n_boot=300, seed=4) == paired.paired_bootstrap(x, y, n_boot=300,
                                                                                                 seed=4)
    with pytest.raises(ValueError, match="S_a, N"):
        paired.paired_bootstrap(np.ones((2, 3)), np.ones((2, 4)))


def test_holm_adjustment_by_hand():
    got = paired.holm([0.01, 0.04, np.nan, 0.03])
    np.testing.assert_allclose(got, [0.03, 0.06, np.nan, 0.06])  # 3*0.01, max(2*0.03, .03), max(1*0.04, .06)


# ---------------------------------------------------------------------------------------- a study with conditions
@pytest.fixture(scope="module")
def condition_store(tmp_path_factory, tiny_model_dir):
    return build_condition_store(tmp_path_factory.mktemp("cond"), tiny_model_dir)


@pytest.fixture(scope="module")
def condition_results(condition_store, tiny, tmp_path_factory):
    study, notes = load_study(condition_store.experiment, condition_store.tracking_uri)
    model, tokenizer = tiny
    res = compute(study, model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=200, seed=5), notes)
    out = tmp_path_factory.mktemp("cond-report")
    report.write_all(res, out)
    return study, res, out


def test_records_carry_condition_init_from_lr_and_held_out_targets(condition_results):
    study, _, _ = condition_results
    assert study.conditions == ["text", "random", "from-cb", "from-rte", "from-copa"]  # the order their runs started
    assert study.tasks == ["cb", "rte", "copa"] and study.transfer_only_targets == ["wsc"]
    spot = [p for p in study.prompts if p.init_from]
    assert len(spot) == 3 * 3 * 2 and {p.init_from for p in spot} >= {"rte-seed1-text", "cb-seed0-text"}
    assert {p.lr for p in study.prompts} == {0.03}
    assert {e.condition for e in study.evals if e.kind == "transfer"} == {"text", "random"}


def test_paper_sections_read_the_first_condition_only(condition_results):
    _, res, out = condition_results
    assert res.meta["condition"] == "text" and res.meta["num_prompts"] == 6
    notes = "\n".join(res.meta["notes"])
    assert "read condition 'text' only (the first in the study that is not a SPoT condition)" in notes
    transfer = pd.read_csv(out / "transfer.csv")
    # text prompts only: (cb on cb) from the train runs' predictions, 6/8 and 7/8 against the baseline's 1/8
    cb = transfer[(transfer.source == "cb") & (transfer.target == "cb") & (transfer.metric == "exact_match")].iloc[0]
    assert cb.delta_mean == pytest.approx(13 / 16 - 1 / 8)


def test_held_out_target_is_a_transfer_column_without_a_diagonal(condition_results):
    study, res, out = condition_results
    transfer = pd.read_csv(out / "transfer.csv")
    wsc = transfer[transfer.target == "wsc"]
    assert set(wsc.source) == {"cb", "rte", "copa"} and wsc.held_out.all() and "wsc" not in set(transfer.source)
    assert wsc.delta_mean.tolist() == pytest.approx([3 / 8 - 1 / 8] * 6)
    assert any("held-out transfer targets wsc" in n for n in res.meta["notes"])
    pairs = next(o.data for o in res.outputs if o.name == "correlation")
    assert "wsc" not in set(pairs.source) | set(pairs.target) and len(pairs) == 6


def test_conditions_table_and_test_equal_the_constructed_outcomes(condition_results):
    _, res, out = condition_results
    table = pd.read_csv(out / "conditions.csv").set_index(["task", "condition"])
    assert table.loc[("cb", "text"), "exact_match_mean"] == pytest.approx(13 / 16)  # 6/8 and 7/8
    assert table.loc[("cb", "random"), "exact_match_mean"] == pytest.approx(5 / 16)  # 2/8 and 3/8
    assert table.loc[("cb", "from-rte"), "rank_accuracy_mean"] == pytest.approx(7 / 8)
    row = table.loc[("cb", "text")]
    assert row.exact_match_ci95_seeds_examples_low <= 13 / 16 <= row.exact_match_ci95_seeds_examples_high
    assert row.best_epoch_mean == 1 and row.n_seeds == 2 and row.n_examples == 8
    assert row.transfer_targets == 3 and row.transfer_delta_exact_match == pytest.approx(0.25)  # rte, copa, wsc
    assert np.isnan(table.loc[("cb", "from-rte"), "transfer_delta_exact_match"])  # no transfer runs of SPoT prompts
    assert row.within_frobenius_raw_mean > 0 and row.frobenius_effective_mean > 0
    tests = pd.read_csv(out / "conditions_tests.csv")
    t = tests[(tests.task == "cb") & (tests.metric == "exact_match") & (tests.condition_a == "text")
              & (tests.condition_b == "random")].iloc[0]
    assert t["diff"] == pytest.approx(0.5) and t.n_examples == 8 and t.ci95_low > 0 and t.p_boot < 0.05
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["conditions_test"]["seed"] == 5 and summary["conditions_test"]["n_boot"] == 200
    assert summary["meta"]["inputs"]["conditions_test"]["seed"] == 5
    for name in ("conditions_accuracy", "conditions_epochs", "conditions_norms", "conditions_within_task",
                 "conditions_transfer"):
        assert (out / f"{name}.png").is_file(), name


def test_spot_gain_matrix_and_its_predictors(condition_results):
    _, res, out = condition_results
    spot = pd.read_csv(out / "spot.csv").set_index(["source", "target", "metric"])
    # rte's prompt on cb: 7/8 both seeds, against cb's text runs 6/8 and 7/8
    assert spot.loc[("rte", "cb", "exact_match"), "gain_mean"] == pytest.approx(1 / 16)
    assert spot.loc[("cb", "rte", "exact_match"), "gain_mean"] == pytest.approx(-5 / 16)  # 4/8 vs 6/8, 7/8
    assert spot.loc[("cb", "rte", "exact_match"), "n_seeds"] == 2
    lo, hi = spot.loc[("cb", "rte", "rank_accuracy"), ["ci95_seeds_examples_low", "ci95_seeds_examples_high"]]
    assert lo <= -5 / 16 <= hi
    stats = pd.read_csv(out / "spot_predictors.csv")
    assert {"frobenius_raw", "spot_cosine_raw", "rms_row_distance_effective",
            "zero_shot_delta_exact_match"} <= set(stats.predictor)
    assert (stats.mantel_permutations == 6).all() and "spot" in {o.section for o in res.outputs}


def test_a_condition_can_be_chosen_and_an_unknown_one_is_refused(condition_store, tiny):
    from ptray.errors import PtrayError

    study, _ = load_study(condition_store.experiment, condition_store.tracking_uri)
    view, notes, meta = views.paper_view(study, "random")
    assert meta["condition"] == "random" and {p.condition for p in view.prompts} == {"random"}
    assert {e.condition for e in view.evals if e.kind == "transfer"} == {"random"}
    with pytest.raises(PtrayError, match="not a condition of this study"):
        views.paper_view(study, "nope")


# ----------------------------------------------------------------------------------------------- a search
def test_search_shows_every_trial_the_stopped_ones_and_the_best_lr(tmp_path, tiny_model_dir, tiny):
    store = build_search_store(tmp_path / "s", tiny_model_dir)
    study, notes = load_study(store.experiment, store.tracking_uri)
    assert len(study.trials) == 6 and len(study.prompts) == 4 and study.conditions == []
    assert not any("skipped" in n for n in notes)  # stopped trials are kept, not skipped
    model, tokenizer = tiny
    res = compute(study, model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=20), notes)
    (tmp_path / "r").mkdir()
    report.write_all(res, tmp_path / "r")
    best = pd.read_csv(tmp_path / "r" / "search_best.csv").set_index("task")
    assert best.loc["cb", "best_lr"] == pytest.approx(0.03) and best.loc["rte", "best_lr"] == pytest.approx(0.3)
    assert (best.n_trials == 3).all() and (best.n_stopped == 1).all() and (best.stopped_by == "asha").all()
    trials = pd.read_csv(tmp_path / "r" / "search_trials.csv")
    stopped = trials[trials.stopped]
    assert set(stopped.lr) == {0.003} and (stopped.status == "KILLED").all() and (stopped.epochs_run == 1).all()
    assert (tmp_path / "r" / "search.png").is_file()
    # the paper's sections read the best finished trial of each task
    assert res.meta["num_prompts"] == 2 and any("search: the paper's sections read" in n for n in res.meta["notes"])
    t1 = pd.read_csv(tmp_path / "r" / "transfer.csv")
    cb = t1[(t1.source == "cb") & (t1.metric == "exact_match")].iloc[0]
    assert cb.accuracy_mean == pytest.approx(6 / 8)


# ----------------------------------------------------------------------------------------------- small studies
def test_a_one_task_one_seed_study_with_conditions(tmp_path, tiny_model_dir, tiny):
    store = build_condition_store(tmp_path / "s", tiny_model_dir, tasks=("cb",), seeds=(0,), held_out=())
    study, notes = load_study(store.experiment, store.tracking_uri)
    model, tokenizer = tiny
    res = compute(study, model, tokenizer, AnalysisOptions(faithfulness=False, n_boot=20), notes)
    (tmp_path / "r").mkdir()
    report.write_all(res, tmp_path / "r")
    text = "\n".join(res.meta["notes"])
    assert "within-task distance n/a for cb/from-cb, cb/random, cb/text (one seed)" in text
    assert "SPoT: which distance predicts the gain not tested" in text
    assert "conditions: transfer per condition n/a" in text
    table = pd.read_csv(tmp_path / "r" / "conditions.csv")
    assert len(table) == 3 and table.within_frobenius_raw_mean.isna().all()
    spot = pd.read_csv(tmp_path / "r" / "spot.csv").set_index(["source", "target", "metric"])
    assert spot.loc[("cb", "cb", "exact_match"), "gain_mean"] == pytest.approx(4 / 8 - 6 / 8)
