#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback for tests/test_slurm.py: munge, MariaDB +
# slurmdbd (accounting, so `sacct` works), slurmctld and slurmd with two fake GPUs.
#
#   tests/slurm/cluster.sh install                 Debian packages, when missing
#   tests/slurm/cluster.sh start  [STATE_DIR]      configs + daemons, waits until the node is idle
#   tests/slurm/cluster.sh stop   [STATE_DIR]      cancels jobs, stops the daemons by their pid files
#   tests/slurm/cluster.sh status [STATE_DIR]      exit 0 when every daemon runs
#
# STATE_DIR (default $SLURM_TEST_STATE or /tmp/qlora-slurm) holds configs, logs, pids and the
# database. It must be reachable by the munge user, so not under a mode-700 pytest folder.
# Every setting below was seen to matter: ../shared/notes/local-slurm.md.
set -euo pipefail

COMMAND=${1:-}
STATE=${2:-${SLURM_TEST_STATE:-/tmp/qlora-slurm}}
NODE=$(hostname -s)
CLUSTER=ci
DB_PORT=${SLURM_TEST_DB_PORT:-3307} # not 3306: leaves a site MariaDB alone
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
BINARIES="slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd mariadb-install-db"

ETC=$STATE/etc
PIDS=$STATE/pid
LOGS=$STATE/log
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
DB_SOCKET=$STATE/mariadb.sock
# Clients (sbatch, sacct, and the srun inside each job, whose SLURM_* variables the jobstep
# plugin strips) only find the config at the default path.
SYSTEM_CONF=/etc/slurm/slurm.conf
DAEMONS="slurmd slurmctld slurmdbd mariadb munged" # stop order; start order is the reverse

if [ "$(id -u)" -ne 0 ]; then
    exec sudo --preserve-env=SLURM_TEST_STATE,SLURM_TEST_DB_PORT "$0" "$@"
fi

log() { echo "cluster.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

pid_file() { # munged runs as user munge and keeps its files in its own folder
    if [ "$1" = munged ]; then echo "$MUNGE_DIR/munged.pid"; else echo "$PIDS/$1.pid"; fi
}

pid_alive() { # pid_alive NAME: its pid file names a running process
    local file
    file=$(pid_file "$1")
    [ -s "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${seconds}s waiting for $what (logs: $LOGS)"
        sleep 0.2
    done
}

install_packages() {
    local missing=""
    for binary in $BINARIES; do
        command -v "$binary" >/dev/null || missing="$missing $binary"
    done
    [ -z "$missing" ] && return 0
    log "installing $PACKAGES (missing:$missing)"
    apt-get update -qq
    # policy-rc.d may refuse to start the packaged services; this script runs its own.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

write_configs() {
    local real_mb
    real_mb=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    # More than slurmd measures drains the node; 85 % leaves room for the daemons.
    real_mb=$((real_mb * 85 / 100))
    local cpus
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')

    mkdir -p "$STATE/dev"
    for i in 0 1; do # fake GPUs: character devices equal to /dev/null
        [ -c "$STATE/dev/nvidia$i" ] || mknod "$STATE/dev/nvidia$i" c 1 3
    done

    cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster on loopback.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that gives no --mem takes the whole node.
DefMemPerCPU=1000
ReturnToService=2
# squeue keeps finished jobs this long; sacct is the status source anyway.
MinJobAge=300
# Seconds between SIGTERM and SIGKILL on scancel or a time limit (site default 30).
KillWait=5
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# With a custom munge socket, accounting needs it here too.
AccountingStoragePass=$MUNGE_SOCKET
# Fatal without slurmdbd; with it, sacct shows gres/gpu in ReqTRES/AllocTRES.
AccountingStorageTRES=gres/gpu
# sacct's Comment column carries the rule name the executor plugin writes there.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

    cat >"$ETC/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=$STATE/dev/nvidia[0-1]
EOF

    # slurmdbd has no -f: it reads slurmdbd.conf beside \$SLURM_CONF, and only at mode 600.
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$PIDS/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

link_system_conf() {
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [ -e "$SYSTEM_CONF" ] && [ ! -L "$SYSTEM_CONF" ]; then
        die "$SYSTEM_CONF is a real file (a site config?); refusing to replace it"
    fi
    ln -sfn "$ETC/slurm.conf" "$SYSTEM_CONF"
}

start_munge() {
    pid_alive munged && return 0
    # munged runs as its own user, wants its folder mode 711 and a private key.
    install -d -o munge -g munge -m 711 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 400 "$MUNGE_DIR/munge.key"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for 20 munge bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
}

sql() { mariadb --socket="$DB_SOCKET" -u root "$@"; }

start_mariadb() {
    if ! pid_alive mariadb; then
        if [ ! -d "$STATE/mariadb/mysql" ]; then
            mariadb-install-db --user=root --datadir="$STATE/mariadb" --auth-root-authentication-method=socket \
                --skip-test-db >"$LOGS/mariadb-install.log" 2>&1
        fi
        # mariadbd does not daemonize: detach it; it writes its own pid file.
        setsid mariadbd --no-defaults --user=root --datadir="$STATE/mariadb" --socket="$DB_SOCKET" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --innodb-buffer-pool-size=32M --innodb-log-file-size=8M \
            --pid-file="$PIDS/mariadb.pid" --log-error="$LOGS/mariadb.log" </dev/null >/dev/null 2>&1 &
        wait_for 60 MariaDB mariadb-admin --socket="$DB_SOCKET" -u root ping
    fi
    sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurm() {
    export SLURM_CONF=$ETC/slurm.conf
    if ! pid_alive slurmdbd; then
        slurmdbd
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null # also gives user root the account root
    fi
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then # the user who runs the tests
        sacctmgr -n -P list user "$SUDO_USER" | grep -q . || sacctmgr -i add user "$SUDO_USER" account=root >/dev/null
    fi
    if ! pid_alive slurmctld; then
        slurmctld
        wait_for 30 slurmctld scontrol ping
    fi
    pid_alive slurmd || slurmd
    local deadline=$((SECONDS + 60)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -1)
        case $state in
        idle | mixed | allocated) return 0 ;;
        drain* | down*) die "node $NODE is $state: $(sinfo -h -N -o %E) (logs: $LOGS)" ;;
        esac
        sleep 0.2
    done
    die "node $NODE not idle after 60 s (state '$state', logs: $LOGS)"
}

start() {
    install_packages
    mkdir -p "$STATE" "$ETC" "$PIDS" "$LOGS"
    chmod 755 "$STATE" # munged (user munge) must reach its folder inside
    write_configs
    link_system_conf
    start_munge
    start_mariadb
    start_slurm
    log "cluster '$CLUSTER' up on $NODE (state $STATE, ${SECONDS}s)"
}

stop_pid() { # stop_pid NAME: SIGTERM, then SIGKILL after 20 s
    pid_alive "$1" || return 0
    local pid
    pid=$(cat "$(pid_file "$1")")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    log "$1 ($pid) ignored SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    [ -d "$PIDS" ] || return 0
    if pid_alive slurmctld; then
        # Jobs first, so that no slurmstepd outlives slurmd.
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            scancel $jobs || true
            for _ in $(seq 100); do
                [ -z "$(squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    for daemon in $DAEMONS; do
        stop_pid "$daemon"
    done
    if [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$ETC/slurm.conf" ]; then
        rm -f "$SYSTEM_CONF"
    fi
    log "cluster stopped (state $STATE)"
}

status() {
    local rc=0
    for daemon in $DAEMONS; do
        if pid_alive "$daemon"; then echo "$daemon: running ($(cat "$(pid_file "$daemon")"))"; else
            echo "$daemon: stopped"
            rc=1
        fi
    done
    [ $rc -eq 0 ] && sinfo
    return $rc
}

case $COMMAND in
install) install_packages ;;
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 install|start|stop|status [STATE_DIR]" ;;
esac
