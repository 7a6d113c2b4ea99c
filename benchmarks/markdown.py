"""The results of a run (``bench.py --out``'s JSON) as the markdown section of BENCHMARKS.md: one function per
section of the results, each returning its lines; ``render_markdown`` joins those present."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.ablations import ABLATIONS
from benchmarks.measure import mib
from benchmarks.study_estimate import EPOCHS, EXTRA_EVALS, SEEDS
from benchmarks.targets import TARGETS


def render_markdown(res: dict) -> str:
    """The markdown for the results ``res``: the run's settings, then a table per measured section."""
    lines = _setup(res)
    for key, section in _SECTIONS:
        if res.get(key):
            lines += section(res[key])
    return "\n".join(lines) + "\n"


def update_markdown(path: str, key: str, body: str) -> None:
    """Replace the text between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->`` (appended when missing)."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"## Results: {key}\n\n{block}\n"
    p.write_text(text)


def _setup(res):
    m = res["meta"]
    threads = f"{m['cpu_threads']} torch thread{'s' if m['cpu_threads'] != 1 else ''}"
    hw = (f"{m['gpu']} ({m['gpu_mem_gib']} GiB), CUDA {m['cuda']}; host CPU {m['cpu']}, {m['cores']} cores"
          if m["device"] == "cuda" else f"{m['cpu']}, {m['cores']} cores ({threads}), {m['ram_gib']} GiB RAM")
    v = m["versions"]
    su = res.get("setup", {}).get("model", {})
    lines = [
        f"Run {m['date']}: `{m['command']}`",
        "",
        f"- hardware: {hw}",
        f"- software: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, accelerate "
        f"{v['accelerate']}, Python {v['python']}",
        f"- model: `{m['model_shape']}` (hidden {su.get('hidden')}, {su.get('layers')} layers, {su.get('heads')} "
        f"heads, vocab {su.get('vocab')}, {su.get('params', 0) / 1e6:.1f}M parameters), random weights; precision "
        f"{'bf16 weights + bf16 autocast, fp32 prompt' if m['precision'] == 'bf16' else 'fp32'}",
        f"- training batch {m['batch_size']} examples, evaluation batch {m['eval_batch_size']} sequences; "
        f"{m['warmup']} warm-up + {m['steps']} timed steps per window, median of {m['repeats']} windows "
        f"({m['ablation_repeats']} for evaluation and the techniques; ptray and the alternative alternate window by "
        "window)",
    ]
    if "matmul_peak" in res:
        lines.append("- measured matmul peak (higher of the runs at the start and the end): " + ", ".join(
            f"{k} {p['flops'] / 1e12:.3g} TFLOP/s" for k, p in res["matmul_peak"].items()))
    if res.get("errors"):
        lines.append("- sections that failed: " + "; ".join(f"{k}: {e}" for k, e in res["errors"].items()))
    if res.get("skipped"):
        lines.append("- skipped (time budget): " + ", ".join(res["skipped"]))
    return lines


def _train(tr):
    lines = ["", "Training, median of the timed windows (tokens = real text tokens; ratio = ptray / reference of "
             "the medians; paired = median of the ratios of back-to-back windows; study mix = the four tasks "
             "weighted by their tokens per epoch; MFU = model FLOPs/s over the measured matmul peak):", "",
             "| task | ptray tok/s | reference tok/s | ratio | paired | ptray ex/s | reference ex/s | "
             "ptray peak MiB | reference peak MiB | ptray MFU | reference MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in tr.items():
        p, q = r["ptray"], r["reference"]
        ex = (f"{p['examples_per_s']:.1f} | {q['examples_per_s']:.1f}" if "examples_per_s" in p else "- | -")
        name = "**study mix**" if t == "study" else t
        pr = f"{r['paired_ratio']:.2f}x" if "paired_ratio" in r else "-"
        lines.append(f"| {name} | {p['tokens_per_s']:.0f} | {q['tokens_per_s']:.0f} | **{r['ratio']:.2f}x** | {pr} | "
                     f"{ex} | {mib(p['peak_mib'])} | {mib(q['peak_mib'])} | {p['mfu']:.1%} | {q['mfu']:.1%} |")
    spread = [f"{t} {min(r['ptray']['runs_tokens_per_s']):.0f}-{max(r['ptray']['runs_tokens_per_s']):.0f} vs "
              f"{min(r['reference']['runs_tokens_per_s']):.0f}-{max(r['reference']['runs_tokens_per_s']):.0f}"
              for t, r in tr.items() if "runs_tokens_per_s" in r["ptray"]]
    lines.append("\nWindows ranged (tok/s, ptray vs reference): " + "; ".join(spread) + ".")
    return lines


def _eval(ev):
    lines = ["", "Evaluation of the validation sets, examples/s. ptray = `ptray.evaluate` (loss, exact match and "
             "rank accuracy: every label scored, the source run once per example); per-label = the same numbers "
             "with one pass per (example, label) sequence; EM-only = one pass over the gold sequence alone "
             "(exact match, nothing else); generate = batched greedy `generate` in dataset order, as a user "
             "writes it (sorted: by length). Speedups are over generate.",
             "", "| task | examples | ptray | per-label | EM-only | generate | generate sorted | "
             "ptray speedup | per-label speedup | EM-only speedup | EM agreement | ptray peak MiB | "
             "generate peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in ev.items():
        if t == "all":
            continue
        lines.append(f"| {t} | {r['examples']} | {r['ptray']['examples_per_s']:.1f} | "
                     f"{r['ptray_per_label']['examples_per_s']:.1f} | {r['ptray_em_only']['examples_per_s']:.1f} | "
                     f"{r['generate']['examples_per_s']:.1f} | {r['generate_sorted']['examples_per_s']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {r['speedup_per_label']:.2f}x | {r['speedup_em_only']:.2f}x | "
                     f"{r['em_agree']:.0%} | {mib(r['ptray']['peak_mib'])} | {mib(r['generate']['peak_mib'])} |")
    a = ev["all"]
    lines.append(f"| **all** | | | | | | | **{a['speedup']:.2f}x** | {a['speedup_per_label']:.2f}x | "
                 f"{a['speedup_em_only']:.2f}x | | | |")
    return lines


def _ablations(ablations):
    lines = ["", "Each technique alone: ptray vs ptray with that one thing done the usual way (study mix of "
             "the tasks listed):", "",
             "| technique | variant | tasks | ptray tok/s | variant tok/s | ptray's way | ptray peak MiB | "
             "variant peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for k, e in ablations.items():
        desc = ABLATIONS[k].what + (f" ({e['variant_precision']})" if "variant_precision" in e else "") + (
            f"; compiling took {e['compile_seconds']:.0f} s" if e.get("compile_seconds") else "")
        lines.append(f"| {k} | {desc} | {','.join(e['tasks'])} | {e['ptray']['tokens_per_s']:.0f} | "
                     f"{e['variant']['tokens_per_s']:.0f} | **{e['ptray_gain']:.2f}x** | "
                     f"{mib(e['ptray']['peak_mib'])} | {mib(e['variant']['peak_mib'])} |")
    return lines


def _packed(packed):
    lines = ["", "Trials packed into one forward pass (K prompts, K batches of the same task per step):", "",
             "| trials | tok/s together | vs one trial | MFU | peak MiB |", "|---|---|---|---|---|"]
    for k, e in packed.items():
        g = e.get("gain_vs_one_trial")
        lines.append(f"| {k} | {e['study']['tokens_per_s']:.0f} | {f'{g:.2f}x' if g else '-'} | "
                     f"{e['study']['mfu']:.1%} | {mib(e['study']['peak_mib'])} |")
    return lines


def _packed_out_of_memory(failures):
    return ["\nOut of memory when packing: " + "; ".join(failures)]


def _concurrency(concurrency):
    lines = ["", "Trial processes on the device at once (each: ptray's step, its own model copy):", "",
             "| processes | all ran | tok/s together | per process | device memory per trial | "
             "trials that would fit |", "|---|---|---|---|---|---|"]
    for k, c in concurrency.items():
        fp = c.get("footprint_per_trial")
        lines.append(f"| {k} | {'yes' if c['all_ok'] else 'no: ' + '; '.join(c['errors'])} | "
                     f"{c['tokens_per_s']:.0f} | {statistics.mean(c['per_trial_tokens_per_s'] or [0]):.0f} | "
                     f"{f'{fp / 2**30:.2f} GiB' if fp else '-'} | {c.get('max_trials_estimate') or '-'} |")
    return lines


def _study_estimate(s):
    scaled = s.get("scale_to_issue_tokens", 1.0) != 1.0
    lines = ["", f"Paper study ({SEEDS} seeds x {EPOCHS} epochs of {', '.join(s['tasks'])}, a validation pass per "
             f"epoch, {EXTRA_EVALS} more evaluations), bloomz-560m FLOPs: {s['train_pflop']:.1f} PFLOP training + "
             f"{s['eval_pflop']:.1f} PFLOP evaluation with this run's tokenizer "
             f"({s['epoch_tokens_this_tokenizer']:,} tokens per epoch)"
             + (f"; {s['pflop_at_issue_tokens']:.1f} PFLOP scaled to the issue's ~{s['epoch_tokens_issue']:,} "
                "bloomz tokens per epoch." if scaled else ".")]
    if "minutes" in s:
        lines.append(f"Measured here: {s['minutes']:.1f} min ({s['train_minutes']:.1f} training at the throughput "
                     f"of {s['best']}, {s['eval_minutes']:.1f} evaluation"
                     f"{', at the issue token count' if scaled else ''}).")
    lines.append("Estimate (not a measurement) on one H100 at the issue's 800 TFLOP/s bf16 peak: " + ", ".join(
        f"{v:.1f} min at {k} MFU" for k, v in s["minutes_at_mfu"].items()) + ".")
    return lines


def _targets(targets):
    lines = ["", "| target | goal | value | status |", "|---|---|---|---|"]
    for k, tv in targets.items():
        val = tv.get("value")
        if isinstance(val, float):
            shown = f"{val:.1%}" if k == "mfu" else f"{val:.2f}"
        else:
            shown = "-" if val is None else val
        why = tv.get("why") or tv.get("note") or ""
        lines.append(f"| {TARGETS[k].name} | {TARGETS[k].goal_text} | {shown} | {tv['status']}"
                     f"{' (' + why + ')' if why else ''} |")
    return lines


# results key -> its lines, in the order they are printed
_SECTIONS = (("train", _train), ("eval", _eval), ("ablations", _ablations), ("packed", _packed),
             ("packed_out_of_memory", _packed_out_of_memory), ("concurrency", _concurrency),
             ("study_estimate", _study_estimate), ("targets", _targets))


# ------------------------------------------------------------------------------------------ gpu.py's results


def render_gpu(res: dict) -> str:
    """The markdown for ``gpu.py``'s results: the run, then a table or paragraph per section present."""
    m, su = res["meta"], res.get("setup", {})
    hw = (f"{m['gpu']} ({m['gpu_mem_gib']} GiB), CUDA {m['cuda']}" if m["device"] == "cuda"
          else f"{m['cpu']}, {m['cores']} cores")
    v, tok = m["versions"], su.get("tokenizer", {})
    lines = [f"Run {m['date']}: `{m['command']}`" + (" - SMOKE run (tiny model, CPU): not a timing" if m["smoke"]
                                                      else ""), "",
             f"- hardware: {hw}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}",
             f"- model: `{m['model_shape']}` config, random weights, precision "
             f"{'bf16 weights + autocast, fp32 prompt' if m['precision'] == 'bf16' else 'fp32'}; tokenizer "
             f"{tok.get('path') or 'ptray offline (559 words)'} ({tok.get('size')} tokens): "
             f"{tok.get('epoch_tokens', 0):,} training tokens per epoch of CB, RTE, COPA and WSC"]
    if "matmul_peak" in res:
        lines.append("- measured matmul peak: " + ", ".join(f"{k} {p['flops'] / 1e12:.3g} TFLOP/s"
                                                          for k, p in res["matmul_peak"].items()))
    for key, why in (("errors", "failed"), ("skipped", "skipped (time budget)")):
        if res.get(key):
            items = res[key].items() if isinstance(res[key], dict) else [(k, "") for k in res[key]]
            lines.append(f"- sections {why}: " + "; ".join(f"{k}{': ' + e if e else ''}" for k, e in items))
    for key, section in _GPU_SECTIONS:
        if res.get(key):
            lines += section(res[key])
    return "\n".join(lines) + "\n"


def _pct(x):
    return "-" if x is None else f"{x:.1%}"


def _err(c):
    return (f"{c['logprob_max_abs_diff']:.1e} / {c['grad_rel_err']:.1e}{'' if c['ok'] else ' **over tolerance**'}"
            f"{'' if c['finite'] else ' **not finite**'}")


def _gpu_attention(entries):
    lines = ["", "Forward + backward to an 8-row prompt (fused: one SDPA call with the ALiBi + mask bias; folded: "
             "ALiBi in two extra Q/K dimensions, causal-only SDPA); error = largest |log-prob difference| / "
             "relative error of the prompt gradient, each against fp32 eager attention:", "",
             "| rows x length | attention | tok/s | vs eager | MFU | peak MiB | error vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for mode in ("eager", "fused", "folded"):
            r, shape = e[mode], f"{e['rows']}x{e['length']}"
            if "error" in r:
                lines.append(f"| {shape} | {mode} | {r['error']} | | | | |")
                continue
            lines.append(f"| {shape} | {mode} | {r['tokens_per_s']:,.0f} | {r.get('speedup', 1.0):.2f}x | "
                         f"{_pct(r['mfu'])} | {mib(r['peak_mib'])} | {_err(r['vs_fp32_eager'])} |")
    return lines


def _gpu_sdpa(s):
    lines = ["", f"SDPA backends ({s['rows']}x{s['length']}): torch picks " + ", ".join(
        f"{k}: {v}" for k, v in s["picked"].items()) + ". Each backend forced, against fp32 MATH (error as above):",
             "", "| path, precision, backend | error vs fp32 MATH |", "|---|---|"]
    for k, c in s["check"].items():
        lines.append(f"| {k} | {_err(c) if c['ran'] else 'refused: ' + c['error'].replace('|', '/')} |")
    return lines


def _gpu_group(entries):
    lines = ["", "Training through `ptray.training.loop.train_group` (epoch 2 of each, timed by the loop):", "",
             "| training step | rows/step | tok/s | vs one trial (eager) | vs PEFT + Trainer | MFU | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['mode']} | {e['rows_per_step']} | {e['error']} | | | | |")
            continue
        ratio = {k: f"{e[k]:.2f}x" if k in e else "-" for k in ("vs_one_trial_eager", "vs_peft_trainer")}
        lines.append(f"| {e['mode']} | {e['rows_per_step']} | {e['tokens_per_s']:,.0f} | "
                     f"{ratio['vs_one_trial_eager']} | {ratio['vs_peft_trainer']} | {_pct(e['mfu'])} | "
                     f"{mib(e['peak_mib'])} |")
    return lines


def _gpu_study(s, title):
    peak = "-" if s["peak_gib"] is None else f"{s['peak_gib']:.1f} GiB"
    per = ", ".join(f"{e['seconds']:.1f} s" for e in s["per_epoch"][:12])
    lines = ["", f"{title}: {s['prompts']} prompts in one group, at most {s['max_epochs']} epochs (patience "
             f"{s['patience']}), {s['attention']} attention, {s['max_tokens_per_forward']} padded tokens per forward "
             f"pass: training {'finished' if s['finished'] else 'STOPPED by the cap'} in {s['train_seconds']:.0f} s "
             f"(epochs per prompt {s['epochs_run']}), then {s['evaluations']}/{s['evaluations_planned']} "
             f"evaluations in {s['eval_seconds']:.0f} s; wall {s['wall_seconds']:.0f} s; peak memory {peak}. "
             f"Seconds per epoch (until every prompt had finished it, validation included): {per}."]
    if "epoch_seconds_estimate" in s:
        lines.append(f"Estimate (not a measurement): {s['epoch_seconds_estimate']:.1f} s per epoch after the first, "
                     f"so 50 epochs without early stopping and the 68 evaluations take "
                     f"{s['whole_study_seconds_estimate_no_early_stopping'] / 60:.1f} min.")
    return lines


def _gpu_peft(tr):
    lines = _train(tr)
    return lines[:1] + ["PEFT + Trainer, one trial, same model, data, batch 8 and precision (eager attention on both "
                        "sides):"] + lines[2:]


_GPU_SECTIONS = (("attention", _gpu_attention), ("sdpa", _gpu_sdpa), ("group", _gpu_group),
                 ("study_epochs", lambda s: _gpu_study(s, "Study for a fixed number of epochs, early stopping off")),
                 ("train", _gpu_peft), ("eval", _eval), ("study", lambda s: _gpu_study(s, "The whole study")))
