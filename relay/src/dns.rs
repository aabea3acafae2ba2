//! The relay's DNS plumbing shared by delivery (MX lookups) and the inbound checks (PTR, sender
//! domain): building a hickory resolver from the `delivery.dns` runtime setting, so that tests
//! point every lookup at a local server, and classifying resolver errors into what a mail server
//! must distinguish — the name does not exist, it has no such records, or the answer is unknown.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::TxtLookup;
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};

use crate::settings::DeliveryDnsSettings;

/// Why a lookup produced no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN): permanent.
    NoDomain,
    /// The name exists but has none of the records asked for.
    NoRecords,
    /// SERVFAIL, timeout, network error: the answer is unknown, try again later.
    Temporary(String),
}

pub fn classify(e: &ResolveError) -> DnsError {
    if let Some(p) = e.proto() {
        if let ProtoErrorKind::NoRecordsFound { response_code, .. } = p.kind() {
            return match *response_code {
                ResponseCode::NXDomain => DnsError::NoDomain,
                ResponseCode::NoError => DnsError::NoRecords,
                other => DnsError::Temporary(format!("{other}")),
            };
        }
    }
    DnsError::Temporary(e.to_string())
}

/// A resolver for the configured name servers (the system's when none are configured).
pub fn resolver(
    settings: &DeliveryDnsSettings,
    hosts: ResolveHosts,
) -> anyhow::Result<TokioResolver> {
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| anyhow::anyhow!("reading the system resolver configuration: {e}"))?
    } else {
        let mut config = ResolverConfig::new();
        for ip in &settings.nameservers {
            let addr = SocketAddr::new(*ip, settings.port);
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = Duration::from_secs(settings.timeout_seconds.max(1));
    opts.attempts = settings.attempts.max(1) as usize;
    // Mail domains are always fully qualified; search lists would only invent names.
    opts.ndots = 0;
    opts.use_hosts_file = hosts;
    Ok(builder.build())
}

/// The one TXT record at `name` whose text starts with `version` (e.g. `v=STSv1`), its
/// character-strings concatenated: `Ok(None)` when there is none or more than one (MTA-STS and
/// TLS-RPT both treat several as none, RFC 8461 §3.1 and RFC 8460 §3) and for records that are
/// not UTF-8; `Err` for a temporary failure.
pub async fn versioned_txt(
    resolver: &TokioResolver,
    name: &str,
    version: &str,
) -> Result<Option<String>, String> {
    match resolver.lookup(name, RecordType::TXT).await {
        Ok(l) => {
            let mut found: Vec<String> = l
                .iter()
                .filter_map(|r| r.as_txt())
                .filter_map(|t| {
                    let joined: Vec<u8> = t.txt_data().iter().flatten().copied().collect();
                    String::from_utf8(joined).ok()
                })
                .filter(|s| s.trim_start().starts_with(version))
                .collect();
            Ok(if found.len() == 1 { found.pop() } else { None })
        }
        Err(e) => match classify(&e) {
            DnsError::NoDomain | DnsError::NoRecords => Ok(None),
            DnsError::Temporary(why) => Err(why),
        },
    }
}

/// The text of each TXT record of `lookup`, its character-strings concatenated (RFC 7208 §3.3);
/// bytes that are not UTF-8 are replaced rather than dropping the record.
pub fn txt_texts(lookup: &TxtLookup) -> Vec<String> {
    lookup
        .iter()
        .map(|t| {
            t.txt_data()
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect()
        })
        .collect()
}
