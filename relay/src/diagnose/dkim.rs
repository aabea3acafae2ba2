//! The `dkim` step: does DNS publish the DKIM keys this relay signs the sender's mail with?
//! For the signing MailDomain of `--from` (the domain itself or its nearest signing parent, as
//! signing picks it), each selector's `<selector>._domainkey.<domain>` TXT record is looked up
//! with the relay's resolver and its `p=` compared with the public half of the selector's key
//! from `credentials.yaml`. A receiver checks a signature against exactly that record, so a
//! missing, different or revoked key means the signature fails (and with it DMARC alignment by
//! DKIM). While one selector verifies (a key rotation in progress), the others only warn.

use mailrelay_crds::compile::dkim_record;

use super::{Check, Context, Step, Verdict};
use crate::dns::{classify, txt_texts, DnsError};

/// The tags of a DKIM key record (RFC 6376 §3.6.1); values with folding whitespace removed.
fn tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.chars().filter(|c| !c.is_whitespace()).collect(),
            )
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    tags.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The signing domain of mail from `sender_domain`: itself or its nearest parent with a DKIM
/// policy.
fn signing_domain<'a>(ctx: &'a Context, sender_domain: &str) -> Option<&'a str> {
    let mut d = sender_domain;
    loop {
        if let Some(found) = ctx
            .config
            .domains
            .iter()
            .find(|m| m.dkim.is_some() && m.domain.eq_ignore_ascii_case(d))
        {
            return Some(found.domain.as_str());
        }
        d = d.split_once('.')?.1;
        if !d.contains('.') {
            return None;
        }
    }
}

pub async fn step(ctx: &Context, sender: &str) -> Step {
    let mut step = Step::new("dkim", "DKIM records in DNS");
    let Some((_, sender_domain)) = sender.rsplit_once('@') else {
        step.push(Check::skip(
            "no --from: give the sender address to check the DKIM records of its domain",
        ));
        return step;
    };
    let sender_domain = sender_domain.to_ascii_lowercase();
    let Some(domain) = signing_domain(ctx, &sender_domain) else {
        step.push(Check::skip(format!(
            "{sender_domain} is not signed: no MailDomain with spec.dkim covers it"
        )));
        return step;
    };
    let Some(policy) = ctx
        .config
        .domains
        .iter()
        .find(|m| m.domain == domain)
        .and_then(|m| m.dkim.as_ref())
    else {
        return step;
    };
    let mut checks = Vec::new();
    for selector in &policy.selectors {
        checks.push(selector_check(ctx, &selector.key_name(domain), &selector.name).await);
    }
    if policy.selectors.is_empty() {
        checks.push(Check::warn(
            format!("{domain} has a DKIM policy without selectors: nothing is signed"),
            "add a selector to the MailDomain's spec.dkim.selectors",
        ));
    }
    // A rotation publishes the new key before it signs: one good signature is enough for
    // receivers, so the other selectors' problems are warnings then.
    if checks.iter().any(|c| c.verdict == Verdict::Ok) {
        for c in &mut checks {
            if c.verdict == Verdict::Fail {
                c.verdict = Verdict::Warn;
                c.summary
                    .push_str(" (another selector's signature verifies meanwhile)");
            }
        }
    }
    for c in checks {
        step.push(c);
    }
    step
}

async fn selector_check(ctx: &Context, name: &str, selector: &str) -> Check {
    let Some(pem) = ctx.credentials.dkim_keys.get(name) else {
        return Check::fail(
            format!("selector {selector}: its key is not in credentials.yaml"),
            "the relay defers this domain's mail (4.7.0) rather than send it unsigned: check the selector's keySecretRef (the MailDomain's status says what is wrong)",
        );
    };
    let expected = match dkim_record(pem.expose()) {
        Ok(r) => r,
        Err(e) => {
            return Check::fail(
                format!("selector {selector}: its key cannot sign: {e}"),
                "replace the key in the selector's Secret",
            )
        }
    };
    let publish = format!("publish TXT {name} \"{expected}\" (the MailDomain's status.dnsRecords lists it; with spec.dns.publish: ExternalDns the operator does)");
    let fqdn = format!("{name}.");
    let texts = match ctx.resolver.txt_lookup(fqdn.as_str()).await {
        Ok(l) => txt_texts(&l),
        Err(e) => {
            return match classify(&e) {
                DnsError::NoDomain | DnsError::NoRecords => Check::fail(
                    format!("selector {selector}: {name} has no TXT record: receivers cannot verify its signatures"),
                    publish,
                ),
                DnsError::Temporary(why) => Check::warn(
                    format!("selector {selector}: looking up {name} failed: {why}"),
                    "check delivery.dns.nameservers; receivers that cannot look it up treat the signature as a temporary error",
                ),
            }
        }
    };
    let keys: Vec<Vec<(String, String)>> = texts
        .iter()
        .map(|t| tags(t))
        .filter(|t| tag(t, "p").is_some())
        .collect();
    let want = tags(&expected);
    let (want_p, want_k) = (tag(&want, "p"), tag(&want, "k"));
    match keys.as_slice() {
        [] => Check::fail(
            format!("selector {selector}: {name} has TXT records but none is a DKIM key (no p=)"),
            publish,
        ),
        [one] => {
            let p = tag(one, "p");
            let k = tag(one, "k").unwrap_or("rsa");
            if p == Some("") {
                Check::fail(
                    format!("selector {selector}: DNS revokes the key (empty p=) but the relay still signs with it"),
                    format!("remove the selector from spec.dkim.selectors, or {publish}"),
                )
            } else if p == want_p && Some(k) == want_k {
                Check::ok(format!(
                    "selector {selector}: {name} publishes the key this relay signs with (k={k})"
                ))
            } else {
                Check::fail(
                    format!("selector {selector}: {name} publishes a different key than the one the relay signs with: signatures fail"),
                    publish,
                )
            }
        }
        _ => Check::fail(
            format!(
                "selector {selector}: {name} has {} DKIM key records; verifiers need exactly one",
                keys.len()
            ),
            publish,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_ignore_folding_whitespace() {
        let t = tags("v=DKIM1; k=rsa;\r\n p=MIIB IjAN\tBg ; t=y");
        assert_eq!(tag(&t, "p"), Some("MIIBIjANBg"));
        assert_eq!(tag(&t, "k"), Some("rsa"));
        assert_eq!(tag(&t, "t"), Some("y"));
        assert_eq!(tag(&t, "h"), None);
    }
}
