"""What the study's plan asked for against what the experiment holds: the report's first section.

Every study stores its plan in its experiment (``ptray.plan.<study>``, ``ptray.plan.Plan.to_json``): its trials
(tasks x seeds x conditions, a search's samples) and its transfer grid (every trained prompt on every target, and
no prompt on each target). A study analysed before it finished, or with runs that FAILED, were KILLED (replaced
or interrupted) or deleted, yields fewer prompts than planned; every later section only sees what was found, so
this one says first, per study, task and seed, what is missing and why.

A train run counts as found when FINISHED, or KILLED by a Tune scheduler (``ptray.stopped_by``: a search trial
stopped early is the plan's outcome; the transfer grid evaluates no stopped prompt, so none is planned for it).
An evaluation counts as found when FINISHED. Runs are matched by study tag and run name (``ptray.layout``).
"""

from __future__ import annotations

import pandas as pd

from analysis.records import DELETED, RunStatus, Study
from analysis.results import Output, Section
from ptray import layout

COLUMNS = ["study", "task", "seed", "planned", "found", "missing", "missing_runs"]
NO_SEED = "-"  # the seed cell of a study's baseline row (no prompt, no seed)
MAX_NAMED = 12  # missing runs named per row; the rest counted


def _best(statuses: list[RunStatus]) -> str:
    """The status that tells most about one planned run, from every run of its name: finished (or stopped by a
    scheduler) beats running, which beats failed, killed, then deleted."""
    rank = {layout.FINISHED: 0, layout.RUNNING: 2, "SCHEDULED": 2, layout.FAILED: 3, layout.KILLED: 4, DELETED: 5}
    best = min(statuses, key=lambda s: 1 if _done(s) else rank.get(s.status, 3))
    return "stopped" if _done(best) and best.status != layout.FINISHED else best.status


def _done(s: RunStatus) -> bool:
    return s.status == layout.FINISHED or (s.kind == layout.TRAIN and s.status == layout.KILLED
                                           and bool(s.stopped_by))


def _why(status: str | None) -> str:
    """A missing run's status in words."""
    if status is None:
        return "no run"
    return "deleted" if status == DELETED else status


def plan_rows(study_id: str, plan_json: dict, runs: list[RunStatus]) -> list[dict]:
    """The coverage rows (``COLUMNS``) of one stored plan: one per (task, seed) of its trials, in plan order, then
    one for its no-prompt baselines (seed ``NO_SEED``).

    ``planned`` / ``found`` / ``missing`` count runs: the (task, seed)'s train runs (one per condition or search
    sample) and the transfer runs of its prompts on every target. ``missing_runs`` names each missing train run
    with why (``FAILED``, ``KILLED``, ``RUNNING``, ``deleted``, ``no run``) and each missing evaluation of a found
    prompt; a missing prompt's evaluations are counted with it.

    Raises:
        PtrayError, ValueError, KeyError: the plan cannot be read (``Plan.from_json``; a task no longer known).
    """
    from ptray.plan import Plan

    plan = Plan.from_json(plan_json)
    by_name: dict[str, list[RunStatus]] = {}
    for r in runs:
        if r.study == study_id:
            by_name.setdefault(r.name, []).append(r)

    def status(name: str) -> str | None:
        return _best(by_name[name]) if name in by_name else None

    rows: dict[tuple, dict] = {}
    for member in plan.trials:
        task, seed = member[0], member[1]
        condition = member[2] if len(member) > 2 else None
        row = rows.setdefault((task, seed), {"study": study_id, "task": task, "seed": str(seed), "planned": 0,
                                             "found": 0, "missing": 0, "_named": []})
        name = layout.train_run_name(task, seed, condition)
        got = status(name)
        evals = [layout.transfer_run_name(task, seed, t, condition) for t in plan.transfer_targets]
        if got in (layout.FINISHED, "stopped"):
            row["planned"] += 1
            row["found"] += 1
            if got == "stopped":  # the transfer grid evaluates finished prompts only
                continue
            missing = [e for e in evals if status(e) != layout.FINISHED]
            row["planned"] += len(evals)
            row["found"] += len(evals) - len(missing)
            row["missing"] += len(missing)
            row["_named"] += [f"{e} ({_why(status(e))})" for e in missing]
        else:
            row["planned"] += 1 + len(evals)
            row["missing"] += 1 + len(evals)
            row["_named"].append(f"{name} ({_why(got)}; and its {len(evals)} evaluations)")
    baselines = [layout.baseline_run_name(t) for t in plan.transfer_targets]
    missing = [b for b in baselines if status(b) != layout.FINISHED]
    rows[("baselines", NO_SEED)] = {"study": study_id, "task": "no prompt", "seed": NO_SEED,
                                    "planned": len(baselines), "found": len(baselines) - len(missing),
                                    "missing": len(missing), "_named": [f"{b} ({_why(status(b))})" for b in missing]}
    out = []
    for row in rows.values():
        named = row.pop("_named")
        more = f"; and {len(named) - MAX_NAMED} more" if len(named) > MAX_NAMED else ""
        out.append({**row, "missing_runs": "; ".join(named[:MAX_NAMED]) + more})
    return out


def coverage_section(study: Study) -> Section:
    """The report's first section: per stored plan, task and seed, the runs planned, found and missing (named,
    with why). ``summary["coverage"]``: ``{"complete", "planned", "found", "missing", "headline", "rows"}``;
    ``meta["coverage_headline"]``: one sentence the report and the command line print first. A study without a
    stored plan gets a note that nothing can be said about what is missing."""
    rows, notes = [], []
    if not study.plans:
        notes.append("the experiment holds no stored plan (ptray.plan.<study>): the report cannot say what the "
                     "study asked for, nor what is missing")
    for sid, plan_json in sorted(study.plans.items()):
        try:
            rows += plan_rows(sid, plan_json, study.runs)
        except Exception as err:  # an old or hand-edited plan: say so, analyse what is there
            notes.append(f"the stored plan of study {sid!r} could not be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): what it asked for is not checked")
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return Section(notes=notes)
    planned, found, missing = (int(table[c].sum()) for c in ("planned", "found", "missing"))
    train = [r for r in rows if r["seed"] != NO_SEED]
    incomplete = sorted({f"{r['task']} seed {r['seed']}" for r in train if r["missing"]})
    if missing:
        headline = (f"INCOMPLETE: the plan asked for {planned} runs, {found} were found and {missing} are missing "
                    f"(in {', '.join(incomplete) if incomplete else 'the no-prompt baselines'}); every section "
                    f"below reads only the runs found")
    else:
        headline = f"complete: the {planned} runs the plan asked for were all found"
    text = ("Per study, task and seed: the runs its stored plan asked for (each train run, one per condition or "
            "search sample, and the transfer runs of its prompts on every target; a last row for the no-prompt "
            "baselines), the runs found (FINISHED; a train run a Tune scheduler stopped counts as found, with no "
            "transfer runs planned) and the missing ones, named with why: FAILED, KILLED, RUNNING, deleted, or no "
            "run at all. " + headline + ".")
    out = Output("coverage", "coverage", "What the plan asked for, and what is missing", text, table)
    summary = {"complete": not missing, "planned": planned, "found": found, "missing": missing,
               "headline": headline, "rows": rows}
    return Section(outputs=[out], summary={"coverage": summary}, meta={"coverage_headline": headline},
                   metrics={"coverage_missing_runs": float(missing)}, notes=notes)
