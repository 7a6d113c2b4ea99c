"""Issue 11 on one GPU: fused ALiBi attention, trial groups, and the paper study end to end, in one capped run.

    python benchmarks/gpu_study.py --data-dir DIR --out gpu_study.json --md BENCHMARKS.md   # GPU, ~8 minutes
    python benchmarks/gpu_study.py --smoke --data-dir DIR --out /tmp/s.json                  # CPU, tiny model, ~1 min
    python benchmarks/gpu_study.py --render gpu_study.json --md BENCHMARKS.md                # the section from a JSON

Needs torch, transformers, accelerate, peft and ptray only (no Ray, MLflow or ``datasets``). Builds a random model
with bloomz-560m's exact config (``--smoke``: ptray's tiny BLOOM) and measures, in this order:

1. ``peak``: the dense matmul FLOP/s of the device in the run's dtype (the MFU denominator); the spec peak is
   989 TFLOP/s dense bf16 for H100/H200 SXM (none assumed for other devices).
2. ``attention``: forward + backward to a soft prompt (``ptray.lm.forward.answer_logprobs``) through Hugging Face's
   eager
   BLOOM attention and through ``ptray.attention``'s two fused paths (the ALiBi + mask bias; ALiBi folded into Q
   and K with a causal-only call), at several batch x length shapes (right padding, lengths drawn from [L/2, L]);
   tokens/s, MFU, and the largest difference of the answer log-probs from eager. Then which SDPA kernels
   (efficient, cuDNN, flash, math) run each fused path.
3. ``group``: the training step of one trial (batch 8, eager as ``ptray.train`` runs today, and both fused paths)
   against trial groups of K = 4, 8, 16 prompts, and of 16 in token-sized forward passes (the study's tasks and
   seeds, real batches from ``train_batches``, ``ptray.lm.forward.group_answer_logprobs`` + one Adam per prompt):
   tokens/s, MFU and peak memory.
4. ``study``: the paper study run by ``ptray.training.loop.train_group``: 16 prompts (CB, RTE, COPA, WSC x seeds 0-3),
   up to 50 epochs with a validation pass each, early stopping (patience 5), in one group, with the fused
   attention mode that ran the group of 16 faster and ``--max-tokens-per-forward``; then the 68 transfer
   evaluations (16 prompts x 4 tasks + no prompt on each task). Wall time measured under ``--study-seconds``; when
   the cap stops it, the epochs each prompt ran are reported (and the evaluations run on the best prompts so far).

Between 3 and 4, the old benchmark's two comparisons, called from ``benchmarks/training.py`` and
``benchmarks/evaluation.py`` (not copied) on this run's model, data and precision, each started only when its
budget (``PEFT_SECONDS``, ``EVAL_SECONDS``) fits under the cap, else skipped with the reason recorded:

* ``peft``: ptray's one-trial step against PEFT ``PromptTuningConfig`` + ``transformers.Trainer`` (batch 8,
  eager attention on both sides, one window each per task and the study's token mix); the ratio of every group
  step of section 3 to PEFT + Trainer's study-mix tokens/s. (Several PEFT processes at once: not measured.)
* ``eval``: ptray's one-pass evaluation against batched greedy ``generate`` (and the old bench's other methods)
  on each task's validation set with its TEXT-init prompt, the study's evaluation batch; the exact match of every
  method must agree example by example.

Tokens are real text tokens (no padding, no prompt rows); model FLOPs and MFU follow ``benchmarks/measure.py``
(training FLOPs per sequence: 4 N_lin T + 12 l h T^2 + 4 h V A with T = prompt + text positions, A answer targets).
The whole run stops starting new measurements once ``--total-seconds`` is near. Writes ``--out`` (JSON) and, with
``--md``, the ``gpu-study`` section of that markdown file.

On the GPU machine the SuperGLUE folder must travel with the working tree: copy it into a folder that
``.git/info/exclude`` ignores (e.g. ``.gpu_data/superglue``), name that folder in the device tool's ``carry``, run
``PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python benchmarks/gpu_study.py --data-dir .gpu_data/superglue --out
$OUT/gpu_study.json 2>&1 | tee $OUT/log`` (about 8 minutes with the default caps), then render the JSON here with
``--render``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import PeakMemory, Shape, matmul_peak, sync  # noqa: E402
from benchmarks.models import build_model  # noqa: E402
from ptray.config import TrainConfig  # noqa: E402
from ptray.data.batching import collate, encode_all, train_batches  # noqa: E402
from ptray.data.superglue import load_split  # noqa: E402
from ptray.data.tasks import get_task  # noqa: E402
from ptray.lm.attention import use_fused_attention  # noqa: E402
from ptray.lm.evaluate import evaluate_prompts  # noqa: E402
from ptray.lm.forward import answer_logprobs, group_answer_logprobs  # noqa: E402
from ptray.lm.prompt import init_prompt  # noqa: E402
from ptray.training.loop import train_group  # noqa: E402

TASKS = ("cb", "rte", "copa", "wsc")
SEEDS = (0, 1, 2, 3)
SPEC_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 TFLOP/s of the SXM parts (NVIDIA's data sheets)
ATTENTION_SHAPES = [(8, 256), (32, 256), (128, 256), (64, 512)]
SMOKE_ATTENTION_SHAPES = [(4, 32), (8, 64)]
ATTENTION_MODES = ("eager", "fused", "folded")  # see set_attention
GROUP_SIZES = (4, 8, 16)
SMOKE_GROUP_SIZES = (2, 4)
MAX_LENGTH = 512  # tokens of source + answer (ptray's default)
SMOKE_MAX_LENGTH = 96  # the tiny model on CPU: attention over 400-token rows would dominate the smoke run
# seconds each old-benchmark comparison is given; it starts only when this much (and the study's 60 s) is left
PEFT_SECONDS = 60.0
EVAL_SECONDS = 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, small study: checks that it runs")
    p.add_argument("--render", metavar="JSON", help="only write --md's section from this results file, then exit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default=os.environ.get("PTRAY_DATA_DIR", str(ROOT.parent / "shared" / "data" /
                                                                           "superglue")))
    p.add_argument("--out", default="gpu_study.json", help="results JSON")
    p.add_argument("--md", default=None, help="markdown file whose gpu-study section is replaced (e.g. BENCHMARKS.md)")
    p.add_argument("--total-seconds", type=float, default=None, help="whole-run cap (default 480; smoke 240)")
    p.add_argument("--study-seconds", type=float, default=None, help="study training cap (default 240; smoke 120)")
    p.add_argument("--max-tokens-per-forward", type=int, default=None,
                   help="padded tokens per forward pass of a group step in the study, rows by length, widths in "
                        "multiples of 32 (0: one pass per step; default 16384, smoke 256)")
    p.add_argument("--section-seconds", type=float, default=None, help="timing window per measurement (default 4)")
    a = p.parse_args(argv)
    if a.render:
        if not a.md or not Path(a.render).is_file():
            p.error("--render needs an existing results JSON and --md (the markdown file to update)")
        return a
    if not Path(a.data_dir, "CB", "train.jsonl").is_file():
        p.error(f"--data-dir {a.data_dir!r} holds no CB/train.jsonl; pass the SuperGLUE jsonl folder")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible; use --device cpu (with --smoke)")
    if a.device == "cpu" and not a.smoke:
        p.error("a bloomz-560m-shaped run on CPU takes hours; pass --smoke on CPU")
    if a.max_tokens_per_forward is None:
        a.max_tokens_per_forward = 256 if a.smoke else 16384
    if a.max_tokens_per_forward < 0:
        p.error(f"--max-tokens-per-forward must be at least 0 (0: one pass per step), got {a.max_tokens_per_forward}")
    a.total_seconds = a.total_seconds or (240.0 if a.smoke else 480.0)
    a.study_seconds = a.study_seconds or (120.0 if a.smoke else 240.0)
    a.section_seconds = a.section_seconds or (0.3 if a.smoke else 4.0)
    return a


def error_line(err: Exception) -> str:
    """An exception as one short line for the results."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def log(msg: str) -> None:
    print(f"[gpu_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    """The run's model, data, clock and results."""

    def __init__(self, a):
        self.a = a
        self.t0 = time.perf_counter()
        self.dev = a.device
        self.dtype = torch.bfloat16 if self.dev == "cuda" else torch.float32
        self.res = {"meta": meta(a), "errors": {}}

    def left(self) -> float:
        return self.a.total_seconds - (time.perf_counter() - self.t0)

    def autocast(self):
        if self.dev == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mfu(self, flops_per_s: float) -> dict:
        spec = spec_peak(self.res["meta"]["device_name"])
        return {"tflops": flops_per_s / 1e12, "mfu_measured_peak": flops_per_s / self.peak,
                "mfu_spec_peak": flops_per_s / spec if spec and self.dev == "cuda" else None}

    def setup(self):
        self.model, self.tok = build_model("tiny" if self.a.smoke else "bloomz-560m", self.dev, self.dtype)
        self.shape = Shape.of(self.model)
        self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id
        limit_train, limit_val = (16, 8) if self.a.smoke else (None, None)
        self.max_length = SMOKE_MAX_LENGTH if self.a.smoke else MAX_LENGTH
        self.train_data, self.val_data = {}, {}
        for name in TASKS:
            task = get_task(name)
            self.train_data[name] = encode_all(task, load_split(task, "train", self.a.data_dir, limit=limit_train),
                                               self.tok, self.max_length)
            self.val_data[name] = encode_all(task, load_split(task, "val", self.a.data_dir, limit=limit_val),
                                             self.tok, self.max_length)
        emb = self.model.get_input_embeddings().weight
        self.init = {t: init_prompt(emb, self.tok, "text", get_task(t).init_text) for t in TASKS}
        self.res["model"] = {"shape": "tiny" if self.a.smoke else "bloomz-560m", "n_lin": self.shape.n_lin,
                             "layers": self.shape.n_layer, "hidden": self.shape.hidden, "vocab": self.shape.vocab,
                             "train_flops_per_token_at_T256": self.shape.train_flops(256, 0) / 256}


def spec_peak(device_name: str) -> float | None:
    """The dense bf16 spec FLOP/s of an H100/H200 SXM (PCIe and NVL parts are slower: none assumed)."""
    if any(part in device_name for part in ("PCIe", "NVL")):
        return None
    return next((v for k, v in SPEC_PEAK.items() if k in device_name), None)


def meta(a) -> dict:
    import transformers

    dev = "cpu"
    if a.device == "cuda":
        dev = torch.cuda.get_device_name(0)
    return {"device": a.device, "device_name": dev, "torch": torch.__version__,
            "transformers": transformers.__version__, "smoke": a.smoke,
            "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def batch_flops(shape: Shape, batch, n_prompt: int) -> tuple[int, float]:
    """(real tokens, training model FLOPs) of one batch with an ``n_prompt``-row prompt."""
    lengths = batch.attention_mask.sum(1).tolist()
    answers = torch.bincount(batch.ans_seq, minlength=len(lengths)).tolist()
    return int(sum(lengths)), float(sum(shape.train_flops(n_prompt + t, a) for t, a in zip(lengths, answers)))


def timed_steps(run: Run, step, seconds: float, warmup: int = 2, max_steps: int = 10_000) -> tuple[int, float]:
    """Run ``step()`` ``warmup`` times, then as many times as fit in ``seconds``; returns (timed steps, seconds)."""
    for _ in range(warmup):
        step()
    sync(run.dev)
    t0 = time.perf_counter()
    n = 0
    while n < max_steps:
        step()
        n += 1
        if n % 4 == 0 or run.dev != "cuda":
            sync(run.dev)
            if time.perf_counter() - t0 >= seconds:
                break
    sync(run.dev)
    return n, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ attention


def random_batch(run: Run, rows: int, length: int, seed: int):
    """Right-padded random sequences of [length/2, length] tokens, each ending with a 2-token answer."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(rows):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=gen))
        ids = torch.randint(4, len(run.tok), (n,), generator=gen).tolist()
        seqs.append((ids[:-2], ids[-2:]))
    return collate(seqs, run.pad, run.eos)


def set_attention(run: Run, mode: str) -> None:
    """eager: Hugging Face's BLOOM attention; fused: one SDPA call with the ALiBi + mask bias; folded: ALiBi in two
    extra Q/K dimensions and a causal-only SDPA call where the rows are right-padded (``ptray.attention``)."""
    use_fused_attention(run.model, enabled=False)
    if mode != "eager":
        use_fused_attention(run.model, fold_alibi=mode == "folded")


def prompt_step(run: Run, batch, prompt, kernel=None):
    """One forward + backward to ``prompt`` on ``batch`` (``kernel``: an SDPA backend to force)."""

    def step():
        with sdpa_kernel_or_any(kernel), run.autocast():
            lp = answer_logprobs(run.model, batch, prompt)[0]
        (-lp.mean()).backward()
        prompt.grad = None

    return step


def sdpa_kernel_or_any(kernel):
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([kernel])


def attention(run: Run) -> None:
    shapes = SMOKE_ATTENTION_SHAPES if run.a.smoke else ATTENTION_SHAPES
    n_prompt = 8
    out = []
    for rows, length in shapes:
        if run.left() < 60:
            break
        batch = random_batch(run, rows, length, seed=rows + length).to(run.dev)
        tokens, flops = batch_flops(run.shape, batch, n_prompt)
        prompt = torch.nn.Parameter(run.init["cb"][:1].repeat(n_prompt, 1).to(run.dev))
        entry = {"rows": rows, "length": length, "tokens_per_step": tokens, "train_flops_per_step": flops}
        logps = {}
        step = prompt_step(run, batch, prompt)
        for mode in ATTENTION_MODES:
            set_attention(run, mode)
            try:
                with torch.no_grad(), run.autocast():
                    logps[mode] = answer_logprobs(run.model, batch, prompt)[0].float()
                with PeakMemory(run.dev) as mem:
                    n, s = timed_steps(run, step, run.a.section_seconds)
                entry[mode] = {"steps": n, "seconds": s, "tokens_per_s": tokens * n / s, **run.mfu(flops * n / s),
                               "peak_mib": mem.peak / 2**20 if mem.peak is not None else None}
            except Exception as err:  # out of memory, or a kernel that refuses: recorded, the other modes go on
                entry[mode] = {"error": error_line(err)}
            finally:
                if run.dev == "cuda":
                    torch.cuda.empty_cache()
        set_attention(run, "eager")
        for mode in ATTENTION_MODES[1:]:
            if "eager" in logps and mode in logps:
                entry[f"{mode}_max_abs_logprob_diff"] = float((logps["eager"] - logps[mode]).abs().max())
            if "tokens_per_s" in entry.get("eager", {}) and "tokens_per_s" in entry.get(mode, {}):
                entry[f"{mode}_speedup"] = entry[mode]["tokens_per_s"] / entry["eager"]["tokens_per_s"]
        log(f"attention {rows}x{length}: " + ", ".join(
            f"{m} {entry[m].get('tokens_per_s', float('nan')):,.0f} tok/s" for m in ATTENTION_MODES))
        out.append(entry)
    run.res["attention"] = out
    run.res["sdpa_kernels"] = sdpa_kernels(run)


def sdpa_kernels(run: Run) -> dict:
    """Which SDPA backends run the fused path (forward + backward) here, and how fast, on one mid-size shape."""
    from torch.nn.attention import SDPBackend

    rows, length = (8, 64) if run.a.smoke else (32, 256)
    batch = random_batch(run, rows, length, seed=7).to(run.dev)
    tokens, _ = batch_flops(run.shape, batch, 8)
    prompt = torch.nn.Parameter(run.init["cb"][:1].repeat(8, 1).to(run.dev))
    out = {}
    for mode in ATTENTION_MODES[1:]:
        set_attention(run, mode)
        for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                n, s = timed_steps(run, prompt_step(run, batch, prompt, backend), min(1.0, run.a.section_seconds),
                                   warmup=1)
                out[f"{mode} {name}"] = {"ok": True, "tokens_per_s": tokens * n / s}
            except Exception as err:  # a backend that refuses the bias, the shape or the device says why
                out[f"{mode} {name}"] = {"ok": False, "error": error_line(err)}
    set_attention(run, "eager")
    log(f"sdpa kernels that run: {', '.join(k for k, v in out.items() if v['ok'])}")
    return out


# ----------------------------------------------------------------------------------------------- group step


def study_streams(run: Run, k: int):
    """The first ``k`` study prompts (task-major over seeds, so K=4 mixes the four tasks): each its epoch-1 batches
    (``train_batches``, batch 8, its seed) and its TEXT-init prompt."""
    members = [(t, s) for s in SEEDS for t in TASKS][:k]
    return [(train_batches(run.train_data[t], 8, s, 1, run.pad, run.eos), run.init[t]) for t, s in members]


def group_step(run: Run, batches: list[list], prompts: list[torch.nn.Parameter], state: dict, max_tokens: int = 0):
    """One training step of a group: the next batch of every prompt in one forward, the sum of each prompt's mean
    loss backward, one Adam step per prompt (its own parameter group). Counts tokens and FLOPs into ``state``."""
    opt = torch.optim.Adam([{"params": [p], "lr": 3e-2} for p in prompts])
    counts = [[batch_flops(run.shape, b, p.shape[0]) for b in bs] for bs, p in zip(batches, prompts)]

    def step():
        i = state["i"]
        parts = [(bs[i % len(bs)], p) for bs, p in zip(batches, prompts)]
        with run.autocast():
            logps = group_answer_logprobs(run.model, parts, max_tokens)
        torch.stack([-lp.mean() for lp in logps]).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for c in counts:
            state["tokens"] += c[i % len(c)][0]
            state["flops"] += c[i % len(c)][1]
        state["i"] += 1

    return step


def group_step_bench(run: Run) -> None:
    out = []
    sizes = SMOKE_GROUP_SIZES if run.a.smoke else GROUP_SIZES
    budget = run.a.max_tokens_per_forward or (256 if run.a.smoke else 16384)
    big = sizes[-1]
    plan = [(1, "eager", 0), (1, "fused", 0), (1, "folded", 0), *[(k, "fused", 0) for k in sizes],
            (big, "folded", 0), (big, "fused", budget), (big, "folded", budget)]
    for k, attention_mode, max_tokens in plan:
        if run.left() < 45:
            break
        label = (f"{'one trial' if k == 1 else f'group of {k}'}, {attention_mode}"
                 f"{f', {max_tokens} tokens per forward' if max_tokens else ''}")
        set_attention(run, attention_mode)
        streams = study_streams(run, k)
        # a copy: on CPU `.to` would share run.init's storage and Adam would train the init prompts in place
        prompts = [torch.nn.Parameter(p.detach().clone().to(run.dev)) for _, p in streams]
        batches = [[b.to(run.dev) for b in bs] for bs, _ in streams]
        state = {"i": 0, "tokens": 0, "flops": 0.0}
        step = group_step(run, batches, prompts, state, max_tokens)
        try:
            with PeakMemory(run.dev) as mem:
                for _ in range(2):  # warm-up, not counted
                    step()
                state.update(tokens=0, flops=0.0)
                n, s = timed_steps(run, step, run.a.section_seconds, warmup=0)
            entry = {"mode": label, "prompts": k, "attention": attention_mode, "max_tokens": max_tokens,
                     "rows_per_step": 8 * k, "steps": n, "seconds": s,
                     "tokens_per_s": state["tokens"] / s, **run.mfu(state["flops"] / s),
                     "peak_mib": mem.peak / 2**20 if mem.peak is not None else None}
        except Exception as err:  # out of memory, or a kernel that refuses: recorded, the other modes go on
            entry = {"mode": label, "prompts": k, "attention": attention_mode, "max_tokens": max_tokens,
                     "error": error_line(err)}
        finally:
            if run.dev == "cuda":
                torch.cuda.empty_cache()
        log(f"group step {label}: {entry.get('tokens_per_s', float('nan')):,.0f} tok/s")
        out.append(entry)
    set_attention(run, "eager")
    base = next((e["tokens_per_s"] for e in out if e["mode"] == "one trial, eager" and "tokens_per_s" in e), None)
    for e in out:
        if base and "tokens_per_s" in e:
            e["vs_one_trial_eager"] = e["tokens_per_s"] / base
    run.res["group"] = out


# ------------------------------------------------------------------------- the old benchmark's comparisons


def bench_context(run: Run):
    """A ``benchmarks.context.Context`` on this run's model, data, init prompts, precision and matmul peak, so that
    ``benchmarks/training.py`` and ``evaluation.py`` measure here what they measure in ``bench.py``."""
    from benchmarks.context import Context

    precision = "bf16" if run.dev == "cuda" else "no"
    a = argparse.Namespace(
        device=run.dev, model_shape=run.res["model"]["shape"], precision=precision, tasks=list(TASKS),
        batch_size=8, eval_batch_size=8 if run.a.smoke else 256, warmup=1 if run.a.smoke else 3,
        steps=1 if run.a.smoke else 10, repeats=1, ablation_repeats=1, smoke=run.a.smoke)
    ctx = Context(a)
    ctx.model, ctx.tok, ctx.shape, ctx.pad, ctx.eos = run.model, run.tok, run.shape, run.pad, run.eos
    ctx.data, ctx.val, ctx.init = run.train_data, run.val_data, run.init
    ctx.epoch_tokens = {t: sum(len(d.source) + len(d.answers[d.label]) for d in ctx.data[t]) for t in TASKS}
    ctx.peaks = {"bf16" if precision == "bf16" else "fp32": {"flops": run.peak}}
    return ctx


def old_bench(run: Run, key: str, budget: float, fn) -> None:
    """Run ``fn(ctx)`` (a ``bench.py`` section) into ``run.res[key]`` when ``budget`` seconds and the study's
    minute are left; else record why it was skipped."""
    if run.left() < budget + 60:
        run.res[key] = {"skipped": f"{run.left():.0f} s left under --total-seconds, {budget + 60:.0f} s needed"}
        log(f"{key}: skipped ({run.res[key]['skipped']})")
        return
    set_attention(run, "eager")  # PEFT + Trainer and generate run Hugging Face's BLOOM as it comes
    ctx = bench_context(run)
    with tempfile.TemporaryDirectory() as tok_dir:
        ctx.tok_dir = tok_dir
        run.tok.save_pretrained(tok_dir)  # PEFT's TEXT init loads a tokenizer by path
        t = time.perf_counter()
        fn(ctx)
    run.res[key] = {**ctx.res[{"peft": "train", "eval": "eval"}[key]], "seconds": time.perf_counter() - t,
                    "budget_seconds": budget}


def peft_bench(run: Run) -> None:
    from benchmarks.training import train

    old_bench(run, "peft", PEFT_SECONDS, train)
    spec = spec_peak(run.res["meta"]["device_name"]) if run.dev == "cuda" else None
    for side in run.res["peft"].get("study", {}).values():  # the MFU against the spec peak too
        if isinstance(side, dict):
            side["mfu_spec_peak"] = side["tokens_per_s"] * side["flops_per_token"] / spec if spec else None
    ref = run.res["peft"].get("study", {}).get("reference", {}).get("tokens_per_s")
    for e in run.res.get("group", []):
        if ref and "tokens_per_s" in e:
            e["vs_peft_trainer"] = e["tokens_per_s"] / ref
    if ref:
        log(f"peft: ptray one trial x{run.res['peft']['study']['ratio']:.2f} PEFT + Trainer (study mix)")


def eval_bench(run: Run) -> None:
    from benchmarks.evaluation import evaluate

    old_bench(run, "eval", EVAL_SECONDS, evaluate)


# ---------------------------------------------------------------------------------------------------- study


def study_attention(run: Run) -> str:
    """The fused attention mode that ran the largest group faster in the group section ("fused" if unmeasured)."""
    speed = {e["attention"]: e["tokens_per_s"] for e in run.res.get("group", [])
             if e["prompts"] == max(GROUP_SIZES) and not e["max_tokens"] and "tokens_per_s" in e}
    return "folded" if speed.get("folded", 0) > speed.get("fused", float("inf")) else "fused"


class _Cap(Exception):
    pass


def study(run: Run) -> None:
    a = run.a
    precision = "bf16" if run.dev == "cuda" else "no"
    eval_batch = 8 if a.smoke else 256  # sequences per evaluation step: the GPU wants many (same numbers)
    cfgs = [TrainConfig(task=t, seed=s, model="random-" + run.res["model"]["shape"], data_dir=a.data_dir,
                        device=run.dev, precision=precision, eval_batch_size=eval_batch, baselines=False,
                        max_length=run.max_length, max_tokens_per_forward=a.max_tokens_per_forward,
                        max_epochs=2 if a.smoke else 50, max_train_examples=16 if a.smoke else None,
                        max_eval_examples=8 if a.smoke else None)
            for t in TASKS for s in SEEDS]
    cap = min(a.study_seconds, max(0.0, run.left() - (20 if a.smoke else 60)))
    epochs: dict[int, int] = {}
    best: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()

    timeline = []  # (seconds since the start, prompt, epoch, eval loss): how the group progressed

    def on_epoch_end(i, metrics, state):
        timeline.append((round(time.perf_counter() - t0, 2), i, metrics["epoch"], metrics["eval_loss"]))
        epochs[i] = metrics["epoch"]
        best[i] = state["best"]["prompt"]
        if time.perf_counter() - t0 > cap:
            raise _Cap

    if run.dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    finished = True
    results = None
    fold = study_attention(run) == "folded"
    try:
        results = train_group(cfgs, on_epoch_end=on_epoch_end, fused_attention=run.dev == "cuda",
                              model_and_tokenizer=(run.model, run.tok), fold_alibi=fold)
    except _Cap:
        finished = False
    sync(run.dev)
    train_s = time.perf_counter() - t0
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if run.dev == "cuda" else None
    prompts = [r.prompt for r in results] if results else [best.get(i) for i in range(len(cfgs))]
    log(f"study training: {'finished' if finished else 'stopped by the cap'} after {train_s:.0f} s; "
        f"epochs per prompt {[epochs.get(i, 0) for i in range(len(cfgs))]}")

    # the 68 transfer evaluations: every prompt on every task's validation set, and no prompt on each task
    set_attention(run, ("folded" if fold else "fused") if run.dev == "cuda" else "eager")
    t1 = time.perf_counter()
    done = 0
    # a prompt the cap stopped before its first epoch has nothing to evaluate: it is left out (and counted).
    # Per target, no prompt and every prompt are scored together (evaluate_prompts: many prompts per pass, as the
    # study's transfer grid does).
    jobs = [None] + [p for p in prompts if p is not None]
    for t in TASKS:
        if run.left() < 10:
            break
        with run.autocast():
            evaluate_prompts(run.model, run.val_data[t], jobs, eval_batch, run.pad, run.eos, device=run.dev)
        done += len(jobs)
    sync(run.dev)
    eval_s = time.perf_counter() - t1
    set_attention(run, "eager")
    run.res["study"] = {
        "prompts": len(cfgs), "finished": finished, "cap_seconds": cap, "train_seconds": train_s,
        "epochs_run": [epochs.get(i, 0) for i in range(len(cfgs))],
        "stopped_early": [r.metrics["stopped_early"] for r in results] if results else None,
        "evaluations": done, "evaluations_planned": len(TASKS) * (len(cfgs) + 1), "eval_seconds": eval_s,
        "wall_seconds": train_s + eval_s, "train_peak_gib": train_peak, "eval_batch_size": eval_batch,
        "max_tokens_per_forward": a.max_tokens_per_forward,
        "attention": ("folded" if fold else "fused") if run.dev == "cuda" else "eager",
        "timeline": timeline,
        "tasks": list(TASKS), "seeds": list(SEEDS),
    }
    log(f"study evaluations: {done}/{len(jobs) * len(TASKS)} in {eval_s:.0f} s")


# ------------------------------------------------------------------------------------------------ reporting


def render(res: dict) -> str:
    m = res["meta"]
    lines = [f"Measured {m['utc']} on {m['device_name']} (torch {m['torch']}, transformers {m['transformers']})"
             f"{' - SMOKE run, tiny model: not a timing' if m['smoke'] else ''}, `python benchmarks/gpu_study.py`.",
             ""]
    if "peak" in res:
        spec = spec_peak(m["device_name"])
        lines += [f"Matmul peak measured: {res['peak'] / 1e12:.1f} TFLOP/s"
                  f"{f'; spec {spec / 1e12:.0f} TFLOP/s' if spec else ''}. Training FLOPs per token (T=256): "
                  f"{res['model']['train_flops_per_token_at_T256'] / 1e9:.2f} GFLOP.", ""]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    if res.get("attention"):
        lines += ["Forward + backward to an 8-row prompt (fused: SDPA with the ALiBi + mask bias; folded: ALiBi in "
                  "two extra Q/K dimensions, causal-only SDPA):", "",
                  "| rows x length | attention | tok/s | vs eager | MFU (measured / spec) | peak MiB | "
                  "max logprob diff vs eager |", "|---|---|---|---|---|---|---|"]
        for e in res["attention"]:
            for mode in ("eager", "fused", "folded"):
                r = e.get(mode)
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {e['rows']}x{e['length']} | {mode} | {r['error']} | | | | |")
                    continue
                diff = e.get(f"{mode}_max_abs_logprob_diff")
                lines.append(f"| {e['rows']}x{e['length']} | {mode} | {r['tokens_per_s']:,.0f} | "
                             f"{e.get(f'{mode}_speedup', 1.0):.2f}x | {pct(r['mfu_measured_peak'])} / "
                             f"{pct(r['mfu_spec_peak'])} | {r['peak_mib'] or 0:.0f} | "
                             f"{'-' if diff is None else f'{diff:.2e}'} |")
        kernels = res.get("sdpa_kernels", {})
        ok = [k for k, v in kernels.items() if v["ok"]]
        lines += ["", f"SDPA kernels that run forward + backward: {', '.join(ok) or 'none'}; refused: "
                  f"{', '.join(k for k in kernels if k not in ok) or 'none'}.", ""]
    if res.get("group"):
        lines += ["| training step | rows/step | tok/s | vs one trial (eager) | vs PEFT + Trainer | "
                  "MFU (measured / spec) | peak MiB |", "|---|---|---|---|---|---|---|"]
        for e in res["group"]:
            if "error" in e:
                lines.append(f"| {e['mode']} | - | {e['error']} | | | | |")
                continue
            peft = f"{e['vs_peft_trainer']:.2f}x" if "vs_peft_trainer" in e else "-"
            lines.append(f"| {e['mode']} | {e['rows_per_step']} | {e['tokens_per_s']:,.0f} | "
                         f"{e.get('vs_one_trial_eager', float('nan')):.2f}x | {peft} | {pct(e['mfu_measured_peak'])} / "
                         f"{pct(e['mfu_spec_peak'])} | {e['peak_mib'] or 0:.0f} |")
        lines.append("")
    p = res.get("peft")
    if p and "skipped" in p:
        lines += [f"PEFT + Trainer comparison skipped: {p['skipped']}.", ""]
    elif p:
        ref = p["study"]["reference"]
        lines += [f"PEFT `PromptTuningConfig` + `Trainer` (batch 8, eager attention, study mix): "
                  f"{ref['tokens_per_s']:,.0f} tok/s, MFU {pct(ref['mfu'])} measured / "
                  f"{pct(ref.get('mfu_spec_peak'))} spec; ptray one trial "
                  f"{p['study']['ptray']['tokens_per_s']:,.0f} tok/s, **{p['study']['ratio']:.2f}x** (per task: "
                  + ", ".join(f"{t.upper()} {p[t]['ratio']:.2f}x" for t in TASKS if t in p) + ")."]
        groups = [e for e in res.get("group", []) if "vs_peft_trainer" in e and e["prompts"] > 1]
        if groups:
            best = max(groups, key=lambda e: e["vs_peft_trainer"])
            lines += [f"Fastest trial group vs PEFT + Trainer (one trial): {best['mode']}, "
                      f"**{best['vs_peft_trainer']:.2f}x**."]
        lines += ["Several PEFT processes at once: not measured by this script.", ""]
    ev = res.get("eval")
    if ev and "skipped" in ev:
        lines += [f"Evaluation vs `generate` skipped: {ev['skipped']}.", ""]
    elif ev:
        spec = spec_peak(m["device_name"]) if m["device"] == "cuda" else None
        lines += ["| evaluation (validation set, TEXT-init prompt) | ptray ex/s | `generate` ex/s | ptray / generate | "
                  "ptray MFU (measured / spec) | exact match agrees |", "|---|---|---|---|---|---|"]
        for t in TASKS:
            if t in ev:
                e = ev[t]
                mfu_spec = e["ptray"]["mfu"] * res["peak"] / spec if spec and "peak" in res else None
                lines.append(f"| {t.upper()} ({e['examples']}) | {e['ptray']['examples_per_s']:,.1f} | "
                             f"{e['generate']['examples_per_s']:,.1f} | {e['speedup']:.2f}x | {pct(e['ptray']['mfu'])} "
                             f"/ {pct(mfu_spec)} | {e['em_agree']:.0%} |")
        lines += [f"| all | | | **{ev['all']['speedup']:.2f}x** | | |", ""]
    s = res.get("study")
    if s:
        peak = "-" if s["train_peak_gib"] is None else f"{s['train_peak_gib']:.1f} GiB"
        lines += [f"Paper study by `ptray.training.loop.train_group` ({s['prompts']} prompts in one group, "
                  f"{s['attention']} "
                  "attention, "
                  + (f"{s['max_tokens_per_forward']} padded tokens per forward pass" if "max_tokens_per_forward" in s
                     else f"{s['chunks']} length chunks per step") + "): "
                  f"training {'finished' if s['finished'] else 'STOPPED by the cap'} in {s['train_seconds']:.0f} s "
                  f"(cap {s['cap_seconds']:.0f} s; epochs per prompt {s['epochs_run']}), then "
                  f"{s['evaluations']}/{s['evaluations_planned']} evaluations in {s['eval_seconds']:.0f} s; "
                  f"wall {s['wall_seconds']:.0f} s; peak GPU memory {peak}.", ""]
    if res.get("errors"):
        lines += [f"Errors: {', '.join(f'{k}: {v.splitlines()[-1]}' for k, v in res['errors'].items())}", ""]
    return "\n".join(lines) + "\n"


def section(run: Run, name: str, fn) -> None:
    t = time.perf_counter()
    try:
        fn(run)
    except Exception:  # one failing section must not cost the others their numbers
        run.res["errors"][name] = traceback.format_exc()
        log(f"{name} failed:\n{run.res['errors'][name]}")
    run.res.setdefault("section_seconds", {})[name] = time.perf_counter() - t
    save(run)


def save(run: Run) -> None:
    Path(run.a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(run.a.out).write_text(json.dumps(run.res, indent=1, default=str) + "\n")
    if run.a.md:
        write_md(run.a.md, run.res)


def write_md(path: str, res: dict) -> None:
    from benchmarks.markdown import update_markdown

    update_markdown(path, "gpu-study", render(res))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render:
        write_md(a.md, json.loads(Path(a.render).read_text()))
        return 0
    run = Run(a)
    log(f"device {run.res['meta']['device_name']}, caps: total {a.total_seconds:.0f} s, study {a.study_seconds:.0f} s")
    run.setup()
    sizes = (256, 512) if a.smoke else (2048, 4096, 8192)
    run.res["peak"] = run.peak = matmul_peak(run.dev, run.dtype, sizes=sizes, seconds=0.5 if a.smoke else 2.0)["flops"]
    log(f"matmul peak {run.peak / 1e12:.1f} TFLOP/s")
    section(run, "attention", attention)
    section(run, "group", group_step_bench)
    section(run, "peft", peft_bench)
    section(run, "eval", eval_bench)
    section(run, "study", study)
    run.res["wall_seconds"] = time.perf_counter() - run.t0
    save(run)
    log(f"done in {run.res['wall_seconds']:.0f} s; wrote {a.out}")
    return 1 if run.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
