//! MailDomain → [`DomainPolicy`] and the accounts from its Secret → [`Account`]s with password
//! verifiers. A bad account is left out (the domain is reported partly invalid); a bad domain
//! setting or an unreadable Secret leaves the whole domain out, unless the domain was live: then
//! its last good version stays, accounts included (see [`super::previous`]). Domain names are
//! settled by [`claim`], so a live domain keeps its name.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;

use super::previous::{claim, Claimant, Previous};
use super::report::{Kind, ObjectReport, Problem};
use super::{report, sorted, Ctx, LivePolicy};
use crate::address::AddressPattern;
use crate::api::{AccountEntry, AccountsFile, MailDomain, ACCOUNTS_KEY, RECIPIENTS_KEY};
use crate::config::{Account, AppPassword, Credentials, DomainPolicy, RecipientPolicy};
use crate::verifier::{nt_hash, PasswordVerifier, ScramVerifier, SecretString, SCRAM_ITERATIONS};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

type Policies<'a> = BTreeMap<String, LivePolicy<'a>>;

/// Which password-equivalent secrets the relay needs: each exists in the credentials only while
/// a service offers the mechanism that uses it.
#[derive(Clone, Copy, Debug)]
pub struct Secrets {
    /// A service offers CRAM-MD5: accounts carry their plain-text password.
    pub cram_md5: bool,
    /// A service offers NTLM: accounts of domains with `windowsNtDomain` carry their NT hash.
    pub nt_hash: bool,
}

/// One MailDomain compiled on its own (without the duplicate-domain check).
struct Compiled {
    report: ObjectReport,
    /// The normalized domain name of the current spec.
    domain: String,
    /// `None` when invalid.
    out: Option<(DomainPolicy, Vec<Account>)>,
}

pub fn compile(
    ctx: &Ctx<'_>,
    objs: &[MailDomain],
    policies: &Policies<'_>,
    all_policy_names: &BTreeSet<String>,
    secrets: Secrets,
    previous_output: &Previous,
) -> (Vec<DomainPolicy>, Vec<Account>, Vec<ObjectReport>) {
    let previous = Some(&previous_output.credentials);
    let mut compiled = Vec::new();
    for md in sorted(objs) {
        let name = md.name_any();
        let mut r = report(Kind::MailDomain, name.clone(), md.metadata.generation);
        let s = &md.spec;
        let domain = s.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Err(m) = crate::validate::domain_name(&domain) {
            r.problems
                .push(Problem::invalid("spec.domain", "InvalidDomain", m));
        }
        if let Some(nt) = &s.windows_nt_domain {
            if nt.contains('.')
                && nt
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                // Kerio accepts this form and then refuses every Windows client; so does the
                // relay (with Kerio's log line), but says why up front.
                r.problems.push(Problem::warning(
                    "spec.windowsNtDomain",
                    "NtDomainLooksLikeDnsName",
                    format!("{nt:?} looks like a DNS name, but Windows clients present the short NetBIOS name (`echo %USERDOMAIN%` on a domain-joined host shows it, e.g. {:?}), so NTLM logins fail with \"performed NTLM authentication in NT domain …, this domain is not valid\"; set the NetBIOS name here and keep the DNS form in kerberosRealm", nt.split('.').next().unwrap_or(nt).to_ascii_uppercase()),
                ));
            } else if nt.is_empty()
                || nt.len() > 15
                || !nt
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                r.problems.push(Problem::invalid(
                    "spec.windowsNtDomain",
                    "InvalidNtDomain",
                    format!("{nt:?} is not a NetBIOS domain name (1-15 letters, digits, - or _)"),
                ));
            }
        }
        if let Some(realm) = &s.kerberos_realm {
            if crate::validate::domain_name(realm).is_err() || realm.to_ascii_uppercase() != *realm
            {
                r.problems.push(Problem::invalid(
                    "spec.kerberosRealm",
                    "InvalidRealm",
                    format!("{realm:?} is not a Kerberos realm; use the upper-case DNS form, e.g. EXAMPLE.COM"),
                ));
            }
        }

        // Recipients.
        let mut listed: Vec<String> = Vec::new();
        let mut accept_all = false;
        if let Some(rs) = &s.recipients {
            accept_all = rs.accept_all.unwrap_or(false);
            if accept_all && (!rs.addresses.is_empty() || rs.secret_ref.is_some()) {
                r.problems.push(Problem::invalid(
                    "spec.recipients.acceptAll",
                    "ConflictingRecipients",
                    "acceptAll excludes addresses and secretRef",
                ));
            }
            let mut lines: Vec<(String, String)> = rs
                .addresses
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("spec.recipients.addresses[{i}]"), a.clone()))
                .collect();
            if let Some(sr) = &rs.secret_ref {
                let key = sr.key.as_deref().unwrap_or(RECIPIENTS_KEY);
                match ctx.secrets.get(&sr.name, key) {
                    Ok(text) => lines.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(|l| (format!("Secret {}/{key}", sr.name), l.to_string())),
                    ),
                    Err(m) => r.problems.push(Problem::invalid(
                        "spec.recipients.secretRef",
                        "MissingSecret",
                        m,
                    )),
                }
            }
            for (field, a) in lines {
                match local_part_of(&a, &domain) {
                    Ok(lp) => listed.push(lp),
                    Err(m) => r
                        .problems
                        .push(Problem::invalid(field, "InvalidRecipient", m)),
                }
            }
        }

        // Accounts.
        let mut domain_accounts = Vec::new();
        if let Some(ar) = &s.accounts_secret_ref {
            let key = ar.key.as_deref().unwrap_or(ACCOUNTS_KEY);
            match ctx.secrets.get(&ar.name, key) {
                Err(m) => r.problems.push(Problem::invalid(
                    "spec.accountsSecretRef",
                    "MissingSecret",
                    m,
                )),
                Ok(text) => match serde_norway::from_str::<AccountsFile>(&text) {
                    Err(e) => r.problems.push(Problem::invalid(
                        "spec.accountsSecretRef",
                        "InvalidAccounts",
                        format!(
                            "Secret {:?} key {key:?} is not a valid accounts file: {e}",
                            ar.name
                        ),
                    )),
                    Ok(file) => {
                        let mut names = BTreeSet::new();
                        for (i, entry) in file.accounts.iter().enumerate() {
                            let field = format!("Secret {}/{key} accounts[{i}]", ar.name);
                            if !names.insert(entry.name.to_ascii_lowercase()) {
                                r.problems.push(Problem::degraded(
                                    field,
                                    "DuplicateAccount",
                                    format!(
                                        "account {:?} is listed twice; the second is ignored",
                                        entry.name
                                    ),
                                ));
                                continue;
                            }
                            match account(
                                entry,
                                &domain,
                                &name,
                                policies,
                                all_policy_names,
                                Secrets {
                                    nt_hash: secrets.nt_hash && s.windows_nt_domain.is_some(),
                                    ..secrets
                                },
                                previous,
                            ) {
                                Ok(a) => domain_accounts.push(a),
                                Err(m) => r.problems.push(Problem::degraded(
                                    field,
                                    "InvalidAccount",
                                    format!("account {:?} left out: {m}", entry.name),
                                )),
                            }
                        }
                    }
                },
            }
        }
        if secrets.nt_hash && s.windows_nt_domain.is_some() {
            ntlm_warnings(&mut r, &domain_accounts);
        }
        if s.local
            && !accept_all
            && listed.is_empty()
            && domain_accounts.is_empty()
            && !r.is_invalid()
        {
            r.problems.push(Problem::warning(
                "spec.recipients",
                "NoRecipients",
                "this local domain has no accounts and no recipients, so all mail to it is refused; set recipients.acceptAll or list addresses",
            ));
        }
        if r.is_invalid() {
            compiled.push(Compiled {
                report: r,
                domain,
                out: None,
            });
            continue;
        }
        for a in &domain_accounts {
            if let Some((lp, _)) = a.login.rsplit_once('@') {
                listed.push(lp.to_string());
            }
        }
        listed.sort();
        listed.dedup();
        let policy = DomainPolicy {
            name: Some(name.clone()),
            domain: domain.clone(),
            local: s.local,
            recipients: if accept_all {
                RecipientPolicy::AcceptAll
            } else {
                RecipientPolicy::Listed(listed)
            },
            windows_nt_domain: s.windows_nt_domain.clone(),
            kerberos_realm: s.kerberos_realm.clone(),
            dkim: None,
            mta_sts: None,
        };
        compiled.push(Compiled {
            report: r,
            domain,
            out: Some((policy, domain_accounts)),
        });
    }
    let (domains, mut accounts, reports) = settle(compiled, policies, secrets, previous_output);
    accounts.sort_by(|a: &Account, b: &Account| a.login.cmp(&b.login));
    (domains, accounts, reports)
}

/// The accounts of an NTLM domain that NTLM will refuse, and what their clients must do instead
/// (the two causes the NTLM troubleshooting document names besides the NT domain itself).
fn ntlm_warnings(r: &mut ObjectReport, accounts: &[Account]) {
    let list = |pick: &dyn Fn(&Account) -> bool| {
        let names: Vec<&str> = accounts
            .iter()
            .filter(|a| pick(a))
            .map(|a| a.login.as_str())
            .collect();
        (!names.is_empty()).then(|| names.join(", "))
    };
    if let Some(names) = list(&|a| a.mfa) {
        r.problems.push(Problem::warning(
            "spec.accountsSecretRef",
            "NtlmRefusesMfaAccounts",
            format!("NTLM refuses two-factor accounts (\"Only application passwords are allowed since 2FA is enabled\"): {names}; their tools must use PLAIN or LOGIN over TLS with an app password (PowerShell Send-MailMessage cannot choose the mechanism: use MailKit or another client that can)"),
        ));
    }
    if let Some(names) = list(&|a| !a.mfa && a.nt_hash.is_none()) {
        r.problems.push(Problem::warning(
            "spec.accountsSecretRef",
            "NtlmNeedsPlainPassword",
            format!("NTLM needs the NT hash, which cannot be derived from a passwordHash; these accounts cannot use NTLM: {names}; give their password in plain text or use PLAIN/LOGIN over TLS"),
        ));
    }
}

/// Settles domain names between MailDomains (a live one keeps its name) and puts back the last
/// good version of live domains that are invalid now.
fn settle(
    compiled: Vec<Compiled>,
    policies: &Policies<'_>,
    secrets: Secrets,
    previous: &Previous,
) -> (Vec<DomainPolicy>, Vec<Account>, Vec<ObjectReport>) {
    let claimants: Vec<Claimant<String>> = compiled
        .iter()
        .map(|c| Claimant {
            name: c.report.name.clone(),
            live: previous
                .domain(&c.report.name, &c.domain)
                .map(|d| d.domain.clone()),
            wants: c.out.as_ref().map(|_| c.domain.clone()),
        })
        .collect();
    let mut domains = Vec::new();
    let mut accounts = Vec::new();
    let mut reports = Vec::new();
    for (c, outcome) in compiled.into_iter().zip(claim(&claimants)) {
        let mut r = c.report;
        if let Some(x) = &outcome.conflict {
            r.problems.push(Problem::invalid(
                "spec.domain",
                "DuplicateDomain",
                format!(
                    "domain {:?} is already defined by MailDomain {:?}{}",
                    x.key,
                    x.holder,
                    x.live_note()
                ),
            ));
        }
        match c.out {
            Some((policy, domain_accounts)) if !r.is_invalid() => {
                domains.push(policy);
                accounts.extend(domain_accounts);
            }
            _ => {
                let last = previous
                    .domain(&r.name, &c.domain)
                    .filter(|_| outcome.keeps_live);
                if let Some(last) = last {
                    r.stale = true;
                    let mut kept = last.clone();
                    kept.name = Some(r.name.clone());
                    for a in previous.accounts_of(&last.domain) {
                        if let Some(p) = a
                            .access_policy
                            .as_ref()
                            .filter(|p| !policies.contains_key(*p))
                        {
                            // The relay would refuse the whole policy over a dangling
                            // reference; without its access policy the account fails closed.
                            r.problems.push(Problem::degraded(
                                "spec.accountsSecretRef",
                                "LastGoodUnusable",
                                format!("account {:?} of the last good version is left out: its accessPolicy {p:?} is gone", a.login),
                            ));
                            continue;
                        }
                        let mut a = a.clone();
                        if !secrets.cram_md5 {
                            // Plain-text secrets exist only while a service offers CRAM-MD5.
                            a.cram_md5_secret = None;
                        }
                        if !secrets.nt_hash || last.windows_nt_domain.is_none() {
                            a.nt_hash = None;
                        }
                        accounts.push(a);
                    }
                    domains.push(kept);
                }
            }
        }
        reports.push(r);
    }
    (domains, accounts, reports)
}

/// `alice` or `alice@domain` → `alice`; an address of another domain is an error.
fn local_part_of(a: &str, domain: &str) -> Result<String, String> {
    let a = a.trim().to_ascii_lowercase();
    let lp = match a.rsplit_once('@') {
        Some((lp, d)) if d == domain => lp.to_string(),
        Some((_, d)) => {
            return Err(format!("{a:?} belongs to domain {d:?}, not {domain:?}"));
        }
        None => a.clone(),
    };
    if lp.is_empty() || lp.len() > 64 || lp.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(format!("{a:?} is not a valid local part or address"));
    }
    Ok(lp)
}

fn verifier(
    password: Option<&str>,
    hash: Option<&str>,
    previous: Option<&PasswordVerifier>,
    what: &str,
) -> Result<PasswordVerifier, String> {
    match (password, hash) {
        (Some(_), Some(_)) => Err(format!("{what}: set password or passwordHash, not both")),
        (None, None) => Err(format!("{what}: needs password or passwordHash")),
        (Some(""), None) => Err(format!("{what}: the password is empty")),
        (Some(p), None) => Ok(previous
            .filter(|v| v.verify(p))
            .cloned()
            .unwrap_or_else(|| PasswordVerifier::derive(p))),
        (None, Some(h)) => {
            PasswordVerifier::from_phc(h).map_err(|e| format!("{what}: passwordHash {e}"))
        }
    }
}

/// A password SCRAM can use: SCRAM needs SASLprep for non-ASCII passwords; rather than guess a
/// normalisation, such passwords (and hash-only ones) get no SCRAM keys.
fn scram_eligible(password: Option<&str>) -> Option<&str> {
    password.filter(|p| p.is_ascii() && !p.is_empty())
}

/// SCRAM-SHA-256 keys for all passwords of one account (the primary, then each app password),
/// each paired with its previous keys. They share one salt and iteration count: a SCRAM server
/// sends the salt in its first message, before it can know which password the client holds, so
/// only keys under that one salt can be tried (the relay tries each of them).
///
/// Output stays stable across recompiles: the account keeps the salt of the first previous key
/// that still matches its password, and every key that still matches under that salt is kept
/// as it was; only new or changed passwords (or keys under an older, per-password salt) are
/// derived again.
fn scram_keys(passwords: &[(Option<&str>, Option<&ScramVerifier>)]) -> Vec<Option<ScramVerifier>> {
    // Which previous keys still match their password; each is checked once (PBKDF2 is slow).
    let still_valid: Vec<Option<&ScramVerifier>> = passwords
        .iter()
        .map(|(p, prev)| match (scram_eligible(*p), prev) {
            (Some(p), Some(v)) if v.verify(p) => Some(*v),
            _ => None,
        })
        .collect();
    let shared = still_valid
        .iter()
        .flatten()
        .find_map(|v| Some((B64.decode(&v.salt).ok()?, v.iterations)));
    let (salt, iterations) =
        shared.unwrap_or_else(|| (ScramVerifier::random_salt().to_vec(), SCRAM_ITERATIONS));
    passwords
        .iter()
        .zip(still_valid)
        .map(|((p, _), valid)| {
            let p = scram_eligible(*p)?;
            Some(match valid {
                Some(v) if v.iterations == iterations && B64.decode(&v.salt).ok()? == salt => {
                    v.clone()
                }
                _ => ScramVerifier::derive_with(p, &salt, iterations),
            })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn account(
    e: &AccountEntry,
    domain: &str,
    domain_object: &str,
    policies: &Policies<'_>,
    all_policy_names: &BTreeSet<String>,
    secrets: Secrets,
    previous: Option<&Credentials>,
) -> Result<Account, String> {
    let lp = local_part_of(&e.name, domain)?;
    let login = format!("{lp}@{domain}");
    let prev = previous.and_then(|c| c.account(&login));
    let mut out = Account {
        login: login.clone(),
        password: None,
        scram_sha256: None,
        cram_md5_secret: None,
        nt_hash: None,
        app_passwords: Vec::new(),
        mfa: e.mfa,
        sender_addresses: Vec::new(),
        access_policy: None,
    };
    if e.password.is_some() || e.password_hash.is_some() || !e.mfa {
        out.password = Some(verifier(
            e.password.as_deref(),
            e.password_hash.as_deref(),
            prev.and_then(|p| p.password.as_ref()),
            "primary password",
        )?);
        if secrets.cram_md5 && !e.mfa {
            out.cram_md5_secret = e.password.clone().map(SecretString::new);
        }
        if secrets.nt_hash && !e.mfa {
            out.nt_hash = e.password.as_deref().map(nt_hash);
        }
    }
    let mut app_names = BTreeSet::new();
    for (i, ap) in e.app_passwords.iter().enumerate() {
        if ap.name.trim().is_empty() || !app_names.insert(ap.name.clone()) {
            return Err(format!("appPasswords[{i}]: needs a unique, non-empty name"));
        }
        let prev_ap = prev.and_then(|p| p.app_passwords.iter().find(|x| x.name == ap.name));
        out.app_passwords.push(AppPassword {
            name: ap.name.clone(),
            verifier: verifier(
                ap.password.as_deref(),
                ap.password_hash.as_deref(),
                prev_ap.map(|x| &x.verifier),
                &format!("appPasswords[{i}] ({})", ap.name),
            )?,
            scram_sha256: None,
        });
    }
    // The primary's keys are derived even on a two-factor account (where they never
    // authenticate) so that the relay can tell "primary password used" from a wrong one.
    let primary = e.password.as_deref().filter(|_| out.password.is_some());
    let mut slots = vec![(primary, prev.and_then(|p| p.scram_sha256.as_ref()))];
    for ap in &e.app_passwords {
        let prev_ap = prev.and_then(|p| p.app_passwords.iter().find(|x| x.name == ap.name));
        slots.push((
            ap.password.as_deref(),
            prev_ap.and_then(|x| x.scram_sha256.as_ref()),
        ));
    }
    let mut keys = scram_keys(&slots).into_iter();
    out.scram_sha256 = keys.next().flatten();
    for (ap, k) in out.app_passwords.iter_mut().zip(keys) {
        ap.scram_sha256 = k;
    }
    if e.mfa && out.app_passwords.is_empty() {
        return Err("mfa is on but there are no appPasswords, so the account could never authenticate over SMTP".into());
    }
    for (i, a) in e.sender_addresses.iter().enumerate() {
        let p = AddressPattern::parse(a).map_err(|m| format!("senderAddresses[{i}]: {m}"))?;
        out.sender_addresses.push(p.as_str().to_string());
    }
    out.access_policy = match &e.access_policy {
        Some(p) if policies.contains_key(p) => Some(p.clone()),
        Some(p) if all_policy_names.contains(p) => {
            return Err(format!(
                "accessPolicy {p:?} is invalid; fix it first (see its status)"
            ));
        }
        Some(p) => {
            return Err(format!(
                "accessPolicy {p:?} does not exist in this namespace"
            ))
        }
        None => policies
            .iter()
            .find(|(_, p)| p.governs_account(&login))
            .or_else(|| {
                policies
                    .iter()
                    .find(|(_, p)| p.governs_domain(domain_object))
            })
            .map(|(n, _)| n.clone()),
    };
    Ok(out)
}
