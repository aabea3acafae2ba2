//! Target `auth`: one SASL exchange ([`Exchange`]) of PLAIN, LOGIN, SCRAM-SHA-256 or CRAM-MD5
//! fed fuzzed client messages in sequence, the way the driver feeds them (the claimed login
//! is read before every step). Invariants:
//!
//! * `step` never panics, not even inside (a panic contained by the relay's `catch_unwind`
//!   around every SASL step — rsasl's PLAIN/LOGIN, the relay's own SCRAM-SHA-256 — shows up as
//!   [`AuthFailure::Internal`], and under AFL the panic hook aborts first, so both are findings);
//! * success only with proof of the secret: PLAIN and LOGIN succeed only when the client sent
//!   the account's password (on a two-factor account: an app password, never the primary
//!   one); SCRAM and CRAM-MD5 only when the harness computed the proof for the client; the
//!   login reported is the account's; a claimed login is never empty or over 320 bytes;
//! * a finished exchange stays finished.
//!
//! SCRAM and CRAM-MD5 bind the proof to a random server challenge, so a fuzzed message can
//! carry placeholders the harness fills in from the exchange so far: `@NONCE@` (the server's
//! SCRAM nonce), `@PROOF@` (the SCRAM client proof for the message as sent, from the known
//! password) and `@DIGEST@` (the CRAM-MD5 response digest). That lets the fuzzer reach the
//! success paths (server-final, the empty last response) and mutate around a valid proof.
//!
//! Input layout: byte 0 bits 0–1 the mechanism (PLAIN, LOGIN, SCRAM-SHA-256, CRAM-MD5), bit 2
//! set: the exchange starts without an initial response; then the client's messages separated
//! by `\n`. Password verification is real argon2id, with cheap parameters (8 KiB, t=1) so that
//! the fuzzer runs thousands of exchanges a second; the cost parameters are data in the hash,
//! the code path is the relay's.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use mailrelay_crds::config::{Account, AppPassword, Credentials, Mechanism, RelayConfig};
use mailrelay_crds::verifier::{PasswordVerifier, ScramVerifier, SecretString};
use mailrelay_relay::auth::{AuthContext, AuthFailure, Exchange, Step};
use mailrelay_relay::snapshot::Snapshot;
use sha2::{Digest, Sha256};

pub const USER: &str = "user@example.test";
pub const USER_PASSWORD: &str = "secret";
pub const MFA_USER: &str = "mfa@example.test";
pub const MFA_PRIMARY: &str = "primary-password";
pub const MFA_APP: &str = "app-password";
const SCRAM_SALT: &[u8] = b"fuzz-salt-16byte";
const SCRAM_ITERATIONS: u32 = 4096;

pub const MECHANISMS: [Mechanism; 4] = [
    Mechanism::Plain,
    Mechanism::Login,
    Mechanism::ScramSha256,
    Mechanism::CramMd5,
];
/// Byte 0 bit: no initial response.
pub const NO_INITIAL: u8 = 4;

/// A real argon2id PHC hash with the smallest parameters argon2 allows.
fn cheap_verifier(password: &str) -> PasswordVerifier {
    let params = Params::new(8, 1, 1, None).expect("valid argon2 parameters");
    let salt = SaltString::encode_b64(b"fuzz-argon2-salt").expect("valid salt");
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing");
    PasswordVerifier::from_phc(&hash.to_string()).expect("argon2id PHC string")
}

struct Fixture {
    ctx: AuthContext,
    /// SCRAM ClientKey of each account's SCRAM password (the harness is the client).
    client_keys: BTreeMap<&'static str, [u8; 32]>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let user = Account {
            login: USER.into(),
            password: Some(cheap_verifier(USER_PASSWORD)),
            scram_sha256: Some(ScramVerifier::derive_with(
                USER_PASSWORD,
                SCRAM_SALT,
                SCRAM_ITERATIONS,
            )),
            cram_md5_secret: Some(SecretString::new(USER_PASSWORD)),
            nt_hash: None,
            app_passwords: vec![],
            mfa: false,
            sender_addresses: vec![],
            access_policy: None,
        };
        let mfa = Account {
            login: MFA_USER.into(),
            password: Some(cheap_verifier(MFA_PRIMARY)),
            scram_sha256: Some(ScramVerifier::derive_with(
                MFA_PRIMARY,
                SCRAM_SALT,
                SCRAM_ITERATIONS,
            )),
            cram_md5_secret: None,
            nt_hash: None,
            app_passwords: vec![AppPassword {
                name: "phone".into(),
                verifier: cheap_verifier(MFA_APP),
                scram_sha256: Some(ScramVerifier::derive_with(
                    MFA_APP,
                    SCRAM_SALT,
                    SCRAM_ITERATIONS,
                )),
            }],
            mfa: true,
            sender_addresses: vec![],
            access_policy: None,
        };
        let client_key = |password: &str| {
            let salted = ScramVerifier::salted_password(password, SCRAM_SALT, SCRAM_ITERATIONS);
            hmac_sha256(&salted, b"Client Key")
        };
        let mut client_keys = BTreeMap::new();
        client_keys.insert(USER, client_key(USER_PASSWORD));
        // SCRAM on a two-factor account offers the app password's keys.
        client_keys.insert(MFA_USER, client_key(MFA_APP));
        let snapshot = Snapshot {
            config: RelayConfig::default(),
            credentials: Credentials {
                accounts: vec![mfa, user],
                ..Credentials::default()
            },
            certs: BTreeMap::new(),
            missing_certs: BTreeMap::new(),
            policy_loaded: true,
            fingerprint: 0,
            default_hostname: "relay.fuzz.test".into(),
        };
        Fixture {
            ctx: AuthContext {
                snapshot: Arc::new(snapshot),
                service: "submission".into(),
                client_ip: IpAddr::from([192, 0, 2, 1]),
                hostname: "relay.fuzz.test".into(),
                allow_ntlm_v1: true,
            },
            client_keys,
        }
    })
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Builds a target input.
pub fn encode(mechanism: Mechanism, initial: bool, messages: &[&[u8]]) -> Vec<u8> {
    let m = MECHANISMS
        .iter()
        .position(|x| *x == mechanism)
        .expect("known mechanism") as u8;
    let mut v = vec![m | if initial { 0 } else { NO_INITIAL }];
    v.extend_from_slice(&messages.join(&b'\n'));
    v
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let i = haystack.windows(needle.len()).position(|w| w == needle)?;
    let mut out = haystack[..i].to_vec();
    out.extend_from_slice(with);
    out.extend_from_slice(&haystack[i + needle.len()..]);
    Some(out)
}

/// What the exchange has shown so far, for filling in placeholders.
#[derive(Default)]
struct Client {
    /// SCRAM client-first-message-bare, as sent.
    client_first_bare: Option<Vec<u8>>,
    /// SCRAM server-first-message, or the CRAM-MD5 challenge.
    server_first: Option<Vec<u8>>,
    /// SCRAM user name of the client-first message.
    scram_user: Option<String>,
    /// The harness computed a proof (SCRAM) or digest (CRAM-MD5) that went out.
    proved: bool,
}

impl Client {
    fn fill(&mut self, mech: Mechanism, msg: &[u8]) -> Vec<u8> {
        let mut msg = msg.to_vec();
        let Some(server_first) = self.server_first.clone() else {
            return msg;
        };
        match mech {
            Mechanism::ScramSha256 => {
                let nonce = server_first
                    .split(|b| *b == b',')
                    .find_map(|p| p.strip_prefix(b"r="))
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                if let Some(m) = replace(&msg, b"@NONCE@", &nonce) {
                    msg = m;
                }
                let Some(i) = msg.windows(9).position(|w| w == b",p=@PROOF@") else {
                    return msg;
                };
                let without_proof = &msg[..i];
                let (Some(bare), Some(user)) = (&self.client_first_bare, &self.scram_user) else {
                    return msg;
                };
                let account = fixture()
                    .ctx
                    .snapshot
                    .credentials
                    .account(user)
                    .map(|a| a.login.as_str());
                let Some(client_key) = account.and_then(|a| fixture().client_keys.get(a)) else {
                    return msg;
                };
                let mut auth_message = bare.clone();
                auth_message.push(b',');
                auth_message.extend_from_slice(&server_first);
                auth_message.push(b',');
                auth_message.extend_from_slice(without_proof);
                let stored_key = Sha256::digest(client_key);
                let signature = hmac_sha256(&stored_key, &auth_message);
                let proof: Vec<u8> = client_key
                    .iter()
                    .zip(signature)
                    .map(|(k, s)| k ^ s)
                    .collect();
                let mut out = without_proof.to_vec();
                out.extend_from_slice(b",p=");
                out.extend_from_slice(B64.encode(proof).as_bytes());
                out.extend_from_slice(&msg[i + 10..]);
                self.proved = true;
                out
            }
            Mechanism::CramMd5 => {
                let Some(i) = msg.windows(8).position(|w| w == b"@DIGEST@") else {
                    return msg;
                };
                let user = String::from_utf8_lossy(&msg[..i]).trim_end().to_string();
                let Some(secret) = fixture()
                    .ctx
                    .snapshot
                    .credentials
                    .account(&user)
                    .and_then(|a| a.cram_md5_secret.as_ref())
                else {
                    return msg;
                };
                let mut mac = Hmac::<md5::Md5>::new_from_slice(secret.expose().as_bytes())
                    .expect("HMAC takes any key");
                mac.update(&server_first);
                let digest: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                self.proved = true;
                replace(&msg, b"@DIGEST@", digest.as_bytes()).unwrap_or(msg)
            }
            _ => msg,
        }
    }

    /// Remembers what the SCRAM proof is computed over.
    fn sent(&mut self, mech: Mechanism, msg: &[u8]) {
        if mech == Mechanism::ScramSha256 && self.client_first_bare.is_none() {
            let mut parts = msg.splitn(3, |b| *b == b',');
            let (_, _, bare) = (parts.next(), parts.next(), parts.next());
            if let Some(bare) = bare {
                self.client_first_bare = Some(bare.to_vec());
                self.scram_user = bare
                    .split(|b| *b == b',')
                    .find_map(|p| p.strip_prefix(b"n="))
                    .and_then(|u| std::str::from_utf8(u).ok())
                    .map(|u| u.replace("=2C", ",").replace("=3D", "="));
            }
        }
    }
}

/// The secrets that authenticate `login` with PLAIN or LOGIN.
fn secrets(login: &str) -> &'static [&'static str] {
    match login {
        USER => &[USER_PASSWORD],
        MFA_USER => &[MFA_APP],
        _ => &[],
    }
}

/// The client proved knowledge of a secret of `login` in this exchange.
fn legitimate(mech: Mechanism, sent: &[Vec<u8>], client: &Client, login: &str) -> bool {
    let ok = |password: &[u8]| secrets(login).iter().any(|s| s.as_bytes() == password);
    match mech {
        Mechanism::Plain => sent.iter().any(|m| {
            let f: Vec<&[u8]> = m.split(|b| *b == 0).collect();
            f.len() == 3
                && std::str::from_utf8(f[1]).is_ok_and(|u| u.eq_ignore_ascii_case(login))
                && ok(f[2])
        }),
        Mechanism::Login => sent.iter().any(|m| ok(m)),
        Mechanism::ScramSha256 | Mechanism::CramMd5 => client.proved,
        // The `ntlm` target covers NTLM; GSSAPI is MIT's parser. This target starts neither.
        Mechanism::Ntlm | Mechanism::Gssapi => false,
    }
}

pub fn fuzz_one(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mech = MECHANISMS[usize::from(head & 3)];
    let fx = fixture();
    let mut ex = Exchange::new(fx.ctx.clone(), mech).expect("exchange starts");
    let mut inputs: Vec<Option<&[u8]>> = Vec::new();
    if head & NO_INITIAL != 0 {
        inputs.push(None);
    }
    if !rest.is_empty() {
        inputs.extend(rest.split(|b| *b == b'\n').map(Some));
    }
    if inputs.is_empty() {
        inputs.push(None);
    }
    let mut client = Client::default();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for input in inputs {
        let input = input.map(|m| client.fill(mech, m));
        if let Some(m) = &input {
            client.sent(mech, m);
            sent.push(m.clone());
        }
        if let Some(login) = ex.claimed_login(input.as_deref()) {
            assert!(
                !login.is_empty() && login.len() <= 320,
                "claimed login of {} bytes",
                login.len()
            );
        }
        match ex.step(input.as_deref()) {
            Step::Challenge(c) => {
                if client.server_first.is_none() {
                    client.server_first = Some(c);
                }
            }
            Step::Success(login) => {
                let account = fx.ctx.snapshot.credentials.account(&login);
                assert!(
                    account.is_some_and(|a| a.login == login),
                    "success as {login:?}, which is no account's login"
                );
                assert!(
                    legitimate(mech, &sent, &client, &login),
                    "{} succeeded as {login:?} without proof of its secret: {:?}",
                    mech.as_str(),
                    sent.iter()
                        .map(|m| String::from_utf8_lossy(m))
                        .collect::<Vec<_>>()
                );
                assert_finished(&mut ex);
                return;
            }
            Step::Failure(AuthFailure::Internal(e)) => {
                panic!("SASL step panicked (contained): {e}")
            }
            Step::Failure(_) => {
                assert_finished(&mut ex);
                return;
            }
        }
    }
}

/// A finished exchange (success or failure) refuses any further message.
pub fn assert_finished(ex: &mut Exchange) {
    assert!(
        matches!(ex.step(Some(b"")), Step::Failure(AuthFailure::Malformed(_))),
        "a finished exchange went on"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_needs_the_secret() {
        let client = Client::default();
        let plain = |m: &[u8]| legitimate(Mechanism::Plain, &[m.to_vec()], &client, USER);
        assert!(plain(b"\0user@example.test\0secret"));
        assert!(plain(b"\0USER@example.test\0secret"));
        assert!(!plain(b"\0user@example.test\0wrong"));
        assert!(!plain(b"\0other@example.test\0secret"));
        assert!(!plain(b"\0user@example.test\0secret\0"));
        // Two-factor accounts: the app password only.
        let mfa = |m: &[u8]| legitimate(Mechanism::Plain, &[m.to_vec()], &client, MFA_USER);
        assert!(mfa(b"\0mfa@example.test\0app-password"));
        assert!(!mfa(b"\0mfa@example.test\0primary-password"));
        assert!(!legitimate(Mechanism::ScramSha256, &[], &client, USER));
    }
}
