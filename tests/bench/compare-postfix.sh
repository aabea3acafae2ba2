#!/usr/bin/env bash
# compare-postfix.sh [BENCH_DIR] -- end-to-end relay throughput of mailrelay vs Postfix, back to
# back in one batch (client -> relay on 127.0.0.1:2525 -> sink on 127.0.0.1:2526), plus the
# harness ceiling (load generator straight into the sink), with the ratios printed at the end.
#
# BENCH_DIR: the shared bench directory with relay-bench.sh and postfix-setup.sh (argument or
# env MAILRELAY_BENCH_DIR). Needs Debian's postfix (smtp-source/smtp-sink); see its README.
#
# Env:
#   CASES   which comparisons to run, in order (default "base"):
#             base     20 sessions, 1 KiB (the headline figure)
#             single   1 session, 1 KiB
#             large    20 sessions, 100 KiB
#             latency  20 sessions, 1 KiB with the Python load generator (p50/p99 submit latency)
#             sweep    1, 16, 64, 256 and 1000 sessions, 1 KiB (SWEEP overrides the list)
#   REPEAT (3), N: passed through to relay-bench.sh (N defaults per case).
set -euo pipefail
BENCH=${1:-${MAILRELAY_BENCH_DIR:-}}
[ -n "$BENCH" ] && [ -x "$BENCH/relay-bench.sh" ] || {
  echo "usage: $0 BENCH_DIR (or MAILRELAY_BENCH_DIR); BENCH_DIR must contain relay-bench.sh" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export REPEAT=${REPEAT:-3}
CASES=${CASES:-base}
SWEEP=${SWEEP:-1 16 64 256 1000}
WORK=$(mktemp -d)
cleanup() {
  kill "${RELAY_PID:-}" 2>/dev/null || true
  "$BENCH/postfix-setup.sh" stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -q -p mailrelay-relay --manifest-path "$ROOT/Cargo.toml"
TARGET=$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

listening() { ss -ltnH "sport = :$1" | grep -q .; }

# One relay-bench run set; prints its MEDIAN line (or the only line with REPEAT=1).
bench() { # LABEL RELAY_PORT
  local out="$WORK/$1.txt"
  LABEL=$1 "$BENCH/relay-bench.sh" "$2" 2526 > "$out" 2>/dev/null || true
  if grep -q '^MEDIAN' "$out"; then grep '^MEDIAN' "$out"; else grep '^label=' "$out" | tail -n1; fi
}

mailrelay() { # LABEL
  # A private copy of the standalone config so the spool starts empty and nothing in the tree changes.
  rm -rf "$WORK/standalone"; cp -r "$ROOT/deploy/standalone" "$WORK/standalone"; rm -rf "$WORK/standalone/spool"
  RUST_LOG=warn "$TARGET/release/relay" --config "$WORK/standalone" 2> "$WORK/relay.log" & RELAY_PID=$!
  for _ in $(seq 100); do listening 2525 && break; sleep 0.1; done
  RELAY_PID=$RELAY_PID bench "$1" 2525
  kill -TERM "$RELAY_PID"; wait "$RELAY_PID" || true; RELAY_PID=
}

postfix() { # LABEL
  "$BENCH/postfix-setup.sh" setup 2525 2526 >/dev/null && "$BENCH/postfix-setup.sh" start >/dev/null
  bench "$1" 2525
  "$BENCH/postfix-setup.sh" stop >/dev/null
}

field() { grep -o " $2=[0-9.]*" <<<"$1" | cut -d= -f2; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a != "" && b != "" && b > 0) printf "%.2f", a/b; else print "NA" }'; }

SUMMARY="$WORK/summary.txt"
compare() { # CASE (env SESSIONS, SIZE, LOADGEN, N set by the caller)
  local c=$1 ceiling m p
  echo "== $c: sessions=$SESSIONS size=$SIZE loadgen=${LOADGEN:-smtp-source}"
  ceiling=$(bench "ceiling-$c" 2526); echo "$ceiling"
  m=$(mailrelay "mailrelay-$c"); echo "$m"
  p=$(postfix "postfix-$c"); echo "$p"
  {
    printf '%-22s accepted %7s vs %7s (x%s)  delivered %7s vs %7s (x%s)  drain %ss vs %ss' "$c" \
      "$(field "$m" accepted_msgs_per_s)" "$(field "$p" accepted_msgs_per_s)" \
      "$(ratio "$(field "$m" accepted_msgs_per_s)" "$(field "$p" accepted_msgs_per_s)")" \
      "$(field "$m" delivered_msgs_per_s)" "$(field "$p" delivered_msgs_per_s)" \
      "$(ratio "$(field "$m" delivered_msgs_per_s)" "$(field "$p" delivered_msgs_per_s)")" \
      "$(field "$m" drain_s)" "$(field "$p" drain_s)"
    if [ -n "$(field "$m" p99_ms)" ]; then
      printf '  p99 %sms vs %sms (x%s)' "$(field "$m" p99_ms)" "$(field "$p" p99_ms)" \
        "$(ratio "$(field "$m" p99_ms)" "$(field "$p" p99_ms)")"
    fi
    printf '  pss %sK vs %sK  ceiling %s\n' "$(field "$m" relay_peak_pss_kb)" "$(field "$p" relay_peak_pss_kb)" \
      "$(field "$ceiling" accepted_msgs_per_s)"
  } >> "$SUMMARY"
}

for c in $CASES; do
  case $c in
    base)    SESSIONS=20 SIZE=1024 LOADGEN=smtp-source compare base ;;
    single)  SESSIONS=1 SIZE=1024 LOADGEN=smtp-source N=${N:-5000} compare single ;;
    large)   SESSIONS=20 SIZE=102400 LOADGEN=smtp-source compare large ;;
    latency) SESSIONS=20 SIZE=1024 LOADGEN=py N=${N:-5000} compare latency ;;
    sweep)   for s in $SWEEP; do SESSIONS=$s SIZE=1024 LOADGEN=smtp-source compare "sweep-$s"; done ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done

echo "== mailrelay vs postfix (medians of REPEAT=$REPEAT, one batch; ceiling = loadgen straight into the sink)"
cat "$SUMMARY"
