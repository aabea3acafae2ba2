//! Step 6, recent history: the last delivery outcomes for the destination, read from the running
//! relay's queue over its administration listener (`GET /queue/recent`, as `relay queue` reads
//! the queue), and what their pattern means in the troubleshooting document's terms:
//! greylisting or throttling, relaying denied, cannot connect, TLS, DNS, authentication.

use serde::Deserialize;

use super::route::{Dest, Plan};
use super::{Check, Context, Step, Target};

/// Outcomes shown at most.
const SHOWN: usize = 10;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Attempt {
    at: u64,
    domain: String,
    code: u16,
    enhanced: String,
    text: String,
    remote: Option<String>,
    remote_reply: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Recent {
    attempts: Vec<Attempt>,
}

/// Where the administration listener is: `--admin`, else runtime.yaml's `adminAddress`
/// (an unspecified address is reached on loopback from inside the pod).
fn admin_base(ctx: &Context, admin: Option<&str>) -> String {
    if let Some(a) = admin {
        return a.trim_end_matches('/').to_string();
    }
    let a = ctx.settings.admin_address;
    let host = if a.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        a.ip().to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    format!("http://{host}:{}", a.port())
}

/// What a pattern of replies means and what to do.
fn interpret(a: &Attempt) -> Option<(&'static str, &'static str)> {
    let reply = a
        .remote_reply
        .clone()
        .unwrap_or_else(|| format!("{} {} {}", a.code, a.enhanced, a.text));
    let lower = reply.to_ascii_lowercase();
    let enhanced = a.enhanced.as_str();
    if a.code / 100 == 2 {
        return None;
    }
    if enhanced == "5.7.1" && (lower.contains("relay") || lower.contains("denied")) {
        return Some(("relaying denied (5.7.1)", "the next hop does not accept mail from this relay for this recipient: if it is a smarthost, authenticate (the DeliveryRule's auth) or have its administrator allow this relay's egress address; if it is the recipient's MX, the recipient address or domain is not theirs"));
    }
    if lower.contains("greylist")
        || lower.contains("graylist")
        || reply.starts_with("421")
        || enhanced == "4.4.4"
        || lower.contains(" 4.4.4")
        || (a.code / 100 == 4 && enhanced.starts_with("4.7."))
            && !lower.contains("tls")
            && !lower.contains("auth")
    {
        return Some(("greylisted or throttled", "the receiver defers mail from this relay: wait, the queue retries on its schedule; if it persists, check the blocklists (reputation step) and ask the recipient's administrator to allow this relay's egress address"));
    }
    if enhanced == "4.4.1" || lower.contains("cannot connect") {
        return Some(("cannot connect (4.4.1)", "see the connect step: check the firewall for outbound port 25, and whether the host is up"));
    }
    if lower.contains("tls") || enhanced == "4.7.5" || enhanced == "4.7.4" {
        return Some((
            "TLS failures",
            "see the certificate and STARTTLS checks of the connect step",
        ));
    }
    if enhanced == "4.4.3" || enhanced == "5.1.2" || lower.contains("dns") {
        return Some(("DNS failures", "see the DNS step"));
    }
    if lower.contains("authentication") || enhanced == "4.7.8" || enhanced == "5.7.8" {
        return Some(("authentication failures", "see the authentication step"));
    }
    None
}

pub async fn step(ctx: &Context, target: &Target, plan: &Plan, admin: Option<&str>) -> Step {
    let mut step = Step::new(
        "history",
        "Recent delivery results (the running relay's queue)",
    );
    if admin.is_none() && !ctx.settings.delivery.admin_endpoint {
        step.push(Check::warn(
            "recent delivery results not available: the queue's administration endpoint is off",
            "set delivery.adminEndpoint: true in runtime.yaml (the administration listener stays on loopback unless adminAddress says otherwise) and restart the relay; until then look at the relay's log for the destination",
        ));
        return step;
    }
    let base = admin_base(ctx, admin);
    let token = match ctx.settings.admin_token() {
        Ok(t) => t,
        Err(e) => {
            step.push(Check::warn(
                format!("recent delivery results not available: {e}"),
                "fix adminTokenFile in runtime.yaml",
            ));
            return step;
        }
    };
    let answer =
        crate::http::admin_call(&base, http::Method::GET, "/queue/recent", token.as_deref()).await;
    let body = match answer {
        Ok((200, body)) => body,
        Ok((401, _)) => {
            step.push(Check::warn(
                format!("the administration listener at {base} wants a token"),
                "run diagnose with the relay's --config, whose runtime.yaml names adminTokenFile",
            ));
            return step;
        }
        Ok((code, body)) => {
            step.push(Check::warn(
                format!("the administration listener at {base} answered HTTP {code}: {}", body.trim()),
                "a relay older than this diagnose has no /queue/recent; otherwise check delivery.adminEndpoint",
            ));
            return step;
        }
        Err(e) => {
            step.push(Check::warn(
                format!("recent delivery results not available: the administration listener is unreachable ({e})"),
                "run diagnose where the relay runs (kubectl exec into the relay pod) with delivery.adminEndpoint: true in its runtime.yaml",
            ));
            return step;
        }
    };
    let recent: Recent = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            step.push(Check::warn(
                format!("the administration listener sent an unreadable answer: {e}"),
                "check that adminAddress is this relay's administration listener",
            ));
            return step;
        }
    };
    let host = match &plan.dest {
        Dest::Hosts(h) if matches!(target, Target::Host { .. }) => {
            h.first().map(|(n, p)| (n.to_ascii_lowercase(), *p))
        }
        _ => None,
    };
    let mine: Vec<&Attempt> = recent
        .attempts
        .iter()
        .filter(|a| match (&plan.domain, &host) {
            (Some(d), _) => &a.domain == d,
            (None, Some((h, p))) => a
                .remote
                .as_deref()
                .is_some_and(|r| r.starts_with(&format!("{h}[")) && r.ends_with(&format!(":{p}"))),
            _ => false,
        })
        .collect();
    let what = match (&plan.domain, &host) {
        (Some(d), _) => d.clone(),
        (None, Some((h, p))) => format!("{h}:{p}"),
        _ => "this destination".into(),
    };
    let Some(last) = mine.last() else {
        step.push(Check::ok(format!(
            "no delivery attempts to {what} since the relay started (it keeps the last 256 outcomes)"
        )));
        return step;
    };
    let lines: Vec<String> = mine
        .iter()
        .rev()
        .take(SHOWN)
        .map(|a| {
            let mut l = format!("{} {} {} {}", a.at, a.code, a.enhanced, a.text);
            if let Some(r) = &a.remote_reply {
                l.push_str(&format!(
                    " [{} said: {r}]",
                    a.remote.as_deref().unwrap_or("remote")
                ));
            }
            l
        })
        .collect();
    let mut check = if last.code / 100 == 2 {
        Check::ok(format!(
            "the last delivery to {what} succeeded ({} of the last {} attempts failed)",
            mine.iter().filter(|a| a.code / 100 != 2).count(),
            mine.len()
        ))
    } else {
        let failures: Vec<&Attempt> = mine
            .iter()
            .rev()
            .take_while(|a| a.code / 100 != 2)
            .copied()
            .collect();
        let pattern = failures.iter().find_map(|a| interpret(a));
        let summary = match pattern {
            Some((name, _)) => format!(
                "the last {} attempt(s) to {what} failed: {name}",
                failures.len()
            ),
            None => format!("the last {} attempt(s) to {what} failed", failures.len()),
        };
        let advice = pattern
            .map(|(_, a)| a.to_string())
            .unwrap_or_else(|| "look up the reply codes below (RFC 3463 enhanced status codes); if unclear, contact the recipient's administrator with them".into());
        if last.code / 100 == 5 {
            Check::fail(summary, advice)
        } else {
            Check::warn(summary, advice)
        }
    };
    check.details = lines;
    step.push(check);
    step
}
