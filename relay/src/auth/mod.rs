//! SMTP AUTH server side: PLAIN and LOGIN via rsasl, SCRAM-SHA-256 (RFC 5802/7677), a small
//! CRAM-MD5 (legacy, only when a service enables it), NTLM ([MS-SMTPNTLM], the [`ntlm`]
//! module) and, with the `gssapi` feature, Kerberos (RFC 4752, the `gssapi` module) implemented
//! here, checked against the compiled verifiers, then the account's access
//! policy. Every outcome is precise
//! ([`AuthFailure`]) for the security log, while the client only ever sees the generic
//! `535 5.7.8`. Steps are blocking (argon2) and must run off the async executor.
//!
//! SCRAM is not rsasl's: its server takes one stored key per exchange, and an account may hold
//! several passwords that SCRAM must accept (every app password of a two-factor account). The
//! compiler gives all SCRAM keys of one account one salt, so the server announces that salt and
//! then tries the client's proof against each key (the `scram` module).

use std::fmt;
use std::io::Cursor;
use std::net::IpAddr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use mailrelay_crds::config::{Account, Mechanism};
use mailrelay_crds::verifier::{ScramVerifier, SCRAM_ITERATIONS};
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::prelude::{
    Mechname, SASLConfig, SASLServer, Session as SaslSession, SessionError, State,
};
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, Validation, ValidationError};

use crate::snapshot::Snapshot;

#[cfg(feature = "gssapi")]
pub mod gssapi;
pub mod ntlm;

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
    /// NTLM: the client presented an NT domain that no NTLM mail domain has (Kerio's wording).
    NtDomainInvalid {
        user: String,
        domain: String,
    },
    /// NTLM: the login names a mail domain that has no `windows_nt_domain`.
    NtlmDomainDisabled {
        user: String,
        domain: String,
    },
    /// NTLM: a user name without a domain that is an account in several NTLM mail domains.
    NtlmAmbiguous {
        user: String,
        logins: Vec<String>,
    },
    /// NTLM: an NTLMv1 response where the service accepts only NTLMv2.
    NtlmV1Refused(String),
    /// GSSAPI: the ticket was not accepted (`label`: expired, wrong service key, replay,
    /// malformed); `detail` has MIT's text.
    Kerberos {
        label: &'static str,
        detail: String,
    },
    /// GSSAPI: a valid ticket from a realm no mail domain has as `kerberos_realm`.
    KerberosRealmInvalid {
        principal: String,
        realm: String,
    },
    /// GSSAPI: a valid ticket, but its principal is no account.
    KerberosNoAccount {
        principal: String,
        login: String,
    },
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
            | AuthFailure::AuthzidMismatch(u)
            | AuthFailure::NtlmV1Refused(u) => Some(u),
            AuthFailure::KerberosRealmInvalid { principal, .. } => Some(principal),
            AuthFailure::KerberosNoAccount { login, .. } => Some(login),
            AuthFailure::Kerberos { .. } => None,
            AuthFailure::NtDomainInvalid { user, .. }
            | AuthFailure::NtlmDomainDisabled { user, .. }
            | AuthFailure::NtlmAmbiguous { user, .. } => Some(user),
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
            AuthFailure::NtDomainInvalid { .. } => "nt_domain_invalid",
            AuthFailure::NtlmDomainDisabled { .. } => "ntlm_domain_disabled",
            AuthFailure::NtlmAmbiguous { .. } => "ntlm_ambiguous_user",
            AuthFailure::NtlmV1Refused(_) => "ntlm_v1_refused",
            AuthFailure::Kerberos { label, .. } => label,
            AuthFailure::KerberosRealmInvalid { .. } => "kerberos_realm_invalid",
            AuthFailure::KerberosNoAccount { .. } => "unknown_user",
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
            // Kerio Connect's own line, so that its troubleshooting guide applies word for word.
            AuthFailure::NtDomainInvalid { user, domain } => write!(
                f,
                "User {user} performed NTLM authentication in NT domain {domain}, this domain is not valid"
            ),
            AuthFailure::NtlmDomainDisabled { user, domain } => write!(
                f,
                "user {user:?}: mail domain {domain:?} takes no NTLM logins (its MailDomain has no windowsNtDomain)"
            ),
            AuthFailure::NtlmAmbiguous { user, logins } => write!(
                f,
                "NTLM user {user:?} without an NT domain matches several accounts ({}); the client must send DOMAIN\\{user} or {user}@<mail domain>",
                logins.join(", ")
            ),
            AuthFailure::Kerberos { detail, .. } => write!(f, "Kerberos: {detail}"),
            AuthFailure::KerberosRealmInvalid { principal, realm } => write!(
                f,
                "Kerberos principal {principal} is in realm {realm}, which no MailDomain has as kerberosRealm"
            ),
            AuthFailure::KerberosNoAccount { principal, login } => write!(
                f,
                "Kerberos principal {principal} authenticated, but there is no account {login:?}"
            ),
            AuthFailure::NtlmV1Refused(u) => write!(
                f,
                "user {u:?} sent an NTLMv1 response, which this service refuses: set LmCompatibilityLevel 3 or higher on the client (NTLMv2), or allow NTLMv1 on the SmtpService (authentication.ntlm)"
            ),
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
    /// The service accepts NTLMv1 responses.
    pub allow_ntlm_v1: bool,
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

    /// The acceptor credential of this service (its keytab from the credentials).
    #[cfg(feature = "gssapi")]
    fn gssapi_cred(&self) -> Result<gssapi::ServiceCred, String> {
        let keytab = self
            .snapshot
            .credentials
            .keytabs
            .get(&self.service)
            .ok_or_else(|| format!("service {:?} has no keytab", self.service))?;
        let principal = self
            .snapshot
            .config
            .services
            .iter()
            .find(|s| s.name == self.service)
            .and_then(|s| s.auth.gssapi_principal.as_deref());
        gssapi::service_cred(&self.service, keytab.expose(), principal)
    }

    /// The account a Kerberos principal `user@REALM` is: `user@<domain>` of the mail domain
    /// whose `kerberos_realm` is `REALM` (exactly, realms are case-sensitive). An authorization
    /// identity, when given, must be that account.
    pub fn kerberos_account(
        &self,
        principal: &str,
        authzid: Option<&str>,
    ) -> Result<String, AuthFailure> {
        let (user, realm) = principal.rsplit_once('@').unwrap_or((principal, ""));
        let domains: Vec<&str> = self
            .snapshot
            .config
            .domains
            .iter()
            .filter(|d| d.kerberos_realm.as_deref() == Some(realm))
            .map(|d| d.domain.as_str())
            .collect();
        if domains.is_empty() {
            return Err(AuthFailure::KerberosRealmInvalid {
                principal: principal.to_string(),
                realm: realm.to_string(),
            });
        }
        let found: Vec<&Account> = domains
            .iter()
            .filter_map(|d| self.snapshot.credentials.account(&format!("{user}@{d}")))
            .collect();
        let account = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(AuthFailure::KerberosNoAccount {
                    principal: principal.to_string(),
                    login: format!("{user}@{}", domains.join("|")),
                })
            }
            many => {
                return Err(AuthFailure::KerberosNoAccount {
                    principal: principal.to_string(),
                    login: format!(
                        "one of {} (several MailDomains share the realm; give them distinct kerberosRealm values)",
                        many.iter().map(|a| a.login.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                })
            }
        };
        if account.mfa {
            return Err(AuthFailure::MfaAppPasswordRequired(account.login.clone()));
        }
        if authzid.is_some_and(|z| !z.eq_ignore_ascii_case(&account.login)) {
            return Err(AuthFailure::AuthzidMismatch(account.login.clone()));
        }
        self.access(account)
    }

    /// The account an NTLM user and NT domain name, as the client sent them. `DOMAIN\user`
    /// (also when sent whole as the user name) needs `DOMAIN` to be the `windows_nt_domain` of
    /// the account's mail domain (case-insensitive); `user@maildomain` needs that mail domain
    /// to take NTLM and any NT domain sent with it to be its own; a bare `user` is looked up in
    /// every NTLM mail domain and must match exactly one account.
    fn ntlm_account(&self, user: &str, nt_domain: &str) -> Result<&Account, AuthFailure> {
        let (user, nt_domain) = match user.split_once('\\') {
            Some((d, u)) if nt_domain.is_empty() => (u, d),
            _ => (user, nt_domain),
        };
        let config = &self.snapshot.config;
        let credentials = &self.snapshot.credentials;
        let nt_matches = |d: &mailrelay_crds::config::DomainPolicy| {
            d.windows_nt_domain
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(nt_domain))
        };
        let invalid = || AuthFailure::NtDomainInvalid {
            user: user.to_string(),
            domain: nt_domain.to_string(),
        };
        if let Some((_, mail_domain)) = user.rsplit_once('@') {
            let Some(d) = config
                .domains
                .iter()
                .find(|d| d.domain.eq_ignore_ascii_case(mail_domain))
            else {
                return Err(AuthFailure::UnknownUser(user.to_string()));
            };
            if d.windows_nt_domain.is_none() {
                return Err(AuthFailure::NtlmDomainDisabled {
                    user: user.to_string(),
                    domain: d.domain.clone(),
                });
            }
            if !nt_domain.is_empty() && !nt_matches(d) {
                return Err(invalid());
            }
            return credentials
                .account(user)
                .ok_or_else(|| AuthFailure::UnknownUser(user.to_string()));
        }
        let candidates: Vec<&mailrelay_crds::config::DomainPolicy> = config
            .domains
            .iter()
            .filter(|d| {
                if nt_domain.is_empty() {
                    d.windows_nt_domain.is_some()
                } else {
                    nt_matches(d)
                }
            })
            .collect();
        if candidates.is_empty() && !nt_domain.is_empty() {
            return Err(invalid());
        }
        let found: Vec<&Account> = candidates
            .iter()
            .filter_map(|d| credentials.account(&format!("{user}@{}", d.domain)))
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] if nt_domain.is_empty() => Err(AuthFailure::UnknownUser(user.to_string())),
            [] => Err(AuthFailure::UnknownUser(format!("{nt_domain}\\{user}"))),
            many => Err(AuthFailure::NtlmAmbiguous {
                user: user.to_string(),
                logins: many.iter().map(|a| a.login.clone()).collect(),
            }),
        }
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
}

impl SessionCallback for Callback {
    fn callback(
        &self,
        _session_data: &SessionData,
        _context: &Context,
        _request: &mut Request,
    ) -> Result<(), SessionError> {
        // PLAIN and LOGIN hand everything to `validate`; nothing is looked up here.
        Ok(())
    }

    fn validate(
        &self,
        _session_data: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let authid = context.get_ref::<AuthId>().unwrap_or_default().to_string();
        let authzid = context.get_ref::<AuthzId>();
        let outcome = if authzid.is_some_and(|z| !z.is_empty() && !z.eq_ignore_ascii_case(&authid))
        {
            Err(AuthFailure::AuthzidMismatch(authid))
        } else {
            let password = context.get_ref::<Password>().unwrap_or_default();
            self.ctx.check_password(&authid, password)
        };
        validate.with::<Outcome, _>(|| Ok::<_, ValidationError>(outcome))?;
        Ok(())
    }
}

enum Inner {
    Rsasl {
        session: Box<SaslSession<Outcome>>,
        started: bool,
    },
    Scram(ScramState),
    CramMd5 {
        challenge: String,
    },
    Ntlm(NtlmState),
    /// GSSAPI: `None` until the first client message (the acceptor is made on the blocking
    /// pool, where reading the keytab belongs). In a mutex only because a GSS context may move
    /// between threads but not be shared, and the session holding the exchange must be `Sync`;
    /// it is only ever reached through `&mut`.
    #[cfg(feature = "gssapi")]
    Gssapi(Option<Box<std::sync::Mutex<gssapi::Acceptor>>>),
    /// Success data was sent as a challenge (SCRAM server-final); the empty reply completes it.
    PendingSuccess(String),
    Done,
}

/// Where an NTLM exchange stands.
enum NtlmState {
    /// Waiting for NEGOTIATE; `prompted` once an empty challenge asked for it.
    Negotiate { prompted: bool },
    /// CHALLENGE went out; AUTHENTICATE is next. Both earlier messages are kept for the MIC.
    Authenticate {
        negotiate: Vec<u8>,
        challenge: Vec<u8>,
        server_challenge: [u8; 8],
    },
}

/// Where a SCRAM-SHA-256 exchange stands.
enum ScramState {
    /// Waiting for the client-first message; `prompted` once an empty challenge asked for it.
    First { prompted: bool },
    /// The server-first message went out; the client's proof is next.
    Final(Box<ScramFinal>),
}

struct ScramFinal {
    pending: scram::Pending,
    /// The keys to try, or why none can succeed (reported only after the proof, so that the
    /// exchange looks the same for every login until then).
    keys: Result<AccountKeys, AuthFailure>,
}

/// An account's SCRAM keys under the salt the server announced.
struct AccountKeys {
    login: String,
    keys: Vec<scram::Key>,
    /// Per key: whether it may authenticate (the primary password of a two-factor account may
    /// not; its key is tried only to log that case precisely).
    authenticates: Vec<bool>,
}

/// One AUTH exchange.
pub struct Exchange {
    ctx: AuthContext,
    mechanism: Mechanism,
    inner: Inner,
    /// Client messages handled so far (which SCRAM message the next one must be).
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
            Mechanism::ScramSha256 => Inner::Scram(ScramState::First { prompted: false }),
            Mechanism::Ntlm => Inner::Ntlm(NtlmState::Negotiate { prompted: false }),
            #[cfg(feature = "gssapi")]
            Mechanism::Gssapi => Inner::Gssapi(None),
            #[cfg(not(feature = "gssapi"))]
            Mechanism::Gssapi => {
                return Err(AuthFailure::Internal(
                    "this relay was built without GSSAPI (cargo feature gssapi)".into(),
                ))
            }
            m => {
                let config = SASLConfig::builder()
                    .with_defaults()
                    .with_callback(Callback { ctx: ctx.clone() })
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                let name = Mechname::parse(m.as_str().as_bytes())
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                let session = SASLServer::<Outcome>::new(config)
                    .start_suggested(name)
                    .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
                Inner::Rsasl {
                    session: Box::new(session),
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
                // AUTHENTICATE names the user; the account it maps to is the throttling key.
                (Mechanism::Ntlm, Some(msg)) => ntlm::Authenticate::parse(msg).ok().map(|a| {
                    match self.ctx.ntlm_account(&a.user, &a.domain) {
                        Ok(account) => account.login.clone(),
                        Err(_) if a.domain.is_empty() => a.user,
                        Err(_) => format!("{}\\{}", a.domain, a.user),
                    }
                }),
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
            #[cfg(feature = "gssapi")]
            Inner::Gssapi(acceptor) => {
                if input.is_some() {
                    self.responses += 1;
                }
                let mechanism = self.mechanism;
                contain(mechanism, || self.gssapi_step(acceptor, input))
                    .unwrap_or_else(Step::Failure)
            }
            Inner::Ntlm(state) => {
                if input.is_some() {
                    self.responses += 1;
                }
                let mechanism = self.mechanism;
                contain(mechanism, || self.ntlm_step(state, input)).unwrap_or_else(Step::Failure)
            }
            Inner::Scram(state) => {
                if input.is_some() {
                    self.responses += 1;
                }
                // Our own parser, but held to the same rule as rsasl's: whatever a client
                // sends ends its exchange, never the relay.
                let mechanism = self.mechanism;
                contain(mechanism, || self.scram_step(state, input)).unwrap_or_else(Step::Failure)
            }
            Inner::Rsasl {
                mut session,
                started,
            } => {
                let client_first = self.mechanism != Mechanism::Login;
                if input.is_none() && client_first && !started {
                    // Client-first mechanism without an initial response: empty challenge.
                    self.inner = Inner::Rsasl {
                        session,
                        started: true,
                    };
                    return Step::Challenge(Vec::new());
                }
                if input.is_some() {
                    self.responses += 1;
                }
                // rsasl's parsers have panicked on malformed input; whatever a client sends must
                // end its exchange, never the relay.
                let stepped = contain(self.mechanism, || {
                    self.rsasl_step(&mut session, started, input)
                });
                let (result, out) = match stepped {
                    Ok(r) => r,
                    Err(f) => return Step::Failure(f),
                };
                match result {
                    Ok(State::Running) => {
                        self.inner = Inner::Rsasl {
                            session,
                            started: true,
                        };
                        Step::Challenge(out.into_inner())
                    }
                    Ok(State::Finished(sent)) => {
                        let data = out.into_inner();
                        match session.validation() {
                            // Additional data with success (none of PLAIN and LOGIN sends
                            // any): a challenge, the empty reply completes it.
                            Some(Ok(login))
                                if sent == rsasl::prelude::MessageSent::Yes && !data.is_empty() =>
                            {
                                self.inner = Inner::PendingSuccess(login);
                                Step::Challenge(data)
                            }
                            Some(Ok(login)) => Step::Success(login),
                            Some(Err(f)) => Step::Failure(f),
                            None => Step::Failure(AuthFailure::Malformed("no outcome".into())),
                        }
                    }
                    Err(e) => Step::Failure(AuthFailure::Malformed(e.to_string())),
                }
            }
        }
    }

    /// One NTLM message: NEGOTIATE gets the CHALLENGE; AUTHENTICATE is mapped to an account
    /// (the NT domain must be that account's mail domain's), then its response is checked
    /// against the account's NT hash.
    fn ntlm_step(&mut self, state: NtlmState, input: Option<&[u8]>) -> Step {
        match (state, input) {
            (NtlmState::Negotiate { prompted: false }, None) => {
                // [MS-SMTPNTLM] has the server answer a bare `AUTH NTLM` with 334 and wait for
                // NEGOTIATE; an empty challenge is the SASL form of that.
                self.inner = Inner::Ntlm(NtlmState::Negotiate { prompted: true });
                Step::Challenge(Vec::new())
            }
            (_, None) => Step::Failure(AuthFailure::Malformed(
                "NTLM step without a client message".into(),
            )),
            (NtlmState::Negotiate { .. }, Some(msg)) => {
                let negotiate = match ntlm::Negotiate::parse(msg) {
                    Ok(n) => n,
                    Err(e) => return Step::Failure(AuthFailure::Malformed(format!("NTLM: {e}"))),
                };
                let mut server_challenge = [0u8; 8];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut server_challenge);
                let host = self.ctx.hostname.to_ascii_lowercase();
                let (first_label, dns_domain) = host.split_once('.').unwrap_or((&host, &host));
                let nb_computer: String =
                    first_label.to_ascii_uppercase().chars().take(15).collect();
                let nb_domain = self
                    .ctx
                    .snapshot
                    .config
                    .domains
                    .iter()
                    .find_map(|d| d.windows_nt_domain.clone())
                    .unwrap_or_else(|| nb_computer.clone());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let challenge = ntlm::challenge(
                    &negotiate,
                    server_challenge,
                    &ntlm::ServerNames {
                        nb_domain: &nb_domain,
                        nb_computer: &nb_computer,
                        dns_domain,
                        dns_computer: &host,
                    },
                    now,
                );
                self.inner = Inner::Ntlm(NtlmState::Authenticate {
                    negotiate: msg.to_vec(),
                    challenge: challenge.clone(),
                    server_challenge,
                });
                Step::Challenge(challenge)
            }
            (
                NtlmState::Authenticate {
                    negotiate,
                    challenge,
                    server_challenge,
                },
                Some(msg),
            ) => {
                let auth = match ntlm::Authenticate::parse(msg) {
                    Ok(a) => a,
                    Err(e) => return Step::Failure(AuthFailure::Malformed(format!("NTLM: {e}"))),
                };
                match self.ntlm_verify(&auth, &server_challenge, &negotiate, &challenge) {
                    Ok(login) => Step::Success(login),
                    Err(f) => Step::Failure(f),
                }
            }
        }
    }

    /// One GSSAPI message: the acceptor (made at the first message, from the service's keytab)
    /// runs RFC 4752; its outcome, a client principal, is mapped to an account.
    #[cfg(feature = "gssapi")]
    fn gssapi_step(
        &mut self,
        acceptor: Option<Box<std::sync::Mutex<gssapi::Acceptor>>>,
        input: Option<&[u8]>,
    ) -> Step {
        let mut acceptor = match (acceptor, input) {
            (None, None) => {
                // Client-first: an empty challenge asks for the AP-REQ.
                self.inner = Inner::Gssapi(None);
                return Step::Challenge(Vec::new());
            }
            (Some(a), Some(_)) => a,
            (None, Some(_)) => match self.ctx.gssapi_cred() {
                Ok(cred) => Box::new(std::sync::Mutex::new(gssapi::Acceptor::with_cred(&cred))),
                Err(e) => return Step::Failure(AuthFailure::Internal(e)),
            },
            (Some(_), None) => {
                return Step::Failure(AuthFailure::Malformed(
                    "GSSAPI step without a client message".into(),
                ))
            }
        };
        let Some(input) = input else {
            return Step::Failure(AuthFailure::Malformed("no client message".into()));
        };
        let stepped = match acceptor.get_mut() {
            Ok(a) => a.step(input),
            Err(_) => return Step::Failure(AuthFailure::Internal("GSSAPI state poisoned".into())),
        };
        match stepped {
            Ok(gssapi::GssStep::Challenge(c)) => {
                self.inner = Inner::Gssapi(Some(acceptor));
                Step::Challenge(c)
            }
            Ok(gssapi::GssStep::Done { principal, authzid }) => {
                match self.ctx.kerberos_account(&principal, authzid.as_deref()) {
                    Ok(login) => Step::Success(login),
                    Err(f) => Step::Failure(f),
                }
            }
            Err(e) => Step::Failure(match e {
                gssapi::GssFailure::Other(d) => AuthFailure::Internal(format!("Kerberos: {d}")),
                e => AuthFailure::Kerberos {
                    label: match e {
                        gssapi::GssFailure::Expired(_) => "ticket_expired",
                        gssapi::GssFailure::WrongServiceKey(_) => "wrong_service_key",
                        gssapi::GssFailure::Replay(_) => "replayed_token",
                        _ => "malformed",
                    },
                    detail: e.to_string(),
                },
            }),
        }
    }

    fn ntlm_verify(
        &self,
        auth: &ntlm::Authenticate,
        server_challenge: &[u8; 8],
        negotiate: &[u8],
        challenge: &[u8],
    ) -> Result<String, AuthFailure> {
        if auth.response_kind() == ntlm::ResponseKind::Anonymous {
            return Err(AuthFailure::Malformed(
                "anonymous NTLM (no NT response) is not a login".into(),
            ));
        }
        let account = self.ctx.ntlm_account(&auth.user, &auth.domain)?;
        let login = account.login.clone();
        if account.mfa {
            return Err(AuthFailure::MfaAppPasswordRequired(login));
        }
        let Some(hash) = account
            .nt_hash
            .as_ref()
            .and_then(|h| ntlm::nt_hash_bytes(h.expose()))
        else {
            return Err(AuthFailure::NoVerifier(login, "NTLM"));
        };
        if auth.response_kind() == ntlm::ResponseKind::V1 && !self.ctx.allow_ntlm_v1 {
            return Err(AuthFailure::NtlmV1Refused(login));
        }
        match ntlm::verify(auth, &hash, server_challenge, negotiate, challenge) {
            Ok(()) => self.ctx.access(account),
            Err(ntlm::Mismatch::Response) => Err(AuthFailure::BadPassword(login)),
            Err(ntlm::Mismatch::Mic) => Err(AuthFailure::Malformed(format!(
                "NTLM for {login:?}: the response is right but the MIC is not, so the messages were altered on the way"
            ))),
            Err(ntlm::Mismatch::Malformed(e)) => {
                Err(AuthFailure::Malformed(format!("NTLM for {login:?}: {e}")))
            }
        }
    }

    /// One SCRAM-SHA-256 message (RFC 5802 §5): the client-first gets the server-first (the
    /// account's salt, or a stand-in for a login without SCRAM keys); the client-final's
    /// proof is tried against every key of the account, and a match gets the server-final.
    fn scram_step(&mut self, state: ScramState, input: Option<&[u8]>) -> Step {
        let msg = match (state, input) {
            (ScramState::First { prompted: false }, None) => {
                // AUTH without an initial response: an empty challenge asks for client-first.
                self.inner = Inner::Scram(ScramState::First { prompted: true });
                return Step::Challenge(Vec::new());
            }
            (_, None) => {
                return Step::Failure(AuthFailure::Malformed(
                    "SCRAM step without a client message".into(),
                ))
            }
            (ScramState::Final(f), Some(msg)) => return self.scram_final(*f, msg),
            (ScramState::First { .. }, Some(msg)) => msg,
        };
        let first = match scram::ClientFirst::parse(msg) {
            Ok(f) => f,
            Err(e) => return Step::Failure(AuthFailure::Malformed(e)),
        };
        let (salt, iterations, keys) = self.scram_keys(&first.authid);
        let pending = match scram::Pending::new(first, &salt, iterations) {
            Ok(p) => p,
            Err(e) => return Step::Failure(AuthFailure::Internal(e)),
        };
        let server_first = pending.server_first().as_bytes().to_vec();
        self.inner = Inner::Scram(ScramState::Final(Box::new(ScramFinal { pending, keys })));
        Step::Challenge(server_first)
    }

    fn scram_final(&mut self, state: ScramFinal, msg: &[u8]) -> Step {
        let proof = match state.pending.client_final(msg) {
            Ok(p) => p,
            Err(e) => return Step::Failure(AuthFailure::Malformed(e)),
        };
        let keys = match state.keys {
            Ok(k) => k,
            Err(f) => return Step::Failure(f),
        };
        let Some(i) = proof.matching(&keys.keys) else {
            return Step::Failure(AuthFailure::BadPassword(keys.login));
        };
        if !keys.authenticates.get(i).copied().unwrap_or(false) {
            return Step::Failure(AuthFailure::MfaAppPasswordRequired(keys.login));
        }
        let first = state.pending.first();
        if first
            .authzid
            .as_deref()
            .is_some_and(|z| !z.eq_ignore_ascii_case(&first.authid))
        {
            return Step::Failure(AuthFailure::AuthzidMismatch(first.authid.clone()));
        }
        let Some(account) = self.ctx.snapshot.credentials.account(&keys.login) else {
            return Step::Failure(AuthFailure::UnknownUser(keys.login));
        };
        match (self.ctx.access(account), keys.keys.get(i)) {
            (Ok(login), Some(key)) => {
                self.inner = Inner::PendingSuccess(login);
                Step::Challenge(proof.server_final(key))
            }
            (Ok(_), None) => Step::Failure(AuthFailure::Internal("SCRAM key vanished".into())),
            (Err(f), _) => Step::Failure(f),
        }
    }

    /// The salt and iteration count to announce for `authid`, and the keys to try. All keys of
    /// one account share one salt (the compiler derives them so); on a two-factor account the
    /// salt is the app passwords'. A key under another salt (credentials compiled before keys
    /// were shared) cannot be tried. A login without usable keys gets a stand-in salt that is
    /// stable per login, so the server-first message does not tell which logins exist.
    fn scram_keys(&self, authid: &str) -> (Vec<u8>, u32, Result<AccountKeys, AuthFailure>) {
        let credentials = &self.ctx.snapshot.credentials;
        let stand_in = |f: AuthFailure| {
            (
                scram::stand_in_salt(credentials, authid),
                SCRAM_ITERATIONS,
                Err(f),
            )
        };
        let Some(account) = credentials.account(authid) else {
            return stand_in(AuthFailure::UnknownUser(authid.to_string()));
        };
        let none_usable = || {
            if account.mfa {
                AuthFailure::MfaAppPasswordRequired(account.login.clone())
            } else {
                AuthFailure::NoVerifier(account.login.clone(), "SCRAM-SHA-256")
            }
        };
        let all: Vec<(&ScramVerifier, bool)> = account
            .scram_sha256
            .iter()
            .map(|v| (v, !account.mfa))
            .chain(
                account
                    .app_passwords
                    .iter()
                    .filter_map(|a| a.scram_sha256.as_ref())
                    .map(|v| (v, true)),
            )
            .filter(|(v, _)| v.iterations > 0)
            .collect();
        let Some((anchor, _)) = all.iter().find(|(_, ok)| *ok) else {
            return stand_in(none_usable());
        };
        let Ok(salt) = B64.decode(&anchor.salt) else {
            return stand_in(none_usable());
        };
        let (mut keys, mut authenticates) = (Vec::new(), Vec::new());
        for (v, ok) in &all {
            if v.salt != anchor.salt || v.iterations != anchor.iterations {
                continue;
            }
            if let Some(k) = scram::Key::from_verifier(v) {
                keys.push(k);
                authenticates.push(*ok);
            }
        }
        if !authenticates.contains(&true) {
            return stand_in(none_usable());
        }
        (
            salt,
            anchor.iterations,
            Ok(AccountKeys {
                login: account.login.clone(),
                keys,
                authenticates,
            }),
        )
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

/// Contains a panic in a SASL step: the exchange fails with [`AuthFailure::Internal`] (`454`)
/// and the relay goes on.
fn contain<T>(mechanism: Mechanism, f: impl FnOnce() -> T) -> Result<T, AuthFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        AuthFailure::Internal(format!("{} exchange panicked: {what}", mechanism.as_str()))
    })
}

/// The SCRAM-SHA-256 server mechanics (RFC 5802, RFC 7677): message parsing, nonces, proof
/// verification against several stored keys, the server signature. Which keys an account has
/// and what a match means is [`Exchange`]'s business.
///
/// Only `SCRAM-SHA-256` is offered, never `-PLUS`: a client asking for channel binding (`p=`)
/// is refused, as RFC 5802 §6 requires of a server without it; `y` (the client could bind but
/// believes the server cannot) is accepted, because that is true. User names are compared as
/// sent after `=2C`/`=3D` unescaping, without SASLprep: logins are ASCII addresses and the
/// compiler derives SCRAM keys only for ASCII passwords, for which SASLprep changes nothing.
mod scram {
    use std::sync::OnceLock;

    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use mailrelay_crds::config::Credentials;
    use mailrelay_crds::verifier::ScramVerifier;
    use rand::RngCore as _;
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq as _;

    /// SHA-256 output, HMAC-SHA-256 output and the proof are all this long.
    const LEN: usize = 32;

    fn hmac(key: &[u8], msg: &[u8]) -> [u8; LEN] {
        // HMAC takes keys of any length, so this cannot fail; a zero MAC would only fail the
        // comparison.
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
            return [0; LEN];
        };
        m.update(msg);
        m.finalize().into_bytes().into()
    }

    /// The server's keys for one password.
    pub struct Key {
        stored: [u8; LEN],
        server: [u8; LEN],
    }

    impl Key {
        /// `None` when the verifier's keys are not base64 of the right length.
        pub fn from_verifier(v: &ScramVerifier) -> Option<Key> {
            let decode = |s: &str| -> Option<[u8; LEN]> { B64.decode(s).ok()?.try_into().ok() };
            Some(Key {
                stored: decode(&v.stored_key)?,
                server: decode(&v.server_key)?,
            })
        }
    }

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

    /// An optional extension attribute: a letter, `=`, anything without a comma.
    fn extension(part: &str) -> Result<(), String> {
        let b = part.as_bytes();
        if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' {
            Ok(())
        } else {
            Err(format!("SCRAM message has a malformed attribute {part:?}"))
        }
    }

    fn nonce(value: &str) -> Result<&str, String> {
        if value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            Ok(value)
        } else {
            Err("SCRAM nonce has characters outside printable ASCII".into())
        }
    }

    /// `saslname` (RFC 5802 §7): `,` and `=` travel as `=2C` and `=3D`, any other `=` is an
    /// error.
    fn saslname(value: &str) -> Result<String, String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('=') {
            out.push_str(&rest[..i]);
            let escape = rest.get(i..i + 3);
            out.push(match escape {
                Some("=2C") => ',',
                Some("=3D") => '=',
                _ => return Err(format!("SCRAM name {value:?} has a bad escape")),
            });
            rest = &rest[i + 3..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// A parsed client-first message: `gs2-header client-first-message-bare`.
    pub struct ClientFirst {
        /// `n,,` / `y,,` / `n,a=...,` exactly as sent: the client-final's `c=` must repeat it.
        gs2_header: String,
        bare: String,
        pub authid: String,
        /// Non-empty when present.
        pub authzid: Option<String>,
        nonce: String,
    }

    impl ClientFirst {
        pub fn parse(msg: &[u8]) -> Result<ClientFirst, String> {
            let s = text(msg)?;
            let mut parts = s.splitn(3, ',');
            let flag = parts.next().unwrap_or_default();
            match flag {
                "n" | "y" => {}
                f if f.starts_with("p=") => return Err(
                    "SCRAM client requested channel binding, but SCRAM-SHA-256-PLUS is not offered"
                        .into(),
                ),
                f => {
                    return Err(format!(
                        "SCRAM client-first has a bad channel-binding flag {f:?}"
                    ))
                }
            }
            let authzid_part = parts
                .next()
                .ok_or("SCRAM client-first lacks the GS2 header")?;
            let authzid = if authzid_part.is_empty() {
                None
            } else {
                Some(saslname(attr(authzid_part, 'a')?)?)
            };
            let bare = parts
                .next()
                .ok_or("SCRAM client-first lacks the user name")?;
            let mut attrs = bare.split(',');
            let user = attrs.next().unwrap_or_default();
            if user.starts_with("m=") {
                return Err("SCRAM client-first has a mandatory extension we do not know".into());
            }
            let authid = saslname(attr(user, 'n')?)?;
            let client_nonce = nonce(attr(attrs.next().unwrap_or_default(), 'r')?)?;
            for ext in attrs {
                extension(ext)?;
            }
            Ok(ClientFirst {
                gs2_header: format!("{flag},{authzid_part},"),
                bare: bare.to_string(),
                authid,
                authzid,
                nonce: client_nonce.to_string(),
            })
        }
    }

    /// The state between server-first and client-final.
    pub struct Pending {
        first: ClientFirst,
        /// Client nonce followed by ours.
        nonce: String,
        server_first: String,
    }

    impl Pending {
        /// Appends a fresh server nonce (18 bytes from the operating system's CSPRNG) and
        /// builds the server-first message. Fails only when the CSPRNG does.
        pub fn new(first: ClientFirst, salt: &[u8], iterations: u32) -> Result<Pending, String> {
            let mut ours = [0u8; 18];
            rand::rngs::OsRng
                .try_fill_bytes(&mut ours)
                .map_err(|e| format!("no randomness for the SCRAM nonce: {e}"))?;
            Ok(Self::with_server_nonce(
                first,
                salt,
                iterations,
                &B64.encode(ours),
            ))
        }

        /// [`Pending::new`] with a given server nonce (the RFC's test vectors fix it).
        pub(super) fn with_server_nonce(
            first: ClientFirst,
            salt: &[u8],
            iterations: u32,
            ours: &str,
        ) -> Pending {
            let nonce = format!("{}{ours}", first.nonce);
            let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
            Pending {
                first,
                nonce,
                server_first,
            }
        }

        pub fn server_first(&self) -> &str {
            &self.server_first
        }

        pub fn first(&self) -> &ClientFirst {
            &self.first
        }

        /// Checks the client-final message (`c=...,r=...[,ext]*,p=...`): its shape, that the
        /// channel-binding data is our GS2 header (no binding) and the nonce is ours.
        pub fn client_final(&self, msg: &[u8]) -> Result<Proof, String> {
            let s = text(msg)?;
            let (without_proof, proof) = s
                .rsplit_once(",p=")
                .ok_or("SCRAM client-final needs c=, r= and p=")?;
            let proof: [u8; LEN] = B64
                .decode(proof)
                .ok()
                .and_then(|p| p.try_into().ok())
                .ok_or("SCRAM proof is not base64 of 32 bytes")?;
            let mut attrs = without_proof.split(',');
            let binding = B64
                .decode(attr(attrs.next().unwrap_or_default(), 'c')?)
                .map_err(|_| "SCRAM channel binding is not base64".to_string())?;
            if binding != self.first.gs2_header.as_bytes() {
                return Err("SCRAM channel-binding data does not repeat the GS2 header".into());
            }
            let echoed = nonce(attr(attrs.next().unwrap_or_default(), 'r')?)?;
            if echoed != self.nonce {
                return Err("SCRAM client-final nonce is not the server's".into());
            }
            for ext in attrs {
                if ext.starts_with("p=") {
                    return Err("SCRAM client-final has two proofs".into());
                }
                extension(ext)?;
            }
            let auth_message = format!("{},{},{without_proof}", self.first.bare, self.server_first);
            Ok(Proof {
                auth_message: auth_message.into_bytes(),
                proof,
            })
        }
    }

    /// A client proof and the AuthMessage it signs.
    pub struct Proof {
        auth_message: Vec<u8>,
        proof: [u8; LEN],
    }

    impl Proof {
        /// Which key the proof was made with: ClientKey = proof XOR HMAC(StoredKey,
        /// AuthMessage) must hash to StoredKey. Every key is tried and compared in constant
        /// time, so the time taken says nothing about which one matched.
        pub fn matching(&self, keys: &[Key]) -> Option<usize> {
            let mut found = None;
            for (i, key) in keys.iter().enumerate() {
                let signature = hmac(&key.stored, &self.auth_message);
                let mut client_key = [0u8; LEN];
                for (k, (p, s)) in client_key.iter_mut().zip(self.proof.iter().zip(signature)) {
                    *k = p ^ s;
                }
                let stored: [u8; LEN] = Sha256::digest(client_key).into();
                let equal = bool::from(stored.ct_eq(&key.stored));
                if equal && found.is_none() {
                    found = Some(i);
                }
            }
            found
        }

        /// The server-final message: `v=` base64(HMAC(ServerKey, AuthMessage)).
        pub fn server_final(&self, key: &Key) -> Vec<u8> {
            format!("v={}", B64.encode(hmac(&key.server, &self.auth_message))).into_bytes()
        }
    }

    /// The salt announced for a login without usable SCRAM keys (RFC 5802 §9: do not reveal
    /// which users exist). It is stable per login, as a real account's salt is, and secret:
    /// an HMAC of the login keyed with a hash of the credentials' SCRAM server keys (the same
    /// on every pod of one policy), or with a per-process random key when there are none.
    pub fn stand_in_salt(credentials: &Credentials, login: &str) -> Vec<u8> {
        static PROCESS_KEY: OnceLock<[u8; LEN]> = OnceLock::new();
        let mut secret = Sha256::new();
        secret.update(b"mailrelay SCRAM stand-in salt");
        let mut any = false;
        for a in &credentials.accounts {
            let app = a
                .app_passwords
                .iter()
                .filter_map(|x| x.scram_sha256.as_ref());
            for v in a.scram_sha256.iter().chain(app) {
                secret.update(v.server_key.as_bytes());
                any = true;
            }
        }
        let key: [u8; LEN] = if any {
            secret.finalize().into()
        } else {
            *PROCESS_KEY.get_or_init(|| {
                let mut k = [0u8; LEN];
                rand::rngs::OsRng.fill_bytes(&mut k);
                k
            })
        };
        hmac(&key, login.to_ascii_lowercase().as_bytes())[..16].to_vec()
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

    use mailrelay_crds::config::{AppPassword, Credentials, RelayConfig};
    use mailrelay_crds::verifier::PasswordVerifier;

    use super::*;

    const USER: &str = "user@example.test";
    const MFA_USER: &str = "mfa@example.test";

    /// `user@` (primary `secret`, app password `app-secret`) and the two-factor `mfa@`
    /// (primary `primary`, app passwords `app-one` and `app-two`), each account's SCRAM keys
    /// under one salt, as the compiler derives them.
    fn ctx() -> AuthContext {
        ctx_with(accounts())
    }

    fn accounts() -> Vec<Account> {
        // argon2 derivation is slow; the tests share one set.
        static ACCOUNTS: std::sync::OnceLock<Vec<Account>> = std::sync::OnceLock::new();
        ACCOUNTS.get_or_init(derive_accounts).clone()
    }

    fn derive_accounts() -> Vec<Account> {
        let scram = |password: &str, salt: &[u8]| {
            Some(ScramVerifier::derive_with(password, salt, SCRAM_ITERATIONS))
        };
        let app = |name: &str, password: &str, salt: &[u8]| AppPassword {
            name: name.into(),
            verifier: PasswordVerifier::derive(password),
            scram_sha256: scram(password, salt),
        };
        let account = Account {
            login: USER.into(),
            password: Some(PasswordVerifier::derive("secret")),
            scram_sha256: scram("secret", b"user-salt-16byte"),
            cram_md5_secret: None,
            nt_hash: None,
            app_passwords: vec![app("phone", "app-secret", b"user-salt-16byte")],
            mfa: false,
            sender_addresses: vec![],
            access_policy: None,
        };
        let mfa = Account {
            login: MFA_USER.into(),
            password: Some(PasswordVerifier::derive("primary")),
            scram_sha256: scram("primary", b"mfa-salt-16bytes"),
            cram_md5_secret: None,
            nt_hash: None,
            app_passwords: vec![
                app("phone", "app-one", b"mfa-salt-16bytes"),
                app("laptop", "app-two", b"mfa-salt-16bytes"),
            ],
            mfa: true,
            sender_addresses: vec![],
            access_policy: None,
        };
        vec![mfa, account]
    }

    fn ctx_with(accounts: Vec<Account>) -> AuthContext {
        AuthContext {
            snapshot: Arc::new(Snapshot {
                config: RelayConfig::default(),
                credentials: Credentials {
                    accounts,
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
            allow_ntlm_v1: false,
        }
    }

    fn hmac256(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        m.update(msg);
        m.finalize().into_bytes().into()
    }

    /// A SCRAM-SHA-256 client written from RFC 5802 §3 (not the server's code): runs the
    /// exchange with `gs2` as GS2 header and returns the last step and the server-first.
    fn scram_login(ctx: AuthContext, gs2: &str, user: &str, password: &str) -> (Step, String) {
        use sha2::Digest as _;
        let mut ex = Exchange::new(ctx, Mechanism::ScramSha256).unwrap();
        let bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
        let Step::Challenge(server_first) = ex.step(Some(format!("{gs2}{bare}").as_bytes())) else {
            panic!("no server-first");
        };
        let server_first = String::from_utf8(server_first).unwrap();
        let field = |k: &str| {
            server_first
                .split(',')
                .find_map(|p| p.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        let (nonce, salt, iterations) = (field("r="), field("s="), field("i="));
        assert!(nonce.starts_with("fyko+d2lbbFgONRv9qkxdawL") && nonce.len() > 30);
        let salted = ScramVerifier::salted_password(
            password,
            &B64.decode(salt).unwrap(),
            iterations.parse().unwrap(),
        );
        let client_key = hmac256(&salted, b"Client Key");
        let stored_key = sha2::Sha256::digest(client_key);
        let without_proof = format!("c={},r={nonce}", B64.encode(gs2));
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let signature = hmac256(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let step = ex.step(Some(
            format!("{without_proof},p={}", B64.encode(proof)).as_bytes(),
        ));
        let Step::Challenge(server_final) = step else {
            return (step, server_first);
        };
        let server_key = hmac256(&salted, b"Server Key");
        let expected = hmac256(&server_key, auth_message.as_bytes());
        assert_eq!(
            String::from_utf8(server_final).unwrap(),
            format!("v={}", B64.encode(expected)),
            "server signature"
        );
        (ex.step(Some(b"")), server_first)
    }

    /// RFC 7677 §3: the example exchange, byte for byte (the server nonce fixed).
    #[test]
    fn scram_server_reproduces_rfc7677_example() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::derive_with("pencil", &salt, 4096);
        let key = scram::Key::from_verifier(&v).unwrap();
        let other = scram::Key::from_verifier(&ScramVerifier::derive_with("x", &salt, 4096));
        let first = scram::ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(first.authid, "user");
        let pending =
            scram::Pending::with_server_nonce(first, &salt, 4096, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        assert_eq!(
            pending.server_first(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let proof = pending
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        // The right key is found wherever it is in the list.
        let keys = [other.unwrap(), key];
        assert_eq!(proof.matching(&keys), Some(1));
        assert_eq!(
            String::from_utf8(proof.server_final(&keys[1])).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert_eq!(proof.matching(&keys[..1]), None);
    }

    /// Issue 19.6: every app password of a two-factor account works with SCRAM, the primary
    /// password never does (and is logged as such), a wrong one fails.
    #[test]
    fn scram_accepts_every_app_password_of_a_two_factor_account() {
        for app in ["app-one", "app-two"] {
            let (step, _) = scram_login(ctx(), "n,,", MFA_USER, app);
            assert_eq!(step, Step::Success(MFA_USER.into()), "{app}");
        }
        let (step, _) = scram_login(ctx(), "n,,", MFA_USER, "primary");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::MfaAppPasswordRequired(MFA_USER.into()))
        );
        let (step, _) = scram_login(ctx(), "n,,", MFA_USER, "app-three");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::BadPassword(MFA_USER.into()))
        );
    }

    /// Without two-factor authentication the primary password and the app passwords work.
    #[test]
    fn scram_accepts_primary_and_app_passwords_without_mfa() {
        for pw in ["secret", "app-secret"] {
            let (step, _) = scram_login(ctx(), "n,,", USER, pw);
            assert_eq!(step, Step::Success(USER.into()), "{pw}");
        }
        // `y`: the client could bind channels but sees no -PLUS offered; that is accepted.
        let (step, _) = scram_login(ctx(), "y,,", "User@Example.TEST", "secret");
        assert_eq!(step, Step::Success(USER.into()));
        let (step, _) = scram_login(ctx(), "n,a=user@example.test,", USER, "secret");
        assert_eq!(step, Step::Success(USER.into()));
        let (step, _) = scram_login(ctx(), "n,a=other@example.test,", USER, "secret");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::AuthzidMismatch(USER.into()))
        );
        let (step, _) = scram_login(ctx(), "n,,", USER, "wrong");
        assert_eq!(step, Step::Failure(AuthFailure::BadPassword(USER.into())));
    }

    /// An unknown login gets a server-first like a real one, with a salt that stays the same
    /// (as a real account's does), and fails only after the proof.
    #[test]
    fn scram_unknown_user_gets_a_stable_stand_in_salt() {
        let salt_of = |server_first: &str| {
            server_first
                .split(',')
                .find_map(|p| p.strip_prefix("s="))
                .unwrap()
                .to_string()
        };
        let ghost = "ghost@example.test";
        let (step, one) = scram_login(ctx(), "n,,", ghost, "x");
        assert_eq!(step, Step::Failure(AuthFailure::UnknownUser(ghost.into())));
        let (_, two) = scram_login(ctx(), "n,,", ghost, "y");
        assert_eq!(salt_of(&one), salt_of(&two));
        assert!(one.ends_with(&format!(",i={SCRAM_ITERATIONS}")));
        let (_, other) = scram_login(ctx(), "n,,", "nobody@example.test", "x");
        assert_ne!(salt_of(&one), salt_of(&other));
        // A real account's salt is as stable; each exchange gets a new server nonce.
        let (_, a) = scram_login(ctx(), "n,,", USER, "secret");
        let (_, b) = scram_login(ctx(), "n,,", USER, "secret");
        assert_eq!(salt_of(&a), salt_of(&b));
        assert_eq!(B64.decode(salt_of(&a)).unwrap(), b"user-salt-16byte");
        assert_ne!(a, b, "server nonces repeat");
    }

    /// Keys under a salt other than the announced one (credentials compiled before keys were
    /// shared) are not tried; an account without usable keys fails precisely.
    #[test]
    fn scram_keys_under_another_salt_and_accounts_without_keys() {
        let mut accounts = accounts();
        accounts[0].app_passwords[1].scram_sha256 = Some(ScramVerifier::derive("app-two"));
        let c = ctx_with(accounts.clone());
        let (step, _) = scram_login(c.clone(), "n,,", MFA_USER, "app-one");
        assert_eq!(step, Step::Success(MFA_USER.into()));
        let (step, _) = scram_login(c, "n,,", MFA_USER, "app-two");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::BadPassword(MFA_USER.into()))
        );

        for a in &mut accounts {
            a.scram_sha256 = None;
            for app in &mut a.app_passwords {
                app.scram_sha256 = None;
            }
        }
        let c = ctx_with(accounts);
        let (step, _) = scram_login(c.clone(), "n,,", USER, "secret");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::NoVerifier(USER.into(), "SCRAM-SHA-256"))
        );
        let (step, _) = scram_login(c, "n,,", MFA_USER, "app-one");
        assert_eq!(
            step,
            Step::Failure(AuthFailure::MfaAppPasswordRequired(MFA_USER.into()))
        );
    }

    /// Channel binding cannot be honoured (no -PLUS), a `c=` that does not repeat the GS2
    /// header, a foreign nonce, and data after the server-final all fail.
    #[test]
    fn scram_protocol_violations_fail() {
        let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
        let step = ex.step(Some(b"p=tls-unique,,n=user@example.test,r=abc"));
        assert!(
            matches!(&step, Step::Failure(AuthFailure::Malformed(m)) if m.contains("PLUS")),
            "{step:?}"
        );
        for final_msg in [
            // `c=` of "y,," while the client sent "n,,".
            "c=eSws,r=@NONCE@,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=biws,r=abcdefghijklmnopXXXX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=biws,r=@NONCE@,p=AAAA,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=biws,r=@NONCE@,p=AAAA",
        ] {
            let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
            let Step::Challenge(sf) =
                ex.step(Some(format!("n,,n={USER},r=abcdefghijklmnop").as_bytes()))
            else {
                panic!("no server-first");
            };
            let sf = String::from_utf8(sf).unwrap();
            let nonce = sf.split(',').find_map(|p| p.strip_prefix("r=")).unwrap();
            let msg = final_msg.replace("@NONCE@", nonce);
            let step = ex.step(Some(msg.as_bytes()));
            assert!(
                matches!(step, Step::Failure(AuthFailure::Malformed(_))),
                "{msg}: {step:?}"
            );
        }
        // Escaped names: `=2C` and `=3D` decode, other escapes are malformed.
        let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
        assert!(matches!(
            ex.step(Some(b"n,,n=a=2Cb=3Dc@example.test,r=abc")),
            Step::Challenge(_)
        ));
        let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
        assert!(matches!(
            ex.step(Some(b"n,,n=a=41@example.test,r=abc")),
            Step::Failure(AuthFailure::Malformed(_))
        ));
        // Without an initial response: one empty challenge, then the client-first.
        let mut ex = Exchange::new(ctx(), Mechanism::ScramSha256).unwrap();
        assert_eq!(ex.step(None), Step::Challenge(Vec::new()));
        assert!(matches!(
            ex.step(Some(format!("n,,n={USER},r=abc").as_bytes())),
            Step::Challenge(_)
        ));
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

    /// Mail domains `example.test` (NT domain `EXAMPLE`), `other.test` (NT domain `OTHER`,
    /// also has an `ops` account), `plain.test` (no NT domain); `ops@example.test` and
    /// `ops@other.test` share a local part, `user@` is two-factor.
    fn ntlm_ctx() -> AuthContext {
        let domain = |d: &str, nt: Option<&str>| mailrelay_crds::config::DomainPolicy {
            name: None,
            domain: d.into(),
            local: true,
            recipients: mailrelay_crds::config::RecipientPolicy::AcceptAll,
            windows_nt_domain: nt.map(str::to_string),
            kerberos_realm: None,
            dkim: None,
            mta_sts: None,
        };
        let account = |login: &str, password: &str, mfa: bool| Account {
            login: login.into(),
            password: None,
            scram_sha256: None,
            cram_md5_secret: None,
            nt_hash: (!mfa).then(|| mailrelay_crds::verifier::nt_hash(password)),
            app_passwords: vec![],
            mfa,
            sender_addresses: vec![],
            access_policy: None,
        };
        let mut ctx = ctx_with(vec![
            account("alerts@example.test", "alerts-pass", false),
            account("ops@example.test", "ops-pass", false),
            account("ops@other.test", "ops-other", false),
            account("mfa@example.test", "mfa-pass", true),
            account("jo@plain.test", "jo-pass", false),
        ]);
        let snap = Arc::get_mut(&mut ctx.snapshot).unwrap();
        snap.config.domains = vec![
            domain("example.test", Some("EXAMPLE")),
            domain("other.test", Some("OTHER")),
            domain("plain.test", None),
        ];
        ctx
    }

    fn ntlm_login(ctx: AuthContext, user: &str, domain: &str, password: &str, v1: bool) -> Step {
        let mut ex = Exchange::new(ctx, Mechanism::Ntlm).unwrap();
        assert_eq!(ex.step(None), Step::Challenge(Vec::new()));
        let negotiate = ntlm::client::negotiate(true);
        let Step::Challenge(challenge) = ex.step(Some(&negotiate)) else {
            panic!("no CHALLENGE");
        };
        let authenticate = ntlm::client::authenticate(
            &negotiate,
            &challenge,
            &ntlm::client::Options {
                user,
                domain,
                password,
                v1,
                with_mic: true,
            },
        );
        assert!(ex.claimed_login(Some(&authenticate)).is_some());
        ex.step(Some(&authenticate))
    }

    #[test]
    fn ntlm_maps_every_username_form_to_the_account() {
        let ok = |user: &str, domain: &str, password: &str| {
            ntlm_login(ntlm_ctx(), user, domain, password, false)
        };
        let alerts = Step::Success("alerts@example.test".into());
        assert_eq!(ok("alerts", "EXAMPLE", "alerts-pass"), alerts);
        assert_eq!(
            ok("Alerts", "example", "alerts-pass"),
            alerts,
            "case-insensitive"
        );
        assert_eq!(ok("EXAMPLE\\alerts", "", "alerts-pass"), alerts);
        assert_eq!(ok("alerts@example.test", "", "alerts-pass"), alerts);
        assert_eq!(ok("alerts@example.test", "EXAMPLE", "alerts-pass"), alerts);
        assert_eq!(ok("alerts", "", "alerts-pass"), alerts, "unique bare user");
        assert_eq!(
            ok("ops", "OTHER", "ops-other"),
            Step::Success("ops@other.test".into())
        );
        assert_eq!(
            ok("alerts", "EXAMPLE", "wrong"),
            Step::Failure(AuthFailure::BadPassword("alerts@example.test".into()))
        );
    }

    #[test]
    fn ntlm_refusals_say_exactly_why() {
        let fail = |user: &str, domain: &str, password: &str| match ntlm_login(
            ntlm_ctx(),
            user,
            domain,
            password,
            false,
        ) {
            Step::Failure(f) => f,
            other => panic!("{user} {domain}: {other:?}"),
        };
        let f = fail("alerts", "EXAMPLE.TEST", "alerts-pass");
        assert_eq!(
            f.to_string(),
            "User alerts performed NTLM authentication in NT domain EXAMPLE.TEST, this domain is not valid"
        );
        assert_eq!(f.label(), "nt_domain_invalid");
        assert!(f.is_guess());
        // A known NT domain, but the login belongs to another one.
        assert!(matches!(
            fail("alerts@example.test", "OTHER", "alerts-pass"),
            AuthFailure::NtDomainInvalid { .. }
        ));
        assert_eq!(
            fail("mfa", "EXAMPLE", "mfa-pass").to_string(),
            "user \"mfa@example.test\": Only application passwords are allowed since 2FA is enabled"
        );
        assert!(matches!(
            fail("ops", "", "ops-pass"),
            AuthFailure::NtlmAmbiguous { logins, .. } if logins.len() == 2
        ));
        assert!(matches!(
            fail("jo@plain.test", "", "jo-pass"),
            AuthFailure::NtlmDomainDisabled { .. }
        ));
        assert_eq!(
            fail("nobody", "EXAMPLE", "x"),
            AuthFailure::UnknownUser("EXAMPLE\\nobody".into())
        );
    }

    #[test]
    fn ntlm_v1_only_where_the_service_allows_it() {
        let step = ntlm_login(ntlm_ctx(), "alerts", "EXAMPLE", "alerts-pass", true);
        assert_eq!(
            step,
            Step::Failure(AuthFailure::NtlmV1Refused("alerts@example.test".into()))
        );
        let mut ctx = ntlm_ctx();
        ctx.allow_ntlm_v1 = true;
        assert_eq!(
            ntlm_login(ctx.clone(), "alerts", "EXAMPLE", "alerts-pass", true),
            Step::Success("alerts@example.test".into())
        );
        assert_eq!(
            ntlm_login(ctx, "alerts", "EXAMPLE", "nope", true),
            Step::Failure(AuthFailure::BadPassword("alerts@example.test".into()))
        );
    }

    #[test]
    fn ntlm_garbage_ends_the_exchange_not_the_relay() {
        for bad in [&b""[..], b"NTLMSSP\0", b"NTLMSSP\0\x01\0\0\0", &[0xff; 300]] {
            let mut ex = Exchange::new(ntlm_ctx(), Mechanism::Ntlm).unwrap();
            match ex.step(Some(bad)) {
                Step::Failure(AuthFailure::Malformed(_)) => {}
                Step::Challenge(c) => {
                    // A short but well-formed NEGOTIATE: the AUTHENTICATE step must fail.
                    assert!(!c.is_empty());
                    assert!(matches!(ex.step(Some(bad)), Step::Failure(_)));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn kerberos_principals_map_by_realm_to_accounts() {
        let mut ctx = ntlm_ctx();
        let snap = Arc::get_mut(&mut ctx.snapshot).unwrap();
        snap.config.domains[0].kerberos_realm = Some("EXAMPLE.TEST".into());
        snap.config.domains[1].kerberos_realm = Some("OTHER.TEST".into());
        assert_eq!(
            ctx.kerberos_account("alerts@EXAMPLE.TEST", None),
            Ok("alerts@example.test".into())
        );
        assert_eq!(
            ctx.kerberos_account("ops@OTHER.TEST", Some("OPS@other.test")),
            Ok("ops@other.test".into())
        );
        // Realms are case-sensitive.
        assert_eq!(
            ctx.kerberos_account("alerts@example.test", None)
                .unwrap_err()
                .label(),
            "kerberos_realm_invalid"
        );
        assert!(matches!(
            ctx.kerberos_account("nobody@EXAMPLE.TEST", None),
            Err(AuthFailure::KerberosNoAccount { .. })
        ));
        assert!(matches!(
            ctx.kerberos_account("alerts/admin@EXAMPLE.TEST", None),
            Err(AuthFailure::KerberosNoAccount { .. })
        ));
        assert_eq!(
            ctx.kerberos_account("alerts@EXAMPLE.TEST", Some("ops@example.test")),
            Err(AuthFailure::AuthzidMismatch("alerts@example.test".into()))
        );
        assert_eq!(
            ctx.kerberos_account("mfa@EXAMPLE.TEST", None),
            Err(AuthFailure::MfaAppPasswordRequired(
                "mfa@example.test".into()
            ))
        );
    }
}
