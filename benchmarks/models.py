"""Random-weight BLOOMs built in memory (no 2 GB checkpoint written), with ptray's offline tokenizer.

Shapes:

* ``tiny``: ptray.tiny_model's test model (hidden 64, 2 layers); the ``--smoke`` run.
* ``small``: hidden 256, 4 layers, 4 heads (head dim 64 as bloomz-560m), the tokenizer's 1,000-word vocabulary.
  The LM head is 0.08x the blocks' weights, so answer-only logits save little here: a lower bound for CPU.
* ``small-560m-ratio``: ``small`` with a 10,496-word vocabulary, so that LM head / block weights = 0.85 as in
  bloomz-560m (256.9M / 302.0M). Token ids stay below 1,000 (the extra rows are never input, as in BLOOM's padded
  vocabulary); the head's cost per position is the real model's proportion.
* ``bloomz-560m``: bloomz-560m's exact config (``ptray.lm.tiny_model.BLOOMZ_560M``).
"""

from __future__ import annotations

import torch

from ptray.lm.tiny_model import BLOOMZ_560M, build_tokenizer

SHAPES = {
    "tiny": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=None, initializer_range=0.2),
    "small": dict(hidden_size=256, n_layer=4, n_head=4, vocab_size=None),
    "small-560m-ratio": dict(hidden_size=256, n_layer=4, n_head=4, vocab_size=10_496),
    "bloomz-560m": {k: v for k, v in BLOOMZ_560M.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")},
}


def bloom_config(shape: str, vocab_size: int):
    from transformers import BloomConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; valid: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    kw["vocab_size"] = kw["vocab_size"] or vocab_size
    return BloomConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw)


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0, tokenizer=None):
    """``(model, tokenizer)``: a random-weight BLOOM of ``shape`` on ``device`` in ``dtype``, eval mode, frozen,
    as ``ptray.lm.load.load_model`` returns it. The tokenizer is ptray's offline one (built unless given)."""
    tokenizer = tokenizer or build_tokenizer()
    return build_bloom(shape, len(tokenizer), device, dtype, seed), tokenizer


def build_bloom(shape: str, tokenizer_size: int, device: str, dtype: torch.dtype, seed: int = 0):
    """The model alone (for a trial process, which needs no tokenizer). Weights are initialised on ``device``."""
    from transformers import AutoModelForCausalLM

    config = bloom_config(shape, tokenizer_size)
    torch.manual_seed(seed)
    with torch.device(device):  # made in place and in dtype: no fp32 copy of bloomz-560m on the way
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
