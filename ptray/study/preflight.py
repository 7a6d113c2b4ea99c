"""Checks before a study starts anything: the data folder and the files the plan reads from it, Tune's storage
path, and the lengths every trial would check first. Each failure is one ``PtrayError`` line that says what to
change. The Ray cluster's checks are ``ptray.study.cluster``'s, the model's fingerprint
``ptray.study.fingerprint``'s."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.files import check_output_folder
from ptray.plan import Plan
from ptray.study.paths import study_path


def resolve_data_dir(path: str) -> str:
    """``--data-dir`` as an absolute path; a folder that does not exist is an error."""
    folder = Path(study_path(path, "--data-dir"))
    if not folder.is_dir():
        raise PtrayError(f"--data-dir {path!r} does not exist; pass the folder with <TASK>/{{train,val}}.jsonl "
                         f"(e.g. ../shared/data/superglue)")
    return str(folder)

def resolve_storage(path: str | None, cluster: bool) -> str:
    """Tune's storage path: a URI (s3://, gs://, ...) as is; a local path absolute. On a cluster a relative path
    is refused: it would name a different folder on every node."""
    if path is None:
        return str(Path.cwd() / "outputs" / "ray_results")
    if urlparse(path).scheme and "://" in path:
        return path.rstrip("/")
    if cluster and not Path(path).expanduser().is_absolute():
        raise PtrayError(f"--storage-path {path!r} is relative; on a cluster give shared storage: s3://BUCKET/PATH "
                         f"or an absolute path on a filesystem mounted on every node (NFS, EFS)")
    local = study_path(path, "--storage-path")
    # Tune writes here after the first trial: a path under a file or without write permission is refused now.
    check_output_folder(local, "--storage-path", reusable=lambda _: True)  # other studies' results may be there
    return local


def check_analysis_dir(path: str | None) -> None:
    """Refuse, before the study, an ``--analysis-dir`` the analysis could not write at its end (under a file, not
    writable, or holding something other than an earlier report, which a re-run replaces)."""
    if path is not None:
        check_output_folder(path, "--analysis-dir", fix="or empty it",
                            reusable=lambda p: (p / "analysis.json").is_file() and (p / "report.html").is_file())

def data_files(plan: Plan) -> list[str]:
    """The files of ``plan.train.data_dir`` the study reads (paths relative to it); a missing one is an error now,
    not in a trial."""
    if plan.train.data_dir is None:
        return []
    rel = [f"{get_task(t).dir_name}/{split}.jsonl" for t in plan.tasks for split in ("train", "val")]
    rel += [f"{get_task(t).dir_name}/val.jsonl" for t in plan.targets]  # transfer-only: evaluated, never trained
    missing = [r for r in rel if not (Path(plan.train.data_dir) / r).is_file()]
    if missing:
        raise PtrayError(f"--data-dir {plan.train.data_dir!r} lacks {', '.join(missing)} (the official SuperGLUE "
                         f"layout <TASK>/train.jsonl, <TASK>/val.jsonl)")
    return rel

def check_data(plan: Plan) -> list[str]:
    """``data_files``, then every one of them read as the trials will read it (``ptray.data.superglue.read_jsonl``):
    a file cut mid-line, a record without a field or a label, a repeated idx is the reader's one line, naming the
    user's file, here, before anything is scheduled (in a trial it would fail every retry, naming a node's cached
    copy). Returns ``data_files``'s paths.

    Raises:
        PtrayError: a missing file, or the first problem of the first unreadable file (``path:line: what``).
    """
    from ptray.data.superglue import read_jsonl

    rel = data_files(plan)
    if plan.train.data_dir is not None:
        for name in plan.tasks:
            for split in ("train", "val"):
                read_jsonl(get_task(name), split, plan.train.data_dir)
        for name in plan.targets:
            read_jsonl(get_task(name), "val", plan.train.data_dir)
    return rel


def check_plan_lengths(plan: Plan, model: str) -> None:
    """The length checks every trial makes first (``ptray.data.batching.check_fits``: the answer cue and answer within
    --max-length, prompt + --max-length within the model's positions), for every task of the plan, here: a length
    that cannot serve is refused before any trial starts. Skipped when ``model``'s tokenizer and config cannot be
    read here without the network (the trials' model loading then says why)."""
    from transformers import AutoConfig

    from ptray.data.batching import check_fits

    tokenizer = local_tokenizer(model)
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # not on this machine, or not a model: load_model in the trials reports it in one line
        return
    if tokenizer is not None:
        check_fits(plan.transfer_targets, tokenizer, config, plan.train)


def local_tokenizer(model: str):
    """``model``'s tokenizer (a folder, or a Hub name already in the cache), read without the network; None where
    it cannot be read here (the trials' model loading then says why)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:
        return None
