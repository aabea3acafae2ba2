//! SMTP AUTH server side: SASL exchanges via rsasl (PLAIN, LOGIN, SCRAM-SHA-256) and a small
//! CRAM-MD5 (legacy, only when a service enables it), checked against the compiled verifiers, then
//! the account's access policy. Every outcome is precise ([`AuthFailure`]) for the security log,
//! while the client only ever sees the generic `535 5.7.8`. Steps are blocking (argon2, PBKDF2)
//! and must run off the async executor.

use std::fmt;
use std::io::Cursor;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use mailrelay_crds::config::{Account, Mechanism};
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::prelude::{
    Mechname, SASLConfig, SASLServer, Session as SaslSession, SessionError, State,
};
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, Validation, ValidationError};

use crate::snapshot::Snapshot;

/// Why an authentication failed. `Display` is the security-log text; it never contains secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownUser(String),
    BadPassword(String),
    /// A primary password (or a mechanism that can only use it) on a two-factor account.
    MfaAppPasswordRequired(String),
    NoVerifier(String, &'static str),
    AuthzidMismatch(String),
    ServiceForbidden {
        login: String,
        policy: String,
        service: String,
    },
    SourceForbidden {
        login: String,
        policy: String,
        ip: IpAddr,
    },
    Malformed(String),
    /// A SASL library failed internally (a panic, contained); the client gets `454 4.7.0`.
    Internal(String),
}

impl AuthFailure {
    /// The login the failure is about, when the client named one.
    pub fn login(&self) -> Option<&str> {
        match self {
            AuthFailure::UnknownUser(u)
            | AuthFailure::BadPassword(u)
            | AuthFailure::MfaAppPasswordRequired(u)
            | AuthFailure::NoVerifier(u, _)
            | AuthFailure::AuthzidMismatch(u) => Some(u),
            AuthFailure::ServiceForbidden { login, .. }
            | AuthFailure::SourceForbidden { login, .. } => Some(login),
            AuthFailure::Malformed(_) | AuthFailure::Internal(_) => None,
        }
    }

    /// A failure that says something about the credentials (a guess), as opposed to a correct
    /// login the access policy refuses or an internal error. These count towards the
    /// brute-force limits.
    pub fn is_guess(&self) -> bool {
        !matches!(
            self,
            AuthFailure::ServiceForbidden { .. }
                | AuthFailure::SourceForbidden { .. }
                | AuthFailure::Internal(_)
        )
    }

    /// Short label for metrics (bounded cardinality).
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::UnknownUser(_) => "unknown_user",
            AuthFailure::BadPassword(_) => "bad_password",
            AuthFailure::MfaAppPasswordRequired(_) => "mfa_app_password_required",
            AuthFailure::NoVerifier(..) => "no_verifier",
            AuthFailure::AuthzidMismatch(_) => "authzid_mismatch",
            AuthFailure::ServiceForbidden { .. } => "service_forbidden",
            AuthFailure::SourceForbidden { .. } => "source_forbidden",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::Internal(_) => "internal_error",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthFailure::UnknownUser(u) => write!(f, "unknown user {u:?}"),
            AuthFailure::BadPassword(u) => write!(f, "bad password for {u:?}"),
            AuthFailure::MfaAppPasswordRequired(u) => write!(
                f,
                "user {u:?}: Only application passwords are allowed since 2FA is enabled"
            ),
            AuthFailure::NoVerifier(u, m) => {
                write!(f, "user {u:?} has no credential usable with {m}")
            }
            AuthFailure::AuthzidMismatch(u) => {
                write!(f, "user {u:?} asked to act as a different authorization identity")
            }
            AuthFailure::ServiceForbidden {
                login,
                policy,
                service,
            } => write!(
                f,
                "access policy {policy:?} of {login:?} forbids authenticating on service {service:?}"
            ),
            AuthFailure::SourceForbidden { login, policy, ip } => write!(
                f,
                "access policy {policy:?} of {login:?} forbids authenticating from {ip}"
            ),
            AuthFailure::Malformed(e) => write!(f, "malformed SASL exchange: {e}"),
            AuthFailure::Internal(e) => write!(f, "internal SASL error: {e}"),
        }
    }
}

/// Who is authenticating, where.
#[derive(Clone)]
pub struct AuthContext {
    pub snapshot: Arc<Snapshot>,
    pub service: String,
    pub client_ip: IpAddr,
    pub hostname: String,
}

impl AuthContext {
    /// The access policy of an account whose credentials were correct.
    fn access(&self, account: &Account) -> Result<String, AuthFailure> {
        let login = account.login.clone();
        if let Some(name) = &account.access_policy {
            let Some(p) = self.snapshot.config.access_policies.get(name) else {
                return Err(AuthFailure::ServiceForbidden {
                    login,
                    policy: name.clone(),
                    service: self.service.clone(),
                });
            };
            if !p.services.is_empty() && !p.services.contains(&self.service) {
                return Err(AuthFailure::ServiceForbidden {
                    login,
                    policy: name.clone(),
                    service: self.service.clone(),
                });
            }
            if !p.from_ip_groups.is_empty()
                && !self
                    .snapshot
                    .config
                    .in_any_group(&p.from_ip_groups, self.client_ip)
            {
                return Err(AuthFailure::SourceForbidden {
                    login,
                    policy: name.clone(),
                    ip: self.client_ip,
                });
            }
        }
        Ok(login)
    }

    /// PLAIN/LOGIN: argon2 verification, app passwords first on MFA accounts.
    fn check_password(&self, login: &str, password: &[u8]) -> Result<String, AuthFailure> {
        let Some(account) = self.snapshot.credentials.account(login) else {
            return Err(AuthFailure::UnknownUser(login.to_string()));
        };
        let Ok(password) = std::str::from_utf8(password) else {
            return Err(AuthFailure::BadPassword(account.login.clone()));
        };
        let app_ok = || {
            account
                .app_passwords
                .iter()
                .any(|a| a.verifier.verify(password))
        };
        let primary_ok = || {
            account
                .password
                .as_ref()
                .is_some_and(|v| v.verify(password))
        };
        if account.mfa {
            if app_ok() {
                return self.access(account);
            }
            if primary_ok() {
                return Err(AuthFailure::MfaAppPasswordRequired(account.login.clone()));
            }
        } else if primary_ok() || app_ok() {
            return self.access(account);
        }
        Err(AuthFailure::BadPassword(account.login.clone()))
    }
}

/// Result of one SASL step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this as a `334` challenge and wait for the client.
    Challenge(Vec<u8>),
    Success(String),
    Failure(AuthFailure),
}

struct Outcome;
impl Validation for Outcome {
    type Value = Result<String, AuthFailure>;
}

struct Callback {
    ctx: AuthContext,
    /// What SCRAM found out while looking up keys (rsasl only reports "no validation").
    scram_note: Mutex<Option<AuthFailure>>,
}

impl Callback {
    fn note(&self, f: AuthFailure) {
        if let Ok(mut n) = self.scram_note.lock() {
            *n = Some(f);
        }
    }
}

impl SessionCallback for Callback {
    fn callback(
        &self,
        _session_data: &SessionData,
        context: &Context,
        request: &mut Request,
    ) -> Result<(), SessionError> {
        if !request.is::<ScramStoredPassword>() {
            return Ok(());
        }
        let Some(authid) = context.get_ref::<AuthId>() else {
            return Ok(());
        };
        let Some(account) = self.ctx.snapshot.credentials.account(authid) else {
            self.note(AuthFailure::UnknownUser(authid.to_string()));
            return Ok(());
        };
        // SCRAM fixes the salt before the proof arrives, so one key set is offered: the primary
        // password's, or on a two-factor account the first app password that has SCRAM keys.
        let keys = if account.mfa {
            account
                .app_passwords
                .iter()
                .find_map(|a| a.scram_sha256.as_ref())
        } else {
            account.scram_sha256.as_ref()
        };
        let Some((salt, stored, server)) = keys.and_then(|k| k.decoded()) else {
            self.note(if account.mfa {
                AuthFailure::MfaAppPasswordRequired(account.login.clone())
            } else {
                AuthFailure::NoVerifier(account.login.clone(), "SCRAM-SHA-256")
            });
            return Ok(());
        };
        self.note(AuthFailure::BadPassword(account.login.clone()));
        let iterations = keys.map(|k| k.iterations).unwrap_or_default();
        request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
            iterations, &salt, &stored, &server,
        ))?;
        Ok(())
    }

    fn validate(
        &self,
        session_data: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let mech = session_data.mechanism().mechanism.as_str();
        let authid = context.get_ref::<AuthId>().unwrap_or_default().to_string();
        let authzid = context.get_ref::<AuthzId>();
        let outcome = if authzid.is_some_and(|z| !z.is_empty() && !z.eq_ignore_ascii_case(&authid))
        {
            Err(AuthFailure::AuthzidMismatch(authid))
        } else if mech == "PLAIN" || mech == "LOGIN" {
            let password = context.get_ref::<Password>().unwrap_or_default();
            self.ctx.check_password(&authid, password)
        } else {
            // SCRAM: rsasl validates only after the proof matched.
            match self.ctx.snapshot.credentials.account(&authid) {
                Some(a) => self.ctx.access(a),
                None => Err(AuthFailure::UnknownUser(authid)),
            }
        };
        validate.with::<Outcome, _>(|| Ok::<_, ValidationError>(outcome))?;
        Ok(())
    }
}

enum Inner {
    Rsasl {
        session: Box<SaslSession<Outcome>>,
        callback: Arc<Callback>,
        started: bool,
    },
    CramMd5 {
        challenge: String,
    },
    /// Success data was sent as a challenge (SCRAM server-final); the empty reply completes it.
    PendingSuccess(String),
    Done,
}

/// One AUTH exchange.
pub struct Exchange {
    ctx: AuthContext,
    mechanism: Mechanism,
    inner: Inner,
    /// Client messages handed to rsasl so far (which SCRAM message the next one must be).
    responses: u32,
    /// The login the client named (LOGIN and SCRAM name it before the secret).
    login_hint: Option<String>,
}

impl Exchange {
    pub fn new(ctx: AuthContext, mechanism: Mechanism) -> Result<Self, AuthFailure> {
        let inner = match mechanism {
            Mechanism::CramMd5 => {
                let nonce: u64 = rand_nonce();
                Inner::CramMd5 {
                    challenge: format!("<{nonce}@{}>", ctx.hostname),
                }
            }
            m => {
                let callback = Arc::new(Callback {
                    ctx: ctx.clone(),
                    scram_note: Mutex::new(None),
                });
                let config = SASLConfig::builder()
                    .with_defaults()
                    .with_callback(CallbackRef(callback.clone()))
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                let name = Mechname::parse(m.as_str().as_bytes())
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                let session = SASLServer::<Outcome>::new(config)
                    .start_suggested(name)
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                Inner::Rsasl {
                    session: Box::new(session),
                    callback,
                    started: false,
                }
            }
        };
        Ok(Exchange {
            ctx,
            mechanism,
            inner,
            responses: 0,
            login_hint: None,
        })
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The login the client claims, read from `input` (the next client message) or remembered
    /// from an earlier one, before anything is verified: for throttling by account without
    /// spending a verification on it. Cheap; never fails.
    pub fn claimed_login(&mut self, input: Option<&[u8]>) -> Option<String> {
        if self.login_hint.is_none() {
            let first = self.responses == 0;
            let found = match (self.mechanism, input) {
                (Mechanism::Plain, Some(msg)) => msg
                    .split(|b| *b == 0)
                    .nth(1)
                    .and_then(|u| std::str::from_utf8(u).ok())
                    .map(str::to_string),
                (Mechanism::Login, Some(msg)) if first => {
                    std::str::from_utf8(msg).ok().map(str::to_string)
                }
                (Mechanism::ScramSha256, Some(msg)) if first => std::str::from_utf8(msg)
                    .ok()
                    .and_then(|m| m.split(',').find_map(|p| p.strip_prefix("n=")))
                    .map(|n| n.replace("=2C", ",").replace("=3D", "=")),
                (Mechanism::CramMd5, Some(msg)) => std::str::from_utf8(msg)
                    .ok()
                    .and_then(|m| m.rsplit_once(' '))
                    .map(|(u, _)| u.to_string()),
                _ => None,
            };
            self.login_hint = found.filter(|l| !l.is_empty() && l.len() <= 320);
        }
        self.login_hint.clone()
    }

    /// Feeds the client's data (`None`: AUTH without initial response). Blocking.
    pub fn step(&mut self, input: Option<&[u8]>) -> Step {
        let inner = std::mem::replace(&mut self.inner, Inner::Done);
        match inner {
            Inner::Done => {
                Step::Failure(AuthFailure::Malformed("exchange already finished".into()))
            }
            Inner::PendingSuccess(login) => match input {
                Some([]) => Step::Success(login),
                _ => Step::Failure(AuthFailure::Malformed(
                    "unexpected data after success".into(),
                )),
            },
            Inner::CramMd5 { challenge } => match input {
                None => {
                    let c = challenge.clone().into_bytes();
                    self.inner = Inner::CramMd5 { challenge };
                    Step::Challenge(c)
                }
                Some(resp) => self.cram_md5(&challenge, resp),
            },
            Inner::Rsasl {
                mut session,
                callback,
                started,
            } => {
                let client_first = self.mechanism != Mechanism::Login;
                if input.is_none() && client_first && !started {
                    // Client-first mechanism without an initial response: empty challenge.
                    self.inner = Inner::Rsasl {
                        session,
                        callback,
                        started: true,
                    };
                    return Step::Challenge(Vec::new());
                }
                if let (Mechanism::ScramSha256, Some(msg)) = (self.mechanism, input) {
                    let checked = match self.responses {
                        0 => scram::check_client_first(msg),
                        _ => scram::check_client_final(msg),
                    };
                    if let Err(e) = checked {
                        return Step::Failure(AuthFailure::Malformed(e));
                    }
                }
                if input.is_some() {
                    self.responses += 1;
                }
                // rsasl's parsers have panicked on malformed input; whatever a client sends must
                // end its exchange, never the relay.
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.rsasl_step(&mut session, started, input)
                }));
                let (result, out) = match stepped {
                    Ok(r) => r,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "panic".into());
                        return Step::Failure(AuthFailure::Internal(format!(
                            "{} exchange panicked: {what}",
                            self.mechanism.as_str()
                        )));
                    }
                };
                match result {
                    Ok(State::Running) => {
                        self.inner = Inner::Rsasl {
                            session,
                            callback,
                            started: true,
                        };
                        Step::Challenge(out.into_inner())
                    }
                    Ok(State::Finished(sent)) => {
                        let data = out.into_inner();
                        match session.validation() {
                            Some(Ok(login))
                                if sent == rsasl::prelude::MessageSent::Yes && !data.is_empty() =>
                            {
                                self.inner = Inner::PendingSuccess(login);
                                Step::Challenge(data)
                            }
                            Some(Ok(login)) => Step::Success(login),
                            Some(Err(f)) => Step::Failure(f),
                            None => {
                                let note =
                                    callback.scram_note.lock().ok().and_then(|mut n| n.take());
                                Step::Failure(
                                    note.unwrap_or_else(|| {
                                        AuthFailure::Malformed("no outcome".into())
                                    }),
                                )
                            }
                        }
                    }
                    Err(e) => {
                        let note = callback.scram_note.lock().ok().and_then(|mut n| n.take());
                        Step::Failure(match note {
                            Some(AuthFailure::UnknownUser(u)) => AuthFailure::UnknownUser(u),
                            _ => AuthFailure::Malformed(e.to_string()),
                        })
                    }
                }
            }
        }
    }

    /// One rsasl step; LOGIN is server-first, so its first call emits the user-name prompt and
    /// then consumes an initial response (the user name) if the client sent one.
    fn rsasl_step(
        &self,
        session: &mut SaslSession<Outcome>,
        started: bool,
        input: Option<&[u8]>,
    ) -> (Result<State, SessionError>, Cursor<Vec<u8>>) {
        let mut out = Cursor::new(Vec::new());
        let result = if self.mechanism == Mechanism::Login && !started {
            match session.step(None, &mut out) {
                Ok(_) if input.is_some() => {
                    out = Cursor::new(Vec::new());
                    session.step(input, &mut out)
                }
                other => other,
            }
        } else {
            session.step(input, &mut out)
        };
        (result, out)
    }

    fn cram_md5(&self, challenge: &str, resp: &[u8]) -> Step {
        let Ok(resp) = std::str::from_utf8(resp) else {
            return Step::Failure(AuthFailure::Malformed("CRAM-MD5 response not UTF-8".into()));
        };
        let Some((user, digest)) = resp.rsplit_once(' ') else {
            return Step::Failure(AuthFailure::Malformed(
                "CRAM-MD5 response without digest".into(),
            ));
        };
        let Some(account) = self.ctx.snapshot.credentials.account(user) else {
            return Step::Failure(AuthFailure::UnknownUser(user.to_string()));
        };
        if account.mfa {
            return Step::Failure(AuthFailure::MfaAppPasswordRequired(account.login.clone()));
        }
        let Some(secret) = &account.cram_md5_secret else {
            return Step::Failure(AuthFailure::NoVerifier(account.login.clone(), "CRAM-MD5"));
        };
        let Ok(mut mac) = Hmac::<md5::Md5>::new_from_slice(secret.expose().as_bytes()) else {
            return Step::Failure(AuthFailure::Malformed("bad CRAM-MD5 key".into()));
        };
        mac.update(challenge.as_bytes());
        let Ok(given) = hex_decode(digest) else {
            return Step::Failure(AuthFailure::Malformed("CRAM-MD5 digest not hex".into()));
        };
        if mac.verify_slice(&given).is_err() {
            return Step::Failure(AuthFailure::BadPassword(account.login.clone()));
        }
        match self.ctx.access(account) {
            Ok(l) => Step::Success(l),
            Err(f) => Step::Failure(f),
        }
    }
}

/// Syntax checks of SCRAM client messages (RFC 5802 §7) before they reach rsasl, whose parser
/// indexes into attributes without checking their length. Only the shape is checked here;
/// rsasl still does the cryptography and the nonce comparison.
mod scram {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;

    fn text(msg: &[u8]) -> Result<&str, String> {
        let s = std::str::from_utf8(msg).map_err(|_| "SCRAM message is not UTF-8".to_string())?;
        if s.chars().any(|c| c.is_control()) {
            return Err("SCRAM message contains control characters".into());
        }
        Ok(s)
    }

    /// `value` of an `x=value` attribute with a non-empty value.
    fn attr(part: &str, name: char) -> Result<&str, String> {
        let mut chars = part.chars();
        match (chars.next(), chars.next()) {
            (Some(n), Some('=')) if n == name && part.len() > 2 => Ok(&part[2..]),
            _ => Err(format!("expected attribute {name}=... but got {part:?}")),
        }
    }

    fn nonce(value: &str) -> Result<(), String> {
        if value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            Ok(())
        } else {
            Err("SCRAM nonce has characters outside printable ASCII".into())
        }
    }

    fn base64(value: &str, what: &str) -> Result<(), String> {
        match B64.decode(value) {
            Ok(v) if !v.is_empty() => Ok(()),
            _ => Err(format!("SCRAM {what} is not base64")),
        }
    }

    /// `gs2-header client-first-message-bare`: `n,,n=user,r=nonce[,ext...]`.
    pub fn check_client_first(msg: &[u8]) -> Result<(), String> {
        let s = text(msg)?;
        let mut parts = s.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        if !(flag == "n" || flag == "y" || (flag.starts_with("p=") && flag.len() > 2)) {
            return Err(format!(
                "SCRAM client-first has a bad channel-binding flag {flag:?}"
            ));
        }
        let authzid = parts
            .next()
            .ok_or("SCRAM client-first lacks the GS2 header")?;
        if !authzid.is_empty() {
            attr(authzid, 'a')?;
        }
        let bare = parts
            .next()
            .ok_or("SCRAM client-first lacks the user name")?;
        let mut bare = bare.split(',');
        attr(bare.next().unwrap_or_default(), 'n')?;
        nonce(attr(bare.next().unwrap_or_default(), 'r')?)?;
        for ext in bare {
            if ext.len() < 2 || ext.as_bytes()[1] != b'=' {
                return Err(format!(
                    "SCRAM client-first has a malformed extension {ext:?}"
                ));
            }
        }
        Ok(())
    }

    /// `c=binding,r=nonce[,ext...],p=proof`.
    pub fn check_client_final(msg: &[u8]) -> Result<(), String> {
        let s = text(msg)?;
        let parts: Vec<&str> = s.split(',').collect();
        if parts.len() < 3 {
            return Err("SCRAM client-final needs c=, r= and p=".into());
        }
        base64(attr(parts[0], 'c')?, "channel binding")?;
        nonce(attr(parts[1], 'r')?)?;
        let last = parts.len() - 1;
        for ext in &parts[2..last] {
            if ext.len() < 2 || ext.as_bytes()[1] != b'=' || ext.starts_with("p=") {
                return Err(format!(
                    "SCRAM client-final has a malformed attribute {ext:?}"
                ));
            }
        }
        base64(attr(parts[last], 'p')?, "proof")
    }
}

/// rsasl wants an owned callback; the exchange keeps a handle to read the SCRAM note.
struct CallbackRef(Arc<Callback>);

impl SessionCallback for CallbackRef {
    fn callback(
        &self,
        session_data: &SessionData,
        context: &Context,
        request: &mut Request,
    ) -> Result<(), SessionError> {
        self.0.callback(session_data, context, request)
    }
    fn validate(
        &self,
        session_data: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        self.0.validate(session_data, context, validate)
    }
}

fn hex_decode(s: &str) -> Result<Vec<u8>, ()> {
    if !s.len().is_multiple_of(2) {
        return Err(());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(())
        })
        .collect()
}

fn rand_nonce() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Uniqueness, not secrecy, is what a CRAM-MD5 challenge needs.
    t ^ (std::process::id() as u64).rotate_left(32)
}

/// Base64 helper for tests and clients of this module.
pub fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mailrelay_crds::config::{Credentials, RelayConfig};
    use mailrelay_crds::verifier::{PasswordVerifier, ScramVerifier};

    use super::*;

    const USER: &str = "user@example.test";

    fn ctx() -> AuthContext {
        let account = Account {
            login: USER.into(),
            password: Some(PasswordVerifier::derive("secret")),
            scram_sha256: Some(ScramVerifier::derive("secret")),
            cram_md5_secret: None,
            app_passwords: vec![],
            mfa: false,
            sender_addresses: vec![],
            access_policy: None,
        };
        AuthContext {
            snapshot: Arc::new(Snapshot {
                config: RelayConfig::default(),
                credentials: Credentials {
                    accounts: vec![account],
                    ..Credentials::default()
                },
                certs: BTreeMap::new(),
                missing_certs: BTreeMap::new(),
                policy_loaded: true,
                fingerprint: 0,
                default_hostname: "relay.example.test".into(),
            }),
            service: "submission".into(),
            client_ip: "192.0.2.1".parse().unwrap(),
            hostname: "relay.example.test".into(),
        }
    }

    fn scram_after_client_first() -> Exchange {
        let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
        let step = ex.step(Some(format!("n,,n={USER},r=abcdefghijklmnop").as_bytes()));
        assert!(matches!(step, Step::Challenge(_)), "{step:?}");
        ex
    }

    /// The audit's input: a valid client-first, then a client-final of `x`. rsasl 2.3.1's parser
    /// panics on it (slice index out of range); the exchange must fail cleanly instead.
    #[test]
    fn malformed_scram_client_final_fails_without_panicking() {
        for bad in [
            &b"x"[..],
            b"",
            b"c=",
            b"c=biws",
            b"c=biws,r=",
            b"c=biws,r=abcdefghijklmnop",
            b"c=biws,r=abcdefghijklmnop,p=",
            b"c=biws,r=abcdefghijklmnop,p=!!",
            b"p=xx,c=biws,r=abc",
            b"c=biws,r=abc,p=AAAA,",
            b"\xff\xfe",
        ] {
            let mut ex = scram_after_client_first();
            let step =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ex.step(Some(bad))));
            let step =
                step.unwrap_or_else(|_| panic!("panicked on {:?}", String::from_utf8_lossy(bad)));
            assert!(
                matches!(step, Step::Failure(AuthFailure::Malformed(_))),
                "{:?}: {step:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn malformed_scram_client_first_fails_without_panicking() {
        for bad in [
            &b"x"[..],
            b"n,,",
            b"n,,n=",
            b"n,,n=user",
            b"n,,r=abc",
            b"q,,n=user,r=abc",
            b"n,x,n=user,r=abc",
            b"n,,n=user,r=",
        ] {
            let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
            let step =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ex.step(Some(bad))));
            let step =
                step.unwrap_or_else(|_| panic!("panicked on {:?}", String::from_utf8_lossy(bad)));
            assert!(
                matches!(step, Step::Failure(_)),
                "{:?}: {step:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
