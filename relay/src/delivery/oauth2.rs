//! OAuth2 access tokens for XOAUTH2 relay authentication: obtained from the rule's token
//! endpoint by refresh-token grant (when a refresh token is configured) or client-credentials
//! grant, cached per rule until shortly before they expire, and dropped when the relay host
//! rejects them. The request is one HTTP/1.1 POST with hyper over TCP or the relay's rustls client
//! configuration (the verified one: a token endpoint is always authenticated).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use mailrelay_crds::config::RelayAuth;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{form_urlencoded, Url};

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
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let (status, resp) =
            tokio::time::timeout(HTTP_TIMEOUT, post_form(token_endpoint, body, tls))
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

/// POSTs a form and returns (status, body). One request per connection: tokens are fetched
/// about once an hour per rule, so a connection pool would only hold sockets open.
async fn post_form(url: &str, body: String, tls: &ClientTls) -> Result<(u16, Vec<u8>), String> {
    let parsed = Url::parse(url).map_err(|e| format!("bad token endpoint URL {url}: {e}"))?;
    let https = match parsed.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!(
                "unsupported scheme {other:?} in token endpoint URL {url}"
            ))
        }
    };
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("no host in token endpoint URL {url}"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("no port in token endpoint URL {url}"))?;
    let authority = match parsed.port() {
        Some(p) => format!("{}:{p}", parsed.host_str().unwrap_or_default()),
        None => parsed.host_str().unwrap_or_default().to_string(),
    };
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let request = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the token request for {url}: {e}"))?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to token endpoint {url}: {e}"))?;
    if https {
        let name = server_name(&host).ok_or_else(|| format!("bad host name in {url}"))?;
        let stream = TlsConnector::from(tls.verified.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to token endpoint {url}: {e}"))?;
        send(stream, request, url).await
    } else {
        send(tcp, request, url).await
    }
}

async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    url: &str,
) -> Result<(u16, Vec<u8>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP to token endpoint {url}: {e}"))?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request to token endpoint {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("reading the answer of token endpoint {url}: {e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_are_encoded() {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("scope", "a b&c")
            .finish();
        assert_eq!(body, "scope=a+b%26c");
    }

    #[tokio::test]
    async fn unsupported_urls_are_refused_with_the_reason() {
        let tls = ClientTls::new(None).expect("client tls");
        let e = post_form("ftp://example.com/token", String::new(), &tls)
            .await
            .expect_err("ftp");
        assert!(e.contains("unsupported scheme"), "{e}");
        let e = post_form("not a url", String::new(), &tls)
            .await
            .expect_err("garbage");
        assert!(e.contains("bad token endpoint URL"), "{e}");
    }
}
