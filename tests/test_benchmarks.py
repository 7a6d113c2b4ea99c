"""The benchmark script runs end to end (``--smoke``: a check, not a timing) and reports every number it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.markdown import render_markdown, update_markdown  # noqa: E402


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_reports_every_measurement(tmp_path, data_dir):
    out = tmp_path / "smoke.json"
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nhand-written text stays\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--data-dir", str(data_dir),
         "--out", str(out), "--md", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    assert positive(res["matmul_peak"]["fp32"]["flops"]) and positive(res["matmul_peak"]["bf16"]["flops"])

    train = res["train"]
    for task in ("copa", "study"):
        for side in ("ptray", "reference"):
            for key in ("tokens_per_s", "mfu", "peak_mib", "flops_per_token"):
                assert positive(train[task][side][key]), (task, side, key)
        assert positive(train[task]["ratio"])
        assert train[task]["ratio"] == train[task]["ptray"]["tokens_per_s"] / train[task]["reference"]["tokens_per_s"]

    ev = res["eval"]
    for task in ("copa",):
        for method in ("ptray", "ptray_em_only", "ptray_per_label", "generate", "generate_sorted"):
            assert positive(ev[task][method]["examples_per_s"]) and positive(ev[task][method]["peak_mib"])
        assert positive(ev[task]["speedup"]) and positive(ev[task]["ptray"]["mfu"])
        assert ev[task]["em_agree"] == 1.0  # one-pass exact match and generate agree example by example
        assert ev[task]["em_agree_all_methods"]
    assert positive(ev["all"]["speedup"])

    assert set(res["ablations"]) == {"full_logits", "unsorted", "train_weights", "precision", "sdpa"}
    for entry in res["ablations"].values():
        assert positive(entry["ptray_gain"]) and positive(entry["variant"]["tokens_per_s"])
    assert positive(res["packed"]["2"]["study"]["tokens_per_s"])
    conc = res["concurrency"]["1"]
    assert conc["all_ok"] and positive(conc["tokens_per_s"])

    est = res["study_estimate"]
    assert positive(est["train_pflop"]) and all(positive(v) for v in est["minutes_at_mfu"].values())
    targets = res["targets"]
    assert set(targets) == {"train_ratio", "eval_speedup", "mfu", "concurrent_trials", "study_minutes"}
    assert targets["mfu"]["status"] == "unmeasured"  # a CPU smoke run measures no GPU target

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text stays\n")
    assert "<!-- bench:cpu-tiny -->" in text and "| **study mix** |" in text


def test_markdown_section_is_replaced_in_place(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("intro\n<!-- bench:cpu-x -->\nold\n<!-- /bench:cpu-x -->\noutro\n")
    update_markdown(str(md), "cpu-x", "new\n")
    assert md.read_text() == "intro\n<!-- bench:cpu-x -->\nnew\n<!-- /bench:cpu-x -->\noutro\n"
    update_markdown(str(md), "cuda-y", "gpu\n")
    assert md.read_text().endswith("<!-- bench:cuda-y -->\ngpu\n<!-- /bench:cuda-y -->\n")


@pytest.mark.parametrize("name", ["cpu-small-560m-ratio", "cpu-small"])
def test_committed_results_render_as_benchmarks_md_shows_them(name):
    """BENCHMARKS.md's tables are exactly what the renderer makes of the committed results files."""
    res = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    md = (ROOT / "BENCHMARKS.md").read_text()
    section = md.split(f"<!-- bench:{name} -->\n", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]
    assert render_markdown(res) == section


@pytest.mark.parametrize("args, message", [
    (["--render-only"], "--render-only renders a results file"),
    (["--tasks", "cb,xx"], "--tasks: unknown name 'xx'; valid: cb, rte, copa, wsc"),
    (["--packed", "4,x"], "--packed takes positive integers"),
    (["--steps", "0"], "--steps: must be a positive integer"),
])
def test_bad_arguments_get_one_line(args, message, data_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--data-dir", str(data_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_trial_memory_estimate_runs_and_adds_up(tmp_path, data_dir):
    """benchmarks/trial_memory.py (tiny model: a check that it works): every peak measured, the estimate is the sum
    it says it is, and the markdown section is written."""
    out, md = tmp_path / "mem.json", tmp_path / "B.md"
    md.write_text("<!-- bench:trial-memory -->\n<!-- /bench:trial-memory -->\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "trial_memory.py"), "--model-shape", "tiny", "--tasks", "copa",
         "--threads", "1", "--data-dir", str(data_dir), "--out", str(out), "--md", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert positive(res["train"]["copa"]["peak_bytes"]) and positive(res["eval"]["copa"]["peak_bytes"])
    e = res["estimate"]
    assert e["activations_fp32_max_bytes"] == max(res["train"]["copa"]["peak_bytes"], res["eval"]["copa"]["peak_bytes"])
    parts = e["weights_bf16_bytes"], e["activations_fp32_max_bytes"], e["overhead_bytes_assumed"]
    assert e["per_trial_bytes"] == sum(parts)
    assert e["trials_fit"] == int(80 * 2**30 // e["per_trial_bytes"])
    assert "trials** fit in 80 GiB" in md.read_text()


def test_trial_memory_rejects_a_missing_data_dir(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trial_memory.py"), "--data-dir",
                           str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
