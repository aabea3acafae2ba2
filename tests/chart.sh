#!/usr/bin/env bash
# Checks the Helm chart: it is self-contained (no symlinks; the copied CRDs and RBAC rules equal
# their sources), its values table is current, the schema rejects typos, `helm lint --strict`
# passes, and everything it renders with default and production-like values (and the plain
# manifests under deploy/) validates against the Kubernetes 1.32 OpenAPI schemas, strictly
# (unknown fields fail). Needs helm (tests/tools/install-k8s-tools.sh) and kubernetes-validate (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v kubernetes-validate >/dev/null || python3 -m pip install -q kubernetes-validate
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
chart=charts/mailrelay
fail() { echo "chart check failed: $*" >&2; exit 1; }

# A packaged chart cannot follow links out of its directory: copies, checked against the sources.
links=$(find "$chart" -type l)
[ -z "$links" ] || fail "symlinks in the chart: $links"
cmp -s "$chart/files/rbac-operator.yaml" deploy/rbac/operator.yaml \
  || fail "$chart/files/rbac-operator.yaml differs from deploy/rbac/operator.yaml: cp deploy/rbac/operator.yaml $chart/files/rbac-operator.yaml"
for f in crds/*.yaml; do
  cmp -s "$f" "$chart/crds/$(basename "$f")" \
    || fail "$chart/crds/$(basename "$f") differs from $f: UPDATE_CRDS=1 cargo test -p mailrelay-crds --test crd_manifests"
done
[ "$(ls "$chart/crds" | wc -l)" -eq "$(ls crds/*.yaml | wc -l)" ] || fail "$chart/crds has other files than crds/"
python3 tests/tools/chart-values-table.py --check

helm lint --strict "$chart"
helm lint --strict "$chart" -f "$chart/ci/production-values.yaml"

# The schema turns typos into errors instead of silently ignored values.
for bad in relay.replica=3 service.tpye=NodePort relay.listenPortOffset=-1 service.type=Nodeport \
           image.relay.digest=latest operator.pdb.enabled=yes; do
  if helm template mail "$chart" --set "$bad" >/dev/null 2>"$out/err"; then
    fail "--set $bad rendered; the schema must reject it"
  fi
  grep -qi "schema" "$out/err" || fail "--set $bad failed for another reason: $(cat "$out/err")"
done

helm template mail "$chart" --namespace mail > "$out/default.yaml"
helm template mail "$chart" --namespace mail -f "$chart/ci/production-values.yaml" > "$out/production.yaml"
helm template mail "$chart" --namespace mail --set service.type=ClusterIP --set relay.replicas=1 \
  --set relay.pdb.enabled=false --set operator.metricsService.enabled=false > "$out/small.yaml"

d=$out/default.yaml p=$out/production.yaml
grep -q "^kind: Role$" "$d" || fail "no namespaced Role"   # the operator rules from deploy/rbac
! grep -q "NET_BIND_SERVICE" "$d" "$p" || fail "the relay must not need NET_BIND_SERVICE"
grep -q "runAsUser: 65532" "$d" || fail "the images run as 65532"
grep -q "listenPortOffset: 10000" "$d" || fail "runtime.yaml has no listenPortOffset"
grep -q "clusterIP: None" "$d" || fail "no headless governing Service"
grep -q "serviceName: mail-relay-headless" "$d" || fail "the StatefulSet is not governed by the headless Service"
grep -q "startupProbe:" "$d" || fail "no startupProbe"
grep -q "path: /readyz" "$d" || fail "no readiness probe"
grep -q "secretName: mail-tls" "$d" || fail "the relay does not mount the operator's TLS bundle"
[ "$(grep -c "optional: true" "$d")" -eq 3 ] || fail "policy, credentials and TLS bundle must be optional volumes"
# The SMTP Service is the operator's; the chart only hands it the settings.
! grep -q "^  name: mail-relay$" <(awk '/^kind: Service$/{s=1} /^---/{s=0} s' "$d") \
  || fail "the chart must not create the relay Service (the operator owns its ports)"
grep -q "relay-service-config=/etc/mailrelay-operator/relay-service.yaml" "$d" || fail "operator gets no Service settings"
grep -q "image: registry.example.com/mailrelay/relay@sha256:0000000000000000000000000000000000000000000000000000000000000001" "$p" \
  || fail "digest pinning"
grep -q "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol" "$p" || fail "PROXY protocol annotation"
grep -q "trustedProxiesGroup: mail-load-balancers" "$p" || fail "PROXY protocol group for the operator"
grep -q "^kind: IpAddressGroup$" "$p" || fail "no load balancer IpAddressGroup"
grep -q "loadBalancerClass: service.k8s.aws/nlb" "$p" || fail "loadBalancerClass"

files=("$out/default.yaml" "$out/production.yaml" "$out/small.yaml")
for dir in deploy/rbac deploy/operator; do
  [ -d "$dir" ] && while IFS= read -r f; do files+=("$f"); done < <(find "$dir" -name '*.yaml' | sort)
done
# The chart's own IpAddressGroup has no schema here (a warning); the install test applies it to
# an API server with the CRDs.
kubernetes-validate --quiet -k 1.32.0 --strict "${files[@]}"
echo "chart and manifests valid"
