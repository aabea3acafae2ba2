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
}

impl AuthFailure {
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
        })
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
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
                let mut out = Cursor::new(Vec::new());
                let result = if self.mechanism == Mechanism::Login && !started {
                    // LOGIN is server-first: emit the user-name prompt, then consume an initial
                    // response (the user name) if the client sent one.
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
