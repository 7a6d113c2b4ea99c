"""Checks before a study starts anything: paths, the Ray cluster, the tracking store and Tune's storage as every
node will see them. Each failure is one ``PtrayError`` line that says what to change."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from ptray.config import DEFAULT_GPUS_PER_TRIAL, Options, Plan
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.study import tracking
from ptray.study.paths import study_path

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "glusterfs", "gpfs", "beegfs",
                       "9p", "virtiofs", "efs")  # a local path on these may be shared by every node (fuse.* too)


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
    return study_path(path, "--storage-path")

def data_files(plan: Plan) -> list[str]:
    """The files of ``plan.train.data_dir`` the study reads (paths relative to it); a missing one is an error now,
    not in a trial."""
    if plan.train.data_dir is None:
        return []
    rel = [f"{get_task(t).dir_name}/{split}.jsonl" for t in plan.tasks for split in ("train", "val")]
    missing = [r for r in rel if not (Path(plan.train.data_dir) / r).is_file()]
    if missing:
        raise PtrayError(f"--data-dir {plan.train.data_dir!r} lacks {', '.join(missing)} (the official SuperGLUE "
                         f"layout <TASK>/train.jsonl, <TASK>/val.jsonl)")
    return rel

def check_plan_lengths(plan: Plan, model: str) -> None:
    """The length checks every trial makes first (``ptray.data.batching.check_fits``: the answer cue and answer within
    --max-length, prompt + --max-length within the model's positions), for every task of the plan, here: a length
    that cannot serve is refused before any trial starts. Skipped when ``model``'s tokenizer and config cannot be
    read here without the network (the trials' model loading then says why)."""
    from transformers import AutoConfig, AutoTokenizer

    from ptray.data.batching import check_fits

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # not on this machine, or not a model: load_model in the trials reports it in one line
        return
    check_fits(plan.tasks, tokenizer, config, plan.train)


def start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start an embedded Ray. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local", not None: a bare init joins whatever cluster /tmp/ray names, even a dead one.
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray"
        raise PtrayError(f"could not start {where}: {str(err).splitlines()[0]}") from None
    return True


def check_ray_address(address: str) -> None:
    """Fail in seconds when no Ray cluster answers at ``address``: ray.init retries a dead address for minutes."""
    if address.startswith("ray://"):
        return
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # moved in another Ray release: let ray.init find out
        return
    try:
        resolved = get_ray_address_from_environment(address, None)
    except ConnectionError as err:
        raise PtrayError(f"--address {address}: no running Ray cluster was found ({str(err).splitlines()[0]}); "
                         f"start one (`ray start --head`, or `ray up cluster.yaml` and run the sweep on its head)"
                         ) from None
    host, _, port = str(resolved).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise PtrayError(f"--address {address}: no Ray cluster answers at {resolved}; is it running? "
                         f"(`ray status` on the head tells)") from None


def _cluster_ips() -> set[str]:
    import ray

    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def _autoscaling() -> bool:
    # `ray up` starts the head with --autoscaling-config=~/ray_bootstrap_config.yaml: nodes will come and go.
    return Path("~/ray_bootstrap_config.yaml").expanduser().is_file()


def check_cluster(opts: Options, uri: str, storage: str) -> str:
    """On a cluster of several machines: the tracking store and Tune's storage must be reachable from every node.
    Returns the tracking URI the trials should use."""
    import ray

    if opts.address is None:
        return uri
    here = ray.util.get_node_ip_address()
    several = bool(_cluster_ips() - {here}) or _autoscaling()
    if not several:
        return uri
    if tracking.is_local_store(uri):
        raise PtrayError(f"the tracking store {uri} is a file on this machine, but the Ray cluster has other "
                         f"machines; run an MLflow server (the head of cluster.yaml does) and pass --tracking-uri "
                         f"http://HEAD_PRIVATE_IP:5000")
    host = urlparse(uri).hostname
    if host in ("localhost", "127.0.0.1", "::1"):
        rewritten = uri.replace(host, here, 1)
        try:
            tracking.check_tracking(rewritten)
        except PtrayError:
            raise PtrayError(f"--tracking-uri {uri} is this machine's loopback, which other nodes cannot reach, and "
                             f"the server does not answer at {rewritten}; start it with --host 0.0.0.0 (private "
                             f"network only) and pass --tracking-uri {rewritten}") from None
        uri = rewritten
    if "://" not in storage:
        fstype = _filesystem_type(storage)
        if not (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse")):
            raise PtrayError(f"--storage-path {storage} is on this machine's local disk ({fstype}), but the Ray "
                             f"cluster has other machines, whose trials could not write their checkpoints there; "
                             f"use s3://BUCKET/PATH or a shared filesystem mounted on every node")
    return uri


def _filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; "unknown" where there is none)."""
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1].replace("\\040", " ")
                if (str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def gpus_per_trial(opts: Options) -> float:
    """The GPU fraction of each trial: ``--gpus-per-trial``, else 0.25 where the cluster has (or can add) GPUs."""
    import ray

    if opts.gpus_per_trial is not None:
        return opts.gpus_per_trial
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0 or (opts.address is not None and _autoscaling())
    return DEFAULT_GPUS_PER_TRIAL if has_gpus else 0.0
