//! mailrelay's relay: the inbound SMTP service and the outbound delivery queue.
//!
//! - [`smtp`]: the sans-IO protocol core (commands, replies, DATA/BDAT decoding);
//! - [`server`]: listeners and the session driver over TCP and TLS ([`net`] is the stream,
//!   [`tls`] the certificates, [`proxy`] PROXY-protocol headers); [`limits`] admits connections and enforces per-IP limits;
//! - [`auth`]: SASL against the compiled verifiers; [`policy`]: relay and sender decisions;
//! - [`snapshot`] builds the compiled policy from the config directory and [`reload`] swaps it
//!   in when the files change; [`settings`] is `runtime.yaml`;
//! - [`delivery`]: the queue, MX resolution ([`dns`]), the SMTP client, DSNs; the durable spool
//!   is the `mailrelay-spool` crate;
//! - [`policy_host`]: the HTTPS listener serving the local domains' MTA-STS policies;
//! - [`metrics`], [`telemetry`] (traces), [`http`] (metrics and admin listeners), [`memory`]
//!   (allocator tuning), [`dnscheck`] (sender-domain and PTR checks), [`dnsbl`] (blocklists);
//! - [`diagnose`]: `relay diagnose`, the outbound troubleshooting report for one destination.

pub mod auth;
pub mod delivery;
pub mod diagnose;
pub mod dkim;
pub mod dns;
pub mod dnsbl;
pub mod dnscheck;
pub mod handoff;
pub mod http;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod policy_host;
pub mod proxy;
pub mod reload;
pub mod security;
pub mod server;
pub mod settings;
pub mod smtp;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
