#!/usr/bin/env bash
# Packages `kubectl mailrelay` for krew: a static release build of the kubectl-mailrelay binary
# for this machine's architecture, its archive under the manifest's naming scheme, and the krew
# manifest (deploy/krew/mailrelay.yaml) with the release's version and the sha256 of every
# archive present in target/krew/ (build on amd64 and arm64, copy both archives there, run once
# more with --no-cargo to get a manifest with both sums).
#
#   deploy/krew/package.sh [--version 1.2.3] [--no-cargo] [--bin-dir DIR]
#
# Writes target/krew/kubectl-mailrelay_v<version>_linux_<arch>.tar.gz and target/krew/mailrelay.yaml.
# Install from them without an index:
#   kubectl krew install --manifest=target/krew/mailrelay.yaml \
#     --archive=target/krew/kubectl-mailrelay_v<version>_linux_<arch>.tar.gz
set -euo pipefail
cd "$(dirname "$0")/../.."

version="" cargo_build=1 bin_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --no-cargo) cargo_build=0; shift ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$(uname -m)" in
  x86_64) arch=amd64; triple=x86_64-unknown-linux-gnu ;;
  aarch64) arch=arm64; triple=aarch64-unknown-linux-gnu ;;
  *) echo "package.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
if [ -z "$version" ]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
fi
bin_dir=${bin_dir:-target/$triple/release}
if [ "$cargo_build" = 1 ]; then
  # Static like the images (deploy/image/build.sh): runs on any Linux kubectl runs on.
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$triple" -p mailrelay-operator --bin kubectl-mailrelay
fi
[ -x "$bin_dir/kubectl-mailrelay" ] || { echo "package.sh: no $bin_dir/kubectl-mailrelay" >&2; exit 1; }

out=target/krew
mkdir -p "$out"
archive="$out/kubectl-mailrelay_v${version}_linux_${arch}.tar.gz"
# Reproducible: fixed owner, order and time (the commit's), no gzip timestamp.
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
  -C "$bin_dir" -cf - kubectl-mailrelay | gzip -n -9 > "$archive"
echo "$archive"

python3 - "$version" "$out" <<'PY'
import hashlib, os, re, sys
version, out = sys.argv[1], sys.argv[2]
text = open("deploy/krew/mailrelay.yaml").read()
text = re.sub(r"(?m)^  version: v\S+$", f"  version: v{version}", text)
text = re.sub(r"(?m)^(\s+uri: \S+/download/)v[^/]+/kubectl-mailrelay_v[^_]+_", rf"\g<1>v{version}/kubectl-mailrelay_v{version}_", text)
lines, filled = text.split("\n"), []
for i, line in enumerate(lines):
    m = re.search(r"uri: \S+/(kubectl-mailrelay_v\S+\.tar\.gz)$", line)
    if not m:
        continue
    path = os.path.join(out, m.group(1))
    if os.path.exists(path):
        s = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert lines[i + 1].strip().startswith("sha256:"), "sha256 must follow uri"
        lines[i + 1] = re.sub(r'sha256: "\w+"', f'sha256: "{s}"', lines[i + 1])
        filled.append(m.group(1))
open(os.path.join(out, "mailrelay.yaml"), "w").write("\n".join(lines))
print(f"{out}/mailrelay.yaml: version v{version}, sha256 of {', '.join(filled)}")
missing = text.count("uri: ") - len(filled)
if missing:
    print(f"  ({missing} platform(s) still carry the placeholder sha256: their archive is not in {out})")
PY
