//! Message data on its way out of the spool: read from the spool file in blocks of
//! [`BLOCK`] bytes and dot-stuffed block by block (RFC 5321 §4.5.2), so that sending a message
//! of any size needs a fixed amount of memory (one read block and one stuffed block, at most
//! twice its size), and never a copy of the message. Also the bounded readers DSNs and the
//! loop check use: the header block, and a prefix of at most a given size.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from the spool file per step, and the most written to the socket per write.
pub const BLOCK: usize = 64 * 1024;

/// Incremental RFC 5321 §4.5.2 transparency: a `.` that starts a line gets a second `.`, the
/// data ends with CRLF (a final bare LF becomes CRLF, anything else gets CRLF appended), and
/// the terminating `.` CRLF follows. A line start split across two blocks is handled because
/// the state carries over; a bare LF at the end of a block is held back until the next byte
/// shows whether it was the last one.
#[derive(Debug)]
pub struct DotStuffer {
    /// The next byte starts a line (after any LF, bare or not, as receivers that treat a bare LF
    /// as a line end must see a stuffed dot too).
    line_start: bool,
    /// A bare LF (not after CR) was the last byte and is not written yet.
    held_lf: bool,
    /// The last byte of the data so far.
    last: Option<u8>,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            held_lf: false,
            last: None,
        }
    }
}

impl DotStuffer {
    /// Appends the stuffed form of `input` (the next bytes of the data) to `out`. `out` grows
    /// by at most `2 * input.len() + 1` bytes.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while let Some(&first) = rest.first() {
            if self.held_lf {
                out.push(b'\n');
                self.held_lf = false;
            }
            if self.line_start && first == b'.' {
                out.push(b'.');
            }
            self.line_start = false;
            match rest.iter().position(|b| *b == b'\n') {
                None => {
                    out.extend_from_slice(rest);
                    self.last = rest.last().copied();
                    return;
                }
                Some(i) => {
                    out.extend_from_slice(&rest[..i]);
                    let before = if i > 0 { Some(rest[i - 1]) } else { self.last };
                    if before == Some(b'\r') {
                        out.push(b'\n');
                    } else {
                        self.held_lf = true;
                    }
                    self.last = Some(b'\n');
                    self.line_start = true;
                    rest = &rest[i + 1..];
                }
            }
        }
    }

    /// Ends the data: the final CRLF rule and the terminating `.` CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.held_lf {
            out.extend_from_slice(b"\r\n");
            self.held_lf = false;
        } else if self.last.is_some_and(|b| b != b'\n') {
            // A last LF that is not held was preceded by CR: the data already ends with CRLF.
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The header block of a message read from `src`: everything up to and including the CRLF
/// before the first empty line, at most `max` bytes (cut after the last complete line within
/// `max`). `truncated` tells whether the headers were longer.
pub async fn read_headers<R: AsyncRead + Unpin>(
    src: &mut R,
    len: u64,
    max: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(max.min(16 * 1024) + 4);
    // One byte more than the bound shows whether the header block ends within it.
    let want = (max as u64 + 2).min(len) as usize;
    let mut taken = src.take(want as u64);
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        if let Some(end) = header_end(&buf) {
            buf.truncate(end);
            return Ok((buf, false));
        }
        let n = taken.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if let Some(end) = header_end(&buf) {
        buf.truncate(end);
        return Ok((buf, false));
    }
    // No empty line: a message that is all headers (it ends within the bound), or headers
    // longer than the bound (cut at the last line end).
    if buf.len() as u64 >= len && buf.len() <= max {
        return Ok((buf, false));
    }
    buf.truncate(max.min(buf.len()));
    let cut = buf
        .windows(2)
        .rposition(|w| w == b"\r\n")
        .map(|p| p + 2)
        .unwrap_or(0);
    buf.truncate(cut);
    Ok((buf, true))
}

/// Position just after the CRLF that ends the last header line (before the empty line).
fn header_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(0);
    }
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2)
}

/// Reads the whole data of `len` bytes from `src`, which the caller has bounded (`len <= max`).
pub async fn read_all<R: AsyncRead + Unpin>(src: &mut R, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len as usize);
    src.take(len).read_to_end(&mut buf).await?;
    if (buf.len() as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("message data ends after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// Number of `Received:` header fields in a header block.
pub fn count_received(headers: &[u8]) -> usize {
    headers
        .split(|b| *b == b'\n')
        .filter(|line| line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole-buffer definition the streaming form must equal, kept as the reference.
    fn reference(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at_line_start = true;
        for &b in data {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        if !data.is_empty() && !data.ends_with(b"\r\n") {
            if data.ends_with(b"\n") {
                out.pop();
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    fn stuffed(parts: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        for p in parts {
            let before = out.len();
            s.push(p, &mut out);
            assert!(out.len() - before <= 2 * p.len() + 1);
        }
        s.finish(&mut out);
        out
    }

    const SAMPLES: &[&[u8]] = &[
        b"",
        b".",
        b"..",
        b"x",
        b"\r\n",
        b"\n",
        b"\r",
        b".\r\n",
        b"a\r\n.\r\n",
        b"a\r\n.b\r\n..c\r\n",
        b".a\r\nb\r\n..c\r\n",
        b"a\n.\nb\n",
        b"a\n.\r\n",
        b"a\r.\r\n",
        b"a\r\n\r\n.\r\n.",
        b"end with bare lf\n",
        b"end with cr\r",
        b"end with dot\r\n.",
        b"\r\n.\r\n.\r\n..\r\n...",
        b"Subject: x\r\n\r\nline\r\n.hidden\r\n\n.\n\r\n.",
    ];

    #[test]
    fn matches_the_reference_for_every_split_offset() {
        for data in SAMPLES {
            let want = reference(data);
            assert_eq!(stuffed(&[data]), want, "whole {data:?}");
            for i in 0..=data.len() {
                assert_eq!(
                    stuffed(&[&data[..i], &data[i..]]),
                    want,
                    "{data:?} split at {i}"
                );
                for j in i..=data.len() {
                    assert_eq!(
                        stuffed(&[&data[..i], &data[i..j], &data[j..]]),
                        want,
                        "{data:?} split at {i} and {j}"
                    );
                }
            }
            let bytes: Vec<&[u8]> = data.chunks(1).collect();
            assert_eq!(stuffed(&bytes), want, "{data:?} byte by byte");
        }
    }

    #[test]
    fn known_outputs() {
        assert_eq!(
            stuffed(&[b".a\r\nb\r\n..c\r\n"]),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(stuffed(&[b"x"]), b"x\r\n.\r\n");
        assert_eq!(stuffed(&[b""]), b".\r\n");
        assert_eq!(stuffed(&[b"a\r\n", b".", b"\r\n"]), b"a\r\n..\r\n.\r\n");
        assert_eq!(stuffed(&[b"a\n"]), b"a\r\n.\r\n");
    }

    #[tokio::test]
    async fn headers_are_bounded_and_cut_at_a_line_end() {
        let msg = b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: body\r\n";
        let (h, cut) = read_headers(&mut &msg[..], msg.len() as u64, 1000)
            .await
            .unwrap();
        assert_eq!(h, b"Received: a\r\nreceived: b\r\nSubject: x\r\n");
        assert!(!cut);
        assert_eq!(count_received(&h), 2);
        let (h, cut) = read_headers(&mut &msg[..], msg.len() as u64, 20)
            .await
            .unwrap();
        assert_eq!(h, b"Received: a\r\n");
        assert!(cut);
        let only = b"Subject: x\r\n";
        let (h, cut) = read_headers(&mut &only[..], only.len() as u64, 100)
            .await
            .unwrap();
        assert_eq!((h.as_slice(), cut), (&only[..], false));
        let none = b"\r\nbody\r\n";
        let (h, cut) = read_headers(&mut &none[..], none.len() as u64, 100)
            .await
            .unwrap();
        assert!(h.is_empty() && !cut);
    }
}
