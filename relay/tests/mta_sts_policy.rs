//! The MTA-STS policy host (`mtaStsPolicy`, RFC 8461 §3.3) of the real `relay` binary, over real
//! sockets and real TLS: a local domain's compiled policy (`DomainPolicy.mtaSts`) is fetched by
//! the relay's own MTA-STS client (through a loopback DNS server publishing `_mta-sts` and the
//! policy host's address, and a certificate from the test CA) and byte for byte by a plain
//! HTTPS client; unknown hosts and paths get 404, other methods 405; a handshake for a name no
//! certificate covers (or without SNI) fails; the certificate is served once its Secret appears,
//! and a rewritten `relay.yaml` changes the served policy, both without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::extra::{a, start_custom, txt, Answer, DnsServer};
use common::{free_port, write, Relay};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mailrelay_crds::config::{PublishedMtaSts, RelayConfig, TlsSource};
use mailrelay_relay::delivery::mta_sts::{Lookup, Mode, MtaSts};
use rustls::pki_types::ServerName;

const HOST: &str = "mta-sts.example.test";
const PATH: &str = "/.well-known/mta-sts.txt";
const POLICY: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: relay.example.test\r\nmx: *.mx.example.test\r\nmax_age: 604800\r\n";
const POLICY2: &str =
    "version: STSv1\r\nmode: testing\r\nmx: relay.example.test\r\nmax_age: 86400\r\n";

fn with_policy(cfg: &mut RelayConfig, policy: &str, id: &str) {
    let d = cfg
        .domains
        .iter_mut()
        .find(|d| d.domain == "example.test")
        .unwrap();
    d.mta_sts = Some(PublishedMtaSts {
        policy: policy.into(),
        id: id.into(),
    });
}

/// A relay whose `example.test` publishes [`POLICY`], with the policy host on `port`. The
/// certificate for `mta-sts.example.test` belongs to a TLS Secret the policy names (on the
/// `refused` service) but that only appears after the start: the policy host must pick it up
/// without a restart. Returns once a handshake for it succeeds.
fn start(port: u16) -> Relay {
    let runtime = format!("mtaStsPolicy:\n  listenAddress: 127.0.0.1:{port}\n");
    let r = start_custom(&runtime, |cfg, _| {
        with_policy(cfg, POLICY, "20260101");
        let refused = cfg
            .services
            .iter_mut()
            .find(|s| s.name == "refused")
            .unwrap();
        refused.tls = Some(TlsSource {
            secret_name: "mta-sts-tls".into(),
            dns_names: vec![HOST.into()],
        });
    });
    let rt = runtime_();
    // No certificate covers the name yet: the handshake fails, even for a client that takes any
    // certificate (there is no default one).
    let early = rt.block_on(handshake_any_certificate(port, HOST));
    assert!(
        early.as_ref().is_err_and(|e| e.starts_with("TLS")),
        "a certificate was served before one covered the name: {early:?}"
    );
    let (crt, key, _) = r.ca.leaf(HOST, "mta-sts");
    let d = r.path().join("tls/mta-sts-tls");
    std::fs::create_dir_all(&d).unwrap();
    write(&d.join("tls.key"), &key);
    write(&d.join("tls.crt"), &crt);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rt.block_on(get(&r, port, HOST, "GET", HOST, PATH)) {
            Ok(_) => return r,
            Err(e) if Instant::now() > deadline => {
                panic!("certificate never served: {e}\n{}", r.log())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn runtime_() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client_tls(r: &Relay) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(r.ca.cert_der.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Takes any certificate: a handshake that fails with it failed on the server's side (no
/// certificate for the name), not because the client disliked the one it got.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS handshake with SNI `sni` (an IP address: no SNI) that accepts any certificate.
async fn handshake_any_certificate(port: u16, sni: &str) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| format!("TLS: {e}"))
}

#[derive(Debug)]
struct Answered {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

/// One HTTPS request to the policy host on `port`: TLS with SNI `sni` (an IP address: no SNI)
/// verified against the test CA, then `method path` with `Host: host`.
async fn get(
    r: &Relay,
    port: u16,
    sni: &str,
    method: &str,
    host: &str,
    path: &str,
) -> Result<Answered, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client_tls(r))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Answered {
        status,
        headers,
        body,
    })
}

fn header<'a>(a: &'a Answered, name: &str) -> &'a str {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[test]
fn serves_local_domain_policies_over_https() {
    let port = free_port();
    let r = start(port);
    let rt = runtime_();

    // The relay's own MTA-STS client, end to end: TXT record, address, verified TLS, parse.
    let dns = DnsServer::start(HashMap::from([
        (
            "_mta-sts.example.test".to_string(),
            Answer::Records(vec![txt("v=STSv1; id=20260101;")]),
        ),
        (HOST.to_string(), Answer::Records(vec![a([127, 0, 0, 1])])),
    ]));
    let dns_settings = mailrelay_relay::settings::DeliveryDnsSettings {
        nameservers: vec![dns.addr.ip()],
        port: dns.addr.port(),
        timeout_seconds: 2,
        attempts: 2,
        ..Default::default()
    };
    let resolver = mailrelay_relay::dns::resolver(
        &dns_settings,
        hickory_resolver::config::ResolveHosts::Never,
    )
    .unwrap();
    let client = MtaSts::new(
        resolver,
        client_tls(&r),
        port,
        Duration::from_secs(10),
        None,
    );
    match rt.block_on(client.lookup("example.test")) {
        Lookup::Policy(p) => {
            assert_eq!(p.id, "20260101");
            assert_eq!(p.mode, Mode::Enforce);
            assert_eq!(p.mx, vec!["relay.example.test", "*.mx.example.test"]);
            assert_eq!(p.max_age, 604_800);
            assert!(p.allows("relay.example.test"));
        }
        Lookup::None(why) => panic!("no policy: {why:?}\n{}", r.log()),
    }

    // Byte for byte, with the headers a sender checks.
    let ok = rt.block_on(get(&r, port, HOST, "GET", HOST, PATH)).unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body, POLICY.as_bytes());
    assert!(
        header(&ok, "content-type").starts_with("text/plain"),
        "{ok:?}"
    );
    assert!(header(&ok, "location").is_empty());
    // Host with a port and in another case is the same host.
    let ok = rt
        .block_on(get(&r, port, HOST, "GET", "MTA-STS.Example.Test:443", PATH))
        .unwrap();
    assert_eq!((ok.status, ok.body.as_slice()), (200, POLICY.as_bytes()));
    // HEAD: the headers only.
    let head = rt
        .block_on(get(&r, port, HOST, "HEAD", HOST, PATH))
        .unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head.body.is_empty(), "{head:?}");
    assert_eq!(header(&head, "content-length"), POLICY.len().to_string());

    // Unknown host (also a non-local or policy-less domain), wrong path: 404.
    for (host, path) in [
        ("mta-sts.other.test", PATH),
        ("relay.example.test", PATH),
        (HOST, "/"),
        (HOST, "/.well-known/mta-sts.txt.bak"),
    ] {
        let nf = rt.block_on(get(&r, port, HOST, "GET", host, path)).unwrap();
        assert_eq!(nf.status, 404, "{host} {path}: {nf:?}");
        assert_ne!(nf.body, POLICY.as_bytes());
    }
    // Other methods: 405 with Allow.
    let post = rt
        .block_on(get(&r, port, HOST, "POST", HOST, PATH))
        .unwrap();
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(header(&post, "allow"), "GET, HEAD");

    // A name no certificate covers, or no SNI at all: the server fails the handshake (the
    // client takes any certificate). The name the other loaded certificate covers works.
    for sni in ["mta-sts.other.test", "127.0.0.1"] {
        let failed = rt.block_on(handshake_any_certificate(port, sni));
        assert!(
            failed.as_ref().is_err_and(|e| e.starts_with("TLS")),
            "{sni}: {failed:?}"
        );
    }
    rt.block_on(handshake_any_certificate(port, HOST)).unwrap();
    rt.block_on(handshake_any_certificate(port, "relay.example.test"))
        .unwrap();

    // The same with curl, a client that is not ours, when it is installed.
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        let ca = r.ca_pem_file();
        let out = std::process::Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--resolve"])
            .arg(format!("{HOST}:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca)
            .arg(format!("https://{HOST}:{port}{PATH}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "curl: {out:?}");
        assert_eq!(out.stdout, POLICY.as_bytes());
    }

    // Counted: served (client + 3 + curl, at least 5; the start's probe too), 4 not found, 1 bad method.
    let metrics = r.http("/metrics");
    let count = |result: &str| -> u64 {
        let prefix = format!("mailrelay_mta_sts_policy_requests_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix}:\n{metrics}"))
    };
    assert!(count("served") >= 5, "{metrics}");
    assert_eq!(count("not_found"), 4, "{metrics}");
    assert_eq!(count("bad_method"), 1, "{metrics}");
}

#[test]
fn a_reloaded_policy_is_served_without_restart() {
    let port = free_port();
    let r = start(port);
    let rt = runtime_();
    let pid = r.pid();
    let before = rt.block_on(get(&r, port, HOST, "GET", HOST, PATH)).unwrap();
    assert_eq!(before.body, POLICY.as_bytes());

    // A new compile: the policy changes (and its id).
    let text = std::fs::read_to_string(r.path().join("relay.yaml")).unwrap();
    let mut cfg: RelayConfig = serde_norway::from_str(&text).unwrap();
    with_policy(&mut cfg, POLICY2, "20260102");
    r.write_policy(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = rt.block_on(get(&r, port, HOST, "GET", HOST, PATH)).unwrap();
        assert_eq!(now.status, 200, "{now:?}");
        if now.body == POLICY2.as_bytes() {
            break;
        }
        assert_eq!(now.body, POLICY.as_bytes(), "neither policy");
        assert!(
            Instant::now() < deadline,
            "the new policy was never served:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.pid(), pid);

    // The policy withdrawn from the domain: 404.
    cfg.domains.iter_mut().for_each(|d| d.mta_sts = None);
    r.write_policy(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = rt.block_on(get(&r, port, HOST, "GET", HOST, PATH)).unwrap();
        if now.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the withdrawn policy is still served:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
