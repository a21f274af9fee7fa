#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/start-slurm.sh (by PID, never by name).
#   .ci/stop-slurm.sh           # stop slurmd, slurmctld, and munged if start-slurm.sh started it
#   .ci/stop-slurm.sh --purge   # ... and delete the state folder (slurm.conf, spool, logs)
# Idempotent: does nothing for daemons that are not running.
set -uo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/moesweep-slurm}"
CONF="$STATE/slurm.conf"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
log() { echo "[stop-slurm] $*" >&2; }

stop_pid_file() {  # name pidfile
  local pid
  [ -s "$2" ] || return 0
  pid="$(cat "$2")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid)"
    $SUDO kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$1 still alive, SIGKILL"; $SUDO kill -9 "$pid"; }
  fi
  rm -f "$2"
}

# Cancel jobs still queued or running so that slurmstepd children do not outlive the cluster.
if [ -f "$CONF" ] && command -v scancel >/dev/null; then
  SLURM_CONF="$CONF" timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
fi
stop_pid_file slurmd "$STATE/slurmd.pid"
stop_pid_file slurmctld "$STATE/slurmctld.pid"
stop_pid_file munged "$STATE/munged.pid"   # only present when start-slurm.sh started munged

if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then $SUDO rm -f /etc/slurm/slurm.conf; fi
if [ "${1:-}" = "--purge" ]; then rm -rf "$STATE"; log "removed $STATE"; fi
log "stopped"
