"""Build a tiny BLOOM with random weights and a byte-level BPE tokenizer trained offline.

Tests and smoke runs use it where bloomz-560m cannot be downloaded. ``--shape bloomz-560m`` writes a model with
bloomz-560m's exact config (random weights) for speed and memory work.

    python -m ptray.lm.tiny_model OUT_DIR            # ~1 MB, loads with --model OUT_DIR
    python -m ptray.lm.tiny_model OUT_DIR --shape bloomz-560m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptray.cli import seed_int
from ptray.data.tasks import TASKS
from ptray.errors import PtrayError
from ptray.files import atomic_folder

# BLOOM's special tokens, at BLOOM's ids.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# bloomz-560m's config.json (hidden 1024, 24 layers, 16 heads, vocab 250880).
BLOOMZ_560M = dict(
    vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, layer_norm_epsilon=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=3, apply_residual_connection_post_layernorm=False,
)


def _corpus() -> list[str]:
    """A small English corpus: the tasks' init texts, templates and answer words, plus filler sentences."""
    lines = []
    for task in TASKS.values():
        lines += [task.init_text, *task.answers, "Premise: Hypothesis: Answer: Text: Does the pronoun refer to"]
        lines += ["What was the cause? What happened as a result? 1: 2:"]
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "She said that the weather was nice, but he did not believe her.",
        "A man went to the store because he needed some milk and bread for the children.",
        "It was a complex language. Not written down but handed down.",
        "The company announced on Monday that its profits had risen by ten percent.",
        "My eyes became red and puffy. I was sobbing. I was laughing.",
        "Jane gave Joan candy because she was hungry.",
    ]
    return lines * 20


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer (like BLOOM's) trained on a built-in corpus; any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="right",
    )


def build(out_dir: str | Path, shape: str = "tiny", seed: int = 0, hidden_size: int = 64, n_layer: int = 2,
          n_head: int = 4) -> Path:
    """Write a random-weight BLOOM and its tokenizer to ``out_dir`` (whole or not at all); returns the path.

    Raises:
        PtrayError: ``out_dir`` is not empty, an unknown ``shape``, or the disk is full (nothing left behind).
    """
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PtrayError(f"output directory {str(out)!r} is not empty; choose a new one")
    tokenizer = build_tokenizer()
    if shape == "tiny":
        config = BloomConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, n_layer=n_layer, n_head=n_head,
            bos_token_id=1, eos_token_id=2, pad_token_id=3,
            # 10x BLOOM's 0.02: with tiny std the random model's output ignores its input and nothing can be
            # learned; at 0.2 a CB prompt's eval loss falls from 6.4 to 2.6 in 3 epochs.
            initializer_range=0.2,
        )
    elif shape == "bloomz-560m":
        config = BloomConfig(**BLOOMZ_560M)
    else:
        raise PtrayError(f"unknown shape {shape!r}; valid shapes: tiny, bloomz-560m")
    torch.manual_seed(seed)
    model = BloomForCausalLM(config)
    # whole or not at all: a model folder without its tokenizer (a full disk) would fail every later load
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m ptray.lm.tiny_model OUT_DIR``: build the tiny model there; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ptray.lm.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the model and tokenizer to (must be new or empty)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "bloomz-560m"], help="model size")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for the random weights (0 to 2**32 - 1)")
    args = parser.parse_args(argv)
    try:
        path = build(args.out_dir, shape=args.shape, seed=args.seed)
    except PtrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a {args.shape} BLOOM with random weights to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
