//! `relay diagnose`: answers "why is mail to X not leaving?" from where the relay runs, with the
//! relay's own resolver (`delivery.dns`), outbound TLS trust (`delivery.tls`) and compiled
//! policy (`relay.yaml` + `credentials.yaml`). It follows the outbound troubleshooting workflow
//! an administrator would walk by hand (relay settings, MX, connectivity, telnet-style SMTP
//! test, TLS, authentication, blocklists, the replies seen so far) and never sends a message.
//!
//! This module owns the report (steps of checks, each `ok`/`warn`/`fail`/`skip` with advice),
//! its text and JSON rendering, the exit code and the order of the steps. Each step group lives
//! in its own file: [`route`] (which rule, hosts, TLS policy, authentication), [`resolve`]
//! (MX and addresses), [`connect`] (TCP, banner, EHLO, STARTTLS, certificate, AUTH),
//! [`reputation`] (egress IP, forward-confirmed reverse DNS, [`spf`], DNS blocklists), [`dkim`]
//! (the sender domain's DKIM keys in DNS) and [`history`] (recent delivery outcomes from the running relay's queue).
//!
//! Exit codes: 0 when every check is `ok`, `warn` or `skip`; 1 when a check is `fail` (delivery
//! cannot work as things are); 2 for a usage or configuration error.

pub mod connect;
pub mod dkim;
pub mod history;
pub mod reputation;
pub mod resolve;
pub mod route;
pub mod spf;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::TokioResolver;
use mailrelay_crds::config::{check_pair, Credentials, RelayConfig, CONFIG_FILE, CREDENTIALS_FILE};
use serde::Serialize;

use crate::delivery::tls::ClientTls;
use crate::settings::RuntimeSettings;

/// Exit code: every check passed or only warned.
pub const EXIT_OK: u8 = 0;
/// Exit code: at least one check failed; delivery cannot work as things are.
pub const EXIT_FAIL: u8 = 1;
/// Exit code: bad arguments or an unreadable configuration.
pub const EXIT_USAGE: u8 = 2;

/// `relay diagnose` arguments (the config directory is the relay's global `--config`).
#[derive(clap::Args, Debug, Clone)]
pub struct DiagnoseArgs {
    /// A recipient address (`bob@example.com`), a domain (`example.com`: routed as
    /// `postmaster@example.com`), or `host:port` / an IP address to probe that host directly.
    pub target: String,
    /// Envelope sender: picks sender-specific delivery rules and is the domain whose SPF is
    /// checked. Default: the null sender (`<>`), and no SPF check.
    #[arg(long)]
    pub from: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// A DNS blocklist zone to check the egress address against (repeatable). Default: a list
    /// of well-known public zones.
    #[arg(long = "dnsbl-zone")]
    pub dnsbl_zones: Vec<String>,
    /// The public address this relay's mail leaves from, when it is behind NAT (the address seen
    /// locally is private).
    #[arg(long)]
    pub egress_ip: Option<IpAddr>,
    /// Base URL of the administration listener (recent delivery results); default: the
    /// `adminAddress` of runtime.yaml.
    #[arg(long, env = "MAILRELAY_ADMIN_URL")]
    pub admin: Option<String>,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Not checked (not applicable, not implemented, or needs an argument); says why.
    Skip,
    Ok,
    /// Delivery can work, but something is wrong or risky.
    Warn,
    /// Delivery cannot work as things are.
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Skip => "skip",
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub verdict: Verdict,
    pub summary: String,
    /// Facts behind the verdict (records, replies, certificate fields).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// What to do, for `warn` and `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

impl Check {
    pub fn new(verdict: Verdict, summary: impl Into<String>) -> Check {
        Check {
            verdict,
            summary: summary.into(),
            details: Vec::new(),
            advice: None,
        }
    }

    pub fn ok(summary: impl Into<String>) -> Check {
        Check::new(Verdict::Ok, summary)
    }

    pub fn skip(summary: impl Into<String>) -> Check {
        Check::new(Verdict::Skip, summary)
    }

    pub fn warn(summary: impl Into<String>, advice: impl Into<String>) -> Check {
        Check::new(Verdict::Warn, summary).advice(advice)
    }

    pub fn fail(summary: impl Into<String>, advice: impl Into<String>) -> Check {
        Check::new(Verdict::Fail, summary).advice(advice)
    }

    pub fn detail(mut self, d: impl Into<String>) -> Check {
        self.details.push(d.into());
        self
    }

    pub fn advice(mut self, a: impl Into<String>) -> Check {
        self.advice = Some(a.into());
        self
    }
}

/// A group of checks, in the order of the troubleshooting workflow.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Stable identifier for machines: `route`, `dns`, `connect`, `auth`, `reputation`,
    /// `history`.
    pub id: &'static str,
    pub title: &'static str,
    pub checks: Vec<Check>,
}

impl Step {
    pub fn new(id: &'static str, title: &'static str) -> Step {
        Step {
            id,
            title,
            checks: Vec::new(),
        }
    }

    pub fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    pub fn verdict(&self) -> Verdict {
        self.checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Skip)
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub target: String,
    pub sender: String,
    /// The worst verdict of any check.
    pub verdict: Verdict,
    pub exit_code: u8,
    pub steps: Vec<Step>,
}

impl Report {
    fn new(target: &str, sender: &str, steps: Vec<Step>) -> Report {
        let verdict = steps
            .iter()
            .map(Step::verdict)
            .max()
            .unwrap_or(Verdict::Skip);
        Report {
            target: target.to_string(),
            sender: sender.to_string(),
            verdict,
            exit_code: if verdict == Verdict::Fail {
                EXIT_FAIL
            } else {
                EXIT_OK
            },
            steps,
        }
    }

    /// The text form: one line per check, details and advice indented below it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "relay diagnose {} (sender <{}>)\n",
            self.target, self.sender
        );
        for (n, step) in self.steps.iter().enumerate() {
            out.push_str(&format!("\n{}. {}\n", n + 1, step.title));
            for c in &step.checks {
                out.push_str(&format!("  [{:<4}] {}\n", c.verdict.label(), c.summary));
                for d in &c.details {
                    out.push_str(&format!("         {d}\n"));
                }
                if let Some(a) = &c.advice {
                    out.push_str(&format!("         -> {a}\n"));
                }
            }
        }
        let word = match self.verdict {
            Verdict::Fail => "delivery cannot work as things are (exit 1)",
            Verdict::Warn => "delivery can work, with warnings (exit 0)",
            _ => "no problem found (exit 0)",
        };
        out.push_str(&format!("\nresult: {word}\n"));
        out
    }
}

/// What the command was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A recipient address (a bare domain becomes `postmaster@domain`).
    Recipient { address: String, domain: String },
    /// One host to probe, without routing.
    Host { host: String, port: Option<u16> },
}

impl Target {
    /// `bob@example.com`, `example.com`, `mx.example.com:25`, `192.0.2.1`, `[2001:db8::1]:25`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the target is empty".into());
        }
        if let Some((local, domain)) = s.rsplit_once('@') {
            if local.is_empty() || domain.is_empty() || domain.contains(':') {
                return Err(format!("{s:?} is not a recipient address"));
            }
            return Ok(Target::Recipient {
                address: s.to_string(),
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Host {
                host: ip.to_string(),
                port: None,
            });
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ]"))?;
            let port = match port.strip_prefix(':') {
                Some(p) => Some(parse_port(p)?),
                None if port.is_empty() => None,
                None => return Err(format!("{s:?}: expected :port after ]")),
            };
            return Ok(Target::Host {
                host: host.to_string(),
                port,
            });
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            return Ok(Target::Host {
                host: host.trim_end_matches('.').to_ascii_lowercase(),
                port: Some(parse_port(port)?),
            });
        }
        let domain = s.trim_end_matches('.').to_ascii_lowercase();
        Ok(Target::Recipient {
            address: format!("postmaster@{domain}"),
            domain,
        })
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{p:?} is not a port"))
}

/// Everything the steps share: the relay's settings, policy, resolver and TLS trust.
pub struct Context {
    pub dir: PathBuf,
    pub settings: RuntimeSettings,
    pub config: RelayConfig,
    pub credentials: Credentials,
    pub resolver: TokioResolver,
    pub tls: ClientTls,
    /// The verifier inside `tls.verified`, to judge certificates received unverified.
    pub verifier: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
    /// The EHLO name delivery uses.
    pub helo: String,
}

impl Context {
    /// Reads the config directory the way the relay does, without its side effects (no
    /// certificates are generated, no spool is opened).
    pub fn load(dir: &Path) -> anyhow::Result<Context> {
        let settings = RuntimeSettings::load(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            anyhow::bail!(
                "{} does not exist: this is not a relay config directory (or the operator has not written the policy yet)",
                config_path.display()
            );
        }
        let config: RelayConfig = read_yaml(&config_path)?;
        let credentials_path = dir.join(CREDENTIALS_FILE);
        let credentials: Credentials = if credentials_path.exists() {
            read_yaml(&credentials_path)?
        } else {
            Credentials::default()
        };
        check_pair(&config, &credentials)?;
        crate::snapshot::validate(&config, &credentials)?;
        let extra_ca = settings.delivery.tls.extra_ca_file.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                dir.join(p)
            }
        });
        let tls = ClientTls::new(extra_ca.as_deref())?;
        let verifier = crate::delivery::tls::server_verifier(extra_ca.as_deref())?;
        let resolver = crate::dns::resolver(&settings.delivery.dns, ResolveHosts::Auto)?;
        let helo = settings
            .delivery
            .helo_name
            .clone()
            .unwrap_or_else(|| settings.effective_hostname());
        Ok(Context {
            dir: dir.to_path_buf(),
            settings,
            config,
            credentials,
            resolver,
            tls,
            verifier,
            helo,
        })
    }

    /// The resolver in words: configured name servers or the system's.
    pub fn resolver_description(&self) -> String {
        let dns = &self.settings.delivery.dns;
        if dns.nameservers.is_empty() {
            "the system resolver (/etc/resolv.conf; delivery.dns.nameservers is empty)".into()
        } else {
            let list: Vec<String> = dns
                .nameservers
                .iter()
                .map(|ip| std::net::SocketAddr::new(*ip, dns.port).to_string())
                .collect();
            format!(
                "delivery.dns.nameservers {} (timeout {} s, {} attempt(s))",
                list.join(", "),
                dns.timeout_seconds.max(1),
                dns.attempts.max(1)
            )
        }
    }
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = crate::snapshot::read_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Runs every step and prints the report; returns the exit code.
pub async fn run(config_dir: Option<&Path>, args: &DiagnoseArgs) -> u8 {
    let target = match Target::parse(&args.target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("relay diagnose: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(dir) = config_dir else {
        eprintln!("relay diagnose: --config <dir> (or MAILRELAY_CONFIG_DIR) is required: the relay's config directory, e.g. /etc/mailrelay");
        return EXIT_USAGE;
    };
    let ctx = match Context::load(dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay diagnose: {e:#}");
            return EXIT_USAGE;
        }
    };
    let report = diagnose(&ctx, &target, args).await;
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("relay diagnose: {e}");
                return EXIT_USAGE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    report.exit_code
}

/// The report for one target.
pub async fn diagnose(ctx: &Context, target: &Target, args: &DiagnoseArgs) -> Report {
    let sender = args.from.clone().unwrap_or_default();
    let (mut route_step, plan) = route::step(ctx, target, &sender);
    let (dns_step, hosts) = resolve::step(ctx, &plan).await;
    route::hosts_in_order(&mut route_step, &plan, &hosts);
    let probed = connect::step(ctx, &plan, &hosts).await;
    let reputation_step = reputation::step(
        ctx,
        &sender,
        args.egress_ip,
        probed.egress,
        &hosts,
        &args.dnsbl_zones,
    )
    .await;
    let dkim_step = dkim::step(ctx, &sender).await;
    let history_step = history::step(ctx, target, &plan, args.admin.as_deref()).await;
    let steps = vec![
        route_step,
        dns_step,
        probed.connect,
        probed.auth,
        reputation_step,
        dkim_step,
        history_step,
    ];
    Report::new(&args.target, &sender, steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("Bob@Example.TEST").unwrap(),
            Target::Recipient {
                address: "Bob@Example.TEST".into(),
                domain: "example.test".into()
            }
        );
        assert_eq!(
            Target::parse("example.test.").unwrap(),
            Target::Recipient {
                address: "postmaster@example.test".into(),
                domain: "example.test".into()
            }
        );
        assert_eq!(
            Target::parse("mx.example.test:2525").unwrap(),
            Target::Host {
                host: "mx.example.test".into(),
                port: Some(2525)
            }
        );
        assert_eq!(
            Target::parse("192.0.2.1").unwrap(),
            Target::Host {
                host: "192.0.2.1".into(),
                port: None
            }
        );
        assert_eq!(
            Target::parse("[2001:db8::1]:25").unwrap(),
            Target::Host {
                host: "2001:db8::1".into(),
                port: Some(25)
            }
        );
        assert!(Target::parse("mx:0").is_err());
        assert!(Target::parse("@x").is_err());
        assert!(Target::parse("").is_err());
    }

    #[test]
    fn the_worst_verdict_decides_the_exit_code() {
        let mut s = Step::new("route", "Route");
        s.push(Check::ok("a"));
        s.push(Check::warn("b", "do b"));
        let r = Report::new("x", "", vec![s.clone()]);
        assert_eq!((r.verdict, r.exit_code), (Verdict::Warn, EXIT_OK));
        s.push(Check::fail("c", "do c"));
        let r = Report::new("x", "", vec![s]);
        assert_eq!((r.verdict, r.exit_code), (Verdict::Fail, EXIT_FAIL));
        assert!(r.render().contains("[FAIL] c\n         -> do c\n"));
    }
}
