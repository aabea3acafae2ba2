#!/usr/bin/env bash
# Peak RSS of the relay with 5,000 idle SMTP sessions (debug build unless PROFILE=--release).
set -euo pipefail
ulimit -n 20000
cd "$(dirname "$0")/.."
exec cargo test ${PROFILE:-} -p mailrelay-relay --test limits_rss -- --ignored --nocapture
