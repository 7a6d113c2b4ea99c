"""BLOOM's attention three ways, for ``gpu.py``: Hugging Face's eager attention and ``ptray.lm.attention``'s two
fused paths (``fused``: one SDPA call with the ALiBi + mask bias; ``folded``: ALiBi folded into two extra Q/K
dimensions and a causal-only SDPA call, which flash kernels take).

``attention(ctx)`` (``res["attention"]``): forward + backward to a soft prompt at several rows x length shapes, in
the run's precision, each mode's tokens/s, MFU and peak memory, and each mode's answer log-probs and prompt
gradient against an fp32 eager reference (never against each other: in bf16 each mode has its own rounding).

``sdpa(ctx)`` (``res["sdpa"]``): which SDPA backend torch picks for each fused path (``torch._fused_sdp_choice``
on the path's real arguments, where torch has it), then the forward and the prompt gradient under each backend
forced by ``torch.nn.attention.sdpa_kernel``, in fp32 and in bf16, against the MATH backend in fp32: finite and
within ``TOLERANCE``, or refused (with the reason). On CPU only MATH and torch's CPU flash kernel exist (the
efficient and cuDNN kernels refuse there, recorded as such).
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.nn.functional as F

from benchmarks.context import Context, log
from benchmarks.measure import PeakMemory, sync
from ptray.data.batching import collate
from ptray.lm.attention import use_fused_attention
from ptray.lm.forward import answer_logprobs

MODES = ("eager", "fused", "folded")
SHAPES = [(8, 256), (32, 256), (128, 256), (64, 512)]  # rows x longest length
SMOKE_SHAPES = [(4, 32), (8, 64)]
N_PROMPT = 8
BACKENDS = ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")
# (largest |log-prob difference|, relative L2 error of the prompt gradient) allowed against fp32 MATH / fp32 eager.
# Chosen, not derived: fp32 must agree to rounding; bf16 (8-bit mantissa through 24 layers) to about 1e-1.
TOLERANCE = {"fp32": (1e-3, 1e-3), "bf16": (0.25, 0.1)}


def set_attention(model, mode: str) -> None:
    """Put ``model``'s BLOOM attention in ``mode`` (one of ``MODES``)."""
    use_fused_attention(model, enabled=False)
    if mode != "eager":
        use_fused_attention(model, fold_alibi=mode == "folded")


def random_batch(ctx: Context, rows: int, length: int, seed: int):
    """Right-padded random sequences of [length/2, length] tokens, each ending in a 2-token answer."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(rows):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=gen))
        ids = torch.randint(4, len(ctx.tok), (n,), generator=gen).tolist()
        seqs.append((ids[:-2], ids[-2:]))
    return collate(seqs, ctx.pad, ctx.eos)


def batch_flops(ctx: Context, batch, n_prompt: int) -> tuple[int, float]:
    """(real tokens, training model FLOPs) of one batch with an ``n_prompt``-row prompt."""
    lengths = batch.attention_mask.sum(1).tolist()
    answers = torch.bincount(batch.ans_seq, minlength=len(lengths)).tolist()
    return int(sum(lengths)), float(sum(ctx.shape.train_flops(n_prompt + t, a) for t, a in zip(lengths, answers)))


def model_copy(ctx: Context, dtype: torch.dtype):
    """``ctx.model`` itself when it is in ``dtype``, else a copy in ``dtype`` (eager attention)."""
    set_attention(ctx.model, "eager")
    return ctx.model if ctx.dtype == dtype else copy.deepcopy(ctx.model).to(dtype)


def autocast(ctx: Context, dtype: torch.dtype):
    """ptray's precision for a model in ``dtype``: bf16 weights run under bf16 autocast, fp32 under none."""
    if dtype == torch.bfloat16:
        return torch.autocast(ctx.dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logprobs_and_grad(ctx: Context, model, batch, init, dtype, backend=None):
    """The answer log-probs (fp32) and the prompt's gradient of their negative mean, from ``init`` (fp32)."""
    prompt = torch.nn.Parameter(init.detach().clone())
    with sdpa_backend(backend), autocast(ctx, dtype):
        lp = answer_logprobs(model, batch, prompt)[0]
    (-lp.float().mean()).backward()
    return lp.detach().float(), prompt.grad.detach().float()


def compare(got, ref, precision: str) -> dict:
    """How far ``got`` = (log-probs, gradient) is from ``ref``; ``ok``: finite and within ``TOLERANCE``."""
    (lp, g), (ref_lp, ref_g) = got, ref
    finite = bool(torch.isfinite(lp).all() and torch.isfinite(g).all())
    diff = float((lp - ref_lp).abs().max())
    rel = float((g - ref_g).norm() / ref_g.norm().clamp_min(1e-30))
    tol_lp, tol_g = TOLERANCE[precision]
    return {"finite": finite, "logprob_max_abs_diff": diff, "grad_rel_err": rel,
            "ok": finite and diff <= tol_lp and rel <= tol_g}


def sdpa_backend(name: str | None):
    """Within the block SDPA may use only backend ``name`` (None: torch's own choice)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name)])


def timed_steps(ctx: Context, step, seconds: float, warmup: int = 2) -> tuple[int, float]:
    """Run ``step()`` ``warmup`` times, then as many times as fit in ``seconds``; returns (timed steps, seconds)."""
    for _ in range(warmup):
        step()
    sync(ctx.dev)
    t0, n = time.perf_counter(), 0
    while True:
        step()
        n += 1
        if n % 4 == 0 or ctx.dev != "cuda":
            sync(ctx.dev)
            if time.perf_counter() - t0 >= seconds:
                return n, time.perf_counter() - t0


def attention(ctx: Context) -> None:
    """Every mode at every shape: speed in the run's precision, error against fp32 eager (``res["attention"]``)."""
    precision = "bf16" if ctx.dtype == torch.bfloat16 else "fp32"
    reference = model_copy(ctx, torch.float32)
    out = []
    for rows, length in SMOKE_SHAPES if ctx.a.smoke else SHAPES:
        batch = random_batch(ctx, rows, length, seed=rows + length).to(ctx.dev)
        tokens, flops = batch_flops(ctx, batch, N_PROMPT)
        init = ctx.init["cb"][:1].repeat(N_PROMPT, 1).float().to(ctx.dev)
        set_attention(reference, "eager")
        ref = logprobs_and_grad(ctx, reference, batch, init, torch.float32)
        entry = {"rows": rows, "length": length, "tokens_per_step": tokens, "train_flops_per_step": flops,
                 "precision": precision}
        for mode in MODES:
            set_attention(ctx.model, mode)
            try:
                entry[mode] = {"vs_fp32_eager": compare(logprobs_and_grad(ctx, ctx.model, batch, init, ctx.dtype),
                                                        ref, precision)}
                prompt = torch.nn.Parameter(init.clone())

                def step(prompt=prompt, batch=batch):
                    with autocast(ctx, ctx.dtype):
                        lp = answer_logprobs(ctx.model, batch, prompt)[0]
                    (-lp.mean()).backward()
                    prompt.grad = None

                with PeakMemory(ctx.dev) as mem:
                    n, s = timed_steps(ctx, step, ctx.a.window_seconds)
                tps = flops * n / s
                entry[mode].update(steps=n, seconds=s, tokens_per_s=tokens * n / s, tflops=tps / 1e12,
                                   mfu=tps / ctx.peak_flops(ctx.a.precision),
                                   peak_mib=mem.peak / 2**20 if mem.peak is not None else None)
            except Exception as err:  # noqa: BLE001 - out of memory, or a kernel that refuses: recorded
                entry[mode] = {"error": error_line(err)}
            if ctx.dev == "cuda":
                torch.cuda.empty_cache()
        set_attention(ctx.model, "eager")
        for mode in MODES[1:]:
            if "tokens_per_s" in entry["eager"] and "tokens_per_s" in entry[mode]:
                entry[mode]["speedup"] = entry[mode]["tokens_per_s"] / entry["eager"]["tokens_per_s"]
        log(f"  {rows}x{length}: " + ", ".join(f"{m} {entry[m].get('tokens_per_s', float('nan')):,.0f} tok/s"
                                               for m in MODES))
        out.append(entry)
    del reference
    ctx.res["attention"] = out


def picked_backend(run) -> str:
    """The SDPA backend torch picks for the first SDPA call of ``run()`` (``torch._fused_sdp_choice`` on that
    call's arguments), or why it is not known."""
    choose = getattr(torch, "_fused_sdp_choice", None) or getattr(torch._C, "_fused_sdp_choice", None)
    if choose is None:
        return f"unknown: torch {torch.__version__} has no _fused_sdp_choice"
    seen, original = [], F.scaled_dot_product_attention

    def spy(*args, **kw):
        if not seen:
            seen.append((args, kw))
        return original(*args, **kw)

    F.scaled_dot_product_attention = spy
    try:
        run()
    finally:
        F.scaled_dot_product_attention = original
    if not seen:
        return "unknown: no SDPA call"
    (q, k, v, *rest), kw = seen[0]
    try:
        index = int(choose(q, k, v, attn_mask=kw.get("attn_mask", rest[0] if rest else None),
                           dropout_p=kw.get("dropout_p", 0.0), is_causal=kw.get("is_causal", False),
                           scale=kw.get("scale")))
    except Exception as err:  # noqa: BLE001 - a private function: its signature may change
        return f"unknown: {error_line(err)}"
    from torch.nn.attention import SDPBackend

    names = {int(b.value): name for name, b in SDPBackend.__members__.items()}
    return names.get(index, str(index))


def sdpa(ctx: Context) -> None:
    """Torch's pick and every backend against fp32 MATH, per fused path and precision (``res["sdpa"]``)."""
    from torch.nn.attention import SDPBackend

    rows, length = (8, 64) if ctx.a.smoke else (32, 256)
    batch = random_batch(ctx, rows, length, seed=7).to(ctx.dev)
    init = ctx.init["cb"][:1].repeat(N_PROMPT, 1).float().to(ctx.dev)
    models = {"fp32": model_copy(ctx, torch.float32), "bf16": model_copy(ctx, torch.bfloat16)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    available = [b for b in BACKENDS if hasattr(SDPBackend, b)]
    out = {"rows": rows, "length": length, "backends_in_torch": available, "picked": {}, "check": {}}
    for mode in MODES[1:]:
        for m in models.values():
            set_attention(m, mode)
        ref = logprobs_and_grad(ctx, models["fp32"], batch, init, torch.float32, "MATH")
        for precision, model in models.items():
            out["picked"][f"{mode} {precision}"] = picked_backend(
                lambda model=model, precision=precision: logprobs_and_grad(ctx, model, batch, init, dtypes[precision]))
            for backend in available:
                key = f"{mode} {precision} {backend}"
                try:
                    got = logprobs_and_grad(ctx, model, batch, init, dtypes[precision], backend)
                    out["check"][key] = {"ran": True, **compare(got, ref, precision)}
                except Exception as err:  # noqa: BLE001 - a backend that refuses the mask, dtype or device
                    out["check"][key] = {"ran": False, "error": error_line(err)}
    for m in models.values():
        set_attention(m, "eager")
    del models
    ctx.res["sdpa"] = out
    log("  torch picks: " + ", ".join(f"{k}: {v}" for k, v in out["picked"].items()))
    log("  backends that ran: " + ", ".join(k for k, v in out["check"].items() if v["ran"]))


def error_line(err: Exception) -> str:
    """An exception as one short line for the results."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
