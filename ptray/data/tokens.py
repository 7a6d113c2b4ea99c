"""Token ids as ptray needs them from a tokenizer: text without special tokens, the special tokens the tokenizer
puts before a text by default (BOS), the pad id, and each answer's ids in context. Tokenizer-only: no model, no torch.

Special tokens follow the tokenizer's own default: a source (the text a prompt is prepended to) starts with whatever
``tokenizer(text)`` puts before the text (``special_prefix``: Llama's ``<s>``, Gemma's ``<bos>``, OPT's ``</s>``;
nothing for BLOOM, GPT-2, Qwen2), then the text's ids. Nothing is put after the source: the answer follows it and
the answer's end is the EOS the model predicts (``ptray.lm.special.end_ids``).
"""

from __future__ import annotations

from ptray.errors import PtrayError


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (what a prompt's init text and a source are made of)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_PROBE = "Answer: yes"


def special_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer(text)`` puts before a text by default (its BOS, if it adds one; [] for BLOOM and GPT-2).

    Found by comparing ``tokenizer(probe)`` with ``tokenizer(probe, add_special_tokens=False)``, so whatever the
    tokenizer's post-processor does (``add_bos_token``, a template) is followed. Raises PtrayError when the plain ids
    are not a contiguous part of the default ones (the tokenizer's special tokens change the text's own ids).
    """
    plain = token_ids(tokenizer, _PROBE)
    full = list(tokenizer(_PROBE)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    raise PtrayError(
        f"cannot tell which special tokens the tokenizer adds: {_PROBE!r} gives {full} by default and {plain} "
        f"without special tokens; use a tokenizer whose special tokens only surround the text"
    )


def source_ids(tokenizer, text: str, prefix: list[int] | None = None) -> list[int]:
    """The ids of a source ``text`` as the tokenizer starts a text by default: ``special_prefix`` (its BOS), then
    the text's ids without special tokens. ``prefix``: the tokenizer's ``special_prefix``, if already known."""
    return (special_prefix(tokenizer) if prefix is None else prefix) + token_ids(tokenizer, text)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id: pads are masked out, so any id will do."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_ids_in_context(tokenizer, source_text: str, answers: tuple[str, ...] | list[str]) -> tuple[list[int], ...]:
    """Each answer's token ids as the tokenizer produces them after ``source_text`` (the text ending in the cue).

    Tokenised alone, an answer can come out differently: a Llama-2-style SentencePiece tokenizer (legacy) gives
    " no" alone as ['▁', '▁no'] but ['▁no'] after "Answer:". Greedy decoding continues the source's tokens, so the
    in-context ids are the ones exact match must compare with: ids(source + answer) minus the ids of the source.
    Raises PtrayError when the source's ids are not a prefix (the tokenizer merges the cue with an answer).
    """
    source = token_ids(tokenizer, source_text)
    out = []
    for answer in answers:
        full = token_ids(tokenizer, source_text + answer)
        if full[:len(source)] != source or len(full) == len(source):
            raise PtrayError(
                f"the tokenizer merges the end of the source {source_text[-20:]!r} with the answer {answer!r}, so "
                f"the answer has no token ids of its own after the cue; use a tokenizer or template that keeps "
                f"them apart"
            )
        out.append(full[len(source):])
    return tuple(out)
