"""Which runs the paper's sections read in a study with conditions, SPoT runs or a search (``paper_view``).

One condition, never a mix. By default the first declared condition (``Study.conditions``: the grid is
condition-major, so the condition whose runs started first), or the one ``AnalysisOptions.condition`` names; SPoT
runs (``ptray.init_from``: a prompt started from another trained prompt) are left out (the SPoT section reads them);
in a search (train runs of one task, seed and condition that differ by their ``lr``) the finished trial with the
lowest eval loss stands for its task and seed. A study without conditions, SPoT runs or a search is passed through
unchanged.
"""

from __future__ import annotations

from analysis.records import PromptRun, Study


# ----------------------------------------------------------------------------------------------- the paper's runs
def is_spot(p: PromptRun) -> bool:
    """Whether ``p`` started from another trained prompt (SPoT): its ``ptray.init_from`` tag, else its config's
    ``init_source``."""
    return bool(p.init_from or p.config.get("init_source"))


def reference_condition(study: Study, condition: str | None = None) -> str | None:
    """The condition the paper's sections read: ``condition`` when given, else the first declared one whose runs
    are not SPoT runs; None in a study without conditions.

    Raises:
        PtrayError: ``condition`` is not one of the study's (the message lists them).
    """
    conditions = study.conditions
    if condition is not None:
        if condition not in conditions:
            from ptray.errors import PtrayError

            raise PtrayError(f"--condition {condition!r} is not a condition of this study "
                             f"({', '.join(conditions) if conditions else 'it has none'})")
        return condition
    plain = [c for c in conditions if not any(is_spot(p) for p in study.prompts if p.condition == c)]
    return (plain or conditions or [None])[0]


def search_key(p) -> tuple:
    """What the trials of a search share: task, seed, condition and the prompt they started from."""
    return p.task, p.seed, p.condition, p.init_from


def is_search(study: Study) -> bool:
    """Whether the study is a search: a train run stopped by a scheduler, or train runs that share a
    ``search_key`` (they differ by their ``lr``)."""
    keys = [search_key(t) for t in study.trials] or [search_key(p) for p in study.prompts]
    return bool(study.search) or any(t.stopped_by for t in study.trials) or len(keys) != len(set(keys))


def best_trials(prompts: list[PromptRun]) -> list[PromptRun]:
    """One prompt per ``search_key``: the one with the lowest (best-epoch) eval loss; ties: the earlier run."""
    best: dict[tuple, PromptRun] = {}
    for p in prompts:
        loss = p.metrics.get("eval_loss")
        key = search_key(p)
        held = best.get(key)
        if held is None or (loss is not None and (held.metrics.get("eval_loss") is None
                                                  or loss < held.metrics["eval_loss"])):
            best[key] = p
    return list(best.values())


def paper_view(study: Study, condition: str | None = None) -> tuple[Study, list[str], dict]:
    """The runs the paper's sections read (see the module docstring): ``(study, notes, meta)``; ``meta`` holds
    ``condition`` (None without conditions) and ``conditions``.

    Raises:
        PtrayError: ``condition`` is not one of the study's, or the view has no train run left.
    """
    ref = reference_condition(study, condition)
    notes: list[str] = []
    prompts = [p for p in study.prompts if p.condition == ref] if ref is not None else list(study.prompts)
    if ref is not None:
        others = [c for c in study.conditions if c != ref]
        notes.append(f"the study has conditions ({', '.join(study.conditions)}): the paper's sections (nearest "
                     f"tokens, stochasticity, distances, transfer, correlations, predictors, faithfulness) read "
                     f"condition {ref!r} only" + (" (chosen with --condition)" if condition else
                                                  " (the first in the study that is not a SPoT condition)")
                     + (f"; the conditions section compares it with {', '.join(others)}" if others else "")
                     + "; the learning curves and accuracy floors show every condition")
    spot = [p for p in prompts if is_spot(p)]
    if spot:
        prompts = [p for p in prompts if not is_spot(p)]
        notes.append(f"{len(spot)} SPoT train runs (started from another prompt) are left out of the paper's "
                     f"sections; the SPoT section reads them")
    if is_search(study):
        kept = best_trials(prompts)
        if len(kept) < len(prompts):
            notes.append(f"search: the paper's sections read the finished trial with the lowest eval loss per task "
                         f"and seed ({len(kept)} of {len(prompts)} finished trials); the search section shows all")
        prompts = kept
    if not prompts:
        from ptray.errors import PtrayError

        raise PtrayError(f"no finished train run to analyse in condition {ref!r} (SPoT runs are analysed only "
                         f"against trained prompts)")
    if ref is None and not spot and len(prompts) == len(study.prompts):
        return study, notes, {"condition": None, "conditions": []}
    view = study.select(prompts)
    return view, notes, {"condition": ref, "conditions": study.conditions}
