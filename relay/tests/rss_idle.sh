#!/usr/bin/env bash
# Memory per idle SMTP session: RSS of the relay holding up to 5,000 idle sessions, with a
# bound that fails on a regression (debug build unless PROFILE=--release). CI runs it.
# Each session is one descriptor in the relay and one in the test, so the count follows the
# hard descriptor limit where that is below 5,000 + headroom.
set -euo pipefail
cd "$(dirname "$0")/.."
hard=$(ulimit -Hn)
sessions=5000
if [ "$hard" != unlimited ] && [ "$hard" -lt $((sessions + 500)) ]; then
  sessions=$((hard - 500))
fi
if [ "$sessions" -lt 1000 ]; then
  echo "!! the hard descriptor limit ($hard) leaves fewer than 1,000 sessions; raise it (ulimit -Hn)" >&2
  exit 1
fi
ulimit -n $((sessions + 500))
export RSS_SESSIONS=$sessions
exec cargo test ${PROFILE:-} -p mailrelay-relay --test limits_rss -- --ignored --nocapture
