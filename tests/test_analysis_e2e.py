"""End to end: a real MLflow store written like a smoke study (real short trainings on the tiny model), analysed
once; every report file exists and its numbers match a recomputation from the downloaded artifacts."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_store import build_store
from safetensors.torch import load_file
from scipy import stats


@pytest.fixture(scope="session")
def store(tmp_path_factory, tiny_model_dir, data_dir):
    return build_store(tmp_path_factory.mktemp("store"), tiny_model_dir, data_dir, max_examples=8)


@pytest.fixture(scope="session")
def report(store, tmp_path_factory):
    from analysis import run

    out = tmp_path_factory.mktemp("report") / "smoke"
    return run(store.experiment, tracking_uri=store.tracking_uri, out_dir=out, n_boot=200)


@pytest.fixture(scope="session")
def runs(store):
    """The study's runs and their artifacts, downloaded here independently of analysis/."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri)
    exp = client.get_experiment_by_name(store.experiment)
    out = {"train": [], "transfer": [], "baseline": [], "analysis": []}
    for r in client.search_runs([exp.experiment_id]):
        kind = r.data.tags["ptray.kind"]
        rec = {"run": r, "tags": r.data.tags}
        if kind == "train":
            folder = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, tracking_uri=store.tracking_uri)
            rec["prompt"] = load_file(f"{folder}/prompt/adapter_model.safetensors")["prompt_embeddings"]
            rec["metrics"] = json.loads(Path(folder, "metrics.json").read_text())
            rec["history"] = json.loads(Path(folder, "history.json").read_text())
            rec["predictions"] = json.loads(Path(folder, "predictions.json").read_text())
        elif kind in ("transfer", "baseline"):
            path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="metrics.json",
                                                       tracking_uri=store.tracking_uri)
            rec["metrics"] = json.loads(Path(path).read_text())
        out[kind].append(rec)
    return out


FIGURES = ["learning_curves", "nearest_cb", "nearest_rte", "nearest_copa", "nearest_wsc", "nearest_cb_effective",
           "nearest_rte_effective", "nearest_copa_effective", "nearest_wsc_effective", "norms", "prompt_maps",
           "distances", "transfer", "correlation", "predictors", "predictor_scatter", "faithfulness"]


def test_every_figure_is_a_png_beside_its_numbers(report):
    from PIL import Image

    for name in FIGURES:
        png = report / f"{name}.png"
        assert png.is_file(), name
        assert (report / f"{name}.csv").is_file() or (report / f"{name}.json").is_file(), name
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 300
    for name in ("report.html", "report.md", "analysis.json", "table1_norms.csv", "within_task.csv",
                 "transfer_per_seed.csv", "distance_pairs.csv", "correlation_stats.csv", "nearest_summary.csv",
                 "nearest_scripts.csv", "accuracy_floors.csv"):
        assert (report / name).is_file(), name
    assert not list(report.parent.glob(".*partial*"))


def test_html_report_is_self_contained_and_embeds_every_figure(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(FIGURES)
    assert {base64.b64decode(e) for e in embedded} == {(report / f"{n}.png").read_bytes() for n in FIGURES}
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|/)", page)
    for heading in ("Nearest tokens", "Table 1", "Figure 7", "Figure 8", "Faithfulness", "predictors"):
        assert heading in page
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "## Table 1" in md and "## Transfer" in md and "## Faithfulness" in md and "## Accuracy floors" in md


def test_the_analysis_run_holds_the_report_in_mlflow(report, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri)
    exp = client.get_experiment_by_name(store.experiment)
    found = client.search_runs([exp.experiment_id], "tags.`ptray.kind` = 'analysis'")
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "analysis" and run.info.status == "FINISHED"
    assert run.data.tags["ptray.study"] == "smoke"
    logged = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert logged == {p.name for p in report.iterdir()}


def test_table1_equals_norms_recomputed_from_the_artifacts(report, runs):
    table = pd.read_csv(report / "table1_norms.csv").set_index("task")
    by_task = {}
    for r in runs["train"]:
        by_task.setdefault(r["tags"]["ptray.task"], []).append(float(torch.linalg.matrix_norm(r["prompt"].double())))
    assert set(by_task) == set(table.index) == {"cb", "rte", "copa", "wsc"}
    for task, norms in by_task.items():
        assert table.loc[task, "frobenius_raw_mean"] == pytest.approx(np.mean(norms))
        assert table.loc[task, "frobenius_raw_var_ddof0"] == pytest.approx(np.var(norms), abs=1e-12)
        n = next(r["prompt"].shape[0] for r in runs["train"] if r["tags"]["ptray.task"] == task)
        assert table.loc[task, "num_tokens"] == n
        assert table.loc[task, "rms_row_norm_raw_mean"] == pytest.approx(np.mean(norms) / np.sqrt(n))
    # after BLOOM's input LayerNorm with its initial weights (1, 0) every row has norm sqrt(hidden) = 8
    assert table["rms_row_norm_effective_mean"].to_numpy() == pytest.approx(8.0, rel=1e-3)


def test_task_clusters_average_the_prompt_pairs(report):
    pairs = pd.read_csv(report / "distance_pairs.csv")
    clusters = pd.read_csv(report / "task_clusters.csv").set_index("measure")
    assert set(clusters.index) == {"rms_row_distance_raw", "rms_row_distance_effective", "rms_row_distance_drift_raw",
                                   "rms_row_distance_drift_effective"}
    for measure, row in clusters.drop(index=[m for m in clusters.index if "drift" in m]).iterrows():
        same = pairs.task_a == pairs.task_b
        assert row.within_mean == pytest.approx(pairs.loc[same, measure].mean())
        assert row.between_mean == pytest.approx(pairs.loc[~same, measure].mean())
        assert 1 / (row.num_permutations + 1) <= row.p_permutation <= 1 and -1 <= row.silhouette <= 1


def test_spread_vs_outcome_is_recomputed_from_the_artifacts(report, runs):
    """Per task: Table 1's norm variance and the seeds' accuracy spread (max - median) from the downloaded
    prompts and metrics.json; the correlations are scipy's Spearman on those columns."""
    table = pd.read_csv(report / "spread_vs_outcome.csv").set_index("task")
    for task in table.index:
        train = [r for r in runs["train"] if r["tags"]["ptray.task"] == task]
        norms = [float(torch.linalg.matrix_norm(r["prompt"].double())) for r in train]
        assert table.loc[task, "frobenius_raw_var_ddof0"] == pytest.approx(np.var(norms), abs=1e-12)
        for m in ("rank_accuracy", "exact_match"):
            v = [r["metrics"][m] for r in train]
            assert table.loc[task, f"{m}_delta"] == pytest.approx(max(v) - np.median(v))
    corr = pd.read_csv(report / "spread_correlations.csv")
    row = corr[(corr.spread == "frobenius_raw_var_ddof0") & (corr.against == "paper_table2_delta")].iloc[0]
    paper_delta = pd.Series({"copa": 0.12, "cb": 0.08, "wsc": 0.01, "rte": 0.01})  # the paper's Table 2, as printed
    x, y = table["frobenius_raw_var_ddof0"], paper_delta[table.index]
    assert row.n_tasks == 4 and row.spearman_rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert row.expected_sign == "+" and row.p_exact >= row.p_smallest == pytest.approx(4 / 24)  # WSC, RTE tie


def test_distances_equal_a_recomputation_over_the_common_length(report, runs):
    pairs = pd.read_csv(report / "distance_pairs.csv")
    prompts = {(r["tags"]["ptray.task"], int(r["tags"]["ptray.seed"])): r["prompt"].double() for r in runs["train"]}
    assert len(pairs) == len(prompts) * (len(prompts) - 1) // 2
    for row in pairs.itertuples():
        a, b = prompts[(row.task_a, row.seed_a)], prompts[(row.task_b, row.seed_b)]
        m = min(len(a), len(b))
        assert row.frobenius_raw == pytest.approx(float(torch.linalg.matrix_norm(a[:m] - b[:m])))
    meta = json.loads((report / "analysis.json").read_text())["meta"]
    assert "common length" in meta["distance_definition"]


def test_transfer_equals_the_runs_recorded_deltas(report, runs):
    summary = pd.read_csv(report / "transfer.csv")
    base = {r["metrics"]["target"]: r["metrics"] for r in runs["baseline"]}
    checked = 0
    for row in summary.itertuples():
        if row.source == row.target:  # the diagonal comes from the train runs
            recorded = [r["metrics"][row.metric] - base[row.target][row.metric] for r in runs["train"]
                        if r["tags"]["ptray.task"] == row.source]
        else:
            recorded = [r["metrics"][f"delta_{row.metric}"] for r in runs["transfer"]
                        if r["metrics"]["source"] == row.source and r["metrics"]["target"] == row.target]
        assert row.n_seeds == len(recorded) == 2
        assert row.delta_mean == pytest.approx(np.mean(recorded), abs=1e-9)
        assert row.delta_sd_ddof1 == pytest.approx(np.std(recorded, ddof=1), abs=1e-9)
        assert row.baseline == pytest.approx(base[row.target][row.metric])
        for ci in ("ci95_examples", "ci95_seeds_examples"):
            low, high = getattr(row, f"{ci}_low"), getattr(row, f"{ci}_high")
            assert low <= row.delta_mean + 1e-9 and row.delta_mean <= high + 1e-9
        checked += 1
    assert checked == 4 * 4 * 2


def test_asymmetry_and_own_task_tables_are_differences_of_figure_8s_cells(report):
    delta = pd.read_csv(report / "transfer.csv").set_index(["source", "target", "metric"])["delta_mean"]
    asym = pd.read_csv(report / "transfer_asymmetry.csv")
    assert len(asym) == 6 * 2  # 4 tasks: 6 pairs, 2 metrics
    for r in asym.itertuples():
        assert r.difference == pytest.approx(delta[r.task_a, r.task_b, r.metric] - delta[r.task_b, r.task_a, r.metric])
        assert r.ci95_low <= r.ci95_high
    md = (report / "report.md").read_text(encoding="utf-8")
    for heading in ("## Is transfer symmetric?", "## Is a prompt's gain largest on its own task?",
                    "## Do a task's prompts cluster?", "## Do harder tasks vary more?"):
        assert heading in md
    own = pd.read_csv(report / "transfer_own_task.csv")
    assert len(own) == 12 * 2
    for r in own.itertuples():
        assert r.own_minus_other == pytest.approx(delta[r.source, r.source, r.metric] - delta[r.source, r.target,
                                                                                             r.metric])
        assert r.ci95_low <= r.ci95_high


def test_the_claims_table_quotes_the_sections_numbers_and_reads_them_by_its_rule(report):
    from analysis import claims

    table = pd.read_csv(report / "claims.csv")
    transfer = pd.read_csv(report / "transfer.csv").set_index(["source", "target", "metric"])
    beat = table[table.claim.str.endswith("trained prompts beat no prompt")]
    assert len(beat) == 4 * 2
    for r in beat.itertuples():
        task, metric = r.claim.split("'")[0].lower(), r.measure.split(":")[0]
        cell = transfer.loc[(task, task, metric)]
        assert float(r.value) == pytest.approx(cell.delta_mean, abs=5e-4)
        assert r.reading == claims.interval_reading(cell.ci95_seeds_examples_low, cell.ci95_seeds_examples_high)
    corr = pd.read_csv(report / "correlation_stats.csv").set_index(["predictor", "gain"])
    closer = table[table.claim == "closer prompts transfer better"]
    assert len(closer) == 2
    for r in closer.itertuples():
        gain = r.measure.split(" vs ")[1].split(" ")[0]
        want = corr.loc[("frobenius_raw", gain), "spearman_rho"]  # NaN where the gains are constant ("n/a")
        np.testing.assert_allclose(float(r.value), want, atol=5e-4, equal_nan=True)
    assert set(table.reading) <= {claims.SUPPORTED, claims.CONTRADICTED, claims.OPEN, claims.MIXED,
                                  claims.DESCRIPTIVE}
    assert {"harder tasks vary more", "prompts transfer zero-shot to other tasks",
            "a prompt gains most on its own task"} <= set(table.claim)
    md = (report / "report.md").read_text(encoding="utf-8")
    assert md.index("## The paper's claims, checked") < md.index("## Accuracy floors")


def test_nearest_tokens_equal_a_brute_force_search(report, runs, tiny):
    model, tokenizer = tiny
    emb = model.get_input_embeddings().weight.detach().double()
    table = pd.read_csv(report / "nearest_wsc.csv", keep_default_na=False)
    prompt = next(r["prompt"] for r in runs["train"] if r["tags"]["ptray.task"] == "wsc"
                  and r["tags"]["ptray.seed"] == "1").double()
    cos = torch.nn.functional.normalize(prompt, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    top = cos.topk(3, dim=1).indices
    got = table[table.seed == 1].sort_values(["row", "rank"])
    assert got["token_id"].to_numpy().reshape(-1, 3).tolist() == top.tolist()
    init_ids = tokenizer(json.loads((report / "analysis.json").read_text())["meta"]["init_text"]["wsc"],
                         add_special_tokens=False)["input_ids"]
    assert got["in_init_text"].astype(str).eq("True").tolist() == [i in init_ids for i in top.flatten().tolist()]


def test_nearest_scripts_agree_with_the_token_tables_and_the_runs(report, runs):
    """Each prompt's init -> best-epoch shares (nearest_scripts.csv) recomputed from the per-token tables, its best
    epoch from the run's metrics.json; at init every row's nearest token is its own init token."""
    moves = pd.read_csv(report / "nearest_scripts.csv", keep_default_na=False)
    assert len(moves) == 2 * 4 * 2  # spaces x tasks x seeds
    best_epoch = {(r["tags"]["ptray.task"], int(r["tags"]["ptray.seed"])): r["metrics"]["best_epoch"]
                  for r in runs["train"]}
    for m in moves.itertuples():
        t = pd.read_csv(report / f"nearest_{m.task}{'' if m.space == 'raw' else '_effective'}.csv",
                        keep_default_na=False)
        t = t[t.seed == m.seed]
        first = t[t["rank"] == 0]
        other = t["other_script"].astype(str).eq("True")
        assert m.top1_is_init_token_best == pytest.approx((first.token_id == first.init_token_id).mean())
        assert m.rows_other_script_best == pytest.approx(other.groupby(t["row"]).any().mean())
        assert m.neighbours_other_script_best == pytest.approx(other.mean())
        assert m.top1_is_init_token_init == 1.0 and m.init_scripts == "Latin"
        assert m.best_epoch == best_epoch[(m.task, m.seed)]


def test_correlations_equal_scipy_on_the_plotted_points(report):
    points = pd.read_csv(report / "correlation.csv")
    assert len(points) == 12 and not (points.source == points.target).any()
    st = pd.read_csv(report / "correlation_stats.csv")
    row = st[(st.predictor == "frobenius_raw") & (st.gain == "delta_rank_accuracy")].iloc[0]
    # the distance of A->B is the distance of B->A, bit for bit: 6 distinct values over the 12 ordered pairs
    by_pair = points.set_index(["source", "target"])["frobenius_raw"]
    assert all(by_pair[(a, b)] == by_pair[(b, a)] for a, b in by_pair.index)
    assert by_pair.nunique() == 6
    if points["delta_rank_accuracy"].nunique() > 1:
        s = stats.spearmanr(points["frobenius_raw"], points["delta_rank_accuracy"])
        assert row.spearman_rho == pytest.approx(s.statistic) and row.spearman_p_naive == pytest.approx(s.pvalue)
        # the dependence-aware p-value: a share of the 24 relabellings of the 4 tasks, never below 1/24
        assert row.mantel_permutations == 24 and row.mantel_exact == 1
        assert 1 / 24 - 1e-12 <= row.spearman_p_mantel <= 1 and (row.spearman_p_mantel * 24) % 1 == pytest.approx(0)
    predictors = set(pd.read_csv(report / "predictors.csv")["predictor"])
    assert {"frobenius_raw", "frobenius_effective", "spot_cosine_raw", "ffn_overlap",
            "init_text_distance", "rows_compared"} <= predictors


def test_the_report_leads_the_distance_vs_transfer_section_with_the_mantel_test_and_labels_its_statistics(report):
    md = (report / "report.md").read_text(encoding="utf-8")
    section = md.split("## Distance vs transfer", 1)[1]
    first = section.split("\n\n", 2)[1]  # the paragraph under the heading
    assert first.startswith("Mantel test (exact: all 24 relabellings of the 4 tasks")
    assert "naive" in first and "Length confound" in first
    assert "_var_ddof0" in md and "delta_sd_ddof1" in md and "ci95_seeds_examples_low" in md
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "hierarchical bootstrap interval" in page and "ddof=1" in page
    assert "cv_ddof1" in pd.read_csv(report / "within_task.csv").columns
    assert "rows_compared" in pd.read_csv(report / "distance_pairs.csv").columns


def test_faithfulness_soft_accuracy_reproduces_the_recorded_one(report):
    table = pd.read_csv(report / "faithfulness.csv")
    assert len(table) == 8
    # the same model on the same examples: the soft prompt's accuracy is the one its train run recorded
    assert table["soft_exact_match"].to_numpy() == pytest.approx(table["recorded_exact_match"].to_numpy())
    assert table["soft_rank_accuracy"].to_numpy() == pytest.approx(table["recorded_rank_accuracy"].to_numpy())
    for col in ("nearest_raw_exact_match", "nearest_effective_rank_accuracy"):
        assert table[col].between(0, 1).all()


def test_learning_curves_are_each_runs_history(report, runs):
    """learning_curves.csv holds every epoch of every train run's history.json (downloaded here), its kept epoch
    marked."""
    curves = pd.read_csv(report / "learning_curves.csv")
    assert len(curves) == sum(len(r["history"]) for r in runs["train"]) > 0
    for r in runs["train"]:
        task, seed = r["tags"]["ptray.task"], int(r["tags"]["ptray.seed"])
        got = curves[(curves.task == task) & (curves.seed == seed)].sort_values("epoch")
        want = r["history"]
        assert list(got.epoch) == [h["epoch"] for h in want]
        np.testing.assert_allclose(got.eval_loss, [h["eval_loss"] for h in want], rtol=1e-12)
        np.testing.assert_allclose(got.rank_accuracy, [h["rank_accuracy"] for h in want], rtol=1e-12)
        assert list(got.epoch[got.best]) == [r["metrics"]["best_epoch"]]


def test_accuracy_floors_count_the_labels_of_the_scored_examples(report, runs, data_dir):
    """The majority class's share, counted here from the official jsonl at each run's scored example idx, and the
    baselines and prompts' rank accuracy as the runs recorded them."""
    floors = pd.read_csv(report / "accuracy_floors.csv").set_index("task")
    names = {"cb": ["entailment", "contradiction", "neutral"], "rte": ["entailment", "not_entailment"],
             "copa": [0, 1], "wsc": [False, True]}
    for task in floors.index:
        train = [r for r in runs["train"] if r["tags"]["ptray.task"] == task]
        idx = train[0]["predictions"]["idx"]
        rows = [json.loads(line) for line in (Path(data_dir) / task.upper() / "val.jsonl").read_text().splitlines()]
        label = {row["idx"]: names[task].index(row["label"]) for row in rows}
        counts = np.bincount([label[i] for i in idx], minlength=len(names[task]))
        assert floors.loc[task, "num_examples"] == len(idx)
        assert floors.loc[task, "majority_share"] == pytest.approx(counts.max() / len(idx))
        assert str(floors.loc[task, "majority_label"]) == str(names[task][counts.argmax()])
        acc = [r["metrics"]["rank_accuracy"] for r in train]
        assert floors.loc[task, "prompt_rank_accuracy_mean"] == pytest.approx(np.mean(acc))
        assert floors.loc[task, "prompt_rank_accuracy_min"] == pytest.approx(min(acc))
        assert floors.loc[task, "no_prompt_rank_accuracy"] == pytest.approx(
            np.mean([r["metrics"]["no_prompt_rank_accuracy"] for r in train]))
