"""The model a study trains and evaluates on, fingerprinted so that ``--resume`` continues on the same one: a local
folder's files (hashed whole when small, sampled when large), a Hub name's cached revision; what changed, in words.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ptray.errors import PtrayError
from ptray.plan import Plan

# Files hashed whole up to this size; larger ones (weights) by their size, header and sampled blocks: a study's
# start must not read gigabytes, and a rebuilt or retrained checkpoint still differs in every sample.
WHOLE_FILE_BYTES = 4 << 20
SAMPLES, SAMPLE_BYTES = 16, 64 << 10


def _file_fingerprint(path: Path) -> str:
    """16 hex digits that change when the file's contents do: the whole file when small, else its size, its first
    ``WHOLE_FILE_BYTES`` (a safetensors header among them) and ``SAMPLES`` blocks spread over the rest."""
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        sha.update(f.read(WHOLE_FILE_BYTES))
        if size > WHOLE_FILE_BYTES:
            for i in range(SAMPLES):
                f.seek(WHOLE_FILE_BYTES + (size - WHOLE_FILE_BYTES - SAMPLE_BYTES) * i // max(SAMPLES - 1, 1))
                sha.update(f.read(SAMPLE_BYTES))
    return sha.hexdigest()[:16]


def _model_files(folder: Path) -> list[str]:
    """The files a model folder is loaded from: everything but hidden folders/files and documentation."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and p.suffix.lower() != ".md":
            out.append(str(rel))
    return out


def model_fingerprint(model: str) -> tuple[str | None, dict[str, str] | None]:
    """What ``--resume`` compares of ``--model``: ``(digest, files)``.

    A local folder: ``files`` maps each file (config.json, the weights and their index, the tokenizer's files) to
    ``_file_fingerprint``, ``digest`` is 16 hex digits over them. A Hub name: ``digest`` is ``hub:NAME@COMMIT``
    with the commit the local Hub cache resolves (what a trial on this machine loads), else ``hub:NAME``;
    ``files`` is None.
    """
    folder = Path(model)
    if folder.is_dir():
        files = {rel: _file_fingerprint(folder / rel) for rel in _model_files(folder)}
        sha = hashlib.sha256(json.dumps(files, sort_keys=True).encode())
        return sha.hexdigest()[:16], files
    return f"hub:{model}" + (f"@{_hub_commit(model)}" if _hub_commit(model) else ""), None


def _hub_commit(name: str) -> str | None:
    """The commit of ``name``'s main revision in the local Hugging Face cache, or None (not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, no huggingface_hub: no revision to record
        return None
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def model_change(model: str, stored_digest: str | None, stored_files: dict[str, str] | None, digest: str | None,
                 files: dict[str, str] | None) -> str | None:
    """What differs between the model a study started with and ``model`` now, in words; None when nothing does or
    when it cannot be told (a plan stored without a digest, a Hub model that was not cached then or now)."""
    if not stored_digest or not digest or stored_digest == digest:
        return None
    if stored_digest.startswith("hub:") or digest.startswith("hub:"):
        if "@" not in stored_digest or "@" not in digest:
            return None
        old, new = stored_digest.rpartition("@")[2], digest.rpartition("@")[2]
        if stored_digest.startswith("hub:") and digest.startswith("hub:"):
            return f"the Hub model {model} is now at revision {new[:12]} in the local cache, the study started at " \
                   f"{old[:12]}"
        return f"--model {model} was {stored_digest.partition(':')[2]} when the study started"
    if stored_files is None or files is None:
        return f"the files of the model folder {model} differ from those the study started with ({digest} != " \
               f"{stored_digest})"
    changed = [f"{rel} changed" for rel in sorted(set(files) & set(stored_files)) if files[rel] != stored_files[rel]]
    changed += [f"{rel} added" for rel in sorted(set(files) - set(stored_files))]
    changed += [f"{rel} removed" for rel in sorted(set(stored_files) - set(files))]
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    return f"the model folder {model} changed since the study started: {', '.join(changed[:4])}{more}"


def check_same_model(plan: Plan, digest: str | None, files: dict[str, str] | None) -> None:
    """On ``--resume``: the model must be the one the study's trials trained on (``plan``, as stored)."""
    change = model_change(plan.train.model, plan.model_digest, getattr(plan, "model_files", None), digest, files)
    if change:
        raise PtrayError(f"--resume of study {plan.study!r}: {change}; its trials trained on the old model and its "
                         f"transfer would evaluate on the new one: restore the model, or start a new --study")


def check_same_data(plan: Plan, digest: str | None, files: dict[str, str] | None, accept: bool) -> bool:
    """On ``--resume``: the data files (``digest``, ``files``: ``Bundle.digest`` and ``Bundle.file_digests`` of the
    files the plan reads now) must be those the study started with (``plan``, as stored), unless ``accept``
    (``--accept-new-data``). Returns whether they differ (and were accepted: the caller stores the new digests).

    Raises:
        PtrayError: they differ and ``accept`` is False: which files changed (when the plan recorded them), and the
            three ways forward: restore them, start a new study, or accept them.
    """
    stored = plan.data_digest
    if not stored or not digest or stored == digest:
        return False
    old = plan.data_files
    if old is None or files is None:  # a plan stored before each file's digest was recorded
        what = f"differ from those the study started with ({digest} != {stored})"
    else:
        changed = [f"{rel} changed" for rel in sorted(set(files) & set(old)) if files[rel] != old[rel]]
        changed += [f"{rel} added" for rel in sorted(set(files) - set(old))]
        changed += [f"{rel} removed" for rel in sorted(set(old) - set(files))]
        what = f"changed since the study started: {', '.join(changed)}"
    if accept:
        print(f"--accept-new-data: study {plan.study!r} goes on with the data files in {plan.train.data_dir}, "
              f"which {what}; its finished runs keep what the old files gave", flush=True)
        return True
    raise PtrayError(f"--resume of study {plan.study!r}: the data files in {plan.train.data_dir} {what}; restore "
                     f"them, start anew with another --study (the same flags without --resume), or pass "
                     f"--accept-new-data to finish this study on the new files (its finished runs keep what the old "
                     f"files gave)")
