#!/bin/bash
# Starts etcd and kube-lite-apiserver on loopback for tests, with a fresh (empty) etcd each time.
# Usage: up.sh [DIR]   (DIR as given to install.sh; or KUBE_LITE_DIR; default ~/.cache/kube-lite)
# Env: KUBE_LITE_RUN   state dir: pki/, kubeconfig, logs, pid files, etcd-data (default DIR/run)
#      KUBE_LITE_PORT  API server port on 127.0.0.1 (default 26443)
#      KUBE_LITE_ETCD_PORT  etcd client port (default 22379; peer and metrics use the next two)
# Makes a CA, a server certificate for 127.0.0.1 and a client certificate in system:masters (once per
# run dir), a kubeconfig with them embedded, waits for /livez and for every served group in discovery,
# then prints on stdout only:  export KUBECONFIG=<run dir>/kubeconfig   (use: eval "$(up.sh)").
# Stop with down.sh (same DIR / KUBE_LITE_RUN).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
R=${1:-${KUBE_LITE_DIR:-$HOME/.cache/kube-lite}}
[ -d "$R" ] || { echo "no $R: run install.sh $R first" >&2; exit 1; }
R=$(cd "$R" && pwd)
RUN=${KUBE_LITE_RUN:-$R/run}
PORT=${KUBE_LITE_PORT:-26443}
ETCD_PORT=${KUBE_LITE_ETCD_PORT:-22379}
for b in kube-lite-apiserver etcd; do
  [ -x "$R/bin/$b" ] || { echo "no $R/bin/$b: run install.sh $R first" >&2; exit 1; }
done
KUBE_LITE_RUN=$RUN "$HERE/down.sh" "$R" >&2   # a previous instance in the same run dir
mkdir -p "$RUN/pki"
RUN=$(cd "$RUN" && pwd)
P=$RUN/pki

if [ ! -f "$P/client.crt" ]; then
  (
    cd "$P"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=kube-lite-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/O=system:masters/CN=kube-lite-admin" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 3650 -extfile client.ext 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
fi
b64() { base64 -w0 < "$1"; }
cat > "$RUN/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kube-lite
  cluster:
    server: https://127.0.0.1:$PORT
    certificate-authority-data: $(b64 "$P/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$P/client.crt")
    client-key-data: $(b64 "$P/client.key")
contexts:
- name: kube-lite
  context: {cluster: kube-lite, user: admin, namespace: default}
current-context: kube-lite
KC

rm -rf "$RUN/etcd-data"
p2=$((ETCD_PORT + 1)) p3=$((ETCD_PORT + 2))
nohup "$R/bin/etcd" --data-dir "$RUN/etcd-data" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$p2" \
  --initial-advertise-peer-urls "http://127.0.0.1:$p2" --initial-cluster "default=http://127.0.0.1:$p2" \
  --listen-metrics-urls "http://127.0.0.1:$p3" --unsafe-no-fsync > "$RUN/etcd.log" 2>&1 &
echo $! > "$RUN/etcd.pid"
ok=
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && { ok=1; break; }; sleep 0.1; done
[ -n "$ok" ] || { echo "etcd did not start; see $RUN/etcd.log" >&2; tail -20 "$RUN/etcd.log" >&2; exit 1; }

# No admission plugins that need controllers or webhooks; namespaces are not enforced. The command
# is kept in RUN/apiserver.sh so that apiserver.sh can stop and restart the API server alone
# (etcd and its data stay), for tests of an API server outage.
cat > "$RUN/apiserver.sh" <<CMD
#!/bin/bash
exec "$R/bin/kube-lite-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 \\
  --secure-port="$PORT" --tls-cert-file="$P/server.crt" --tls-private-key-file="$P/server.key" \\
  --client-ca-file="$P/ca.crt" --kubeconfig="$RUN/kubeconfig" --authentication-kubeconfig="$RUN/kubeconfig" \\
  --authorization-kubeconfig="$RUN/kubeconfig" --authentication-skip-lookup \\
  --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \\
  --enable-priority-and-fairness=false
CMD
chmod +x "$RUN/apiserver.sh"
nohup "$RUN/apiserver.sh" > "$RUN/apiserver.log" 2>&1 &
echo $! > "$RUN/apiserver.pid"

get() { curl -sf --max-time 2 --cacert "$P/ca.crt" --cert "$P/client.crt" --key "$P/client.key" "https://127.0.0.1:$PORT$1"; }
ready() {
  get /livez >/dev/null || return 1
  local apis; apis=$(get /apis) || return 1
  get /api/v1 | grep -q '"configmaps"' || return 1
  for g in apiextensions.k8s.io apps rbac.authorization.k8s.io policy events.k8s.io coordination.k8s.io; do
    echo "$apis" | grep -q "\"$g/v1\"" || return 1
    get "/apis/$g/v1" >/dev/null || return 1
  done
}
ok=
for _ in $(seq 1 600); do
  ready && { ok=1; break; }
  kill -0 "$(cat "$RUN/apiserver.pid")" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ok" ] || { echo "API server not ready; see $RUN/apiserver.log" >&2; tail -20 "$RUN/apiserver.log" >&2; exit 1; }
echo "kube-lite: API server https://127.0.0.1:$PORT (etcd 127.0.0.1:$ETCD_PORT), state in $RUN" >&2
echo "export KUBECONFIG=$RUN/kubeconfig"
