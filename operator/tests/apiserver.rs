//! The operator against a real Kubernetes API server (`KUBECONFIG`; see operator/README.md):
//! CRDs and example policy applied with kubectl, the operator binary running as a process,
//! assertions on status, conditions, Events and the written policy. The test server does not
//! serve the core API, so the operator runs with `--secrets-dir`/`--output-dir` (Secrets from
//! files, ConfigMap/Secret written as files); everything on the mailrelay CRs, the Lease and the
//! Events goes through the API server. Core-object writes are covered in `mock_core_api.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn start(ns: &str, d: &Dirs, identity: &str) -> Operator {
    Operator::start(OperatorOpts {
        ns,
        secrets: &d.secrets,
        out: &d.out,
        identity,
        log: &d.root.join(format!("{identity}.log")),
        lease_seconds: 4,
    })
}

#[test]
fn policy_lifecycle_statuses_events_and_config() {
    let Some(_) = server() else { return };
    install_crds();
    let ns = namespace("life");
    let d = dirs();
    let (crs, secrets) = example(&ns);
    let files = write_secrets(&d.secrets, &secrets);
    // The smarthost credentials are missing at first and appear later.
    let smarthost = files
        .iter()
        .find(|f| f.to_string_lossy().contains("partner-smarthost-auth"))
        .expect("smarthost secret")
        .clone();
    let smarthost_yaml = std::fs::read_to_string(&smarthost).expect("read");
    std::fs::remove_file(&smarthost).expect("rm");
    let (ok, out) = apply_yaml(&crs);
    assert!(ok, "{out}");
    let op = start(&ns, &d, "life");

    // Missing reference: the rule is Invalid and left out; everything else is applied.
    let rule = wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Invalid",
        "True",
        None,
    );
    let msg = condition(&rule, "Invalid").expect("invalid")["message"].to_string();
    assert!(msg.contains("partner-smarthost-auth"), "{msg}");
    wait_condition(
        "deliveryrule",
        &ns,
        "direct-mx",
        "Ready",
        "True",
        Some("Compiled"),
    );
    let g = wait_condition(
        "ipaddressgroup",
        &ns,
        "limits-exempt",
        "Ready",
        "True",
        None,
    );
    assert_eq!(g["status"]["resolvedPrefixes"], 8, "{g}");
    let svc = wait_condition(
        "smtpservice",
        &ns,
        "submission",
        "Warning",
        "True",
        Some("CertManagerMissing"),
    );
    let hash = wait_for("policy written", Duration::from_secs(30), || op.hash(&ns));
    assert_eq!(svc["status"]["configHash"], hash.as_str());
    assert!(!op.relay_yaml(&ns).contains("partner-smarthost"));
    assert!(op.relay_yaml(&ns).contains("direct-mx"));
    wait_for("Warning events", Duration::from_secs(30), || {
        let ev = events(&ns);
        (ev.contains(&("CertManagerMissing".into(), "submission".into()))
            && ev.iter().any(|(_, o)| o == "partner-smarthost"))
        .then_some(())
    });

    // The Secret appears: the rule becomes Ready and enters the config.
    std::fs::write(&smarthost, smarthost_yaml).expect("write");
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Ready",
        "True",
        None,
    );
    wait_for("rule in config", Duration::from_secs(30), || {
        op.relay_yaml(&ns)
            .contains("partner-smarthost")
            .then_some(())
    });
    let dr = wait_no_condition("deliveryrule", &ns, "partner-smarthost", "Invalid");
    assert!(dr["status"]["configHash"].is_string());

    // Break: an include cycle. Both groups are Invalid; the rest of the policy stays applied.
    let cycle = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {{name: loop-a, namespace: {ns}}}\nspec: {{includes: [loop-b]}}\n---\napiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {{name: loop-b, namespace: {ns}}}\nspec: {{includes: [loop-a]}}\n"
    );
    let (ok, out) = apply_yaml(&cycle);
    assert!(ok, "{out}");
    wait_condition(
        "ipaddressgroup",
        &ns,
        "loop-a",
        "Invalid",
        "True",
        Some("IncludeCycle"),
    );
    wait_condition(
        "ipaddressgroup",
        &ns,
        "loop-b",
        "Invalid",
        "True",
        Some("IncludeCycle"),
    );
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Ready",
        "True",
        None,
    );
    assert!(op.relay_yaml(&ns).contains("partner-smarthost"));
    assert!(!op.relay_yaml(&ns).contains("loop-a"));
    // Fix it.
    let fixed = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {{name: loop-b, namespace: {ns}}}\nspec: {{addresses: [198.51.100.0/24]}}\n"
    );
    assert!(apply_yaml(&fixed).0);
    let a = wait_condition("ipaddressgroup", &ns, "loop-a", "Ready", "True", None);
    assert_eq!(a["status"]["resolvedPrefixes"], 1);
    wait_no_condition("ipaddressgroup", &ns, "loop-a", "Invalid");

    // An open relay compiles, with a Warning.
    let open = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {{name: open, namespace: {ns}}}\nspec: {{port: 2525, protocol: Smtp, relayControl: {{open: true}}}}\n"
    );
    assert!(apply_yaml(&open).0);
    wait_condition(
        "smtpservice",
        &ns,
        "open",
        "Warning",
        "True",
        Some("OpenRelay"),
    );
    wait_for("OpenRelay event", Duration::from_secs(30), || {
        events(&ns)
            .contains(&("OpenRelay".into(), "open".into()))
            .then_some(())
    });

    // A change: observedGeneration and config follow.
    let mut changed = crs.clone();
    changed = changed.replace("priority: 1000", "priority: 999");
    assert!(apply_yaml(&changed).0);
    let r = wait_condition("deliveryrule", &ns, "direct-mx", "Ready", "True", None);
    assert_eq!(r["status"]["observedGeneration"], 2);
    wait_for("new priority in config", Duration::from_secs(30), || {
        op.relay_yaml(&ns).contains("priority: 999").then_some(())
    });

    // Delete: the rule disappears from the compiled config.
    kubectl_ok(&["delete", "deliveryrule", "partner-smarthost", "-n", &ns]);
    wait_for("rule gone from config", Duration::from_secs(30), || {
        (!op.relay_yaml(&ns).contains("partner-smarthost")).then_some(())
    });

    // Bad input in a Secret the schema cannot see: a malformed password hash.
    let accounts = files
        .iter()
        .find(|f| f.to_string_lossy().contains("example-com-accounts"))
        .expect("accounts");
    let text = std::fs::read_to_string(accounts).expect("read");
    let bad = text.replace(
        "password: example-only-jane-password",
        "passwordHash: \"$argon2id$not-a-hash\"",
    );
    std::fs::write(accounts, bad).expect("write");
    let md = wait_for(
        "MailDomain reports the bad account",
        Duration::from_secs(30),
        || {
            let o = get("maildomain", &ns, "example-com")?;
            let ready = condition(&o, "Ready")?;
            (ready["reason"] != "Compiled").then_some(o)
        },
    );
    let ready = condition(&md, "Ready").expect("ready");
    assert!(ready["message"].to_string().contains("jane"), "{ready}");
    drop(op);
    kubectl(&[
        "delete",
        "ipaddressgroups,maildomains,smtpservices,deliveryrules,accesspolicies",
        "--all",
        "-n",
        &ns,
    ]);
}

#[test]
fn schema_and_cel_rejections_at_apply_time() {
    let Some(_) = server() else { return };
    install_crds();
    let ns = namespace("schema");
    let cases = [
        (
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: wild}\nspec: {priority: 1, action: Direct, match: {recipients: [\"*@*.example\"]}}\n",
            "a wildcard is allowed only in the local part",
        ),
        (
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: norelay}\nspec: {priority: 1, action: Relay}\n",
            "action Relay needs relay",
        ),
        (
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: smtps}\nspec: {port: 465, protocol: Smtps}\n",
            "protocol Smtps (implicit TLS) needs tls",
        ),
        (
            "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {name: badip}\nspec: {addresses: [\"10.0.0.300\"]}\n",
            "must be an IP address",
        ),
        (
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: both}\nspec: {port: 25, protocol: Smtp, relayControl: {open: true, allowAuthenticated: true}}\n",
            "relayControl.open excludes",
        ),
    ];
    for (yaml, why) in cases {
        let yaml = yaml.replace(
            "metadata: {name: ",
            &format!("metadata: {{namespace: {ns}, name: "),
        );
        let (ok, out) = apply_yaml(&yaml);
        assert!(!ok, "accepted but should be rejected: {yaml}");
        assert!(out.contains(why), "rejection does not say {why:?}: {out}");
    }
}

#[test]
fn leader_election_two_operators_only_one_writes() {
    let Some(_) = server() else { return };
    install_crds();
    let ns = namespace("lead");
    let (crs, secrets) = example(&ns);
    assert!(apply_yaml(&crs).0);
    let a_dirs = dirs();
    let b_dirs = dirs();
    write_secrets(&a_dirs.secrets, &secrets);
    write_secrets(&b_dirs.secrets, &secrets);
    let mut a = start(&ns, &a_dirs, "replica-a");
    wait_for("A writes", Duration::from_secs(30), || a.hash(&ns));
    let b = start(&ns, &b_dirs, "replica-b");
    // B follows: it sees A's valid lease and writes nothing. Bounded observation window.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(b.policy(&ns).is_none(), "the follower wrote the policy");
        std::thread::sleep(Duration::from_millis(200));
    }
    let lease = get("lease.coordination.k8s.io", &ns, "mailrelay-operator").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    // A stops gracefully and releases; B takes over well before the lease would have expired.
    let stopped = Instant::now();
    assert_eq!(a.terminate(), Some(0), "{}", a.log_text());
    assert!(
        a.log_text().contains("released the leader lease"),
        "{}",
        a.log_text()
    );
    wait_for("B writes", Duration::from_secs(30), || b.hash(&ns));
    let lease = get("lease.coordination.k8s.io", &ns, "mailrelay-operator").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert!(lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0) >= 1);
    eprintln!("failover after SIGTERM took {:?}", stopped.elapsed());
    // Separate output dirs, so B had no previous credentials (new salts): compare the config.
    assert_eq!(
        a.relay_yaml(&ns),
        b.relay_yaml(&ns),
        "both compiled the same policy"
    );
}

#[test]
fn restart_changes_nothing() {
    let Some(_) = server() else { return };
    install_crds();
    let ns = namespace("restart");
    let (crs, secrets) = example(&ns);
    assert!(apply_yaml(&crs).0);
    let d = dirs();
    write_secrets(&d.secrets, &secrets);
    let mut op = start(&ns, &d, "first");
    wait_for("written", Duration::from_secs(30), || op.hash(&ns));
    let all = "ipaddressgroups,maildomains,smtpservices,deliveryrules,accesspolicies";
    let versions = || {
        wait_for("every object has a status", Duration::from_secs(30), || {
            let v: serde_json::Value =
                serde_json::from_str(&kubectl_ok(&["get", all, "-n", &ns, "-o", "json"])).ok()?;
            let items = v["items"].as_array()?.clone();
            items
                .iter()
                .all(|i| i["status"]["observedGeneration"].is_i64())
                .then(|| {
                    items
                        .iter()
                        .map(|i| {
                            (
                                i["metadata"]["name"].to_string(),
                                i["metadata"]["resourceVersion"].to_string(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
        })
    };
    // Settle: the status writes of the first run have all landed when two reads agree.
    let mut before = versions();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let again = versions();
        if again == before {
            break;
        }
        before = again;
    }
    let file = std::fs::read_to_string(op.policy_path(&ns)).expect("policy");
    let creds_path = d.out.join(&ns).join("mailrelay-credentials.yaml");
    let creds = std::fs::read_to_string(&creds_path).expect("creds");
    let mtime = std::fs::metadata(op.policy_path(&ns))
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(op.terminate(), Some(0));

    let op2 = start(&ns, &d, "second");
    wait_for("second run reconciled", Duration::from_secs(30), || {
        op2.log_text().contains("reconciled").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(versions(), before, "a restart must not rewrite any status");
    assert_eq!(
        std::fs::read_to_string(op2.policy_path(&ns)).expect("policy"),
        file
    );
    assert_eq!(
        std::fs::read_to_string(&creds_path).expect("creds"),
        creds,
        "verifiers were reused"
    );
    assert_eq!(
        std::fs::metadata(op2.policy_path(&ns))
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime,
        "the policy was not rewritten"
    );
    assert!(
        !op2.log_text().contains("applied the compiled policy"),
        "{}",
        op2.log_text()
    );
}

#[test]
fn apply_to_status_latency_median_of_20_changes() {
    let Some(_) = server() else { return };
    install_crds();
    let ns = namespace("latency");
    let (crs, secrets) = example(&ns);
    assert!(apply_yaml(&crs).0);
    let d = dirs();
    write_secrets(&d.secrets, &secrets);
    let op = start(&ns, &d, "latency");
    wait_condition("deliveryrule", &ns, "direct-mx", "Ready", "True", None);
    let mut status_ms = Vec::new();
    let mut config_ms = Vec::new();
    let mut kubectl_ms = Vec::new();
    for i in 0..20 {
        let prio = 2000 + i;
        let yaml = format!(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: direct-mx, namespace: {ns}}}\nspec: {{priority: {prio}, action: Direct}}\n"
        );
        let start = Instant::now();
        let (ok, out) = apply_yaml(&yaml);
        assert!(ok, "{out}");
        kubectl_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let want = format!("priority: {prio}");
        let mut config_at = None;
        let mut status_at = None;
        let gen = 2 + i64::from(i);
        while config_at.is_none() || status_at.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "change {i} not applied in 30 s"
            );
            if config_at.is_none() && op.relay_yaml(&ns).contains(&want) {
                config_at = Some(start.elapsed());
            }
            if status_at.is_none() {
                let o = get("deliveryrule", &ns, "direct-mx");
                if o.is_some_and(|o| o["status"]["observedGeneration"] == gen) {
                    status_at = Some(start.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        config_ms.push(config_at.unwrap_or_default().as_secs_f64() * 1000.0);
        status_ms.push(status_at.unwrap_or_default().as_secs_f64() * 1000.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[9] + v[10]) / 2.0
    };
    let after_apply: Vec<f64> = config_ms
        .iter()
        .zip(&kubectl_ms)
        .map(|(c, k)| c - k)
        .collect();
    eprintln!(
        "LATENCY over 20 changes (medians): kubectl apply -> config written {:.0} ms, -> status observed {:.0} ms; kubectl apply itself {:.0} ms; kubectl returned -> config written {:.0} ms",
        median(&mut config_ms),
        median(&mut status_ms),
        median(&mut kubectl_ms),
        median(&mut after_apply.clone())
    );
}
