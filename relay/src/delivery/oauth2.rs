//! OAuth2 access tokens for XOAUTH2 relay authentication: obtained from the rule's token
//! endpoint by refresh-token grant (when a refresh token is configured) or client-credentials
//! grant, cached per rule until shortly before they expire, and dropped when the relay host
//! rejects them. The HTTP client is a minimal HTTP/1.1 POST over TCP or rustls — a token endpoint
//! needs nothing more, and it keeps the dependency tree small.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mailrelay_crds::config::RelayAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::{server_name, ClientTls};

/// Tokens are renewed this long before the endpoint says they expire.
const EARLY_RENEW: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// One fetch at a time, so concurrent connections share one new token instead of each
    /// asking the endpoint.
    fetching: tokio::sync::Mutex<()>,
}

impl TokenCache {
    /// A valid access token for `rule`, fetching a new one when needed.
    pub async fn token(
        &self,
        rule: &str,
        auth: &RelayAuth,
        tls: &ClientTls,
    ) -> Result<String, String> {
        if let Some(t) = self.cached(rule) {
            return Ok(t);
        }
        let _fetching = self.fetching.lock().await;
        if let Some(t) = self.cached(rule) {
            return Ok(t);
        }
        let RelayAuth::OAuth2 {
            token_endpoint,
            client_id,
            client_secret,
            refresh_token,
            scope,
            ..
        } = auth
        else {
            return Err(format!("rule {rule} has no OAuth2 credentials"));
        };
        let mut form = Vec::new();
        match refresh_token {
            Some(rt) => {
                form.push(("grant_type", "refresh_token".to_string()));
                form.push(("refresh_token", rt.expose().to_string()));
            }
            None => form.push(("grant_type", "client_credentials".to_string())),
        }
        form.push(("client_id", client_id.clone()));
        if let Some(cs) = client_secret {
            form.push(("client_secret", cs.expose().to_string()));
        }
        if let Some(s) = scope {
            form.push(("scope", s.clone()));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let (status, resp) =
            tokio::time::timeout(HTTP_TIMEOUT, post_form(token_endpoint, &body, tls))
                .await
                .map_err(|_| format!("token endpoint {token_endpoint} timed out"))??;
        let json: serde_json::Value = serde_json::from_slice(&resp).map_err(|e| {
            format!("token endpoint {token_endpoint} answered HTTP {status} with invalid JSON: {e}")
        })?;
        if !(200..300).contains(&status) {
            let err = json
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown error");
            return Err(format!(
                "token endpoint {token_endpoint} refused the grant: HTTP {status} {err}"
            ));
        }
        let token = json
            .get("access_token")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("token endpoint {token_endpoint} sent no access_token"))?
            .to_string();
        let lifetime = json
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .unwrap_or(3600);
        let until = Instant::now() + Duration::from_secs(lifetime).saturating_sub(EARLY_RENEW);
        if let Ok(mut map) = self.tokens.lock() {
            map.insert(rule.to_string(), (token.clone(), until));
        }
        Ok(token)
    }

    fn cached(&self, rule: &str) -> Option<String> {
        let map = self.tokens.lock().ok()?;
        let (t, until) = map.get(rule)?;
        (Instant::now() < *until).then(|| t.clone())
    }

    /// The relay host rejected the token: fetch a fresh one next time.
    pub fn invalidate(&self, rule: &str) {
        if let Ok(mut map) = self.tokens.lock() {
            map.remove(rule);
        }
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// POSTs a form and returns (status, body).
async fn post_form(url: &str, body: &str, tls: &ClientTls) -> Result<(u16, Vec<u8>), String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("unsupported token endpoint URL {url}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, if https { 443 } else { 80 })
        .ok_or_else(|| format!("bad host in token endpoint URL {url}"))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-www-form-urlencoded\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to token endpoint {url}: {e}"))?;
    let mut raw = Vec::new();
    if https {
        let name = server_name(&host).ok_or_else(|| format!("bad host name in {url}"))?;
        let mut s = TlsConnector::from(tls.verified.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to token endpoint {url}: {e}"))?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_limited(&mut s, &mut raw).await?;
    } else {
        let mut s = tcp;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_limited(&mut s, &mut raw).await?;
    }
    parse_response(&raw).ok_or_else(|| format!("malformed HTTP response from token endpoint {url}"))
}

async fn read_limited<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > MAX_RESPONSE {
                    return Err("token endpoint response too large".into());
                }
            }
            // Servers that close TLS without close_notify still sent a complete response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn split_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (h, p) = rest.split_once(']')?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default,
        };
        return Some((h.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
}

fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_parsing() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(r, Some((200, b"abcde".to_vec())));
        assert_eq!(
            parse_response(b"HTTP/1.0 400 Bad\r\n\r\n{}"),
            Some((400, b"{}".to_vec()))
        );
        assert_eq!(
            split_host_port("[::1]:8080", 80),
            Some(("::1".into(), 8080))
        );
        assert_eq!(form_encode("a b&c"), "a%20b%26c");
    }
}
