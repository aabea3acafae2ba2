#!/usr/bin/env python3
"""Checks the monitoring objects of a rendered chart (`helm template ... --set monitoring.enabled=true`).

    check_rendered.py RENDERED.yaml TESTS.yaml WORKDIR

- PrometheusRule: its spec is written to WORKDIR/rules.yaml and checked with `promtool check rules`;
  TESTS.yaml (promtool unit tests without annotations) is completed with each expected alert's
  annotations, taken from the rule with `{{ $labels.x }}` filled from the expected labels, and run
  with `promtool test rules`. Fails when an alert has no case where it fires or none where it
  stays silent.
- PodMonitor/ServiceMonitor: one for the relay and one for the operator, on port "metrics".
- Dashboard ConfigMap: carries the Grafana sidecar label, its JSON parses, every panel has a
  query, and every query uses the dashboard's datasource variable.
"""
import json
import re
import subprocess
import sys

import yaml

LABEL_REF = re.compile(r"\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def fail(msg):
    print(f"monitoring check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def fill(template, labels, where):
    def sub(m):
        name = m.group(1)
        if name not in labels:
            fail(f"{where}: annotation uses $labels.{name}, which the alert does not carry")
        return str(labels[name])

    out = LABEL_REF.sub(sub, template)
    if "{{" in out:
        fail(f"{where}: annotation uses templating other than $labels.x: {template!r}")
    return out


def check_rules(rule_obj, tests_path, workdir):
    spec = rule_obj["spec"]
    rules_path = f"{workdir}/rules.yaml"
    with open(rules_path, "w") as f:
        yaml.safe_dump({"groups": spec["groups"]}, f, sort_keys=False)
    subprocess.run(["promtool", "check", "rules", rules_path], check=True)

    alerts = {}
    for g in spec["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                for key in ("summary", "description", "runbook"):
                    if not r.get("annotations", {}).get(key):
                        fail(f"alert {r['alert']} has no {key} annotation")
                alerts[r["alert"]] = r

    with open(tests_path) as f:
        tests = yaml.safe_load(f)
    fires, silent = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            name = case["alertname"]
            if name not in alerts:
                fail(f"test case for unknown alert {name}")
            exp = case.get("exp_alerts") or []
            (fires if exp else silent).add(name)
            for a in exp:
                labels = dict(a.get("exp_labels", {}))
                labels.setdefault("alertname", name)
                a["exp_annotations"] = {
                    k: fill(v, labels, f"{name} at {case['eval_time']}")
                    for k, v in alerts[name].get("annotations", {}).items()
                }
    missing = [f"{n}: no case where it fires" for n in alerts if n not in fires]
    missing += [f"{n}: no case where it stays silent" for n in alerts if n not in silent]
    if missing:
        fail("alerts without unit tests:\n  " + "\n  ".join(missing))
    tests["rule_files"] = ["rules.yaml"]
    test_path = f"{workdir}/alerts.test.yaml"
    with open(test_path, "w") as f:
        yaml.safe_dump(tests, f, sort_keys=False)
    subprocess.run(["promtool", "test", "rules", test_path], check=True)
    print(f"{len(alerts)} alerts: promtool check and unit tests passed")


def check_monitors(objs):
    monitors = [o for o in objs if o["kind"] in ("PodMonitor", "ServiceMonitor")]
    components = sorted(
        o["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") for o in monitors
    )
    if components != ["operator", "relay"]:
        fail(f"expected one monitor each for relay and operator, got {components}")
    for o in monitors:
        eps = o["spec"].get("podMetricsEndpoints") or o["spec"].get("endpoints") or []
        if [e.get("port") for e in eps] != ["metrics"]:
            fail(f"{o['kind']}/{o['metadata']['name']}: endpoints must scrape port 'metrics'")


def check_dashboard(objs):
    cms = [
        o for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    if len(cms) != 1:
        fail(f"expected one ConfigMap labelled grafana_dashboard=1, got {len(cms)}")
    data = cms[0]["data"]
    for key, text in data.items():
        try:
            dash = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"dashboard {key} is not valid JSON: {e}")
        panels = []
        for p in dash.get("panels", []):
            panels.append(p)
            panels.extend(p.get("panels", []))
        queries = 0
        for p in panels:
            if p.get("type") == "row":
                continue
            targets = p.get("targets") or []
            if not targets or not all(t.get("expr") for t in targets):
                fail(f"dashboard {key}: panel {p.get('title')!r} has no query")
            for t in targets:
                ds = t.get("datasource") or p.get("datasource") or {}
                if ds.get("uid") != "${datasource}":
                    fail(f"dashboard {key}: panel {p.get('title')!r} does not use the $datasource variable")
                queries += 1
        print(f"dashboard {key}: {len(panels)} panels, {queries} queries, valid JSON")


def main():
    rendered, tests_path, workdir = sys.argv[1:4]
    with open(rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        fail(f"expected one PrometheusRule, got {len(rules)}")
    check_monitors(objs)
    check_dashboard(objs)
    check_rules(rules[0], tests_path, workdir)


if __name__ == "__main__":
    main()
