//! MailDomain `dkim` and `spf` → the domain's signing policy in `relay.yaml`, the selectors'
//! private keys in the credentials (never in `relay.yaml`, the status or the report), and the
//! DNS records the domain must publish (`status.dnsRecords`: one DKIM TXT per selector, the SPF
//! record for the relay's egress).
//!
//! A selector with `generateKey` whose Secret does not exist yet is left out with a warning (the
//! operator generates the key before it compiles; `operator render` cannot).
//!
//! A selector whose key cannot be used (missing Secret or key, not a PEM private key, RSA
//! shorter than 2048 bits, algorithm not matching the key) is left out with a `Degraded`
//! problem; the others still sign. With no usable selector the domain's mail goes unsigned
//! (the condition says so) rather than being deferred.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kube::ResourceExt;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use super::report::{Kind, ObjectReport, Problem};
use super::Ctx;
use crate::api::DnsRecord;
use crate::api::MailDomain;
use crate::api::{DkimAlgorithmSpec, DkimSpec, SpfSpec, DKIM_KEY};
use crate::config::{DkimAlgorithm, DkimCanonicalization, DkimPolicy, DkimSelector, DomainPolicy};
use crate::verifier::SecretString;

/// Smallest RSA key accepted for signing.
pub const MIN_RSA_BITS: usize = 2048;

/// Header fields signed when a MailDomain lists none.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Header fields signed once more than they occur (when signed at all), so a second one added
/// in transit breaks the signature instead of being displayed.
pub const OVERSIGNED: &[&str] = &["From", "To", "Subject", "Date"];

/// Placeholder in the SPF record while `spf.egressAddresses` is not set.
pub const EGRESS_PLACEHOLDER: &str = "ip4:EGRESS_ADDRESS";

/// A parsed private key: its algorithm, and the public key as the DKIM record's `p=`.
struct KeyInfo {
    algorithm: DkimAlgorithm,
    public_b64: String,
}

/// Fills in `dkim` of every compiled domain and returns the selectors' private keys by
/// `<selector>._domainkey.<domain>`; each MailDomain's report gets its DNS records.
pub fn compile(
    ctx: &Ctx<'_>,
    objs: &[MailDomain],
    domains: &mut [DomainPolicy],
    reports: &mut [ObjectReport],
) -> BTreeMap<String, SecretString> {
    let mut keys = BTreeMap::new();
    for d in domains.iter_mut() {
        let Some(name) = d.name.clone() else { continue };
        let Some(obj) = objs.iter().find(|o| o.name_any() == name) else {
            continue;
        };
        let Some(r) = reports
            .iter_mut()
            .find(|r| r.kind == Kind::MailDomain && r.name == name)
        else {
            continue;
        };
        let mut records = Vec::new();
        // From the current spec even for a stale domain: a previous output's selectors would
        // have no keys in these credentials.
        d.dkim = None;
        if let Some(spec) = obj.spec.dkim.as_ref().filter(|s| s.enabled) {
            d.dkim = domain_policy(ctx, &d.domain, spec, r, &mut records, &mut keys);
        }
        if obj.spec.dkim.is_some() || obj.spec.spf.is_some() {
            records.push(spf_record(&d.domain, obj.spec.spf.as_ref()));
        }
        r.dns_records = records;
    }
    keys
}

fn domain_policy(
    ctx: &Ctx<'_>,
    domain: &str,
    spec: &DkimSpec,
    r: &mut ObjectReport,
    records: &mut Vec<DnsRecord>,
    keys: &mut BTreeMap<String, SecretString>,
) -> Option<DkimPolicy> {
    let mut selectors = Vec::new();
    let mut pending = 0;
    for (i, s) in spec.selectors.iter().enumerate() {
        let field = format!("spec.dkim.selectors[{i}].keySecretRef");
        let key_name = s.key_secret_ref.key.as_deref().unwrap_or(DKIM_KEY);
        if s.generate_key.is_some() && !ctx.secrets.exists(&s.key_secret_ref.name) {
            // The operator creates the Secret before it compiles, so this is what `operator
            // render` (offline, no key to generate) and a failed creation see.
            r.problems.push(Problem::warning(
                field,
                "DkimKeyNotGenerated",
                format!(
                    "Secret {:?} does not exist yet: the operator generates the key of selector {:?} (generateKey) when it reconciles; operator render cannot generate keys, so the selector does not sign in this output",
                    s.key_secret_ref.name, s.name
                ),
            ));
            pending += 1;
            continue;
        }
        let parsed = ctx
            .secrets
            .get(&s.key_secret_ref.name, key_name)
            .map_err(|m| ("DkimKeyMissing", m))
            .and_then(|pem| {
                let info = key_info(&pem).map_err(|m| ("DkimKeyUnusable", m))?;
                let wanted = s.algorithm.map(|a| match a {
                    DkimAlgorithmSpec::RsaSha256 => DkimAlgorithm::RsaSha256,
                    DkimAlgorithmSpec::Ed25519Sha256 => DkimAlgorithm::Ed25519Sha256,
                });
                match wanted {
                    Some(w) if w != info.algorithm => Err((
                        "DkimKeyUnusable",
                        format!(
                            "algorithm {w:?} does not match the key in Secret {:?} key {key_name:?}",
                            s.key_secret_ref.name
                        ),
                    )),
                    _ => Ok((pem, info)),
                }
            });
        match parsed {
            Ok((pem, info)) => {
                let selector = DkimSelector {
                    name: s.name.to_ascii_lowercase(),
                    algorithm: info.algorithm,
                };
                let a = match info.algorithm {
                    DkimAlgorithm::RsaSha256 => "rsa-sha256",
                    DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
                };
                records.push(DnsRecord {
                    name: selector.key_name(domain),
                    type_: "TXT".into(),
                    value: info.record(),
                    purpose: format!("DKIM selector {} ({a})", selector.name),
                });
                keys.insert(selector.key_name(domain), SecretString::new(pem));
                selectors.push(selector);
            }
            Err((reason, m)) => r.problems.push(Problem::degraded(
                field,
                reason,
                format!("{m}; selector {:?} does not sign", s.name),
            )),
        }
    }
    if selectors.is_empty() && pending == spec.selectors.len() {
        // Only keys still to be generated: expected right after creation (and all `operator
        // render` can show), not a fault.
        r.problems.push(Problem::warning(
            "spec.dkim.selectors",
            "DkimNotSigning",
            format!("the DKIM keys of {domain} are not generated yet, so its mail is sent unsigned until they are"),
        ));
        return None;
    }
    if selectors.is_empty() {
        r.problems.push(Problem::degraded(
            "spec.dkim.selectors",
            "DkimNotSigning",
            format!("no DKIM selector of {domain} has a usable key, so its mail is sent unsigned"),
        ));
        return None;
    }
    let headers: Vec<String> = if spec.headers.is_empty() {
        DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect()
    } else {
        let mut h = spec.headers.clone();
        // RFC 6376 §5.4: From must be signed.
        if !h.iter().any(|x| x.eq_ignore_ascii_case("From")) {
            h.insert(0, "From".into());
        }
        h
    };
    let oversign = OVERSIGNED
        .iter()
        .filter(|o| headers.iter().any(|h| h.eq_ignore_ascii_case(o)))
        .map(|o| o.to_string())
        .collect();
    let (ch, cb) = match spec.canonicalization.as_deref() {
        Some(c) => {
            let (h, b) = c.split_once('/').unwrap_or((c, c));
            (canon(h), canon(b))
        }
        None => (DkimCanonicalization::Relaxed, DkimCanonicalization::Relaxed),
    };
    Some(DkimPolicy {
        selectors,
        headers,
        oversign,
        header_canonicalization: ch,
        body_canonicalization: cb,
    })
}

fn canon(s: &str) -> DkimCanonicalization {
    if s.eq_ignore_ascii_case("simple") {
        DkimCanonicalization::Simple
    } else {
        DkimCanonicalization::Relaxed
    }
}

/// The SPF record of the relay's egress for `domain`.
fn spf_record(domain: &str, spec: Option<&SpfSpec>) -> DnsRecord {
    let mut terms = vec!["v=spf1".to_string()];
    let egress = spec.map(|s| s.egress_addresses.as_slice()).unwrap_or(&[]);
    if egress.is_empty() {
        terms.push(EGRESS_PLACEHOLDER.into());
    }
    for a in egress {
        terms.push(if a.contains(':') {
            format!("ip6:{a}")
        } else {
            format!("ip4:{a}")
        });
    }
    for i in spec.map(|s| s.include.as_slice()).unwrap_or(&[]) {
        terms.push(if i.contains(':') {
            i.clone()
        } else {
            format!("include:{i}")
        });
    }
    terms.push("-all".into());
    DnsRecord {
        name: domain.to_string(),
        type_: "TXT".into(),
        value: terms.join(" "),
        purpose: if egress.is_empty() {
            format!("SPF: replace {EGRESS_PLACEHOLDER} with the relay's public egress address (or set spec.spf.egressAddresses); merge with an existing SPF record, a domain may have only one")
        } else {
            "SPF: merge with an existing SPF record, a domain may have only one".into()
        },
    }
}

impl KeyInfo {
    /// The selector's DNS TXT record (RFC 6376 §3.6.1).
    fn record(&self) -> String {
        let k = match self.algorithm {
            DkimAlgorithm::RsaSha256 => "rsa",
            DkimAlgorithm::Ed25519Sha256 => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_b64)
    }
}

/// The DKIM TXT record (`v=DKIM1; k=…; p=…`) a selector with this PEM private key needs, as
/// `status.dnsRecords` lists it; `relay diagnose` compares DNS with it.
pub fn dkim_record(pem: &str) -> Result<String, String> {
    key_info(pem).map(|k| k.record())
}

/// Parses a PEM private key (PKCS#8, or PKCS#1 for RSA): its algorithm and DKIM public key.
fn key_info(pem: &str) -> Result<KeyInfo, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "the key is not a PEM private key".to_string())?;
    if let PrivateKeyDer::Pkcs8(p8) = &der {
        if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
            return Ok(KeyInfo {
                algorithm: DkimAlgorithm::Ed25519Sha256,
                public_b64: B64.encode(k.public_key()),
            });
        }
    }
    let neither = || "the key is neither an RSA nor an Ed25519 private key".to_string();
    // The size first: the signing backend refuses short keys without saying why.
    let bits = rsa_private_key_bits(&der).ok_or_else(neither)?;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "the RSA key has {bits} bits; DKIM keys need at least {MIN_RSA_BITS}"
        ));
    }
    let key = RsaKey::<Sha256>::from_key_der(der).map_err(|_| neither())?;
    let pkcs1 = key.public_key();
    Ok(KeyInfo {
        algorithm: DkimAlgorithm::RsaSha256,
        public_b64: B64.encode(spki_of_rsa(&pkcs1)),
    })
}

fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// The SubjectPublicKeyInfo of a PKCS#1 `RSAPublicKey` (what DKIM records usually carry).
fn spki_of_rsa(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALG.len() + bits.len(), &mut out);
    out.extend_from_slice(ALG);
    out.extend(bits);
    out
}

/// Modulus size of an RSA private key (PKCS#8 or PKCS#1); `None` when it is not one. Only
/// parses: no private-key operation.
pub fn rsa_private_key_bits(der: &PrivateKeyDer<'_>) -> Option<usize> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = match der {
        PrivateKeyDer::Pkcs1(k) => rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der()).ok()?,
        PrivateKeyDer::Pkcs8(k) => rsa::RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der()).ok()?,
        _ => return None,
    };
    Some(key.n().bits())
}

/// Modulus size of a DER PKCS#1 `RSAPublicKey` (0 when it does not parse).
pub fn rsa_modulus_bits(der: &[u8]) -> usize {
    fn item(b: &[u8]) -> Option<(u8, &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len]))
    }
    let Some((0x30, seq)) = item(der) else {
        return 0;
    };
    let Some((0x02, modulus)) = item(seq) else {
        return 0;
    };
    let skip = modulus.iter().take_while(|&&b| b == 0).count();
    match modulus[skip..].first() {
        Some(&top) => (modulus.len() - skip - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}
