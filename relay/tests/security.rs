//! Regression tests of the security audit, through the relay binary over real sockets: SMTP
//! smuggling, authentication before TLS, malformed SASL input, AUTH floods and large messages.

mod common;

use common::*;

/// The audit's reproduction: a client allowed to relay sends, in one write, a body line ending
/// in a bare LF, `.\r\n`, and a whole spoofed transaction. The relay must refuse the message,
/// close the connection, and store nothing.
#[test]
fn smtp_smuggling_closes_the_connection_and_stores_nothing() {
    let mut relay = Relay::start();
    for variant in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r"] {
        let mut c = relay.connect(relay.ports.smtp);
        assert_eq!(c.reply().0, 220);
        c.expect("EHLO client.test", 250);
        c.starttls();
        c.expect("EHLO client.test", 250);
        assert_eq!(c.auth_plain(USER, PASSWORD).0, 235);
        c.expect(&format!("MAIL FROM:<{USER}>"), 250);
        c.expect("RCPT TO:<someone@far.example>", 250);
        c.expect("DATA", 354);
        c.send_raw(
            format!(
                "Subject: real\r\n\r\nhello{variant}MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nx\r\n.\r\n"
            )
            .as_bytes(),
        );
        let (code, text) = c.reply();
        assert_eq!(code, 554, "{variant:?}: {text}");
        assert!(text.starts_with("554 5.6.0"), "{variant:?}: {text}");
        // The connection is closed: nothing behind the bad line was executed.
        assert_eq!(c.reply(), (0, String::new()), "{variant:?}");
    }
    relay.kill9();
    assert!(spool_messages(&relay.path().join("spool")).is_empty());
}

/// Before TLS no mechanism is advertised and every AUTH (SCRAM included) is refused with
/// `530 5.7.0`, on port-25-style and submission services alike.
#[test]
fn no_authentication_before_tls() {
    let relay = Relay::start();
    for port in [relay.ports.smtp, relay.ports.submission] {
        let mut c = relay.connect(port);
        assert_eq!(c.reply().0, 220);
        let ehlo = c.expect("EHLO client.test", 250);
        assert!(!ehlo.contains("AUTH"), "AUTH advertised before TLS: {ehlo}");
        let (code, text) = c.auth_scram(USER, PASSWORD);
        assert_eq!(code, 530, "{text}");
        assert!(text.starts_with("530 5.7.0 Must issue a STARTTLS command first"));
        for mech in ["PLAIN", "LOGIN", "CRAM-MD5"] {
            let (code, _) = c.cmd(&format!("AUTH {mech}"));
            assert_eq!(code, 530, "{mech}");
        }
        // After STARTTLS the same login works.
        c.starttls();
        let ehlo = c.expect("EHLO client.test", 250);
        assert!(ehlo.contains("AUTH PLAIN LOGIN SCRAM-SHA-256"), "{ehlo}");
        assert_eq!(c.auth_scram(USER, PASSWORD).0, 235);
    }
}
