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
