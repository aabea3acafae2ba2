#!/usr/bin/env bash
# Checks the Helm chart: it is self-contained (no symlinks; the copied CRDs and RBAC rules equal
# their sources), its values table is current, the schema rejects typos, `helm lint --strict`
# passes, and everything it renders with default and production-like values (and the plain
# manifests under deploy/) validates against the Kubernetes 1.32 OpenAPI schemas, strictly
# (unknown fields fail); the scale-down pieces agree (the operator's spools.yaml names the
# relay's own StatefulSet, image, spool and hand-off port; shutdownGraceSeconds is derived from
# the pod's grace period; values that cannot agree fail the render). Needs helm
# (tests/tools/install-k8s-tools.sh) and kubernetes-validate (pip).
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
[ "$(grep -c "optional: true" "$d")" -eq 4 ] || fail "policy, credentials, TLS bundle and hand-off Secret must be optional volumes"
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

# Scale-down and hand-off: the operator's spools.yaml names the relay's own StatefulSet, PVC
# template, image, spool directory and hand-off port; the relay listens for the hand-off and
# mounts its Secret; the shutdown grace is derived from the pod's termination grace period.
helm template mail "$chart" --namespace mail --set relay.terminationGracePeriodSeconds=120 \
  --set relay.handoff.port=11024 --set relay.runtime.listenAddress=:: \
  --set relay.scaleDown.pvcRetention=Retain > "$out/custom.yaml"
helm template mail "$chart" --namespace mail --set relay.terminationGracePeriodSeconds=10 \
  --set relay.runtime.delivery.shutdownGraceSeconds=5 > "$out/explicit.yaml"
python3 - "$d" "$p" "$out/custom.yaml" "$out/explicit.yaml" <<'PY' || fail "scale-down settings (see above)"
import posixpath, sys, yaml

def load(path):
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(open(path)) if o}

def check(cond, msg):
    if not cond:
        print(f"chart check failed: {msg}", file=sys.stderr)
        sys.exit(1)

def rendered(path, port, grace, listen, retention):
    objs = load(path)
    sts = objs[("StatefulSet", "mail-relay")]
    pod = sts["spec"]["template"]["spec"]
    relay = pod["containers"][0]
    where = f"{path.rsplit('/', 1)[-1]}:"
    # The operator reads spools.yaml from the file its argument names, in its mounted ConfigMap.
    op = objs[("Deployment", "mail-operator")]["spec"]["template"]["spec"]
    args = op["containers"][0]["args"]
    arg = [a for a in args if a.startswith("--spools-config=")]
    check(arg == ["--spools-config=/etc/mailrelay-operator/spools.yaml"], f"{where} operator args {args}")
    mount = [m for m in op["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/mailrelay-operator"]
    vol = [v for v in op["volumes"] if v["name"] == mount[0]["name"]][0]
    cm = objs[("ConfigMap", vol["configMap"]["name"])]
    check("spools.yaml" in cm["data"], f"{where} no spools.yaml in {cm['metadata']['name']}")
    spools = yaml.safe_load(cm["data"]["spools.yaml"])
    keys = {"statefulSet", "volumeClaimTemplate", "pvcRetention", "checkSeconds", "retry",
            "handoffSecret", "relayMetricsPort", "drainJob"}
    check(set(spools) == keys, f"{where} spools.yaml keys {sorted(spools)}")
    check(spools["statefulSet"] == sts["metadata"]["name"], f"{where} statefulSet {spools['statefulSet']}")
    check([t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == [spools["volumeClaimTemplate"]],
          f"{where} volumeClaimTemplate {spools['volumeClaimTemplate']}")
    check(spools["pvcRetention"] == retention, f"{where} pvcRetention {spools['pvcRetention']}")
    check(spools["handoffSecret"] == "mail-handoff", f"{where} handoffSecret {spools['handoffSecret']}")
    check(spools["relayMetricsPort"] == relay["ports"][0]["containerPort"], f"{where} relayMetricsPort")
    job = spools["drainJob"]
    check(job["image"] == relay["image"], f"{where} drain image {job['image']} != relay image {relay['image']}")
    check(job["imagePullPolicy"] == relay["imagePullPolicy"], f"{where} drain pull policy")
    check(job["imagePullSecrets"] == pod.get("imagePullSecrets", []), f"{where} drain pull secrets")
    check(job["target"] == f"mail-relay-headless:{port}", f"{where} drain target {job['target']}")
    check(job["podSecurityContext"] == pod["securityContext"], f"{where} drain podSecurityContext")
    check(job["securityContext"] == relay["securityContext"], f"{where} drain securityContext")
    check(job["tolerations"] == pod.get("tolerations", []), f"{where} drain tolerations")
    check(job["nodeSelector"] == pod.get("nodeSelector", {}), f"{where} drain nodeSelector")
    spool = [m for m in relay["volumeMounts"] if m["name"] == "spool"][0]["mountPath"]
    check(job["spoolDir"] == spool, f"{where} drain spoolDir {job['spoolDir']} != {spool}")
    check(job["activeDeadlineSeconds"] > 0 and job["resources"].get("requests"), f"{where} drain Job limits")
    # The target resolves to the pods' hand-off port through the headless Service.
    headless = objs[("Service", "mail-relay-headless")]
    check(sts["spec"]["serviceName"] == "mail-relay-headless", f"{where} serviceName")
    check({"name": "handoff", "port": port, "targetPort": "handoff"} in headless["spec"]["ports"],
          f"{where} headless ports {headless['spec']['ports']}")
    check({"name": "handoff", "containerPort": port} in relay["ports"], f"{where} relay ports {relay['ports']}")
    check({"name": "handoff", "mountPath": "/etc/mailrelay/handoff", "readOnly": True} in relay["volumeMounts"],
          f"{where} hand-off mount")
    check({"name": "handoff", "secret": {"secretName": "mail-handoff", "optional": True}} in pod["volumes"],
          f"{where} hand-off volume")
    check(sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"},
          f"{where} PVC retention")
    runtime = yaml.safe_load(objs[("ConfigMap", "mail-runtime")]["data"]["runtime.yaml"])
    handoff = runtime["handoff"]
    check(set(handoff) == {"listenAddress", "tlsDir"} and handoff["listenAddress"] == listen,
          f"{where} runtime handoff {handoff}")
    # Relative paths in runtime.yaml resolve against the config directory.
    config = [m for m in relay["volumeMounts"] if m["name"] == "config"][0]["mountPath"]
    check(posixpath.normpath(posixpath.join(config, handoff["tlsDir"])) == "/etc/mailrelay/handoff",
          f"{where} handoff tlsDir {handoff['tlsDir']} is not the Secret's mount")
    tgps = pod["terminationGracePeriodSeconds"]
    check(runtime["delivery"]["shutdownGraceSeconds"] == grace, f"{where} shutdownGraceSeconds "
          f"{runtime['delivery'].get('shutdownGraceSeconds')}, want {grace} (terminationGracePeriodSeconds {tgps})")
    check(runtime["delivery"]["adminEndpoint"] is True, f"{where} delivery settings lost")
    # The Role holds what spool adoption needs.
    rules = objs[("Role", "mail-operator")]["rules"]
    def allowed(group, resource, verb):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)
    for group, resource, verbs in [("apps", "statefulsets", "get list watch"),
                                   ("", "persistentvolumeclaims", "get list watch patch delete"),
                                   ("batch", "jobs", "get list watch create delete"),
                                   ("", "pods", "get list watch"), ("", "secrets", "get create")]:
        for v in verbs.split():
            check(allowed(group, resource, v), f"{where} the Role does not allow {v} {resource}")
    return spools

d, p, custom, explicit = sys.argv[1:5]
rendered(d, 10024, 50, "0.0.0.0:10024", "DeleteAfterDrain")
prod = rendered(p, 10024, 50, "0.0.0.0:10024", "DeleteAfterDrain")
check(prod["drainJob"]["image"].startswith("registry.example.com/mailrelay/relay@sha256:"), "production drain image")
check(prod["drainJob"]["tolerations"] and prod["drainJob"]["nodeSelector"], "production drain placement")
rendered(custom, 11024, 110, "[::]:11024", "Retain")
rendered(explicit, 10024, 5, "0.0.0.0:10024", "DeleteAfterDrain")
print("scale-down settings consistent")
PY
# MTA-STS policy host (relay.mtaStsPolicy): off by default; on, runtime.yaml gets its listener on
# runtime.listenAddress and the chosen port, the relay container the port `mta-sts`, and the
# operator's Service settings that port to publish as 443.
helm template mail "$chart" --namespace mail --set relay.mtaStsPolicy.enabled=true \
  --set relay.mtaStsPolicy.port=9443 --set relay.runtime.listenAddress=:: > "$out/mta-sts.yaml"
python3 - "$d" "$out/mta-sts.yaml" <<'PY' || fail "MTA-STS policy host settings (see above)"
import sys, yaml

def parts(path):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(open(path)) if o}
    runtime = yaml.safe_load(objs[("ConfigMap", "mail-runtime")]["data"]["runtime.yaml"])
    relay = objs[("StatefulSet", "mail-relay")]["spec"]["template"]["spec"]["containers"][0]
    service = yaml.safe_load(objs[("ConfigMap", "mail-operator")]["data"]["relay-service.yaml"])
    return runtime, relay["ports"], service

def check(cond, msg):
    if not cond:
        print(f"chart check failed: {msg}", file=sys.stderr)
        sys.exit(1)

runtime, ports, service = parts(sys.argv[1])
check("mtaStsPolicy" not in runtime, f"default runtime.yaml has mtaStsPolicy: {runtime.get('mtaStsPolicy')}")
check(all(p["name"] != "mta-sts" for p in ports), f"default relay ports {ports}")
check("mtaStsPolicyPort" not in service, f"default relay-service.yaml {service}")
runtime, ports, service = parts(sys.argv[2])
check(runtime.get("mtaStsPolicy") == {"listenAddress": "[::]:9443"}, f"runtime mtaStsPolicy {runtime.get('mtaStsPolicy')}")
check({"name": "mta-sts", "containerPort": 9443} in ports, f"relay ports {ports}")
check(service.get("mtaStsPolicyPort") == 9443, f"relay-service.yaml {service}")
print("MTA-STS policy host settings consistent")
PY

# Grace periods that cannot agree fail the render, with a message naming the values.
for bad in relay.terminationGracePeriodSeconds=14 \
           relay.terminationGracePeriodSeconds=30,relay.runtime.delivery.shutdownGraceSeconds=26 \
           relay.pdb.maxUnavailable=0 relay.scaleDown.retry.maxSeconds=10 \
           relay.mtaStsPolicy.port=9090,relay.mtaStsPolicy.enabled=true; do
  if helm template mail "$chart" --set "$bad" >/dev/null 2>"$out/err"; then
    fail "--set $bad rendered; the chart must refuse it"
  fi
  grep -q "${bad%%=*}" "$out/err" || fail "--set $bad failed without naming the value: $(cat "$out/err")"
done
for bad in relay.scaleDown.pvcRetention=Delete relay.handoff.port=0 relay.scaleDown.drainJob.deadline=1 \
           relay.mtaStsPolicy.port=0 relay.mtaStsPolicy.enabled=yes relay.mtaStsPolicy.https=true; do
  if helm template mail "$chart" --set "$bad" >/dev/null 2>"$out/err"; then
    fail "--set $bad rendered; the schema must reject it"
  fi
  grep -qi "schema" "$out/err" || fail "--set $bad failed for another reason: $(cat "$out/err")"
done

files=("$out/default.yaml" "$out/production.yaml" "$out/small.yaml" "$out/custom.yaml" "$out/mta-sts.yaml")
for dir in deploy/rbac deploy/operator; do
  [ -d "$dir" ] && while IFS= read -r f; do files+=("$f"); done < <(find "$dir" -name '*.yaml' | sort)
done
# The chart's own IpAddressGroup has no schema here (a warning); the install test applies it to
# an API server with the CRDs.
kubernetes-validate --quiet -k 1.32.0 --strict "${files[@]}"
echo "chart and manifests valid"

# Opt-in monitoring (monitoring.enabled=true): monitors, PrometheusRule (promtool check and unit
# tests), dashboard ConfigMap.
tests/monitoring.sh
