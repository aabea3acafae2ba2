//! Outbound TLS policy: the two rustls client configurations delivery uses — one that verifies
//! the server certificate against the host name (built-in Mozilla roots plus an optional private
//! CA from `delivery.tls.extraCaFile`), and one for opportunistic encryption that accepts any
//! certificate, since unauthenticated TLS still beats plain text on port 25 (RFC 7435).
//! Both use the ring provider explicitly so the process keeps exactly one crypto provider.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Clone, Debug)]
pub struct ClientTls {
    pub verified: Arc<ClientConfig>,
    pub unverified: Arc<ClientConfig>,
}

impl ClientTls {
    /// `extra_ca`: PEM file with additional trust anchors.
    pub fn new(extra_ca: Option<&Path>) -> anyhow::Result<ClientTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS client config: {e}"))?
            .with_webpki_verifier(server_verifier(extra_ca)?)
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS client config: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        Ok(ClientTls {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
        })
    }
}

/// The certificate verifier of the verified configuration: built-in Mozilla roots plus the
/// optional extra CA file. `relay diagnose` judges a chain it received with it, so its verdict
/// is the one delivery's handshake would reach.
pub fn server_verifier(extra_ca: Option<&Path>) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("reading extra CA file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let cert: CertificateDer<'static> = cert
                .map_err(|e| anyhow::anyhow!("extra CA file {}: bad PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("extra CA file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("extra CA file {} has no certificates", path.display());
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| anyhow::anyhow!("TLS certificate verifier: {e}"))
}

/// The server name to send in SNI and to verify against: a DNS name when the host is one, the
/// IP address otherwise.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_end_matches('.');
    ServerName::try_from(host.to_string()).ok()
}

/// Accepts any certificate but still checks that the server owns the key it presented, so the
/// session is at least encrypted to whoever answered.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
