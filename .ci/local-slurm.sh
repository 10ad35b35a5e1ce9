#!/usr/bin/env bash
# drover's own single-node Slurm for the factory's tests, benchmarks and CI.
#
#   eval "$(bash .ci/local-slurm.sh start)"   # prints only `export SLURM_CONF=...` on stdout
#   bash .ci/local-slurm.sh stop
#   bash .ci/local-slurm.sh running           # exit status 0 if its slurmctld is up
#
# It installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing, writes a
# config for one node (this host, all its CPUs, 90% of its available memory, cores and memory
# both consumable so one-core jobs share the node), and starts munged, slurmctld and slurmd as
# plain daemons (no systemd, no cgroups) with everything under $DROVER_SLURM_DIR
# (default /tmp/drover-slurm). Calling `start` while that cluster is up changes nothing.
# Needs root: it installs packages and slurmd must setuid to the job's user.
set -euo pipefail

dir=${DROVER_SLURM_DIR:-/tmp/drover-slurm}
conf=$dir/slurm.conf
say() { printf '[drover-slurm] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# pid_of NAME: the pid in $dir/NAME.pid if that process is alive and is NAME (a recycled pid that
# now belongs to something else is not ours).
pid_of() {
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null || return 1
  echo "$pid"
}

# retry SECONDS CMD...: CMD every 0.25 s until it succeeds or the time is up.
retry() {
  local until=$(($(date +%s) + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$until" ] || return 1
    sleep 0.25
  done
}

node_usable() {
  case "$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

stop() {
  export SLURM_CONF=$conf
  if pid_of slurmctld >/dev/null; then scancel --quiet --user=root 2>/dev/null || true; fi
  local name pid
  for name in slurmd slurmctld munged; do
    pid=$(pid_of "$name") || continue
    kill "$pid" 2>/dev/null || true
    retry 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$dir"/*.pid
  say "stopped"
}

install_if_missing() {
  local missing=() p
  for p in munge slurmctld slurmd slurm-client; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  # Keep the packages' init scripts from starting system-wide daemons on the default ports.
  local blocker=/usr/sbin/policy-rc.d added=0
  if [ ! -e $blocker ]; then printf '#!/bin/sh\nexit 101\n' >$blocker; chmod 755 $blocker; added=1; fi
  local apt=(apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300)
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2 ||
    { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2; } ||
    { [ $added = 1 ] && rm -f $blocker; die "apt-get install ${missing[*]} failed"; }
  [ $added = 1 ] && rm -f $blocker
  return 0
}

write_config() {
  local node=$1 cpus mem
  cpus=$(nproc)
  mem=$(awk '/^MemAvailable:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$conf" <<EOF
# Written by drover's .ci/local-slurm.sh: one node, no cgroups, cores and memory consumable.
ClusterName=drover
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
PlugStackConfig=$dir/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=3600
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root: it installs packages and slurmd must setuid to job users"
  install_if_missing
  export SLURM_CONF=$conf
  if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null && pid_of munged >/dev/null && node_usable; then
    say "already running"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  stop 2>/dev/null
  local node
  node=$(hostname -s 2>/dev/null || uname -n)
  rm -rf "$dir/state" "$dir/spool"
  mkdir -p "$dir/state" "$dir/spool"
  chmod 0755 "$dir"
  : >"$dir/plugstack.conf"
  write_config "$node"

  local munge_user=munge
  id -u munge >/dev/null 2>&1 || munge_user=root
  [ -s "$dir/munge.key" ] || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chown "$munge_user:" "$dir/munge.key" && chmod 0600 "$dir/munge.key"
  rm -f "$dir/munge.socket" "$dir/munge.socket.lock"
  touch "$dir/munged.log" "$dir/munged.seed" && chown "$munge_user:" "$dir/munged.log" "$dir/munged.seed"
  chown "$munge_user:" "$dir"
  runuser -u "$munge_user" -- munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" </dev/null >&2 ||
    die "munged did not start (see $dir/munged.log)"
  chown root: "$dir"
  retry 15 test -S "$dir/munge.socket" || die "munged made no socket (see $dir/munged.log)"

  slurmctld -f "$conf" </dev/null >&2 || die "slurmctld did not start (see $dir/slurmctld.log)"
  retry 60 scontrol ping || die "slurmctld does not answer (see $dir/slurmctld.log)"
  slurmd -f "$conf" -N "$node" </dev/null >&2 || die "slurmd did not start (see $dir/slurmd.log)"
  if ! retry 90 node_usable; then
    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    retry 30 node_usable || die "node $node is $(sinfo -h -N -o '%T %E' | head -n1) (see $dir/slurmd.log)"
  fi
  say "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB' | head -n1)"
  echo "export SLURM_CONF=$conf"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  running) pid_of slurmctld >/dev/null ;;
  *) die "usage: $0 start|stop|running" ;;
esac
