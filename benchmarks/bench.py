"""ptray's prompt-tuning step and evaluation against PEFT + transformers.Trainer and greedy ``generate``, side by side.

    python benchmarks/bench.py --smoke                                   # CI: does everything run? (not a timing)
    python benchmarks/bench.py --device cpu --model-shape small-560m-ratio --out cpu.json --md BENCHMARKS.md
    python benchmarks/bench.py --device cuda --model-shape bloomz-560m --out gpu.json --md BENCHMARKS.md

One run, one device, one model (random weights, built in memory), the real SuperGLUE train/val sets:

1. the matmul peak of the device in the run's dtype (the MFU denominator);
2. training, per task: ptray's step (length-grouped batches, LM head at the answer positions, fp32 prompt, Adam on
   the prompt only) vs PEFT ``PromptTuningConfig`` (TEXT init) + ``Trainer`` with the same model, data, batch size,
   precision and number of virtual tokens; repeats alternate between the two;
3. evaluation, per task: ptray's one-pass ``evaluate`` (exact match + rank accuracy) vs batched greedy
   ``generate``;
4. each technique alone (ptray with that one thing switched back to the usual way), trials packed into one
   forward pass, SDPA attention, ``torch.compile``;
5. several trial processes on the device at once;
6. targets met or not, and the paper study's wall time estimated from the measured throughput.

Numbers go to ``--out`` (JSON) and, with ``--md``, into a marked section of a markdown file. See
``benchmarks/measure.py`` for what tokens, FLOPs and MFU mean here.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import variants as V  # noqa: E402
from benchmarks.measure import PeakMemory, Shape, matmul_peak, median, timed  # noqa: E402
from benchmarks.models import build_model  # noqa: E402
from benchmarks.trials import run_concurrent  # noqa: E402
from ptray.batching import encode_all  # noqa: E402
from ptray.data import load_split  # noqa: E402
from ptray.prompt import init_prompt  # noqa: E402
from ptray.tasks import get_task  # noqa: E402

TASKS = ("cb", "rte", "copa", "wsc")
# in order of priority (a GPU run under its time budget drops the last ones first)
ABLATIONS = ("full_logits", "unsorted", "precision", "train_weights", "compile", "sdpa")
# The paper study (issue 5): 4 tasks x 4 seeds x 50 epochs, one validation pass per epoch, plus 68 evaluations
# (16 prompts x 4 tasks + 4 without a prompt); ~340k bloomz-tokenizer tokens per epoch over the four train sets.
SEEDS, EPOCHS, EXTRA_EVALS, ISSUE_EPOCH_TOKENS = 4, 50, 68, 340_000
H100_BF16_PEAK = 800e12  # the issue's measured H100 dense bf16 matmul FLOP/s, for estimates made without a GPU
TARGETS = {"train_ratio": 3.0, "mfu": 0.35, "study_minutes": 4.0, "eval_speedup": 5.0, "concurrent_trials": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks that everything runs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model-shape", default=None,
                   help="tiny, small, small-560m-ratio, bloomz-560m (default: bloomz-560m on cuda, "
                        "small-560m-ratio on cpu, tiny with --smoke)")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 on cuda, fp32 ('no') on cpu, as ptray chooses")
    p.add_argument("--data-dir", default=os.environ.get("PTRAY_DATA_DIR", str(ROOT.parent / "shared" / "data" / "superglue")))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--batch-size", type=int, default=8, help="training examples per step (ptray's default)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="sequences per evaluation batch")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each timed window")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per window")
    p.add_argument("--repeats", type=int, default=None, help="windows per measurement (the median is reported)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"subset of {','.join(ABLATIONS)} or 'none'")
    p.add_argument("--ablation-tasks", default=None, help="tasks for the ablations (default: --tasks)")
    p.add_argument("--ablation-repeats", type=int, default=None, help="windows per ablation (default: --repeats)")
    p.add_argument("--packed", default=None, help="trial counts to pack into one forward pass, e.g. 4,16")
    p.add_argument("--trials", default=None, help="concurrent trial processes to run, e.g. 1,8,16")
    p.add_argument("--trial-seconds", type=float, default=None, help="timed seconds per concurrent trial")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 steadies timings on a shared machine)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; optional sections that would end later are skipped (default 420 on cuda)")
    p.add_argument("--sections", default="train,eval,packed,concurrency,ablations",
                   help="which measurements to run (the matmul peak always runs)")
    p.add_argument("--out", default=None, help="write all numbers here (JSON)")
    p.add_argument("--md", default=None, help="markdown file whose '<!-- bench:DEVICE-SHAPE -->' section to replace")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: load --out, redo the conclusions and the markdown")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA GPU is visible")
    if a.precision == "auto":
        a.precision = "bf16" if a.device == "cuda" else "no"
    gpu = a.device == "cuda"
    defaults = dict(
        model_shape="tiny" if a.smoke else ("bloomz-560m" if gpu else "small-560m-ratio"),
        warmup=1 if a.smoke else (3 if gpu else 2),
        steps=1 if a.smoke else (20 if gpu else 8),
        repeats=1 if a.smoke else 3,
        ablation_repeats=1 if a.smoke else (2 if gpu else 3),
        packed="2" if a.smoke else ("4,16" if gpu else "4"),
        trials="1" if a.smoke else ("8,16" if gpu else "1,2"),
        trial_seconds=0.5 if a.smoke else (15.0 if gpu else 30.0),
        max_train_examples=16 if a.smoke else None,
        max_eval_examples=8 if a.smoke else None,
        time_budget=420.0 if gpu else None,
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.smoke:
        a.tasks = "copa"  # short sequences: a quick check
        a.threads = a.threads or 1  # a shared CI machine: one thread does not wait on a busy second core
        a.ablations = ",".join(x for x in a.ablations.split(",") if x != "compile")  # compiling takes minutes
    if a.threads:
        torch.set_num_threads(a.threads)
    a.tasks = [t for t in a.tasks.split(",") if t]
    a.ablations = [] if a.ablations == "none" else [x for x in a.ablations.split(",") if x]
    for x in a.ablations:
        if x not in ABLATIONS:
            p.error(f"unknown ablation {x!r}; valid: {', '.join(ABLATIONS)}")
    a.ablation_tasks = a.ablation_tasks.split(",") if a.ablation_tasks else a.tasks
    a.packed = [int(x) for x in a.packed.split(",") if x]
    a.trials = [int(x) for x in a.trials.split(",") if x]
    return a


# ------------------------------------------------------------------------------------------------ the run


class Bench:
    def __init__(self, args):
        self.a = args
        self.t_start = time.perf_counter()
        self.dev = args.device
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.res = {"meta": self.meta(), "errors": {}}

    # -- helpers
    def over_budget(self, needs: float = 0.0) -> bool:
        """Would a section that needs ``needs`` seconds end past the time budget?"""
        elapsed = time.perf_counter() - self.t_start
        return self.a.time_budget is not None and elapsed + needs > self.a.time_budget

    def section(self, name, fn, optional=True, needs=0.0):
        """Run one section; a failure is recorded and the run goes on (a GPU run cannot be repeated cheaply)."""
        if optional and self.over_budget(needs):
            self.res.setdefault("skipped", []).append(name)
            log(f"[{name}] skipped: time budget of {self.a.time_budget:.0f} s spent")
            return
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported in the results and on stderr
            self.res["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")
        if self.dev == "cuda":
            torch.cuda.empty_cache()
        self.save()

    def meta(self):
        a = self.a
        m = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
            "device": a.device, "model_shape": a.model_shape, "precision": a.precision,
            "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size, "warmup": a.warmup,
            "steps": a.steps, "repeats": a.repeats, "ablation_repeats": a.ablation_repeats, "smoke": a.smoke,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         **{m: _version(m) for m in ("transformers", "peft", "accelerate")}},
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        }
        if a.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            m.update(gpu=torch.cuda.get_device_name(0), gpu_mem_gib=round(props.total_memory / 2**30, 1),
                     cuda=torch.version.cuda)
        return m

    def save(self):
        if self.a.out:
            Path(self.a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.a.out).write_text(json.dumps(self.res, indent=1, default=str) + "\n")

    # -- setup
    def setup(self):
        a = self.a
        self.model, self.tok = build_model(a.model_shape, self.dev, self.dtype)
        self.shape = Shape.of(self.model)
        self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id
        self.tok_dir = tempfile.mkdtemp(prefix="ptray-bench-tok-")
        self.tok.save_pretrained(self.tok_dir)  # PEFT's TEXT init loads a tokenizer by path
        self.data, self.val, self.init, self.epoch_tokens = {}, {}, {}, {}
        emb = self.model.get_input_embeddings().weight
        for name in a.tasks:
            task = get_task(name)
            self.data[name] = encode_all(task, load_split(task, "train", a.data_dir, limit=a.max_train_examples),
                                         self.tok, 512)
            self.val[name] = encode_all(task, load_split(task, "val", a.data_dir, limit=a.max_eval_examples),
                                        self.tok, 512)
            self.init[name] = init_prompt(emb, self.tok, "text", task.init_text)
            self.epoch_tokens[name] = sum(len(d.source) + len(d.answers[d.label]) for d in self.data[name])
        cfg = self.model.config
        self.res["setup"] = {
            "model": {"hidden": cfg.hidden_size, "layers": cfg.n_layer, "heads": cfg.n_head, "vocab": cfg.vocab_size,
                      "params": sum(p.numel() for p in self.model.parameters()), "block_linear_params": self.shape.n_lin},
            "tasks": {t: {"train_examples": len(self.data[t]), "val_examples": len(self.val[t]),
                          "prompt_tokens": int(self.init[t].shape[0]), "epoch_tokens": self.epoch_tokens[t],
                          "mean_length": self.epoch_tokens[t] / len(self.data[t])} for t in a.tasks},
        }

    def peak(self):
        sizes = (4096, 8192) if self.dev == "cuda" else (128, 256) if self.a.smoke else (256, 512, 1024, 2048)
        secs = 0.1 if self.a.smoke else 2.0
        self.peaks = {}
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            self.peaks[name] = matmul_peak(self.dev, dt, sizes, secs)
        self.res["matmul_peak"] = self.peaks
        log("  matmul peak " + ", ".join(f"{k} {v['flops'] / 1e12:.3f} TFLOP/s" for k, v in self.peaks.items()))

    def peak_again(self):
        """Measure the matmul peak once more at the end; MFUs use the higher of the two (a busy shared machine
        can depress either)."""
        first = self.peaks
        self.peak()
        for name, p in self.peaks.items():
            p["first_flops"], p["last_flops"] = first[name]["flops"], p["flops"]
            p["flops"] = max(p["first_flops"], p["last_flops"])
        self.res["matmul_peak"] = self.peaks

    def peak_flops(self, precision):
        return self.peaks["bf16" if precision == "bf16" else "fp32"]["flops"]

    # -- training
    def batches(self, task, grouped=True, seed=0, n=None):
        n = n or self.a.warmup + self.a.steps
        batches, seconds = V.batch_stream(self.data[task], self.a.batch_size, n, seed, self.pad, self.eos, grouped)
        return batches, seconds / n

    def run_ptray(self, task, model=None, precision=None, grouped=True, memory_pass=False, **kw):
        """Timed windows; ``memory_pass``: instead, a short run that measures peak memory (CPU: under the profiler)."""
        n = self.a.warmup + 1 if memory_pass else None
        batches, collate_s = self.batches(task, grouped, n=n)
        return V.ptray_train(model or self.model, batches, self.init[task], device=self.dev,
                             precision=precision or self.a.precision, warmup=self.a.warmup, shape=self.shape,
                             collate_s=collate_s, memory=True if memory_pass else None, **kw)

    def with_memory(self, runs, memory_pass):
        """CUDA runs carry their peak memory; on CPU a separate short profiled run gives it."""
        return runs + [memory_pass()] if self.dev == "cpu" else runs

    def summarize(self, runs, precision=None):
        """Median tokens/s and examples/s over the timed windows; the largest peak memory; MFU of the median."""
        timed_runs = [r for r in runs if not (self.dev == "cpu" and r.peak_bytes is not None)]
        tps = median([r.tokens_per_s for r in timed_runs])
        flops_per_token = sum(r.flops for r in timed_runs) / sum(r.tokens for r in timed_runs)
        peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
        precision = precision or self.a.precision
        return {"tokens_per_s": tps, "examples_per_s": median([r.examples_per_s for r in timed_runs]),
                "peak_mib": max(peaks) / 2**20 if peaks else None, "flops_per_token": flops_per_token,
                "precision": precision, "mfu": tps * flops_per_token / self.peak_flops(precision),
                "runs_tokens_per_s": [r.tokens_per_s for r in timed_runs]}

    def train(self):
        a, out = self.a, {}
        for task in a.tasks:
            def reference(memory_pass=False, task=task):
                return V.reference_train(self.model, self.tok, self.tok_dir, get_task(task).init_text,
                                         int(self.init[task].shape[0]), self.data[task], device=self.dev,
                                         precision=a.precision, batch_size=a.batch_size, warmup=a.warmup,
                                         steps=1 if memory_pass else a.steps, shape=self.shape,
                                         memory=True if memory_pass else None, expect_init=self.init[task])

            mine, ref = [], []
            for _ in range(a.repeats):  # alternate, so drifting load on a shared machine hits both alike
                mine.append(self.run_ptray(task))
                ref.append(reference())
            mine = self.with_memory(mine, lambda task=task: self.run_ptray(task, memory_pass=True))
            ref = self.with_memory(ref, lambda: reference(memory_pass=True))
            out[task] = {"ptray": self.summarize(mine), "reference": self.summarize(ref)}
            out[task]["ratio"] = out[task]["ptray"]["tokens_per_s"] / out[task]["reference"]["tokens_per_s"]
            log(f"  {task}: ptray {out[task]['ptray']['tokens_per_s']:.0f} tok/s, reference "
                f"{out[task]['reference']['tokens_per_s']:.0f} tok/s, x{out[task]['ratio']:.2f}")
        for side in ("ptray", "reference"):
            out.setdefault("study", {})[side] = self.study_weighted({t: out[t][side] for t in a.tasks})
        out["study"]["ratio"] = out["study"]["ptray"]["tokens_per_s"] / out["study"]["reference"]["tokens_per_s"]
        self.res["train"] = out

    def study_weighted(self, per_task, precision=None):
        """Throughput over the study's mix: each task weighted by its tokens per epoch (time adds up, not rates)."""
        w = {t: self.epoch_tokens[t] for t in per_task}
        seconds = sum(w[t] / per_task[t]["tokens_per_s"] for t in w)
        flops = sum(w[t] * per_task[t]["flops_per_token"] for t in w)
        precision = precision or self.a.precision
        return {"tokens_per_s": sum(w.values()) / seconds, "flops_per_token": flops / sum(w.values()),
                "precision": precision, "mfu": flops / seconds / self.peak_flops(precision),
                "peak_mib": max((per_task[t]["peak_mib"] or 0) for t in w) or None}

    # -- evaluation
    def evaluate(self):
        a, out = self.a, {}
        for task in a.tasks:
            val, init = self.val[task], self.init[task].to(self.dev)
            n_ex = sum(d.label is not None for d in val)
            gold_tokens = sum(len(d.source) + len(d.answers[d.label]) for d in val if d.label is not None)
            kw = dict(pad_id=self.pad, eos_id=self.eos, device=self.dev, precision=a.precision)
            methods = {
                "ptray": lambda: V.ptray_evaluate(self.model, val, init, batch_size=a.eval_batch_size, **kw),
                "ptray_em_only": lambda: V.ptray_evaluate(self.model, V.gold_only(val), init, share_source=False,
                                                          batch_size=a.eval_batch_size, **kw),
                # the same numbers as "ptray" with one pass per (example, label) sequence: the source is not shared
                "ptray_per_label": lambda: V.ptray_evaluate(self.model, val, init, batch_size=a.eval_batch_size,
                                                            share_source=False, **kw),
                "generate": lambda: V.generate_exact_match(self.model, val, init, batch_size=a.eval_batch_size, **kw),
                "generate_sorted": lambda: V.generate_exact_match(self.model, val, init, sort=True,
                                                                  batch_size=a.eval_batch_size, **kw),
            }
            res, em = {}, {}
            for name, fn in methods.items():
                with PeakMemory(self.dev, True) as mem:  # also the warm-up; on CPU the only profiled run
                    fn()
                secs, peaks = [], [mem.peak]
                for _ in range(a.ablation_repeats):
                    with PeakMemory(self.dev) as mem, timed(self.dev) as t:
                        r = fn()
                    secs.append(t["s"])
                    peaks.append(mem.peak)
                peaks = [p for p in peaks if p is not None]
                em[name] = r.em_correct if hasattr(r, "em_correct") else r
                s = median(secs)
                res[name] = {"seconds": s, "examples_per_s": n_ex / s, "tokens_per_s": gold_tokens / s,
                             "peak_mib": max(peaks) / 2**20 if peaks else None, "exact_match": sum(em[name]) / n_ex}
            flops = sum(self.shape.eval_flops(init.shape[0], len(d.source), [len(x) for x in d.answers])
                        for d in val if d.label is not None)
            res["ptray"].update(model_flops=flops, precision=a.precision,
                                mfu=flops / res["ptray"]["seconds"] / self.peak_flops(a.precision))
            res["speedup"] = res["generate"]["seconds"] / res["ptray"]["seconds"]
            res["speedup_em_only"] = res["generate"]["seconds"] / res["ptray_em_only"]["seconds"]
            res["speedup_vs_sorted_generate"] = res["generate_sorted"]["seconds"] / res["ptray"]["seconds"]
            res["speedup_per_label"] = res["generate"]["seconds"] / res["ptray_per_label"]["seconds"]
            res["em_agree"] = sum(x == y for x, y in zip(em["ptray"], em["generate"])) / n_ex
            res["em_agree_all_methods"] = all(em[m] == em["ptray"] for m in em)
            res["examples"] = n_ex
            out[task] = res
            log(f"  {task}: ptray eval {res['ptray']['examples_per_s']:.1f} ex/s, generate "
                f"{res['generate']['examples_per_s']:.1f} ex/s, x{res['speedup']:.2f}, EM agree {res['em_agree']:.2f}")
        secs = {m: sum(out[t][m]["seconds"] for t in a.tasks) for m in methods}
        out["all"] = {"seconds": secs, "speedup": secs["generate"] / secs["ptray"],
                      "speedup_em_only": secs["generate"] / secs["ptray_em_only"],
                      "speedup_per_label": secs["generate"] / secs["ptray_per_label"],
                      "speedup_vs_sorted_generate": secs["generate_sorted"] / secs["ptray"]}
        self.res["eval"] = out

    # -- techniques one at a time
    def ablation(self, name):
        a = self.a
        tasks, repeats = a.ablation_tasks, a.ablation_repeats
        if name == "precision" and self.dev == "cpu" and a.precision != "bf16":
            # bf16 matmuls without CPU support run at ~1 GFLOP/s here: one short task, one window
            tasks, repeats = [min(tasks, key=lambda t: self.epoch_tokens[t] / len(self.data[t]))], 1
        base, alt = {}, {}
        alt_precision = None
        for task in tasks:
            mine, other = [], []
            if name == "precision":
                alt_precision = "no" if a.precision == "bf16" else "bf16"
                if not hasattr(self, "_alt_model"):
                    self._alt_model = copy.deepcopy(self.model).to(
                        torch.bfloat16 if alt_precision == "bf16" else torch.float32)

            def variant(memory_pass=False, task=task):
                kw = dict(memory_pass=memory_pass)
                if name == "full_logits":
                    return self.run_ptray(task, loss_fn=V.full_logits_loss, **kw)
                if name == "unsorted":
                    return self.run_ptray(task, grouped=False, **kw)
                if name == "train_weights":
                    return self.run_ptray(task, train_weights=True, **kw)
                if name == "precision":
                    return self.run_ptray(task, model=self._alt_model, precision=alt_precision, **kw)
                if name == "sdpa":
                    with V.sdpa_attention(self.model):
                        return self.run_ptray(task, **kw)
                if name == "compile":
                    with V.compiled_blocks(self.model):
                        if not hasattr(self, "_compile_s"):
                            t0 = time.perf_counter()
                            self.run_ptray(task)  # the first call compiles; untimed
                            self._compile_s = time.perf_counter() - t0
                        return self.run_ptray(task, **kw)
                raise ValueError(name)

            for _ in range(repeats):
                mine.append(self.run_ptray(task))
                other.append(variant())
            mine = self.with_memory(mine, lambda task=task: self.run_ptray(task, memory_pass=True))
            other = self.with_memory(other, lambda: variant(memory_pass=True))
            base[task] = self.summarize(mine)
            alt[task] = self.summarize(other, alt_precision)
        if hasattr(self, "_alt_model"):
            del self._alt_model
        b, o = self.study_weighted(base), self.study_weighted(alt, alt_precision)
        # "ptray_gain": how much faster ptray's way is than the alternative (>1: the technique pays)
        entry = {"tasks": tasks, "ptray": b, "variant": o, "ptray_gain": b["tokens_per_s"] / o["tokens_per_s"],
                 "per_task": {t: {"ptray": base[t]["tokens_per_s"], "variant": alt[t]["tokens_per_s"],
                                  "ptray_peak_mib": base[t]["peak_mib"], "variant_peak_mib": alt[t]["peak_mib"],
                                  "ptray_runs": base[t]["runs_tokens_per_s"],
                                  "variant_runs": alt[t]["runs_tokens_per_s"]}
                              for t in tasks}}
        if name == "precision":
            entry["variant_precision"] = alt_precision
        if name == "compile":
            entry["compile_seconds"] = getattr(self, "_compile_s", None)
        self.res.setdefault("ablations", {})[name] = entry
        log(f"  {name}: ptray {b['tokens_per_s']:.0f} tok/s vs variant {o['tokens_per_s']:.0f} tok/s "
            f"(ptray's way x{entry['ptray_gain']:.2f}; peak {_mib(b['peak_mib'])} vs {_mib(o['peak_mib'])} MiB)")

    def packed(self):
        a, out = self.a, {}
        for k in a.packed:
            per_task = {}
            for task in a.ablation_tasks:
                n = a.warmup + a.steps
                streams = [V.batch_stream(self.data[task], a.batch_size, n, seed, self.pad, self.eos)[0]
                           for seed in range(k)]
                def run(memory_pass=False, streams=streams, task=task, k=k):
                    s = [x[:a.warmup + 1] for x in streams] if memory_pass else streams
                    return V.ptray_train_packed(self.model, s, [self.init[task]] * k, device=self.dev,
                                                precision=a.precision, warmup=a.warmup, shape=self.shape,
                                                memory=True if memory_pass else None)

                try:
                    runs = self.with_memory([run() for _ in range(a.ablation_repeats)], lambda: run(memory_pass=True))
                except torch.OutOfMemoryError as err:  # a finding (how many trials fit in one batch), not a crash
                    self.res.setdefault("packed_out_of_memory", []).append(
                        f"{k} trials, {task}: {str(err).splitlines()[0]}")
                    log(f"  {k} trials packed, {task}: out of memory")
                    if self.dev == "cuda":
                        torch.cuda.empty_cache()
                    break
                per_task[task] = self.summarize(runs)
            if len(per_task) < len(a.ablation_tasks):
                continue
            single = {t: self.res["train"][t]["ptray"] for t in a.ablation_tasks} if "train" in self.res else None
            entry = {"per_task": per_task, "study": self.study_weighted(per_task)}
            if single:
                entry["gain_vs_one_trial"] = entry["study"]["tokens_per_s"] / self.study_weighted(single)["tokens_per_s"]
            out[str(k)] = entry
            log(f"  {k} trials packed: {entry['study']['tokens_per_s']:.0f} tok/s, MFU {entry['study']['mfu']:.1%}")
        self.res["packed"] = out

    def concurrency(self):
        a, out = self.a, {}
        tasks = a.tasks
        for k in a.trials:
            cfg = {"device": self.dev, "precision": a.precision, "shape": a.model_shape, "batch_size": a.batch_size,
                   "warmup": a.warmup, "seconds": a.trial_seconds, "start_timeout": 240.0,
                   "tokenizer_size": len(self.tok), "pad_id": self.pad, "eos_id": self.eos,
                   "cpu_threads": max(1, (a.threads or os.cpu_count() or 1) // k)}
            r = run_concurrent(k, cfg, [self.data[t] for t in tasks], [self.init[t] for t in tasks])
            out[str(k)] = r
            log(f"  {k} trial processes: all ok {r['all_ok']}, {r['tokens_per_s']:.0f} tok/s together"
                + (f", {r['footprint_per_trial'] / 2**30:.2f} GiB each, ~{r['max_trials_estimate']} fit"
                   if r.get("footprint_per_trial") else "") + (f"; errors {r['errors']}" if r["errors"] else ""))
        self.res["concurrency"] = out

    # -- conclusions
    def paired(self):
        """Ratios of windows run back to back (ptray, then the alternative): on a shared machine whose load drifts,
        the median of these pairs is steadier than the ratio of the two medians. Both are reported."""
        res = self.res
        tr = res.get("train")
        if tr:
            tasks = [t for t in tr if t != "study"]
            for t in tasks:
                p, q = tr[t]["ptray"]["runs_tokens_per_s"], tr[t]["reference"]["runs_tokens_per_s"]
                tr[t]["paired_ratio"] = median([x / y for x, y in zip(p, q)])
            windows = min(len(tr[t]["ptray"]["runs_tokens_per_s"]) for t in tasks)
            w = {t: self.epoch_tokens[t] for t in tasks}
            ratios = []
            for i in range(windows):  # the study mix of window i of every task, each side
                secs = [sum(w[t] / tr[t][side]["runs_tokens_per_s"][i] for t in tasks) for side in ("ptray", "reference")]
                ratios.append(secs[1] / secs[0])
            tr["study"]["paired_ratio"] = median(ratios)
        for e in res.get("ablations", {}).values():
            gains = []
            for t in e["tasks"]:
                pt = e["per_task"][t]
                if "ptray_runs" in pt:
                    gains += [x / y for x, y in zip(pt["ptray_runs"], pt["variant_runs"])]
            if gains:
                e["paired_gain"] = median(gains)

    def conclude(self):
        a, res = self.a, self.res
        _refresh_mfu(res, self.peak_flops)
        self.paired()
        gpu = self.dev == "cuda"
        study = self.study_estimate()
        res["study_estimate"] = study
        t = {}
        tr = res.get("train", {}).get("study")
        t["train_ratio"] = _target(tr and tr["ratio"], TARGETS["train_ratio"])
        ev = res.get("eval", {}).get("all")
        t["eval_speedup"] = _target(ev and ev["speedup"], TARGETS["eval_speedup"])
        full_shape = a.model_shape == "bloomz-560m" and gpu and a.precision == "bf16"
        mfus = ([tr["ptray"]["mfu"]] if tr else []) + [p["study"]["mfu"] for p in res.get("packed", {}).values()]
        best_mfu = max(mfus, default=None)
        t["mfu"] = _target(best_mfu, TARGETS["mfu"]) if full_shape else {"status": "unmeasured",
                                                                          "why": "needs the bloomz-560m shape, bf16, GPU"}
        fits = [int(k) for k, v in res.get("concurrency", {}).items() if v["all_ok"]]
        if full_shape:
            t["concurrent_trials"] = _target(max(fits, default=0), TARGETS["concurrent_trials"])
            t["study_minutes"] = _target(study.get("minutes"), TARGETS["study_minutes"], lower_is_better=True)
            if "H100" not in res["meta"].get("gpu", ""):
                t["study_minutes"]["note"] = f"measured on {res['meta'].get('gpu')}, not an H100"
        else:
            for k in ("concurrent_trials", "study_minutes"):
                t[k] = {"status": "unmeasured", "why": "needs the bloomz-560m shape, bf16, GPU"}
        res["targets"] = t

    def study_estimate(self):
        """Paper-study wall time. FLOPs: bloomz-560m's formula over this run's examples, and scaled to the issue's
        token count (its tokenizer is bloomz's; ours, a 559-word BPE, makes ~2x more tokens of the same text).
        Minutes: at assumed MFUs of the issue's H100 peak; measured, when this run is the bloomz-560m GPU run."""
        a, res = self.a, self.res
        shape560 = Shape.from_config(1024, 24, 250880)
        tasks = a.tasks
        epoch_tokens = sum(self.epoch_tokens[t] for t in tasks)
        train_flops = val_flops = 0.0
        for t in tasks:
            n = int(self.init[t].shape[0])
            per_epoch = sum(shape560.train_flops(len(d.source) + len(d.answers[d.label]) + n,
                                                 len(d.answers[d.label]) + 1) for d in self.data[t])
            per_eval = sum(shape560.eval_flops(n, len(d.source), [len(x) for x in d.answers])
                           for d in self.val[t] if d.label is not None)
            train_flops += per_epoch * SEEDS * EPOCHS
            val_flops += per_eval * (SEEDS * EPOCHS + EXTRA_EVALS / len(tasks))
        # the issue's ~340k tokens per epoch are for all four train sets; a subset of tasks is not scaled
        scale = ISSUE_EPOCH_TOKENS / epoch_tokens if set(tasks) == set(TASKS) and not a.max_train_examples else 1.0
        total = (train_flops + val_flops) * scale
        out = {"tasks": tasks, "epoch_tokens_this_tokenizer": epoch_tokens, "epoch_tokens_issue": ISSUE_EPOCH_TOKENS,
               "scale_to_issue_tokens": scale, "train_pflop": train_flops / 1e15, "eval_pflop": val_flops / 1e15,
               "pflop_at_issue_tokens": total / 1e15, "assumed_peak_flops": H100_BF16_PEAK,
               "minutes_at_mfu": {f"{m:.0%}": total / (m * H100_BF16_PEAK) / 60 for m in (0.25, 0.35, 0.5)}}
        if self.dev == "cuda" and a.model_shape == "bloomz-560m" and "train" in res:
            # measured: the best training throughput (one trial, packed trials, or trial processes together)
            options = {"one trial": res["train"]["study"]["ptray"]["tokens_per_s"]}
            for k, p in res.get("packed", {}).items():
                options[f"{k} trials packed"] = p["study"]["tokens_per_s"]
            for k, c in res.get("concurrency", {}).items():
                if c["all_ok"]:
                    options[f"{k} trial processes"] = c["tokens_per_s"]
            best = max(options, key=options.get)
            train_s = epoch_tokens * scale * SEEDS * EPOCHS / options[best]
            ev = res.get("eval", {})
            eval_s = scale * sum(ev[t]["ptray"]["seconds"] * (SEEDS * EPOCHS + EXTRA_EVALS / len(tasks))
                                 for t in tasks if t in ev)
            out.update(throughput_options=options, best=best, train_minutes=train_s / 60, eval_minutes=eval_s / 60,
                       minutes=(train_s + eval_s) / 60,
                       note="evaluations counted one after another at one trial's speed (conservative)")
        return out


def _refresh_mfu(obj, peak_flops):
    """Recompute every MFU in the results with the final matmul peak."""
    if isinstance(obj, dict):
        if "mfu" in obj and "precision" in obj:
            if "model_flops" in obj:
                obj["mfu"] = obj["model_flops"] / obj["seconds"] / peak_flops(obj["precision"])
            elif "flops_per_token" in obj:
                obj["mfu"] = obj["tokens_per_s"] * obj["flops_per_token"] / peak_flops(obj["precision"])
        for v in obj.values():
            _refresh_mfu(v, peak_flops)


def _mib(x):
    return "-" if x is None else f"{x:.0f}"


def _target(value, goal, lower_is_better=False):
    if value is None:
        return {"status": "unmeasured"}
    ok = value <= goal if lower_is_better else value >= goal
    return {"status": "met" if ok else "not met", "value": value, "goal": goal}


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def _cpu_name():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- markdown


def render_markdown(res) -> str:
    m = res["meta"]
    hw = (f"{m['gpu']} ({m['gpu_mem_gib']} GiB), CUDA {m['cuda']}; host CPU {m['cpu']}, {m['cores']} cores"
          if m["device"] == "cuda" else f"{m['cpu']}, {m['cores']} cores ({m['cpu_threads']} torch thread{'s' if m['cpu_threads'] != 1 else ''}), "
                                        f"{m['ram_gib']} GiB RAM")
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
    if "train" in res:
        tr = res["train"]
        lines += ["", "Training, median of the timed windows (tokens = real text tokens; ratio = ptray / reference of "
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
                         f"{ex} | {_mib(p['peak_mib'])} | {_mib(q['peak_mib'])} | {p['mfu']:.1%} | {q['mfu']:.1%} |")
        spread = [f"{t} {min(r['ptray']['runs_tokens_per_s']):.0f}-{max(r['ptray']['runs_tokens_per_s']):.0f} vs "
                  f"{min(r['reference']['runs_tokens_per_s']):.0f}-{max(r['reference']['runs_tokens_per_s']):.0f}"
                  for t, r in tr.items() if "runs_tokens_per_s" in r["ptray"]]
        lines.append("\nWindows ranged (tok/s, ptray vs reference): " + "; ".join(spread) + ".")
    if "eval" in res:
        ev = res["eval"]
        lines += ["", "Evaluation of the validation sets, examples/s. ptray = `ptray.evaluate` (loss, exact match and "
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
                         f"{r['em_agree']:.0%} | {_mib(r['ptray']['peak_mib'])} | {_mib(r['generate']['peak_mib'])} |")
        a = ev["all"]
        lines.append(f"| **all** | | | | | | | **{a['speedup']:.2f}x** | {a['speedup_per_label']:.2f}x | "
                     f"{a['speedup_em_only']:.2f}x | | | |")
    if res.get("ablations"):
        lines += ["", "Each technique alone: ptray vs ptray with that one thing done the usual way (study mix of "
                  "the tasks listed):", "",
                  "| technique | variant | tasks | ptray tok/s | variant tok/s | ptray's way | ptray peak MiB | "
                  "variant peak MiB |", "|---|---|---|---|---|---|---|---|"]
        what = {"full_logits": "LM head at every position, fp32 cross-entropy",
                "unsorted": "plain shuffled batches (no length grouping)",
                "train_weights": "weights get gradients and Adam state",
                "precision": "other precision", "sdpa": "BLOOM attention through SDPA (not in ptray)",
                "compile": "torch.compile of each block (ptray's `--compile`, off by default)"}
        for k, e in res["ablations"].items():
            desc = what[k] + (f" ({e['variant_precision']})" if k == "precision" else "") + (
                f"; compiling took {e['compile_seconds']:.0f} s" if e.get("compile_seconds") else "")
            lines.append(f"| {k} | {desc} | {','.join(e['tasks'])} | {e['ptray']['tokens_per_s']:.0f} | "
                         f"{e['variant']['tokens_per_s']:.0f} | **{e['ptray_gain']:.2f}x** | "
                         f"{_mib(e['ptray']['peak_mib'])} | {_mib(e['variant']['peak_mib'])} |")
    if res.get("packed"):
        lines += ["", "Trials packed into one forward pass (K prompts, K batches of the same task per step):", "",
                  "| trials | tok/s together | vs one trial | MFU | peak MiB |", "|---|---|---|---|---|"]
        for k, e in res["packed"].items():
            g = e.get("gain_vs_one_trial")
            lines.append(f"| {k} | {e['study']['tokens_per_s']:.0f} | {f'{g:.2f}x' if g else '-'} | "
                         f"{e['study']['mfu']:.1%} | {_mib(e['study']['peak_mib'])} |")
    if res.get("packed_out_of_memory"):
        lines.append("\nOut of memory when packing: " + "; ".join(res["packed_out_of_memory"]))
    if res.get("concurrency"):
        lines += ["", "Trial processes on the device at once (each: ptray's step, its own model copy):", "",
                  "| processes | all ran | tok/s together | per process | device memory per trial | "
                  "trials that would fit |", "|---|---|---|---|---|---|"]
        for k, c in res["concurrency"].items():
            fp = c.get("footprint_per_trial")
            lines.append(f"| {k} | {'yes' if c['all_ok'] else 'no: ' + '; '.join(c['errors'])} | "
                         f"{c['tokens_per_s']:.0f} | {statistics.mean(c['per_trial_tokens_per_s'] or [0]):.0f} | "
                         f"{f'{fp / 2**30:.2f} GiB' if fp else '-'} | {c.get('max_trials_estimate') or '-'} |")
    if "study_estimate" in res:
        s = res["study_estimate"]
        scaled = s.get("scale_to_issue_tokens", 1.0) != 1.0
        lines += ["", f"Paper study ({SEEDS} seeds x {EPOCHS} epochs of {', '.join(s['tasks'])}, a validation pass per "
                  f"epoch, {EXTRA_EVALS} more evaluations), bloomz-560m FLOPs: {s['train_pflop']:.1f} PFLOP training + "
                  f"{s['eval_pflop']:.1f} PFLOP evaluation with this run's tokenizer "
                  f"({s['epoch_tokens_this_tokenizer']:,} tokens per epoch)"
                  + (f"; {s['pflop_at_issue_tokens']:.1f} PFLOP scaled to the issue's ~{s['epoch_tokens_issue']:,} "
                     "bloomz tokens per epoch." if scaled else ".")]
        if "minutes" in s:
            lines.append(f"Measured here: {s['minutes']:.1f} min ({s['train_minutes']:.1f} training at the throughput "
                         f"of {s['best']}, {s['eval_minutes']:.1f} evaluation{', at the issue token count' if scaled else ''}).")
        lines.append("Estimate (not a measurement) on one H100 at the issue's 800 TFLOP/s bf16 peak: " + ", ".join(
            f"{v:.1f} min at {k} MFU" for k, v in s["minutes_at_mfu"].items()) + ".")
    if "targets" in res:
        lines += ["", "| target | goal | value | status |", "|---|---|---|---|"]
        names = {"train_ratio": "training tokens/s vs PEFT + Trainer", "eval_speedup": "exact-match eval vs generate",
                 "mfu": "MFU, bloomz-560m shape, bf16", "concurrent_trials": "concurrent trials on one GPU",
                 "study_minutes": "paper study, minutes of one H100"}
        for k, tv in res["targets"].items():
            val = tv.get("value")
            fmt = (f"{val:.1%}" if k == "mfu" else f"{val:.2f}") if isinstance(val, float) else (val if val is not None else "-")
            goal = {"train_ratio": ">= 3x", "eval_speedup": ">= 5x", "mfu": ">= 35%", "concurrent_trials": ">= 8",
                    "study_minutes": "<= 4"}[k]
            why = tv.get("why") or tv.get("note") or ""
            lines.append(f"| {names[k]} | {goal} | {fmt} | {tv['status']}{' (' + why + ')' if why else ''} |")
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


def render_only(args) -> int:
    """Redo conclusions and markdown from a results file (e.g. a GPU run's JSON, on a machine without the GPU)."""
    measured = json.loads(Path(args.out).read_text())
    m = measured["meta"]
    # the data and prompt lengths come from the tokenizer alone: a tiny CPU model suffices to rebuild them
    args.device, args.model_shape, args.precision = "cpu", "tiny", "no"
    b = Bench(args)
    b.setup()
    b.res, b.peaks = measured, measured["matmul_peak"]
    args.device, args.model_shape, args.precision = m["device"], m["model_shape"], m["precision"]
    b.dev = m["device"]
    b.conclude()
    b.save()
    md = render_markdown(b.res)
    print(md)
    if args.md:
        update_markdown(args.md, f"{m['device']}-{m['model_shape']}", md)
    return 0


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    b = Bench(args)
    log(f"ptray benchmark: {args.device}, {args.model_shape}, precision {args.precision}"
        + (" (smoke run: checks that everything runs; the numbers are not timings)" if args.smoke else ""))
    b.section("setup", b.setup, optional=False)
    if "setup" in b.res["errors"]:
        return 1
    b.section("matmul peak", b.peak, optional=False)
    run = set(args.sections.split(","))
    if "train" in run:
        b.section("train", b.train, optional=False)
    if "eval" in run:
        b.section("eval", b.evaluate, optional=False)
    # the sections behind targets first (packed trials: MFU; processes: concurrent trials), extras after
    if "packed" in run:
        b.section("packed", b.packed, needs=30)
    if "concurrency" in run:
        b.section("concurrency", b.concurrency, needs=(args.trial_seconds + 60) * len(args.trials))
    if "ablations" in run:
        for name in args.ablations:  # compiling takes minutes: it runs only with 150 s of the budget left
            needs = 150 if name == "compile" and args.device == "cuda" else 20
            b.section(f"ablation {name}", lambda name=name: b.ablation(name), needs=needs)
    b.section("matmul peak, again", b.peak_again, optional=False)
    b.section("conclude", b.conclude, optional=False)
    b.res["meta"]["seconds"] = time.perf_counter() - b.t_start
    b.save()
    md = render_markdown(b.res)
    print("\n" + md)
    if args.md:
        update_markdown(args.md, f"{args.device}-{args.model_shape}", md)
    return 1 if b.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
