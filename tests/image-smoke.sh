#!/usr/bin/env bash
# Smoke test of the images written by deploy/image/build.sh, run with a real container runtime
# (podman with runc) exactly as Kubernetes would run them: UID/GID 65532, read-only root
# filesystem, all capabilities dropped, no privilege escalation.
#
# Relay: the standalone config (deploy/standalone) mounted read-only, with runtime.yaml's spool
# moved to a writable volume; the container and a sink (aiosmtpd on 127.0.0.1:2526, where the
# standalone catch-all rule relays) share a private network namespace, so nothing on the host's
# ports is touched. swaks sends one message over submission (STARTTLS + AUTH PLAIN) and one over
# SMTPS; both must arrive at the sink. Also checked: the process's UID and capabilities, the
# metrics endpoint, name resolution inside the image (`relay queue --admin http://localhost:...`),
# and a clean exit on SIGTERM.
# Operator: `operator --help` and `operator render -f deploy/examples/` inside the container, and
# `operator run` serving /healthz and /metrics (against an API server that is not there).
#
#   tests/image-smoke.sh          # after deploy/image/build.sh
#
# Peers (installed with apt/pip when missing): podman, runc, swaks + Net::SSLeay, aiosmtpd, curl,
# iproute2. Without them the test FAILS when MAILRELAY_REQUIRE_PEERS=1 (CI) and is SKIPPED
# loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
relay_archive="target/images/relay-$arch.oci.tar"
operator_archive="target/images/operator-$arch.oci.tar"
for a in "$relay_archive" "$operator_archive"; do
  [ -s "$a" ] || { echo "image-smoke: $a missing; run deploy/image/build.sh first" >&2; exit 1; }
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
skip_or_fail() {
  if [ "${MAILRELAY_REQUIRE_PEERS:-}" = 1 ]; then
    echo "image-smoke: FAILED: $*" >&2; exit 1
  fi
  echo "!! SKIPPED image smoke test: $*" >&2; exit 0
}
if [ "$(id -u)" -ne 0 ]; then
  skip_or_fail "needs root (network namespaces, rootful podman)"
fi
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v swaks >/dev/null || need+=(swaks)
perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } ||
    skip_or_fail "cannot install ${need[*]}"
fi
python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install -q aiosmtpd ||
  skip_or_fail "cannot install the aiosmtpd sink"

# runc, not crun: crun refuses hosts with hybrid cgroups. Limits are set explicitly (and low)
# because podman's defaults can exceed what a nested or restricted host allows.
podman_run=(podman --runtime runc run --quiet --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
# What a restricted Kubernetes pod gets (runAsNonRoot, readOnlyRootFilesystem, drop ALL).
hardened=(--user 65532:65532 --read-only --read-only-tmpfs=false --cap-drop ALL
  --security-opt no-new-privileges)

tmp=$(mktemp -d)
ns="mailrelay-smoke-$$"
name="mailrelay-smoke-relay-$$"
sink_pid=""
dns_pid=""
cleanup() {
  podman rm -f -t 0 "$name" "$name-operator" >/dev/null 2>&1 || true
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
  [ -n "$dns_pid" ] && kill "$dns_pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
started=$(date +%s)

echo "== operator image"
help=$("${podman_run[@]}" --rm --network none "${hardened[@]}" "oci-archive:$operator_archive" --help)
grep -q 'render' <<<"$help" || { echo "operator --help does not mention render:" >&2; echo "$help" >&2; exit 1; }
rendered=$("${podman_run[@]}" --rm --network none "${hardened[@]}" \
  -v "$PWD/deploy/examples:/examples:ro" "oci-archive:$operator_archive" render -f /examples/)
grep -q '^kind: ConfigMap' <<<"$rendered" && grep -q '^kind: Secret' <<<"$rendered" ||
  { echo "operator render printed no ConfigMap and Secret:" >&2; echo "$rendered" >&2; exit 1; }
echo "operator --help and render -f deploy/examples/ ok"

echo "== relay image"
cfg="$tmp/config"
spool="$tmp/spool"
maildir="$tmp/sink"
mkdir -p "$cfg" "$spool"   # aiosmtpd creates the maildir itself
cp deploy/standalone/relay.yaml deploy/standalone/credentials.yaml "$cfg/"
sed 's|^spoolDir: .*|spoolDir: /var/spool/mailrelay|' deploy/standalone/runtime.yaml > "$cfg/runtime.yaml"
grep -q '^spoolDir: /var/spool/mailrelay$' "$cfg/runtime.yaml"
chmod -R a+rX "$cfg"
chmod 0755 "$tmp"
chown 65532:65532 "$spool"
before=$(cd "$cfg" && find . | sort)

ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
inns() { ip netns exec "$ns" "$@"; }
inns python3 -m aiosmtpd -n -l 127.0.0.1:2526 -c aiosmtpd.handlers.Mailbox "$maildir" \
  > "$tmp/sink.log" 2>&1 &
sink_pid=$!
# A DNS server for the container (answers every A query with 127.0.0.1), to check that the
# static binary resolves names through DNS, as it must for `redis://shared-limits:6379`.
inns python3 - <<'PY' > "$tmp/dns.log" 2>&1 &
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
while True:
    q, peer = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    qtype = struct.unpack(">H", q[end + 1:end + 3])[0]
    answer = b""
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    print(q[13:end].decode("ascii", "replace"), qtype, flush=True)
    s.sendto(struct.pack(">HHHHHH", struct.unpack(">H", q[:2])[0], 0x8180, 1, 1 if answer else 0, 0, 0)
             + q[12:end + 5] + answer, peer)
PY
dns_pid=$!

"${podman_run[@]}" -d --name "$name" --network "ns:/run/netns/$ns" --dns 127.0.0.1 "${hardened[@]}" \
  -v "$cfg:/etc/mailrelay:ro" -v "$spool:/var/spool/mailrelay" \
  "oci-archive:$relay_archive" >/dev/null
ready=0
for _ in $(seq 1 150); do
  if inns curl -sf http://127.0.0.1:9090/readyz >/dev/null 2>&1; then ready=1; break; fi
  [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || break
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "relay container did not become ready:" >&2; podman logs "$name" >&2 || true; exit 1
fi

pid=$(podman inspect -f '{{.State.Pid}}' "$name")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
[ "$uids" = "65532 65532 65532 65532" ] && [ "$gids" = "65532 65532 65532 65532" ] ||
  { echo "relay runs as uid [$uids] gid [$gids], not 65532" >&2; exit 1; }
[ "$capeff" = 0000000000000000 ] || { echo "relay has capabilities $capeff" >&2; exit 1; }
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$name")" = true ]
echo "relay runs as 65532:65532, no capabilities, read-only root filesystem"

token="smoke-$$-$(date +%s)"
inns swaks --server 127.0.0.1:2587 --tls --auth PLAIN \
  --auth-user relay-user@example.test --auth-password relay-password \
  --from relay-user@example.test --to someone@example.net \
  --header "Subject: $token submission" --silent 2
inns swaks --server 127.0.0.1:2465 --tls-on-connect --auth PLAIN \
  --auth-user relay-user@example.test --auth-password relay-password \
  --from relay-user@example.test --to other@example.net \
  --header "Subject: $token smtps" --silent 2
arrived=0
for _ in $(seq 1 150); do
  if grep -rqs "Subject: $token submission" "$maildir/new" && grep -rqs "Subject: $token smtps" "$maildir/new"; then
    arrived=1; break
  fi
  sleep 0.2
done
if [ "$arrived" != 1 ]; then
  echo "the messages did not reach the sink; relay log:" >&2; podman logs "$name" >&2 || true
  cat "$tmp/sink.log" >&2; exit 1
fi
echo "submission (STARTTLS + AUTH PLAIN) and SMTPS messages delivered through the container to the sink"

metrics=$(inns curl -sf http://127.0.0.1:9090/metrics)
grep -q 'mailrelay_messages_accepted_total{service="submission"} 1' <<<"$metrics"
grep -q 'mailrelay_tls_sessions_total{service="smtps",version="1.3"} 1' <<<"$metrics"
grep -q 'mailrelay_delivery_attempts_by_destination_total{destination="relay:catch-all",result="delivered"} 2' <<<"$metrics"
# getaddrinfo inside the static binary, in an image without NSS libraries: "localhost" from the
# /etc/hosts the runtime provides, a Service-like name from the DNS server in resolv.conf.
for host in localhost relay-admin.smoke.test; do
  podman exec "$name" /usr/local/bin/relay queue --admin "http://$host:9091" list >/dev/null ||
    { echo "relay queue --admin http://$host:9091 failed inside the image (name resolution)" >&2
      cat "$tmp/dns.log" >&2; exit 1; }
done
grep -q 'smoke' "$tmp/dns.log" || { echo "the name was not resolved through DNS" >&2; exit 1; }
echo "metrics and in-image name resolution ok"

podman stop -t 30 "$name" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { echo "relay exited with $code on SIGTERM" >&2; podman logs "$name" >&2; exit 1; }
after=$(cd "$cfg" && find . | sort)
[ "$before" = "$after" ] || { echo "the relay changed its read-only config directory" >&2; exit 1; }
echo "relay stopped cleanly on SIGTERM; config directory untouched"

# The operator's long-running mode in its image: serves /healthz and /metrics while it retries
# an API server that is not there (a kubeconfig pointing at a closed port).
cat > "$tmp/kubeconfig" <<'KC'
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
KC
chmod 0644 "$tmp/kubeconfig"
opname="$name-operator"
"${podman_run[@]}" -d --name "$opname" --network "ns:/run/netns/$ns" "${hardened[@]}" \
  -v "$tmp/kubeconfig:/etc/kubeconfig:ro" -e KUBECONFIG=/etc/kubeconfig \
  "oci-archive:$operator_archive" run --namespace mail --metrics-addr 127.0.0.1:8080 >/dev/null
op_ok=0
for _ in $(seq 1 100); do
  if inns curl -sf http://127.0.0.1:8080/healthz >/dev/null 2>&1 &&
     inns curl -sf http://127.0.0.1:8080/metrics | grep -q '^mailrelay_operator_leader 0'; then
    op_ok=1; break
  fi
  sleep 0.2
done
podman rm -f -t 5 "$opname" >/dev/null 2>&1 || true
[ "$op_ok" = 1 ] || { echo "operator run in its image served no /healthz and /metrics" >&2; exit 1; }
echo "operator run: /healthz and /metrics served as 65532 with a read-only root filesystem"
echo "image smoke test passed in $(( $(date +%s) - started )) s"
