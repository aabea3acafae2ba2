#!/bin/bash
# Stops or restarts only the API server of a running kube-lite (etcd and its data stay), for
# tests of an API server outage: apiserver.sh stop|start|status   (same DIR / KUBE_LITE_RUN as up.sh)
set -euo pipefail
R=${KUBE_LITE_DIR:-$HOME/.cache/kube-lite}
RUN=${KUBE_LITE_RUN:-$R/run}
P=$RUN/pki
PORT=$(sed -n 's/.*--secure-port="\{0,1\}\([0-9]*\).*/\1/p' "$RUN/apiserver.sh" | head -1)
live() {
  curl -sf --max-time 2 --cacert "$P/ca.crt" --cert "$P/client.crt" --key "$P/client.key" \
    "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}
case "${1:-}" in
  stop)
    [ -f "$RUN/apiserver.pid" ] || exit 0
    pid=$(cat "$RUN/apiserver.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN/apiserver.pid" ;;
  start)
    nohup "$RUN/apiserver.sh" >> "$RUN/apiserver.log" 2>&1 &
    echo $! > "$RUN/apiserver.pid"
    for _ in $(seq 1 600); do live && exit 0; sleep 0.1; done
    echo "API server did not come back; see $RUN/apiserver.log" >&2; exit 1 ;;
  status) live && echo live || { echo "not live"; exit 1; } ;;
  *) echo "usage: $0 stop|start|status" >&2; exit 2 ;;
esac
