#!/usr/bin/env bash
# Builds the relay and operator images without a Docker daemon (podman, rootful or rootless, no
# service): one static release build of both binaries, then the two targets of
# deploy/image/Containerfile on a scratch base, written as OCI archives.
#
#   deploy/image/build.sh                 # host architecture, version from Cargo.toml
#   deploy/image/build.sh --version 1.2.3 --source https://github.com/OWNER/REPO
#   deploy/image/build.sh --no-cargo      # reuse target/<triple>/release/{relay,operator}
#
# Writes, for ARCH = amd64 or arm64 (the machine's own; arm64 images are built on an arm64
# machine, see .github/workflows/release.yml):
#   target/images/relay-ARCH.oci.tar, target/images/operator-ARCH.oci.tar   (OCI archives)
#   target/images/sizes-ARCH.txt                                            (measured sizes)
# and leaves the images in podman's local storage as localhost/mailrelay/{relay,operator}:VERSION-ARCH.
# The binaries stay in target/<triple>/release/ for anything else that wants the release build.
#
# Installs podman, file and ca-certificates with apt when missing (Debian/Ubuntu, as root or via sudo).
set -euo pipefail
cd "$(dirname "$0")/../.."

version=""
source_url="${IMAGE_SOURCE:-https://github.com/mailrelay/mailrelay}"
cargo_build=1
out=target/images
max_bytes=$((25 * 1000 * 1000))
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version="$2"; shift 2 ;;
    --source) source_url="$2"; shift 2 ;;
    --no-cargo) cargo_build=0; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v podman >/dev/null || need+=(podman)
command -v file >/dev/null || need+=(file)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

case "$(uname -m)" in
  x86_64) arch=amd64; triple=x86_64-unknown-linux-gnu ;;
  aarch64) arch=arm64; triple=aarch64-unknown-linux-gnu ;;
  *) echo "build.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
if [ -z "$version" ]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
fi
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Reproducible: image and file times are the commit time, not the build time.
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

bindir="target/$triple/release"
if [ "$cargo_build" = 1 ]; then
  echo "== cargo build --release ($triple, static)"
  # crt-static links glibc statically: no libc in the image. --target keeps the flag away from
  # build scripts and proc macros. DNS for delivery is hickory's own; the few host:port
  # connections (shared limit store, OAuth2 token endpoint, OTLP) use getaddrinfo, which the
  # smoke test exercises inside the image.
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$triple" \
      -p mailrelay-relay -p mailrelay-operator --bin relay --bin operator
fi
for b in relay operator; do
  [ -x "$bindir/$b" ] || { echo "build.sh: $bindir/$b missing (run without --no-cargo)" >&2; exit 1; }
  desc=$(file -b "$bindir/$b")
  case "$desc" in
    *"statically linked"*|*"static-pie linked"*) ;;
    *) echo "build.sh: $bindir/$b is not static: $desc" >&2; exit 1 ;;
  esac
  if ldd "$bindir/$b" >/dev/null 2>&1 && ! ldd "$bindir/$b" 2>&1 | grep -q 'statically linked'; then
    echo "build.sh: ldd lists shared libraries for $bindir/$b:" >&2; ldd "$bindir/$b" >&2; exit 1
  fi
done

ctx="$out/context-$arch"
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/bin"
printf 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'nonroot:x:65532:\n' > "$ctx/rootfs/etc/group"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
cp "$bindir/relay" "$bindir/operator" "$ctx/bin/"
chmod 0755 "$ctx/bin/relay" "$ctx/bin/operator"

sizes="$out/sizes-$arch.txt"
: > "$sizes"
for target in relay operator; do
  tag="localhost/mailrelay/$target:$version-$arch"
  archive="$out/$target-$arch.oci.tar"
  echo "== podman build --target $target ($tag)"
  # --no-cache: buildah reuses cached layers even when a build argument (revision) changed.
  podman build --quiet --no-cache --target "$target" --platform "linux/$arch" \
    --timestamp "$epoch" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --build-arg "SOURCE=$source_url" --build-arg "CREATED=$created" \
    -t "$tag" -f deploy/image/Containerfile "$ctx" >/dev/null
  rm -f "$archive"
  podman save --quiet --format oci-archive -o "$archive" "$tag"
  bytes=$(podman image inspect --format '{{.Size}}' "$tag")
  gz=$(tar -xOf "$archive" --wildcards 'blobs/sha256/*' | gzip -c | wc -c)
  printf '%s %s: %s bytes unpacked, %s bytes gzip-compressed layers\n' "$target" "$arch" "$bytes" "$gz" | tee -a "$sizes"
  if [ "$bytes" -ge "$max_bytes" ]; then
    echo "build.sh: $target image is $bytes bytes, over the $max_bytes byte budget" >&2
    exit 1
  fi
done
echo "images: $out/relay-$arch.oci.tar $out/operator-$arch.oci.tar (version $version, revision $revision)"
