"""A study file: a study is data, a TOML file that names what varies between its runs. This module finds the
shipped ones, reads a file and validates it into a ``StudyDeclaration`` (``ptray.study.declared``).

The studies ptray ships are ``sweeps/studies/<name>.toml`` (``paper``, ``init``, ``length``, ``optimizer``, ``lr``);
a user's file anywhere has the same schema. ``load_study("init")`` reads a shipped one by name,
``load_study("my/study.toml")`` a file. The ``init`` study, annotated::

    name = "init"                      # required: the study id (ASCII letters, digits, '.', '_', '-'; the --study id)
    description = "How the prompt starts"  # required: one line for the plan and the report
    tasks = ["cb", "rte", "copa", "wsc"]  # optional (default: the paper's four); registered task names
    seeds = [0, 1, 2, 3]               # optional (default: the paper's, Plan's seeds)

    [train]                            # optional: TrainConfig fields for every run (not task or seed)
    max_epochs = 50

    [conditions.text]                  # optional: named sets of TrainConfig overrides, one grid slice each
    init = "text"
    [conditions.random]
    init = "random"

A Tune search (declared and validated here; the driver runs it)::

    num_samples = 16                   # trials per (condition, task, seed); needs search
    scheduler = "asha"                 # "fifo" (default) or "asha" (early-stops bad trials at epoch boundaries)
    metric = "eval_loss"               # what the scheduler and the search compare (default eval_loss)
    mode = "min"                       # default: min for losses, max for accuracies

    [search]                           # TrainConfig field -> distribution
    lr = {distribution = "loguniform", low = 1e-3, high = 1.0}
    # uniform/loguniform (low < high, loguniform low > 0), randint (integers, high exclusive),
    # choice (values = [...])

The grid is conditions x tasks x seeds (``StudyDeclaration.grid()``), condition-major; a run's config is
``TrainConfig`` defaults < ``[train]`` < its condition < its task and seed (< the searched values, in Tune).
Every mistake is a one-line ``PtrayError`` naming the file and the field: ``init.toml: field
'conditions.random.init': init must be one of [...], got 'randm'``. Values are checked by ``TrainConfig``'s own
validation (``check_config``), so a declaration accepts exactly what the flags accept.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptray.config import TrainConfig
from ptray.data.task_schema import BOM
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.files import name_problem
from ptray.plan import PER_TRIAL_FIELDS, Plan
from ptray.seeds import check_seed
from ptray.study.declared import Search, StudyDeclaration

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (tomli is a dependency there)
    import tomli as tomllib

__all__ = ["DISTRIBUTIONS", "METRICS", "SCHEDULERS", "STUDIES_DIR", "load_study", "parse_study", "shipped_studies"]


# the shipped declarations: sweeps/studies/ in the repository (ptray/study/declared.py is two folders below it)
STUDIES_DIR = Path(__file__).resolve().parents[2] / "sweeps" / "studies"

_FIELDS = ("name", "description", "tasks", "seeds", "train", "conditions", "search", "num_samples", "scheduler",
           "metric", "mode")
_SEARCH_FIELDS = ("num_samples", "scheduler", "metric", "mode")  # meaningful only with a search
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SCHEDULERS = ("fifo", "asha")
# per-epoch metrics a trial reports (ptray.training.loop) and the direction that is better
METRICS = {"eval_loss": "min", "train_loss": "min", "best_eval_loss": "min", "exact_match": "max",
           "rank_accuracy": "max"}
_PLAN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Plan)}


def shipped_studies() -> tuple[str, ...]:
    """Names of the declarations shipped in ``sweeps/studies/`` (sorted)."""
    return tuple(sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))) if STUDIES_DIR.is_dir() else ()


def load_study(name_or_path: str | Path) -> StudyDeclaration:
    """Read and validate a study declaration: a shipped study's name (``sweeps/studies/<name>.toml``) or the path
    of a TOML file (anything with a '/' or a ``.toml`` suffix, or an existing file).

    Raises:
        PtrayError: an unknown study name, a missing or unreadable file, invalid TOML, or a wrong field (one line
            naming the file and the field).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    shipped = not (isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".toml")
                   or path.is_file())
    if shipped:
        path = STUDIES_DIR / f"{text}.toml"
        if not path.is_file():
            names = shipped_studies()
            hint = difflib.get_close_matches(text, names, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            listed = ", ".join(names) or f"none found in {STUDIES_DIR}"
            raise PtrayError(f"unknown study {text!r}; shipped studies: {listed}.{suggestion} Or give the path of a "
                             f"study file (.toml)")
    if not path.is_file():
        raise PtrayError(f"study file {str(path)!r} not found")
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is read, not kept
    except (OSError, UnicodeDecodeError) as err:
        raise PtrayError(f"cannot read study file {str(path)!r}: {err}") from None
    decl = parse_study(content, path.name)
    if shipped and decl.name != text:  # pragma: no cover - a packaging mistake
        raise PtrayError(f"{path.name}: field 'name' is {decl.name!r}; a shipped study is named after its file")
    return dataclasses.replace(decl, source=str(path))


def parse_study(text: str, source: str = "<study>") -> StudyDeclaration:
    """Validate a declaration's TOML text; ``source`` names it in messages (``load_study`` passes the file name).
    A leading UTF-8 byte-order mark (Windows editors write one) is dropped, as for a task file.

    Raises:
        PtrayError: invalid TOML or a wrong field, in one line naming ``source`` and the field.
    """
    try:
        decl = tomllib.loads(text.removeprefix(BOM))
    except tomllib.TOMLDecodeError as err:
        raise PtrayError(f"{source}: not valid TOML: {str(err).splitlines()[0]}") from None
    return _Check(source).declaration(decl)


class _Check:
    """Checks of one declaration; each failure is one line naming the source and the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, message: str):
        raise PtrayError(f"{self.source}: field {field!r}: {message}")

    def unknown(self, table: Mapping, allowed, prefix: str = "", what: str = "field") -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, list(allowed), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise PtrayError(f"{self.source}: unknown {what} {prefix + key!r}{suggestion}; known: "
                                 f"{', '.join(allowed)}")

    def string(self, decl: Mapping, key: str) -> str:
        if key not in decl:
            raise PtrayError(f"{self.source}: missing field {key!r} (required: name, description)")
        value = decl[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def declaration(self, decl: Mapping[str, Any]) -> StudyDeclaration:
        self.unknown(decl, _FIELDS)
        name = self.string(decl, "name")
        if name_problem(name):  # the driver's --study rule
            self.fail("name", f"{name!r} is not a study id: {name_problem(name)} (it names the study's runs and its "
                              f"Tune folder)")
        description = self.string(decl, "description")
        tasks = self.tasks(decl.get("tasks", _PLAN_DEFAULTS["tasks"]))
        seeds = self.seeds(decl.get("seeds", _PLAN_DEFAULTS["seeds"]))
        train = self.overrides(decl.get("train", {}), "train")
        conditions: dict[str, dict[str, Any]] = {}
        raw_conditions = decl.get("conditions", {})
        if not isinstance(raw_conditions, Mapping):
            self.fail("conditions", f"must be a table of named conditions ([conditions.NAME]), got {raw_conditions!r}")
        if "conditions" in decl and not raw_conditions:
            self.fail("conditions", "is empty; declare at least one [conditions.NAME], or leave it out")
        for cname, over in raw_conditions.items():
            if name_problem(cname):
                self.fail(f"conditions.{cname}", f"condition name {cname!r}: {name_problem(cname)} (it names "
                                                 f"runs and their folders)")
            if not isinstance(over, Mapping):
                self.fail(f"conditions.{cname}", f"must be a table of TrainConfig fields, got {over!r}")
            conditions[cname] = self.overrides(over, f"conditions.{cname}")
            self.combined({**train, **conditions[cname]}, f"conditions.{cname}")
        if not conditions:
            self.combined(train, "train")
        search = self.search(decl.get("search", {}), train, conditions)
        if not search:
            for key in _SEARCH_FIELDS:
                if key in decl:
                    self.fail(key, "only means something with a search; declare [search] or leave it out")
        num_samples = decl.get("num_samples", 1)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            self.fail("num_samples", f"must be a positive integer, got {num_samples!r}")
        scheduler = decl.get("scheduler", "fifo")
        if scheduler not in SCHEDULERS:
            self.fail("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        metric = decl.get("metric", "eval_loss")
        if metric not in METRICS:
            self.fail("metric", f"must be one of {', '.join(METRICS)} (a trial's per-epoch metrics), got {metric!r}")
        mode = decl.get("mode", METRICS[metric])
        if mode != METRICS[metric]:
            self.fail("mode", f"{metric} is better when {'lower' if METRICS[metric] == 'min' else 'higher'}, so mode "
                              f"must be {METRICS[metric]!r}, got {mode!r}")
        return StudyDeclaration(name, description, self.source, tasks, seeds, types.MappingProxyType(train),
                                types.MappingProxyType(conditions), types.MappingProxyType(search), num_samples,
                                scheduler, metric, mode, decl)

    def tasks(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            self.fail("tasks", f"must be a non-empty list of task names, got {value!r}")
        out = []
        for name in value:
            if not isinstance(name, str):
                self.fail("tasks", f"must list task names (strings), got {name!r}")
            try:
                task = get_task(name).name
            except PtrayError as err:
                self.fail("tasks", str(err))
            if task in out:
                self.fail("tasks", f"names {task!r} twice")
            out.append(task)
        return tuple(out)

    def seeds(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            self.fail("seeds", f"must be a non-empty list of integers, got {value!r}")
        for seed in value:
            if isinstance(seed, bool) or not isinstance(seed, int):
                self.fail("seeds", f"must list integers, got {seed!r}")
            try:
                check_seed(seed, "a seed")
            except PtrayError as err:
                self.fail("seeds", str(err))
        if len(set(value)) != len(value):
            self.fail("seeds", f"names a seed twice: {list(value)}")
        return tuple(value)

    def overrides(self, table: Any, prefix: str) -> dict[str, Any]:
        """A table of TrainConfig overrides: known fields (not the grid's task and seed), each value as the
        field's flag would take it."""
        if not isinstance(table, Mapping):
            self.fail(prefix, f"must be a table of TrainConfig fields, got {table!r}")
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        allowed = [n for n in names if n not in ("task", "seed")]
        for key in table:
            if key in ("task", "seed"):
                self.fail(f"{prefix}.{key}", f"the grid sets each run's {key}; list them in the top-level "
                                             f"'{key}s' field")
        self.unknown(table, allowed, f"{prefix}.", "TrainConfig field")
        out = {}
        for key, value in table.items():
            out[key] = self.value(key, value, f"{prefix}.{key}")
        return out

    def value(self, key: str, value: Any, field: str) -> Any:
        """``value`` for TrainConfig field ``key``: the field's type, then TrainConfig's own checks."""
        hint = _field_types()[key]
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}
        kind = str if isinstance(hint, type) and issubclass(hint, enum.Enum) else hint
        if kind in ok and not ok[kind](value):
            self.fail(field, f"must be {'a' if kind is not int else 'an'} {_TYPE_WORDS[kind]}, got {value!r}")
        if kind is float:
            value = float(value)
        try:
            # a field that another one completes is checked beside a stand-in partner (init 'prompt' needs an
            # init_source and the reverse); the pair together is checked by ``combined``
            partner = {"init": {"init_source": "<source>"} if value == "prompt" else {},
                       "init_source": {"init": "prompt"}}.get(key, {})
            cfg = TrainConfig(**{**partner, key: value})
        except PtrayError as err:
            self.fail(field, str(err))
        except (TypeError, ValueError) as err:  # pragma: no cover - a type the checks above missed
            self.fail(field, f"{type(err).__name__}: {err}")
        return getattr(cfg, key).value if isinstance(getattr(cfg, key), enum.Enum) else value

    def combined(self, overrides: Mapping[str, Any], field: str) -> None:
        """The overrides of one grid slice together, as TrainConfig takes them."""
        try:
            TrainConfig(**overrides)
        except PtrayError as err:
            self.fail(field, str(err))

    def search(self, table: Any, train: Mapping, conditions: Mapping[str, Mapping]) -> dict[str, Search]:
        if not isinstance(table, Mapping):
            self.fail("search", f"must be a table of TrainConfig field -> distribution, got {table!r}")
        names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_TRIAL_FIELDS]
        self.unknown(table, names, "search.", "TrainConfig field")
        out = {}
        for key, spec in table.items():
            field = f"search.{key}"
            if key in train:
                self.fail(field, f"{key} is also set in [train]; a searched field is set by the search")
            for cname, over in conditions.items():
                if key in over:
                    self.fail(field, f"{key} is also set in conditions.{cname}; a searched field is set by the search")
            if not isinstance(spec, Mapping):
                self.fail(field, f"must be a table such as {{distribution = \"loguniform\", low = 1e-3, high = 1.0}}, "
                                 f"got {spec!r}")
            dist = spec.get("distribution")
            if dist not in DISTRIBUTIONS:
                self.fail(f"{field}.distribution", f"must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
            if dist == "choice":
                self.unknown(spec, ("distribution", "values"), f"{field}.")
                values = spec.get("values")
                if not isinstance(values, list) or not values:
                    self.fail(f"{field}.values", f"must be a non-empty list, got {values!r}")
                checked = tuple(self.value(key, v, f"{field}.values") for v in values)
                out[key] = Search(key, dist, values=checked)
                continue
            self.unknown(spec, ("distribution", "low", "high"), f"{field}.")
            bounds = []
            for end in ("low", "high"):
                if end not in spec:
                    self.fail(field, f"a {dist} search needs 'low' and 'high'")
                v = spec[end]
                integer = dist == "randint"
                if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) \
                        or not math.isfinite(v):
                    self.fail(f"{field}.{end}", f"must be {'an integer' if integer else 'a finite number'}, got {v!r}")
                bounds.append(v)
            low, high = bounds
            if not low < high:
                self.fail(field, f"low must be below high, got low {low!r}, high {high!r}")
            if dist == "loguniform" and low <= 0:
                self.fail(f"{field}.low", f"a loguniform search needs low > 0, got {low!r}")
            self.value(key, low, f"{field}.low")  # the ends are values the field takes (randint: high - 1)
            self.value(key, high - 1 if dist == "randint" else high, f"{field}.high")
            out[key] = Search(key, dist, low, high)
        return out


_TYPE_WORDS = {bool: "boolean (true or false)", int: "integer", float: "number", str: "string"}


def _field_types() -> dict[str, Any]:
    """TrainConfig field -> its type without ``| None``."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    return out
