"""The CPU real-model side-by-side: ptray fp32 and bf16 against PEFT prompt tuning + ``transformers.Trainer`` fp32
and bf16, on the same token ids of a real pretrained model (SmolLM2-135M-Instruct, ``ptray model prepare``).

What is timed, for each of the four: one training epoch on the first ``--examples`` training examples of
``--task`` (batch ``--batch-size``), after a warm-up (ptray: the epoch before; PEFT + Trainer: its first step), so
one-time costs (oneDNN kernel creation, allocation) are outside the window. Variants alternate, ``--repeats`` times
(median reported). Real tokens are each example's source + answer, as ``benchmarks/measure.py`` counts them.

% of peak: 4 x the model's non-embedding parameters FLOP per real token (a frozen model: forward 2N, backward to
the input 2N; attention and the answer-position LM head not counted) over the dense matmul rate of the same dtype
measured in the same run (``measure.matmul_peak``, before and after the variants; the higher of the two).

``--profile N`` profiles N bf16 ptray training steps with ``torch.profiler`` and prints the top ops by self CPU
time and their share (the table BENCHMARKS.md quotes).

Command (BENCHMARKS.md's table; about 10 minutes on 2 cores)::

    make bench-cpu   # python benchmarks/cpu_real.py --out benchmarks/results/cpu-real.json --md BENCHMARKS.md
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/cpu_real.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.args import add_data_dir_argument, check_data_dir  # noqa: E402
from benchmarks.context import run_meta, utc_now, write_json  # noqa: E402
from benchmarks.markdown import update_markdown  # noqa: E402
from benchmarks.measure import Shape, matmul_peak  # noqa: E402
from ptray.cli import OneLineParser, positive_int  # noqa: E402

VARIANTS = ("ptray fp32", "ptray bf16", "ptray bf16 compile", "ptray bf16 all-logits", "peft fp32", "peft bf16")
DEFAULT_VARIANTS = ("ptray fp32", "ptray bf16", "ptray bf16 compile", "peft fp32", "peft bf16")


def non_embedding_params(model) -> int:
    """Parameters outside the input embedding and the LM head (tied or not): the N of 4N FLOP per token."""
    skip = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings().weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def shape_of(model) -> Shape:
    """``measure.Shape`` of any family (Linear weights of the blocks, layers, width, vocab), for PEFT's FLOP column."""
    from ptray.lm import families

    base = families.base_model(model)
    blocks = getattr(base, "layers", None) or base.h
    n_lin = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    return Shape(n_lin=n_lin, n_layer=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                 vocab=model.get_output_embeddings().weight.shape[0])


def ptray_config(a, precision: str, epochs: int = 2, compile: bool = False):
    from ptray.config import TrainConfig

    return TrainConfig(task=a.task, model=a.model, data_dir=a.data_dir, batch_size=a.batch_size,
                       max_epochs=epochs, patience=epochs + 1, max_train_examples=a.examples, max_eval_examples=8,
                       baselines=False, precision=precision, device="cpu", compile=compile)


@contextmanager
def all_position_logits():
    """The ablation of ptray's answer-position LM head (``ptray.lm.forward.answer_logprobs`` runs the head at the
    answer positions only): inside, every base-model forward also runs the LM head and log-softmax at every position
    (what the model's own forward and PEFT compute), kept in the autograd graph (added times zero) so that their
    backward runs too. The numbers are unchanged; only the cost is added."""
    from ptray.lm import families

    own = families.base_forward

    def with_all_logits(model, embeds, attention_mask, *args, **kwargs):
        out = own(model, embeds, attention_mask, *args, **kwargs)
        hidden = out.last_hidden_state
        every = torch.log_softmax(families.logits(model, hidden), dim=-1)  # [B, T, vocab] fp32
        out.last_hidden_state = hidden + 0 * every[..., :1].to(hidden.dtype)
        return out

    families.base_forward = with_all_logits
    try:
        yield
    finally:
        families.base_forward = own


def run_ptray(a, loaded, precision: str, compile: bool = False) -> dict:
    """Two epochs through ``train_group``; the second's real tokens over its training seconds (the first is the
    warm-up: oneDNN's kernels, and with ``compile`` the compilation of the blocks)."""
    from ptray.training.loop import train_group

    res = train_group([ptray_config(a, precision, compile=compile)], model_and_tokenizer=loaded)[0]
    epoch = res.history[-1]
    return {"tokens_per_s": epoch["train_tokens_per_s"], "train_loss": epoch["train_loss"],
            "eval_loss": epoch["eval_loss"]}


def run_peft(a, model, tok, data, init_text, n_prompt, precision: str) -> dict:
    from benchmarks.reference import reference_train

    steps = -(-len(data) // a.batch_size)
    r = reference_train(model, tok, a.model, init_text, n_prompt, data, device="cpu", precision=precision,
                        batch_size=a.batch_size, warmup=1, steps=steps - 1, shape=shape_of(model), memory=False)
    return {"tokens_per_s": r.tokens_per_s}


QUALITY_TASKS = ("cb", "rte", "copa", "wsc")


def quality(a, loaded) -> dict:
    """bf16 against fp32 on each task at a small fixed budget: the first ``--quality-examples`` training examples,
    ``--quality-epochs`` epochs (no early stop), batch ``--batch-size``, every validation example; the no-prompt
    baseline (the same prompt-free model in both precisions) and the trained prompt's final eval loss, rank
    accuracy and exact match, side by side."""
    from ptray.config import TrainConfig
    from ptray.training.loop import train_group

    out = {}
    for task in QUALITY_TASKS:
        row = {}
        for prec in ("fp32", "bf16"):
            cfg = TrainConfig(task=task, model=a.model, data_dir=a.data_dir, batch_size=a.batch_size,
                              max_epochs=a.quality_epochs, patience=a.quality_epochs + 1,
                              max_train_examples=a.quality_examples, precision="bf16" if prec == "bf16" else "no",
                              device="cpu", max_eval_examples=a.max_eval_examples)
            t0 = time.perf_counter()
            res = train_group([cfg], model_and_tokenizer=loaded[prec])[0]
            last = res.history[-1]
            row[prec] = {"eval_loss": last["eval_loss"], "rank_accuracy": last["rank_accuracy"],
                         "exact_match": last["exact_match"], "no_prompt_eval_loss": res.metrics["no_prompt_eval_loss"],
                         "no_prompt_rank_accuracy": res.metrics["no_prompt_rank_accuracy"],
                         "num_eval_examples": res.metrics["num_eval_examples"],
                         "train_tokens_per_s": last["train_tokens_per_s"],  # the second epoch's, when 2
                         "seconds": time.perf_counter() - t0}
            print(f"[quality] {task} {prec}: eval loss {last['eval_loss']:.4f} rank accuracy "
                  f"{last['rank_accuracy']:.3f} ({row[prec]['seconds']:.0f} s)", flush=True)
        out[task] = row
    return out


def profile(a, loaded, steps: int) -> list[dict]:
    """Self CPU time of the top ops over ``steps`` bf16 training steps (after one untimed step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ptray.data.batching import stage, train_batches
    from ptray.data.tasks import get_task
    from ptray.data.tokens import pad_token_id
    from ptray.lm.evaluate import encoded_split
    from ptray.lm.forward import group_answer_logprobs
    from ptray.lm.load import use_eager_attention
    from ptray.lm.prompt import init_prompt

    model, tok = loaded
    use_eager_attention(model)  # as ptray trains on CPU (attention auto)
    task = get_task(a.task)
    data = encoded_split(task, "train", tok, 512, a.data_dir, None, a.examples)
    batches = stage(train_batches(data, a.batch_size, 0, 1, pad_token_id(tok), tok.eos_token_id), "cpu")
    weight = torch.nn.Parameter(init_prompt(model.get_input_embeddings(), tok, "text", task.init_text))
    opt = torch.optim.Adam([weight], lr=3e-2)

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = -group_answer_logprobs(model, [(b, weight)])[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(batches[0])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[1:1 + steps]:
            step(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in rows]


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("PTRAY_REAL_MODEL_DIR",
                                                     str(ROOT / "outputs/models/smollm2-135m-instruct")),
                   help="a prepared model folder (default: $PTRAY_REAL_MODEL_DIR, else outputs/models/...)")
    add_data_dir_argument(p)
    p.add_argument("--task", default="rte")
    p.add_argument("--examples", type=positive_int, default=64, help="first N training examples (one epoch)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=2, help="alternating rounds of the variants (median)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {','.join(VARIANTS)}")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N bf16 ptray steps and stop")
    p.add_argument("--sections", default="speed,quality", help="any of speed,quality")
    p.add_argument("--quality-examples", type=positive_int, default=64, help="quality: first N training examples")
    p.add_argument("--quality-epochs", type=positive_int, default=2, help="quality: epochs of each training")
    p.add_argument("--max-eval-examples", type=positive_int, default=None, help="quality: first N validation "
                                                                                  "examples (default: all)")
    p.add_argument("--smoke", action="store_true", help="a few examples, one round: checks that everything runs")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--md", default=None, help="markdown file whose '<!-- bench:SECTION -->' section to replace")
    p.add_argument("--md-section", default="cpu-real", help="SECTION: the marker's name (one section per model)")
    p.add_argument("--render-only", nargs="*", metavar="RESULTS", default=None,
                   help="measure nothing: merge these results files (e.g. a speed run and a quality run, later "
                        "files' sections win) into --out and redo --md from it")
    a = p.parse_args(argv)
    check_data_dir(p, a.data_dir)
    if not (Path(a.model) / "config.json").is_file():
        p.error(f"--model {a.model!r} is not a prepared model folder; run `make real-model` first")
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if a.smoke:
        a.examples, a.repeats, a.quality_examples, a.quality_epochs, a.max_eval_examples = 16, 1, 8, 1, 16
    a.sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    if not a.sections or set(a.sections) - {"speed", "quality"}:
        p.error(f"--sections: any of speed,quality (got {','.join(a.sections)!r})")
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad[0]!r}; valid: {', '.join(VARIANTS)}")
    a.device, a.precision, a.model_shape, a.eval_batch_size = "cpu", "both", a.model, None
    a.warmup, a.steps, a.ablation_repeats = 1, None, None
    return a


def render_only(a) -> int:
    import json

    res: dict = {}
    for path in a.render_only:  # the first file's speed table and peaks; a later file's quality table
        part = json.loads(Path(path).read_text())
        setup = {**res.get("setup", {}), **part.get("setup", {})}
        if not res:
            res = part
        elif "quality" in part:
            res["quality"], res["quality_meta"] = part["quality"], part["meta"]
        res["setup"] = setup
    if a.out:
        write_json(a.out, res)
    if a.md:
        update_markdown(a.md, a.md_section, render(res) + "\n")
    print(render(res))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render_only:
        return render_only(a)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ptray.data.tasks import get_task
    from ptray.lm.evaluate import encoded_split
    from ptray.lm.load import load_model

    # ptray switches its model's attention to eager on CPU (``setup_model``); PEFT + Trainer get their own copies
    # with the attention Hugging Face picks, as a user would run them
    loaded = {"fp32": load_model(a.model, torch.float32), "bf16": load_model(a.model, torch.bfloat16)}
    reference = {"fp32": load_model(a.model, torch.float32), "bf16": load_model(a.model, torch.bfloat16)}
    if "ptray bf16 compile" in a.variants:  # compiled in place: a copy of its own
        loaded["bf16 compile"] = load_model(a.model, torch.bfloat16)
    if a.profile:
        rows = profile(a, loaded["bf16"], a.profile)
        for r in rows:
            print(f"{r['share']:6.1%} {r['self_ms']:9.1f} ms {r['calls']:6d}  {r['op']}")
        return 0
    model, tok = loaded["fp32"]
    task = get_task(a.task)
    data = encoded_split(task, "train", tok, 512, a.data_dir, None, a.examples)
    from ptray.data.tokens import token_ids

    n_prompt = len(token_ids(tok, task.init_text))
    n = non_embedding_params(model)
    peaks = [{d: matmul_peak("cpu", t, sizes=(1024, 2048))["flops"] for d, t in
              (("fp32", torch.float32), ("bf16", torch.bfloat16))}]
    runs: dict[str, list[dict]] = {v: [] for v in a.variants} if "speed" in a.sections else {}
    for r in range(a.repeats if runs else 0):
        for v in runs:
            kind, prec, *extra = v.split()
            t0 = time.perf_counter()
            if v == "ptray bf16 all-logits":
                with all_position_logits():
                    out = run_ptray(a, loaded["bf16"], "bf16")
            elif kind == "ptray":
                out = run_ptray(a, loaded[" ".join([prec, *extra])], "bf16" if prec == "bf16" else "no",
                                compile=bool(extra))
            else:
                out = run_peft(a, *reference[prec], data, task.init_text, n_prompt, prec)
            runs[v].append(out)
            print(f"[{r + 1}/{a.repeats}] {v:11s} {out['tokens_per_s']:7.1f} real tok/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    peaks.append({d: matmul_peak("cpu", t, sizes=(1024, 2048))["flops"] for d, t in
                  (("fp32", torch.float32), ("bf16", torch.bfloat16))})
    peak = {d: max(p[d] for p in peaks) for d in ("fp32", "bf16")}
    table = {}
    for v, outs in runs.items():
        tps = statistics.median(o["tokens_per_s"] for o in outs)
        prec = v.split()[1]
        table[v] = {"tokens_per_s": tps, "runs": [o["tokens_per_s"] for o in outs],
                    "pct_of_peak": 4 * n * tps / peak[prec],
                    "pct_of_bf16_peak": 4 * n * tps / peak["bf16"],
                    **{k: outs[-1][k] for k in ("train_loss", "eval_loss") if k in outs[-1]}}
    res = {"meta": {**run_meta(a, "benchmarks/cpu_real.py"), "date": utc_now()},
           "setup": {"model": Path(a.model).name, "task": a.task, "examples": a.examples,
                     "batch_size": a.batch_size, "non_embedding_params": n, "real_tokens": sum(
                         len(d.source) + len(d.answers[d.label]) for d in data)},
           "peak_flops": peak, "peaks_before_after": peaks, "variants": table}
    res["ratios"] = ratios(table)
    if "quality" in a.sections:
        res["quality"] = quality(a, loaded)
        res["setup"].update(quality_examples=a.quality_examples, quality_epochs=a.quality_epochs)
    print(render(res))
    if a.out:
        write_json(a.out, res)
    if a.md:
        update_markdown(a.md, a.md_section, render(res) + "\n")
    return 0


def ratios(table: dict) -> dict:
    if not table:
        return {}

    def r(x, y):
        return table[x]["tokens_per_s"] / table[y]["tokens_per_s"] if x in table and y in table else None

    return {"ptray bf16 / ptray fp32": r("ptray bf16", "ptray fp32"),
            "ptray bf16 compile / ptray bf16": r("ptray bf16 compile", "ptray bf16"),
            "ptray bf16 / ptray bf16 all-logits": r("ptray bf16", "ptray bf16 all-logits"),
            "ptray bf16 / peft bf16": r("ptray bf16", "peft bf16"),
            "ptray fp32 / peft fp32": r("ptray fp32", "peft fp32"),
            "peft bf16 / peft fp32": r("peft bf16", "peft fp32")}


def render(res: dict) -> str:
    m, s, pk = res["meta"], res["setup"], res["peak_flops"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cpu_threads']} torch threads), torch {m['versions']['torch']}, "
             f"transformers {m['versions']['transformers']}, peft {m['versions']['peft']}; `{m['command']}`.",
             f"{s['model']}, {s['task'].upper()} first {s['examples']} training examples ({s['real_tokens']} real "
             f"tokens), batch {s['batch_size']}; matmul peak in this run: fp32 {pk['fp32'] / 1e9:.0f} GFLOP/s, "
             f"bf16 {pk['bf16'] / 1e9:.0f} GFLOP/s; FLOP per real token 4 x {s['non_embedding_params'] / 1e6:.1f}M.",
             "", "| variant | real tok/s (median) | runs | % of its dtype's peak | % of the bf16 peak |",
             "|---|---:|---|---:|---:|"]
    for v, row in res["variants"].items():
        lines.append(f"| {v} | {row['tokens_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in row['runs'])} | "
                     f"{row['pct_of_peak']:.0%} | {row['pct_of_bf16_peak']:.0%} |")
    if res["ratios"]:
        lines += ["", "Ratios: " + "; ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items() if v is not None)
                  + "."]
    if "quality" in res:
        qm = res.get("quality_meta", m)
        lines += ["", f"Quality ({qm['date']}, `{qm['command']}`) at a small fixed budget (first "
                      f"{s['quality_examples']} training examples, "
                      f"{s['quality_epochs']} epochs, batch {s['batch_size']}, every validation example; the same "
                      f"init and data order in both precisions):", "",
                  "| task | eval examples | no prompt loss fp32 / bf16 | eval loss fp32 / bf16 (rel. diff) | "
                  "rank accuracy fp32 / bf16 (no prompt) | exact match fp32 / bf16 |", "|---|---:|---|---|---|---|"]
        for task, row in res["quality"].items():
            f, b = row["fp32"], row["bf16"]
            lines.append(f"| {task} | {f['num_eval_examples']} | {f['no_prompt_eval_loss']:.4f} / "
                         f"{b['no_prompt_eval_loss']:.4f} | {f['eval_loss']:.4f} / {b['eval_loss']:.4f} "
                         f"({(b['eval_loss'] - f['eval_loss']) / f['eval_loss']:+.1%}) | {f['rank_accuracy']:.3f} / "
                         f"{b['rank_accuracy']:.3f} ({f['no_prompt_rank_accuracy']:.3f}) | {f['exact_match']:.3f} / "
                         f"{b['exact_match']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
