#!/bin/bash
# Start and stop the test API server and its etcd. Usage: ctl.sh up|down|stop-apiserver|start-apiserver|status
# (stop-/start-apiserver stop and restart only the API server, keeping etcd: the operator tests use
# them to check that it survives the API server going away).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/env.sh"
export KUBECONFIG=$RUN/kubeconfig

live() {
  curl -sf --max-time 2 --cacert "$RUN/pki/ca.crt" --cert "$RUN/pki/client.crt" --key "$RUN/pki/client.key" \
    "https://127.0.0.1:$PORT/livez" >/dev/null 2>&1
}

wait_live() {
  for _ in $(seq 1 600); do live && return 0; sleep 0.1; done
  echo "API server did not become live; see $RUN/apiserver.log" >&2; tail -20 "$RUN/apiserver.log" >&2; return 1
}

stop_pid() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start_etcd() {
  rm -rf "$RUN/etcd-data"
  local p2=$((ETCD_PORT + 1)) p3=$((ETCD_PORT + 2))
  nohup "$R/bin/etcd" --data-dir "$RUN/etcd-data" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$p2" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p2" --initial-cluster "default=http://127.0.0.1:$p2" \
    --listen-metrics-urls "http://127.0.0.1:$p3" --unsafe-no-fsync > "$RUN/etcd.log" 2>&1 &
  echo $! > "$RUN/etcd.pid"
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && return 0; sleep 0.1; done
  echo "etcd did not start; see $RUN/etcd.log" >&2; return 1
}

start_apiserver() {
  local P=$RUN/pki
  # No core API here, so the admission plugins that need it are off.
  nohup "$R/bin/kube-crd-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 \
    --secure-port="$PORT" --tls-cert-file="$P/server.crt" --tls-private-key-file="$P/server.key" \
    --client-ca-file="$P/ca.crt" --kubeconfig="$KUBECONFIG" --authentication-kubeconfig="$KUBECONFIG" \
    --authorization-kubeconfig="$KUBECONFIG" --authentication-skip-lookup \
    --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
    --enable-priority-and-fairness=false >> "$RUN/apiserver.log" 2>&1 &
  echo $! > "$RUN/apiserver.pid"
  wait_live
}

case "${1:-}" in
  up) stop_pid "$RUN/apiserver.pid"; stop_pid "$RUN/etcd.pid"; start_etcd; start_apiserver ;;
  down) stop_pid "$RUN/apiserver.pid"; stop_pid "$RUN/etcd.pid" ;;
  stop-apiserver) stop_pid "$RUN/apiserver.pid" ;;
  start-apiserver) start_apiserver ;;
  status) live && echo live || { echo "not live"; exit 1; } ;;
  *) echo "usage: $0 up|down|stop-apiserver|start-apiserver|status" >&2; exit 2 ;;
esac
