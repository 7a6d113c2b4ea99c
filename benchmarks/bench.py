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

This file is the command line and the order of the sections; each section has its file: ``context.py`` (the
model, data and timing helpers they share), ``training.py`` (2), ``evaluation.py`` (3), ``ablations.py`` (4: the
table of named variants), ``trials.py`` (4's packed trials, and 5), ``targets.py`` and ``study_estimate.py`` (6),
``markdown.py`` (the tables); ``variants.py`` holds the code being compared, ``measure.py`` the timers and FLOPs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.ablations import ABLATIONS, ablation  # noqa: E402
from benchmarks.args import counts_argument, finish_run_args, names_argument, run_parser  # noqa: E402
from benchmarks.context import Context, log  # noqa: E402
from benchmarks.evaluation import evaluate  # noqa: E402
from benchmarks.markdown import render_markdown, update_markdown  # noqa: E402
from benchmarks.models import SHAPES  # noqa: E402
from benchmarks.study_estimate import PAPER_TASKS  # noqa: E402
from benchmarks.targets import conclude  # noqa: E402
from benchmarks.training import train  # noqa: E402
from benchmarks.trials import concurrency, packed  # noqa: E402
from ptray.cli import non_negative_int, positive_float, positive_int  # noqa: E402
from ptray.data.tasks import TASK_NAMES  # noqa: E402

SECTIONS = ("train", "eval", "packed", "concurrency", "ablations")  # --sections: the measurements after the peak


def parse_args(argv=None):
    p = run_parser(__doc__.splitlines()[0], SECTIONS)
    p.add_argument("--model-shape", default=None, choices=list(SHAPES),
                   help="default: bloomz-560m on cuda, small-560m-ratio on cpu, tiny with --smoke")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 on cuda, fp32 ('no') on cpu, as ptray chooses")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--batch-size", type=positive_int, default=8, help="training examples per step (ptray's default)")
    p.add_argument("--eval-batch-size", type=positive_int, default=32, help="sequences per evaluation batch")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps before each timed window")
    p.add_argument("--steps", type=positive_int, default=None, help="timed training steps per window")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="windows per measurement (the median is reported)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"subset of {','.join(ABLATIONS)} or 'none'")
    p.add_argument("--ablation-tasks", default=None, help="tasks for the ablations (default: --tasks)")
    p.add_argument("--ablation-repeats", type=positive_int, default=None,
                   help="windows per ablation (default: --repeats)")
    p.add_argument("--packed", default=None, help="trial counts to pack into one forward pass, e.g. 4,16")
    p.add_argument("--trials", default=None, help="concurrent trial processes to run, e.g. 1,8,16")
    p.add_argument("--trial-seconds", type=positive_float, default=None, help="timed seconds per concurrent trial")
    p.add_argument("--max-train-examples", type=positive_int, default=None)
    p.add_argument("--max-eval-examples", type=positive_int, default=None)
    a = p.parse_args(argv)
    finish_run_args(p, a, SECTIONS)
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
        compiling = {k for k, v in ABLATIONS.items() if v.compiles}  # compiling takes minutes
        a.ablations = ",".join(x for x in a.ablations.split(",") if x not in compiling)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.tasks = names_argument(p, "--tasks", a.tasks.lower(), TASK_NAMES)
    a.ablations = [] if a.ablations == "none" else names_argument(p, "--ablations", a.ablations, ABLATIONS)
    a.ablation_tasks = (names_argument(p, "--ablation-tasks", a.ablation_tasks.lower(), TASK_NAMES)
                        if a.ablation_tasks else a.tasks)
    if not set(a.ablation_tasks) <= set(a.tasks):
        p.error(f"--ablation-tasks {','.join(a.ablation_tasks)} must be among --tasks {','.join(a.tasks)} "
                "(only those are loaded)")
    a.packed, a.trials = counts_argument(p, "--packed", a.packed), counts_argument(p, "--trials", a.trials)
    return a


# ------------------------------------------------------------------------------------------------ the run


def render_only(args) -> int:
    """Redo conclusions and markdown from a results file (e.g. a GPU run's JSON, on a machine without the GPU)."""
    try:
        measured = json.loads(Path(args.out).read_text())
        m, peaks = measured["meta"], measured["matmul_peak"]
    except (ValueError, KeyError, TypeError) as err:
        print(f"error: {args.out} is not a results file of bench.py ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    # the data and prompt lengths come from the tokenizer alone: a tiny CPU model suffices to rebuild them
    args.device, args.model_shape, args.precision = "cpu", "tiny", "no"
    ctx = Context(args)
    ctx.setup()
    ctx.res, ctx.peaks = measured, peaks
    args.device, args.model_shape, args.precision = m["device"], m["model_shape"], m["precision"]
    ctx.dev = m["device"]
    conclude(ctx)
    ctx.save()
    md = render_markdown(ctx.res)
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
    ctx = Context(args)
    log(f"ptray benchmark: {args.device}, {args.model_shape}, precision {args.precision}"
        + (" (smoke run: checks that everything runs; the numbers are not timings)" if args.smoke else ""))
    ctx.section("setup", Context.setup, optional=False)
    if "setup" in ctx.res["errors"]:
        return 1
    ctx.section("matmul peak", Context.peak, optional=False)
    run = set(args.sections)
    if "train" in run:
        ctx.section("train", train, optional=False)
    if "eval" in run:
        ctx.section("eval", evaluate, optional=False)
    # the sections behind targets first (packed trials: MFU; processes: concurrent trials), extras after
    if "packed" in run:
        ctx.section("packed", packed, needs=30)
    if "concurrency" in run:
        ctx.section("concurrency", concurrency, needs=(args.trial_seconds + 60) * len(args.trials))
    if "ablations" in run:
        for name in args.ablations:  # compiling takes minutes: it runs only with 150 s of the budget left
            needs = 150 if ABLATIONS[name].compiles and args.device == "cuda" else 20
            ctx.section(f"ablation {name}", partial(ablation, name=name), needs=needs)
    ctx.section("matmul peak, again", Context.peak_again, optional=False)
    ctx.section("conclude", conclude, optional=False)
    ctx.res["meta"]["seconds"] = time.perf_counter() - ctx.t_start
    ctx.save()
    md = render_markdown(ctx.res)
    print("\n" + md)
    if args.md:
        update_markdown(args.md, f"{args.device}-{args.model_shape}", md)
    return 1 if ctx.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
