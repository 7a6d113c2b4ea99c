"""The special tokens a run uses, decided once from the model and its tokenizer: what starts a source (the
tokenizer's default BOS, ``ptray.data.tokens.special_prefix``), what ends an answer (``end_ids``: the model's
generation config, as ``generate`` stops), the pad id, and the load-time check that each is a row of the model's
embeddings (``check_special_ids``).

What ends an answer. ``generate`` stops at any of ``model.generation_config.eos_token_id`` (an id or a list:
Llama-3-Instruct lists ``<|end_of_text|>`` and ``<|eot_id|>``); the tokenizer's ``eos_token`` may be only one of
them. So exact match accepts any of the model's EOS ids after the answer, and the loss trains one of them: the
tokenizer's EOS when it is one of the model's (it is what a PEFT or ``Trainer`` recipe appends to a text, and every
model where the two agree, BLOOM and GPT-2 among them, trains exactly as before), else the generation config's first.
"""

from __future__ import annotations

from collections.abc import Sequence

from ptray.data.tokens import pad_token_id, special_prefix
from ptray.errors import PtrayError


def model_end_ids(model) -> tuple[int, ...]:
    """The ids greedy ``generate`` stops at: ``model.generation_config.eos_token_id`` (an id or a list), else the
    model config's ``eos_token_id``; () when neither has one. Duplicates removed, order kept."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return ()
    ids = [ids] if isinstance(ids, int) else list(ids)
    return tuple(dict.fromkeys(int(i) for i in ids))


def end_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end an answer, the one trained on first (see the module docstring): the tokenizer's EOS and then
    the model's other EOS ids when it is one of them; else the model's EOS ids (``model_end_ids``); the tokenizer's
    EOS alone when the model names none. Never empty when the tokenizer has an EOS."""
    ends, own = model_end_ids(model), tokenizer.eos_token_id
    if not ends:
        return (own,) if own is not None else ()
    if own in ends:
        return (own, *(i for i in ends if i != own))
    return ends


def answer_ends(model, eos_id: int | Sequence[int]) -> tuple[int, ...]:
    """``eos_id`` as the ids that end an answer (the first trained and scored in the loss): a sequence as given; an
    int that is one of the model's EOS ids (``model_end_ids``) stands for all of them, first, as ``generate`` stops
    at any; another int alone. Raises ValueError for an empty sequence."""
    if isinstance(eos_id, int):
        ends = model_end_ids(model)
        return (eos_id, *(i for i in ends if i != eos_id)) if eos_id in ends else (eos_id,)
    ends = tuple(dict.fromkeys(int(i) for i in eos_id))
    if not ends:
        raise ValueError("eos_id: no id ends an answer; pass at least one")
    return ends


def check_special_ids(model, tokenizer) -> None:
    """Refuse, in one line, a special id the run uses that is not a row of the model's embeddings: the pad id, the
    BOS the tokenizer starts a text with (input rows), and every id that ends an answer (input and output rows). A
    token added to the tokenizer (e.g. a new pad token) without resizing the model is the usual cause; it would
    fail later with a bare IndexError. Raises PtrayError naming the id."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    out_rows = head.weight.shape[0] if head is not None else rows
    used = [("pad", pad_token_id(tokenizer), rows)]
    used += [("BOS (added before each text by the tokenizer)", i, rows) for i in special_prefix(tokenizer)]
    used += [("EOS", i, min(rows, out_rows)) for i in end_ids(model, tokenizer)]
    for what, token, limit in used:
        if token is not None and not 0 <= token < limit:
            raise PtrayError(
                f"the {what} token id {token} is outside the model's {limit} embedding rows (a token added to the "
                f"tokenizer without resizing the model); resize the embeddings (model.resize_token_embeddings("
                f"len(tokenizer)), then save_pretrained) or use another {what.split()[0]} token that the model has"
            )
