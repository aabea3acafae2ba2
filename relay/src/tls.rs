//! Certificates and the rustls server side. Certificates are part of the config snapshot, so a
//! rotated Secret is served by the next handshake; the [`SnapshotResolver`] picks the certificate
//! per handshake from whatever snapshot is current (by SNI among all configured certificates,
//! else the service's own).

use std::collections::HashMap;
use std::path::Path;
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

/// Loads `<dir>/tls.crt` and `<dir>/tls.key` (PEM, as in a `kubernetes.io/tls` Secret).
pub fn load_pem_dir(dir: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", crt.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate found", crt.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key)
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

/// Self-signed certificates generated for missing Secrets, kept so that reloads do not change
/// them every second.
#[derive(Default)]
pub struct SelfSignedCache {
    certs: Mutex<HashMap<SelfSignedKey, Arc<CertifiedKey>>>,
}

/// (Secret name, DNS names) a self-signed certificate was generated for.
type SelfSignedKey = (String, Vec<String>);

impl SelfSignedCache {
    pub fn get(&self, secret: &str, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
        let key = (secret.to_string(), names.to_vec());
        let mut map = self
            .certs
            .lock()
            .map_err(|_| anyhow::anyhow!("self-signed cache poisoned"))?;
        if let Some(k) = map.get(&key) {
            return Ok(k.clone());
        }
        let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
        let cert = CertificateDer::from(generated.cert.der().to_vec());
        let pk = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ck = certified_key(vec![cert], pk)?;
        map.insert(key, ck.clone());
        Ok(ck)
    }
}

/// Chooses the certificate for each handshake from the current snapshot.
#[derive(Debug)]
pub struct SnapshotResolver {
    current: Arc<ArcSwap<Snapshot>>,
    secret: String,
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.current.load();
        if let Some(sni) = hello.server_name() {
            let own = snap.certs.get(&self.secret);
            let own_matches = own.is_some_and(|c| c.dns_names.iter().any(|n| name_matches(n, sni)));
            if !own_matches {
                if let Some(other) = snap
                    .certs
                    .values()
                    .find(|c| c.dns_names.iter().any(|n| name_matches(n, sni)))
                {
                    return Some(other.key.clone());
                }
            }
        }
        snap.certs.get(&self.secret).map(|c| c.key.clone())
    }
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
            secret: secret.to_string(),
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
