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
#             dkim     20 sessions, 1 KiB, mailrelay DKIM-signing every message (RSA-2048 and
#                      Ed25519 selectors for the sender's domain) against mailrelay unsigned and
#                      Postfix (which does not sign: it has no DKIM without a milter)
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

mailrelay() { # LABEL [POLICY_DIR: a rendered relay.yaml + credentials.yaml to run instead]
  # A private copy of the standalone config so the spool starts empty and nothing in the tree changes.
  rm -rf "$WORK/standalone"; cp -r "$ROOT/deploy/standalone" "$WORK/standalone"; rm -rf "$WORK/standalone/spool"
  if [ -n "${2:-}" ]; then cp "$2/relay.yaml" "$2/credentials.yaml" "$WORK/standalone/"; fi
  RUST_LOG=warn "$TARGET/release/relay" --config "$WORK/standalone" 2> "$WORK/relay.log" & RELAY_PID=$!
  for _ in $(seq 100); do listening 2525 && break; sleep 0.1; done
  RELAY_PID=$RELAY_PID bench "$1" 2525
  # How many signatures the relay made (0 unless the policy signs), for the dkim case.
  curl -s http://127.0.0.1:9090/metrics | awk '/^mailrelay_dkim_signatures_total/ {n += $NF} END {print n + 0}' > "$WORK/signatures"
  kill -TERM "$RELAY_PID"; wait "$RELAY_PID" || true; RELAY_PID=
}

# The standalone policy plus DKIM signing for example.com, the sender domain of relay-bench.sh
# (smtp-source writes a From: header with the envelope sender), rendered into $WORK/dkim.
dkim_policy() {
  local d="$WORK/dkim"
  rm -rf "$d"; mkdir -p "$d/policy"; cp "$ROOT/deploy/standalone/policy/"*.yaml "$d/policy/"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/rsa.pem" 2>/dev/null
  openssl genpkey -algorithm ED25519 -out "$d/ed25519.pem" 2>/dev/null
  {
    printf 'apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: example-com}\n'
    printf 'spec:\n  domain: example.com\n  local: false\n  dkim:\n    selectors:\n'
    printf '      - {name: rsa, keySecretRef: {name: dkim-rsa}}\n      - {name: ed, keySecretRef: {name: dkim-ed}}\n'
    for k in rsa:rsa.pem ed:ed25519.pem; do
      printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: dkim-%s}\nstringData:\n  dkim.key: |\n' "${k%%:*}"
      sed 's/^/    /' "$d/${k#*:}"
    done
  } > "$d/policy/dkim.yaml"
  cargo run -q --release -p mailrelay-operator --bin operator --manifest-path "$ROOT/Cargo.toml" -- \
    render -f "$d/policy" --out-dir "$d" >/dev/null
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

compare_dkim() { # (env SESSIONS, SIZE, LOADGEN set by the caller)
  local ceiling u m p signed
  echo "== dkim: sessions=$SESSIONS size=$SIZE, mailrelay signing vs unsigned vs Postfix"
  dkim_policy
  ceiling=$(bench ceiling-dkim 2526); echo "$ceiling"
  u=$(mailrelay mailrelay-unsigned); echo "$u"
  m=$(mailrelay mailrelay-dkim "$WORK/dkim"); echo "$m"
  signed=$(cat "$WORK/signatures")
  p=$(postfix postfix-dkim); echo "$p"
  printf '%-22s accepted %7s signed (%s signatures) vs %7s unsigned (x%s) vs Postfix %7s (x%s)  delivered %7s vs %7s vs %7s  pss %sK vs %sK\n' dkim \
    "$(field "$m" accepted_msgs_per_s)" "$signed" "$(field "$u" accepted_msgs_per_s)" \
    "$(ratio "$(field "$m" accepted_msgs_per_s)" "$(field "$u" accepted_msgs_per_s)")" \
    "$(field "$p" accepted_msgs_per_s)" "$(ratio "$(field "$m" accepted_msgs_per_s)" "$(field "$p" accepted_msgs_per_s)")" \
    "$(field "$m" delivered_msgs_per_s)" "$(field "$u" delivered_msgs_per_s)" "$(field "$p" delivered_msgs_per_s)" \
    "$(field "$m" relay_peak_pss_kb)" "$(field "$u" relay_peak_pss_kb)" >> "$SUMMARY"
}

for c in $CASES; do
  case $c in
    dkim)    SESSIONS=20 SIZE=1024 LOADGEN=smtp-source N=${N:-10000} compare_dkim ;;
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
