#!/usr/bin/env bash
# Lints the Helm chart and validates everything it renders (and the plain manifests under
# deploy/) against the Kubernetes 1.32 OpenAPI schemas, strictly (unknown fields fail).
# Needs helm (tests/tools/install-k8s-tools.sh) and kubernetes-validate (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v kubernetes-validate >/dev/null || python3 -m pip install -q kubernetes-validate
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT

helm lint --strict charts/mailrelay
helm template mail charts/mailrelay --namespace mail > "$out/default.yaml"
helm template mail charts/mailrelay --namespace mail \
  --set 'relay.tlsSecrets={submission-tls,mail-example-com-tls}' \
  --set service.type=ClusterIP --set relay.replicas=3 > "$out/custom.yaml"
grep -q 'path: tls/submission-tls/tls.crt' "$out/custom.yaml"
grep -q 'externalTrafficPolicy: Local' "$out/default.yaml"
grep -q "^kind: Role$" "$out/default.yaml"  # the operator rules from deploy/rbac, namespaced

files=("$out/default.yaml" "$out/custom.yaml")
for d in deploy/rbac deploy/operator; do
  [ -d "$d" ] && while IFS= read -r f; do files+=("$f"); done < <(find "$d" -name '*.yaml' | sort)
done
kubernetes-validate --quiet -k 1.32.0 --strict "${files[@]}"
echo "chart and manifests valid"

# Opt-in monitoring (monitoring.enabled=true): monitors, PrometheusRule (promtool check and unit
# tests), dashboard ConfigMap.
tests/monitoring.sh
