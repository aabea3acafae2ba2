//! Queue hand-off between relays: how a spool that no pod will serve again (scale-down, a lost
//! node) gets its mail to the pods that remain.
//!
//! - [`receiver`]: the hand-off listener. Mutual TLS with the cluster's hand-off CA (the
//!   `<instance>-handoff` Secret the operator writes) is the only way in; mail taken over there
//!   was accepted by the cluster once already, so relay control, per-IP limits and the hop
//!   limit are not applied a second time.
//! - [`drain`]: `relay drain`, the client side. It sends every message of a spool directory
//!   over that listener and removes each one only after the receiver's `250`.
//!
//! What the envelope carries across is the SMTP envelope with its DSN parameters, plus the
//! `XHANDOFF` parameters defined here: arrival time, attempts per recipient, the delay-warning
//! flag and an origin (`<volume>/<message id>`) the receiver recognises duplicates by.

pub mod drain;
pub mod receiver;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailrelay_spool::{Envelope, Recipient};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;

/// The name the hand-off certificate is issued for and the client verifies, whatever address it
/// connects to (pods are reached by IP through a headless Service).
pub const SERVER_NAME: &str = "handoff.mailrelay.internal";
/// The EHLO keyword of a hand-off listener; the client sends the `X…` parameters only to it.
pub const EXTENSION: &str = "XHANDOFF";

/// The mutual-TLS configurations built from one hand-off directory.
pub struct HandoffTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

fn files(dir: &Path) -> [PathBuf; 3] {
    [dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key")]
}

/// Loads `ca.crt`, `tls.crt` and `tls.key`: the listener accepts only clients with a
/// certificate from that CA, and the client accepts only a server with one.
pub fn load_tls(dir: &Path) -> anyhow::Result<HandoffTls> {
    let [ca, crt, key] = files(dir);
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(&ca)?) {
        let c = c.map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("{}: no CA certificate", ca.display());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&crt)?)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate", crt.display());
    }
    let private = PrivateKeyDer::from_pem_slice(&read(&key)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("hand-off client verifier: {e}"))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("hand-off TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), private.clone_key())
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("hand-off TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?;
    Ok(HandoffTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Modification times and sizes of the three files: a mounted Secret that changed is loaded
/// again (certificate rotation without a restart).
pub fn stamp(dir: &Path) -> Option<Vec<(SystemTime, u64)>> {
    files(dir)
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The hand-off parameters of `MAIL FROM` for `env`, each with a leading space.
pub fn mail_params(env: &Envelope, origin: Option<&str>) -> String {
    let mut p = format!(" XRECEIVED={}", unix(env.received_at));
    if let Some(next) = env.next_attempt_at {
        p.push_str(&format!(" XNEXT={}", unix(next)));
    }
    if env.warned {
        p.push_str(" XWARNED=1");
    }
    if let Some(o) = origin {
        p.push_str(&format!(" XORIGIN={}", crate::delivery::client::xtext(o)));
    }
    p
}

/// The hand-off parameters of `RCPT TO` for `r`.
pub fn rcpt_params(r: &Recipient) -> String {
    if r.attempts > 0 {
        format!(" XATTEMPTS={}", r.attempts)
    } else {
        String::new()
    }
}

/// What the hand-off parameters of one `MAIL FROM` said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailExtras {
    pub received_at: Option<SystemTime>,
    pub next_attempt_at: Option<SystemTime>,
    pub warned: bool,
    pub origin: Option<String>,
}

fn from_unix(v: &str) -> Option<SystemTime> {
    let secs: u64 = v.parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Splits the `X…` hand-off parameters off a `MAIL FROM`/`RCPT TO` line, so that the rest goes
/// through the relay's strict command parser. `Err` names a malformed one.
pub fn split_params(line: &str) -> Result<(String, Vec<(String, String)>), String> {
    // Parameters follow the path's closing bracket; a quoted local part may contain spaces.
    let Some(end) = line.find('>') else {
        return Ok((line.to_string(), Vec::new()));
    };
    let (head, tail) = line.split_at(end + 1);
    let mut rest = head.to_string();
    let mut extras = Vec::new();
    for word in tail.split(' ').filter(|w| !w.is_empty()) {
        let upper = word.to_ascii_uppercase();
        if upper.starts_with('X') {
            let Some((k, v)) = word.split_once('=') else {
                return Err(format!("hand-off parameter without a value: {word}"));
            };
            extras.push((k.to_ascii_uppercase(), v.to_string()));
        } else {
            rest.push(' ');
            rest.push_str(word);
        }
    }
    Ok((rest, extras))
}

/// Reads the hand-off parameters of `MAIL FROM`.
pub fn mail_extras(params: &[(String, String)]) -> Result<MailExtras, String> {
    let mut m = MailExtras::default();
    for (k, v) in params {
        match k.as_str() {
            "XRECEIVED" => {
                m.received_at = Some(from_unix(v).ok_or_else(|| format!("bad XRECEIVED={v}"))?)
            }
            "XNEXT" => {
                m.next_attempt_at = Some(from_unix(v).ok_or_else(|| format!("bad XNEXT={v}"))?)
            }
            "XWARNED" => m.warned = v == "1",
            "XORIGIN" => {
                m.origin = Some(
                    crate::smtp::parser::xtext_decode(v)
                        .ok_or_else(|| format!("bad XORIGIN xtext {v}"))?,
                )
            }
            _ => return Err(format!("unknown MAIL parameter {k}")),
        }
    }
    Ok(m)
}

/// Reads the hand-off parameters of `RCPT TO`: the attempts made so far.
pub fn rcpt_attempts(params: &[(String, String)]) -> Result<u32, String> {
    let mut attempts = 0;
    for (k, v) in params {
        match k.as_str() {
            "XATTEMPTS" => attempts = v.parse().map_err(|_| format!("bad XATTEMPTS={v}"))?,
            _ => return Err(format!("unknown RCPT parameter {k}")),
        }
    }
    Ok(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_round_trip() {
        let mut env = Envelope::new("a@b.test", ["c@d.test"]);
        env.received_at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        env.next_attempt_at = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_600));
        env.warned = true;
        let line = format!(
            "MAIL FROM:<a@b.test> SIZE=10{}",
            mail_params(&env, Some("spool-relay-2/abc+d=e"))
        );
        let (rest, extras) = split_params(&line).unwrap();
        assert_eq!(rest, "MAIL FROM:<a@b.test> SIZE=10");
        let m = mail_extras(&extras).unwrap();
        assert_eq!(m.received_at, Some(env.received_at));
        assert_eq!(m.next_attempt_at, env.next_attempt_at);
        assert!(m.warned);
        assert_eq!(m.origin.as_deref(), Some("spool-relay-2/abc+d=e"));

        let mut r = Recipient::new("c@d.test");
        r.attempts = 4;
        let line = format!("RCPT TO:<c@d.test> NOTIFY=NEVER{}", rcpt_params(&r));
        let (rest, extras) = split_params(&line).unwrap();
        assert_eq!(rest, "RCPT TO:<c@d.test> NOTIFY=NEVER");
        assert_eq!(rcpt_attempts(&extras).unwrap(), 4);
    }

    #[test]
    fn malformed_parameters_are_named() {
        assert!(split_params("MAIL FROM:<> XWARNED").is_err());
        assert!(mail_extras(&[("XRECEIVED".into(), "soon".into())]).is_err());
        assert!(mail_extras(&[("XOTHER".into(), "1".into())]).is_err());
        assert!(rcpt_attempts(&[("XATTEMPTS".into(), "-1".into())]).is_err());
        // No bracket: nothing to split, the command parser reports the syntax error.
        assert_eq!(split_params("MAIL FROM:a").unwrap().0, "MAIL FROM:a");
    }

    #[test]
    fn parameters_start_after_the_first_closing_bracket() {
        // xtext leaves `>` as it is; the path ends at the first `>`, as in the command parser.
        let (rest, extras) = split_params("MAIL FROM:<a@b.test> ENVID=a>b XRECEIVED=1").unwrap();
        assert_eq!(rest, "MAIL FROM:<a@b.test> ENVID=a>b");
        assert_eq!(extras, vec![("XRECEIVED".to_string(), "1".to_string())]);
    }
}
