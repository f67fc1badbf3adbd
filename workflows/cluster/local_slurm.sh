#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the workflow's cluster profile for real:
#   workflows/cluster/local_slurm.sh install   # apt-get slurm-wlm + munge where missing (root)
#   workflows/cluster/local_slurm.sh start     # write slurm.conf for this host and its cores, start munged,
#                                              # slurmctld and slurmd; print the SLURM_CONF to export
#   workflows/cluster/local_slurm.sh status    # exit 0 when the partition is up and takes jobs
#   workflows/cluster/local_slurm.sh stop      # stop the three daemons
# Everything lives under $GMRPATH_SLURM_DIR (default /tmp/gmrpath-slurm): the config, state, logs and pid
# files. Clients and daemons read $GMRPATH_SLURM_DIR/slurm.conf through SLURM_CONF; srun inside a batch job
# reads the compiled-in /etc/slurm/slurm.conf, so that path is linked to it too, only where no other
# configuration is there (a real cluster's is never touched), and unlinked by stop. The cluster has no accounting database, like many small clusters: sacct cannot report jobs,
# which is what the profile's `slurm-status-command: squeue` is for. Needs root (the daemons run as root).
set -euo pipefail
DIR=${GMRPATH_SLURM_DIR:-/tmp/gmrpath-slurm}
PARTITION=${GMRPATH_SLURM_PARTITION:-local}
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

die() { echo "local_slurm: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root"
    command -v apt-get >/dev/null || die "no apt-get: install SLURM (slurmctld, slurmd, sbatch) and munge by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$DIR.apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR.apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$DIR.apt.log" 2>&1; } \
        || die "apt-get install slurm-wlm munge failed (see $DIR.apt.log)"
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$DIR/ctld" "$DIR/slurmd" "$DIR/munge"
    cat >"$CONF.tmp" <<EOF
# written by workflows/cluster/local_slurm.sh for $host
ClusterName=gmrpath-local
SlurmctldHost=$host
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${GMRPATH_SLURMCTLD_PORT:-6817}
SlurmdPort=${GMRPATH_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue this long: the executor plugin's squeue status needs it
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start() {
    command -v slurmctld >/dev/null || die "SLURM is not installed (run: $0 install)"
    [ "$(id -u)" = 0 ] || die "the daemons need root"
    stop >/dev/null 2>&1 || true
    write_conf
    # munge: its own key and socket under $DIR (no system service needed)
    [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
    mkdir -p /run/munge
    munged --force --key-file="$DIR/munge/munge.key" --socket=/run/munge/munge.socket.2 \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
        mkdir -p /etc/slurm && ln -sfn "$CONF" /etc/slurm/slurm.conf
    else
        echo "local_slurm: /etc/slurm/slurm.conf exists and is not ours: srun inside jobs will use it" >&2
    fi
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -p "$PARTITION" -o "%a %T" 2>/dev/null | grep -q "^up idle"; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    die "the cluster did not come up in 30 s (logs: $DIR/slurmctld.log, $DIR/slurmd.log)"
}

status() {
    [ -f "$CONF" ] || die "not started"
    sinfo -h -p "$PARTITION" -o "%a %T" | grep -q "^up" || die "partition $PARTITION is not up"
    echo "up: $(sinfo -h -p "$PARTITION" -o '%P %D nodes %c cpus %T')"
}

stop() {
    for name in slurmd slurmctld; do
        [ -f "$DIR/$name.pid" ] && kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
    done
    [ -f "$DIR/munge/munged.pid" ] && kill "$(cat "$DIR/munge/munged.pid")" 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 0.25
    done
    rm -f "$DIR"/slurmd.pid "$DIR"/slurmctld.pid "$DIR"/munge/munged.pid
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then rm -f /etc/slurm/slurm.conf; fi
}

mkdir -p "$DIR"
case "${1:-}" in
    install) install ;;
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) die "usage: $0 install|start|status|stop" ;;
esac
