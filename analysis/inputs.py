"""What every analysis section reads: the study's prompts in matrix order, the model's embeddings, each task's
starting prompt and the "effective" prompts (the rows as the model's first attention reads them), prepared once.

What the effective prompt of a model is, is decided in one place, ``ptray.lm.families.effective_prompt`` (per model
family). Where a family does not define it, every effective number of the report is n/a (never the raw number
relabelled). Nearest tokens in the effective space also pass the vocabulary through the same map, which is only
meaningful when the map treats each row alone (BLOOM's input LayerNorm, a Llama block's RMSNorm), not when it
adds the row's position first (GPT-2, OPT): ``effective_row_transform`` is None then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.records import PromptRun, Study

Transform = Callable[[torch.Tensor], torch.Tensor]


def effective_prompt(model, prompt: torch.Tensor) -> torch.Tensor | None:
    """The effective rows [n, hidden] (fp32, CPU) of ``prompt`` [n, embed_dim] on ``model``, or None where the
    model's family defines none. The one entry point to ``ptray.lm.families.effective_prompt``."""
    from ptray.lm.families import effective_prompt as family_rule

    return family_rule(model, prompt)


def effective_name(model) -> str:
    """The module whose output is the effective prompt (for the report), e.g. ``word_embeddings_layernorm``."""
    from ptray.lm.families import family

    return family(model).effective_norm or "none"


class RowTransform:
    """``effective_prompt`` applied to any number of rows [m, embed_dim] -> [m, hidden] fp32, in blocks of
    ``block`` rows (the model builds an attention mask over each block before its first layer)."""

    def __init__(self, model, name: str, block: int = 1024):
        self.model, self.name, self.block = model, name, block

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [m, embed_dim] -> their effective rows [m, hidden] (fp32, CPU)."""
        return torch.cat([effective_prompt(self.model, rows[i:i + self.block])
                          for i in range(0, rows.shape[0], self.block)])


def effective_row_transform(model, seed: int = 0) -> RowTransform | None:
    """The effective map as a row-wise transform (for the vocabulary in the nearest-token search), or None when
    the family defines no effective prompt or its effective rows depend on their position (checked: three
    random rows in reverse order must give the same rows, reversed)."""
    width = model.get_input_embeddings().weight.shape[1]
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(seed))
    y = effective_prompt(model, x)
    if y is None:
        return None
    y_rev = effective_prompt(model, x.flip(0))
    if not torch.allclose(y, y_rev.flip(0), rtol=1e-4, atol=1e-5):
        return None
    return RowTransform(model, effective_name(model))


@dataclass(frozen=True)
class Inputs:
    """The prepared study. ``prompts`` are ordered by task (registry order), then seed: the row / column order
    of every [P, P] matrix. ``effective`` is None when the model has no defined effective prompt."""

    prompts: list[PromptRun]
    tasks: list[str]
    embedding: torch.Tensor  # [vocab, hidden] fp32, on the CPU
    init: dict[str, torch.Tensor | None]  # task -> its init-text prompt [n, hidden], None if not from text
    effective: list[torch.Tensor] | None = None  # per prompt [n_i, hidden] fp32; None: not defined
    init_effective: dict[str, torch.Tensor | None] | None = None  # the init prompts' effective rows
    effective_name: str | None = None  # the module whose output is the effective prompt; None: not defined
    transform: Transform | None = None  # effective_row_transform(model): for the vocabulary; None: not row-wise

    @property
    def labels(self) -> list[str]:
        """The task of every prompt, in matrix order."""
        return [p.task for p in self.prompts]

    @property
    def seeds(self) -> list[int]:
        """The seed of every prompt, in matrix order."""
        return [p.seed for p in self.prompts]

    @property
    def raw(self) -> list[torch.Tensor]:
        """Every prompt's stored rows [n_i, hidden], in matrix order."""
        return [p.prompt for p in self.prompts]


def init_prompts(prompts: list[PromptRun], embedding: torch.Tensor, tokenizer) -> dict[str, torch.Tensor | None]:
    """Each task's starting prompt [n, hidden]: its init text's token embeddings, repeated / cut to n as in
    training; None for a task whose prompts did not start from text."""
    from ptray.config import PromptInit
    from ptray.lm.prompt import init_prompt

    out: dict[str, torch.Tensor | None] = {}
    for p in prompts:
        if p.task in out:
            continue
        cfg = p.config
        if cfg.get("init", "text") != PromptInit.TEXT.value or not cfg.get("init_text"):
            out[p.task] = None
            continue
        out[p.task] = init_prompt(embedding, tokenizer, PromptInit.TEXT, cfg["init_text"], p.num_tokens)
    return out


def prepare(study: Study, model, tokenizer) -> Inputs:
    """The study's prompts against ``model``'s embeddings.

    Raises PtrayError when the prompts' hidden size differs from the model's (the wrong ``--model``).
    """
    prompts = study.sorted_prompts()
    embedding = model.get_input_embeddings().weight.detach().float().cpu()
    hidden = embedding.shape[1]
    bad = [p.label for p in prompts if p.prompt.shape[1] != hidden]
    if bad:
        from ptray.errors import PtrayError

        raise PtrayError(f"prompts {', '.join(bad)} have hidden size {prompts[0].prompt.shape[1]} but the model's "
                         f"embeddings have {hidden}; pass --model with the model the study trained on")
    init = init_prompts(prompts, embedding, tokenizer)
    effective = [effective_prompt(model, p.prompt) for p in prompts]
    if any(e is None for e in effective):
        return Inputs(prompts=prompts, tasks=study.tasks, embedding=embedding, init=init)
    return Inputs(prompts=prompts, tasks=study.tasks, embedding=embedding, init=init, effective=effective,
                  init_effective={t: effective_prompt(model, v) if v is not None else None for t, v in init.items()},
                  effective_name=effective_name(model), transform=effective_row_transform(model))
