"""What every analysis section reads: the study's prompts in matrix order, the model's input vectors, each task's
starting prompt and the "effective" prompts (the rows as the model's first attention reads them), prepared once.

Every rule about the model comes from its family (``ptray.lm.families``), none is made up here:

- the input vectors of the vocabulary and of a token prompt are ``families.embed`` (the model's input-embedding
  module, Gemma2's sqrt(hidden) scale included in transformers 5): the space the soft prompt lives in;
- the effective prompt is ``families.effective_prompt``; where the family defines none, every effective number of
  the report is n/a (never the raw number relabelled);
- the vocabulary's effective rows (nearest tokens in the effective space) are ``families.effective_rows``, None
  where the family's effective rows depend on their position (GPT-2, OPT): that space is n/a then.
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


def vocabulary_transform(model) -> Transform | None:
    """The family's map of input vectors [m, embed_dim] to effective rows [m, hidden] (fp32, CPU),
    ``ptray.lm.families.effective_rows``, for the vocabulary in the nearest-token search; None where the family
    gives none (no effective prompt, or effective rows that depend on their position)."""
    from ptray.lm.families import effective_rows, embed

    probe = embed(model, torch.zeros(1, dtype=torch.long)).detach().float().cpu()
    if effective_rows(model, probe) is None:
        return None
    return lambda rows: effective_rows(model, rows)


@torch.no_grad()
def input_vectors(model, chunk: int = 16384) -> torch.Tensor:
    """The input vector of every token [vocab, embed_dim] (fp32, CPU): ``families.embed`` of each id, so an
    embedding scale inside the module (Gemma2) is included. A plain ``nn.Embedding`` returns its weight rows as
    they are, so its weight is used directly (no copy on a CPU fp32 model)."""
    from ptray.lm.families import embed

    module = model.get_input_embeddings()
    if type(module) is torch.nn.Embedding and module.max_norm is None:
        return module.weight.detach().float().cpu()
    vocab = module.weight.shape[0]
    return torch.cat([embed(model, torch.arange(s, min(vocab, s + chunk))).detach().float().cpu()
                      for s in range(0, vocab, chunk)])


@dataclass(frozen=True)
class Inputs:
    """The prepared study. ``prompts`` are ordered by task (registry order), then seed: the row / column order
    of every [P, P] matrix. ``effective`` is None when the model has no defined effective prompt."""

    prompts: list[PromptRun]
    tasks: list[str]
    embedding: torch.Tensor  # [vocab, embed_dim] fp32 CPU: every token's input vector (``input_vectors``)
    init: dict[str, torch.Tensor | None]  # task -> its init-text prompt [n, hidden], None if not from text
    effective: list[torch.Tensor] | None = None  # per prompt [n_i, hidden] fp32; None: not defined
    init_effective: dict[str, torch.Tensor | None] | None = None  # the init prompts' effective rows
    effective_name: str | None = None  # the module whose output is the effective prompt; None: not defined
    transform: Transform | None = None  # vocabulary_transform(model); None: no effective vocabulary

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


def init_prompts(prompts: list[PromptRun], model, tokenizer) -> dict[str, torch.Tensor | None]:
    """Each task's starting prompt [n, embed_dim] (fp32, CPU): its init text's input vectors (``families.embed``,
    through ``ptray.lm.prompt.init_prompt`` as training builds it), repeated / cut to n; None for a task whose
    prompts did not start from text."""
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
        out[p.task] = init_prompt(model.get_input_embeddings(), tokenizer, PromptInit.TEXT, cfg["init_text"],
                                  p.num_tokens)
    return out


def prepare(study: Study, model, tokenizer) -> Inputs:
    """The study's prompts against ``model``'s input vectors.

    Raises:
        PtrayError: the prompts' width differs from the model's input vectors (the wrong ``--model``).
    """
    from ptray.lm.families import embed_dim

    prompts = study.sorted_prompts()
    width = embed_dim(model)
    bad = [p.label for p in prompts if p.prompt.shape[1] != width]
    if bad:
        from ptray.errors import PtrayError

        raise PtrayError(f"prompts {', '.join(bad)} have hidden size {prompts[0].prompt.shape[1]} but the model's "
                         f"embeddings have {width}; pass --model with the model the study trained on")
    embedding = input_vectors(model)
    init = init_prompts(prompts, model, tokenizer)
    effective = [effective_prompt(model, p.prompt) for p in prompts]
    if any(e is None for e in effective):
        return Inputs(prompts=prompts, tasks=study.tasks, embedding=embedding, init=init)
    return Inputs(prompts=prompts, tasks=study.tasks, embedding=embedding, init=init, effective=effective,
                  init_effective={t: effective_prompt(model, v) if v is not None else None for t, v in init.items()},
                  effective_name=effective_name(model), transform=vocabulary_transform(model))
