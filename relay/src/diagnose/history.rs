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

/// `2026-12-01T06:40:00Z` for seconds since the epoch (UTC, proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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
    // TLS and AUTH problems carry 4.7.x codes too; they are not the receiver's throttling.
    if lower.contains("tls") || enhanced == "4.7.5" || enhanced == "4.7.4" {
        return Some((
            "TLS failures",
            "see the certificate and STARTTLS checks of the connect step",
        ));
    }
    if lower.contains("authenticat") || enhanced == "4.7.8" || enhanced == "5.7.8" {
        return Some(("authentication failures", "see the authentication step"));
    }
    if lower.contains("greylist")
        || lower.contains("graylist")
        || reply.starts_with("421")
        || enhanced == "4.4.4"
        || lower.contains(" 4.4.4")
        || (a.code / 100 == 4 && enhanced.starts_with("4.7."))
    {
        return Some(("greylisted or throttled", "the receiver defers mail from this relay: wait, the queue retries on its schedule; if it persists, check the blocklists (reputation step) and ask the recipient's administrator to allow this relay's egress address"));
    }
    if enhanced == "4.4.1" || lower.contains("cannot connect") {
        return Some(("cannot connect (4.4.1)", "see the connect step: check the firewall for outbound port 25, and whether the host is up"));
    }
    if enhanced == "4.4.3" || enhanced == "5.1.2" || lower.contains("dns") {
        return Some(("DNS failures", "see the DNS step"));
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
        .map(|a| match (&a.remote, &a.remote_reply) {
            (Some(host), Some(reply)) => format!("{} {host} said: {reply}", utc(a.at)),
            (Some(host), None) => {
                format!("{} {host}: {} {} {}", utc(a.at), a.code, a.enhanced, a.text)
            }
            _ => format!("{} {} {} {}", utc(a.at), a.code, a.enhanced, a.text),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(code: u16, enhanced: &str, reply: Option<&str>) -> Attempt {
        Attempt {
            at: 0,
            domain: "example.test".into(),
            code,
            enhanced: enhanced.into(),
            text: String::new(),
            remote: reply.map(|_| "mx.example.test[192.0.2.1]:25".into()),
            remote_reply: reply.map(str::to_string),
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_107_304), "2026-12-01T06:41:44Z");
    }

    #[test]
    fn patterns_of_the_troubleshooting_document() {
        let name = |a: Attempt| interpret(&a).map(|(n, _)| n);
        assert_eq!(
            name(attempt(
                451,
                "4.4.4",
                Some("451 4.4.4 Temporary server error")
            )),
            Some("greylisted or throttled")
        );
        assert_eq!(
            name(attempt(
                421,
                "4.7.0",
                Some("421 4.7.0 Too many connections, slow down")
            )),
            Some("greylisted or throttled")
        );
        assert_eq!(
            name(attempt(550, "5.7.1", Some("550 5.7.1 Relaying denied"))),
            Some("relaying denied (5.7.1)")
        );
        assert_eq!(
            name(attempt(451, "4.4.1", None)),
            Some("cannot connect (4.4.1)")
        );
        assert_eq!(name(attempt(454, "4.7.5", None)), Some("TLS failures"));
        assert_eq!(name(attempt(451, "4.4.3", None)), Some("DNS failures"));
        assert_eq!(name(attempt(250, "2.0.0", Some("250 2.0.0 Ok"))), None);
    }
}
