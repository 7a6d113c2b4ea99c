#!/usr/bin/env bash
# Run a command against a real one-node SLURM cluster started for it:  tests/slurm/with_slurm.sh CMD ARGS...
#
# Installs Debian's slurm-wlm and munge when missing (root), starts munged, slurmctld and slurmd with every state,
# spool, pid, log and socket file under a temporary folder, runs CMD with SLURM_CONF pointing at that cluster,
# then stops the daemons it started, by their pids, and removes the folder. Exits with CMD's status.
# The cluster: this machine as its only node (all its CPUs and most of its memory), one partition named "debug".
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

# Short: munge's socket path and Ray's socket paths (under the jobs' scratch space) have a length limit.
ROOT="$(mktemp -d /tmp/slurm.XXXXXX)"
chmod 755 "$ROOT"
PIDS=()
stop() {
    local pid jobs
    # Jobs first: a job's steps (slurmstepd and what it runs) outlive slurmd by design.
    if [ -n "${SLURM_CONF:-}" ] && jobs="$(squeue -h -o %A 2>/dev/null)" && [ -n "$jobs" ]; then
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
    fi
    # slurmd first (its jobs' steps end with it), then the controller, then munge that both use.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$ROOT"
}
trap stop EXIT
trap 'exit 130' INT TERM

# munge: the Debian package makes a key; a machine without one gets a new one.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p "$ROOT/munge"
chown munge:munge "$ROOT/munge"
chmod 755 "$ROOT/munge"  # munged wants its socket folder searchable by all
SOCKET="$ROOT/munge/munge.socket"
# setpriv execs munged, so $! is munged's own pid (runuser would stay as its parent)
setpriv --reuid=munge --regid=munge --init-groups munged --foreground --socket="$SOCKET" \
    --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/munge/munged.log" --seed-file="$ROOT/munge/seed" 2>>"$ROOT/munge/munged.err" &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -S "$SOCKET" ] || { echo "munged did not start: $(tail -1 "$ROOT/munge/munged.err")" >&2; exit 1; }

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEMORY="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"  # MB; slurmd refuses more than it finds
mkdir -p "$ROOT/state" "$ROOT/spool"
export SLURM_CONF="$ROOT/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=ptraytest
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/slurmctld.log
SlurmdLogFile=$ROOT/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -f "$SLURM_CONF" >/dev/null 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break
    sleep 0.2
done
if [ "$(sinfo -h -o %t 2>/dev/null)" != idle ]; then
    echo "the SLURM node did not become idle; slurmctld.log:" >&2
    tail -20 "$ROOT/slurmctld.log" >&2 || true
    exit 1
fi
export PTRAY_TEST_SLURM=1  # tests/test_slurm.py runs its real jobs only against this cluster
echo "SLURM cluster up: node $HOST ($CPUS CPUs), partition debug, SLURM_CONF=$SLURM_CONF"
"$@"
