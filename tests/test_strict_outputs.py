"""What a run reports is what ran: a run that diverges stops with one line instead of reporting its untrained prompt
as done, every JSON file ptray writes is strict JSON (no NaN / Infinity), and fp16 asked for on a CPU says
that fp32 runs."""

import json
import logging
import math

import pytest

from ptray.files import strict_json, write_json
from ptray.training.train import main


def test_a_diverging_run_stops_naming_the_epoch(tiny_model_dir, data_dir, tmp_path, capsys):
    """--lr 1e30: the first step blows the prompt up, the epoch's evaluation is NaN. Before: "done", best epoch 0
    (the init prompt reported as the result), exit 0, and NaN in history.json."""
    out = tmp_path / "run"
    code = main(["--task", "cb", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                 "--output-dir", str(out), "--lr", "1e30", "--max-train-examples", "8", "--batch-size", "8",
                 "--max-eval-examples", "8", "--no-baselines", "--max-epochs", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: the evaluation loss became nan at epoch 1 (cb, seed 0); the prompt diverged: "
                             "lower --lr (now 1e+30)")
    assert not out.exists()  # nothing half-written


def test_write_json_is_strict_and_says_what_it_replaced(tmp_path, caplog):
    obj = {"eval_loss": float("nan"), "history": [{"x": 1.5}, {"x": float("inf")}], "n": 3, "ok": None}
    with caplog.at_level(logging.WARNING, logger="ptray"):
        path = write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == \
        {"eval_loss": None, "history": [{"x": 1.5}, {"x": None}], "n": 3, "ok": None}
    assert "m.json: non-finite values written as null: .eval_loss was nan; .history[1].x was inf" in caplog.text


def test_strict_json_leaves_finite_values_alone():
    obj = {"a": [1, 2.5, -0.0, "nan"], "b": {"c": True}}
    assert strict_json(obj) == (obj, [])
    assert strict_json(-math.inf, "x") == (None, ["x was -inf"])


def test_fp16_on_cpu_says_it_runs_fp32(caplog):
    from ptray.lm.load import resolve_device_precision

    with caplog.at_level(logging.WARNING, logger="ptray"):
        assert resolve_device_precision("cpu", "fp16") == ("cpu", "no")
    assert "--precision fp16 is for GPUs: on CPU ptray runs fp32 (precision no" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptray"):
        resolve_device_precision("cpu", "auto")
    assert caplog.text == ""  # auto asked for nothing in particular: nothing to warn about
