#!/usr/bin/env bash
# compare-postfix.sh [BENCH_DIR] -- end-to-end relay throughput of mailrelay vs Postfix, back to
# back in one batch (client -> relay on 127.0.0.1:2525 -> sink on 127.0.0.1:2526), plus the
# harness ceiling (load generator straight into the sink).
#
# BENCH_DIR: the shared bench directory with relay-bench.sh and postfix-setup.sh (argument or
# env MAILRELAY_BENCH_DIR). Needs Debian's postfix (smtp-source/smtp-sink); see its README.
# Env: REPEAT (3), N, SESSIONS, SIZE are passed through to relay-bench.sh.
set -euo pipefail
BENCH=${1:-${MAILRELAY_BENCH_DIR:-}}
[ -n "$BENCH" ] && [ -x "$BENCH/relay-bench.sh" ] || {
  echo "usage: $0 BENCH_DIR (or MAILRELAY_BENCH_DIR); BENCH_DIR must contain relay-bench.sh" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export REPEAT=${REPEAT:-3}
WORK=$(mktemp -d); trap 'kill "${RELAY_PID:-}" 2>/dev/null || true; "$BENCH/postfix-setup.sh" stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

cargo build --release -q -p mailrelay-relay --manifest-path "$ROOT/Cargo.toml"
TARGET=$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# A private copy of the standalone config so the spool starts empty and nothing in the tree changes.
cp -r "$ROOT/deploy/standalone" "$WORK/standalone"; rm -rf "$WORK/standalone/spool"

echo "== harness ceiling (loadgen -> sink)"
LABEL=ceiling "$BENCH/relay-bench.sh" 2526 2526 | tee "$WORK/ceiling.txt"

echo "== mailrelay"
RUST_LOG=warn "$TARGET/release/relay" --config "$WORK/standalone" 2> "$WORK/relay.log" & RELAY_PID=$!
for _ in $(seq 100); do ss -ltnH 'sport = :2525' | grep -q . && break; sleep 0.1; done
LABEL=mailrelay RELAY_PID=$RELAY_PID "$BENCH/relay-bench.sh" 2525 2526 | tee "$WORK/mailrelay.txt"
kill -TERM "$RELAY_PID"; wait "$RELAY_PID" || true; RELAY_PID=

echo "== postfix"
"$BENCH/postfix-setup.sh" setup 2525 2526 >/dev/null && "$BENCH/postfix-setup.sh" start >/dev/null
LABEL=postfix "$BENCH/relay-bench.sh" 2525 2526 | tee "$WORK/postfix.txt"
"$BENCH/postfix-setup.sh" stop >/dev/null

echo "== medians"
grep -h MEDIAN "$WORK/ceiling.txt" "$WORK/mailrelay.txt" "$WORK/postfix.txt" || cat "$WORK"/*.txt
