#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh Debian machine with only Rust and Python:
# installs the real peers the tests talk to (Debian packages, kubectl and helm, the kube-lite API
# server), starts what must run, then runs formatting, lint and every workspace test.
#
#   tests/run-all.sh            # everything
#   SKIP_LINT=1 tests/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# One clean build per run: incremental caches would only add gigabytes of disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v swaks >/dev/null || need_pkgs+=(swaks)
# swaks's --tls/--tlsc need Perl's TLS modules, which are only swaks's Recommends.
perl -MIO::Socket::SSL -MNet::SSLeay -e 1 2>/dev/null || need_pkgs+=(libio-socket-ssl-perl libnet-ssleay-perl)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v curl >/dev/null || need_pkgs+=(curl)
# NTLM's second real client (swaks --auth NTLM).
perl -MAuthen::NTLM -e 1 2>/dev/null || need_pkgs+=(libauthen-ntlm-perl)
# Kerberos: a throwaway MIT realm (tests/krb5/realm.sh), a client clock for expired tickets, and
# what the relay's `gssapi` feature builds against (libgssapi_krb5 headers, bindgen's libclang).
[ -x /usr/sbin/krb5kdc ] || need_pkgs+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || need_pkgs+=(krb5-admin-server)
command -v kinit >/dev/null || need_pkgs+=(krb5-user)
command -v faketime >/dev/null || need_pkgs+=(faketime)
# DKIM's independent verifier (relay/tests/dkim_verify.py): dkimpy and dnspython, as Debian
# installs them for the system Python.
/usr/bin/python3 -c 'import dkim, dns.query' 2>/dev/null || need_pkgs+=(python3-dkim python3-dnspython)
# DANE's DNSSEC peer (relay/tests/common/dnssec.rs): an authoritative BIND with signed test zones
# and a validating BIND resolver; dig to check them by hand.
[ -x /usr/sbin/named ] || need_pkgs+=(bind9)
command -v dnssec-signzone >/dev/null || need_pkgs+=(bind9-utils)
command -v dig >/dev/null || need_pkgs+=(bind9-dnsutils)
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
pkg-config --exists krb5-gssapi 2>/dev/null || need_pkgs+=(libkrb5-dev)
ls /usr/lib/llvm-14/lib/libclang*.so* >/dev/null 2>&1 || need_pkgs+=(libclang1-14)
ls /usr/lib/llvm-14/lib/clang/*/include/stddef.h >/dev/null 2>&1 || need_pkgs+=(libclang-common-14-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# NTLM's Windows-like client (relay/tests/ntlm_client.py).
python3 -c 'import spnego' 2>/dev/null || python3 -m pip install -q pyspnego

# kubectl and helm, pinned, into a cache directory.
PATH="$(tests/tools/install-k8s-tools.sh):$PATH"
export PATH

# A real Kubernetes API server with the core API (kube-lite + etcd) for the operator, chart and
# install tests. Built once into $KUBE_LITE_DIR (cold: a few minutes; then instant).
export KUBE_LITE_DIR=${KUBE_LITE_DIR:-$HOME/.cache/kube-lite}
cleanup() {
  tests/kube-lite/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ -z "${KUBECONFIG:-}" ]; then
  echo "== building and starting the test API server (kube-lite)"
  start=$SECONDS
  tests/kube-lite/install.sh >&2
  echo "   kube-lite build: $((SECONDS - start)) s"
  # up.sh prints `export KUBECONFIG=...`.
  eval "$(tests/kube-lite/up.sh)"
fi
# The peers above exist here: tests that would skip without one must fail instead.
export MAILRELAY_REQUIRE_PEERS=${MAILRELAY_REQUIRE_PEERS:-1}

if [ -z "${SKIP_LINT:-}" ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || {
    echo "!! rustfmt/clippy are not installed and cannot be added: SKIPPING the lint step" >&2
    SKIP_LINT=1
  }
fi
# The fuzz workspace keeps its own lock in step with the root one (same versions for shared
# dependencies); say so now rather than after the whole test run.
if ! cargo metadata --manifest-path relay/fuzz/Cargo.toml --locked --format-version 1 >/dev/null; then
  echo "!! relay/fuzz/Cargo.lock is out of step with Cargo.lock. Fix:" >&2
  echo "   cp Cargo.lock relay/fuzz/Cargo.lock && cargo metadata --manifest-path relay/fuzz/Cargo.toml --format-version 1 >/dev/null" >&2
  exit 1
fi

if [ -z "${SKIP_LINT:-}" ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
  echo "== cargo doc (broken intra-doc links fail)"
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
fi

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast

# Kerberos needs the system's libgssapi_krb5, so it is a cargo feature of the relay (the static
# release images cannot link it): lint it and run its tests against a real KDC here.
echo "== relay with the gssapi feature (Kerberos)"
if [ -z "${SKIP_LINT:-}" ]; then
  cargo clippy -p mailrelay-relay --features gssapi --all-targets --locked -- -D warnings
fi
cargo test -p mailrelay-relay --features gssapi --locked --lib --test gssapi

echo "== memory per idle session (relay/tests/rss_idle.sh)"
relay/tests/rss_idle.sh

# ---- fuzz targets: replay corpora -------------------------------------------------------
# relay/fuzz is a workspace of its own (AFL builds); fuzzing for minutes is not CI's job, but
# every committed corpus file and crash regression is replayed through the targets so they
# keep building and keep holding. It uses the root target directory, whose dependencies the
# tests above already built with the same features, so little is compiled here.
echo "== fuzz targets: replay corpora"
fuzz_started=$SECONDS
if [ -z "${SKIP_LINT:-}" ]; then
  cargo fmt --manifest-path relay/fuzz/Cargo.toml -- --check
  CARGO_TARGET_DIR="$PWD/target" cargo clippy --manifest-path relay/fuzz/Cargo.toml --all-targets --locked -- -D warnings
fi
CARGO_TARGET_DIR="$PWD/target" cargo test --manifest-path relay/fuzz/Cargo.toml --locked
echo "== fuzz targets: replay corpora took $((SECONDS - fuzz_started)) s"
# ---- end of fuzz targets ------------------------------------------------------------------

echo "== Helm chart and manifests"
tests/chart.sh

# ---- Images (deploy/image) -------------------------------------------------------------------
# One static release build of relay and operator (target/<triple>/release/), both images as OCI
# archives (target/images/), then the container smoke test with podman + runc. The release
# workflow (.github/workflows/release.yml) runs the same two scripts; its YAML is checked here.
images_started=$(date +%s)
echo "== images: deploy/image/build.sh"
deploy/image/build.sh
echo "== images: tests/image-smoke.sh"
tests/image-smoke.sh
python3 - <<'PY'
import yaml
w = yaml.safe_load(open(".github/workflows/release.yml"))
runs = "\n".join(s.get("run", "") for j in w["jobs"].values() for s in j["steps"])
for needed in ("deploy/image/build.sh", "tests/image-smoke.sh", "cosign sign", "helm push"):
    assert needed in runs, f"release.yml does not run {needed}"
print("release workflow: YAML parses, uses the same build and smoke-test scripts")
PY
echo "images: $(( $(date +%s) - images_started )) s"
