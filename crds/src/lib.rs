//! mailrelay's API: the five `mailrelay.dev/v1alpha1` custom resources ([`api`]), the compiled
//! relay policy that the relay reads ([`config`]), and the pure compiler from one to the other
//! ([`compile`]).

pub mod address;
pub mod config;
pub mod validate;
pub mod verifier;
