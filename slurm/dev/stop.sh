#!/usr/bin/env bash
# Stop the Slurm dev cluster that slurm/dev/start.sh started in DIR.
#
#   slurm/dev/stop.sh [--dir DIR] [--purge]         (default DIR ${REPRO_SLURM_DIR:-/tmp/repro-slurm})
#
# Cancels the cluster's jobs (through Slurm), then stops exactly the processes named by the pid
# files in DIR/run (never by name), in reverse start order, each with a bounded wait (SIGTERM,
# then SIGKILL). Idempotent: exits 0 when nothing runs. --purge also deletes DIR.
set -euo pipefail

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

DIR="${REPRO_SLURM_DIR:-/tmp/repro-slurm}"
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --dir=*) DIR="${1#*=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "stop.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

export PATH="/usr/sbin:/sbin:$PATH"

if [ ! -d "$DIR" ]; then
    echo "Nothing to stop: $DIR does not exist."
    exit 0
fi
DIR="$(cd "$DIR" && pwd -P)"
RUN="$DIR/run"
if [ ! -e "$DIR/.repro-slurm" ]; then
    echo "stop.sh: error: $DIR was not made by slurm/dev/start.sh (no .repro-slurm marker); not touching it." >&2
    exit 1
fi
export SLURM_CONF="$DIR/etc/slurm.conf"

# Same test as start.sh: the process exists, is not a zombie, and is the program we started.
pid_alive() {  # pid_alive PID EXPECTED_COMM
    local state comm
    [ -r "/proc/$1/stat" ] || return 1
    state="$(sed 's/^.*) //' "/proc/$1/stat" | cut -d' ' -f1)"
    [ "$state" != Z ] || return 1
    comm="$(cat "/proc/$1/comm" 2>/dev/null)" || return 1
    [ "$comm" = "$2" ]
}

# wait_gone TIMEOUT_S PID COMM: bounded wait for the process to exit.
wait_gone() {
    local deadline=$((SECONDS + $1))
    while pid_alive "$2" "$3"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.05   # polling interval of a bounded wait
    done
}

stopped=0
stop_one() {  # stop_one NAME COMM TIMEOUT_S
    local f="$RUN/$1.pid" pid
    [ -e "$f" ] || return 0
    pid="$(cat "$f" 2>/dev/null || true)"
    if [ -n "$pid" ] && pid_alive "$pid" "$2"; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$3" "$pid" "$2"; then
            echo "stop.sh: $1 (pid $pid) still running after ${3}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone 5 "$pid" "$2" || { echo "stop.sh: error: $1 (pid $pid) does not die" >&2; exit 1; }
        fi
        echo "stopped $1 (pid $pid)"
        stopped=$((stopped + 1))
    fi
    rm -f "$f"
}

# Jobs first, through Slurm, while slurmctld and slurmd still run: otherwise their slurmstepd
# and job processes would outlive the cluster. Bounded: KillWait=5 plus a margin.
ctld_pid="$(cat "$RUN/slurmctld.pid" 2>/dev/null || true)"
if [ -n "$ctld_pid" ] && pid_alive "$ctld_pid" slurmctld && [ -s "$SLURM_CONF" ] \
    && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    echo "cancelling running jobs"
    scancel --partition=dev 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.2   # polling interval of a bounded wait
    done
fi

# Reverse start order: slurmd instances, slurmctld, slurmdbd, mariadbd, munged.
for f in "$RUN"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    stop_one "$(basename "$f" .pid)" slurmd 15
done
stop_one slurmctld slurmctld 15
stop_one slurmdbd slurmdbd 15
stop_one mariadbd mariadbd 30
stop_one munged munged 10
rm -f "$RUN"/*.pid.self

if [ "$stopped" -eq 0 ]; then
    echo "Nothing was running in $DIR."
fi
if [ "$PURGE" -eq 1 ]; then
    rm -rf "$DIR"
    echo "removed $DIR"
fi
