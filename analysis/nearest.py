"""Nearest vocabulary tokens of prompt rows by cosine similarity (paper 5.1), and tokens as readable text.

``nearest_tokens`` streams the embedding matrix in chunks and keeps a running top-k, so bloomz-560m's
250,880 x 1,024 matrix needs one [rows, chunk] similarity block at a time, not a normalised copy of the matrix.
"""

from __future__ import annotations

import collections
import time
import unicodedata
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from analysis import figures
from analysis.inputs import Inputs
from analysis.records import PromptRun
from analysis.results import Output, Section

Transform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def nearest_tokens(rows: torch.Tensor, embedding: torch.Tensor, k: int = 3, chunk: int = 32768,
                   transform: Transform | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens by cosine similarity for every row.

    rows [m, hidden], embedding [vocab, hidden] -> (cosine [m, k] fp32, token ids [m, k] int64), most similar
    first. ``transform`` (e.g. the model's input LayerNorm) is applied to the rows and to every embedding row
    before the comparison; None compares the vectors as given.

    Space: the analysis passes every token's input vector (``analysis.inputs.input_vectors``: the model's
    input-embedding module's output, the space the soft prompt lives in; for a plain embedding its weight rows).
    Gemma2's sqrt(hidden) scale multiplies every row alike, so its raw weight rows would give the same cosines.

    Raises:
        ValueError: rows and embedding are not [m, h] and [V, h].
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
    r"""The exact text of one token. Byte-level BPE pieces are turned back into bytes and decoded as UTF-8; a piece
    that is only part of a character keeps its bytes as ``\xNN`` escapes (``decode`` would give U+FFFD)."""
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
    r"""``text`` with whitespace and invisible characters made visible: space -> ␣, newline -> \n, other control,
    format or unassigned characters -> \uXXXX. Printable characters of any script are kept as they are."""
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


# ----------------------------------------------------------------------------------------------- scripts
COMMON = "Common"  # a token without letters (punctuation, digits, spaces, symbols, byte pieces): any script's
SPECIAL = "Special"  # a special token (<bos>, </s>, <pad>): no script


def letter_script(ch: str) -> str | None:
    """The Unicode script of a letter or combining mark, from its Unicode name (``analysis.fonts.script_of``:
    "Latin", "Cyrillic", "Arabic", "CJK", "Hiragana", "Devanagari", "Gurmukhi", "Kannada"...); None for anything
    else (digits, punctuation, spaces, symbols: shared by every script). Fullwidth and halfwidth forms count as
    the script they are a form of (FULLWIDTH LATIN SMALL LETTER A is Latin)."""
    if unicodedata.category(ch)[0] not in "LM":
        return None
    words = unicodedata.name(ch, "").split()
    if len(words) > 1 and words[0] in ("FULLWIDTH", "HALFWIDTH"):
        words = words[1:]
    if not words:
        return f"U+{ord(ch):04X}"
    return "CJK" if words[0] == "CJK" else words[0].title()


def text_scripts(text: str) -> frozenset[str]:
    """The scripts of the letters in ``text`` (empty: no letters)."""
    return frozenset(filter(None, map(letter_script, text)))


def token_script(text: str, special: bool = False) -> str:
    """One label for a token's script: its letters' script ("Latin", "Arabic", "CJK"), several joined by "+"
    ("CJK+Hiragana"), ``COMMON`` without letters, ``SPECIAL`` for a special token."""
    if special:
        return SPECIAL
    scripts = text_scripts(text)
    return "+".join(sorted(scripts)) if scripts else COMMON


def in_other_script(script: str, init_scripts: frozenset[str]) -> bool:
    """Whether a token labelled ``script`` (``token_script``) has letters of a script the init text does not use.
    Tokens without letters and special tokens never do. Languages that share the init text's script (French or
    German words next to an English init text) are not told apart: for them this is a lower bound."""
    if script in (COMMON, SPECIAL) or not init_scripts:
        return False
    return bool(set(script.split("+")) - init_scripts)


# ----------------------------------------------------------------------------------------------- report section
def init_token_ids(p: PromptRun, tokenizer) -> list[int]:
    """The token ids prompt ``p``'s rows started from ([n], the init text repeated / cut to n), [] without one."""
    from ptray.data.tokens import token_ids
    from ptray.lm.prompt import repeat_to

    text = p.config.get("init_text")
    if not text:
        return []
    return repeat_to(token_ids(tokenizer, text), p.num_tokens)


def _is_special(tokenizer, token_id: int) -> bool:
    return int(token_id) in set(getattr(tokenizer, "all_special_ids", ()))


def script_shares(ids: torch.Tensor, init_ids: list[int], init_scripts: frozenset[str],
                  script_of_id: Callable[[int], str]) -> dict[str, float]:
    """For one prompt's rows' top-k token ids [n, k] (most similar first): ``top1_is_init_token``, the share of
    rows whose nearest token is the row's init token; ``rows_other_script``, the share of rows with at least one of
    their k neighbours in a script the init text does not use (``in_other_script``); ``neighbours_other_script``,
    the share of all n x k neighbours that are. NaN where the prompt has no init text."""
    if not init_ids:
        return {"top1_is_init_token": float("nan"), "rows_other_script": float("nan"),
                "neighbours_other_script": float("nan")}
    other = torch.tensor([[in_other_script(script_of_id(int(t)), init_scripts) for t in row] for row in ids.tolist()],
                         dtype=torch.bool).reshape(ids.shape)
    return {"top1_is_init_token": float((ids[:, 0] == torch.tensor(init_ids)).float().mean()),
            "rows_other_script": float(other.any(1).float().mean()),
            "neighbours_other_script": float(other.float().mean())}


def nearest_section(*, inputs: Inputs, tokenizer, top_k: int, chunk: int
                    ) -> tuple[Section, dict[str, list[torch.Tensor]]]:
    """Nearest tokens of every prompt row, raw and (when defined) effective: the paper's Figures 2-5, with the
    Unicode script of every neighbour, and per prompt how many rows keep their init token and how many have
    neighbours in another script than the init text, at init and at the best epoch (the stored prompt).

    Returns ``(section, top1)``: an ``analysis.results.Section`` (one token figure per task and space, the
    summary tables) and ``top1[space]``, per prompt the [n_i] top-1 token ids (the faithfulness check's hard
    prompts).
    """
    prompts = inputs.prompts
    rows = torch.cat(inputs.raw)
    spaces = {"raw": None} if inputs.transform is None else {"raw": None, "effective": inputs.transform}
    offsets = np.cumsum([0] + [p.num_tokens for p in prompts])
    init_ids = [init_token_ids(p, tokenizer) for p in prompts]
    init_scripts = [text_scripts(p.config.get("init_text") or "") for p in prompts]
    scripts: dict[int, str] = {}

    def script_of_id(tid: int) -> str:
        if tid not in scripts:
            scripts[tid] = token_script(token_text(tokenizer, tid), _is_special(tokenizer, tid))
        return scripts[tid]

    # the rows a text-initialised prompt started from: its init tokens' input vectors (what training starts from,
    # ``ptray.lm.prompt.init_prompt``); runs store the best epoch's prompt only, so init -> best is the movement
    # (each distinct init token searched once: the seeds of a task share their init rows)
    distinct = sorted({t for ids in init_ids for t in ids})
    where = {t: j for j, t in enumerate(distinct)}
    top1: dict[str, list[torch.Tensor]] = {}
    records, shares, timing = [], [], {}
    for space, transform in spaces.items():
        t0 = time.perf_counter()
        # one pass over the vocabulary for the trained rows and the init rows together
        starts = inputs.embedding[torch.tensor(distinct, dtype=torch.long)]
        sims, ids = nearest_tokens(torch.cat([rows, starts]), inputs.embedding, top_k, chunk, transform)
        sims, ids, start_ids = sims[:len(rows)], ids[:len(rows)], ids[len(rows):]
        timing[space] = round(time.perf_counter() - t0, 3)
        top1[space] = [ids[offsets[i]:offsets[i + 1], 0].clone() for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            init_set = set(init_ids[i])
            for row in range(p.num_tokens):
                init_id = init_ids[i][row] if init_ids[i] else None
                for rank in range(ids.shape[1]):
                    tid = int(ids[offsets[i] + row, rank])
                    text = token_text(tokenizer, tid)
                    records.append({
                        "space": space, "task": p.task, "seed": p.seed, "row": row, "rank": rank,
                        "token_id": tid, "token": text, "token_visible": visible(text),
                        "token_escaped": escaped(text), "cosine": float(sims[offsets[i] + row, rank]),
                        "script": script_of_id(tid), "other_script": in_other_script(script_of_id(tid),
                                                                                     init_scripts[i]),
                        "in_init_text": tid in init_set, "init_token_id": init_id,
                        "init_token": visible(token_text(tokenizer, init_id)) if init_id is not None else "",
                    })
            best = script_shares(ids[offsets[i]:offsets[i + 1]], init_ids[i], init_scripts[i], script_of_id)
            start = script_shares(start_ids[[where[t] for t in init_ids[i]]], init_ids[i], init_scripts[i],
                                  script_of_id) if init_ids[i] else best
            others = collections.Counter(script_of_id(int(t)) for t in ids[offsets[i]:offsets[i + 1]].flatten()
                                         if in_other_script(script_of_id(int(t)), init_scripts[i]))
            shares.append({"space": space, "task": p.task, "seed": p.seed, "prompt": p.label,
                           "init_scripts": "+".join(sorted(init_scripts[i])), "best_epoch": p.metrics.get("best_epoch"),
                           **{f"{k}_{stage}": v for k in best for stage, v in (("init", start[k]), ("best", best[k]))},
                           "other_scripts_best": ", ".join(f"{k} {n}" for k, n in others.most_common())})
    table = pd.DataFrame(records)
    moves = pd.DataFrame(shares)
    stats = []
    for (space, task), g in table.groupby(["space", "task"], sort=False):
        first = g[g["rank"] == 0]
        m = moves[(moves["space"] == space) & (moves["task"] == task)]
        stats.append({"space": space, "task": task,
                      "top1_is_init_token": float((first["token_id"] == first["init_token_id"]).mean()),
                      "topk_in_init_text": float(g["in_init_text"].mean()),
                      "mean_top1_cosine": float(first["cosine"].mean()),
                      "rows_other_script_init": float(m["rows_other_script_init"].mean()),
                      "rows_other_script": float(m["rows_other_script_best"].mean()),
                      "neighbours_other_script": float(g["other_script"].mean())})
    stats = pd.DataFrame(stats)
    out = Section(summary={"nearest": stats.to_dict(orient="records"),
                           "nearest_scripts": moves.to_dict(orient="records")},
                  meta={"nearest_seconds": timing})
    if inputs.transform is None:
        out.notes.append("effective nearest tokens: n/a for this model (" + (
            "no effective prompt defined" if inputs.effective is None else
            "its effective rows depend on their position, so the vocabulary has no effective rows") + ")")
    for space in spaces:
        where = "raw rows (the paper's reading) against every token's input vector" if space == "raw" else \
            f"effective rows (the output of {inputs.effective_name}: what the model's first attention reads), " \
            f"against vocabulary rows through the same map"
        for task in inputs.tasks:
            sub = table[(table["space"] == space) & (table["task"] == task)].reset_index(drop=True)
            init_text = next(p.config.get("init_text", "") for p in prompts if p.task == task)
            out.outputs.append(Output(
                f"nearest_{task}" + ("" if space == "raw" else "_effective"), "nearest",
                f"{task.upper()}: nearest tokens, {space}",
                f"Top-{top_k} vocabulary tokens by cosine similarity for every row of every {task.upper()} "
                f"prompt, on {where}. Rows top to bottom, most similar left, one block per seed; the first "
                f"column is the init-text token the row started from; red tokens occur in the init text; a "
                f"token in another script than the init text's has its script in blue under it (the CSV's "
                f"script column has every token's).",
                sub, figures.nearest_figure(sub, task, f"{task.upper()} prompt, {space}: \"{init_text}\""),
                show_table=False))
    out.outputs.append(Output(
        "nearest_summary", "nearest", "How much of the init text survives",
        "Per task and space, means over seeds: top1_is_init_token = share of rows whose top-1 token is the row's "
        "init token; topk_in_init_text = share of the top-k tokens that occur anywhere in the init text; "
        "mean_top1_cosine = mean cosine of the top-1 token over rows and seeds; rows_other_script = share of rows "
        "with at least one top-k token in a script the init text does not use (rows_other_script_init: the same "
        "for the init prompt, before training); neighbours_other_script = share of all top-k tokens in such a "
        "script.", stats))
    out.outputs.append(Output(
        "nearest_scripts", "nearest", "Other scripts among the neighbours, init -> best epoch",
        "Per prompt (task, seed) and space, at init (the init text's input vectors, where training starts) and "
        "at the best epoch (the stored prompt; runs keep no other epoch's prompt): top1_is_init_token_* = share "
        "of rows whose nearest token is still the row's init token; rows_other_script_* = share of rows with at "
        "least one of the top-k neighbours in a script the init text does not use; neighbours_other_script_* = "
        "share of all top-k neighbours in such a script; other_scripts_best counts those neighbours by script. "
        "Scripts come from the Unicode names of a token's letters (digits, punctuation and spaces belong to no "
        "script); languages are not told apart, so a French or German neighbour of an English init text counts "
        "as the same script: the shares are lower bounds of 'another language'. NaN: a prompt without an init "
        "text.", moves))
    return out, top1
