//! SmtpService → [`ServicePolicy`]: ports, TLS source, authentication defaults, relay control and
//! limits (DNS blocklists in [`super::dnsbl`]), with the open-relay and plaintext-auth warnings.
//! Port conflicts are settled by [`claim`] (a live service keeps its port), and a live service
//! that became invalid keeps its last good version.

use kube::ResourceExt;

use super::previous::{claim, service_groups, Claimant, Previous};
use super::report::{Kind, ObjectReport, Problem};
use super::{report, sorted, Ctx};
use crate::api::{AuthModeSpec, MechanismSpec, ServiceProtocol, SmtpService};
use crate::config::{
    AuthMode, AuthPolicy, BruteForce, Limits, Mechanism, Protocol, ProxyProtocol, RelayControl,
    ServicePolicy, TlsSource,
};

/// Compiled services (in name order), their reports, and the IP groups that grant relay
/// permission.
pub fn compile(
    ctx: &Ctx<'_>,
    objs: &[SmtpService],
    previous: &Previous,
) -> (Vec<ServicePolicy>, Vec<ObjectReport>, Vec<String>) {
    let mut relay_groups = Vec::new();
    let mut compiled = Vec::new();
    for svc in sorted(objs) {
        let name = svc.name_any();
        let mut r = report(Kind::SmtpService, name.clone(), svc.metadata.generation);
        let p = compile_one(ctx, svc, &name, &mut r, &mut relay_groups);
        compiled.push((r, p));
    }
    let claimants: Vec<Claimant<u16>> = compiled
        .iter()
        .map(|(r, p)| Claimant {
            name: r.name.clone(),
            live: previous.service(&r.name).map(|s| s.port),
            wants: p.as_ref().map(|p| p.port),
        })
        .collect();
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for ((mut r, p), outcome) in compiled.into_iter().zip(claim(&claimants)) {
        if let Some(c) = &outcome.conflict {
            r.problems.push(Problem::invalid(
                "spec.port",
                "PortConflict",
                format!(
                    "port {} is already used by SmtpService {:?}{}; give this service another port",
                    c.key,
                    c.holder,
                    c.live_note()
                ),
            ));
        }
        match p {
            Some(p) if !r.is_invalid() => out.push(p),
            _ => {
                if let Some(last) = previous.service(&r.name).filter(|_| outcome.keeps_live) {
                    let gone: Vec<&str> = service_groups(last)
                        .into_iter()
                        .filter(|g| !ctx.groups.contains_key(*g))
                        .collect();
                    if let Some(g) = gone.first() {
                        r.problems.push(Problem::invalid(
                            "spec",
                            "LastGoodUnusable",
                            format!("its last good version cannot stay live either: it refers to IpAddressGroup {g:?}, which is gone"),
                        ));
                    } else {
                        if let RelayControl::Restricted {
                            ip_group: Some(g), ..
                        } = &last.relay_control
                        {
                            if !relay_groups.contains(g) {
                                relay_groups.push(g.clone());
                            }
                        }
                        r.stale = true;
                        out.push(last.clone());
                    }
                }
            }
        }
        reports.push(r);
    }
    (out, reports, relay_groups)
}

fn compile_one(
    ctx: &Ctx<'_>,
    svc: &SmtpService,
    name: &str,
    r: &mut ObjectReport,
    relay_groups: &mut Vec<String>,
) -> Option<ServicePolicy> {
    let s = &svc.spec;
    let port = match u16::try_from(s.port) {
        Ok(p) if p > 0 => p,
        _ => {
            r.problems.push(Problem::invalid(
                "spec.port",
                "InvalidPort",
                format!("port {} is outside 1-65535", s.port),
            ));
            0
        }
    };
    let protocol = match s.protocol {
        ServiceProtocol::Smtp => Protocol::Smtp,
        ServiceProtocol::Submission => Protocol::Submission,
        ServiceProtocol::Smtps => Protocol::Smtps,
    };

    let tls = match &s.tls {
        None => {
            if protocol == Protocol::Smtps {
                r.problems.push(Problem::invalid(
                    "spec.tls",
                    "TlsRequired",
                    "protocol Smtps (implicit TLS) needs tls.secretName or tls.issuerRef",
                ));
            }
            None
        }
        Some(t) => match (&t.issuer_ref, &t.secret_name) {
            (Some(_), Some(_)) | (None, None) => {
                r.problems.push(Problem::invalid(
                    "spec.tls",
                    "InvalidTls",
                    "set exactly one of tls.issuerRef and tls.secretName",
                ));
                None
            }
            (Some(_), None) if t.dns_names.is_empty() => {
                r.problems.push(Problem::invalid(
                    "spec.tls.dnsNames",
                    "InvalidTls",
                    "tls.issuerRef needs at least one entry in tls.dnsNames for the Certificate",
                ));
                None
            }
            (Some(_), None) => Some(TlsSource {
                secret_name: format!("{name}-tls"),
                dns_names: t.dns_names.clone(),
            }),
            (None, Some(secret)) => Some(TlsSource {
                secret_name: secret.clone(),
                dns_names: t.dns_names.clone(),
            }),
        },
    };
    if let Some(t) = &s.tls {
        for (i, d) in t.dns_names.iter().enumerate() {
            let bare = d.strip_prefix("*.").unwrap_or(d);
            if let Err(m) = crate::validate::host_name(bare) {
                r.problems.push(Problem::invalid(
                    format!("spec.tls.dnsNames[{i}]"),
                    "InvalidName",
                    m,
                ));
            }
        }
    }

    let auth_spec = s.authentication.clone().unwrap_or_default();
    let default_mode = match protocol {
        Protocol::Smtp => AuthMode::Optional,
        Protocol::Submission | Protocol::Smtps => AuthMode::Required,
    };
    let mode = match auth_spec.mode {
        None => default_mode,
        Some(AuthModeSpec::Disabled) => AuthMode::Disabled,
        Some(AuthModeSpec::Optional) => AuthMode::Optional,
        Some(AuthModeSpec::Required) => AuthMode::Required,
    };
    if protocol == Protocol::Submission && mode != AuthMode::Required {
        r.problems.push(Problem::invalid(
            "spec.authentication.mode",
            "SubmissionNeedsAuth",
            "protocol Submission requires authentication.mode Required (RFC 6409); use protocol Smtp for an unauthenticated listener",
        ));
    }
    let mut mechanisms: Vec<Mechanism> = if auth_spec.mechanisms.is_empty() {
        vec![Mechanism::Plain, Mechanism::Login, Mechanism::ScramSha256]
    } else {
        auth_spec
            .mechanisms
            .iter()
            .map(|m| match m {
                MechanismSpec::Plain => Mechanism::Plain,
                MechanismSpec::Login => Mechanism::Login,
                MechanismSpec::ScramSha256 => Mechanism::ScramSha256,
                MechanismSpec::CramMd5 => Mechanism::CramMd5,
                MechanismSpec::Ntlm => Mechanism::Ntlm,
                MechanismSpec::Gssapi => Mechanism::Gssapi,
            })
            .collect()
    };
    let mut seen = Vec::new();
    mechanisms.retain(|m| {
        let fresh = !seen.contains(m);
        seen.push(*m);
        fresh
    });
    if mode != AuthMode::Disabled {
        if auth_spec.allow_plaintext_without_tls {
            r.problems.push(Problem::warning(
                "spec.authentication.allowPlaintextWithoutTls",
                "PlaintextAuth",
                "authentication is allowed without TLS: credentials (PLAIN/LOGIN passwords, SCRAM proofs) can cross the network unencrypted",
            ));
        }
        // Optional AUTH on a plain port-25 service without tls is the usual inbound MX: AUTH is
        // simply not offered there. Warn when somebody evidently expects to authenticate.
        let expects_auth = mode == AuthMode::Required || !auth_spec.mechanisms.is_empty();
        if tls.is_none() && !auth_spec.allow_plaintext_without_tls && expects_auth {
            r.problems.push(Problem::warning(
                "spec.tls",
                "NoUsableMechanism",
                "without tls, AUTH is refused before STARTTLS, so no client can authenticate on this service; add tls",
            ));
        }
        if mechanisms.contains(&Mechanism::CramMd5) {
            r.problems.push(Problem::warning(
                "spec.authentication.mechanisms",
                "LegacyMechanism",
                "CRAM-MD5 needs the plain-text passwords in the credentials Secret; prefer SCRAM-SHA-256",
            ));
        }
    }
    let allow_ntlm_v1 = auth_spec.ntlm.as_ref().is_some_and(|n| n.allow_ntlm_v1);
    if allow_ntlm_v1 && mechanisms.contains(&Mechanism::Ntlm) && mode != AuthMode::Disabled {
        r.problems.push(Problem::warning(
            "spec.authentication.ntlm.allowNtlmV1",
            "NtlmV1Allowed",
            "NTLMv1 responses are accepted: a captured NTLMv1 exchange can be cracked offline to the NT hash, which logs in as the account; set LmCompatibilityLevel 3 or higher on the clients and turn this off",
        ));
    }

    let mut refs: Vec<(String, &str)> = Vec::new();
    for (i, g) in s.allowed_from.iter().enumerate() {
        refs.push((format!("spec.allowedFrom[{i}]"), g));
    }
    for (i, g) in s.trusted_from.iter().enumerate() {
        refs.push((format!("spec.trustedFrom[{i}]"), g));
    }
    if let Some(g) = &s.hide_client_ip_for {
        refs.push(("spec.hideClientIpFor".into(), g));
    }
    let bf = auth_spec.brute_force_protection.clone().unwrap_or_default();
    let brute_force = if bf.enabled == Some(false) {
        BruteForce::off()
    } else {
        let d = BruteForce::default();
        if let Some(g) = &bf.exempt_ip_group {
            refs.push((
                "spec.authentication.bruteForceProtection.exemptIpGroup".into(),
                g,
            ));
        }
        BruteForce {
            max_failures_per_ip: bf.max_failures_per_ip.unwrap_or(d.max_failures_per_ip),
            max_failures_per_account: bf
                .max_failures_per_account
                .unwrap_or(d.max_failures_per_account),
            window_seconds: bf.window_seconds.unwrap_or(d.window_seconds),
            block_seconds: bf.block_seconds.unwrap_or(d.block_seconds),
            account_delay_seconds: bf.account_delay_seconds.unwrap_or(d.account_delay_seconds),
            failure_delay_millis: bf.failure_delay_millis.unwrap_or(d.failure_delay_millis),
            exempt_ip_group: bf.exempt_ip_group.clone(),
        }
    };
    let limits_spec = s.limits.clone().unwrap_or_default();
    if let Some(g) = &limits_spec.exempt_ip_group {
        refs.push(("spec.limits.exemptIpGroup".into(), g));
    }
    if let Some(p) = &s.proxy_protocol {
        if p.trusted_proxies.is_empty() {
            r.problems.push(Problem::invalid(
                "spec.proxyProtocol.trustedProxies",
                "NoTrustedProxies",
                "proxyProtocol needs at least one IpAddressGroup of trusted load balancers",
            ));
        }
        for (i, g) in p.trusted_proxies.iter().enumerate() {
            refs.push((format!("spec.proxyProtocol.trustedProxies[{i}]"), g));
        }
    }

    let rc = s
        .relay_control
        .clone()
        .unwrap_or(crate::api::RelayControlSpec {
            open: false,
            allow_ip_group: None,
            allow_authenticated: true,
        });
    let relay_control = if rc.open {
        if rc.allow_ip_group.is_some() || rc.allow_authenticated {
            r.problems.push(Problem::invalid(
                "spec.relayControl.open",
                "ConflictingRelayControl",
                "relayControl.open excludes allowIpGroup and allowAuthenticated",
            ));
        }
        r.problems.push(Problem::warning(
            "spec.relayControl.open",
            "OpenRelay",
            "open relay: anyone who can connect may send mail anywhere; never expose this to the Internet",
        ));
        RelayControl::Open
    } else {
        if let Some(g) = &rc.allow_ip_group {
            refs.push(("spec.relayControl.allowIpGroup".into(), g));
            relay_groups.push(g.clone());
            if !rc.allow_authenticated && ctx.groups.get(g).is_some_and(|s| s.is_everything()) {
                r.problems.push(Problem::warning(
                    "spec.relayControl.allowIpGroup",
                    "OpenRelay",
                    format!("IpAddressGroup {g:?} contains every address, so this service is an open relay"),
                ));
            }
        }
        if rc.allow_authenticated && mode == AuthMode::Disabled {
            r.problems.push(Problem::warning(
                "spec.relayControl.allowAuthenticated",
                "NobodyCanRelay",
                "relay requires authentication but authentication is Disabled on this service",
            ));
        }
        RelayControl::Restricted {
            ip_group: rc.allow_ip_group.clone(),
            authenticated: rc.allow_authenticated,
        }
    };
    let dnsbl = s
        .dnsbl
        .as_ref()
        .map(|d| super::dnsbl::compile(d, &mut r.problems, &mut refs));
    for (field, g) in refs {
        if let Err(p) = ctx.group_ref(field, g) {
            r.problems.push(p);
        }
    }
    if let Some(h) = &s.hostname {
        if let Err(m) = crate::validate::host_name(h) {
            r.problems
                .push(Problem::invalid("spec.hostname", "InvalidName", m));
        }
    }

    if r.is_invalid() {
        return None;
    }
    Some(ServicePolicy {
        name: name.to_string(),
        port,
        protocol,
        hostname: s.hostname.clone(),
        tls,
        auth: AuthPolicy {
            mode,
            mechanisms: if mode == AuthMode::Disabled {
                Vec::new()
            } else {
                mechanisms
            },
            allow_plaintext_without_tls: auth_spec.allow_plaintext_without_tls,
            brute_force,
            allow_ntlm_v1,
            // Set with the keytab, which lives in the credentials (`keytabs`).
            gssapi_principal: None,
        },
        allowed_from: s.allowed_from.clone(),
        relay_control,
        limits: Limits {
            max_messages_per_hour_per_ip: limits_spec.max_messages_per_hour_per_ip,
            max_connections_per_ip: limits_spec.max_connections_per_ip,
            max_unknown_recipients_per_ip: limits_spec.max_unknown_recipients_per_ip,
            exempt_ip_group: limits_spec.exempt_ip_group.clone(),
            reject_sender_domain_without_dns: limits_spec.reject_sender_domain_without_dns,
            reject_client_without_ptr: limits_spec.reject_client_without_ptr,
            max_recipients_per_message: limits_spec.max_recipients_per_message,
            max_failed_commands: limits_spec.max_failed_commands,
            max_message_size_bytes: limits_spec.max_message_size_bytes.filter(|&b| b > 0),
            max_received_headers: limits_spec.max_received_headers,
        },
        hide_client_ip_for: s.hide_client_ip_for.clone(),
        trusted_from: s.trusted_from.clone(),
        proxy_protocol: s.proxy_protocol.as_ref().map(|p| ProxyProtocol {
            trusted_from: p.trusted_proxies.clone(),
        }),
        dnsbl,
    })
}
