"""The soft prompt: n trainable rows prepended to the input embeddings, saved in PEFT's adapter format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptray.config import PromptInit
from ptray.data.tasks import Task
from ptray.data.tokens import answer_ids_in_context, token_ids
from ptray.errors import PtrayError
from ptray.layout import PEFT_CONFIG, PEFT_WEIGHTS, PROMPT_DIR


def prepend(weight: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor):
    """Prepend prompt rows [n, embed_dim] to ``embeds`` [B, T, embed_dim] and ones to ``attention_mask`` [B, T].

    Returns ``(embeds [B, n + T, embed_dim] in embeds' dtype, attention_mask [B, n + T])``.
    """
    bsz, n = embeds.shape[0], weight.shape[0]
    rows = weight.to(embeds.dtype).unsqueeze(0).expand(bsz, -1, -1)
    return torch.cat([rows, embeds], dim=1), torch.cat([attention_mask.new_ones(bsz, n), attention_mask], dim=1)


def repeat_to(ids: list[int], n: int) -> list[int]:
    """Truncate or cyclically repeat ``ids`` to length n (PEFT's TEXT init rule)."""
    if not ids:
        raise PtrayError("the init text has no tokens; give a non-empty init text")
    return (ids * (n // len(ids) + 1))[:n]


def init_prompt(
    embedding: torch.nn.Module | torch.Tensor,
    tokenizer,
    init: PromptInit | str = PromptInit.TEXT,
    init_text: str = "",
    num_tokens: int | None = None,
    seed: int = 0,
    task: Task | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Initial prompt rows [n, embed_dim] (fp32, CPU) from the model's input-embedding module.

    ``embedding`` is ``model.get_input_embeddings()``: rows are what the module returns for token ids, so an
    embedding scale inside it (Gemma2's sqrt(hidden) in transformers 5) is included, as PEFT's TEXT init does. A
    plain matrix [vocab, embed_dim] is read as unscaled rows.
    TEXT: the init text's token embeddings; n defaults to its token count, a fixed n truncates or repeats it.
    RANDOM: normal rows with the embedding rows' mean and std. SAMPLE_VOCAB: rows of uniformly drawn tokens.
    CLASS_LABELS (needs ``task``): one row per label, in label order, the embedding of the label's answer words as
    the model must produce them after the answer cue (``answer_ids_in_context``), the mean of their rows when they
    are several tokens (Lester et al. 2021's class-label init), cycled to n; Lester et al. fill rows beyond the
    labels with sampled vocabulary, ptray cycles the labels as TEXT cycles the init text.
    PROMPT (needs ``source``, a trained prompt's rows [n_s, embed_dim], e.g. ``source_prompt(folder)``): SPoT's
    init (Vu et al. 2021), a copy of the source's rows. Lengths: the prompt takes the source's length n_s (SPoT's
    choice: the source prompt is continued, not reshaped); a fixed ``num_tokens`` n_t takes the first n_t rows
    when n_t < n_s and cycles the rows when n_t > n_s (the rule TEXT applies to the init text's tokens).
    n for every mode but TEXT and PROMPT: ``num_tokens``, else the init text's token count.
    Raises PtrayError for an empty init text, a non-positive n, CLASS_LABELS without a task, or PROMPT without a
    source or with a source whose width is not the model's.
    """
    init = PromptInit(init)
    gen = torch.Generator().manual_seed(seed)
    vocab = (embedding if isinstance(embedding, torch.Tensor) else embedding.weight).shape[0]

    def rows(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(embedding, torch.Tensor):
                return embedding.detach()[ids.to(embedding.device)].float().cpu()
            return embedding(ids.to(embedding.weight.device)).detach().float().cpu()

    if init is PromptInit.TEXT:
        ids = token_ids(tokenizer, init_text)
        ids = repeat_to(ids, num_tokens or len(ids))
        return rows(torch.tensor(ids)).clone()
    if init is PromptInit.PROMPT:
        if source is None:
            raise PtrayError("init 'prompt' needs the source prompt's rows (init_source)")
        width = (embedding if isinstance(embedding, torch.Tensor) else embedding.weight).shape[1]
        if source.dim() != 2 or source.shape[1] != width:
            raise PtrayError(f"the source prompt has shape {tuple(source.shape)}, but this model's embeddings are "
                             f"{width} wide; a prompt starts only from one trained on the same model")
        order = repeat_to(list(range(source.shape[0])), num_tokens or source.shape[0])
        return source.detach().float().cpu()[torch.tensor(order)].clone()
    if not num_tokens:
        num_tokens = len(token_ids(tokenizer, init_text)) if init_text else 0
    if num_tokens <= 0:
        raise PtrayError(f"init {init.value!r} needs a positive number of prompt tokens")
    if init is PromptInit.CLASS_LABELS:
        if task is None:
            raise PtrayError("init 'class_labels' needs the task whose answer words start the prompt")
        labels = [rows(torch.tensor(ids)).mean(dim=0)
                  for ids in answer_ids_in_context(tokenizer, task.answer_cue, task.answers)]
        return torch.stack([labels[k % len(labels)] for k in range(num_tokens)]).clone()
    if init is PromptInit.RANDOM:
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, vocab, 16384):  # the vocabulary's rows in chunks: no full fp32 copy of a big matrix
            chunk = rows(torch.arange(start, min(vocab, start + 16384))).double()
            total, total_sq = total + chunk.sum().item(), total_sq + (chunk**2).sum().item()
            count += chunk.numel()
        mean = total / count
        std = max(total_sq / count - mean**2, 0.0) ** 0.5 * (count / max(count - 1, 1)) ** 0.5
        width = rows(torch.zeros(1, dtype=torch.long)).shape[1]
        return torch.randn(num_tokens, width, generator=gen) * std + mean
    ids = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return rows(ids).clone()


def save_adapter(weight: torch.Tensor, out_dir: str | Path, base_model: str, init_text: str,
                 init: PromptInit | str = PromptInit.TEXT) -> Path:
    """Write the prompt as a PEFT prompt-tuning adapter folder (``PeftModel.from_pretrained`` loads it)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # peft < 0.18 has no SAMPLE_VOCAB; the init is only a record there (loading reads the saved rows)
    sample_vocab = getattr(PromptTuningInit, "SAMPLE_VOCAB", PromptTuningInit.RANDOM)
    # PEFT has no class-label or source-prompt init: recorded as RANDOM (PEFT loads the saved rows either way)
    peft_init = {PromptInit.TEXT: PromptTuningInit.TEXT, PromptInit.RANDOM: PromptTuningInit.RANDOM,
                 PromptInit.SAMPLE_VOCAB: sample_vocab, PromptInit.CLASS_LABELS: PromptTuningInit.RANDOM,
                 PromptInit.PROMPT: PromptTuningInit.RANDOM}[
        PromptInit(init)]
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=weight.shape[0],
        token_dim=weight.shape[1],
        num_transformer_submodules=1,
        prompt_tuning_init=peft_init,
        prompt_tuning_init_text=init_text if peft_init == PromptTuningInit.TEXT else None,
        tokenizer_name_or_path=base_model if peft_init == PromptTuningInit.TEXT else None,
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    config.save_pretrained(str(out))
    save_file({"prompt_embeddings": weight.detach().float().cpu().contiguous()}, str(out / PEFT_WEIGHTS))
    return out


def source_prompt(path: str | Path) -> torch.Tensor:
    """A trained prompt's rows [n, embed_dim] (fp32) from a PEFT adapter folder or a run folder (its ``prompt/``
    adapter, as ``ptray train`` and a study's train run write it): what init 'prompt' starts from.

    Raises:
        PtrayError: neither an adapter folder nor a run folder holding one.
    """
    folder = Path(path).expanduser()
    if (folder / PEFT_WEIGHTS).is_file() or not (folder / PROMPT_DIR / PEFT_WEIGHTS).is_file():
        if not folder.is_dir():
            raise PtrayError(f"init source {str(path)!r} is not a folder: give a run folder, a PEFT prompt adapter "
                             f"folder, or in a study a train run name such as rte-seed0")
        return load_adapter(folder)
    return load_adapter(folder / PROMPT_DIR)


def load_adapter(path: str | Path) -> torch.Tensor:
    """Read the prompt rows [n, embed_dim] (fp32) from a PEFT prompt-tuning adapter folder (safetensors only)."""
    folder = Path(path)
    weights, config_file = folder / PEFT_WEIGHTS, folder / PEFT_CONFIG
    if not weights.is_file() or not config_file.is_file():
        raise PtrayError(f"{str(folder)!r} is not a prompt adapter folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise PtrayError(f"{str(folder)!r} holds a {peft_type} adapter, not PROMPT_TUNING")
    return load_file(str(weights))["prompt_embeddings"].float()
