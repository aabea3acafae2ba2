//! PROXY protocol v1 (text) and v2 (binary) on a listener, so that limits, `allowedFrom` and
//! `Received:` see the client behind a load balancer. Only peers in the service's
//! `proxyProtocol.trustedProxies` groups may (and must) send a header, before anything else;
//! the reader takes exactly the header's bytes off the socket so nothing of the SMTP stream
//! is lost. A header from anyone else, or after the greeting or TLS, is never interpreted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (also the first 12 bytes of every v2 header).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line including CRLF (the spec's bound).
const V1_MAX: usize = 107;
/// Largest v2 address block accepted (TLVs included); the spec allows 64 KiB, real proxies
/// send a few hundred bytes.
const V2_MAX_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("connection closed before a complete PROXY header")]
    Eof,
    #[error("no PROXY header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("I/O error reading PROXY header: {0}")]
    Io(String),
}

/// What the header says about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxiedPeer {
    /// The real client.
    Client(SocketAddr),
    /// `LOCAL` (v2) or `UNKNOWN` (v1): a health check or the proxy's own connection; the
    /// connection's own address stands.
    Local,
}

/// True when `bytes` begin like a PROXY header of either version.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ")
        || (bytes.len() >= 5 && V2_SIGNATURE.starts_with(&bytes[..bytes.len().min(12)]))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ProxyError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyError::Eof),
        Err(e) => Err(ProxyError::Io(e.to_string())),
    }
}

/// Reads one header (either version) from the start of `r`, taking exactly the header's bytes
/// off the reader: what is missing is read, and nothing more (one byte at a time within a v1
/// line), so the client's first SMTP bytes stay in the stream.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<ProxiedPeer, ProxyError> {
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        match parse_prefix(&buf)? {
            Progress::Done(peer, _) => return Ok(peer),
            Progress::Need(n) => {
                let start = buf.len();
                buf.resize(start + n, 0);
                read_exact(r, &mut buf[start..]).await?;
            }
        }
    }
}

/// Parses the header at the start of `bytes` (either version): the peer and the header's length
/// in bytes; what follows it is the client's SMTP stream. `Err(ProxyError::Eof)` when `bytes`
/// end before the header does. [`read_header`] runs the same parser.
pub fn parse_header(bytes: &[u8]) -> Result<(ProxiedPeer, usize), ProxyError> {
    match parse_prefix(bytes)? {
        Progress::Done(peer, n) => Ok((peer, n)),
        Progress::Need(_) => Err(ProxyError::Eof),
    }
}

/// How far the start of a stream goes towards a complete header.
enum Progress {
    /// A complete header of this many bytes.
    Done(ProxiedPeer, usize),
    /// At least this many more bytes are needed to go on (exactly what a v2 header lacks; one
    /// at a time within a v1 line, whose end is not known in advance).
    Need(usize),
}

fn parse_prefix(bytes: &[u8]) -> Result<Progress, ProxyError> {
    if bytes.len() < 6 {
        return Ok(Progress::Need(6 - bytes.len()));
    }
    if bytes.starts_with(b"PROXY ") {
        // The line ends at the first CRLF, which must come within V1_MAX bytes.
        let window = &bytes[..bytes.len().min(V1_MAX)];
        return match window.windows(2).position(|w| w == b"\r\n") {
            Some(i) => parse_v1(&bytes[..i + 2]).map(|peer| Progress::Done(peer, i + 2)),
            None if bytes.len() >= V1_MAX => Err(ProxyError::Malformed("v1 line too long")),
            None => Ok(Progress::Need(1)),
        };
    }
    if bytes[..6] != V2_SIGNATURE[..6] {
        return Err(ProxyError::Missing);
    }
    if bytes.len() < 16 {
        return Ok(Progress::Need(16 - bytes.len()));
    }
    if bytes[..12] != V2_SIGNATURE {
        return Err(ProxyError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::Malformed("v2 address block too long"));
    }
    let end = 16 + len;
    if bytes.len() < end {
        return Ok(Progress::Need(end - bytes.len()));
    }
    parse_v2(bytes[12], bytes[13], &bytes[16..end]).map(|peer| Progress::Done(peer, end))
}

/// Parses a complete v1 line including CRLF.
pub fn parse_v1(line: &[u8]) -> Result<ProxiedPeer, ProxyError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyError::Malformed("v1 without CRLF"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::Missing);
    }
    let family = parts.next().ok_or(ProxyError::Malformed("v1 family"))?;
    if family == "UNKNOWN" {
        return Ok(ProxiedPeer::Local);
    }
    let (src, _dst, sport, _dport) = (
        parts.next().ok_or(ProxyError::Malformed("v1 source"))?,
        parts
            .next()
            .ok_or(ProxyError::Malformed("v1 destination"))?,
        parts
            .next()
            .ok_or(ProxyError::Malformed("v1 source port"))?,
        parts
            .next()
            .ok_or(ProxyError::Malformed("v1 destination port"))?,
    );
    if parts.next().is_some() {
        return Err(ProxyError::Malformed("v1 trailing fields"));
    }
    let ip: IpAddr = match family {
        "TCP4" => IpAddr::V4(
            src.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::Malformed("v1 IPv4 source"))?,
        ),
        "TCP6" => IpAddr::V6(
            src.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::Malformed("v1 IPv6 source"))?,
        ),
        _ => return Err(ProxyError::Malformed("v1 family")),
    };
    // The spec forbids leading zeros; `parse` would accept them.
    if sport.len() > 1 && sport.starts_with('0') {
        return Err(ProxyError::Malformed("v1 port"));
    }
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyError::Malformed("v1 port"))?;
    Ok(ProxiedPeer::Client(SocketAddr::new(ip, port)))
}

/// Parses a v2 header from its version/command byte, family byte and address block.
pub fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<ProxiedPeer, ProxyError> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(ProxiedPeer::Local),
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    let transport = family & 0x0f;
    // Only stream transports carry SMTP; UNSPEC addresses are ignored like LOCAL.
    match (family >> 4, transport) {
        (0, _) => Ok(ProxiedPeer::Local),
        (1, 1) => {
            let b = body
                .get(..12)
                .ok_or(ProxyError::Malformed("v2 IPv4 block short"))?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(ProxiedPeer::Client(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        (2, 1) => {
            let b = body
                .get(..36)
                .ok_or(ProxyError::Malformed("v2 IPv6 block short"))?;
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(ProxiedPeer::Client(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                port,
            )))
        }
        (3, _) => Ok(ProxiedPeer::Local),
        _ => Err(ProxyError::Malformed("v2 family or transport")),
    }
}

/// Builds a v2 PROXY header (for tests and tools).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<ProxiedPeer, ProxyError>, Vec<u8>) {
        let mut r = bytes;
        let h = read_header(&mut r).await;
        (h, r.to_vec())
    }

    #[tokio::test]
    async fn v1_and_v2_leave_the_rest_of_the_stream() {
        let (h, rest) = read(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n").await;
        assert_eq!(
            h,
            Ok(ProxiedPeer::Client("192.0.2.7:40000".parse().unwrap()))
        );
        assert_eq!(rest, b"EHLO x\r\n");
        let (h, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n").await;
        assert_eq!(
            h,
            Ok(ProxiedPeer::Client("[2001:db8::1]:1".parse().unwrap()))
        );
        let (h, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(h, Ok(ProxiedPeer::Local));
        let mut v2 = encode_v2(
            "198.51.100.9:5555".parse().unwrap(),
            "10.0.0.1:25".parse().unwrap(),
        );
        v2.extend_from_slice(b"QUIT\r\n");
        let (h, rest) = read(&v2).await;
        assert_eq!(
            h,
            Ok(ProxiedPeer::Client("198.51.100.9:5555".parse().unwrap()))
        );
        assert_eq!(rest, b"QUIT\r\n");
        let v2 = encode_v2(
            "[2001:db8::9]:1".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
        );
        let (h, _) = read(&v2).await;
        assert_eq!(
            h,
            Ok(ProxiedPeer::Client("[2001:db8::9]:1".parse().unwrap()))
        );
    }

    #[tokio::test]
    async fn bad_headers() {
        for bad in [
            &b"EHLO x\r\n"[..],
            b"PROXY TCP4 999.1.1.1 10.0.0.1 1 25\r\n",
            b"PROXY TCP4 1.1.1.1 10.0.0.1 01 25\r\n",
            b"PROXY TCP4 1.1.1.1 10.0.0.1 1 25 extra\r\n",
            b"PROXY TCP5 1.1.1.1 10.0.0.1 1 25\r\n",
            b"PROXY TCP4 1.1.1.1 10.0.0.1 1",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04abcd",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x00",
        ] {
            assert!(read(bad).await.0.is_err(), "{bad:?}");
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await.0,
            Err(ProxyError::Malformed(_))
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(read(&huge).await.0.is_err());
    }

    /// The synchronous parser finds the same header, of the length `read_header` takes off the
    /// stream, and reports every shorter prefix as incomplete.
    #[tokio::test]
    async fn parse_header_agrees_with_read_header() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n".to_vec();
        let v2 = encode_v2(
            "198.51.100.9:5555".parse().unwrap(),
            "10.0.0.1:25".parse().unwrap(),
        );
        for header in [v1, v2, b"PROXY UNKNOWN\r\n".to_vec()] {
            let mut stream = header.clone();
            stream.extend_from_slice(b"EHLO x\r\n");
            let (peer, n) = parse_header(&stream).unwrap();
            assert_eq!(n, header.len());
            let (read, rest) = read(&stream).await;
            assert_eq!(read, Ok(peer));
            assert_eq!(rest, b"EHLO x\r\n");
            for cut in 0..header.len() {
                assert_eq!(parse_header(&header[..cut]), Err(ProxyError::Eof), "{cut}");
            }
        }
        assert_eq!(parse_header(b"EHLO x\r\n"), Err(ProxyError::Missing));
    }

    #[test]
    fn detection() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(&V2_SIGNATURE));
        assert!(!looks_like_header(b"EHLO x\r\n"));
        assert!(!looks_like_header(b"\r\n"));
    }
}
