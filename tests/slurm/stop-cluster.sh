#!/usr/bin/env bash
# Stop the test cluster of tests/slurm/start-cluster.sh: each daemon by the pid it recorded.
# Usage: tests/slurm/stop-cluster.sh [STATE_DIR]    (default /tmp/securetune-slurm)
set -uo pipefail

STATE=${1:-/tmp/securetune-slurm}
STATE=$(realpath -m "$STATE")
[[ -f "$STATE/pids" ]] || exit 0

# Jobs first (their steps are children of slurmd), then the daemons in reverse start order.
scancel --user="$(id -un)" 2>/dev/null || true
tac "$STATE/pids" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped $name ($pid)"
    fi
done
rm -f "$STATE/pids"
if [[ "$(readlink /etc/slurm/slurm.conf)" == "$STATE/slurm.conf" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
