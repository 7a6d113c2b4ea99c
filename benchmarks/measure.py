"""Timing, memory, FLOP counting and the matmul peak, the same way for ptray and for the reference.

Conventions (BENCHMARKS.md repeats them):

* tokens: real text tokens of an example, ``len(source) + len(answer)``; no padding, no virtual (prompt) tokens,
  and not the extra EOS input token the HF-style reference appends. Both sides count the same thing.
* model FLOPs, per sequence with T = n_prompt + L real positions, A answer targets (answer tokens + EOS), a model
  with ``N_lin`` weights in the transformer blocks' Linear layers, ``l`` layers, width ``h``, vocab ``V``:

      forward   = 2 N_lin T + 4 l h T^2 + 2 h V A
      training  = 4 N_lin T + 12 l h T^2 + 4 h V A      (frozen weights: backward = input gradients only,
                                                         2x forward for the attention matmuls, 1x for Linear)

  The LM head counts only at the A answer positions, padding counts nowhere: this is the work the task needs, so
  one definition serves ptray and the reference (whose extra full-vocabulary logits are waste, not model FLOPs).
* MFU = model FLOPs / second / (matmul peak measured in the same run, same dtype).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Shape:
    """What the FLOP formula needs from a model."""

    n_lin: int  # weights of the Linear layers inside the transformer blocks
    n_layer: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model) -> Shape:
        cfg = model.config
        blocks = model.base_model.h
        n_lin = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
        return cls(n_lin=n_lin, n_layer=cfg.n_layer, hidden=cfg.hidden_size,
                   vocab=model.get_output_embeddings().weight.shape[0])

    @classmethod
    def from_config(cls, hidden: int, n_layer: int, vocab: int) -> Shape:
        return cls(n_lin=12 * hidden * hidden * n_layer, n_layer=n_layer, hidden=hidden, vocab=vocab)

    def forward_flops(self, positions: int, answers: int) -> float:
        t = positions
        return 2 * self.n_lin * t + 4 * self.n_layer * self.hidden * t * t + 2 * self.hidden * self.vocab * answers

    def eval_flops(self, n_prompt: int, source: int, answer_lengths) -> float:
        """``ptray.evaluate`` on one example: prompt + source once, then every label's answer tokens, with the LM
        head at each answer token and EOS."""
        return self.forward_flops(n_prompt + source + sum(answer_lengths), sum(a + 1 for a in answer_lengths))

    def train_flops(self, positions: int, answers: int) -> float:
        t = positions
        return 4 * self.n_lin * t + 12 * self.n_layer * self.hidden * t * t + 4 * self.hidden * self.vocab * answers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def mib(x: float | None) -> str:
    """A peak in MiB as the results tables print it ("-": not measured)."""
    return "-" if x is None else f"{x:.0f}"


class PeakMemory:
    """Peak tensor memory allocated inside a code section, in bytes, above what was allocated at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` (no overhead, always on). CPU has no allocator statistics, so with
    ``enabled`` the section runs under the torch profiler with memory recording and the peak of the running sum of
    its allocation and free events is taken (the same quantity; the profiler slows the section down, so CPU timings
    and CPU memory come from separate runs). Otherwise ``peak`` stays None.
    """

    def __init__(self, device: str, enabled: bool | None = None):
        self.device = device
        self.enabled = device == "cuda" if enabled is None else enabled
        self.peak = None

    def __enter__(self):
        if not self.enabled:
            return self
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._prof.__exit__(*exc)
            events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
            current = peak = 0
            for _, nbytes in events:
                current += nbytes
                peak = max(peak, current)
            self.peak = peak
        return False


def matmul_peak(device: str, dtype: torch.dtype, sizes=(1024, 2048, 4096), seconds: float = 1.0) -> dict:
    """Dense matmul FLOP/s measured here: for each square size, the median of 5 timed runs of about
    ``seconds / 5`` each (at least one matmul); the best size wins. Sizes whose single matmul takes longer than
    ``seconds`` stop the sweep (CPU bf16 without hardware support runs at a few GFLOP/s).

    Returns ``{"flops": best FLOP/s, "per_size": {size: FLOP/s}}``.
    """
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (kernel selection, allocation)
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        one = max(time.perf_counter() - t0, 1e-6)
        reps = max(1, min(200, int(seconds / 5 / one)))
        runs = []
        for _ in range(5 if one * 5 <= seconds else 1):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            runs.append(2 * n**3 * reps / (time.perf_counter() - t0))
        per_size[n] = median(runs)
        del a, b
        if one > seconds:
            break
    return {"flops": max(per_size.values()), "per_size": per_size}


@contextmanager
def timed(device: str):
    """``with timed(dev) as t: ...`` then ``t["s"]``: wall seconds with the device synchronised at both ends."""
    out = {}
    sync(device)
    t0 = time.perf_counter()
    yield out
    sync(device)
    out["s"] = time.perf_counter() - t0


@dataclass
class StepResult:
    """One timed window of training steps (warm-up excluded)."""

    seconds: float
    tokens: int
    examples: int
    flops: float
    peak_bytes: int | None  # None: not measured in this run (CPU timing runs; see measure.PeakMemory)
    steps: int
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds
