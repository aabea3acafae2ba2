//! OTLP trace export over a running relay: an in-process OTLP/HTTP receiver on loopback
//! (POST /v1/traces, protobuf `ExportTraceServiceRequest`), the relay pointed at it through
//! `logging.otlpEndpoint`, and the `smtp_session` / `smtp_transaction` spans of a real SMTP
//! transaction checked for the spool id as `message_id`, once through the batch export and
//! once through the flush on SIGTERM.

mod common;
#[path = "common/extra.rs"]
mod extra;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
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

/// A minimal OTLP/HTTP receiver: HTTP/1.1 with keep-alive and Content-Length bodies.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let sink = sink.clone();
                std::thread::spawn(move || serve(conn, &sink));
            }
        });
        Receiver { port, spans }
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

fn serve(conn: TcpStream, sink: &Mutex<Vec<Span>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
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
        if out.write_all(reply.as_bytes()).is_err() {
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
