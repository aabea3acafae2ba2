//! DKIM signing of accepted mail (RFC 6376, RFC 8463 for Ed25519): owns which message is signed
//! for which domain, the signers built from a policy snapshot's keys, and the
//! `DKIM-Signature:` header fields the session driver prepends before the message is spooled.
//!
//! A message is signed for the `MailDomain` of its `From:` header (DMARC aligns on `From:`),
//! or for the nearest parent domain that signs (relaxed alignment); the envelope sender is not
//! used, and a message without a parsable `From:` is not signed. Every selector of the domain
//! signs (key rotation, RSA and Ed25519 at once). `l=` is never set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mailrelay_crds::compile::{rsa_private_key_bits, MIN_RSA_BITS};
use mailrelay_crds::config::{DkimAlgorithm, DkimCanonicalization, DkimPolicy, RelayConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::snapshot::Snapshot;

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// One selector of a domain, or why it cannot sign.
struct Selector {
    name: String,
    signer: Result<Signer, String>,
}

/// The signers of one snapshot, by lower-case domain.
pub struct Signers {
    domains: HashMap<String, Vec<Selector>>,
}

/// Why a message of a signing domain could not be signed.
#[derive(Debug)]
pub struct SignError {
    /// The domain whose selector failed.
    pub domain: String,
    /// The failing selector.
    pub selector: String,
    /// Metric label: `key_missing`, `key_invalid` or `sign_failed`.
    pub reason: &'static str,
    /// Log detail (never key material).
    pub detail: String,
}

/// The outcome of [`sign`] for one message.
pub struct Signed {
    /// The domain signed for (`d=`), when the message was signed.
    pub domain: Option<String>,
    /// The selectors that signed.
    pub selectors: Vec<String>,
    /// The `DKIM-Signature:` header fields, CRLF-terminated, to prepend.
    pub headers: Vec<u8>,
}

impl Signers {
    /// Builds the signers of `config` with the keys in `credentials`; a selector whose key is
    /// missing or unusable fails at signing time (the message is deferred, not sent unsigned).
    pub fn build(config: &RelayConfig, keys: &dyn Fn(&str) -> Option<String>) -> Signers {
        let mut domains = HashMap::new();
        for d in &config.domains {
            let Some(policy) = &d.dkim else { continue };
            let domain = d.domain.to_ascii_lowercase();
            let selectors = policy
                .selectors
                .iter()
                .map(|s| Selector {
                    name: s.name.clone(),
                    signer: match keys(&s.key_name(&domain)) {
                        None => Err("key_missing".into()),
                        Some(pem) => build_signer(&domain, &s.name, s.algorithm, policy, &pem),
                    },
                })
                .collect();
            domains.insert(domain, selectors);
        }
        Signers { domains }
    }

    /// True when no domain signs: the driver then never holds a message back to sign it.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The signing domain for a `From:` domain: itself or its nearest signing parent.
    fn domain_for(&self, from_domain: &str) -> Option<&str> {
        let mut d = from_domain;
        loop {
            if let Some((k, _)) = self.domains.get_key_value(d) {
                return Some(k.as_str());
            }
            d = d.split_once('.')?.1;
            if !d.contains('.') {
                return None;
            }
        }
    }

    /// Whether the message whose header section starts `message` is signed.
    pub fn signs(&self, message: &[u8]) -> bool {
        !self.is_empty()
            && from_domain(message)
                .as_deref()
                .and_then(|d| self.domain_for(d))
                .is_some()
    }
}

fn build_signer(
    domain: &str,
    selector: &str,
    algorithm: DkimAlgorithm,
    policy: &DkimPolicy,
    pem: &str,
) -> Result<Signer, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "the key is not a PEM private key".to_string())?;
    let mut headers: Vec<String> = policy.headers.clone();
    headers.extend(policy.oversign.iter().cloned());
    let ch = canonicalization(policy.header_canonicalization);
    let cb = canonicalization(policy.body_canonicalization);
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let not_rsa = || "the key is not an RSA private key".to_string();
            // The size first: the signing backend refuses short keys without saying why.
            let bits = rsa_private_key_bits(&der).ok_or_else(not_rsa)?;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA key has {bits} bits, {MIN_RSA_BITS} needed"
                ));
            }
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|_| not_rsa())?;
            Ok(Signer::Rsa(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(selector)
                    .headers(headers)
                    .header_canonicalization(ch)
                    .body_canonicalization(cb),
            ))
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let PrivateKeyDer::Pkcs8(p8) = der else {
                return Err("an Ed25519 key must be PKCS#8".into());
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der())
                .map_err(|_| "the key is not an Ed25519 private key".to_string())?;
            Ok(Signer::Ed25519(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(selector)
                    .headers(headers)
                    .header_canonicalization(ch)
                    .body_canonicalization(cb),
            ))
        }
    }
}

fn canonicalization(c: DkimCanonicalization) -> Canonicalization {
    match c {
        DkimCanonicalization::Relaxed => Canonicalization::Relaxed,
        DkimCanonicalization::Simple => Canonicalization::Simple,
    }
}

/// Signers are built once per snapshot (RSA key parsing is not free), keyed by its fingerprint.
static CACHE: Mutex<Option<(u64, Arc<Signers>)>> = Mutex::new(None);

/// The signers of `snap`.
pub fn signers(snap: &Snapshot) -> Arc<Signers> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((fp, s)) = cache.as_ref() {
        if *fp == snap.fingerprint {
            return s.clone();
        }
    }
    let s = Arc::new(Signers::build(&snap.config, &|name| {
        snap.credentials
            .dkim_keys
            .get(name)
            .map(|k| k.expose().to_string())
    }));
    *cache = Some((snap.fingerprint, s.clone()));
    s
}

/// Signs `message` (the complete message as it will be relayed, with this relay's trace
/// headers) with every selector of its `From:` domain. A message of no signing domain comes
/// back with no headers; one whose selector cannot sign is an error (never sent unsigned).
pub fn sign(signers: &Signers, message: &[u8]) -> Result<Signed, SignError> {
    let mut out = Signed {
        domain: None,
        selectors: Vec::new(),
        headers: Vec::new(),
    };
    let Some(domain) = from_domain(message)
        .as_deref()
        .and_then(|d| signers.domain_for(d))
        .map(str::to_string)
    else {
        return Ok(out);
    };
    let selectors = signers
        .domains
        .get(&domain)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for s in selectors {
        let fail = |reason: &'static str, detail: String| SignError {
            domain: domain.clone(),
            selector: s.name.clone(),
            reason,
            detail,
        };
        let signature = match &s.signer {
            Err(e) if e == "key_missing" => {
                return Err(fail("key_missing", "no key in the credentials".into()))
            }
            Err(e) => return Err(fail("key_invalid", e.clone())),
            Ok(Signer::Rsa(signer)) => signer.sign(message),
            Ok(Signer::Ed25519(signer)) => signer.sign(message),
        }
        .map_err(|e| fail("sign_failed", e.to_string()))?;
        out.headers
            .extend_from_slice(signature.to_header().as_bytes());
        out.selectors.push(s.name.clone());
    }
    out.domain = Some(domain);
    Ok(out)
}

/// The header section of `message` is complete (an empty line was seen).
pub fn header_complete(message: &[u8]) -> bool {
    message.starts_with(b"\r\n") || message.windows(4).any(|w| w == b"\r\n\r\n")
}

/// The lower-case domain of the (first) address in the `From:` header, if there is one.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let mut value: Option<Vec<u8>> = None;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(v) = value.as_mut() {
                v.extend_from_slice(line);
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:") {
            value = Some(line[5..].to_vec());
        }
    }
    let value = String::from_utf8_lossy(&value?).into_owned();
    let addr = match (value.find('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => value[a + 1..b].to_string(),
        _ => strip_comments(&value),
    };
    let addr = addr.split(',').next().unwrap_or("").trim();
    let (_, domain) = addr.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b >= 0x80);
    valid.then_some(domain)
}

fn strip_comments(s: &str) -> String {
    let mut depth = 0usize;
    s.chars()
        .filter(|&c| match c {
            '(' => {
                depth += 1;
                false
            }
            ')' => {
                depth = depth.saturating_sub(1);
                false
            }
            _ => depth == 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_forms() {
        let d = |m: &str| from_domain(m.as_bytes());
        assert_eq!(
            d("To: a@b\r\nFrom: Alice <alice@Example.COM>\r\n\r\nx"),
            Some("example.com".into())
        );
        assert_eq!(
            d("From: bob@example.org (Bob)\r\n\r\n"),
            Some("example.org".into())
        );
        assert_eq!(
            d("From:\r\n \"A, B\" <x@fold.example>\r\n\r\n"),
            Some("fold.example".into())
        );
        assert_eq!(d("Subject: no from\r\n\r\nFrom: a@b.example\r\n"), None);
        assert_eq!(d("From: nobody\r\n\r\n"), None);
    }

    #[test]
    fn rsa_bits_of_a_pkcs1_key() {
        use mailrelay_crds::compile::rsa_modulus_bits;
        // SEQUENCE { INTEGER 0x00 0x80 .. (1024 bits), INTEGER 65537 }
        let mut modulus = vec![0x00, 0x80];
        modulus.extend(std::iter::repeat_n(1u8, 127));
        let mut seq = vec![0x02, 0x81, modulus.len() as u8];
        seq.extend(&modulus);
        seq.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        let mut der = vec![0x30, 0x81, seq.len() as u8];
        der.extend(&seq);
        assert_eq!(rsa_modulus_bits(&der), 1024);
        assert_eq!(rsa_modulus_bits(b"junk"), 0);
    }
}
