"""User paths as every process of a study sees them.

A study runs in many processes: the driver (``sweeps/all.py``), Ray Tune's trials (each started in its own trial
folder as working directory), the transfer tasks and the analysis. A relative path typed by the user would name a
different file, or none, in each of them, so every path a study hands on is made absolute once, in the driver,
against the working directory the user typed it in.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from ptray.errors import PtrayError
from ptray.files import looks_like_path


def study_path(value: str | None, flag: str, hub_name: bool = False) -> str | None:
    """``value`` (the text of ``flag``) as every process of a study must see it.

    A local path becomes absolute (``~`` expanded), whether or not it exists yet; a URI (``s3://...``) and None pass
    unchanged. With ``hub_name`` (``--model``): an existing local path becomes absolute; a Hub id (``name`` or
    ``org/name``) that is no local path passes unchanged; anything else that reads as a path but does not exist
    (``./model``, ``../m``, ``/abs``, ``~/m``, ``a/b/c``) raises PtrayError, before anything starts.

    >>> study_path("s3://bucket/ray", "--storage-path")
    's3://bucket/ray'
    >>> study_path("bigscience/bloomz-560m", "--model", hub_name=True)
    'bigscience/bloomz-560m'
    """
    if value is None:
        return None
    text = str(value)
    if "://" in text and urlparse(text).scheme:
        return text
    local = Path(text).expanduser()
    if hub_name and not local.exists():
        if looks_like_path(text):  # load_model's rule
            raise PtrayError(f"{flag} {text!r} does not exist (looked for {local.resolve()}); pass an existing "
                             f"folder or a Hub name such as bigscience/bloomz-560m")
        return text
    return str(local.resolve())


def tune_path(storage: str, study: str) -> str:
    """Where Tune keeps the study's trials: ``storage``/``study`` (a URI or a local path)."""
    return f"{storage}/{study}" if "://" in storage else str(Path(storage) / study)
