"""The forward pass ptray trains and evaluates through: the frozen backbone over prompt + tokens, the LM head only at
the answer positions.

``answer_logprobs`` is one batch with one prompt (or none); ``group_answer_logprobs`` is one training step of a trial
group, each batch with its own prompt, in token-sized passes (``forward_passes``). Both equal the model's own
forward (``tests/test_families.py``, ``tests/test_group.py``).
"""

from __future__ import annotations

import torch

from ptray.data.batching import Batch
from ptray.lm import families
from ptray.lm.attention import right_padded_rows
from ptray.lm.prompt import prepend


def answer_logprobs(model, batch: Batch, prompt: torch.Tensor | None = None,
                    end_ids: torch.Tensor | list[int] | tuple[int, ...] | None = None):
    """Log-probabilities at the answer positions of ``batch`` with ``prompt`` [n, embed_dim] prepended (or none).

    The prompt goes before every input token, the tokenizer's BOS included (prompt rows, BOS, text), as PEFT puts
    it. Returns ``(token_logprob [A], argmax_ok [A])``: the log-probability of each answer token (fp32) and whether
    the greedy choice ends the answer as it should: the token itself, or at an answer's end (``batch.ans_end``) any
    of ``end_ids`` [E] (the ids that end an answer, ``ptray.lm.special.answer_ends``; None: the target only). Only
    the backbone runs over all positions; the LM head (with the family's final logit soft-capping,
    ``ptray.lm.families.logits``) runs at the A answer positions. Right padding: positions are the model's defaults,
    as in PEFT.
    """
    embeds = families.embed(model, batch.input_ids)
    mask = batch.attention_mask
    n = 0
    if prompt is not None:
        n = prompt.shape[0]
        embeds, mask = prepend(prompt, embeds, mask)
    with right_padded_rows():  # prompt rows, then the batch's right-padded tokens
        hidden = families.base_forward(model, embeds, mask).last_hidden_state
    selected = hidden[batch.ans_seq, batch.ans_pos + n]
    logits = families.logits(model, selected)
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprob = logprobs.gather(1, batch.ans_tokens.unsqueeze(1)).squeeze(1)
    return token_logprob, greedy_ok(logits.argmax(dim=-1), batch.ans_tokens, batch.ans_end, end_ids)


def greedy_ok(argmax: torch.Tensor, targets: torch.Tensor, is_end: torch.Tensor,
              end_ids: torch.Tensor | list[int] | tuple[int, ...] | None) -> torch.Tensor:
    """Whether greedy decoding continues as the answer does, per target [A] (bool): ``argmax`` [A] is the target
    [A], or, where ``is_end`` [A] (bool) marks an answer's end, any of ``end_ids`` (``generate`` stops at any of
    the model's EOS ids); None: the target only."""
    ok = argmax == targets
    if end_ids is not None:
        ends = torch.as_tensor(end_ids, dtype=torch.long, device=argmax.device)
        ok = ok | (is_end.to(argmax.device) & torch.isin(argmax, ends))
    return ok


WIDTH_BUCKET = 32  # with a token budget, a forward pass's width is a multiple of this many tokens


def forward_passes(lengths: list[int], max_tokens: int, bucket: int = WIDTH_BUCKET,
                   limit: int | None = None) -> list[tuple[list[int], int]]:
    """Split rows of ``lengths`` tokens into forward passes of at most ``max_tokens`` padded tokens (rows x width).

    Rows go in order of length, shortest first, so rows of like length share a pass and little is padding. A
    pass's width is its longest row rounded up to a multiple of ``bucket`` (at most ``limit``, the model's
    positions, when given): few distinct shapes mean few recompilations under ``torch.compile`` or CUDA graphs, and
    the caching allocator reuses the same blocks step after step. A row wider than the budget gets a pass of its
    own, so every row is in exactly one non-empty pass. Returns ``[(row indices, width), ...]``.
    """
    def width(length: int) -> int:
        w = -(-length // bucket) * bucket
        return max(length, min(w, limit)) if limit else w

    passes: list[tuple[list[int], int]] = []
    rows: list[int] = []
    for r in sorted(range(len(lengths)), key=lengths.__getitem__):
        if rows and (len(rows) + 1) * width(lengths[r]) > max_tokens:  # r is the longest so far: it sets the width
            passes.append((rows, width(lengths[rows[-1]])))
            rows = []
        rows.append(r)
    if rows:
        passes.append((rows, width(lengths[rows[-1]])))
    return passes


def group_answer_logprobs(model, parts: list[tuple[Batch, torch.Tensor]], max_tokens: int = 0,
                          bucket: int = WIDTH_BUCKET) -> list[torch.Tensor]:
    """One step's forward for several (batch, prompt) pairs; each batch's rows get their own prompt [n_i, embed_dim].

    Rows are right-padded to the longest prompt + sequence (causal attention: a row's real tokens never see the
    padding after them). ``max_tokens`` 0 runs all rows in one forward pass; > 0 splits them, by length, into
    passes of at most that many padded tokens, each pass's width a multiple of ``bucket`` (``forward_passes``):
    prompts of different tasks have very different lengths (COPA ~30 tokens, RTE up to 512), and one pass pads
    every row to the longest. Returns, per pair, the log-probability of each answer token [A_i] (fp32), as
    ``answer_logprobs(model, batch_i, prompt_i)[0]`` would.
    """
    embeds, masks, seqs, positions, tokens, counts, lengths = [], [], [], [], [], [], []
    offset = 0
    for batch, prompt in parts:
        e, m = prepend(prompt, families.embed(model, batch.input_ids), batch.attention_mask)
        embeds.append(e)
        masks.append(m)
        seqs.append(batch.ans_seq + offset)
        positions.append(batch.ans_pos + prompt.shape[0])
        tokens.append(batch.ans_tokens)
        counts.append(batch.ans_tokens.shape[0])
        if max_tokens > 0:  # host-side row lengths (no device sync where the batch carries them)
            lengths += [prompt.shape[0] + n for n in batch.row_lengths()]
        offset += batch.num_seqs
    width = max(e.shape[1] for e in embeds)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e in embeds])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    seqs, positions = torch.cat(seqs), torch.cat(positions)
    if max_tokens <= 0:
        with right_padded_rows():
            hidden = families.base_forward(model, embeds, mask).last_hidden_state
        selected = hidden[seqs, positions]
    else:
        # Each pass's hidden states are flattened to [rows * its width, hidden]; an answer of row r at position p
        # is then row r's base (its pass's offset + its index in the pass x the pass's width) + p.
        passes = forward_passes(lengths, max_tokens, bucket, getattr(model.config, "max_position_embeddings", None))
        widest = max(w for _, w in passes)
        if widest > width:  # bucketed widths may pass the step's longest row: pad (masked) up to them
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, widest - width))
            mask = torch.nn.functional.pad(mask, (0, widest - width))
        order, base = _pass_indices(passes, len(lengths), embeds.device)
        flat, first = [], 0
        with right_padded_rows():
            for rows, w in passes:
                idx = order[first:first + len(rows)]  # a view of the one copied index tensor: no copy per pass
                first += len(rows)
                h = families.base_forward(model, embeds[idx, :w], mask[idx, :w]).last_hidden_state
                flat.append(h.reshape(-1, h.shape[-1]))
        selected = torch.cat(flat)[base[seqs] + positions]
    logits = families.logits(model, selected)
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.cat(tokens).unsqueeze(1)).squeeze(1)
    return list(logp.split(counts))


def _pass_indices(passes: list[tuple[list[int], int]], num_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of every pass in pass order [R] and each row's base in the passes' flattened hidden states [R]
    (its pass's offset + its index in the pass x the pass's width), built on the host and copied to ``device`` in
    one copy (from pinned memory, asynchronously, on CUDA)."""
    order = [r for rows, _ in passes for r in rows]
    base = [0] * num_rows
    start = 0
    for rows, w in passes:
        for i, r in enumerate(rows):
            base[r] = start + i * w
        start += len(rows) * w
    both = torch.tensor(order + base, dtype=torch.long)
    if torch.device(device).type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    else:
        both = both.to(device)
    return both[:len(order)], both[len(order):]
