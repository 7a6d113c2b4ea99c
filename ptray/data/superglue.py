"""Load SuperGLUE examples from a local directory (official jsonl layout) or the Hugging Face Hub.

Both sources give the same normalised records: ``Example(task, split, idx, fields, label)`` where ``fields`` is a
flat dict (WSC's ``target`` spans flattened, as on the Hub) and ``label`` is an index into ``task.labels`` (None
for unlabeled test records).

Quirks of the official files are kept, not "fixed": exact duplicate records stay (the official counts include
them), and whitespace oddities (a newline inside a WSC span, a leading space in a COPA choice) are normalised by
the formatters, not here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptray.data.task import SPLITS, Task
from ptray.errors import PtrayError

__all__ = ["DEFAULT_HUB_DATASET", "SPLITS", "Example", "load_split", "read_hub", "read_jsonl"]

DEFAULT_HUB_DATASET = "aps/super_glue"  # the parquet mirror of super_glue; no loading script needed


@dataclass(frozen=True)
class Example:
    """One normalised SuperGLUE record; hashed by its identity (task, split, idx, label), not its text fields."""

    task: str
    split: str
    idx: int
    fields: dict[str, Any] = field(hash=False)
    label: int | None  # index into Task.labels; None when the split is unlabeled


def _label_index(task: Task, raw: Any) -> int:
    # Official jsonl: CB/RTE strings, COPA ints, WSC JSON booleans. Canonical names are their str() forms.
    key = str(raw) if not isinstance(raw, str) else raw
    if key not in task.labels:
        raise ValueError(f"label {raw!r} is not one of {task.name}'s labels {list(task.labels)}")
    return task.labels.index(key)


def _normalise(task: Task, record: dict, split: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise PtrayError(f"{where}: expected a JSON object, got {type(record).__name__}")
    flat = dict(record)
    if isinstance(flat.get("target"), dict):  # official WSC nests the spans
        flat.update(flat.pop("target"))
    fields = {}
    for name in task.fields:
        if name not in flat:
            raise PtrayError(f"{where}: field {name!r} is missing (a {task.name} record needs {list(task.fields)})")
        value = flat[name]
        expected = int if name in task.int_fields else str
        if not isinstance(value, expected) or isinstance(value, bool):
            raise PtrayError(f"{where}: field {name!r} should be {expected.__name__}, got {value!r}")
        fields[name] = value
    for name, allowed in task.allowed_values.items():
        if fields[name] not in allowed:
            raise PtrayError(f"{where}: field {name!r} must be {' or '.join(map(repr, allowed))}, got {fields[name]!r}")
    label = None
    if "label" in flat and flat["label"] is not None and flat["label"] != -1:
        try:
            label = _label_index(task, flat["label"])
        except ValueError as err:
            raise PtrayError(f"{where}: field 'label': {err}") from None
    elif split != "test":
        raise PtrayError(f"{where}: field 'label' is missing (the {split} split must be labeled)")
    idx = flat.get("idx", None)
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise PtrayError(f"{where}: field 'idx' should be int, got {idx!r}")
    return Example(task=task.name, split=split, idx=idx, fields=fields, label=label)


def read_jsonl(task: Task, split: str, data_dir: str | os.PathLike) -> list[Example]:
    """Read ``<data_dir>/<TASK>/<split>.jsonl`` (official SuperGLUE layout)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise PtrayError(
            f"data directory {str(root)!r} does not exist; pass --data-dir pointing at a folder with "
            f"<TASK>/{{train,val,test}}.jsonl (the official SuperGLUE layout)"
        )
    path = root / task.dir_name / f"{split}.jsonl"
    if not path.is_file():
        raise PtrayError(f"split file {str(path)!r} is missing; expected {task.dir_name}/{split}.jsonl under "
                         f"{str(root)!r}")
    examples = []
    with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows editors) is not JSON
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # json's messages for a cut line end in "at" ("Unterminated string starting at"): one "at" here
                msg = err.msg.removesuffix(" at")
                raise PtrayError(f"{where}: not valid JSON ({msg} at column {err.colno})") from None
            examples.append(_normalise(task, record, split, where))
    if not examples:
        raise PtrayError(f"split file {str(path)!r} holds no records")
    check_unique_idx(examples, str(path))
    return examples


def check_unique_idx(examples: list[Example], where: str) -> None:
    """Refuse a split in which two records share an ``idx``: predictions, transfer and the analysis key examples by
    it, so two records under one id would be counted once there and twice in the run (two numbers for one run).

    Raises:
        PtrayError: naming ``where`` and the repeated ids (the first few).
    """
    seen: dict[int, int] = {}
    for e in examples:
        seen[e.idx] = seen.get(e.idx, 0) + 1
    repeated = [i for i, n in seen.items() if n > 1]
    if repeated:
        shown = ", ".join(map(str, repeated[:10])) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        raise PtrayError(f"{where}: {len(repeated)} idx value(s) appear more than once ({shown}); every record of a "
                         f"split needs its own idx (results are keyed by it): renumber the records")


def read_hub(task: Task, split: str, dataset_id: str = DEFAULT_HUB_DATASET) -> list[Example]:
    """Read a split from the Hugging Face Hub (the parquet mirror: integer labels, flat WSC spans).

    The task's own ``hub_dataset`` (its declaration's ``data.hub_dataset``), when set, wins over ``dataset_id``;
    the split's Hub name is the declaration's ``data.hub_splits`` (default train/validation/test).

    Raises:
        PtrayError: the task declares no Hub source, the Hub cannot be reached, or a row is malformed.
    """
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a core dependency
        raise PtrayError("the 'datasets' package is needed to read from the Hub; pip install datasets") from err
    dataset_id = task.hub_dataset or dataset_id
    if task.hub_dataset is None and task.hub_config is None:
        raise PtrayError(f"task {task.name!r} declares no Hub dataset (data.hub_dataset or data.hub_config in "
                         f"{task.source}); pass --data-dir DIR with DIR/{task.dir_name}/{split}.jsonl")
    where = dataset_id if task.hub_config is None else f"{dataset_id}/{task.hub_config}"
    try:
        ds = datasets.load_dataset(dataset_id, task.hub_config, split=task.hub_splits[split])
    except Exception as err:  # network errors come in many types; the message is what the user needs
        raise PtrayError(
            f"could not load {where} ({split}) from the Hugging Face Hub "
            f"({type(err).__name__}); if the Hub is unreachable, pass --data-dir DIR with the official "
            f"SuperGLUE jsonl files in DIR/<TASK>/{{train,val,test}}.jsonl"
        ) from None
    out = []
    for row_no, row in enumerate(ds):
        row = dict(row)
        label = row.get("label")
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.labels):
            row["label"] = task.labels[label]  # Hub labels are indices into the same label order
        out.append(_normalise(task, row, split, f"{where}[{split}] row {row_no}"))
    check_unique_idx(out, f"{where}[{split}]")
    return out


def load_split(
    task: Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    hub_dataset: str = DEFAULT_HUB_DATASET,
    limit: int | None = None,
) -> list[Example]:
    """Examples of one split: from ``data_dir`` when given, else from the Hub. ``limit`` keeps the first N.

    Raises:
        PtrayError: an unknown split, a split the task does not declare, or a missing or malformed source.
    """
    if split not in SPLITS:
        raise PtrayError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split not in task.splits:
        raise PtrayError(f"task {task.name!r} has no {split} split (its declaration, {task.source}, lists: "
                         f"{', '.join(task.splits)})")
    examples = read_jsonl(task, split, data_dir) if data_dir is not None else read_hub(task, split, hub_dataset)
    return examples[:limit] if limit else examples
