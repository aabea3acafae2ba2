//! The seed corpora: small, realistic inputs for each target, built here with the relay's own
//! encoders (PROXY v2, spool records) so that they stay what the relay really sees. They are
//! committed under `corpus/<target>/`; `tests/replay.rs` checks the committed files match
//! this list and regenerates them on request.

use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use mailrelay_crds::config::Mechanism;
use mailrelay_relay::proxy::{encode_v2, V2_SIGNATURE};
use mailrelay_spool::fuzzing::{encode_envelope_record, encode_log_segment, encode_message_header};
use mailrelay_spool::{Body, DsnNotify, DsnRet, Envelope, MessageId, Recipient, RecipientStatus};

use crate::{auth, handoff, ntlm, session, spool};

/// One seed file: target, file name, content.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: &'static str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name,
        bytes,
    }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

const ALL: u8 = 7;
const BYTEWISE: u8 = 0;
const PIECES_16: u8 = 4;

pub fn all() -> Vec<Seed> {
    let mut v = session_seeds();
    v.extend(auth_seeds());
    v.extend(proxy_seeds());
    v.extend(spool_seeds());
    v.extend(handoff_seeds());
    v.extend(ntlm_seeds());
    v
}

fn session_seeds() -> Vec<Seed> {
    use session::*;
    let pipelined = "EHLO client.example.test\r\n\
        MAIL FROM:<alice@example.test> SIZE=160 BODY=8BITMIME RET=HDRS ENVID=q+2B1\r\n\
        RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net\r\n\
        RCPT TO:<carol@unknown.test>\r\n\
        RCPT TO:<dave@denied.test>\r\n\
        DATA\r\n\
        Received: from relay.example.test\r\n\
        Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\
        \r\n\
        ..a line that starts with a dot\r\n\
        caf\u{e9}\r\n\
        .\r\n\
        RSET\r\nNOOP\r\nVRFY postmaster\r\nHELP\r\nEXPN list\r\nQUIT\r\n";
    let auth_plain = format!(
        "EHLO submit.example.test\r\n\
         AUTH PLAIN {}\r\n\
         MAIL FROM:<user@example.test>\r\n\
         RCPT TO:<someone@elsewhere.test>\r\n\
         DATA\r\nSubject: submitted\r\n\r\nhello\r\n.\r\nQUIT\r\n",
        b64(b"\0user@example.test\0secret")
    );
    let starttls = format!("EHLO client.example.test\r\nSTARTTLS\r\n{auth_plain}");
    let auth_login = format!(
        "EHLO c.example.test\r\nAUTH LOGIN\r\n{}\r\n{}\r\n\
         MAIL FROM:<user@example.test>\r\nRCPT TO:<x@far.test>\r\nBDAT 5 LAST\r\nhi\r\n\r\nQUIT\r\n",
        b64(b"user@example.test"),
        b64(b"secret")
    );
    let scram = format!(
        "EHLO c.example.test\r\nAUTH SCRAM-SHA-256 {}\r\n{}\r\n\r\n\
         MAIL FROM:<user@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        b64(b"n,,n=user@example.test,r=rOprNGfwEbeRWgbNEkqO"),
        b64(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    );
    let bdat = "EHLO c.example.test\r\n\
        MAIL FROM:<a@example.test> BODY=8BITMIME\r\n\
        RCPT TO:<b@example.test>\r\n\
        BDAT 18\r\nSubject: chunked\r\n\
        BDAT 0\r\n\
        BDAT 22 LAST\r\n\r\nfirst\r\nsecond line\r\n\
        MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nBDAT 3 LAST\r\nabcQUIT\r\n";
    let checks = "HELO old.example.test\r\n\
        MAIL FROM:<a@blocked.test>\r\n\
        MAIL FROM:<a@example.test>\r\n\
        RCPT TO:<u1@unknown.test>\r\nRCPT TO:<u2@unknown.test>\r\n\
        RCPT TO:<r1@example.test>\r\nRCPT TO:<r2@example.test>\r\nRCPT TO:<r3@example.test>\r\n\
        RCPT TO:<r4@example.test>\r\nRCPT TO:<r5@example.test>\r\nRCPT TO:<r6@example.test>\r\n\
        DATA\r\n.\r\nMAIL FROM:<a@example.test> SIZE=99999999\r\nQUIT\r\n";
    let long_line = format!(
        "Subject: long\r\n\r\n{}\r\nshort\r\n.\r\nNOOP\r\n",
        "x".repeat(1100)
    );
    vec![
        seed(
            "session",
            "pipelined-session",
            encode(0, ALL, &[], pipelined.as_bytes()),
        ),
        seed(
            "session",
            "pipelined-session-bytewise",
            encode(0, BYTEWISE, &[], pipelined.as_bytes()),
        ),
        seed(
            "session",
            "starttls-auth-plain",
            encode(STARTTLS | AUTH_REQUIRED, PIECES_16, &[], starttls.as_bytes()),
        ),
        seed(
            "session",
            "smtps-auth-plain",
            encode(SMTPS | AUTH_REQUIRED, ALL, &[], auth_plain.as_bytes()),
        ),
        seed(
            "session",
            "auth-login-cleartext-bdat",
            // AuthStart: challenge; username: challenge; password: success.
            encode(PLAINTEXT_AUTH, 5, &[0, 5, 0], auth_login.as_bytes()),
        ),
        seed(
            "session",
            "auth-scram-sha-256",
            // Challenge, challenge (server-final), success.
            encode(SMTPS | MAIL_CHECK, 3, &[5, 5, 0], scram.as_bytes()),
        ),
        seed(
            "session",
            "bdat-chunks",
            encode(0, 2, &[], bdat.as_bytes()),
        ),
        seed(
            "session",
            "mail-checks-and-refusals",
            encode(MAIL_CHECK, 6, &[2, 0, 0, 3], checks.as_bytes()),
        ),
        seed(
            "session",
            "data-dot-stuffing",
            encode(
                MODE_DATA,
                1,
                &[],
                b"Subject: dots\r\n\r\n..\r\n...two\r\n. \r\n.\r\nQUIT\r\n",
            ),
        ),
        seed(
            "session",
            "data-smuggling-lf-dot-crlf",
            encode(
                MODE_DATA,
                ALL,
                &[],
                b"Subject: a\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nx\r\n.\r\n",
            ),
        ),
        seed(
            "session",
            "data-long-line",
            encode(MODE_DATA, 6, &[], long_line.as_bytes()),
        ),
        seed(
            "session",
            "bdat-body",
            encode(
                MODE_BDAT,
                PIECES_16,
                &[],
                b"Received: from a\r\nSubject: chunked body\r\n\r\nline one\r\nlast line without CRLF",
            ),
        ),
    ]
}

fn auth_seeds() -> Vec<Seed> {
    use auth::encode;
    let plain = b"\0user@example.test\0secret";
    vec![
        seed(
            "auth",
            "plain-initial",
            encode(Mechanism::Plain, true, &[plain]),
        ),
        seed(
            "auth",
            "plain-after-challenge-wrong-password",
            encode(
                Mechanism::Plain,
                false,
                &[b"user@example.test\0user@example.test\0wrong"],
            ),
        ),
        seed(
            "auth",
            "plain-mfa-app-password",
            encode(
                Mechanism::Plain,
                true,
                &[b"\0mfa@example.test\0app-password"],
            ),
        ),
        seed(
            "auth",
            "login",
            encode(Mechanism::Login, false, &[b"user@example.test", b"secret"]),
        ),
        seed(
            "auth",
            "scram-sha-256",
            encode(
                Mechanism::ScramSha256,
                true,
                &[
                    b"n,,n=user@example.test,r=fyko+d2lbbFgONRv9qkxdawL",
                    b"c=biws,r=@NONCE@,p=@PROOF@",
                    b"",
                ],
            ),
        ),
        seed(
            "auth",
            "scram-sha-256-malformed-final",
            // The audit's input: a valid client-first, then a client-final of `x`.
            encode(
                Mechanism::ScramSha256,
                true,
                &[b"n,,n=user@example.test,r=abcdefghijklmnop", b"x"],
            ),
        ),
        seed(
            "auth",
            "cram-md5",
            encode(Mechanism::CramMd5, false, &[b"user@example.test @DIGEST@"]),
        ),
    ]
}

fn proxy_seeds() -> Vec<Seed> {
    let with_smtp = |mut h: Vec<u8>| {
        h.extend_from_slice(b"EHLO client.example.test\r\n");
        h
    };
    let mut tlv = V2_SIGNATURE.to_vec();
    tlv.extend_from_slice(&[0x21, 0x11, 0x00, 0x13]);
    tlv.extend_from_slice(&[192, 0, 2, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x00, 0x19]);
    // PP2_TYPE_AUTHORITY "mx.test"
    tlv.extend_from_slice(&[0x02, 0x00, 0x04, b'm', b'x', b'.', b't']);
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    vec![
        seed(
            "proxy",
            "v1-tcp4",
            with_smtp(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n".to_vec()),
        ),
        seed(
            "proxy",
            "v1-tcp6",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 587\r\n".to_vec(),
        ),
        seed("proxy", "v1-unknown", b"PROXY UNKNOWN\r\n".to_vec()),
        seed(
            "proxy",
            "v2-tcp4",
            with_smtp(encode_v2(
                "198.51.100.9:5555".parse().expect("address"),
                "10.0.0.1:25".parse().expect("address"),
            )),
        ),
        seed(
            "proxy",
            "v2-tcp6",
            encode_v2(
                "[2001:db8::9]:1".parse().expect("address"),
                "[2001:db8::1]:25".parse().expect("address"),
            ),
        ),
        seed("proxy", "v2-local", with_smtp(local)),
        seed("proxy", "v2-tcp4-tlv", with_smtp(tlv)),
    ]
}

/// An envelope as the relay writes it for a message in delivery.
fn envelope() -> Envelope {
    let mut e = Envelope::new(
        "alice@example.com",
        ["bob@example.net", "carol@example.org"],
    );
    e.received_at = UNIX_EPOCH + Duration::from_secs(1_764_500_000);
    e.client_ip = Some("2001:db8::1".parse().expect("address"));
    e.client_helo = Some("client.example.com".into());
    e.authenticated_as = Some("alice@example.com".into());
    e.service = "submission".into();
    e.size = 1234;
    e.body = Body::EightBitMime;
    e.smtputf8 = true;
    e.dsn_ret = Some(DsnRet::Headers);
    e.envid = Some("QQ314159".into());
    e.next_attempt_at = Some(UNIX_EPOCH + Duration::from_secs(1_764_500_300));
    e.recipients[0].status = RecipientStatus::Failed {
        code: 550,
        enhanced: Some("5.1.1".into()),
        text: "no such user".into(),
    };
    e.recipients[0].attempts = 1;
    e.recipients[1].notify = vec![DsnNotify::Failure, DsnNotify::Delay];
    e.recipients[1].orcpt = Some("rfc822;carol@example.org".into());
    e.recipients[1].last_error = Some("451 4.7.1 greylisted".into());
    e.recipients.push(Recipient::new("dave@example.com"));
    e.recipients[2].status = RecipientStatus::Delivered {
        code: 250,
        enhanced: Some("2.0.0".into()),
        text: "Ok: queued as 4F2A".into(),
    };
    e
}

fn spool_seeds() -> Vec<Seed> {
    let data = b"Received: from client.example.com\r\nSubject: hi\r\n\r\nhello\r\n";
    let record = encode_envelope_record(&envelope(), data.len() as u64);
    let (header, _) =
        encode_message_header(record.len(), data.len() as u64).expect("header encodes");
    let mut file = header.to_vec();
    file.extend_from_slice(&record);
    file.extend_from_slice(data);
    let legacy = br#"{"version":1,"dataLen":3,"envelope":{"sender":"","recipients":[{"address":"x@y"}],"addedLater":true}}"#;
    let segment = encode_log_segment(
        7,
        &[
            (MessageId::from_u128(1), record.clone(), data.to_vec()),
            (MessageId::from_u128(2), record.clone(), Vec::new()),
        ],
    );
    vec![
        seed(
            "spool",
            "log-segment",
            spool::encode(spool::LOG_SEGMENT, &segment),
        ),
        seed(
            "spool",
            "envelope-record",
            spool::encode(spool::RECORD, &record),
        ),
        seed(
            "spool",
            "envelope-record-minimal",
            spool::encode(spool::RECORD, legacy),
        ),
        seed(
            "spool",
            "message-file",
            spool::encode(spool::MESSAGE_FILE, &file),
        ),
        seed(
            "spool",
            "message-header",
            spool::encode(spool::HEADER, &header),
        ),
        seed(
            "spool",
            "message-id",
            spool::encode(
                spool::MESSAGE_ID,
                MessageId::from_u128(0x0193_8c2e_5a1b_7000_8000_0000_0000_002a)
                    .to_string()
                    .as_bytes(),
            ),
        ),
    ]
}

/// Lines as `relay drain` writes them to a hand-off listener, and some it must refuse.
fn handoff_seeds() -> Vec<Seed> {
    use handoff::{encode, Values, DSN, NEXT, ORIGIN, SENDER_SHIFT, WARNED};
    let values = Values {
        received: 1_764_500_000,
        next: 1_764_500_300,
        attempts: 3,
        flags: NEXT | WARNED | ORIGIN | DSN | 1 << SENDER_SHIFT,
        origin: b"spool-relay-2/0193-8c2e+5a1b=7000",
        dsn: b"rfc822;carol@example.org",
    };
    let none = Values {
        received: 0,
        next: 0,
        attempts: 0,
        flags: 2 << SENDER_SHIFT,
        origin: b"",
        dsn: b"",
    };
    vec![
        seed(
            "handoff",
            "mail-all-parameters",
            encode(
                "MAIL FROM:<alice@example.com> SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=QQ314159 \
                 XRECEIVED=1764500000 XNEXT=1764500300 XWARNED=1 XORIGIN=spool-relay-2/0193+2B5a1b+3D7",
                &values,
            ),
        ),
        seed(
            "handoff",
            "mail-null-sender",
            encode("mail from:<> xreceived=1700000000", &none),
        ),
        seed(
            "handoff",
            "mail-quoted-local-part",
            encode(
                "MAIL FROM:<\"a b\"@example.test>  SMTPUTF8 XRECEIVED=0 XWARNED=0",
                &none,
            ),
        ),
        seed(
            "handoff",
            "rcpt-attempts",
            encode(
                "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net XATTEMPTS=4",
                &values,
            ),
        ),
        seed(
            "handoff",
            "rcpt-bad-attempts",
            encode("RCPT TO:<c@d.test> XATTEMPTS=-1", &none),
        ),
        seed(
            "handoff",
            "mail-parameter-without-value",
            encode("MAIL FROM:<a@b.test> XWARNED", &none),
        ),
    ]
}

fn ntlm_seeds() -> Vec<Seed> {
    use ntlm::{encode, BUILD, MIC, NO_INITIAL, OWN_NEGOTIATE, UNICODE, V1};
    let own = OWN_NEGOTIATE | UNICODE | BUILD;
    vec![
        seed(
            "ntlm",
            "v2-mic-netbios-domain",
            encode(NO_INITIAL | own | MIC, &[b"alerts\0EXAMPLE\0alerts-pass"]),
        ),
        seed(
            "ntlm",
            "v2-oem-upn",
            encode(OWN_NEGOTIATE | BUILD, &[b"ops@other.test\0\0ops-other"]),
        ),
        seed(
            "ntlm",
            "v1-ess-backslash-user",
            encode(own | V1, &[b"EXAMPLE\\alerts\0\0alerts-pass"]),
        ),
        seed(
            "ntlm",
            "dns-form-domain",
            encode(own | MIC, &[b"alerts\0EXAMPLE.TEST\0alerts-pass"]),
        ),
        seed(
            "ntlm",
            "ambiguous-bare-user",
            encode(own, &[b"ops\0\0ops-pass"]),
        ),
        seed(
            "ntlm",
            "two-factor",
            encode(own | MIC, &[b"mfa\0example\0mfa-pass"]),
        ),
        seed(
            "ntlm",
            "raw-messages",
            encode(
                0,
                &[
                    b"NTLMSSP\0\x01\0\0\0\x07\x82\x08\xa2\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
                    b"NTLMSSP\0\x03\0\0\0\x18\0\x18\0\x40\0\0\0\x18\0\x18\0\x58\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x05\x82\x88\xa0",
                ],
            ),
        ),
    ]
}
