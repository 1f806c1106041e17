#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld + slurmd + munged) for testing the sbatch templates.
#
#   launch/slurm/local-cluster.sh up       # install (apt, only if missing) and start; idempotent
#   launch/slurm/local-cluster.sh status   # daemons, node and queue
#   launch/slurm/local-cluster.sh down     # cancel jobs, stop every daemon it started
#
# No systemd and no cgroups: daemons run from a self-contained state dir ($DISTLSTM_SLURM_DIR,
# default /tmp/distlstm-slurm) with their own slurm.conf, munge key and socket; they are stopped
# through their pid files. Clients need `export SLURM_CONF=$DIR/slurm.conf` (printed by `up`).
# Needs root (apt-get, munged runs as the munge user, slurmd runs jobs as their owner).
set -euo pipefail

DIR=${DISTLSTM_SLURM_DIR:-/tmp/distlstm-slurm}
CTLD_PORT=${DISTLSTM_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DISTLSTM_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "local-cluster: error: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in the file is a live process
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]} and not root; install them or rerun as root"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install SLURM by hand"
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq >&2 || die "apt-get update failed (network or apt sources?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

write_config() {
  local node host
  host=$(hostname -s)
  node=$(slurmd -C | head -n1) || die "'slurmd -C' failed; cannot describe this node"
  [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
  mkdir -p "$DIR"/{state,spool,log,run,munge}
  cat >"$CONF" <<EOF
# Written by launch/slurm/local-cluster.sh; rewritten on every fresh 'up'.
ClusterName=distlstm
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Own munge socket; cred_expire=10: a requeued job may start again after ~10 s instead of 120 s.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in containers: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m=$DIR/munge
  pid_alive "$m/munged.pid" && return 0
  # 0755: clients of any user reach the socket; munged refuses a group/other-writable dir.
  chown munge:munge "$m" && chmod 0755 "$m"
  if [[ ! -s $m/munge.key ]]; then
    dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$m/munge.key" && chmod 0400 "$m/munge.key"
  fi
  # --force: /tmp is world-writable (sticky), which munged otherwise refuses.
  runuser -u munge -- munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged failed to start; see $m/munged.log"
}

wait_node_idle() {
  local i state
  for i in $(seq 1 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    [[ $state == idle* || $state == mix* || $state == alloc* ]] && return 0
    sleep 0.5
  done
  die "node never became idle (state '${state:-none}'); see $DIR/log/slurmctld.log and slurmd.log"
}

cmd_up() {
  [[ $EUID -eq 0 ]] || die "must run as root (munged runs as the munge user; slurmd runs jobs)"
  install_packages
  if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"; then
    log "already up ($DIR)"
  else
    cmd_down >/dev/null 2>&1 || true  # half-started state: clean slate
    write_config
    start_munge
    # -c: forget jobs from an earlier run of this cluster.
    slurmctld -c -f "$CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" || die "slurmd failed; see $DIR/log/slurmd.log"
  fi
  wait_node_idle
  log "up; node: $(sinfo -h -N -o '%N %t %c cpus')"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait up to 10 s, then KILL
  local pid i
  [[ -s $2 ]] || return 0
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$1 ($pid) ignored TERM; killing"; kill -9 "$pid" || true; fi
  fi
  rm -f "$2"
}

cancel_all_jobs() {
  pid_alive "$DIR/run/slurmctld.pid" || return 0
  local jobs i
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  [[ -n $jobs ]] || return 0
  log "cancelling jobs: $(echo $jobs)"
  scancel $jobs 2>/dev/null || true
  for i in $(seq 1 60); do
    [[ -z $(squeue -h -o %i 2>/dev/null) ]] && return 0
    sleep 0.5
  done
  log "warning: jobs still listed after 30 s: $(squeue -h 2>/dev/null | tr '\n' ';')"
}

cmd_down() {
  cancel_all_jobs
  stop_pidfile slurmd "$DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
  stop_pidfile munged "$DIR/munge/munged.pid"
  log "down"
}

cmd_status() {
  local name file rc=0
  for name in slurmctld:run/slurmctld.pid slurmd:run/slurmd.pid munged:munge/munged.pid; do
    file=$DIR/${name#*:}
    if pid_alive "$file"; then echo "${name%%:*}: running (pid $(cat "$file"))"
    else echo "${name%%:*}: stopped"; rc=1; fi
  done
  if ((rc == 0)); then sinfo -N; squeue; echo "export SLURM_CONF=$CONF"; fi
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status   (state dir: $DIR)" >&2; exit 2 ;;
esac
