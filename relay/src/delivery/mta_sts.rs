//! MTA-STS (RFC 8461) for direct delivery: discovering a recipient domain's policy
//! (`_mta-sts.<domain>` TXT), fetching it from `https://mta-sts.<domain>/.well-known/mta-sts.txt`
//! with a verified certificate, parsing it, and keeping it per `max_age` in a cache shared by all
//! of the pod's deliveries and persisted to a JSON file so a restart does not forget an `enforce`
//! policy (the protection against a downgrade needs the policy to outlive the attacker's window).
//! What a policy means for a connection is decided by [`super::queue`].

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http::{header, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::server_name;

/// RFC 8461 §3.2: policies larger than this are not policies.
const MAX_POLICY: usize = 64 * 1024;
/// RFC 8461 §3.2: `max_age` is at most one year.
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Cached domains at most; a relay sending to more policy domains than this refetches the rest.
const MAX_ENTRIES: usize = 10_000;

/// A policy's mode (RFC 8461 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only listed MX hosts, only with TLS and a valid certificate; otherwise defer.
    Enforce,
    /// Deliver as without a policy; report what enforcement would have refused.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A parsed policy and when it was fetched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's `id` the policy was fetched under.
    pub id: String,
    pub mode: Mode,
    /// `mx` patterns, lower case: a host name or `*.` followed by a domain.
    pub mx: Vec<String>,
    /// Seconds the policy stays valid after `fetched`.
    pub max_age: u64,
    /// Unix time of the fetch.
    pub fetched: u64,
}

impl Policy {
    fn expired(&self, now: u64) -> bool {
        now >= self.fetched.saturating_add(self.max_age)
    }

    /// Whether `host` (an MX host name) is one the policy allows.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// RFC 8461 §4.1: a pattern is a host name, or `*.` and a domain standing for exactly one more
/// leftmost label.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(base) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == base),
        None => host == pattern,
    }
}

/// The `id` of an `_mta-sts` TXT record (`v=STSv1; id=...;`), `None` when it is not one.
pub fn parse_txt(txt: &str) -> Option<String> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=STSv1" {
        return None;
    }
    let id = fields.find_map(|f| f.strip_prefix("id="))?.trim();
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_string())
}

/// Parses a policy body (RFC 8461 §3.2). Unknown keys are ignored; `version`, `mode` and
/// `max_age` are required, and `mx` unless the mode is `none`.
pub fn parse_policy(body: &str) -> Result<(Mode, Vec<String>, u64), String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("not a key: value line: {line:?}"));
        };
        let v = v.trim();
        match k.trim() {
            "version" => version = Some(v.to_string()),
            "mode" => {
                mode = Some(match v {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("max_age {v:?} is not a number"))?;
                max_age = Some(n.min(MAX_AGE_LIMIT));
            }
            "mx" => {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(format!("bad mx pattern {v:?}"));
                }
                mx.push(v.trim_end_matches('.').to_ascii_lowercase());
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("version is not STSv1".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx patterns".into());
    }
    Ok((mode, mx, max_age))
}

/// What the lookup found for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A policy (fresh, or from the cache).
    Policy(Policy),
    /// The domain publishes no policy (or its policy could not be fetched and none is cached:
    /// RFC 8461 §5.1 says to deliver as if it had none). `Some` carries the fetch error for
    /// TLS reporting (`sts-policy-fetch-error` or `sts-policy-invalid`).
    None(Option<(&'static str, String)>),
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    policies: HashMap<String, Policy>,
}

/// Fetches and caches policies. One per queue.
pub struct MtaSts {
    resolver: TokioResolver,
    tls: Arc<rustls::ClientConfig>,
    port: u16,
    timeout: Duration,
    file: Option<PathBuf>,
    cache: Mutex<HashMap<String, Policy>>,
    /// One fetch at a time: concurrent deliveries to a domain share its fetch.
    fetching: tokio::sync::Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MtaSts {
    /// `tls`: the verified client configuration (built-in roots plus `delivery.tls.extraCaFile`).
    /// `file`: the persisted cache; read now, written after every change.
    pub fn new(
        resolver: TokioResolver,
        tls: Arc<rustls::ClientConfig>,
        port: u16,
        timeout: Duration,
        file: Option<PathBuf>,
    ) -> MtaSts {
        let mut cache = HashMap::new();
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                    Ok(c) => cache = c.policies,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "MTA-STS policy cache unreadable; starting empty")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the MTA-STS policy cache; starting empty")
                }
            }
        }
        MtaSts {
            resolver,
            tls,
            port,
            timeout,
            file,
            cache: Mutex::new(cache),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, domain: &str) -> Option<Policy> {
        self.cache.lock().ok()?.get(domain).cloned()
    }

    /// The policy in effect for `domain` (lower case), following RFC 8461 §5.1: the TXT record
    /// says whether the cached policy is current; a fetch that fails falls back to an unexpired
    /// cached policy, and without one the domain is treated as having none.
    pub async fn lookup(&self, domain: &str) -> Lookup {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let t = now();
        let cached = self.cached(&domain).filter(|p| !p.expired(t));
        let txt_id = match self.txt_id(&domain).await {
            Ok(id) => id,
            // Unknown answer: what is cached stays in force.
            Err(_) => {
                return cached.map_or(Lookup::None(None), Lookup::Policy);
            }
        };
        let Some(id) = txt_id else {
            return cached.map_or(Lookup::None(None), Lookup::Policy);
        };
        if let Some(p) = cached.as_ref().filter(|p| p.id == id) {
            return Lookup::Policy(p.clone());
        }
        let _one = self.fetching.lock().await;
        if let Some(p) = self
            .cached(&domain)
            .filter(|p| !p.expired(now()) && p.id == id)
        {
            return Lookup::Policy(p);
        }
        match self.fetch(&domain).await {
            Ok((mode, mx, max_age)) => {
                let p = Policy {
                    id,
                    mode,
                    mx,
                    max_age,
                    fetched: now(),
                };
                tracing::info!(domain = %domain, mode = ?p.mode, mx = ?p.mx, max_age = p.max_age, "MTA-STS policy fetched");
                self.store(&domain, p.clone());
                Lookup::Policy(p)
            }
            Err((kind, why)) => {
                tracing::warn!(domain = %domain, reason = %why, "MTA-STS policy fetch failed");
                match cached {
                    Some(p) => Lookup::Policy(p),
                    None => Lookup::None(Some((kind, why))),
                }
            }
        }
    }

    /// `Ok(None)`: no STSv1 record (or several, which RFC 8461 §3.1 treats as none).
    async fn txt_id(&self, domain: &str) -> Result<Option<String>, String> {
        let name = format!("_mta-sts.{domain}.");
        let txt = crate::dns::versioned_txt(&self.resolver, &name, "v=STSv1").await?;
        Ok(txt.and_then(|t| parse_txt(&t)))
    }

    async fn fetch(
        &self,
        domain: &str,
    ) -> Result<(Mode, Vec<String>, u64), (&'static str, String)> {
        let host = format!("mta-sts.{domain}");
        let body = tokio::time::timeout(self.timeout, self.get(&host))
            .await
            .map_err(|_| ("sts-policy-fetch-error", format!("{host}: timed out")))??;
        let text = String::from_utf8(body)
            .map_err(|_| ("sts-policy-invalid", format!("{host}: policy is not UTF-8")))?;
        parse_policy(&text).map_err(|e| ("sts-policy-invalid", format!("{host}: {e}")))
    }

    async fn get(&self, host: &str) -> Result<Vec<u8>, (&'static str, String)> {
        let fetch_err = |e: String| ("sts-policy-fetch-error", format!("{host}: {e}"));
        let tls = https_connect(&self.resolver, &self.tls, host, self.port)
            .await
            .map_err(|e| match e {
                HttpsError::Connect(e) => fetch_err(e),
                HttpsError::Tls(e) => ("sts-webpki-invalid", format!("{host}: TLS: {e}")),
            })?;
        let request = Request::get("/.well-known/mta-sts.txt")
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fetch_err(format!("HTTP: {e}")))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fetch_err(format!("HTTP: {e}")))?;
        // RFC 8461 §3.3: no redirects, only 200.
        if response.status() != http::StatusCode::OK {
            return Err(fetch_err(format!("HTTP status {}", response.status())));
        }
        let media = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if media != "text/plain" {
            return Err((
                "sts-policy-invalid",
                format!("{host}: media type {media:?}, not text/plain"),
            ));
        }
        let body = Limited::new(response.into_body(), MAX_POLICY)
            .collect()
            .await
            .map_err(|e| fetch_err(format!("reading the policy: {e}")))?
            .to_bytes();
        Ok(body.to_vec())
    }

    fn store(&self, domain: &str, p: Policy) {
        let snapshot = {
            let Ok(mut map) = self.cache.lock() else {
                return;
            };
            let t = now();
            map.retain(|_, v| !v.expired(t));
            if map.len() >= MAX_ENTRIES && !map.contains_key(domain) {
                return;
            }
            map.insert(domain.to_string(), p);
            CacheFile {
                policies: map.clone(),
            }
        };
        if let Some(path) = &self.file {
            if let Err(e) = write_atomically(path, &snapshot) {
                tracing::warn!(file = %path.display(), error = %e, "cannot write the MTA-STS policy cache; policies are kept in memory only");
            }
        }
    }
}

/// Why [`https_connect`] could not open a connection.
#[derive(Debug)]
pub enum HttpsError {
    /// Address lookup or TCP connect.
    Connect(String),
    /// The TLS handshake, incl. certificate verification.
    Tls(String),
}

/// A TLS connection to `host:port` with the certificate verified for `host`, the host's
/// address looked up with `resolver` (the relay's `delivery.dns`). The HTTPS client of the
/// policy fetch, also used to upload TLS-RPT reports ([`super::tlsrpt`]).
pub async fn https_connect(
    resolver: &TokioResolver,
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpsError> {
    let ips = resolver
        .lookup_ip(format!("{host}.").as_str())
        .await
        .map_err(|e| HttpsError::Connect(format!("address lookup: {e}")))?;
    let ip = ips
        .iter()
        .next()
        .ok_or_else(|| HttpsError::Connect("no address".into()))?;
    let tcp = TcpStream::connect((ip, port))
        .await
        .map_err(|e| HttpsError::Connect(format!("connect to {ip}:{port}: {e}")))?;
    let name = server_name(host).ok_or_else(|| HttpsError::Connect("not a host name".into()))?;
    TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| HttpsError::Tls(e.to_string()))
}

/// Temporary file, fsync, rename, fsync of the directory: a crash leaves the old file or the
/// new one, never a torn one.
fn write_atomically(path: &Path, cache: &CacheFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(cache).map_err(std::io::Error::other)?;
    write_file_atomically(path, &bytes)
}

/// Replaces `path` with `bytes`: temporary file beside it, fsync, rename, fsync of the
/// directory (also the TLS-RPT day files, [`super::tlsrpt`]).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("mta-sts")
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        assert_eq!(
            parse_txt("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(parse_txt("v=STSv1;id=abc").as_deref(), Some("abc"));
        assert_eq!(parse_txt("v=STSv2; id=abc"), None);
        assert_eq!(parse_txt("v=STSv1;"), None);
        assert_eq!(parse_txt("v=STSv1; id=a-b"), None);
    }

    #[test]
    fn policies() {
        let (mode, mx, age) = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\nextension: x\r\n",
        )
        .expect("valid");
        assert_eq!(mode, Mode::Enforce);
        assert_eq!(mx, vec!["mail.example.com", "*.example.net"]);
        assert_eq!(age, 604800);
        assert_eq!(
            parse_policy("version: STSv1\nmode: testing\nmx: a.b\nmax_age: 99999999999\n")
                .map(|p| p.2),
            Ok(MAX_AGE_LIMIT)
        );
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").is_ok());
        for bad in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
            "<html>",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mx_patterns() {
        assert!(mx_matches("mail.example.com", "MAIL.example.com."));
        assert!(mx_matches("*.example.net", "mx1.example.net"));
        assert!(!mx_matches("*.example.net", "example.net"));
        assert!(!mx_matches("*.example.net", "a.b.example.net"));
        assert!(!mx_matches("mail.example.com", "other.example.com"));
    }

    #[test]
    fn the_cache_file_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mta-sts.json");
        let mut c = CacheFile::default();
        c.policies.insert(
            "example.com".into(),
            Policy {
                id: "1".into(),
                mode: Mode::Enforce,
                mx: vec!["mx.example.com".into()],
                max_age: 60,
                fetched: 1,
            },
        );
        write_atomically(&path, &c).expect("write");
        let back: CacheFile =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(back.policies, c.policies);
    }
}
