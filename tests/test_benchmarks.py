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


def test_gpu_smoke_runs_every_section_and_renders_again(tmp_path, data_dir):
    """benchmarks/gpu.py --smoke on CPU with a tokenizer folder: every section runs and reports numbers that make
    sense, and --render-only makes the same markdown from the results file."""
    from benchmarks import gpu
    from ptray.lm.tiny_model import build_tokenizer

    tok_dir, out, md = tmp_path / "tok", tmp_path / "gpu.json", tmp_path / "B.md"
    build_tokenizer().save_pretrained(str(tok_dir))
    assert gpu.main(["--smoke", "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer", str(tok_dir),
                     "--study-epochs", "2", "--out", str(out), "--md", str(md)]) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == {} and "skipped" not in res
    tok = res["setup"]["tokenizer"]
    assert tok["path"] == str(tok_dir) and tok["epoch_tokens"] == sum(
        t["epoch_tokens"] for t in res["setup"]["tasks"].values())
    for entry in res["attention"]:  # fp32 on CPU: every path gives the fp32 eager reference's numbers
        for mode in ("eager", "fused", "folded"):
            assert positive(entry[mode]["tokens_per_s"])
            check = entry[mode]["vs_fp32_eager"]
            assert check["ok"] and check["logprob_max_abs_diff"] < 1e-4 and check["grad_rel_err"] < 1e-4
    sdpa = res["sdpa"]  # the CPU has MATH (and its flash kernel); bf16 is checked against fp32 MATH, and passes
    for key in ("fused fp32 MATH", "folded fp32 MATH", "fused bf16 MATH", "folded bf16 MATH"):
        assert sdpa["check"][key]["ran"] and sdpa["check"][key]["ok"], key
    assert set(sdpa["picked"]) == {"fused fp32", "fused bf16", "folded fp32", "folded bf16"}
    assert [(e["prompts"], e["attention"], e["max_tokens"]) for e in res["group"]] == [
        (1, "eager", 0), (1, "fused", 0), (1, "folded", 0), (2, "fused", 0), (4, "fused", 0), (4, "folded", 0),
        (4, "fused", 256), (4, "folded", 256)]
    peft = res["train"]["study"]["reference"]["tokens_per_s"]
    for e in res["group"]:  # timed through train_group; ratios to one eager trial and to PEFT + Trainer
        assert positive(e["tokens_per_s"]) and positive(e["mfu"]) and e["steps"] == 2
        assert e["vs_peft_trainer"] == pytest.approx(e["tokens_per_s"] / peft)
    fixed = res["study_epochs"]  # exactly --study-epochs epochs: early stopping off
    assert fixed["epochs_run"] == [2] * 16 and fixed["finished"] and [e["epoch"] for e in fixed["per_epoch"]] == [1, 2]
    assert fixed["per_epoch"][0]["tokens"] == 4 * tok["epoch_tokens"]  # 4 seeds of each task's epoch
    assert positive(fixed["whole_study_seconds_estimate_no_early_stopping"])
    whole = res["study"]
    assert whole["finished"] and whole["evaluations"] == whole["evaluations_planned"] == 68
    for task in ("cb", "rte", "copa", "wsc"):
        assert res["eval"][task]["em_agree"] == 1.0 and positive(res["train"][task]["ratio"])
    text = md.read_text()
    assert "<!-- bench:gpu-trial-groups -->" in text and "68/68 evaluations" in text and "Estimate (not a" in text
    again = tmp_path / "again.md"
    assert gpu.main(["--render-only", "--data-dir", str(data_dir), "--out", str(out), "--md", str(again)]) == 0
    assert again.read_text() == text


def test_gpu_results_are_saved_after_every_section(tmp_path, data_dir, monkeypatch):
    """A run that dies in a section (here: interrupted) keeps, in --out, what the sections before it measured;
    --sections runs only the sections named."""
    from benchmarks import gpu

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(gpu.RUN, "sdpa", interrupted)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--smoke", "--device", "cpu", "--data-dir", str(data_dir), "--sections", "sdpa,attention",
                  "--out", str(out)])
    res = json.loads(out.read_text())
    assert [e["rows"] for e in res["attention"]] == [4, 8] and "sdpa" not in res and "group" not in res


@pytest.mark.parametrize("args, message", [
    (["--sections", "attention,nope"], "--sections: unknown name 'nope'; valid: attention, sdpa, group"),
    (["--device", "cpu"], "pass --smoke on CPU"),
    (["--smoke", "--tokenizer", "/nonexistent"], "--tokenizer '/nonexistent' is not a folder"),
])
def test_gpu_bad_arguments_get_one_line(args, message, data_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--data-dir", str(data_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_cpu_real_model_side_by_side_smoke(tmp_path, data_dir, tiny_model_dir):
    """benchmarks/cpu_real.py end to end on the tiny model: the four variants timed, % of the measured peak,
    the bf16/fp32 quality table on the four tasks, its markdown section rendered."""
    out, md = tmp_path / "cpu.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- bench:cpu-real -->\nold\n<!-- /bench:cpu-real -->\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_real.py"), "--smoke", "--model", str(tiny_model_dir),
         "--data-dir", str(data_dir), "--out", str(out), "--md", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"ptray fp32", "ptray bf16", "ptray bf16 compile", "peft fp32", "peft bf16"}
    n = res["setup"]["non_embedding_params"]
    for name, row in res["variants"].items():
        assert positive(row["tokens_per_s"]) and len(row["runs"]) == 1
        peak = res["peak_flops"][name.split()[1]]
        assert row["pct_of_peak"] == pytest.approx(4 * n * row["tokens_per_s"] / peak)
    assert res["ratios"]["ptray bf16 / ptray fp32"] == pytest.approx(
        res["variants"]["ptray bf16"]["tokens_per_s"] / res["variants"]["ptray fp32"]["tokens_per_s"])
    assert set(res["quality"]) == {"cb", "rte", "copa", "wsc"}
    for row in res["quality"].values():
        for prec in ("fp32", "bf16"):
            assert positive(row[prec]["eval_loss"]) and 0 <= row[prec]["rank_accuracy"] <= 1
        # the prompt-free baseline is the same model in two precisions: bf16 rounding only
        assert row["bf16"]["no_prompt_eval_loss"] == pytest.approx(row["fp32"]["no_prompt_eval_loss"], rel=0.02)
    text = md.read_text()
    assert "old" not in text and "| ptray bf16 |" in text and "| cb |" in text


def test_all_position_logits_ablation_adds_the_full_head_and_changes_no_number(tiny_model_dir):
    """The ablation variant of benchmarks/cpu_real.py: inside ``all_position_logits`` the LM head runs at every
    position (forward and backward), and the answer log-probabilities and the prompt gradient are the same."""
    import torch

    from benchmarks.cpu_real import all_position_logits
    from ptray.data.batching import collate
    from ptray.lm.forward import answer_logprobs
    from ptray.lm.load import load_model

    model, tok = load_model(str(tiny_model_dir))
    seqs = [([5, 6, 7, 8], [9]), ([10, 11], [12, 13])]
    batch = collate(seqs, tok.pad_token_id, tok.eos_token_id)
    rows_seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[:-1].numel()))
    outs = []
    for ablate in (False, True):
        prompt = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_()
        rows_seen.clear()
        if ablate:
            with all_position_logits():
                lp, _ = answer_logprobs(model, batch, prompt)
        else:
            lp, _ = answer_logprobs(model, batch, prompt)
        lp.sum().backward()
        outs.append((lp.detach(), prompt.grad, list(rows_seen)))
    answers = sum(len(a) + 1 for _, a in seqs)  # answer tokens and EOS
    assert outs[0][2] == [answers]
    assert outs[1][2] == [batch.input_ids.numel() + 3 * len(seqs), answers]  # every position, prompt rows too
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    from ptray.lm import families

    assert families.base_forward.__name__ == "base_forward"  # restored
