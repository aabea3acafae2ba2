//! Listeners and admission: one accept loop per service, the PROXY header, `allowedFrom`, the
//! per-IP gate, the DNS blocklists and the TLS handshake of SMTPS, then a [`Driver`] per
//! admitted connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mailrelay_crds::config::{canonical_ip, Protocol, ServicePolicy};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::driver::{session_config, Driver};
use super::{refusal_event, security, Relay};
use crate::dnsbl::Screen;
use crate::limits::auth::AuthProtection;
use crate::limits::gate::{admit, SessionLimits};
use crate::metrics::ServiceLabels;
use crate::net::Stream;
use crate::policy::PolicyEngine;
use crate::security::SecurityKind;
use crate::smtp::{Reply, Session, SessionFacts};

impl Relay {
    /// Stops every accept loop (graceful shutdown); open connections are not affected.
    pub fn stop_listening(&self) {
        if let Ok(mut map) = self.listeners.lock() {
            for (name, (_, handle)) in map.drain() {
                info!(service = %name, "stopping listener");
                handle.abort();
            }
        }
    }

    /// Binds listeners for services that have none yet and stops those whose service is gone or
    /// moved. Open connections are not affected.
    pub async fn sync_listeners(self: &Arc<Self>) -> anyhow::Result<()> {
        let snap = self.current.load_full();
        let wanted: HashMap<String, u16> = snap.listeners().into_iter().collect();
        let mut to_bind = Vec::new();
        {
            let mut map = self
                .listeners
                .lock()
                .map_err(|_| anyhow::anyhow!("listener map poisoned"))?;
            map.retain(|name, (port, handle)| {
                let keep = wanted.get(name) == Some(port);
                if !keep {
                    info!(service = %name, port = *port, "stopping listener");
                    handle.abort();
                }
                keep
            });
            for (name, port) in &wanted {
                if !map.contains_key(name) {
                    to_bind.push((name.clone(), *port));
                }
            }
        }
        let mut first_error = None;
        for (name, port) in to_bind {
            let addr = match self.settings.listen_addr(port) {
                Ok(a) => a,
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot bind listener");
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    info!(service = %name, %addr, "listening");
                    let relay = self.clone();
                    let svc = name.clone();
                    let handle = tokio::spawn(async move { relay.accept_loop(svc, l).await });
                    if let Ok(mut map) = self.listeners.lock() {
                        map.insert(name, (port, handle));
                    }
                }
                Err(e) => {
                    warn!(service = %name, %addr, error = %e, "cannot bind listener");
                    first_error.get_or_insert(anyhow::anyhow!("binding {addr} for {name}: {e}"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn accept_loop(self: Arc<Self>, service: String, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let relay = self.clone();
                    let svc = service.clone();
                    tokio::spawn(async move {
                        let metrics = relay.metrics.clone();
                        metrics.sessions_active.inc();
                        relay.connection(svc, stream, peer).await;
                        metrics.sessions_active.dec();
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(service = %service, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        service_name: String,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let snap = self.current.load_full();
        let Some(service) = snap.service(&service_name).cloned() else {
            return;
        };
        let mut ip = canonical_ip(peer.ip());
        let mut stream = stream;
        let mut refuse_proxy_header = false;
        if let Some(pp) = &service.proxy_protocol {
            if snap.config.in_any_group(&pp.trusted_from, ip) {
                match self.proxy_header(&mut stream, &service.name, ip).await {
                    Some(real) => ip = real,
                    None => return,
                }
            } else {
                refuse_proxy_header = true;
            }
        }
        self.metrics
            .connections
            .get_or_create(&ServiceLabels {
                service: service.name.clone(),
            })
            .inc();
        let _ = stream.set_nodelay(true);
        let conn = Stream::Plain(stream);
        let limits = SessionLimits::new(
            self.limiter.clone(),
            self.dns_checks.clone(),
            snap.clone(),
            service.clone(),
            ip,
        );
        let auth = AuthProtection::new(self.limiter.clone(), &snap, &service.auth.brute_force, ip);
        let _slot = match admit(&self.limiter, &snap, &service, limits.exempt, &auth, ip).await {
            Ok(slot) => slot,
            Err(refusal) => {
                if refusal.kind.limit().is_some() {
                    refusal_event(&self.metrics, &service.name, ip, &refusal);
                } else {
                    security(
                        &self.metrics,
                        refusal.kind,
                        &service.name,
                        ip,
                        &refusal.detail,
                    );
                }
                self.metrics
                    .refused(&service.name, refusal.kind.refused_reason());
                refuse(&self, &service, ip, conn, &refusal.reply).await;
                return;
            }
        };
        let dnsbl_headers =
            match crate::dnsbl::screen(self.dnsbl.as_deref(), &snap.config, &service, ip).await {
                Screen::Pass => String::new(),
                Screen::Tag { headers, detail } => {
                    security(
                        &self.metrics,
                        SecurityKind::DnsblListed,
                        &service.name,
                        ip,
                        &detail,
                    );
                    headers
                }
                Screen::Refuse(refusal) => {
                    security(
                        &self.metrics,
                        refusal.kind,
                        &service.name,
                        ip,
                        &refusal.detail,
                    );
                    self.metrics
                        .refused(&service.name, refusal.kind.refused_reason());
                    refuse(&self, &service, ip, conn, &refusal.reply).await;
                    return;
                }
            };
        let service_label = ServiceLabels {
            service: service.name.clone(),
        };
        self.metrics.sessions.get_or_create(&service_label).inc();
        let open = self
            .metrics
            .sessions_open
            .get_or_create(&service_label)
            .clone();
        open.inc();
        let hostname = snap.hostname_for(&service);
        let cert_loaded = service
            .tls
            .as_ref()
            .is_some_and(|t| snap.certs.contains_key(&t.secret_name));
        let cfg = session_config(
            &service,
            hostname.clone(),
            cert_loaded,
            self.settings.max_message_size_bytes,
        );
        let facts = SessionFacts {
            service: service.name.clone(),
            client_ip: ip,
            helo: None,
            esmtp: false,
            tls: None,
            authenticated_as: None,
        };
        let policy = PolicyEngine {
            snapshot: snap.clone(),
            service: service.name.clone(),
        };
        let mut session = Session::new(cfg, facts, Box::new(policy));
        session.enable_mail_check();
        let mut driver = Driver {
            relay: self.clone(),
            snap,
            service,
            ip,
            hostname,
            exchange: None,
            limits,
            auth,
            auth_delayed: false,
            refuse_proxy_header,
            tx_span: None,
            incoming: None,
            dnsbl_headers,
            held: None,
        };
        let span = tracing::info_span!(
            "smtp_session",
            service = %driver.service.name,
            client_ip = %ip,
            peer = %peer,
        );
        debug!(parent: &span, service = %driver.service.name, client = %ip, "session start");
        tracing::Instrument::instrument(driver.run(&mut session, conn), span.clone()).await;
        debug!(parent: &span, service = %driver.service.name, client = %ip, "session end");
        open.dec();
    }

    /// Reads the PROXY header of a trusted proxy; `None` closes the connection.
    async fn proxy_header(
        &self,
        stream: &mut TcpStream,
        service: &str,
        proxy: IpAddr,
    ) -> Option<IpAddr> {
        let wait = Duration::from_secs(self.settings.timeouts.tls_handshake_seconds.max(1));
        match tokio::time::timeout(wait, crate::proxy::read_header(stream)).await {
            Ok(Ok(crate::proxy::ProxiedPeer::Client(addr))) => {
                debug!(service, proxy = %proxy, client = %addr, "PROXY header");
                Some(canonical_ip(addr.ip()))
            }
            Ok(Ok(crate::proxy::ProxiedPeer::Local)) => Some(proxy),
            Ok(Err(e)) => {
                security(
                    &self.metrics,
                    SecurityKind::ProxyHeaderInvalid,
                    service,
                    proxy,
                    &e.to_string(),
                );
                None
            }
            Err(_) => {
                security(
                    &self.metrics,
                    SecurityKind::ProxyHeaderInvalid,
                    service,
                    proxy,
                    "no PROXY header from a trusted proxy in time",
                );
                None
            }
        }
    }
}

/// Server-side TLS handshake on a service's certificate, bounded by the handshake timeout.
pub(super) async fn tls_accept(
    relay: &Relay,
    service: &ServicePolicy,
    ip: IpAddr,
    tcp: TcpStream,
) -> Option<Stream> {
    let hs = Duration::from_secs(relay.settings.timeouts.tls_handshake_seconds.max(1));
    let secret = service.tls.as_ref()?.secret_name.clone();
    let acceptor = match relay.tls.acceptor(&secret) {
        Ok(a) => a,
        Err(e) => {
            warn!(service = %service.name, error = %e, "no TLS acceptor");
            return None;
        }
    };
    let result = tokio::time::timeout(hs, acceptor.accept(tcp)).await;
    let version = match &result {
        Ok(Ok(s)) => s.get_ref().1.protocol_version(),
        _ => None,
    };
    relay.metrics.tls_handshake(&service.name, version);
    match result {
        Ok(Ok(s)) => Some(Stream::from(s)),
        Ok(Err(e)) => {
            debug!(service = %service.name, client = %ip, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(service = %service.name, client = %ip, "TLS handshake timed out");
            None
        }
    }
}

/// Refuses a connection at connect with `reply`. On SMTPS the reply goes inside TLS (a client
/// that speaks TLS from the first byte could not read it otherwise), so a refusal there costs a
/// handshake, bounded by the handshake timeout.
async fn refuse(relay: &Relay, service: &ServicePolicy, ip: IpAddr, conn: Stream, reply: &Reply) {
    relay.metrics.reply(&service.name, reply.code);
    let mut conn = match conn {
        Stream::Plain(tcp) if service.protocol == Protocol::Smtps => {
            match tls_accept(relay, service, ip, tcp).await {
                Some(c) => c,
                None => return,
            }
        }
        other => other,
    };
    let _ = conn.write_all(&reply.to_bytes()).await;
    let _ = conn.shutdown().await;
}
