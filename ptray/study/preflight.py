"""Checks before a study starts anything: paths, the Ray cluster, the tracking store and Tune's storage as every
node will see them. Each failure is one ``PtrayError`` line that says what to change."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
from pathlib import Path
from urllib.parse import urlparse

from ptray.config import DEFAULT_GPUS_PER_TRIAL, Options, Plan
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.study import store
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
    rel += [f"{get_task(t).dir_name}/val.jsonl" for t in plan.targets]  # transfer-only: evaluated, never trained
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
    check_fits(plan.transfer_targets, tokenizer, config, plan.train)


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
    if store.is_local_store(uri):
        raise PtrayError(f"the tracking store {uri} is a file on this machine, but the Ray cluster has other "
                         f"machines; run an MLflow server (the head of cluster.yaml does) and pass --tracking-uri "
                         f"http://HEAD_PRIVATE_IP:5000")
    host = urlparse(uri).hostname
    if host in ("localhost", "127.0.0.1", "::1"):
        rewritten = uri.replace(host, here, 1)
        try:
            store.check_tracking(rewritten)
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


# ---------------------------------------------------------------------------------------------------------------
# the model a study trains and evaluates on: the same on --resume

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


# ---------------------------------------------------------------------------------------------------------------
# resources every trial and evaluation asks for: some node must have them, or Tune waits forever


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _autoscaler_node_types() -> list[dict[str, float]] | None:
    """The resources of each node type the autoscaler may add (from ``~/ray_bootstrap_config.yaml``), or None when
    there is no autoscaler or a type's resources are not declared (the cloud detects them: cannot tell here)."""
    path = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not path.is_file():
        return None
    try:
        import yaml

        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    except Exception:  # noqa: BLE001 - unreadable: let Ray's autoscaler decide
        return None
    out = []
    for spec in types.values():
        res = (spec or {}).get("resources")
        if not res or "CPU" not in res:
            return None
        out.append({k: float(v) for k, v in res.items() if isinstance(v, (int, float))})
    return out


def check_resources(requests: dict[str, tuple[float, float]], nodes: list[dict[str, float]],
                    node_types: list[dict[str, float]] | None = None) -> None:
    """Refuse, in one line, a request (``what -> (cpus, gpus)``) that no node and no node type the autoscaler can
    add could ever hold: Tune would leave it PENDING forever. The line names the largest request that fits."""
    eps = 1e-9
    machines = nodes + (node_types or [])
    for what, (cpus, gpus) in requests.items():
        if any(m.get("CPU", 0) + eps >= cpus and m.get("GPU", 0) + eps >= gpus for m in machines):
            continue
        where = "no node of the Ray cluster" + (" and no node type its autoscaler can add" if node_types else "")
        shapes = sorted({(m.get("CPU", 0), m.get("GPU", 0)) for m in machines}, reverse=True)
        have = ", ".join(f"{c:g} CPU + {g:g} GPU" for c, g in shapes[:4]) or "no nodes"
        fix = []
        with_gpus = [m.get("CPU", 0) for m in machines if m.get("GPU", 0) + eps >= gpus]
        if with_gpus and max(with_gpus) > 0:
            fix.append(f"--cpus-per-trial {max(with_gpus):g} or less")
        with_cpus = [m.get("GPU", 0) for m in machines if m.get("CPU", 0) + eps >= cpus]
        if gpus > 0 and with_cpus:
            best = max(with_cpus)
            fix.append(f"--gpus-per-trial {best:g} or less" if best > 0 else "--gpus-per-trial 0")
        hint = f"; pass {' or '.join(fix)}" if fix else "; add a node that has it"
        raise PtrayError(f"{what} asks for {cpus:g} CPU + {gpus:g} GPU, but {where} has that much ({have}); "
                         f"it would wait forever{hint}")


def check_cluster_resources(opts: Options, trial_gpus: float, eval_gpus: float) -> None:
    """``check_resources`` for a study's trials (``trial_gpus``, a group's) and transfer evaluations
    (``eval_gpus``), each with ``--cpus-per-trial`` CPUs, against the running cluster."""
    check_resources({"a training trial": (opts.cpus_per_trial, trial_gpus),
                     "a transfer evaluation": (opts.cpus_per_trial, eval_gpus)},
                    _node_resources(), _autoscaler_node_types() if opts.address else None)


# ---------------------------------------------------------------------------------------------------------------
# what a killed driver leaves behind

_SESSION = re.compile(r"--(?:ray_)?session[-_]dir=(\S+)")


def leftover_ray_processes(proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """This user's Ray processes (dashboard and runtime-env agents, log monitors) whose session has no GCS server
    or raylet left: what a SIGKILLed driver's embedded Ray leaves running. Session folder -> pids."""
    sessions: dict[str, list[int]] = {}
    alive: set[str] = set()
    uid = os.getuid()
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        match = _SESSION.search(text)
        if not match or "ray" not in text:
            continue
        session = match.group(1)
        if Path(argv[0].decode(errors="replace")).name in ("gcs_server", "raylet"):
            alive.add(session)
        else:
            sessions.setdefault(session, []).append(int(entry.name))
    return {s: pids for s, pids in sessions.items() if s not in alive}


def clear_leftover_ray(say=print) -> int:
    """Stop ``leftover_ray_processes`` (SIGTERM, by pid); say what was stopped. Returns how many."""
    stopped = 0
    for session, pids in leftover_ray_processes().items():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
                stopped += 1
            except OSError:
                pass
        say(f"stopped {len(pids)} Ray process(es) left running by a killed driver (session {session})")
    return stopped
