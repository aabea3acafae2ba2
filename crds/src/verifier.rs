//! Password verifiers: what the relay stores instead of passwords. PLAIN and LOGIN are checked
//! against an argon2id PHC string; SCRAM-SHA-256 (RFC 5802/7677) against the salted stored and
//! server keys, which is all a SCRAM server needs; NTLM against the NT hash. Derivation lives here so that the compiler and
//! the relay agree byte for byte.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// SCRAM iteration count for derived keys (RFC 7677 recommends at least 4096).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// The NT hash of MS-NLMP §3.3.1 (`NTOWFv1`): MD4 over the UTF-16LE password, as lower-case
/// hex. Unsalted and password-equivalent for NTLM: whoever holds it can log in with NTLM.
pub fn nt_hash(password: &str) -> SecretString {
    use md4::Md4;
    let utf16: Vec<u8> = password.encode_utf16().flat_map(u16::to_le_bytes).collect();
    SecretString::new(hex::encode(Md4::digest(&utf16)))
}

/// A string that must never appear in logs: `Debug` and `Display` print a placeholder.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }
    /// The secret itself, for the one place that needs it (an authentication exchange).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An argon2id hash in PHC string format (`$argon2id$v=19$m=...`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PasswordVerifier(String);

impl fmt::Debug for PasswordVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordVerifier(argon2id)")
    }
}

impl PasswordVerifier {
    /// Hashes `password` with argon2id (default parameters: 19 MiB, t=2, p=1) and a random salt.
    pub fn derive(password: &str) -> Self {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            // Only fails for parameter/salt errors, which are constants here.
            .unwrap_or_default();
        PasswordVerifier(hash)
    }

    /// Accepts an existing hash supplied by an administrator; only argon2id PHC strings qualify.
    pub fn from_phc(phc: &str) -> Result<Self, String> {
        let parsed = PasswordHash::new(phc.trim()).map_err(|e| {
            format!("not a PHC password hash ({e}); expected $argon2id$v=19$m=...,t=...,p=...$salt$hash")
        })?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(format!(
                "hash algorithm {:?} is not accepted; use argon2id",
                parsed.algorithm.as_str()
            ));
        }
        if parsed.hash.is_none() || parsed.salt.is_none() {
            return Err("the argon2id hash has no salt or no hash part".into());
        }
        Ok(PasswordVerifier(phc.trim().to_string()))
    }

    /// Whether `password` matches this argon2id hash. A malformed hash matches nothing.
    pub fn verify(&self, password: &str) -> bool {
        match PasswordHash::new(&self.0) {
            Ok(h) => Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// The PHC string, as stored in `credentials.yaml`.
    pub fn as_phc(&self) -> &str {
        &self.0
    }
}

/// SCRAM-SHA-256 server-side keys for one password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count sent to the client ([`SCRAM_ITERATIONS`] for derived keys).
    pub iterations: u32,
    /// Base64 salt.
    pub salt: String,
    /// Base64 `H(ClientKey)`.
    pub stored_key: String,
    /// Base64 `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: String,
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScramVerifier(i={})", self.iterations)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    m.update(msg);
    m.finalize().into_bytes().into()
}

impl ScramVerifier {
    /// Derives keys with a fresh random 16-byte salt.
    pub fn derive(password: &str) -> Self {
        Self::derive_with(password, &Self::random_salt(), SCRAM_ITERATIONS)
    }

    /// A fresh 16-byte salt from the operating system's CSPRNG.
    pub fn random_salt() -> [u8; 16] {
        let mut salt = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        salt
    }

    /// Derives keys with the given salt and iteration count (deterministic; for tests and for
    /// checking a password against existing keys).
    pub fn derive_with(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = Self::salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let server_key = hmac(&salted, b"Server Key");
        ScramVerifier {
            iterations,
            salt: B64.encode(salt),
            stored_key: B64.encode(stored_key),
            server_key: B64.encode(server_key),
        }
    }

    /// `Hi(password, salt, i)` of RFC 5802 = PBKDF2-HMAC-SHA-256. SASLprep is not applied: the
    /// compiler derives no SCRAM keys for non-ASCII passwords rather than guessing a
    /// normalisation.
    pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
        out
    }

    /// Does `password` produce these keys (used to keep existing salts across recompiles)?
    pub fn verify(&self, password: &str) -> bool {
        match B64.decode(&self.salt) {
            Ok(salt) => Self::derive_with(password, &salt, self.iterations) == *self,
            Err(_) => false,
        }
    }

    /// Salt, stored key and server key as bytes, for a SCRAM exchange; `None` if any of them
    /// is not valid base64.
    pub fn decoded(&self) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        Some((
            B64.decode(&self.salt).ok()?,
            B64.decode(&self.stored_key).ok()?,
            B64.decode(&self.server_key).ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_round_trip() {
        let v = PasswordVerifier::derive("s3cret");
        assert!(v.verify("s3cret"));
        assert!(!v.verify("S3cret"));
        assert!(PasswordVerifier::from_phc(v.as_phc()).is_ok());
        assert!(format!("{v:?}").find("argon2id$").is_none());
    }

    #[test]
    fn phc_rejects_other_algorithms() {
        assert!(PasswordVerifier::from_phc("$2b$12$abcdefghijklmnopqrstuv").is_err());
        assert!(PasswordVerifier::from_phc("plaintext").is_err());
    }

    #[test]
    fn scram_matches_rfc7677_vector() {
        // RFC 7677 section 3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, i=4096.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::derive_with("pencil", &salt, 4096);
        let salted = ScramVerifier::salted_password("pencil", &salt, 4096);
        // ServerSignature from the RFC's exchange, computed with our server key.
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server_key = hmac(&salted, b"Server Key");
        let sig = hmac(&server_key, auth_message.as_bytes());
        assert_eq!(
            B64.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert!(v.verify("pencil"));
        assert!(!v.verify("pencil2"));
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(format!("{:?}", SecretString::new("hunter2")), "<redacted>");
    }

    #[test]
    fn nt_hash_matches_ms_nlmp() {
        // MS-NLMP §4.2.2.1.2: NTOWFv1("Password").
        assert_eq!(
            nt_hash("Password").expose(),
            "a4f49c406510bdcab6824ee7c30fd852"
        );
    }
}
