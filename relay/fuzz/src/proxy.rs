//! Target `proxy`: the PROXY protocol v1/v2 header parser the relay runs on connections from
//! trusted proxies. Invariants:
//!
//! * [`parse_header`] and the relay's reader ([`read_header`], over an in-memory stream) agree
//!   on every input: the same peer or the same error, and the reader leaves exactly the bytes
//!   after the header in the stream (the client's first SMTP bytes are never swallowed);
//! * a header is found in any stream that starts with it, and no shorter prefix is a header
//!   (every prefix is reported as incomplete);
//! * whatever parses as a header is recognised by [`looks_like_header`] (which guards the
//!   listeners of untrusted peers);
//! * [`encode_v2`] of addresses taken from the input parses back to the source address.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use mailrelay_relay::proxy::{
    encode_v2, looks_like_header, parse_header, read_header, ProxiedPeer, ProxyError,
};

/// Runs `read_header` over `data` as a stream; returns its answer and the unread rest.
fn read_stream(data: &[u8]) -> (Result<ProxiedPeer, ProxyError>, &[u8]) {
    let mut stream = data;
    let result = {
        let fut = pin!(read_header(&mut stream));
        let mut cx = Context::from_waker(Waker::noop());
        // An in-memory reader is always ready, so the future completes on its first poll.
        match fut.poll(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("read_header pending on an in-memory stream"),
        }
    };
    (result, stream)
}

fn addr(bytes: &[u8], v6: bool) -> SocketAddr {
    let port = u16::from_be_bytes([bytes[0], bytes[1]]);
    let ip = if v6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[2..18]);
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[2], bytes[3], bytes[4], bytes[5]))
    };
    SocketAddr::new(ip, port)
}

pub fn fuzz_one(data: &[u8]) {
    let parsed = parse_header(data);
    let (read, rest) = read_stream(data);
    match &parsed {
        Ok((peer, n)) => {
            assert!(*n <= data.len());
            assert_eq!(read.as_ref(), Ok(peer), "reader and parser disagree");
            assert_eq!(
                rest,
                &data[*n..],
                "the reader took other bytes than the header"
            );
            assert!(looks_like_header(data), "a valid header is not recognised");
            assert_eq!(
                parse_header(&data[..*n]).as_ref(),
                Ok(&(peer.clone(), *n)),
                "the header alone parses differently"
            );
            for cut in 0..*n {
                assert_eq!(
                    parse_header(&data[..cut]),
                    Err(ProxyError::Eof),
                    "a {cut}-byte prefix of a {n}-byte header is not incomplete"
                );
            }
        }
        Err(e) => {
            assert_eq!(read.as_ref().err(), Some(e), "reader and parser disagree");
        }
    }

    if data.len() >= 37 {
        let src = addr(&data[1..19], data[0] & 1 != 0);
        let dst = addr(&data[19..37], data[0] & 2 != 0);
        let header = encode_v2(src, dst);
        let expect = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => src,
            // Mixed families are sent as IPv6, IPv4 addresses mapped.
            _ => match src.ip() {
                IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), src.port()),
                IpAddr::V6(_) => src,
            },
        };
        assert_eq!(
            parse_header(&header),
            Ok((ProxiedPeer::Client(expect), header.len())),
            "encode_v2 does not round-trip"
        );
    }
}
