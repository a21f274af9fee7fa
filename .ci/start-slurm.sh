#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (for tests/integration/test_slurm.py).
#
#   eval "$(.ci/start-slurm.sh)"     # stdout is only `export ...` lines; progress goes to stderr
#   .ci/stop-slurm.sh                # stops what this script started
#
# Idempotent: installs Debian's slurmctld/slurmd/slurm-client/munge only when missing, reuses a running
# cluster when `sinfo` already answers, and otherwise (re)writes slurm.conf and starts munged, slurmctld and
# `slurmd -N localhost` (the machine's hostname is not "localhost", so the node name is given explicitly).
# Works without systemd. Needs root (or passwordless sudo): apt-get, munge's key and SlurmUser=root.
# The cluster has no accounting (AccountingStorageType=accounting_storage/none): sacct does not work, so the
# slurm profile must poll with squeue (MOESWEEP_SLURM_ACCOUNTING=no, see profiles/slurm/config.yaml).
#
# Environment:
#   SLURM_STATE_DIR   state/spool/log/pid folder and slurm.conf (default /tmp/moesweep-slurm)
#   SLURM_PARTITION   name of the single partition (default debug)
#   SLURM_WAIT_S      seconds to wait for the node to become idle (default 60)
set -euo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/moesweep-slurm}"
PARTITION="${SLURM_PARTITION:-debug}"
WAIT_S="${SLURM_WAIT_S:-60}"
CONF="$STATE/slurm.conf"

log() { echo "[start-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null && sudo -n true 2>/dev/null || die "needs root or passwordless sudo"
  SUDO="sudo -n"
fi

print_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export MOESWEEP_SLURM_ACCOUNTING=no"   # this cluster has no accounting: poll with squeue
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { SLURM_CONF="$CONF" sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -1; }

# 0. Already running? Reuse it.
if [ -f "$CONF" ] && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && [ "$(node_state)" = idle ]; then
  log "cluster already running ($CONF)"
  print_env
  exit 0
fi

# 1. Packages (only when missing).
missing=()
for bin_pkg in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
  bin="${bin_pkg%%:*}"; pkg="${bin_pkg##*:}"
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

# 2. munge: key (made by the package; create it if absent), run dir, daemon.
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null; then $SUDO mungekey --create --force >&2
  else $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge && $SUDO chown munge:munge /run/munge && $SUDO chmod 755 /run/munge
mkdir -p "$STATE"
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  log "starting munged"
  $SUDO runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true   # stop-slurm.sh stops it only if we started it
  munge -n | unmunge >/dev/null || die "munge does not work"
fi

# 3. Stop leftovers of an earlier start (by PID) before rewriting the configuration.
for d in slurmd slurmctld; do
  if alive "$STATE/$d.pid"; then log "stopping stale $d"; $SUDO kill "$(cat "$STATE/$d.pid")" || true; sleep 1; fi
done

# 4. slurm.conf from this machine's CPUs and memory (what slurmd itself detects).
hw="$(slurmd -C 2>/dev/null | head -1 || true)"
CPUS="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"; CPUS="${CPUS:-$(nproc)}"
MEM="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"; MEM="${MEM:-$(free -m | awk '/^Mem:/{print $2}')}"
mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
cat >"$CONF" <<EOF
# Written by .ci/start-slurm.sh: single-node test cluster, no accounting, no cgroups.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# finished jobs stay visible to squeue this long (the plugin's squeue status polling relies on it)
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
log "wrote $CONF (CPUs=$CPUS RealMemory=$MEM)"

# Clients without SLURM_CONF (e.g. a plain `sinfo`) read /etc/slurm/slurm.conf: point it here unless it exists.
if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then
  $SUDO mkdir -p /etc/slurm && $SUDO ln -sfn "$CONF" /etc/slurm/slurm.conf
fi

# 5. Daemons (they fork and write their PID files).
export SLURM_CONF="$CONF"
log "starting slurmctld"
$SUDO env SLURM_CONF="$CONF" slurmctld -f "$CONF"
for _ in $(seq 100); do SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
log "starting slurmd -N localhost"
$SUDO env SLURM_CONF="$CONF" slurmd -f "$CONF" -N localhost

# 6. Wait until the node is idle.
state=""
for _ in $(seq $((WAIT_S * 2))); do
  state="$(node_state)"
  case "$state" in
    idle) break ;;
    drain*|down*|fail*) SLURM_CONF="$CONF" scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
if [ "$state" != idle ]; then
  log "node state '$state' after ${WAIT_S}s; last log lines:"
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  die "SLURM node did not become idle"
fi
SLURM_CONF="$CONF" sinfo >&2
print_env
