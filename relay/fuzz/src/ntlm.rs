//! Target `ntlm`: one NTLM exchange ([`Exchange`] with [`Mechanism::Ntlm`]) fed fuzzed
//! NEGOTIATE and AUTHENTICATE messages, the way the driver feeds them (the claimed login is read
//! before every step), against NTLM mail domains `example.test` (NT domain `EXAMPLE`) and
//! `other.test` (`OTHER`), a two-factor account and NTLMv1 allowed, so that every branch of the
//! account mapping and of both response checks is reachable. Invariants:
//!
//! * `step` never panics and never fails internally;
//! * success only when the harness built the AUTHENTICATE from the account's password (the
//!   server challenge is random, so fuzzed bytes alone can never carry a valid response), never
//!   for the two-factor account, and the login reported is the account's;
//! * a claimed login is never empty or over 320 bytes; a finished exchange stays finished.
//!
//! Input layout: byte 0 flags — [`NO_INITIAL`]: the exchange starts without an initial
//! response; [`OWN_NEGOTIATE`]: the harness sends a valid NEGOTIATE ([`UNICODE`]: a Unicode
//! one) instead of the first fuzzed message; [`BUILD`]: the next fuzzed message is
//! `user \0 domain \0 password`, from which the harness builds a valid AUTHENTICATE for the
//! CHALLENGE it got ([`V1`]: an NTLMv1 response, [`MIC`]: with a MIC). Then the messages,
//! separated by [`SEPARATOR`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use mailrelay_crds::config::{
    Account, Credentials, DomainPolicy, Mechanism, RecipientPolicy, RelayConfig,
};
use mailrelay_crds::verifier::nt_hash;
use mailrelay_relay::auth::ntlm::client;
use mailrelay_relay::auth::{AuthContext, AuthFailure, Exchange, Step};
use mailrelay_relay::snapshot::Snapshot;

use crate::auth::assert_finished;

pub const NO_INITIAL: u8 = 1;
pub const OWN_NEGOTIATE: u8 = 2;
pub const UNICODE: u8 = 4;
pub const BUILD: u8 = 8;
pub const V1: u8 = 16;
pub const MIC: u8 = 32;
pub const SEPARATOR: &[u8] = b"\n--\n";

/// (login, password); `mfa@` is two-factor and has no NT hash, as the compiler leaves it.
const ACCOUNTS: [(&str, &str); 4] = [
    ("alerts@example.test", "alerts-pass"),
    ("ops@example.test", "ops-pass"),
    ("ops@other.test", "ops-other"),
    ("mfa@example.test", "mfa-pass"),
];

fn ctx() -> &'static AuthContext {
    static CTX: OnceLock<AuthContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let domain = |d: &str, nt: &str| DomainPolicy {
            name: None,
            domain: d.into(),
            local: true,
            recipients: RecipientPolicy::AcceptAll,
            windows_nt_domain: Some(nt.into()),
            kerberos_realm: None,
            dkim: None,
            mta_sts: None,
        };
        let accounts = ACCOUNTS
            .iter()
            .map(|(login, password)| {
                let mfa = login.starts_with("mfa@");
                Account {
                    login: (*login).into(),
                    password: None,
                    scram_sha256: None,
                    cram_md5_secret: None,
                    nt_hash: (!mfa).then(|| nt_hash(password)),
                    app_passwords: vec![],
                    mfa,
                    sender_addresses: vec![],
                    access_policy: None,
                }
            })
            .collect();
        let snapshot = Snapshot {
            config: RelayConfig {
                domains: vec![
                    domain("example.test", "EXAMPLE"),
                    domain("other.test", "OTHER"),
                ],
                ..RelayConfig::default()
            },
            credentials: Credentials {
                accounts,
                ..Credentials::default()
            },
            certs: BTreeMap::new(),
            missing_certs: BTreeMap::new(),
            policy_loaded: true,
            fingerprint: 0,
            default_hostname: "relay.fuzz.test".into(),
        };
        AuthContext {
            snapshot: Arc::new(snapshot),
            service: "submission".into(),
            client_ip: IpAddr::from([192, 0, 2, 1]),
            hostname: "relay.fuzz.test".into(),
            allow_ntlm_v1: true,
        }
    })
}

fn split<'a>(mut rest: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}

/// Builds a target input.
pub fn encode(flags: u8, messages: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&messages.join(SEPARATOR));
    v
}

pub fn fuzz_one(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mut ex = Exchange::new(ctx().clone(), Mechanism::Ntlm).expect("exchange starts");
    let mut messages = if rest.is_empty() {
        Vec::new()
    } else {
        split(rest, SEPARATOR)
    }
    .into_iter();
    let mut negotiate: Option<Vec<u8>> = None;
    let mut challenge: Option<Vec<u8>> = None;
    // The password the harness proved knowledge of, if it built the AUTHENTICATE.
    let mut proved: Option<String> = None;
    let mut first = true;
    let mut steps = 0;
    loop {
        steps += 1;
        if steps > 8 {
            return;
        }
        let input: Option<Vec<u8>> = if first && head & NO_INITIAL != 0 {
            None
        } else if negotiate.is_none() && head & OWN_NEGOTIATE != 0 {
            Some(client::negotiate(head & UNICODE != 0))
        } else if let (Some(neg), Some(chal), true) = (
            &negotiate,
            &challenge,
            head & BUILD != 0 && proved.is_none(),
        ) {
            let fields = messages.next().unwrap_or_default();
            let mut f = fields.split(|b| *b == 0).map(String::from_utf8_lossy);
            let (user, domain, password) = (
                f.next().unwrap_or_default().into_owned(),
                f.next().unwrap_or_default().into_owned(),
                f.next().unwrap_or_default().into_owned(),
            );
            proved = Some(password.clone());
            Some(client::authenticate(
                neg,
                chal,
                &client::Options {
                    user: &user,
                    domain: &domain,
                    password: &password,
                    v1: head & V1 != 0,
                    with_mic: head & MIC != 0,
                },
            ))
        } else {
            match messages.next() {
                Some(m) => Some(m.to_vec()),
                None if first => None,
                None => return,
            }
        };
        first = false;
        if let (Some(m), None) = (&input, &negotiate) {
            negotiate = Some(m.clone());
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
                if input.is_some() && challenge.is_none() {
                    challenge = Some(c);
                }
            }
            Step::Success(login) => {
                let secret = ACCOUNTS
                    .iter()
                    .find(|(l, _)| *l == login)
                    .map(|(_, p)| *p)
                    .unwrap_or_else(|| panic!("success as {login:?}, which is no account"));
                assert!(!login.starts_with("mfa@"), "two-factor account via NTLM");
                assert_eq!(
                    proved.as_deref(),
                    Some(secret),
                    "success as {login:?} without its password"
                );
                return assert_finished(&mut ex);
            }
            Step::Failure(AuthFailure::Internal(e)) => panic!("NTLM step failed internally: {e}"),
            Step::Failure(_) => return assert_finished(&mut ex),
        }
    }
}
