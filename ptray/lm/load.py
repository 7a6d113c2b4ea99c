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


def resolve_device_precision(device: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """(device, precision) actually used: a GPU when asked or available, bf16 where supported, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PtrayError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    device = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if device == "cpu":
        if precision in ("bf16", "fp16"):  # asked for explicitly: say that it is not what runs
            log.warning("--precision %s is for GPUs: on CPU ptray runs fp32 (precision no, recorded so in the run's "
                        "config); autocast on CPU is slower here and changes results", precision)
        precision = "no"  # autocast on CPU is slower here and changes results; keep CPU runs exact
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
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
    model.eval()
    model.requires_grad_(False)
    check_model(model)  # a family outside the tested set is checked now, or refused naming the failed check
    return model, tokenizer


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


def setup_model(name_or_path: str, device: str, precision: str, compile: bool = False, attention: str = "eager",
                fold_alibi: bool = False, loaded=None):
    """The frozen model on its device, for training and evaluation alike: ``(model, tokenizer, accelerator)``.

    ``device`` and ``precision`` are resolved values (``resolve_device_precision``); weights load in
    ``model_dtype(precision)``; ``attention`` (resolved: eager or fused) "fused" runs BLOOM's attention through
    ``ptray.lm.attention.use_fused_attention`` (``fold_alibi`` passed to it; other families are left as loaded);
    ``compile`` compiles each block (``compile_blocks``) after that. ``loaded``: a ``(model, tokenizer)`` already
    loaded (a benchmark's), used instead of loading ``name_or_path`` again (its special ids checked as
    ``load_model`` checks them). Raises ``PtrayError`` when the model cannot be loaded or a special id the run uses
    is outside its embeddings.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    if loaded is None:
        model, tokenizer = load_model(name_or_path, dtype=model_dtype(precision))
        model.to(accelerator.device)
    else:
        model, tokenizer = loaded
        check_special_ids(model, tokenizer)
    if attention == "fused":
        from ptray.lm.attention import use_fused_attention

        use_fused_attention(model, fold_alibi=fold_alibi)
    if compile:
        compile_blocks(model)
    return model, tokenizer, accelerator
