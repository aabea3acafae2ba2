//! DKIM keys the operator generates: for each MailDomain selector with `generateKey` whose
//! `keySecretRef` Secret does not exist, a new private key in a Secret the operator creates,
//! owned by the MailDomain and labelled as managed by the operator. Owns only that creation: an
//! existing Secret is never overwritten (a create that finds one is left alone), so a key is
//! never rotated behind the administrator's back. The private key is written to the Secret and
//! nowhere else (not logged, not in any status or Event).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use mailrelay_crds::api::{DkimAlgorithmSpec, DkimGenerateKeySpec, MailDomain, DKIM_KEY};
use mailrelay_crds::compile::Problem;

use crate::manifests;
use crate::status::Finding;

/// RSA modulus size when `generateKey.bits` is unset.
pub const DEFAULT_RSA_BITS: u32 = 2048;

/// A new PEM (PKCS#8) private key for `spec`.
pub fn generate(spec: &DkimGenerateKeySpec) -> Result<String, String> {
    match spec.algorithm {
        DkimAlgorithmSpec::Ed25519Sha256 => {
            use rsa::rand_core::{OsRng, RngCore};
            // Any 32 random bytes are an Ed25519 private key (RFC 8032 §5.1.5). Written as the
            // RFC 8410 PKCS#8 v1 form that openssl and opendkim read too (ring's v2 form is not
            // read by openssl).
            let mut seed = [0u8; 32];
            OsRng
                .try_fill_bytes(&mut seed)
                .map_err(|e| format!("cannot generate an Ed25519 key: {e}"))?;
            const PREFIX: [u8; 16] = [
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            let mut der = PREFIX.to_vec();
            der.extend_from_slice(&seed);
            Ok(pem("PRIVATE KEY", &der))
        }
        DkimAlgorithmSpec::RsaSha256 => {
            use rsa::pkcs8::{EncodePrivateKey, LineEnding};
            let bits = spec.bits.unwrap_or(DEFAULT_RSA_BITS);
            if ![2048, 3072, 4096].contains(&bits) {
                return Err(format!(
                    "generateKey.bits must be 2048, 3072 or 4096, not {bits}"
                ));
            }
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits as usize)
                .map_err(|e| format!("cannot generate an RSA key: {e}"))?;
            key.to_pkcs8_pem(LineEnding::LF)
                .map(|pem| pem.to_string())
                .map_err(|e| format!("cannot encode the RSA key: {e}"))
        }
    }
}

/// `der` as a PEM block with 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What key generation did in one namespace.
#[derive(Default)]
pub struct Generated {
    /// The Secrets created, for the compile of the same reconcile (the watch has not seen them
    /// yet).
    pub created: Vec<Secret>,
    /// Failures per MailDomain name.
    pub findings: BTreeMap<String, Vec<Finding>>,
}

/// Creates the missing Secrets of the selectors with `generateKey` in `ns`. `secrets` are the
/// namespace's Secrets as the watch sees them.
pub async fn ensure(
    client: &Client,
    ns: &str,
    instance: &str,
    domains: &[MailDomain],
    secrets: &[Secret],
) -> Generated {
    let mut out = Generated::default();
    let exists = |name: &str, created: &[Secret]| {
        secrets
            .iter()
            .chain(created)
            .any(|s| s.metadata.name.as_deref() == Some(name))
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for d in domains {
        let Some(dkim) = d.spec.dkim.as_ref().filter(|k| k.enabled) else {
            continue;
        };
        let Some(owner) = d.controller_owner_ref(&()) else {
            continue;
        };
        // Selectors sharing one Secret (different keys in it) get it in one create.
        let mut wanted: BTreeMap<&str, Vec<(usize, &str, &DkimGenerateKeySpec)>> = BTreeMap::new();
        for (i, s) in dkim.selectors.iter().enumerate() {
            let Some(g) = s.generate_key.as_ref() else {
                continue;
            };
            if exists(&s.key_secret_ref.name, &out.created) {
                continue;
            }
            let key = s.key_secret_ref.key.as_deref().unwrap_or(DKIM_KEY);
            wanted
                .entry(s.key_secret_ref.name.as_str())
                .or_default()
                .push((i, key, g));
        }
        for (secret_name, keys) in wanted {
            let mut data = BTreeMap::new();
            let mut failed = None;
            for &(i, key, g) in &keys {
                // RSA generation takes a while; keep it off the async workers.
                let g2 = g.clone();
                let pem = tokio::task::spawn_blocking(move || generate(&g2))
                    .await
                    .map_err(|e| format!("key generation failed: {e}"))
                    .and_then(|r| r);
                match pem {
                    Ok(p) => {
                        data.insert(key.to_string(), ByteString(p.into_bytes()));
                    }
                    Err(m) => {
                        failed = Some((i, m));
                        break;
                    }
                }
            }
            let field = |i: usize| format!("spec.dkim.selectors[{i}].generateKey");
            if let Some((i, m)) = failed {
                push(&mut out, d, field(i), m);
                continue;
            }
            let mut secret = Secret {
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            secret.metadata.name = Some(secret_name.to_string());
            secret.metadata.namespace = Some(ns.to_string());
            secret.metadata.labels = Some(manifests::labels(instance, "dkim-key"));
            secret.metadata.owner_references = Some(vec![owner.clone()]);
            let selectors: Vec<&str> = keys
                .iter()
                .map(|&(i, _, _)| dkim.selectors[i].name.as_str())
                .collect();
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(
                        namespace = ns,
                        maildomain = %d.name_any(),
                        secret = secret_name,
                        selectors = ?selectors,
                        "generated DKIM keys into a new Secret"
                    );
                    out.created.push(created);
                }
                // Created meanwhile (by someone else, or by us before the watch saw it): never
                // overwritten; the watch brings it.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(namespace = ns, secret = secret_name, error = %e, "cannot create the DKIM key Secret");
                    let i = keys.first().map_or(0, |k| k.0);
                    push(
                        &mut out,
                        d,
                        field(i),
                        format!("cannot create Secret {secret_name:?} with the generated key: {e}"),
                    );
                }
            }
        }
    }
    out
}

fn push(out: &mut Generated, d: &MailDomain, field: String, message: String) {
    out.findings
        .entry(d.name_any())
        .or_default()
        .push(Finding::Warning(Problem::warning(
            field,
            "DkimKeyGenerationFailed",
            message,
        )));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_pkcs8_pem_of_the_asked_algorithm() {
        let ed = generate(&DkimGenerateKeySpec {
            algorithm: DkimAlgorithmSpec::Ed25519Sha256,
            bits: None,
        })
        .expect("ed25519");
        assert!(ed.starts_with("-----BEGIN PRIVATE KEY-----"), "{ed}");
        let rsa = generate(&DkimGenerateKeySpec {
            algorithm: DkimAlgorithmSpec::RsaSha256,
            bits: None,
        })
        .expect("rsa");
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let k = rsa::RsaPrivateKey::from_pkcs8_pem(&rsa).expect("pkcs8");
        assert_eq!(k.size() * 8, 2048);
        let bad = generate(&DkimGenerateKeySpec {
            algorithm: DkimAlgorithmSpec::RsaSha256,
            bits: Some(1024),
        });
        assert!(bad.is_err());
    }
}
