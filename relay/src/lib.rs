//! mailrelay's inbound SMTP relay. The protocol core in [`smtp`] is sans-IO; [`server`] drives it
//! over TCP and TLS, [`auth`] runs SASL against the compiled verifiers, [`policy`] decides relay
//! and sender questions, [`config`] loads and hot-reloads the compiled policy, [`store`] hands
//! accepted messages to the durable spool.

pub mod auth;
pub mod delivery;
pub mod dns;
pub mod dnscheck;
pub mod http;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod settings;
pub mod smtp;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
