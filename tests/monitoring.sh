#!/usr/bin/env bash
# The chart's opt-in monitoring (charts/mailrelay/templates/monitoring-*.yaml): renders it with
# monitoring enabled (PodMonitor and ServiceMonitor variants), lints it, validates the core
# objects it adds (the dashboard ConfigMap) against the Kubernetes schemas, and checks the rest
# with tests/monitoring/check_rendered.py: `promtool check rules` and `promtool test rules` on
# the PrometheusRule (every alert fires when it should and only then), the monitors, and the
# dashboard JSON. That every metric used is exported is tested in relay/tests/monitoring.rs and
# tests/tests/monitoring.rs (cargo test).
# Needs helm (tests/tools/install-k8s-tools.sh), promtool (Debian package prometheus: installed
# when missing), PyYAML and kubernetes-validate (pip).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v promtool >/dev/null; then
  echo "== installing prometheus (for promtool)"
  { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } || true
  # The package's service must not hold port 9090 on a developer machine; CI has no init.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
if ! command -v promtool >/dev/null; then
  if [ "${MAILRELAY_REQUIRE_PEERS:-}" = 1 ]; then echo "monitoring: FAILED: promtool missing" >&2; exit 1; fi
  echo "!! SKIPPED monitoring rule tests: promtool is not installed and cannot be installed" >&2
  exit 0
fi
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml
command -v kubernetes-validate >/dev/null || python3 -m pip install -q kubernetes-validate

out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
on=(--set monitoring.enabled=true)
helm lint --strict charts/mailrelay "${on[@]}" >/dev/null
helm template mail charts/mailrelay --namespace mail "${on[@]}" > "$out/pod.yaml"
helm template mail charts/mailrelay --namespace mail "${on[@]}" \
  --set monitoring.scrape.kind=ServiceMonitor --set 'monitoring.labels.release=kube-prometheus-stack' \
  --set 'monitoring.rules.additionalLabels.team=mail' \
  --set monitoring.rules.runbookBaseUrl=https://example.test/runbooks > "$out/svc.yaml"
if helm template mail charts/mailrelay "${on[@]}" --set monitoring.scrape.kind=Other >/dev/null 2>&1; then
  echo "monitoring.scrape.kind=Other must be refused" >&2; exit 1
fi
# Off by default: no monitoring object, no dependency on the Prometheus Operator CRDs.
if helm template mail charts/mailrelay | grep -q 'monitoring.coreos.com'; then
  echo "monitoring objects rendered without monitoring.enabled" >&2; exit 1
fi
grep -q '^kind: ServiceMonitor$' "$out/svc.yaml"
grep -q 'release: kube-prometheus-stack' "$out/svc.yaml"
grep -q 'team: mail' "$out/svc.yaml"
grep -q 'runbook_url: "https://example.test/runbooks#mailrelayqueuemessageold"' "$out/svc.yaml"

# kubernetes-validate has no schemas for the Prometheus Operator kinds: validate the rest.
python3 - "$out/pod.yaml" "$out/core.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
PY
kubernetes-validate --quiet -k 1.32.0 --strict "$out/core.yaml"

mkdir -p "$out/pod" "$out/svc"
python3 tests/monitoring/check_rendered.py "$out/pod.yaml" tests/monitoring/alerts.test.yaml "$out/pod"
# With extra alert labels and runbook URLs the rules must still be valid.
python3 - "$out/svc.yaml" "$out/svc/rules.yaml" <<'PY'
import sys, yaml
rule = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"][0]
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"))
PY
promtool check rules "$out/svc/rules.yaml" >/dev/null
echo "monitoring: chart renders, rules checked and unit-tested, dashboard valid"
