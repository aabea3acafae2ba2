//! Certificates and the rustls server side. Certificates are part of the config snapshot, so a
//! rotated Secret is served by the next handshake; the [`SnapshotResolver`] picks the certificate
//! per handshake from whatever snapshot is current (by SNI among all configured certificates,
//! else the service's own; or by SNI only, for the MTA-STS policy host).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::snapshot::Snapshot;

/// The one crypto provider of the process (ring), installed before any rustls use.
pub fn install_crypto_provider() {
    // Fails only when already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate with the names it is meant for (from `ServicePolicy.tls.dns_names`).
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub dns_names: Vec<String>,
}

/// Where the certificate of TLS Secret `secret` is found under `tls_dir`: the flat layout of the
/// operator's bundled Secret (`<secret>.crt`, `<secret>.key`) first, then one folder per
/// `kubernetes.io/tls` Secret (`<secret>/tls.crt`, `<secret>/tls.key`). `None`: neither exists.
pub fn cert_files(tls_dir: &Path, secret: &str) -> Option<(PathBuf, PathBuf)> {
    let flat = (
        tls_dir.join(format!("{secret}.crt")),
        tls_dir.join(format!("{secret}.key")),
    );
    if flat.0.exists() {
        return Some(flat);
    }
    let dir = tls_dir.join(secret);
    let nested = (dir.join("tls.crt"), dir.join("tls.key"));
    nested.0.exists().then_some(nested)
}

/// Loads `<dir>/tls.crt` and `<dir>/tls.key` (PEM, as in a `kubernetes.io/tls` Secret).
pub fn load_pem_dir(dir: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    load_pem_files(&dir.join("tls.crt"), &dir.join("tls.key"))
}

/// Loads a PEM certificate chain and its private key.
pub fn load_pem_files(crt: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    // Read first, parse second: an I/O error is "unreadable", not an invalid certificate.
    let crt_pem = crate::snapshot::read_file(crt)?;
    let key_pem = crate::snapshot::read_file(key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate found", crt.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    certified_key(certs, key)
}

fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("unusable private key: {e}"))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("certificate and key do not match: {e}"))?;
    Ok(Arc::new(ck))
}

/// `notAfter` of the leaf certificate as Unix time, for the expiry metric; `None` when the DER
/// does not parse (rustls accepted it, so that would be an exotic encoding, not worth failing for).
pub fn not_after(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Lifetime of a generated self-signed certificate.
pub const SELF_SIGNED_DAYS: i64 = 365;
/// A generated certificate with less than this left is replaced.
pub const SELF_SIGNED_RENEW_DAYS: i64 = 30;
/// Written next to a generated certificate: it marks the certificate as ours (by its hash, so a
/// real certificate put in its place is never overwritten) and records when it expires.
pub const SELF_SIGNED_META: &str = "self-signed.json";

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelfSignedMeta {
    /// SHA-256 (hex) of the `tls.crt` this record is about.
    cert_sha256: String,
    /// Unix seconds.
    not_after: i64,
    dns_names: Vec<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What [`SelfSignedCache::ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfSignedOutcome {
    /// A generated certificate on disk is still good and was loaded.
    Kept,
    /// A new certificate was generated and written.
    Generated,
    /// A new certificate was generated but could not be written; it lives in memory only.
    InMemory,
}

/// Generated self-signed certificates (`selfSignedIfMissing`, standalone use). They are kept on
/// disk under `<tlsDir>/<secret>/` so that clients that pinned one keep working across restarts;
/// the in-memory cache only serves when the directory is not writable.
#[derive(Default)]
pub struct SelfSignedCache {
    certs: Mutex<HashMap<SelfSignedKey, Arc<CertifiedKey>>>,
}

/// (Secret name, DNS names) a self-signed certificate was generated for.
type SelfSignedKey = (String, Vec<String>);

impl SelfSignedCache {
    /// Whether the certificate in `dir` (`tls.crt`) is one this relay generated.
    pub fn is_generated(dir: &Path) -> bool {
        Self::meta(dir).is_some()
    }

    fn meta(dir: &Path) -> Option<SelfSignedMeta> {
        let text = std::fs::read_to_string(dir.join(SELF_SIGNED_META)).ok()?;
        let meta: SelfSignedMeta = serde_json::from_str(&text).ok()?;
        let crt = std::fs::read(dir.join("tls.crt")).ok()?;
        (meta.cert_sha256 == sha256_hex(&crt)).then_some(meta)
    }

    /// The self-signed certificate for `secret` in `<tls_dir>/<secret>/`: the one on disk while
    /// it is ours, for the same names and has more than 30 days left; otherwise a new one valid
    /// for a year, written there (key file mode 0600).
    pub fn ensure(
        &self,
        tls_dir: &Path,
        secret: &str,
        names: &[String],
    ) -> anyhow::Result<(Arc<CertifiedKey>, SelfSignedOutcome)> {
        let dir = tls_dir.join(secret);
        let now = unix_now();
        if let Some(meta) = Self::meta(&dir) {
            let fresh = meta.not_after - now > SELF_SIGNED_RENEW_DAYS * 86_400;
            if fresh && meta.dns_names == names {
                if let Ok(k) = load_pem_dir(&dir) {
                    return Ok((k, SelfSignedOutcome::Kept));
                }
            }
        }
        let key = (secret.to_string(), names.to_vec());
        let mut map = self
            .certs
            .lock()
            .map_err(|_| anyhow::anyhow!("self-signed cache poisoned"))?;
        let not_after = now + SELF_SIGNED_DAYS * 86_400;
        let (cert_pem, key_pem) = generate(names, now, not_after)?;
        let ck = certified_key(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("generated certificate: {e}"))?],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("generated key: {e}"))?,
        )?;
        let meta = SelfSignedMeta {
            cert_sha256: sha256_hex(cert_pem.as_bytes()),
            not_after,
            dns_names: names.to_vec(),
        };
        match persist(&dir, &cert_pem, &key_pem, &meta) {
            Ok(()) => {
                map.remove(&key);
                Ok((ck, SelfSignedOutcome::Generated))
            }
            Err(e) => {
                tracing::warn!(secret, dir = %dir.display(), error = %e, "cannot store the self-signed certificate; serving it from memory");
                let ck = map.entry(key).or_insert(ck).clone();
                Ok((ck, SelfSignedOutcome::InMemory))
            }
        }
    }
}

/// A self-signed certificate for `names` valid from `not_before` to `not_after` (Unix seconds),
/// as PEM (certificate, private key).
fn generate(names: &[String], not_before: i64, not_after: i64) -> anyhow::Result<(String, String)> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "localhost".into()),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "mailrelay self-signed");
    // A little slack for clocks that are slightly behind.
    params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before - 3600)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn persist(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    meta: &SelfSignedMeta,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, bytes: &[u8], mode: u32| -> std::io::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    };
    // Key first and the marker last: a crash in between leaves a certificate that is not marked
    // as ours, so the next start generates a fresh pair instead of trusting a half-written one.
    let _ = std::fs::remove_file(dir.join(SELF_SIGNED_META));
    write("tls.key", key_pem.as_bytes(), 0o600)?;
    write("tls.crt", cert_pem.as_bytes(), 0o644)?;
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    write(SELF_SIGNED_META, &json, 0o644)
}

/// Chooses the certificate for each handshake from the current snapshot.
#[derive(Debug)]
pub struct SnapshotResolver {
    current: Arc<ArcSwap<Snapshot>>,
    /// The TLS Secret served when no other certificate covers the SNI name (an SMTP service's
    /// own); `None`: by SNI only, and a handshake without a covered name fails.
    secret: Option<String>,
}

impl SnapshotResolver {
    /// Serves, per handshake, whichever certificate of the live snapshot covers the SNI name,
    /// and nothing else: no SNI, or a name no loaded certificate covers, fails the handshake
    /// (the MTA-STS policy host, [`crate::policy_host`]). A rotated or newly referenced
    /// certificate is served from the next snapshot on, without a restart.
    pub fn sni_only(current: Arc<ArcSwap<Snapshot>>) -> Self {
        SnapshotResolver {
            current,
            secret: None,
        }
    }
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.current.load();
        let covering = |sni: &str| {
            snap.certs
                .values()
                .find(|c| c.dns_names.iter().any(|n| name_matches(n, sni)))
                .map(|c| c.key.clone())
        };
        let Some(secret) = &self.secret else {
            return hello.server_name().and_then(covering);
        };
        if let Some(sni) = hello.server_name() {
            let own = snap.certs.get(secret);
            let own_matches = own.is_some_and(|c| c.dns_names.iter().any(|n| name_matches(n, sni)));
            if !own_matches {
                if let Some(other) = covering(sni) {
                    return Some(other);
                }
            }
        }
        snap.certs.get(secret).map(|c| c.key.clone())
    }
}

/// A rustls server configuration whose certificate is chosen by SNI alone from the live
/// snapshot ([`SnapshotResolver::sni_only`]), offering HTTP/1.1 by ALPN.
pub fn sni_only_acceptor(
    current: Arc<ArcSwap<Snapshot>>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SnapshotResolver::sni_only(current)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// DNS name match with a single leading `*.` wildcard label.
fn name_matches(pattern: &str, name: &str) -> bool {
    if let Some(suffix) = pattern.strip_prefix("*.") {
        return name
            .split_once('.')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix));
    }
    pattern.eq_ignore_ascii_case(name)
}

/// rustls server configs per TLS Secret; the resolver inside reads the live snapshot, so these
/// never need rebuilding.
pub struct TlsAcceptors {
    current: Arc<ArcSwap<Snapshot>>,
    by_secret: Mutex<HashMap<String, tokio_rustls::TlsAcceptor>>,
}

impl TlsAcceptors {
    pub fn new(current: Arc<ArcSwap<Snapshot>>) -> Self {
        TlsAcceptors {
            current,
            by_secret: Mutex::new(HashMap::new()),
        }
    }

    pub fn acceptor(&self, secret: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let mut map = self
            .by_secret
            .lock()
            .map_err(|_| anyhow::anyhow!("acceptor cache poisoned"))?;
        if let Some(a) = map.get(secret) {
            return Ok(a.clone());
        }
        let resolver = SnapshotResolver {
            current: self.current.clone(),
            secret: Some(secret.to_string()),
        };
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        map.insert(secret.to_string(), acceptor.clone());
        Ok(acceptor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_of_a_generated_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["mx.example.test".to_string()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let pk = PrivateKeyDer::try_from(key.serialize_der()).expect("pk");
        let ck = certified_key(vec![cert.der().clone()], pk).expect("certified key");
        // 2031-05-17T00:00:00Z
        assert_eq!(not_after(&ck), Some(1_936_742_400));
    }

    #[test]
    fn wildcard_names() {
        assert!(name_matches("*.example.test", "mx.example.test"));
        assert!(!name_matches("*.example.test", "a.b.example.test"));
        assert!(name_matches("MX.example.test", "mx.EXAMPLE.test"));
    }
}
