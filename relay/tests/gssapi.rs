//! Kerberos (AUTH GSSAPI, RFC 4752) with real parts: a throwaway MIT realm on loopback
//! (`tests/krb5/realm.sh`: krb5kdc, kadmin.local), tickets from `kinit`, and curl as the SMTP
//! client (`--login-options AUTH=GSSAPI`) over STARTTLS, against the relay binary built with
//! the `gssapi` feature. Run with `cargo test -p mailrelay-relay --features gssapi --test gssapi`.

#![cfg(feature = "gssapi")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use mailrelay_crds::config::{Credentials, Mechanism, RelayConfig};
use mailrelay_crds::verifier::{PasswordVerifier, SecretString};

const REALM: &str = "MAILRELAY.TEST";
const SPN: &str = "smtp/relay.example.test";
/// The KDC's programs live in sbin, which a non-root PATH lacks.
const KRB5KDC: &str = "/usr/sbin/krb5kdc";
const KADMIN_LOCAL: &str = "/usr/sbin/kadmin.local";

/// A realm of its own for one test: its KDC stops when the test ends.
struct Realm {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Realm {
    fn start() -> Option<Realm> {
        for (program, install) in [
            (KRB5KDC, "apt-get install krb5-kdc"),
            (KADMIN_LOCAL, "apt-get install krb5-admin-server"),
            ("kinit", "apt-get install krb5-user"),
            ("curl", "apt-get install curl"),
            ("faketime", "apt-get install faketime"),
        ] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                missing_peer(program, install);
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .arg(REALM)
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/krb5/realm.sh");
        assert!(out.status.success(), "realm.sh start failed");
        let env = exports(&out.stdout);
        let realm = Realm { dir, env };
        // The relay's own service principal, named as curl asks for it (smtp/<URL host>).
        realm.kadmin(&format!("addprinc -randkey {SPN}@{REALM}"));
        realm.kadmin(&format!(
            "ktadd -k {} {SPN}@{REALM}",
            realm.keytab().display()
        ));
        Some(realm)
    }

    fn keytab(&self) -> PathBuf {
        self.dir.path().join("relay.keytab")
    }

    fn kadmin(&self, query: &str) {
        let out = Command::new(KADMIN_LOCAL)
            .args(["-q", query])
            .envs(&self.env)
            .output()
            .expect("kadmin.local");
        assert!(
            out.status.success(),
            "kadmin.local -q {query:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A credential cache holding a ticket for `principal`.
    fn kinit(&self, principal: &str, password: &str) -> PathBuf {
        let cache = self
            .dir
            .path()
            .join(format!("cc-{}", principal.replace(['@', '/'], "_")));
        let mut child = Command::new("kinit")
            .arg("-c")
            .arg(&cache)
            .arg(principal)
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("kinit");
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        assert!(child.wait().unwrap().success(), "kinit {principal}");
        cache
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/krb5/realm.sh")
}

/// `export K=V` lines (values possibly quoted) → map.
fn exports(stdout: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
        .collect()
}

/// The test policy with GSSAPI on every service (principal `smtp/relay.example.test`), the
/// mail domain `example.test` in Kerberos realm `realm`, and the account `alice@`.
fn start_relay(k: &Realm, realm: &str, alice_mfa: bool) -> Relay {
    let keytab = B64.encode(std::fs::read(k.keytab()).unwrap());
    let realm = realm.to_string();
    let run_dir = k.dir.path().join("relay-gssapi");
    let run_dir = run_dir.to_str().unwrap().to_string();
    Relay::start_full(
        move |cfg: &mut RelayConfig| {
            cfg.domains[0].kerberos_realm = Some(realm);
            for s in &mut cfg.services {
                s.auth.mechanisms.push(Mechanism::Gssapi);
                s.auth.gssapi_principal = Some(format!("{SPN}@{REALM}"));
                s.auth.brute_force.failure_delay_millis = 0;
            }
        },
        move |c: &mut Credentials| {
            for s in ["smtp", "submission", "smtps", "refused"] {
                c.keytabs
                    .insert(s.to_string(), SecretString::new(keytab.clone()));
            }
            let mut alice = c.accounts[0].clone();
            alice.login = "alice@example.test".into();
            alice.password = Some(PasswordVerifier::derive("not-used-by-kerberos"));
            alice.scram_sha256 = None;
            alice.app_passwords = vec![];
            alice.mfa = alice_mfa;
            alice.access_policy = None;
            c.accounts.push(alice);
        },
        "",
        // The realm's krb5.conf gives the acceptor a 5 s clock skew (MIT's default is 300 s),
        // so that an expired ticket shows within the test.
        &[
            ("MAILRELAY_GSSAPI_DIR", run_dir.as_str()),
            ("KRB5_CONFIG", k.env["KRB5_CONFIG"].as_str()),
        ],
    )
}

/// curl sending one message with AUTH GSSAPI from credential cache `cache` on the submission
/// port (STARTTLS), relaying to an outside domain; `faketime` runs it with that clock.
fn curl_gssapi(k: &Realm, relay: &Relay, cache: &Path, faketime: Option<&str>) -> Output {
    let msg = relay.path().join("msg.txt");
    std::fs::write(
        &msg,
        "From: alice@example.test\r\nSubject: kerberos\r\n\r\nsent with GSSAPI\r\n",
    )
    .unwrap();
    let port = relay.ports.submission;
    let mut cmd = match faketime {
        Some(t) => {
            let mut c = Command::new("faketime");
            c.args(["-f", t, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["--silent", "--show-error", "--max-time", "30"])
        .arg("--url")
        .arg(format!("smtp://relay.example.test:{port}"))
        .arg("--resolve")
        .arg(format!("relay.example.test:{port}:127.0.0.1"))
        .args(["--ssl-reqd", "--cacert"])
        .arg(relay.ca_pem_file())
        .args(["--login-options", "AUTH=GSSAPI", "--user", ":"])
        .args([
            "--mail-from",
            "alice@example.test",
            "--mail-rcpt",
            "someone@elsewhere.example",
        ])
        .arg("--upload-file")
        .arg(&msg)
        .envs(&k.env)
        .env("KRB5CCNAME", format!("FILE:{}", cache.display()))
        .output()
        .expect("run curl")
}

fn queued(relay: &mut Relay) -> usize {
    relay.kill9();
    spool_messages(&relay.path().join("spool")).len()
}

#[test]
fn a_kerberos_ticket_authenticates_and_relays() {
    let Some(k) = Realm::start() else { return };
    let mut relay = start_relay(&k, REALM, false);
    let cache = k.kinit(&format!("alice@{REALM}"), "alice-pass");
    let out = curl_gssapi(&k, &relay, &cache, None);
    assert!(
        out.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    extra::wait_log(&relay, "auth_success");
    assert!(relay.log().contains("alice@example.test"));
    assert!(relay
        .http("/metrics")
        .contains("mechanism=\"GSSAPI\",result=\"success\""));
    assert_eq!(queued(&mut relay), 1);
}

#[test]
fn refusals_say_why_realm_account_two_factor_and_expired_ticket() {
    let Some(k) = Realm::start() else { return };
    // The mail domain is in another realm than the ticket's.
    let relay = start_relay(&k, "CORP.TEST", false);
    let alice = k.kinit(&format!("alice@{REALM}"), "alice-pass");
    let out = curl_gssapi(&k, &relay, &alice, None);
    assert_eq!(
        out.status.code(),
        Some(67),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    extra::wait_log(
        &relay,
        "Kerberos principal alice@MAILRELAY.TEST is in realm MAILRELAY.TEST, which no MailDomain has as kerberosRealm",
    );
    drop(relay);

    let relay = start_relay(&k, REALM, true);
    // A principal without an account.
    let bob = k.kinit(&format!("bob@{REALM}"), "bob-pass");
    let out = curl_gssapi(&k, &relay, &bob, None);
    assert_eq!(out.status.code(), Some(67));
    extra::wait_log(
        &relay,
        "Kerberos principal bob@MAILRELAY.TEST authenticated, but there is no account",
    );
    // A two-factor account.
    let out = curl_gssapi(&k, &relay, &alice, None);
    assert_eq!(out.status.code(), Some(67));
    extra::wait_log(
        &relay,
        "Only application passwords are allowed since 2FA is enabled",
    );

    // An expired ticket: the client runs with its clock set back to when the ticket was
    // valid (an MIT client refuses to send an expired ticket), the relay's clock is real.
    let expired = Command::new(script())
        .arg("expired-ticket")
        .arg(k.dir.path())
        .envs(&k.env)
        .env(
            "KRB5CCNAME",
            format!("FILE:{}", k.dir.path().join("cc-expired").display()),
        )
        .env("KRB5_EXPIRED_SERVICE", format!("{SPN}@{REALM}"))
        .stderr(Stdio::inherit())
        .output()
        .expect("realm.sh expired-ticket");
    assert!(expired.status.success());
    let vars = exports(&expired.stdout);
    let clock = vars
        .get("KRB5_EXPIRED_CLIENT_TIME")
        .expect("KRB5_EXPIRED_CLIENT_TIME");
    let out = curl_gssapi(&k, &relay, &k.dir.path().join("cc-expired"), Some(clock));
    assert!(!out.status.success());
    extra::wait_log(&relay, "Ticket expired");
    let metrics = relay.http("/metrics");
    for result in [
        "unknown_user",
        "mfa_app_password_required",
        "ticket_expired",
    ] {
        assert!(
            metrics.contains(&format!("mechanism=\"GSSAPI\",result=\"{result}\"")),
            "{result}: {metrics}"
        );
    }
}

#[test]
fn gssapi_is_offered_only_after_tls() {
    let Some(k) = Realm::start() else { return };
    let relay = start_relay(&k, REALM, false);
    let mut c = relay.connect(relay.ports.submission);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(!ehlo.contains("GSSAPI"), "{ehlo}");
    assert_eq!(c.cmd("AUTH GSSAPI").0, 530);
    c.starttls();
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(ehlo.contains(" GSSAPI"), "{ehlo}");
    // Garbage instead of an AP-REQ: 535, and the relay goes on.
    assert_eq!(c.cmd("AUTH GSSAPI").0, 334);
    let (code, _) = c.cmd("bm90IGEgdGlja2V0");
    assert_eq!(code, 535, "{}", relay.log());
    extra::wait_log(&relay, "Kerberos: malformed exchange");
    assert_eq!(c.cmd("NOOP").0, 250);
}
