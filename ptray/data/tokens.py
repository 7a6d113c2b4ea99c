"""Token ids as ptray needs them from a tokenizer: text without special tokens, the pad id, and each answer's ids
in context. Tokenizer-only: no model, no torch."""

from __future__ import annotations

from ptray.errors import PtrayError


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (what a prompt's init text and a source are made of)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
