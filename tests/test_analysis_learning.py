"""The learning section on hand-built runs: curves from the histories, the floors from given labels, and what
happens without labels or data (NaN and a note, never a guess)."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import learning
from analysis.records import PromptRun


def _run(task, seed, history, acc, best, idx, condition=None, data_dir=None):
    metrics = {"rank_accuracy": acc, "best_epoch": best, "no_prompt_rank_accuracy": 0.25,
               "init_text_rank_accuracy": 0.5}
    config = {"eval_split": "val", **({"data_dir": str(data_dir)} if data_dir else {})}
    return PromptRun(f"{task}{seed}{condition or ''}", task, seed, torch.zeros(1, 2), config, metrics,
                     {"idx": idx}, condition=condition, history=history)


def _history(losses, accs):
    return [{"epoch": e + 1, "eval_loss": lo, "rank_accuracy": a, "exact_match": a}
            for e, (lo, a) in enumerate(zip(losses, accs))]


def test_curves_and_floors():
    runs = [_run("cb", 0, _history([0.9, 0.5, 0.7], [0.4, 0.6, 0.5]), 0.6, 2, [0, 1, 2, 3]),
            _run("cb", 1, _history([0.8, 0.75], [0.5, 0.75]), 0.75, 2, [0, 1, 2, 3]),
            _run("rte", 0, [], 0.5, 1, [5, 6])]
    curves = learning.learning_table(runs)
    assert list(curves.columns) == learning.CURVE_COLUMNS and len(curves) == 5
    assert curves[curves.best][["seed", "epoch"]].values.tolist() == [[0, 2], [1, 2]]
    floors = learning.floors_table(runs, {"cb": [1, 1, 1, 2]}, ["cb", "rte"]).set_index("task")
    assert floors.loc["cb", "majority_label"] == "contradiction" and floors.loc["cb", "majority_share"] == 0.75
    assert floors.loc["cb", "prompt_rank_accuracy_mean"] == pytest.approx(0.675)
    assert (floors.loc["cb", "prompt_rank_accuracy_min"], floors.loc["cb", "prompt_rank_accuracy_max"]) == (0.6, 0.75)
    assert floors.loc["cb", "no_prompt_rank_accuracy"] == 0.25 and floors.loc["cb", "num_examples"] == 4
    assert np.isnan(floors.loc["rte", "majority_share"]) and pd.isna(floors.loc["rte", "majority_label"])
    assert floors.loc["rte", "num_examples"] == 2


def test_section_without_data_or_history_says_so(tmp_path):
    runs = [_run("cb", 0, [], 0.6, 1, [0, 1])]
    section = learning.learning_section(prompts=runs, tasks=["cb"], data_dir=str(tmp_path / "absent"))
    assert [o.name for o in section.outputs] == ["accuracy_floors"]  # no curves to draw
    assert any("majority class not computed" in n for n in section.notes)
    assert any("no per-epoch history" in n and "cb-seed0" in n for n in section.notes)
    assert section.metrics == {}


def test_labels_follow_the_scored_idx(data_dir):
    runs = [_run("rte", 0, [], 0.5, 1, [3, 0, 7])]
    labels, notes = learning.validation_labels(runs, str(data_dir))
    import json

    rows = {r["idx"]: r["label"] for r in map(json.loads, (data_dir / "RTE" / "val.jsonl").read_text().splitlines())}
    assert notes == [] and labels == {"rte": [["entailment", "not_entailment"].index(rows[i]) for i in (3, 0, 7)]}
    bad = [_run("rte", 0, [], 0.5, 1, [10**6])]
    labels, notes = learning.validation_labels(bad, str(data_dir))
    assert labels == {} and "not labeled examples" in notes[0]


def test_each_condition_has_its_curves_floors_and_panel(data_dir):
    """A study with conditions: one floors row and one figure column per (task, condition); the majority class is
    the task's (read once from the data folder the runs name), the prompts' accuracy the condition's."""
    runs = [_run("cb", s, _history([0.9, 0.5], [0.4, 0.6]), acc, 2, [0, 1, 2, 3], condition=c, data_dir=data_dir)
            for c, accs in (("text", (0.6, 0.7)), ("random", (0.3, 0.4))) for s, acc in enumerate(accs)]
    section = learning.learning_section(prompts=runs, tasks=["cb"])
    floors = section.outputs[1].data.set_index("condition")
    assert list(floors.index) == ["random", "text"] and section.notes == []
    assert floors.loc["text", "prompt_rank_accuracy_mean"] == pytest.approx(0.65)
    assert floors.loc["random", "prompt_rank_accuracy_max"] == pytest.approx(0.4)
    assert floors.loc["text", "majority_share"] == floors.loc["random", "majority_share"]
    curves = section.outputs[0].data
    assert sorted(curves.condition.unique()) == ["random", "text"] and len(curves) == 8
    figure = section.outputs[0].figure
    assert [a.get_title() for a in figure.axes[:2]] == ["CB · random", "CB · text"]
    assert section.metrics == {"majority_share_cb": floors.loc["text", "majority_share"]}


def test_prompts_scored_on_other_examples_get_no_majority_class(data_dir):
    runs = [_run("cb", 0, [], 0.6, 1, [0, 1], data_dir=data_dir), _run("cb", 1, [], 0.6, 1, [0, 2], data_dir=data_dir)]
    labels, notes = learning.validation_labels(runs)
    assert labels == {} and notes == ["cb: majority class not computed (its prompts were scored on different "
                                      "validation examples)"]
