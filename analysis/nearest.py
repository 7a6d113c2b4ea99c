"""Nearest vocabulary tokens of prompt rows by cosine similarity (paper 5.1), and tokens as readable text.

``nearest_tokens`` streams the embedding matrix in chunks and keeps a running top-k, so bloomz-560m's
250,880 x 1,024 matrix needs one [rows, chunk] similarity block at a time, not a normalised copy of the matrix.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def nearest_tokens(rows: torch.Tensor, embedding: torch.Tensor, k: int = 3, chunk: int = 32768,
                   transform: Transform | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens by cosine similarity for every row.

    rows [m, hidden], embedding [vocab, hidden] -> (cosine [m, k] fp32, token ids [m, k] int64), most similar
    first. ``transform`` (e.g. the model's input LayerNorm) is applied to the rows and to every embedding row
    before the comparison; None compares the raw vectors.
    """
    if rows.ndim != 2 or embedding.ndim != 2 or rows.shape[1] != embedding.shape[1]:
        raise ValueError(f"rows {tuple(rows.shape)} and embedding {tuple(embedding.shape)} must be [m, h], [V, h]")
    k = min(k, embedding.shape[0])
    q = rows.detach().float()
    if transform is not None:
        q = transform(q)
    q = torch.nn.functional.normalize(q, dim=1)
    best_sim = torch.full((q.shape[0], 0), -2.0)
    best_ids = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, embedding.shape[0], chunk):
        block = embedding[start:start + chunk].detach().float()
        if transform is not None:
            block = transform(block)
        sims = q @ torch.nn.functional.normalize(block, dim=1).T  # [m, chunk]
        top_sim, top_ids = sims.topk(min(k, sims.shape[1]), dim=1)
        cand_sim = torch.cat([best_sim, top_sim], dim=1)
        cand_ids = torch.cat([best_ids, top_ids + start], dim=1)
        keep = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1).indices
        best_sim, best_ids = cand_sim.gather(1, keep), cand_ids.gather(1, keep)
    return best_sim, best_ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies (BLOOM's) are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(backend.decoder.__class__.__name__ + repr(backend.decoder))


def token_text(tokenizer, token_id: int) -> str:
    """The exact text of one token. Byte-level BPE pieces are turned back into bytes and decoded as UTF-8; a piece
    that is only part of a character keeps its bytes as ``\\xNN`` escapes (``decode`` would give U+FFFD)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return f"<id {int(token_id)}>"
    if piece in getattr(tokenizer, "all_special_tokens", ()):
        return piece
    if _is_byte_level(tokenizer) and all(c in _UNICODE_TO_BYTE for c in piece):
        return bytes(_UNICODE_TO_BYTE[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)


_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible(text: str) -> str:
    """``text`` with whitespace and invisible characters made visible: space -> ␣, newline -> \\n, other control,
    format or unassigned characters -> \\uXXXX. Printable characters of any script are kept as they are."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch)[0] in "CZ" and ch != "\\":  # controls, formats, odd spaces, unassigned
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def escaped(text: str) -> str:
    """An ASCII-only form of ``text`` (Python's ``ascii`` without quotes): always renders, in any font."""
    return ascii(text)[1:-1]
