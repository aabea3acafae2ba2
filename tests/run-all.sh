#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh Debian machine with only Rust and Python:
# installs the real peers the tests talk to (Debian packages, the CRD API server), starts what
# must run, then runs formatting, lint and every workspace test.
#
#   tests/run-all.sh            # everything
#   SKIP_LINT=1 tests/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v swaks >/dev/null || need_pkgs+=(swaks)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v curl >/dev/null || need_pkgs+=(curl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# kubectl and helm, pinned, into a cache directory.
PATH="$(tests/tools/install-k8s-tools.sh):$PATH"
export PATH

cleanup() {
  if [ -x tests/apiserver/teardown.sh ]; then tests/apiserver/teardown.sh || true; fi
}
trap cleanup EXIT

# A real Kubernetes API server (CRD API server + etcd) for the operator tests.
if [ -x tests/apiserver/setup.sh ] && [ -z "${KUBECONFIG:-}" ]; then
  echo "== starting the test API server"
  # setup.sh prints `export KUBECONFIG=...` lines for the caller.
  eval "$(tests/apiserver/setup.sh)"
fi

if [ -z "${SKIP_LINT:-}" ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || {
    echo "!! rustfmt/clippy are not installed and cannot be added: SKIPPING the lint step" >&2
    SKIP_LINT=1
  }
fi
if [ -z "${SKIP_LINT:-}" ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast

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
