#!/usr/bin/env bash
# Start a one-node SLURM cluster on loopback for the tests (Debian's slurm-wlm 22.05 + munge).
# Usage: tests/slurm/start-cluster.sh [STATE_DIR]    (default /tmp/securetune-slurm)
# Stop it with tests/slurm/stop-cluster.sh [STATE_DIR]: every daemon is stopped by its pid.
#
# Everything lives in STATE_DIR (config, state, spool, logs, pids, munge socket), except one
# symlink: /etc/slurm/slurm.conf. It must be at the default path because the Snakemake SLURM
# jobstep plugin drops every SLURM_* variable (SLURM_CONF too) before its inner srun.
# Needs root, no systemd, no cgroups (see ../shared/docs/LOCAL_SLURM.md for the facts).
set -euo pipefail

STATE=${1:-/tmp/securetune-slurm}
STATE=$(realpath -m "$STATE")
HOST=$(hostname -s)

if [[ -e "$STATE/pids" ]]; then
    echo "a cluster started from $STATE is already up (stop it first)" >&2
    exit 1
fi
if [[ -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
    echo "/etc/slurm/slurm.conf is a real file: not replacing a site's configuration" >&2
    exit 1
fi
mkdir -p "$STATE"/{state,spool,log,munge,munge-key}
chmod 0755 "$STATE"  # munged wants its socket's folders searchable by every client
touch "$STATE/pids"
# A failed start leaves nothing running.
trap '[[ $? == 0 ]] || "$(dirname "$0")/stop-cluster.sh" "$STATE"' EXIT

# munge: its own key, socket, pid and log in STATE, so no system munged is touched.
# munged refuses to run as root and checks its folders' owners and modes: the socket's folder
# must be searchable by all (every client connects by path), the key's private.
chown munge:munge "$STATE/munge" "$STATE/munge-key" "$STATE/log"
chmod 0755 "$STATE/munge" "$STATE/log"
chmod 0700 "$STATE/munge-key"
if [[ ! -s "$STATE/munge-key/munge.key" ]]; then
    dd if=/dev/urandom of="$STATE/munge-key/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$STATE/munge-key/munge.key"
    chmod 0400 "$STATE/munge-key/munge.key"
fi
# setpriv execs (no fork), so $! is munged's own pid.
setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --num-threads=2 \
    --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge-key/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge-key/munged.seed" >>"$STATE/log/munged.out" 2>&1 &
echo "munged $!" >>"$STATE/pids"
for _ in $(seq 50); do
    [[ -S "$STATE/munge/munge.socket" ]] && break
    sleep 0.1
done

# Memory left to jobs: 80% of the machine (RealMemory must not exceed what slurmd sees).
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat >"$STATE/slurm.conf" <<CONF
# One-node test cluster on loopback, written by tests/slurm/start-cluster.sh.
ClusterName=securetune-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd and no cgroups here: track processes by their parent pids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes (Snakemake's status checks use squeue).
MinJobAge=300
MaxArraySize=10001
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p /etc/slurm
ln -sfn "$STATE/slurm.conf" /etc/slurm/slurm.conf

slurmctld -D -i -f "$STATE/slurm.conf" >>"$STATE/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >>"$STATE/pids"
slurmd -D -f "$STATE/slurm.conf" >>"$STATE/log/slurmd.out" 2>&1 &
echo "slurmd $!" >>"$STATE/pids"

for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
        echo "SLURM up: $(sinfo -h -o '%P %D %T %c CPUs %m MB')"
        exit 0
    fi
    sleep 0.5
done
echo "SLURM did not come up in 30 s; logs in $STATE/log" >&2
tail -n 20 "$STATE"/log/*.log >&2 || true
exit 1
