//! The hand-off TLS Secret: a private CA and one leaf certificate that
//! every relay and every drain Job presents and checks, so only pods holding the Secret can
//! hand mail to the relays' hand-off listener. The operator creates it when missing and
//! replaces it when its keys do not parse or a certificate expires within [`RENEW_BEFORE_DAYS`]
//! (a new CA and leaf at once: for the minute or two the kubelet takes to update every mounted
//! copy, hand-offs between pods with different copies fail and drains retry); a usable Secret is
//! never touched. No key material is logged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::manifests::labels;

/// The DNS name in the leaf certificate; drains verify receivers against it (`--server-name`).
pub const SERVER_NAME: &str = "handoff.mailrelay.internal";
pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

const YEAR: i64 = 365 * 86400;
/// A Secret whose CA or leaf expires within this many days is replaced.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// The PEM files of the Secret.
pub struct Material {
    pub ca_crt: String,
    pub tls_crt: String,
    /// PKCS#8.
    pub tls_key: String,
}

fn at(unix: i64) -> anyhow::Result<time::OffsetDateTime> {
    Ok(time::OffsetDateTime::from_unix_timestamp(unix)?)
}

/// A new CA (10 years) and a leaf for [`SERVER_NAME`] signed by it (5 years, serverAuth and
/// clientAuth), ECDSA P-256, valid from an hour before `now` (clocks a little behind).
pub fn generate(now: i64) -> anyhow::Result<Material> {
    let from = at(now - 3600)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "mailrelay hand-off CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = from;
    ca.not_after = at(now + 10 * YEAR)?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = from;
    leaf.not_after = at(now + 5 * YEAR)?;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(Material {
        ca_crt: ca_cert.pem(),
        tls_crt: leaf_cert.pem(),
        tls_key: leaf_key.serialize_pem(),
    })
}

/// Why the Secret must be replaced, or `None` when its keys all parse (the CA and leaf as
/// certificates, the key as a private key rustls can sign with) and neither certificate expires
/// within [`RENEW_BEFORE_DAYS`] of `now` (Unix seconds).
pub fn problem(secret: &Secret, now: i64) -> Option<String> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let get = |k: &str| {
        data.get(k)
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
    };
    for k in [CA_CRT, TLS_CRT] {
        let Some(pem) = get(k) else {
            return Some(format!("key {k} is missing"));
        };
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
        let first = match certs {
            Ok(c) if !c.is_empty() => c.into_iter().next(),
            _ => return Some(format!("key {k} holds no PEM certificate")),
        };
        let not_after = first.and_then(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            Some(cert.validity().not_after.timestamp())
        });
        match not_after {
            None => return Some(format!("key {k} holds a certificate that does not parse")),
            Some(t) if t < now + RENEW_BEFORE_DAYS * 86400 => {
                return Some(format!(
                    "the certificate in {k} expires within {RENEW_BEFORE_DAYS} days"
                ))
            }
            Some(_) => {}
        }
    }
    let Some(pem) = get(TLS_KEY) else {
        return Some(format!("key {TLS_KEY} is missing"));
    };
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) if rustls::crypto::ring::sign::any_supported_type(&k).is_ok() => None,
        _ => Some(format!("key {TLS_KEY} holds no usable PEM private key")),
    }
}

/// The Secret `name` holding `m`.
pub fn secret(name: &str, namespace: &str, instance: &str, m: &Material) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels(instance, "handoff")),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_CRT.to_string(), b(&m.ca_crt)),
            (TLS_CRT.to_string(), b(&m.tls_crt)),
            (TLS_KEY.to_string(), b(&m.tls_key)),
        ])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca: &str) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            r.add(c.expect("ca pem")).expect("add ca");
        }
        Arc::new(r)
    }

    fn chain(m: &Material) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let certs = CertificateDer::pem_slice_iter(m.tls_crt.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("leaf pem");
        let key = PrivateKeyDer::from_pem_slice(m.tls_key.as_bytes()).expect("key pem");
        (certs, key)
    }

    /// A TLS handshake over an in-memory pipe: the server requires a client certificate chained
    /// to `server_ca`, the client verifies the server against `client_ca`; both present
    /// their `Material`'s leaf. Ok when both sides complete and exchange a byte.
    async fn handshake(server: &Material, client: &Material) -> Result<(), String> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&server.ca_crt), provider())
                .build()
                .map_err(|e| e.to_string())?;
        let (certs, key) = chain(server);
        let sc = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        let (certs, key) = chain(client);
        let cc = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&client.ca_crt))
            .with_client_auth_cert(certs, key)
            .map_err(|e| e.to_string())?;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(&buf).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        });
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
        let cli = async {
            let mut c = connector
                .connect(name, b)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"x").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let (s, c) = tokio::join!(srv, cli);
        s.map_err(|e| e.to_string())??;
        c
    }

    #[tokio::test]
    async fn the_leaf_serves_and_authenticates_against_its_ca() {
        let m = generate(now()).expect("generate");
        assert!(m.tls_key.contains("BEGIN PRIVATE KEY"), "PKCS#8");
        handshake(&m, &m)
            .await
            .expect("mutual TLS with the generated pair");
    }

    #[tokio::test]
    async fn a_leaf_of_another_ca_is_refused_both_ways() {
        let ours = generate(now()).expect("generate");
        let theirs = generate(now()).expect("generate");
        // A client with a certificate of another CA: the server refuses it.
        let mixed_client = Material {
            ca_crt: ours.ca_crt.clone(),
            tls_crt: theirs.tls_crt.clone(),
            tls_key: theirs.tls_key.clone(),
        };
        assert!(handshake(&ours, &mixed_client).await.is_err());
        // A server with a certificate of another CA: the client refuses it.
        let mixed_server = Material {
            ca_crt: ours.ca_crt.clone(),
            tls_crt: theirs.tls_crt.clone(),
            tls_key: theirs.tls_key.clone(),
        };
        assert!(handshake(&mixed_server, &ours).await.is_err());
    }

    #[test]
    fn secret_validity_is_about_parseable_keys() {
        let m = generate(now()).expect("generate");
        let mut s = secret("mail-handoff", "mail", "mailrelay", &m);
        assert_eq!(problem(&s, now()), None);
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            s.metadata.labels.as_ref().expect("labels")["app.kubernetes.io/managed-by"],
            "mailrelay-operator"
        );
        let data = s.data.as_mut().expect("data");
        data.insert(TLS_KEY.into(), ByteString(b"garbage".to_vec()));
        assert!(problem(&s, now()).expect("problem").contains("tls.key"));
        s.data.as_mut().expect("data").remove(CA_CRT);
        assert!(problem(&s, now()).expect("problem").contains("ca.crt"));
        assert!(problem(&Secret::default(), now()).is_some());
    }

    #[test]
    fn a_secret_close_to_expiry_is_replaced() {
        let m = generate(now()).expect("generate");
        let s = secret("mail-handoff", "mail", "mailrelay", &m);
        // The leaf (5 years) expires first: 20 days before its end it is due for renewal.
        let late = now() + 5 * YEAR - 20 * 86400;
        let why = problem(&s, late).expect("renewal due");
        assert!(why.contains("tls.crt") && why.contains("expires"), "{why}");
        assert_eq!(problem(&s, now() + 5 * YEAR - 40 * 86400), None);
    }
}
