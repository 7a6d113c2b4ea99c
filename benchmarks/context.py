"""What every benchmark section shares: the run's settings, the model and data, the results, and the helpers that
time ptray's training step and summarise windows the same way for every section.

A section is a function ``section(ctx)`` that measures one thing and writes it under its key of ``ctx.res``
(``training.train`` -> ``"train"``, ``evaluation.evaluate`` -> ``"eval"``, ...). ``bench.py`` runs the sections in
order; ``markdown.py`` renders ``ctx.res``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import variants as V
from benchmarks.measure import Shape, matmul_peak, median
from benchmarks.models import build_model
from ptray.data.batching import encode_all
from ptray.data.superglue import load_split
from ptray.data.tasks import get_task
from ptray.lm.prompt import init_prompt
from ptray.lm.tiny_model import build_tokenizer


class Context:
    """One benchmark run on one device: ``args`` (``bench.parse_args``), the model and the encoded data once
    ``setup`` has run, the matmul peak once ``peak`` has run, and ``res``, the results written to ``--out``."""

    def __init__(self, args, script: str = "benchmarks/bench.py"):
        self.a = args
        self.t_start = time.perf_counter()
        self.dev = args.device
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.res = {"meta": run_meta(args, script), "errors": {}}

    # -- running sections
    def over_budget(self, needs: float = 0.0) -> bool:
        """Would a section that needs ``needs`` seconds end past ``--time-budget``?"""
        budget = getattr(self.a, "time_budget", None)
        return budget is not None and time.perf_counter() - self.t_start + needs > budget

    def section(self, name, fn, optional=True, needs=0.0):
        """Run one section, ``fn(self)``; a failure is recorded and the run goes on (a GPU run cannot be repeated
        cheaply). An optional section that would end past the time budget is skipped. The results are saved after
        each section, so a crash loses nothing measured before it."""
        if optional and self.over_budget(needs):
            self.res.setdefault("skipped", []).append(name)
            log(f"[{name}] skipped: time budget of {self.a.time_budget:.0f} s spent")
            return
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        try:
            fn(self)
        except Exception as err:  # noqa: BLE001 - reported in the results and on stderr
            self.res["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")
        if self.dev == "cuda":
            torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        """Write the results so far to ``--out`` (if given)."""
        if self.a.out:
            write_json(self.a.out, self.res)

    # -- setup
    def setup(self):
        """Build the model, encode each task's train and validation sets, and make each task's TEXT-init prompt."""
        a = self.a
        self.tok = load_tokenizer(getattr(a, "tokenizer", None))
        self.model, _ = build_model(a.model_shape, self.dev, self.dtype, tokenizer=self.tok)
        max_length = getattr(a, "max_length", 512)
        self.shape = Shape.of(self.model)
        self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id
        self.tok_dir = tempfile.mkdtemp(prefix="ptray-bench-tok-")
        self.tok.save_pretrained(self.tok_dir)  # PEFT's TEXT init loads a tokenizer by path
        self.data, self.val, self.init, self.epoch_tokens = {}, {}, {}, {}
        emb = self.model.get_input_embeddings().weight
        for name in a.tasks:
            task = get_task(name)
            self.data[name] = encode_all(task, load_split(task, "train", a.data_dir, limit=a.max_train_examples),
                                         self.tok, max_length)
            self.val[name] = encode_all(task, load_split(task, "val", a.data_dir, limit=a.max_eval_examples),
                                        self.tok, max_length)
            self.init[name] = init_prompt(emb, self.tok, "text", task.init_text)
            self.epoch_tokens[name] = sum(len(d.source) + len(d.answers[d.label]) for d in self.data[name])
        cfg = self.model.config
        self.res["setup"] = {
            "model": {"hidden": cfg.hidden_size, "layers": cfg.n_layer, "heads": cfg.n_head, "vocab": cfg.vocab_size,
                      "params": sum(p.numel() for p in self.model.parameters()),
                      "block_linear_params": self.shape.n_lin},
            "tasks": {t: {"train_examples": len(self.data[t]), "val_examples": len(self.val[t]),
                          "prompt_tokens": int(self.init[t].shape[0]), "epoch_tokens": self.epoch_tokens[t],
                          "mean_length": self.epoch_tokens[t] / len(self.data[t])} for t in a.tasks},
            "tokenizer": {"path": getattr(a, "tokenizer", None), "size": len(self.tok), "max_length": max_length,
                          "epoch_tokens": sum(self.epoch_tokens.values())},
        }

    # -- the MFU denominator
    def peak(self):
        """Measure the device's dense matmul FLOP/s in bf16 and fp32 (``res["matmul_peak"]``)."""
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
        """The measured matmul peak (FLOP/s) of ``precision`` ("bf16" or "no")."""
        return self.peaks["bf16" if precision == "bf16" else "fp32"]["flops"]

    # -- ptray's training step, timed
    def batches(self, task, grouped=True, seed=0, n=None):
        """``n`` training batches of ``task`` (default: one window) and the seconds collating one took."""
        n = n or self.a.warmup + self.a.steps
        batches, seconds = V.batch_stream(self.data[task], self.a.batch_size, n, seed, self.pad, self.eos, grouped)
        return batches, seconds / n

    def run_ptray(self, task, model=None, precision=None, grouped=True, memory_pass=False, **kw):
        """One timed window of ptray's step on ``task`` (``variants.ptray_train``; ``kw`` go to it);
        ``memory_pass``: instead, a short run that measures peak memory (CPU: under the profiler)."""
        n = self.a.warmup + 1 if memory_pass else None
        batches, collate_s = self.batches(task, grouped, n=n)
        return V.ptray_train(model or self.model, batches, self.init[task], device=self.dev,
                             precision=precision or self.a.precision, warmup=self.a.warmup, shape=self.shape,
                             collate_s=collate_s, memory=True if memory_pass else None, **kw)

    def with_memory(self, runs, memory_pass):
        """CUDA runs carry their peak memory; on CPU a separate short profiled run gives it."""
        return runs + [memory_pass()] if self.dev == "cpu" else runs

    def compare(self, first, second, repeats, second_precision=None):
        """Time two ways of training, window by window: ``first(memory_pass=False)``, then ``second(...)``,
        ``repeats`` times (so drifting load on a shared machine hits both alike), plus each one's memory pass.

        Returns the two ``summarize`` dicts; ``second_precision`` is the second way's, if not the run's.
        """
        one, two = [], []
        for _ in range(repeats):
            one.append(first())
            two.append(second())
        one = self.with_memory(one, lambda: first(memory_pass=True))
        two = self.with_memory(two, lambda: second(memory_pass=True))
        return self.summarize(one), self.summarize(two, second_precision)

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

    def study_weighted(self, per_task, precision=None):
        """Throughput over the study's mix: each task weighted by its tokens per epoch (time adds up, not rates)."""
        w = {t: self.epoch_tokens[t] for t in per_task}
        seconds = sum(w[t] / per_task[t]["tokens_per_s"] for t in w)
        flops = sum(w[t] * per_task[t]["flops_per_token"] for t in w)
        precision = precision or self.a.precision
        return {"tokens_per_s": sum(w.values()) / seconds, "flops_per_token": flops / sum(w.values()),
                "precision": precision, "mfu": flops / seconds / self.peak_flops(precision),
                "peak_mib": max((per_task[t]["peak_mib"] or 0) for t in w) or None}


def load_tokenizer(path: str | None):
    """ptray's offline tokenizer (``path`` None), else the tokenizer saved in folder ``path`` (e.g. a prepared
    SmolLM2's, 49,152-token BPE); without a pad token it pads with EOS, as ptray does."""
    if path is None:
        return build_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def run_meta(a, script: str = "benchmarks/bench.py") -> dict:
    """When, how and on what the run ran: the ``meta`` entry of the results."""
    m = {
        "date": utc_now(),
        "command": f"python {script} " + " ".join(sys.argv[1:]),
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


def write_json(path, obj) -> None:
    """Write ``obj`` to ``path`` as indented JSON, making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")


def utc_now() -> str:
    """The time stamp of a results file, e.g. ``2026-11-27 14:05 UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


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
