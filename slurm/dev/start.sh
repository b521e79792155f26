#!/usr/bin/env bash
# Start a real Slurm cluster on localhost, without systemd: munged, a private mariadbd, slurmdbd,
# slurmctld and one slurmd per virtual node. For tests and demos; see slurm/dev/README.md.
#
#   slurm/dev/start.sh [--nodes N] [--dir DIR]      (root; default DIR ${REPRO_SLURM_DIR:-/tmp/repro-slurm})
#   source DIR/env.sh                               (exports SLURM_CONF for sbatch, sacct, submitit)
#
# Idempotent: when the cluster in DIR is already up, it checks it and exits 0 without changing
# anything. If it is up with a different node count, it says so and exits 3 (run stop.sh first).
# Every wait is a bounded condition (never a fixed sleep); a timeout names the log to read.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

NODES=1
DIR="${REPRO_SLURM_DIR:-/tmp/repro-slurm}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
        --nodes=*) NODES="${1#*=}"; shift ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        --dir=*) DIR="${1#*=}"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "start.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

die() { echo "start.sh: error: $*" >&2; exit 1; }

case "$NODES" in
    ''|*[!0-9]*) die "--nodes must be a positive integer (got '$NODES')" ;;
esac
{ [ "$NODES" -ge 1 ] && [ "$NODES" -le 8 ]; } || die "--nodes must be between 1 and 8 (got $NODES)"
[ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root, and the multi-node mode mounts a hosts file)"

# The daemons live in /usr/sbin, which is not on every PATH (pytest under a plain user env, sudo).
export PATH="/usr/sbin:/sbin:$PATH"
for cmd in munged mungekey munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld \
           slurmd sacctmgr scontrol sinfo squeue unshare flock setsid; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found; install the Debian packages:
  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core"
done

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
ETC="$DIR/etc"            # slurm.conf and slurmdbd.conf (slurmdbd finds its file next to SLURM_CONF)
RUN="$DIR/run"            # sockets and the pid files that stop.sh reads
LOGD="$DIR/log"
MUNGE_SOCK="$RUN/munge.sock"
MYSQL_SOCK="$RUN/mysqld.sock"
CONF="$ETC/slurm.conf"
CLUSTER=repro
PARTITION=dev

# Unix socket paths are limited to 108 bytes (sun_path); fail early with a clear message.
[ "${#MYSQL_SOCK}" -lt 100 ] || die "--dir '$DIR' is too long for Unix sockets (keep it under ~80 characters)"

if [ "$NODES" -eq 1 ]; then
    NODE_NAMES=(localhost)
else
    NODE_NAMES=()
    for i in $(seq 1 "$NODES"); do NODE_NAMES+=("n$i"); done
fi

# One start.sh at a time per DIR (e.g. parallel test workers). Every daemon is started with
# 9>&- so that it does not inherit, and hold forever, this lock.
touch "$DIR/.repro-slurm"   # marker: stop.sh --purge only deletes a directory that has it
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another start.sh holds $DIR/.lock for more than 120 s"

# ---------------------------------------------------------------------------------------------
# pid files: RUN/NAME.pid, written by this script from $! (each daemon runs in the foreground
# under setsid, so $! is the daemon itself). The daemons' own pid files go to RUN/NAME.pid.self:
# sharing one path races (a daemon truncates and rewrites it while we read it).
# A pid counts as alive only if the process exists, is not a zombie (init may reap orphans late,
# if at all) and is the program we started (not a stale file whose pid was reused).
proc_running() {  # proc_running PID
    local state
    [ -r "/proc/$1/stat" ] || return 1
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}
pid_alive() {  # pid_alive NAME EXPECTED_COMM
    local f="$RUN/$1.pid" pid
    [ -s "$f" ] || return 1
    pid="$(cat "$f")"
    proc_running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# Just launched: the pid is ours for sure, but may still be setsid/unshare/sh before their exec.
launched_running() {  # launched_running NAME
    proc_running "$(cat "$RUN/$1.pid" 2>/dev/null)"
}

# wait_until TIMEOUT_S WHAT LOG PIDNAME -- CMD...: poll CMD until it succeeds; fail fast if
# the daemon PIDNAME died, and fail with the log's tail after TIMEOUT_S. LOG may name several
# files, separated by spaces.
wait_until() {
    local timeout="$1" what="$2" pidname="$4" log
    read -r -a log <<<"$3"
    shift 5
    local deadline=$((SECONDS + timeout)) delay=0.05
    until "$@" >/dev/null 2>&1; do
        if ! launched_running "$pidname"; then
            fail_with_log "$what: $pidname exited during start-up" "${log[@]}"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail_with_log "$what: not ready after ${timeout}s" "${log[@]}"
        fi
        sleep "$delay"   # polling interval of a bounded wait, not a synchronisation sleep
        case "$delay" in 0.05) delay=0.1 ;; 0.1) delay=0.2 ;; esac
    done
}

# fail_with_log MESSAGE LOG...: each LOG and its companion NAME.out (the daemon's stdout/stderr).
fail_with_log() {
    local f log msg="$1" files=()
    shift
    for log in "$@"; do
        for f in "$log" "${log%.log}.out"; do [ -s "$f" ] && files+=("$f"); done
    done
    [ "${#files[@]}" -gt 0 ] || files=("$1")
    echo "start.sh: error: $msg. Read ${files[*]}" >&2
    for f in "${files[@]}"; do
        [ -s "$f" ] && { echo "--- last lines of $f:" >&2; tail -n 15 "$f" >&2; }
    done
    echo "start.sh: stop what was started with: $(dirname "$0")/stop.sh --dir $DIR" >&2
    exit 1
}

# launch NAME -- CMD...: start CMD detached (own session, stdio to log/NAME.out), record its pid.
launch() {
    local name="$1"
    shift 2
    setsid "$@" </dev/null >>"$LOGD/$name.out" 2>&1 9>&- &
    echo $! >"$RUN/$name.pid"
}

# Readiness probes (also used for the already-running check).
munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
mysql_ok() { mariadb --no-defaults -S "$MYSQL_SOCK" -u root -e 'SELECT 1'; }
dbd_ok() { sacctmgr -n -P show cluster format=cluster; }
ctld_ok() { scontrol ping | grep -q UP; }
# Every node up and usable: idle on a fresh start; mix/alloc/comp when jobs run (warm check).
nodes_ok() {
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
    for n in "${NODE_NAMES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc|comp)\$" <<<"$states" || return 1
    done
}
# A node left drained by an earlier session (e.g. "Kill task failed") never returns by itself.
resume_drained() {
    local n
    for n in $(sinfo -h -N -t drain -o '%N' 2>/dev/null | sort -u); do
        scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
}

export SLURM_CONF="$CONF"
export MYSQL_UNIX_PORT="$MYSQL_SOCK"   # slurmdbd's StorageHost=localhost goes through this socket

DAEMONS=(munged mariadbd slurmdbd slurmctld)
for n in "${NODE_NAMES[@]}"; do DAEMONS+=("slurmd-$n"); done
comm_of() { case "$1" in slurmd-*) echo slurmd ;; *) echo "$1" ;; esac; }

# ---------------------------------------------------------------------------------------------
# Already (partly) running?
alive=()
for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    pid_alive "$name" "$(comm_of "$name")" && alive+=("$name")
done
if [ "${#alive[@]}" -gt 0 ]; then
    running_nodes="$(cat "$DIR/nodes" 2>/dev/null || echo '?')"
    if [ "$running_nodes" != "$NODES" ]; then
        echo "start.sh: error: the cluster in $DIR is running with $running_nodes node(s), not $NODES." >&2
        echo "start.sh: stop it first ($(dirname "$0")/stop.sh --dir $DIR) or use another --dir." >&2
        exit 3
    fi
    if [ "${#alive[@]}" -eq "${#DAEMONS[@]}" ] && munge_ok >/dev/null 2>&1 && ctld_ok >/dev/null 2>&1 \
        && nodes_ok && dbd_ok >/dev/null 2>&1; then
        echo "Slurm dev cluster already running in $DIR ($NODES node(s): ${NODE_NAMES[*]}); nothing to do."
        echo "$DIR/env.sh"
        exit 0
    fi
    if [ "${#alive[@]}" -eq "${#DAEMONS[@]}" ]; then
        echo "start.sh: every daemon in $DIR runs but a readiness check failed; waiting for it." >&2
    else
        echo "start.sh: cluster in $DIR is partly running (${alive[*]}); starting what is missing." >&2
    fi
else
    # ------------------------------------------------------------------------------------------
    # Cold start: (re)write every configuration file.
    if [ -f "$DIR/nodes" ] && [ "$(cat "$DIR/nodes")" != "$NODES" ]; then
        # Saved controller state names the old nodes; start that part afresh (accounting DB kept).
        rm -rf "$DIR/state" "$DIR/spool"
    fi
    # Fresh logs for each cold start (the previous generation stays in log.prev), so that the
    # tail printed on a failure is about this start.
    if [ -d "$LOGD" ]; then rm -rf "$LOGD.prev"; mv "$LOGD" "$LOGD.prev"; fi
    mkdir -p "$ETC" "$RUN" "$LOGD" "$DIR/munge" "$DIR/state" "$DIR/db"
    chmod 755 "$RUN"          # munged refuses a socket directory that is not mode 755
    chmod 700 "$DIR/munge"
    for n in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/spool/$n"; done   # SlurmdSpoolDir=.../%n
    rm -f "$RUN"/*.pid
    echo "$NODES" >"$DIR/nodes"

    # Ports: a block of NODES+2 free TCP ports, chosen from DIR's checksum so that a given DIR
    # keeps its ports across restarts and two clusters (two DIRs) can run side by side. Below
    # the kernel's ephemeral range (32768+ by default), where a client socket could hold one.
    port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    base=$((10000 + $(cksum <<<"$DIR" | cut -d' ' -f1) % 2000 * 10))
    for _ in $(seq 1 200); do
        ok=1
        for p in $(seq "$base" $((base + NODES + 1))); do port_free "$p" || { ok=0; break; }; done
        [ "$ok" -eq 1 ] && break
        base=$((base + 10)); [ "$base" -lt 30000 ] || base=10000
    done
    [ "$ok" -eq 1 ] || die "no block of $((NODES + 2)) free TCP ports found between 10000 and 30000"
    CTLD_PORT=$base
    DBD_PORT=$((base + 1))

    # Hardware line as slurmd sees it ("CPUs=2 Boards=1 ... RealMemory=24105"), minus its name
    # and UpTime. Every virtual node claims the whole machine (nothing is enforced: no cgroups).
    hw="$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -Ev '^(NodeName|UpTime)=' | tr '\n' ' ')"
    cpus="$(grep -o 'CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)"
    mem="$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)"
    { [ -n "$cpus" ] && [ -n "$mem" ]; } || die "could not parse 'slurmd -C' output: $hw"

    if [ ! -s "$DIR/munge/munge.key" ]; then
        mungekey --create --keyfile="$DIR/munge/munge.key"
        chmod 600 "$DIR/munge/munge.key"
    fi

    {
        cat <<EOF
# Written by slurm/dev/start.sh; rewritten on every cold start. Do not edit.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job can start again only after its old job credential expired;
# the default (120 s) makes every requeue (submitit preemption tests) wait two minutes.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/state
# %n: one spool, pid and log file per slurmd instance (several slurmd run on this host).
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid.self
SlurmdPidFile=$RUN/slurmd-%n.pid.self
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: track job processes through /proc, bind no CPUs, no MPI plugin.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# With CR_Core_Memory a job that asks for no memory would be given the whole node's memory and
# run alone; give it a per-CPU share instead so small jobs run side by side.
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
# Scheduling passes every 2 s instead of up to 30-60 s: jobs start about as soon as submitted.
SchedulerParameters=sched_interval=2,bf_interval=2
# A node that went DOWN (slurmd restarted, missed pings) comes back by itself when it registers.
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
# Jobs may be requeued (submitit requeues on preemption and time-out).
JobRequeue=1
# Accounting through slurmdbd, so that sacct (and submitit's job states) work. The slurmdbd
# connection authenticates with the munge socket given here (AuthInfo is not used for it).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/none
EOF
        if [ ! -e "$DIR/state/job_state" ]; then
            # Fresh controller state (new DIR, --purge, node count changed): job ids would start
            # again at 1, and a submitit folder reused from an earlier cluster would hand back
            # that earlier job's result file at once (and sacct would hold duplicate ids).
            # Start from a number that grows with time instead.
            echo "FirstJobId=$((1000 + $(date +%s) % 50000000))"
        fi
        if [ "$NODES" -eq 1 ]; then
            echo "NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 2)) $hw"
        else
            i=0
            for n in "${NODE_NAMES[@]}"; do
                # All virtual nodes are this host: they differ only by name and slurmd port.
                echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 2 + i)) $hw"
                i=$((i + 1))
            done
        fi
        echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    chmod 644 "$CONF"

    # slurmdbd has no -f: it reads slurmdbd.conf from the directory of SLURM_CONF. It holds the
    # database credentials, so slurmdbd insists on mode 600.
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/dev/start.sh; rewritten on every cold start. Do not edit.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGD/slurmdbd.log
PidFile=$RUN/slurmdbd.pid.self
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"

    # Hosts file for the multi-node mode (see below): the machine's own entries plus every
    # virtual node name on 127.0.0.1.
    { cat /etc/hosts; echo "127.0.0.1 localhost ${NODE_NAMES[*]}"; } >"$ETC/hosts"

    cat >"$DIR/env.sh" <<EOF
# source this file to use the Slurm dev cluster in $DIR (written by slurm/dev/start.sh)
export SLURM_CONF=$CONF
export REPRO_SLURM_DIR=$DIR
export REPRO_SLURM_PARTITION=$PARTITION
EOF
fi

[ -s "$CONF" ] || die "$CONF is missing but some daemons run; run stop.sh --dir $DIR, then start.sh"

# ---------------------------------------------------------------------------------------------
# 1. munged: own key, socket, pid, log and seed files.
# munged insists that every directory above its socket be executable by all; a DIR under
# pytest's tmp_path (mode 700 parents) is not. Then --force turns that check into a warning
# (harmless here: every client of this cluster runs as root).
munge_force=()
d="$RUN"
while [ "$d" != / ]; do
    d="$(dirname "$d")"
    [ $((8#$(stat -c %a "$d") & 1)) -eq 1 ] || { munge_force=(--force); break; }
done
if ! pid_alive munged munged; then
    # In the foreground munged logs to stderr, i.e. log/munged.out (--log-file is ignored).
    launch munged -- munged "${munge_force[@]}" --foreground --socket="$MUNGE_SOCK" \
        --key-file="$DIR/munge/munge.key" --pid-file="$RUN/munged.pid.self" \
        --seed-file="$DIR/munge/munged.seed"
fi
wait_until 15 "munged" "$LOGD/munged.out" munged -- munge_ok

# 2. mariadbd, private: no config files read, no TCP, socket under RUN.
# Two of the values slurmdbd recommends; it still warns that innodb_buffer_pool_size is below its
# recommendation, which is harmless for a test cluster (and keeps mariadbd small). It is a
# throw-away database: no fsync per commit and no doublewrite buffer, so that creating a
# cluster's tables does not queue behind the tests' own disk writes.
MYSQL_OPTS=(--no-defaults --datadir="$DIR/db" --user=root
            --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
            --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0)
start_mariadbd() {
    launch mariadbd -- mariadbd "${MYSQL_OPTS[@]}" --skip-networking --socket="$MYSQL_SOCK" \
        --pid-file="$RUN/mariadbd.pid.self" --log-error="$LOGD/mariadbd.log"
}
if ! pid_alive mariadbd mariadbd; then
    if [ ! -d "$DIR/db/mysql" ]; then
        mariadb-install-db "${MYSQL_OPTS[@]}" --skip-test-db --auth-root-authentication-method=socket \
            >"$LOGD/mariadb-install-db.log" 2>&1 \
            || fail_with_log "mariadb-install-db failed" "$LOGD/mariadb-install-db.log"
    fi
    start_mariadbd
fi
wait_until 60 "mariadbd" "$LOGD/mariadbd.log" mariadbd -- mysql_ok

# 3. slurmdbd, then register the cluster (idempotent: -i, and "already exists" is fine).
if ! pid_alive slurmdbd slurmdbd; then
    launch slurmdbd -- slurmdbd -D
fi
wait_until 30 "slurmdbd" "$LOGD/slurmdbd.log" slurmdbd -- dbd_ok
# Registering creates the cluster's tables. Twice, two clusters starting side by side on a loaded
# machine, this was where mariadbd 10.11 died (dmesg: "mariadbd: segfault at 0"; sacctmgr:
# "Problem adding clusters: Unspecified error"), every Slurm test lost with it. InnoDB recovers
# on a restart, and an add that failed on the client's side may still have completed. So: add
# until the cluster is listed, restarting a dead mariadbd (at most twice), within a bound.
cluster_known() { dbd_ok | grep -qx "$CLUSTER"; }
db_restarts=0
register_cluster() {
    if ! pid_alive mariadbd mariadbd; then
        [ "$db_restarts" -lt 2 ] || return 1
        db_restarts=$((db_restarts + 1))
        echo "start.sh: mariadbd exited while the cluster was registered; restarting it" \
            >>"$LOGD/sacctmgr.log"
        start_mariadbd
        return 1
    fi
    mysql_ok || return 1
    cluster_known || sacctmgr -i add cluster "$CLUSTER" >>"$LOGD/sacctmgr.log" 2>&1
    cluster_known
}
wait_until 60 "registering cluster $CLUSTER with slurmdbd" \
    "$LOGD/sacctmgr.log $LOGD/slurmdbd.log $LOGD/mariadbd.log" slurmdbd -- register_cluster

# 4. slurmctld.
if ! pid_alive slurmctld slurmctld; then
    launch slurmctld -- slurmctld -D -f "$CONF"
fi
wait_until 30 "slurmctld" "$LOGD/slurmctld.log" slurmctld -- ctld_ok

# 5. slurmd, one per virtual node.
for n in "${NODE_NAMES[@]}"; do
    pid_alive "slurmd-$n" slurmd && continue
    mkdir -p "$DIR/spool/$n"
    if [ "$NODES" -eq 1 ]; then
        launch "slurmd-$n" -- slurmd -D -N "$n" -f "$CONF"
    else
        # Several nodes on one host: each slurmd gets its own mount and UTS namespace in which
        # /etc/hosts is replaced (bind mount) by a file mapping n1, n2, ... to 127.0.0.1 and the
        # hostname is the node's name. Jobs inherit both from slurmd/slurmstepd, so inside a job
        # `hostname` prints nI and MASTER_ADDR=n1 resolves, on every node, as on a real cluster.
        # Propagation private: the bind mount stays inside the namespace, the host is untouched.
        # unshare and sh exec, so $! is slurmd's own pid.
        # shellcheck disable=SC2016  # $1..$3 expand in the inner sh, on purpose
        launch "slurmd-$n" -- unshare --mount --uts --propagation private -- sh -c \
            'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -D -N "$2" -f "$3"' \
            sh "$ETC/hosts" "$n" "$CONF"
    fi
done
deadline=$((SECONDS + 30))
until nodes_ok; do
    for n in "${NODE_NAMES[@]}"; do
        launched_running "slurmd-$n" || fail_with_log "slurmd for node $n exited during start-up" \
            "$LOGD/slurmd-$n.log"
    done
    resume_drained
    [ "$SECONDS" -lt "$deadline" ] || fail_with_log "nodes not idle after 30s: $(sinfo -h -N -o '%N=%t' \
        | tr '\n' ' ')" "$LOGD/slurmctld.log"
    sleep 0.1   # polling interval of a bounded wait
done

echo "Slurm dev cluster up in $DIR: $NODES node(s) (${NODE_NAMES[*]}), partition $PARTITION."
echo "Use it with:  source $DIR/env.sh"
echo "$DIR/env.sh"
