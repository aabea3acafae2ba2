#!/bin/bash
# Stops the API server and etcd started by up.sh (by their pid files; the build stays cached).
# Usage: down.sh [DIR]   (same DIR / KUBE_LITE_DIR / KUBE_LITE_RUN as up.sh)
set -euo pipefail
R=${1:-${KUBE_LITE_DIR:-$HOME/.cache/kube-lite}}
RUN=${KUBE_LITE_RUN:-$R/run}
stop_pid() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "kube-lite: stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
}
stop_pid "$RUN/apiserver.pid"
stop_pid "$RUN/etcd.pid"
