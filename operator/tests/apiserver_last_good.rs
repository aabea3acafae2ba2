//! Issue 10.4 against a real API server: a live object whose Secret vanishes keeps its last good
//! version in the applied policy (status `Stale`), also across an operator restart; a newcomer
//! that collides with a live object gets the error; only deleting the object removes it. Also
//! that the applied ConfigMap and Secret carry the same pairing stamp (issue 10.13).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::time::Duration;

use common::*;

/// `credentials.yaml` of the applied credentials Secret, decoded.
fn credentials_yaml(ns: &str) -> String {
    get("secret", ns, "mailrelay-credentials")
        .and_then(|s| {
            let b64 = s["data"]["credentials.yaml"].clone();
            let bytes: k8s_openapi::ByteString = serde_json::from_value(b64).ok()?;
            String::from_utf8(bytes.0).ok()
        })
        .unwrap_or_default()
}

fn status_reason(obj: &serde_json::Value, type_: &str) -> String {
    condition(obj, type_).map_or_else(String::new, |c| c["reason"].as_str().unwrap_or("").into())
}

#[test]
fn vanished_secrets_keep_the_last_good_version_live() {
    let Some(_) = server() else { return };
    let Example { ns, secrets, .. } = applied_example("stale");
    let d = scratch();
    let mut op = start_operator(&ns, &d, "stale-1");
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Ready",
        "True",
        Some("Compiled"),
    );
    wait_condition("maildomain", &ns, "example-com", "Ready", "True", None);
    let hash = wait_for("policy written", Duration::from_secs(30), || op.hash(&ns));
    let relay_yaml = op.relay_yaml(&ns);
    let credentials = credentials_yaml(&ns);
    assert!(relay_yaml.contains("partner-smarthost") && relay_yaml.contains("example.com"));
    assert!(credentials.contains("jane@example.com"));
    assert!(credentials.contains("partner-smarthost"));
    // Both halves carry the applied hash as their pairing stamp (issue 10.13).
    let stamp = format!("configHash: {hash}\n");
    assert!(relay_yaml.contains(&stamp), "{relay_yaml}");
    assert!(credentials.contains(&stamp), "{credentials}");

    // A hiccup of the secret store: both Secrets are gone.
    kubectl_ok(&[
        "delete",
        "secret",
        "-n",
        &ns,
        "partner-smarthost-auth",
        "example-com-accounts",
    ]);
    for (kind, name, reason) in [
        ("deliveryrule", "partner-smarthost", "InvalidRelayAuth"),
        ("maildomain", "example-com", "MissingSecret"),
    ] {
        let o = wait_condition(kind, &ns, name, "Stale", "True", Some(reason));
        assert_eq!(status_reason(&o, "Ready"), "StaleLastGood", "{o}");
        assert_eq!(
            condition(&o, "Ready").expect("Ready")["status"],
            "False",
            "{o}"
        );
        assert_eq!(status_reason(&o, "Invalid"), reason, "{o}");
        assert_eq!(status_reason(&o, "Stalled"), reason, "{o}");
        // Live: part of the applied policy, which has not changed at all.
        assert_eq!(o["status"]["configHash"], hash.as_str(), "{o}");
    }
    assert_eq!(op.hash(&ns).as_deref(), Some(hash.as_str()));
    assert_eq!(op.relay_yaml(&ns), relay_yaml);
    assert_eq!(credentials_yaml(&ns), credentials);
    wait_for(
        "a Warning event for the stale rule",
        Duration::from_secs(30),
        || {
            events(&ns)
                .contains(&("InvalidRelayAuth".into(), "partner-smarthost".into()))
                .then_some(())
        },
    );

    // A new rule with the live rule's priority (and a name that sorts first) is the one
    // rejected.
    let newcomer = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: aaa-new, namespace: {ns}}}\nspec: {{priority: 10, action: Direct, match: {{recipients: ['*@new.example']}}}}\n"
    );
    let (ok, out) = apply_yaml(&newcomer);
    assert!(ok, "{out}");
    let n = wait_condition(
        "deliveryrule",
        &ns,
        "aaa-new",
        "Invalid",
        "True",
        Some("DuplicatePriority"),
    );
    let msg = condition(&n, "Invalid").expect("Invalid")["message"].to_string();
    assert!(msg.contains("partner-smarthost"), "{msg}");
    assert!(condition(&n, "Stale").is_none(), "{n}");
    assert_eq!(op.relay_yaml(&ns), relay_yaml);

    // The last good version survives an operator restart: it is what is applied.
    assert_eq!(op.terminate(), Some(0));
    let op2 = start_operator(&ns, &d, "stale-2");
    op2.wait_log("reconciled");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(op2.relay_yaml(&ns), relay_yaml);
    assert_eq!(credentials_yaml(&ns), credentials);
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Stale",
        "True",
        None,
    );

    // The Secrets are back: Ready again, nothing stale, same policy.
    apply_secrets(&secrets, &[]);
    for (kind, name) in [
        ("deliveryrule", "partner-smarthost"),
        ("maildomain", "example-com"),
    ] {
        wait_condition(kind, &ns, name, "Ready", "True", None);
        let o = wait_no_condition(kind, &ns, name, "Stale");
        assert!(condition(&o, "Invalid").is_none(), "{o}");
    }
    assert_eq!(op2.hash(&ns).as_deref(), Some(hash.as_str()));

    // Only deleting the object removes it; then the newcomer may have the priority.
    kubectl_ok(&["delete", "deliveryrule", "-n", &ns, "partner-smarthost"]);
    wait_condition("deliveryrule", &ns, "aaa-new", "Ready", "True", None);
    let after = op2.relay_yaml(&ns);
    assert!(!after.contains("partner-smarthost"), "{after}");
    assert!(after.contains("aaa-new"), "{after}");
    assert!(!credentials_yaml(&ns).contains("partner-smarthost"));
}
