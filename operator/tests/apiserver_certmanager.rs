//! cert-manager integration against a real API server: with the `certificates.cert-manager.io`
//! API present (registered here as a bare CRD; no cert-manager controller runs, the test writes
//! the Secret it would issue), an SmtpService with `tls.issuerRef` gets a Certificate it owns, is
//! `Reconciling` until the Secret exists, then `Ready` with the certificate in the TLS bundle, and
//! gets a deleted or edited Certificate back within seconds (it is watched), and loses the
//! Certificate when it switches to `tls.secretName`. Its own test binary because registering the API changes what the tests in
//! apiserver.rs see (they expect `CertManagerMissing`); the CRD is removed again at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::time::Duration;

use common::*;

const CERT_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
spec:
  group: cert-manager.io
  scope: Namespaced
  names: {plural: certificates, singular: certificate, kind: Certificate, listKind: CertificateList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

struct RemoveCrd;
impl Drop for RemoveCrd {
    fn drop(&mut self) {
        kubectl(&[
            "delete",
            "crd",
            "certificates.cert-manager.io",
            "--wait=true",
        ]);
    }
}

#[test]
fn issuer_ref_creates_an_owned_certificate() {
    let Some(_) = server() else { return };
    install_crds();
    if kubectl(&["get", "crd", "certificates.cert-manager.io"])
        .status
        .success()
    {
        eprintln!(
            "\n!!!!! SKIPPED: cert-manager is really installed here; not touching its CRD. !!!!!\n"
        );
        return;
    }
    let (ok, out) = apply_yaml(CERT_CRD);
    assert!(ok, "{out}");
    let _cleanup = RemoveCrd;
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/certificates.cert-manager.io",
    ]);

    let Example { ns, crs, .. } = applied_example("certs");
    let d = scratch();
    let _op = start_operator(&ns, &d, "certs");
    let cert = wait_for(
        "Certificate submission-tls",
        Duration::from_secs(30),
        || get("certificates.cert-manager.io", &ns, "submission-tls"),
    );
    assert_eq!(cert["spec"]["secretName"], "submission-tls");
    assert_eq!(
        cert["spec"]["dnsNames"],
        serde_json::json!(["mail.example.com"])
    );
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(cert["spec"]["issuerRef"]["name"], "letsencrypt");
    let owner = &cert["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "SmtpService");
    assert_eq!(owner["name"], "submission");
    assert_eq!(owner["controller"], true);
    assert!(
        get("certificates.cert-manager.io", &ns, "smtp-tls").is_none(),
        "secretName services get no Certificate"
    );
    // Until cert-manager issues the Secret, the service is on its way (kstatus Reconciling),
    // not Stalled: no Warning, nothing for anybody to fix.
    let s = wait_condition(
        "smtpservice",
        &ns,
        "submission",
        "Reconciling",
        "True",
        Some("MissingTlsSecret"),
    );
    assert!(condition(&s, "Stalled").is_none(), "{s}");
    assert!(condition(&s, "Warning").is_none(), "{s}");
    assert_eq!(condition(&s, "Ready").expect("ready")["status"], "False");
    // cert-manager writes the Secret: bundled, Ready.
    let (yaml, _) = tls_secret_yaml(&ns, "submission-tls", &["mail.example.com"]);
    assert!(apply_yaml(&yaml).0);
    let s = wait_condition("smtpservice", &ns, "submission", "Ready", "True", None);
    assert!(condition(&s, "Reconciling").is_none(), "{s}");
    wait_no_condition("smtpservice", &ns, "submission", "Warning");
    let bundle = get("secret", &ns, "mailrelay-tls").expect("bundle");
    assert!(bundle["data"]["submission-tls.crt"].is_string(), "{bundle}");

    // Deleted or edited by hand, the Certificate is put back at once (the operator watches the
    // Certificates it made), not at the next resync five minutes later.
    let uid = cert["metadata"]["uid"].clone();
    kubectl_ok(&[
        "delete",
        "certificates.cert-manager.io",
        "submission-tls",
        "-n",
        &ns,
    ]);
    let back = wait_for("Certificate re-created", Duration::from_secs(20), || {
        get("certificates.cert-manager.io", &ns, "submission-tls")
            .filter(|c| c["metadata"]["uid"] != uid)
    });
    assert_eq!(back["spec"]["issuerRef"]["name"], "letsencrypt");
    kubectl_ok(&[
        "patch",
        "certificates.cert-manager.io",
        "submission-tls",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"dnsNames":["elsewhere.example"]}}"#,
    ]);
    wait_for(
        "Certificate dnsNames put back",
        Duration::from_secs(20),
        || {
            get("certificates.cert-manager.io", &ns, "submission-tls")
                .filter(|c| c["spec"]["dnsNames"] == serde_json::json!(["mail.example.com"]))
        },
    );

    // Switching to an existing Secret removes the Certificate.
    let yaml = crs.replace(
        "    issuerRef:\n      name: letsencrypt\n      kind: ClusterIssuer\n",
        "    secretName: mail-example-com-tls\n",
    );
    assert_ne!(yaml, crs);
    let (ok, out) = apply_yaml(&yaml);
    assert!(ok, "{out}");
    wait_for("Certificate deleted", Duration::from_secs(30), || {
        get("certificates.cert-manager.io", &ns, "submission-tls")
            .is_none()
            .then_some(())
    });
}
