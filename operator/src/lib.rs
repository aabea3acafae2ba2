//! The mailrelay operator as a library: the binary (`main.rs`) is a thin CLI over it, and the
//! integration tests drive the same code paths.
//!
//! - [`load`], [`manifests`], [`render`]: offline compilation (`operator render`).
//! - [`controller`]: watches, the per-namespace trigger and work queue.
//! - [`reconcile`]: one namespace: compile, write the owned objects, statuses and events.
//! - [`status`]: the pure status/conditions computation.
//! - [`write`](mod@write): the only code that writes the core objects (ConfigMap, Secrets, Service).
//! - [`tls_bundle`]: the `<instance>-tls` Secret with every certificate the policy names.
//! - [`relay_service`]: the relay Service, one port per SmtpService.
//! - [`certs`]: cert-manager Certificates for SmtpServices with `tls.issuerRef`.
//! - [`dkim_keys`]: DKIM keys generated into Secrets for selectors with `generateKey`.
//! - [`dns_endpoint`]: external-dns `DNSEndpoint`s with the MailDomains' DNS records (opt-in).
//! - [`leader`]: Lease-based leader election.
//! - [`health`]: liveness and readiness (`/healthz`, `/readyz`) from the controller's state.
//! - [`metrics`]: the operator's `/metrics`, serving `/healthz` and `/readyz` too.
//! - [`spools`]: adoption of orphaned spool volumes (drain Jobs, the hand-off Secret, the
//!   cluster queue view).
//! - [`run`]: `operator run`, wiring all of the above.
//! - [`plugin`]: `kubectl mailrelay`, the kubectl plugin (binary `kubectl-mailrelay`).

pub mod certs;
pub mod controller;
pub mod dkim_keys;
pub mod dns_endpoint;
pub mod health;
pub mod leader;
pub mod load;
pub mod manifests;
pub mod metrics;
pub mod plugin;
pub mod reconcile;
pub mod relay_service;
pub mod render;
pub mod run;
pub mod spools;
pub mod status;
pub mod tls_bundle;
pub mod write;
