//! OTLP trace export over a running relay: an in-process OTLP/HTTP receiver on loopback
//! (POST /v1/traces, protobuf `ExportTraceServiceRequest`), the relay pointed at it through
//! `logging.otlpEndpoint`, and the `smtp_session` / `smtp_transaction` spans of a real SMTP
//! transaction checked for the spool id as `message_id`, once through the batch export and
//! once through the flush on SIGTERM. Then the same over HTTPS: the receiver with an rcgen
//! certificate from a private CA (given to the relay as `otlpTls.caFile`) that requires a client
//! certificate (`otlpTls.certFile`/`keyFile`), with the `delivery_attempt` span of a message
//! that DNS bounced.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::{extra, pem};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use extra::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;

/// One received span: its name, string attributes and the resource's string attributes.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    attrs: HashMap<String, String>,
    resource: HashMap<String, String>,
}

fn strings(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

/// A minimal OTLP/HTTP receiver: HTTP/1.1 with keep-alive and Content-Length bodies, over
/// plain TCP or TLS.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    /// TLS sessions in which the client presented a certificate the receiver accepted.
    client_certs: Arc<AtomicUsize>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_with(None)
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let client_certs = Arc::new(AtomicUsize::new(0));
        let sink = spans.clone();
        let certs = client_certs.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let sink = sink.clone();
                let tls = tls.clone();
                let certs = certs.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                    match tls {
                        None => serve(conn, &sink),
                        Some(cfg) => {
                            let Ok(server) = rustls::ServerConnection::new(cfg) else {
                                return;
                            };
                            let mut s = rustls::StreamOwned::new(server, conn);
                            while s.conn.is_handshaking() {
                                if s.conn.complete_io(&mut s.sock).is_err() {
                                    return;
                                }
                            }
                            if s.conn.peer_certificates().is_some_and(|c| !c.is_empty()) {
                                certs.fetch_add(1, Ordering::SeqCst);
                            }
                            serve(s, &sink)
                        }
                    }
                });
            }
        });
        Receiver {
            port,
            spans,
            client_certs,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (bounded) until a span named `name` with `message_id == id` has arrived.
    fn wait_span(&self, name: &str, id: &str) -> Span {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| {
                s.name == name && s.attrs.get("message_id").map(String::as_str) == Some(id)
            }) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} span with message_id {id}; received: {:?}",
                self.spans()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serve<S: Read + Write>(conn: S, sink: &Mutex<Vec<Span>>) {
    let mut r = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        match r.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let status = if !request_line.starts_with("POST /v1/traces ") {
            "404 Not Found"
        } else {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    let mut got = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let resource = rs
                            .resource
                            .as_ref()
                            .map(|r| strings(&r.attributes))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                got.push(Span {
                                    name: s.name.clone(),
                                    attrs: strings(&s.attributes),
                                    resource: resource.clone(),
                                });
                            }
                        }
                    }
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
        );
        if r.get_mut().write_all(reply.as_bytes()).is_err() || r.get_mut().flush().is_err() {
            return;
        }
    }
}

/// One accepted transaction; returns the spool id from the `250 ... queued as <id>` reply.
fn transaction(port: u16) -> String {
    let mut c = session(port);
    let (code, text) = c.mail("sender@example.org", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    let id = text
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_eq!(id.len(), 32, "spool id in {text:?}");
    c.expect("QUIT", 221);
    id
}

#[test]
fn session_and_transaction_spans_reach_the_otlp_receiver() {
    let rx = Receiver::start();
    let mut r = start_custom(
        &format!("logging:\n  otlpEndpoint: http://127.0.0.1:{}\n", rx.port),
        |_, _| {},
    );

    // Exported by the batch processor while the relay runs.
    let id = transaction(r.ports.smtp);
    let tx = rx.wait_span("smtp_transaction", &id);
    assert_eq!(
        tx.attrs.get("sender").map(String::as_str),
        Some("sender@example.org"),
        "{tx:?}"
    );
    assert_eq!(
        tx.resource.get("service.name").map(String::as_str),
        Some("mailrelay-relay"),
        "{tx:?}"
    );
    assert!(tx.resource.contains_key("host.name"), "{tx:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rx.spans().iter().any(|s| s.name == "smtp_session") {
        assert!(Instant::now() < deadline, "no smtp_session span");
        std::thread::sleep(Duration::from_millis(50));
    }
    let session_span = rx
        .spans()
        .into_iter()
        .find(|s| s.name == "smtp_session")
        .unwrap();
    assert_eq!(
        session_span.attrs.get("client_ip").map(String::as_str),
        Some("127.0.0.1"),
        "{session_span:?}"
    );

    // Flushed on SIGTERM: the transaction's span is there once the relay has exited.
    let id = transaction(r.ports.smtp);
    let mut child = r.child.take().unwrap();
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "relay did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tx = rx.wait_span("smtp_transaction", &id);
    assert_eq!(tx.attrs.get("message_id"), Some(&id));
    assert!(
        !r.log().contains("OTLP trace export shutdown"),
        "{}",
        r.log()
    );
}

/// HTTPS export with a private CA and a client certificate, both from files named relative to
/// the config directory; the receiver refuses clients without a certificate from that CA.
#[test]
fn spans_are_exported_over_https_with_a_private_ca_and_a_client_certificate() {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = common::Ca::new();
    let (server_crt, server_key, _) = ca.leaf("localhost", "otlp receiver");
    let (client_crt, client_key, _) = ca.leaf("relay.example.test", "relay client");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_slice_iter(server_crt.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
        )
        .unwrap();
    let rx = Receiver::start_with(Some(Arc::new(server)));
    // example.test does not exist in this DNS: the message bounces at the lookup.
    let dns = DnsServer::start(HashMap::new());
    let logging = format!(
        "logging:\n  otlpEndpoint: https://localhost:{}\n  otlpTls:\n    caFile: otlp/ca.pem\n    certFile: otlp/client.crt\n    keyFile: otlp/client.key\n",
        rx.port
    );
    let r = start_with_files(
        &format!("{logging}{}", dns.runtime_yaml()),
        &[
            ("otlp/ca.pem", pem("CERTIFICATE", &ca.cert_der)),
            ("otlp/client.crt", client_crt),
            ("otlp/client.key", client_key),
        ],
    );
    let id = transaction(r.ports.smtp);
    let tx = rx.wait_span("smtp_transaction", &id);
    assert_eq!(
        tx.resource.get("service.name").map(String::as_str),
        Some("mailrelay-relay")
    );
    let attempt = rx.wait_span("delivery_attempt", &id);
    assert_eq!(
        attempt.attrs.get("destination").map(String::as_str),
        Some("dns:example.test"),
        "{attempt:?}"
    );
    assert_eq!(
        attempt.attrs.get("outcome").map(String::as_str),
        Some("bounced"),
        "{attempt:?}"
    );
    assert!(rx.client_certs.load(Ordering::SeqCst) >= 1);
    assert!(!r.log().contains("trace export is off"), "{}", r.log());
}

/// A relay like `start_custom`'s, with extra files written into its config directory before
/// it starts.
fn start_with_files(runtime_extra: &str, files: &[(&str, String)]) -> common::Relay {
    let ports = common::Ports {
        smtp: common::free_port(),
        submission: common::free_port(),
        smtps: common::free_port(),
        refused: common::free_port(),
        metrics: common::free_port(),
        admin: common::free_port(),
    };
    let mut r = common::Relay {
        dir: tempfile::tempdir().unwrap(),
        ports,
        ca: common::Ca::new(),
        child: None,
        cert_der: vec![],
        env: vec![],
    };
    r.write_cert("first");
    r.write_policy(&common::relay_config(&r.ports, common::DEFAULT_RECIPIENTS));
    common::write(
        &r.path().join("credentials.yaml"),
        &serde_norway::to_string(&common::credentials()).unwrap(),
    );
    for (name, text) in files {
        let path = r.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    common::write(
        &r.path().join("runtime.yaml"),
        &common::runtime_yaml(&r.ports, runtime_extra),
    );
    r.spawn();
    r
}
