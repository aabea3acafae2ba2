#!/usr/bin/env bash
# A throwaway MIT Kerberos realm on loopback, for the AUTH GSSAPI tests. Everything (krb5.conf,
# kdc.conf, database, stash, keytab, credential caches, replay cache, KDC log and pid file) lives in
# the state directory; nothing system-wide is read or changed (KRB5_CONFIG and KRB5_KDC_PROFILE
# point into it, no DNS lookups, no reverse DNS).
#
#   eval "$(tests/krb5/realm.sh start DIR [REALM])"   # REALM defaults to MAILRELAY.TEST
#   tests/krb5/realm.sh env DIR                        # the export lines again
#   tests/krb5/realm.sh addprinc DIR NAME PASSWORD [MAXLIFE]
#   eval "$(tests/krb5/realm.sh expired-ticket DIR [NAME])"   # see "expired tickets" below
#   tests/krb5/realm.sh stop DIR                       # kills the KDC (the state stays)
#   `realm.sh DIR [REALM]` is `realm.sh start DIR [REALM]`.
#
# start: installs what is missing (Debian packages krb5-kdc krb5-admin-server krb5-user
# libkrb5-dev), writes DIR/krb5.conf and DIR/kdc.conf, creates the database (random master
# password), starts krb5kdc in the background (pid in DIR/kdc.pid, log in DIR/kdc.log) on
# 127.0.0.1:$KDC_PORT (TCP and UDP; a free port is chosen when KDC_PORT is unset), and creates
#   smtp/localhost@REALM   random key, exported to DIR/smtp.keytab
#   alice@REALM            password alice-pass
#   bob@REALM              password bob-pass
# Run again on the same DIR it reuses the database, the port and the keytab and only starts the KDC
# if it is not running. stdout carries only the `export` lines (for eval), progress goes to stderr.
# The exports: KRB5_CONFIG (client and server side), KRB5_KDC_PROFILE, KRB5CCNAME (a file cache in
# DIR, so `kinit` does not touch the user's cache), KRB5RCACHEDIR (the acceptor's replay cache),
# KRB5_REALM, KRB5_KDC_PORT, KRB5_KEYTAB (the path only: the server is given it explicitly; nothing
# here sets KRB5_KTNAME).
#
# A ticket for alice:   echo alice-pass | kinit alice@MAILRELAY.TEST
# A client without a ticket:   kdestroy (or KRB5CCNAME=FILE:/nonexistent)
#
# Short-lived and expired tickets. The KDC caps a ticket's life at the smallest of the request
# (`kinit -l`), the client principal's maxlife, the service's maxlife and the realm's max_life; a
# principal made with `realm.sh addprinc DIR carol carol-pass 5s` never gets a ticket longer than 5
# seconds, whatever the client asks for (`kinit -l 5s` does the same for any principal). The
# acceptor forgives `clockskew` seconds past a ticket's end; this realm sets clockskew = 5
# (KRB5_CLOCKSKEW at the first start overrides it). By hand:
#   echo carol-pass | kinit carol@MAILRELAY.TEST; t0=$(date +%s)   # a 5 s ticket
#   kvno smtp/localhost@MAILRELAY.TEST        # the service ticket, into the cache, also <= 5 s
#   sleep 11                                  # > life + clockskew: expired for the server
# An MIT client (curl, python-gssapi) then refuses the ticket itself: curl says
# "gss_init_sec_context() failed: Ticket expired." after the server's `334 ` and closes the
# connection; nothing reaches the server. To make the server see the expired ticket, run the
# client with its clock set back to just after the ticket was issued (Debian's faketime):
#   faketime -f "@$(date -d @$((t0 + 1)) '+%F %T')" curl ... --login-options AUTH=GSSAPI -u : ...
# and the acceptor (real clock) fails with "Ticket expired" (KRB5KRB_AP_ERR_TKT_EXPIRED: MIT
# checks the ticket's times before the authenticator's clock skew). A relative shift
# (`faketime -f -30`) can land before the ticket's start: the client then says "Ticket not yet
# valid".
# `realm.sh expired-ticket DIR [NAME]` does all of this (and installs faketime if missing): NAME
# (default carol, password NAME-pass, maxlife 5s; created if missing) gets a ticket and a
# service ticket for $KRB5_EXPIRED_SERVICE (default smtp/localhost@REALM) in $KRB5CCNAME (default DIR/ccache), the script waits until the
# server sees them expired, and prints for eval the clock to give the client:
#   eval "$(tests/krb5/realm.sh expired-ticket "$dir")"
#   faketime -f "$KRB5_EXPIRED_CLIENT_TIME" curl ... --login-options AUTH=GSSAPI -u : ...
#
# A second, unrelated realm for "wrong realm" / "wrong service key" cases: run start again with
# another DIR and REALM (e.g. OTHER.TEST); it gets its own port and its own smtp/localhost@OTHER.TEST
# key, which the first realm's keytab does not have.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
die() { echo "realm.sh: $*" >&2; exit 1; }
log() { echo "realm.sh: $*" >&2; }

KRB5_SBIN=/usr/sbin
ensure_packages() {
  local missing=()
  [ -x "$KRB5_SBIN/krb5kdc" ] || missing+=(krb5-kdc)
  [ -x "$KRB5_SBIN/kadmin.local" ] || missing+=(krb5-admin-server)
  command -v kinit >/dev/null || missing+=(krb5-user)
  [ -e /usr/include/gssapi/gssapi_ext.h ] || missing+=(libkrb5-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq >&2
    # The packages' maintainer scripts would start the system KDC and kadmind (unconfigured): not
    # wanted, and harmless where policy-rc.d denies it (containers).
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      krb5-kdc krb5-admin-server krb5-user libkrb5-dev >&2
  fi
  local t
  for t in "$KRB5_SBIN/krb5kdc" "$KRB5_SBIN/kdb5_util" "$KRB5_SBIN/kadmin.local" kinit klist kvno; do
    command -v "$t" >/dev/null || die "$t is missing after the install"
  done
}

# A port free for both TCP and UDP on 127.0.0.1.
free_port() {
  python3 - <<'EOF'
import socket
for _ in range(100):
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        t.close(); u.close(); continue
    t.close(); u.close()
    print(port)
    break
else:
    raise SystemExit("no free port")
EOF
}

# REALM, PORT and SKEW of the state directory $DIR.
load_env() {
  # shellcheck disable=SC1091
  . "$DIR/realm.env"
  SKEW=${SKEW:-5}
}

kdc_running() {
  local dir=$1 pid
  [ -s "$dir/kdc.pid" ] || return 1
  pid=$(cat "$dir/kdc.pid")
  kill -0 "$pid" 2>/dev/null || return 1
  # A recycled pid is not our KDC.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q krb5kdc
}

env_lines() {
  local dir=$1
  DIR=$dir load_env
  cat <<EOF
export KRB5_CONFIG=$dir/krb5.conf
export KRB5_KDC_PROFILE=$dir/kdc.conf
export KRB5CCNAME=FILE:$dir/ccache
export KRB5RCACHEDIR=$dir/rcache
export KRB5_REALM=$REALM
export KRB5_KDC_PORT=$PORT
export KRB5_KEYTAB=$dir/smtp.keytab
EOF
}

kadmin() { "$KRB5_SBIN/kadmin.local" -r "$REALM" -q "$1" >"$DIR/kadmin.out" 2>&1 || { cat "$DIR/kadmin.out" >&2; die "kadmin.local failed: $1"; }; }
has_princ() { "$KRB5_SBIN/kadmin.local" -r "$REALM" -q "getprinc $1" 2>&1 | grep -q "^Principal: $1\$"; }

addprinc() { # NAME PASSWORD [MAXLIFE]
  local name=$1 pass=$2 maxlife=${3:-} princ
  case $name in *@*) princ=$name ;; *) princ=$name@$REALM ;; esac
  if has_princ "$princ"; then
    kadmin "cpw -pw $pass $princ"
  else
    kadmin "addprinc -pw $pass $princ"
  fi
  [ -z "$maxlife" ] || kadmin "modprinc -maxlife $maxlife $princ"
  has_princ "$princ" || die "principal $princ was not created"
}

expired_ticket() { # [NAME]
  local name=${1:-carol} cc=${KRB5CCNAME:-FILE:$DIR/ccache} t1
  local svc=${KRB5_EXPIRED_SERVICE:-smtp/localhost@$REALM}
  if ! command -v faketime >/dev/null; then
    log "installing faketime"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >&2
  fi
  command -v faketime >/dev/null || die "faketime is missing after the install"
  kdc_running "$DIR" || die "the KDC of $DIR is not running (realm.sh start $DIR)"
  addprinc "$name" "$name-pass" 5s
  echo "$name-pass" | KRB5CCNAME=$cc kinit "$name@$REALM" >/dev/null 2>"$DIR/expired.err" \
    || { cat "$DIR/expired.err" >&2; die "kinit $name@$REALM failed"; }
  KRB5CCNAME=$cc kvno "$svc" >/dev/null 2>>"$DIR/expired.err" \
    || { cat "$DIR/expired.err" >&2; die "kvno $svc failed"; }
  t1=$(date +%s)
  # Both tickets end by t1 + 1 + 5 (whole seconds); the acceptor forgives SKEW more.
  log "waiting $((7 + SKEW)) s for $name's 5 s tickets to expire (clockskew $SKEW)"
  while [ "$(date +%s)" -le $((t1 + 6 + SKEW)) ]; do sleep 0.5; done
  echo "export KRB5CCNAME=$cc"
  echo "export KRB5_EXPIRED_CLIENT_TIME='@$(date -d "@$t1" '+%F %T')'"
}

start() {
  ensure_packages
  [ -n "${KDC_PORT:-}" ] || command -v python3 >/dev/null \
    || die "python3 is needed to pick a free port (or set KDC_PORT)"
  mkdir -p "$DIR" "$DIR/rcache"
  chmod 700 "$DIR"
  if [ -f "$DIR/realm.env" ]; then
    local want=$REALM
    load_env
    [ "$REALM" = "$want" ] || die "$DIR already holds realm $REALM, not $want"
  else
    PORT=${KDC_PORT:-$(free_port)}
    SKEW=${KRB5_CLOCKSKEW:-5}
    printf 'REALM=%s\nPORT=%s\nSKEW=%s\n' "$REALM" "$PORT" "$SKEW" >"$DIR/realm.env"
  fi

  cat >"$DIR/krb5.conf" <<EOF
# Written by tests/krb5/realm.sh: a loopback test realm, no DNS.
[libdefaults]
    default_realm = $REALM
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    clockskew = $SKEW
    default_ccache_name = FILE:$DIR/ccache
    default_keytab_name = FILE:$DIR/nonexistent.keytab

[realms]
    $REALM = {
        kdc = 127.0.0.1:$PORT
        admin_server = 127.0.0.1:$PORT
    }

[domain_realm]
    localhost = $REALM
    .localhost = $REALM

[logging]
    default = FILE:$DIR/krb5lib.log
EOF
  cat >"$DIR/kdc.conf" <<EOF
# Written by tests/krb5/realm.sh.
[kdcdefaults]
    kdc_listen = 127.0.0.1:$PORT
    kdc_tcp_listen = 127.0.0.1:$PORT

[realms]
    $REALM = {
        database_name = $DIR/principal
        key_stash_file = $DIR/stash
        acl_file = $DIR/kadm5.acl
        max_life = 10h 0m 0s
        max_renewable_life = 1d 0h 0m 0s
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }

[logging]
    kdc = FILE:$DIR/kdc.log
    admin_server = FILE:$DIR/kadmind.log
EOF
  : >"$DIR/kadm5.acl"
  export KRB5_CONFIG=$DIR/krb5.conf KRB5_KDC_PROFILE=$DIR/kdc.conf

  if [ ! -e "$DIR/principal" ]; then
    log "creating the $REALM database in $DIR"
    local master
    master=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    "$KRB5_SBIN/kdb5_util" -r "$REALM" create -s -P "$master" >"$DIR/kdb5_util.out" 2>&1 \
      || { cat "$DIR/kdb5_util.out" >&2; die "kdb5_util create failed"; }
  fi

  if kdc_running "$DIR"; then
    log "KDC already running (pid $(cat "$DIR/kdc.pid"))"
  else
    rm -f "$DIR/kdc.pid"
    log "starting krb5kdc on 127.0.0.1:$PORT"
    # krb5kdc forks into the background itself and writes the pid file.
    "$KRB5_SBIN/krb5kdc" -r "$REALM" -P "$DIR/kdc.pid" >>"$DIR/kdc.stdout" 2>&1 \
      || { cat "$DIR/kdc.stdout" "$DIR/kdc.log" >&2 2>/dev/null; die "krb5kdc failed to start"; }
    for _ in $(seq 1 100); do
      if kdc_running "$DIR" && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
      sleep 0.1
    done
    kdc_running "$DIR" || { cat "$DIR/kdc.log" >&2 2>/dev/null; die "krb5kdc is not running (log: $DIR/kdc.log)"; }
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || die "krb5kdc does not listen on 127.0.0.1:$PORT"
  fi

  if ! has_princ "smtp/localhost@$REALM"; then
    kadmin "addprinc -randkey smtp/localhost@$REALM"
    rm -f "$DIR/smtp.keytab"
  fi
  if [ ! -s "$DIR/smtp.keytab" ]; then
    # -norandkey: export the current key, so running start again never invalidates tickets.
    kadmin "ktadd -norandkey -k $DIR/smtp.keytab smtp/localhost@$REALM"
  fi
  [ -s "$DIR/smtp.keytab" ] || die "no keytab at $DIR/smtp.keytab"
  addprinc alice alice-pass
  addprinc bob bob-pass

  # Prove the realm works end to end before handing it out.
  local cc=FILE:$DIR/ccache.selftest
  echo alice-pass | KRB5CCNAME=$cc kinit "alice@$REALM" >/dev/null 2>"$DIR/selftest.err" \
    || { cat "$DIR/selftest.err" >&2; die "kinit alice@$REALM failed"; }
  KRB5CCNAME=$cc kvno -k "$DIR/smtp.keytab" "smtp/localhost@$REALM" >/dev/null 2>>"$DIR/selftest.err" \
    || { cat "$DIR/selftest.err" >&2; die "the smtp/localhost service ticket does not match the keytab"; }
  KRB5CCNAME=$cc kdestroy >/dev/null 2>&1 || true
  log "realm $REALM ready in $DIR (KDC 127.0.0.1:$PORT)"
  env_lines "$DIR"
}

stop() {
  local pid
  if [ -s "$DIR/kdc.pid" ]; then
    pid=$(cat "$DIR/kdc.pid")
    if kdc_running "$DIR"; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      log "KDC (pid $pid) stopped"
    fi
    rm -f "$DIR/kdc.pid"
  else
    log "no KDC pid file in $DIR"
  fi
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

cmd=${1:-}
case $cmd in
  start|stop|env|addprinc|expired-ticket) shift ;;
  ""|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
  *) cmd=start ;;
esac
[ $# -ge 1 ] || die "usage: realm.sh [start|stop|env|addprinc|expired-ticket] DIR [...]"
case $cmd in
  start)
    DIR=$(abs_dir "$1"); REALM=${2:-MAILRELAY.TEST}
    start ;;
  stop)
    [ -d "$1" ] || die "no state directory $1"
    DIR=$(cd "$1" && pwd); stop ;;
  env)
    DIR=$(cd "$1" && pwd); [ -f "$DIR/realm.env" ] || die "$DIR is not a realm.sh state directory"
    env_lines "$DIR" ;;
  addprinc)
    [ $# -ge 3 ] || die "usage: realm.sh addprinc DIR NAME PASSWORD [MAXLIFE]"
    DIR=$(cd "$1" && pwd); [ -f "$DIR/realm.env" ] || die "$DIR is not a realm.sh state directory"
    load_env
    export KRB5_CONFIG=$DIR/krb5.conf KRB5_KDC_PROFILE=$DIR/kdc.conf
    addprinc "$2" "$3" "${4:-}" ;;
  expired-ticket)
    DIR=$(cd "$1" && pwd); [ -f "$DIR/realm.env" ] || die "$DIR is not a realm.sh state directory"
    load_env
    export KRB5_CONFIG=$DIR/krb5.conf KRB5_KDC_PROFILE=$DIR/kdc.conf
    expired_ticket "${2:-}" ;;
esac
