"""The sbatch script of ``ptray slurm`` (``ptray.study.slurm`` checks the cluster and the study, then writes it):
its ``#SBATCH`` lines, the job's settings, and the body that starts Ray's head and workers across the allocation's
nodes with ``srun``, an MLflow server on the head when no tracking URI is given, runs the study against them, and
on SLURM's ``USR1`` before the time limit stops the driver as Ctrl-C would and requeues the job. The module
docstring of ``ptray.study.slurm`` says what the job does and why.
"""

from __future__ import annotations

import shlex
from pathlib import Path

SCRIPT_NAME = "job.sbatch"


def render(*, flags: list[str], study: str, experiment: str, job_dir: Path, workdir: Path, python: str,
           nodes: int, cpus: int | None, gpus: int, partition: str | None, time_limit: str | None,
           signal_lead: int, extra: list[str], ray_port: int, mlflow_port: int, tracking_uri: str | None,
           storage_path: str | None) -> str:
    """The sbatch script's text (see the module's docstring for what it does)."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"# Written by ptray slurm for study {study}. Resubmit it as it is",
             f"# (sbatch {q(str(job_dir / SCRIPT_NAME))}): it resumes the study where the last job left it.",
             f"#SBATCH --job-name=ptray-{study}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    lines.append(f"#SBATCH --cpus-per-task={cpus}" if cpus else "#SBATCH --exclusive")
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines += [f"#SBATCH --chdir={workdir}", f"#SBATCH --output={job_dir}/slurm-%j.out", "#SBATCH --open-mode=append",
              f"#SBATCH --signal=B:USR1@{signal_lead}", "#SBATCH --requeue", *(f"#SBATCH {o}" for o in extra)]
    storage = storage_path or str(job_dir / "ray_results")
    package_root = str(Path(__file__).resolve().parents[2])  # the ptray that writes the script is the one it runs
    head = f"""
PYTHON={q(python)}
export PYTHONPATH={q(package_root)}${{PYTHONPATH:+:$PYTHONPATH}}
JOB_DIR={q(str(job_dir))}
STUDY={q(study)}
EXPERIMENT={q(experiment)}
TRACKING_URI={q(tracking_uri or "")}
STUDY_ARGS=({" ".join(q(f) for f in flags)} --storage-path {q(storage)})
RAY_PORT={ray_port}
MLFLOW_PORT={mlflow_port}
GPUS={gpus}
"""
    return "\n".join(lines) + "\n" + head + JOB_BODY


JOB_BODY = r"""
set -uo pipefail
echo "ptray: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $(date -u)"
# Ray's and MLflow's temporary files on the job's scratch space, one folder per job on each node.
SCRATCH="${TMPDIR:-/tmp}/ptray-$SLURM_JOB_ID"
mkdir -p "$SCRATCH/tmp"
export TMPDIR="$SCRATCH/tmp"
CPUS="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
# The batch script runs on the first node: Ray's head. Its address as Ray itself picks it (hostname --ip-address
# may say 127.0.1.1, which no other node can reach).
HEAD_IP="$("$PYTHON" -c 'import ray; print(ray.util.get_node_ip_address())')"
ADDRESS="$HEAD_IP:$RAY_PORT"
RAY=("$PYTHON" -m ray.scripts.scripts)
# Ray's token authentication with a token of this job's own: the workers (srun passes the environment on), the
# driver and the trials share it without a token file in a home folder.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN
PIDS=()

cleanup() {
    local pid alive
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
    # Until Ray's processes on this node are gone too (srun may return first; they write into the scratch folder),
    # at most 25 s: a cancelled job is killed outright KillWait seconds (often 30) after its TERM.
    for _ in $(seq 25); do
        alive=""
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        pgrep -f -- "$SCRATCH/" >/dev/null && alive=1
        [ -z "$alive" ] && break
        sleep 1
    done
    rm -rf "$SCRATCH"
    if [ "${#NODES[@]}" -gt 1 ]; then  # the workers' scratch, once their Ray has stopped (not after a cancel)
        timeout 60 srun --nodes=$((${#NODES[@]} - 1)) --ntasks-per-node=1 -w "$(IFS=,; echo "${NODES[*]:1}")" \
            rm -rf "$SCRATCH" 2>/dev/null
    fi
}
# Until the driver runs: a cancel or a warning stops what started so far (the warning also requeues the job).
trap 'cleanup; exit 143' TERM
trap 'cleanup; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1

srun --nodes=1 --ntasks=1 -w "${NODES[0]}" bash -c 'mkdir -p "$TMPDIR" && exec "$@"' ray \
    "${RAY[@]}" start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-cpus="$CPUS" --num-gpus="$GPUS" \
    --temp-dir="$SCRATCH/ray" --include-dashboard=false --block &
PIDS+=($!)
"$PYTHON" -m ptray.study.slurm wait ray "$ADDRESS" 1 300 || { cleanup; exit 1; }
for node in "${NODES[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" bash -c 'mkdir -p "$TMPDIR" && exec "$@"' ray \
        "${RAY[@]}" start --address="$ADDRESS" --num-cpus="$CPUS" --num-gpus="$GPUS" --temp-dir="$SCRATCH/ray" --block &
    PIDS+=($!)
done
"$PYTHON" -m ptray.study.slurm wait ray "$ADDRESS" "${#NODES[@]}" 300 || { cleanup; exit 1; }

if [ -z "$TRACKING_URI" ]; then
    # The study's MLflow store lives in the job folder, so the next job (requeued or resubmitted) finds it; the
    # server listens on the head's cluster address only, and takes that address (and localhost, for an SSH
    # tunnel) as Host header: its default list holds private IPs only. No job runner: a process tree we don't use.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PYTHON" -m mlflow server --host "$HEAD_IP" \
        --port "$MLFLOW_PORT" --workers 1 --allowed-hosts "$HEAD_IP:$MLFLOW_PORT,localhost:$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$JOB_DIR/mlflow.db" --artifacts-destination "$JOB_DIR/mlartifacts" \
        >>"$JOB_DIR/mlflow-server.log" 2>&1 &
    PIDS+=($!)
    TRACKING_URI="http://$HEAD_IP:$MLFLOW_PORT"
    "$PYTHON" -m ptray.study.slurm wait mlflow "$TRACKING_URI" 1 300 || { cleanup; exit 1; }
fi

RESUME=()
if "$PYTHON" -m ptray.study.slurm started "$TRACKING_URI" "$EXPERIMENT" "$STUDY"; then
    RESUME=(--resume)
fi
echo "ptray: study $STUDY ${RESUME[*]:-(new)} on Ray at $ADDRESS ($((${#NODES[@]})) node(s)), MLflow at $TRACKING_URI"
"$PYTHON" -m ptray study "${STUDY_ARGS[@]}" "${RESUME[@]}" --address "$ADDRESS" --tracking-uri "$TRACKING_URI" &
DRIVER=$!

# SLURM's warning before the time limit (--signal=B:USR1, to this shell only): stop the driver as Ctrl-C does (Tune
# stops the trials, each checkpointed at its last epoch, and saves its state), then requeue. A cancel's or a
# preemption's TERM reaches the driver from SLURM itself too, which ends it at once; the checkpoints stay.
SIGNAL=""
stop_driver() {
    SIGNAL="$1"
    echo "ptray: SIG$1 received, stopping the study at its checkpoints"
    kill -INT "$DRIVER" 2>/dev/null
}
trap 'stop_driver USR1' USR1
trap 'stop_driver TERM' TERM
while :; do
    wait "$DRIVER"
    STATUS=$?
    kill -0 "$DRIVER" 2>/dev/null || break  # wait returned for a signal: the driver is still stopping
done
trap - USR1 TERM
cleanup
echo "ptray: the study exited with status $STATUS, $(date -u)"
if [ "$SIGNAL" = USR1 ]; then
    echo "ptray: requeued before the time limit; the next run resumes the study"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
"""


def write_script(path: Path, text: str) -> None:
    """Write the script whole (a temporary sibling renamed over it), executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
