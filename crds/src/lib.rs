//! mailrelay's API: the five `mailrelay.dev/v1alpha1` custom resources ([`api`]), the compiled
//! relay policy that the relay reads ([`config`]), and the pure compiler from one to the other
//! ([`compile`]).

#![deny(missing_docs)]
// kube's `printcolumn(...)` attributes repeat `type_ = "string"`, which this lint misreads as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod address;
pub mod api;
pub mod compile;
pub mod config;
pub mod dnsbl;
pub mod validate;
pub mod verifier;
