"""What the analysis produces: its options (``AnalysisOptions``), one report item (``Output``), one section's
results (``Section``) and the whole analysis (``Results``), with the report's section headings. No computation
here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.geometry import DISTANCE_METHODS
from ptray.cli import config_field, non_negative_int, positive_int, seed_int


@dataclass
class AnalysisOptions:
    """How the analysis runs; ``python -m analysis`` has a flag per field. Every field has a default.

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    top_k: int = config_field(3, "nearest tokens per prompt row (the paper shows 3)", type=positive_int)
    distance: str = config_field(
        "truncate", "distance between prompts of different lengths: over the common length (truncate) or with "
        "zero rows padded (pad)", choices=DISTANCE_METHODS)
    n_boot: int = config_field(2000, "bootstrap resamples for the transfer intervals", flag="bootstrap",
                               type=non_negative_int)
    seed: int = config_field(0, "seeds t-SNE, the bootstraps and the random relabellings of a Mantel test (0 to "
                                "2**32 - 1)", type=seed_int)
    faithfulness: bool = config_field(True, "evaluate the discretised prompts (needs the data and forward passes)",
                                      off_help="skip evaluating the discretised prompts (the slow part on CPU)")
    data_dir: str | None = config_field(None, "SuperGLUE jsonl folder for the faithfulness check and the "
                                              "majority class of the accuracy floors (unset: the train runs' "
                                              "data_dir)")
    batch_size: int = config_field(32, "evaluation sequences per step (faithfulness check)", type=positive_int)
    condition: str | None = config_field(None, "a study with conditions: the condition the paper's sections read "
                                                "(unset: the first declared)")
    chunk: int = config_field(32768, "vocabulary rows per similarity block in the nearest-token search",
                              type=positive_int, cli=False)

    def __post_init__(self):
        if self.distance not in DISTANCE_METHODS:
            raise ValueError(f"distance must be one of {DISTANCE_METHODS}, got {self.distance!r}")
        if self.top_k < 1 or self.n_boot < 0 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("top_k, batch_size and chunk must be positive and n_boot not negative")


@dataclass
class Output:
    """One item of the report: a figure (or None) and the numbers behind it (DataFrame -> CSV, dict -> JSON)."""

    name: str  # file stem: <name>.png beside <name>.csv or <name>.json
    section: str  # a key of SECTIONS
    title: str
    text: str  # the caption: says what every number is (conventions, intervals, tests)
    data: pd.DataFrame | dict
    figure: Any = None
    show_table: bool = True  # show the numbers as a table in the HTML report


@dataclass
class Section:
    """What one analysis section returns: its report items and what it adds to analysis.json, the MLflow
    metrics of the analysis run, the report's metadata and its notes."""

    outputs: list[Output] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Results:
    """The whole analysis: ``meta`` (the report's header, ``meta["notes"]`` a list of strings), every output in
    report order, ``summary`` (analysis.json) and ``metrics`` (logged as MLflow metrics of the analysis run)."""

    meta: dict[str, Any]
    outputs: list[Output] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, section: Section) -> None:
        """Append one section's outputs and merge its summary, metrics, meta and notes."""
        self.outputs += section.outputs
        self.summary.update(section.summary)
        self.metrics.update(section.metrics)
        self.meta.update(section.meta)
        self.meta.setdefault("notes", []).extend(section.notes)


SECTIONS = {
    "coverage": "The plan and what was found",  # first: what every later section lacks (analysis/coverage.py)
    "claims": "The paper's claims, checked",  # second: a summary of the sections below (analysis/claims.py)
    "learning": "Learning curves and accuracy floors",
    "nearest": "Nearest tokens (paper 5.1, Figures 2-5)",
    "stochasticity": "Stochasticity (paper 5.2, Figure 6, Table 1)",
    "distances": "Distances between prompts (Figure 7)",
    "transfer": "Zero-shot transfer (Figure 8)",
    "correlation": "Does distance predict transfer?",
    "predictors": "Other transferability predictors",
    "conditions": "Conditions compared",
    "search": "Search: learning rate against eval loss",
    "spot": "SPoT: training from another task's prompt",
    "faithfulness": "Faithfulness of the nearest-token reading",
}
