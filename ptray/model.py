"""Load a frozen causal LM and run it with a soft prompt, computing logits only where they are needed.

The LM head of bloomz-560m is a 250,880 x 1,024 matmul per position; a prompt-tuning loss needs it only at the
answer positions (a handful per example), so ``answer_logprobs`` runs the backbone over the whole sequence and the
head only at those positions. ``tests/test_model.py`` checks it against the full model's logits and loss.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ptray import families
from ptray.batching import Batch
from ptray.errors import PtrayError
from ptray.prompt import prepend

DEFAULT_MODEL = "bigscience/bloomz-560m"


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


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
        precision = "no"  # autocast on CPU is slower here and changes results; keep CPU runs exact
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return device, precision


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries ptray's numbers depend on, as run params (``torch_version``, ...)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[f"{name}_version"] = version(name)
        except PackageNotFoundError:
            out[f"{name}_version"] = "not installed"
    return out


def model_dtype(precision: str) -> torch.dtype:
    """Weights dtype for a precision: frozen weights in bf16 halve memory and time; fp16 keeps fp32 weights
    (autocast with loss scaling is the stable fp16 recipe)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` by Hub name or local path; the model is in eval mode with no gradients.

    A local folder loads offline. A Hub name is looked up in the local cache first; if it is not cached and the Hub
    cannot be reached, the error says so at once (instead of after transformers' retries) and how to pass a path.
    A model outside the tested families (``ptray.families.FAMILIES``) is checked against its own forward here;
    every failure raises PtrayError in one line.
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
    elif _looks_like_path(name):
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except PtrayError:
        raise
    except Exception as err:
        raise PtrayError(f"could not load model {name!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise PtrayError(f"the tokenizer of {name!r} has no EOS token; exact match needs one")
    model.eval()
    model.requires_grad_(False)
    families.family(model)  # a family outside the tested set is checked now, or refused naming the failed check
    return model, tokenizer


def answer_logprobs(model, batch: Batch, prompt: torch.Tensor | None = None):
    """Log-probabilities at the answer positions of ``batch`` with ``prompt`` [n, embed_dim] prepended (or none).

    Returns ``(token_logprob [A], argmax_ok [A])``: the log-probability of each answer token (fp32) and whether it
    is the greedy choice. Only the backbone runs over all positions; the LM head (with the family's final logit
    soft-capping, ``ptray.families.logits``) runs at the A answer positions. Right padding: positions are the
    model's defaults, as in PEFT.
    """
    embeds = families.embed(model, batch.input_ids)
    mask = batch.attention_mask
    n = 0
    if prompt is not None:
        n = prompt.shape[0]
        embeds, mask = prepend(prompt, embeds, mask)
    hidden = families.base_forward(model, embeds, mask).last_hidden_state
    selected = hidden[batch.ans_seq, batch.ans_pos + n]
    logits = families.logits(model, selected)
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprob = logprobs.gather(1, batch.ans_tokens.unsqueeze(1)).squeeze(1)
    argmax_ok = logits.argmax(dim=-1) == batch.ans_tokens
    return token_logprob, argmax_ok
