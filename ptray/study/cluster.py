"""The Ray cluster a study runs on, checked before anything starts: Ray started or joined (a dead ``--address``
found in seconds), the tracking store and Tune's storage reachable from every node, each trial's GPU fraction, and
resources that some node (or a node type the autoscaler can add) can hold; what a killed driver's embedded Ray
left running is stopped. Each failure is one ``PtrayError`` line that says what to change.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from urllib.parse import urlparse

from ptray.config import DEFAULT_GPUS_PER_TRIAL
from ptray.errors import PtrayError
from ptray.plan import Options
from ptray.study import store

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "glusterfs", "gpfs", "beegfs",
                       "9p", "virtiofs", "efs")  # a local path on these may be shared by every node (fuse.* too)


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
    except Exception as err:  # noqa: BLE001 - Ray's start fails as ConnectionError, RuntimeError, TimeoutError or a
        # bare Exception ("The current node timed out during startup"): each is one line for the user, not a trace
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray"
        first = (str(err).splitlines() or [""])[0]
        logs = "" if address else (" (Ray's own logs: ray/session_latest/logs under the temporary folder, "
                                   "RAY_TMPDIR or /tmp)")
        try:  # what started before the failure (a GCS, a raylet) must not outlive this process
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise PtrayError(f"could not start {where}: {type(err).__name__}{': ' + first if first else ''}{logs}"
                         ) from None
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
