"""How much device memory one bloomz-560m trial needs, measured without a GPU: how many trials fit on one.

    python benchmarks/trial_memory.py --out benchmarks/results/trial-memory-bloomz-560m.json --md BENCHMARKS.md

With bloomz-560m's exact config (random weights) in fp32 on CPU, under the torch profiler's memory recording (see
``benchmarks/measure.PeakMemory``), this measures the peak tensor memory of

* ptray's training step (``benchmarks.variants.ptray_train``: answer-only logits, backward to the prompt, Adam on
  the prompt) on each task's batch with the most padded positions (batch 8, max length 512; ptray's offline
  tokenizer makes ~2.5x more tokens than bloomz's, so these batches are longer than the real ones: an upper bound);
* ``ptray.lm.evaluate.evaluate`` (evaluation batch 32 sequences, shared source pass) on each task's longest
  validation examples.

A trial on a GPU holds bf16 weights and bf16 activations (BLOOM's attention softmax stays fp32). The estimate per
trial = bf16 weights + the largest fp32 activation peak measured here (an upper bound: bf16 halves most of it)
+ ``--overhead-gib`` for the process's CUDA context and allocator slack (an assumption, stated in the output).
This is an estimate, not the GPU measurement: ``bench.py --device cuda`` runs the trials for real.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import variants as V  # noqa: E402
from benchmarks.args import add_data_dir_argument, check_data_dir, names_argument  # noqa: E402
from benchmarks.context import utc_now, write_json  # noqa: E402
from benchmarks.markdown import update_markdown  # noqa: E402
from benchmarks.measure import PeakMemory  # noqa: E402
from benchmarks.models import SHAPES, build_model  # noqa: E402
from benchmarks.study_estimate import PAPER_TASKS  # noqa: E402
from ptray.cli import OneLineParser, non_negative_float, positive_float, positive_int  # noqa: E402
from ptray.data.batching import encode_all, train_batches  # noqa: E402
from ptray.data.superglue import load_split  # noqa: E402
from ptray.data.tasks import TASK_NAMES, get_task  # noqa: E402
from ptray.lm.prompt import init_prompt  # noqa: E402

GIB = 2**30


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="bloomz-560m", choices=list(SHAPES),
                   help="tiny for a quick check, bloomz-560m for the figures")
    add_data_dir_argument(p)
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--batch-size", type=positive_int, default=8, help="training examples per step (ptray's default)")
    p.add_argument("--eval-batch-size", type=positive_int, default=32,
                   help="sequences per evaluation batch (ptray's default)")
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--gpu-gib", type=positive_float, default=80.0, help="the GPU memory to fit trials into")
    p.add_argument("--overhead-gib", type=non_negative_float, default=1.0,
                   help="assumed per-process CUDA context + allocator slack (not measurable without a GPU)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="write the numbers here (JSON)")
    p.add_argument("--md", default=None, help="markdown file whose '<!-- bench:trial-memory -->' section to replace")
    a = p.parse_args(argv)
    check_data_dir(p, a.data_dir)
    a.tasks = names_argument(p, "--tasks", a.tasks.lower(), TASK_NAMES)
    return a


def widest(batches):
    """The batch with the most positions (rows x width, padding included)."""
    return max(batches, key=lambda b: b.input_ids.numel())


def measure(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = build_model(a.model_shape, "cpu", torch.float32)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    emb = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    res = {"meta": {"date": utc_now(),
                    "command": "python benchmarks/trial_memory.py " + " ".join(sys.argv[1:]),
                    "model_shape": a.model_shape, "params": params, "torch": torch.__version__,
                    "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size, "max_length": a.max_length},
           "train": {}, "eval": {}}
    for name in a.tasks:
        task = get_task(name)
        init = init_prompt(emb, tok, "text", task.init_text)
        data = encode_all(task, load_split(task, "train", a.data_dir), tok, a.max_length)
        batch = widest(train_batches(data, a.batch_size, 0, 1, pad, eos))
        t0 = time.perf_counter()
        step = V.ptray_train(model, [batch], init, device="cpu", precision="no", warmup=0, memory=True)
        res["train"][name] = {"rows": batch.num_seqs, "width": batch.input_ids.shape[1] + init.shape[0],
                              "peak_bytes": step.peak_bytes, "seconds": time.perf_counter() - t0}
        print(f"  train {name}: {batch.num_seqs} x {res['train'][name]['width']} positions, peak "
              f"{step.peak_bytes / GIB:.2f} GiB", flush=True)

        val = encode_all(task, load_split(task, "val", a.data_dir), tok, a.max_length)
        longest = sorted((d for d in val if d.label is not None), key=lambda d: -len(d.source))
        labels = max(len(d.answers) for d in longest)
        part = longest[:max(1, a.eval_batch_size // labels)]  # one batch of the shared source pass
        t0 = time.perf_counter()
        with PeakMemory("cpu", True) as mem:
            V.ptray_evaluate(model, part, init, batch_size=a.eval_batch_size, pad_id=pad, eos_id=eos,
                             device="cpu", precision="no")
        res["eval"][name] = {"examples": len(part), "longest_source": len(part[0].source) + init.shape[0],
                             "peak_bytes": mem.peak, "seconds": time.perf_counter() - t0}
        print(f"  eval {name}: {len(part)} examples up to {res['eval'][name]['longest_source']} positions, peak "
              f"{mem.peak / GIB:.2f} GiB", flush=True)
    act = max(x["peak_bytes"] for part in ("train", "eval") for x in res[part].values())
    per_trial = params * 2 + act + a.overhead_gib * GIB
    res["estimate"] = {"weights_bf16_bytes": params * 2, "activations_fp32_max_bytes": act,
                       "overhead_bytes_assumed": a.overhead_gib * GIB, "per_trial_bytes": per_trial,
                       "gpu_gib": a.gpu_gib, "trials_fit": math.floor(a.gpu_gib * GIB / per_trial)}
    return res


def render(res) -> str:
    m, e = res["meta"], res["estimate"]
    lines = [f"Run {m['date']}: `{m['command']}` (CPU, fp32, torch {m['torch']}; model `{m['model_shape']}`, "
             f"{m['params'] / 1e6:.0f}M parameters, random weights)", "",
             "| task | training batch (rows x positions) | training step peak GiB | evaluation batch | "
             "evaluation peak GiB |", "|---|---|---|---|---|"]
    for t in res["train"]:
        tr, ev = res["train"][t], res["eval"][t]
        lines.append(f"| {t} | {tr['rows']} x {tr['width']} | {tr['peak_bytes'] / GIB:.2f} | {ev['examples']} "
                     f"examples up to {ev['longest_source']} | {ev['peak_bytes'] / GIB:.2f} |")
    lines += ["", f"Estimate per trial on a GPU (bf16): weights {e['weights_bf16_bytes'] / GIB:.2f} GiB + the largest "
              f"activation peak above measured in fp32 {e['activations_fp32_max_bytes'] / GIB:.2f} GiB (an upper "
              f"bound for bf16) + {e['overhead_bytes_assumed'] / GIB:.1f} GiB assumed for the CUDA context = "
              f"**{e['per_trial_bytes'] / GIB:.2f} GiB**, so about **{e['trials_fit']} trials** fit in "
              f"{e['gpu_gib']:.0f} GiB (an estimate, not a GPU measurement)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    res = measure(a)
    md = render(res)
    print("\n" + md)
    if a.out:
        write_json(a.out, res)
    if a.md:
        update_markdown(a.md, "trial-memory", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
