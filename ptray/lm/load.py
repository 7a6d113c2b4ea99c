"""Load a frozen causal LM and run it with a soft prompt, computing logits only where they are needed.

The LM head of bloomz-560m is a 250,880 x 1,024 matmul per position; a prompt-tuning loss needs it only at the
answer positions (a handful per example), so ``answer_logprobs`` runs the backbone over the whole sequence and the
head only at those positions. ``tests/test_model.py`` checks it against the full model's logits and loss.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ptray.errors import PtrayError
from ptray.files import looks_like_path
from ptray.lm import families
from ptray.lm.check import check_model
from ptray.lm.special import check_special_ids

log = logging.getLogger("ptray")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def cpu_bf16_unit() -> str | None:
    """The native bf16 matmul unit of this CPU, as torch's CPU capability checks report it: ``"amx"`` (Intel AMX
    tiles, Sapphire Rapids and later), ``"avx512_bf16"`` (AVX512-BF16 dot products: Cooper Lake, AMD Zen 4 and
    later), or None (bf16 would be emulated in fp32 arithmetic, slower than fp32: on such a CPU ptray runs fp32).

    Source: ``torch.cpu._is_amx_tile_supported`` / ``torch.cpu._is_avx512_bf16_supported`` (cpuinfo, the checks
    oneDNN's bf16 kernels dispatch on). ARM's bf16 extensions are not reported by torch: fp32 there.
    """
    for unit, check in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        supported = getattr(torch.cpu, check, None)
        if supported is not None and supported():
            return unit
    return None


_said: set[tuple[str, str, str]] = set()


def _say_once(device: str, asked: str, precision: str, why: str) -> None:
    """Log the precision that runs, once per process and (device, asked, resolved)."""
    key = (device, asked, precision)
    if key not in _said:
        _said.add(key)
        log.info("precision %s on %s (asked: %s; %s)", precision, device, asked, why)


def resolve_device_precision(device: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """``(device, precision)`` that actually run, from the ``--device`` and ``--precision`` asked for.

    Device: CUDA when asked or (auto) available. Precision (the mixed-precision convention on both: frozen weights
    in bf16, the soft prompt and its optimizer state in fp32, saved prompts fp32):

    - GPU: auto is bf16 where the GPU supports it, else fp16; bf16/fp16/no as asked.
    - CPU: auto is bf16 where the CPU has a native bf16 unit (``cpu_bf16_unit``: ~4x the fp32 matmul rate on
      AVX512-BF16, measured in BENCHMARKS.md), else exact fp32 ("no"); bf16 is honoured (with a warning where the
      unit is missing: emulated bf16 is slower than fp32); fp16 runs fp32 (no CPU fp16 path), said; no is exact
      fp32.

    The resolved pair is what a run records (config.json's ``precision``, MLflow params) and is logged once.
    Raises PtrayError for ``--device cuda`` without a GPU.
    """
    asked = precision
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PtrayError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    device = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if device == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        _say_once(device, asked, precision, "GPU")
        return device, precision
    unit = cpu_bf16_unit()
    if precision == "bf16" and unit is None:  # honoured, as asked; said, as it is slow
        log.warning("--precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX, as torch reports it): "
                    "bf16 is emulated there and slower than fp32; --precision auto picks fp32 on this CPU")
    if precision == "fp16":
        log.warning("--precision fp16 is for GPUs: on CPU ptray runs fp32 (precision no, recorded so in the run's "
                    "config); --precision bf16 is the CPU's half precision where the CPU has it")
        precision = "no"
    elif precision == "auto":
        precision = "bf16" if unit is not None else "no"
    why = f"this CPU's bf16 unit: {unit}" if unit else "this CPU has no native bf16 unit"
    _say_once(device, asked, precision, why)
    return device, precision


def model_dtype(precision: str) -> torch.dtype:
    """Weights dtype for a precision: frozen weights in bf16 halve memory and time; fp16 keeps fp32 weights
    (autocast with loss scaling is the stable fp16 recipe)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` by Hub name or local path; the model is in eval mode with no gradients.

    A local folder loads offline. A Hub name is looked up in the local cache first; if it is not cached and the Hub
    cannot be reached, the error says so at once (instead of after transformers' retries) and how to pass a path.
    A model outside the tested families (``ptray.lm.families.FAMILIES``) is checked against its own forward here;
    every special id the run uses (pad, the tokenizer's BOS, the EOS ids of ``ptray.lm.special.end_ids``) must be
    a row of the model's embeddings (``check_special_ids``). Every failure raises PtrayError in one line.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import cached_file

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise PtrayError(f"model folder {name!r} has no config.json; pass a folder written by save_pretrained")
        kwargs = {}
        source = str(local)
    elif looks_like_path(name):
        raise PtrayError(f"model path {name!r} does not exist; pass --model with a Hub name or an existing folder")
    else:
        source = name
        try:  # cached copies load without the network
            cached_file(name, "config.json", local_files_only=True)
            kwargs = {"local_files_only": True}
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
                raise PtrayError(
                    f"cannot reach the Hugging Face Hub to download {name!r} and it is not in the local cache; "
                    f"download it where the Hub is reachable (e.g. `hf download {name} --local-dir DIR`) "
                    f"and pass --model DIR"
                ) from None
            kwargs = {}
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar on stderr would bury a one-line error after it
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except PtrayError:
        raise
    except Exception as err:
        raise PtrayError(f"could not load model {name!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.eos_token_id is None:
        raise PtrayError(f"the tokenizer of {name!r} has no EOS token; exact match needs one")
    check_special_ids(model, tokenizer)  # e.g. a pad token added to the tokenizer, the embeddings not resized
    keep_attention_softcap(model)
    model.eval()
    model.requires_grad_(False)
    check_model(model)  # a family outside the tested set is checked now, or refused naming the failed check
    return model, tokenizer


def keep_attention_softcap(model) -> bool:
    """Run a model whose attention soft-caps its logits (``config.attn_logit_softcapping``: Gemma 2) with Hugging
    Face's eager attention when it loaded another. transformers < 5 loads Gemma 2 with SDPA, which silently drops
    the cap (its ``sdpa_attention_forward`` ignores ``softcap``), so the model computed would not be the model's
    definition; transformers 5 picks eager itself (its SDPA refuses a soft cap). Returns whether it switched.

    Raises:
        PtrayError: the model needs the switch and cannot make it.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is None:
        return False
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager", "flex_attention"):
        return False
    if not use_eager_attention(model):
        raise PtrayError(f"{type(model).__name__} soft-caps its attention logits, which its {current} attention "
                         f"drops, and it cannot switch to eager attention here; upgrade transformers (5 loads it "
                         f"eager)")
    log.info("%s: eager attention, as its attention soft cap needs it", type(model).__name__)
    return True


def compile_blocks(model) -> None:
    """``torch.compile`` each transformer block in place (regional compilation: the identical blocks share one
    compiled graph, so compiling takes seconds, not minutes); dynamic shapes, as batch lengths vary."""
    base = families.base_model(model)
    blocks = getattr(base, "h", None) or getattr(base, "layers", None)
    if blocks is None:
        raise PtrayError(f"--compile does not know where {type(model).__name__}'s transformer blocks are "
                         f"(base_model.h or base_model.layers); run without --compile")
    for block in blocks:
        block.compile(dynamic=True)


def accelerator_for(device: str, precision: str):
    """An ``accelerate.Accelerator`` for a resolved ``(device, precision)``.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second Accelerator with another mixed
    precision ("AcceleratorState has already been initialized and cannot be changed"). One process may run several
    precisions in turn (a reused Ray worker, a benchmark comparing fp32 and bf16, the tests): the mixed-precision
    part of the state is reset first when it differs (``AcceleratorState._reset_state``, which accelerate's own
    tests use; the process/device part, ``PartialState``, is kept). Runs never overlap inside one process.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


def use_eager_attention(model) -> bool:
    """Run ``model``'s attention as Hugging Face's eager implementation (matmuls and a softmax) where it runs
    another (SDPA). On CPU this is faster for prompt tuning's short sequences: a bf16 training step of SmolLM2-135M
    spent ~25% of its time in SDPA's CPU flash kernel (its backward alone ~20%), and eager attention trained ~1.15x
    faster (BENCHMARKS.md, "CPU: mixed precision and the real model"). BLOOM is eager already. Returns whether
    the model was switched; a family that cannot switch is left as it is (its attention is then the reference)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "eager"):
        return False
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError, NotImplementedError) as err:
        log.debug("%s keeps %s attention (%s)", type(model).__name__, current, err)
        return False
    return True


def setup_model(name_or_path: str, device: str, precision: str, compile: bool = False, attention: str = "eager",
                fold_alibi: bool = False, loaded=None):
    """The frozen model on its device, for training and evaluation alike: ``(model, tokenizer, accelerator)``.

    ``device`` and ``precision`` are resolved values (``resolve_device_precision``); weights load in
    ``model_dtype(precision)``; ``attention`` (resolved: eager or fused) "fused" runs BLOOM's attention through
    ``ptray.lm.attention.use_fused_attention`` (``fold_alibi`` passed to it; other families are left as loaded,
    with the attention Hugging Face picked, SDPA where it can); "eager" runs every family's Hugging Face eager
    attention (``use_eager_attention``);
    ``compile`` compiles each block (``compile_blocks``) after that. ``loaded``: a ``(model, tokenizer)`` already
    loaded (a benchmark's), used instead of loading ``name_or_path`` again (its special ids checked as
    ``load_model`` checks them). Raises ``PtrayError`` when the model cannot be loaded or a special id the run uses
    is outside its embeddings.
    """
    accelerator = accelerator_for(device, precision)
    if loaded is None:
        model, tokenizer = load_model(name_or_path, dtype=model_dtype(precision))
        model.to(accelerator.device)
    else:
        model, tokenizer = loaded
        check_special_ids(model, tokenizer)
    if attention == "fused":
        from ptray.lm.attention import use_fused_attention

        use_fused_attention(model, fold_alibi=fold_alibi)
    else:
        use_eager_attention(model)
    if compile:
        compile_blocks(model)
    return model, tokenizer, accelerator
