//! Throughput of the sans-IO protocol core: a complete pipelined transaction (EHLO, MAIL, RCPT,
//! DATA with a dot-stuffed body, QUIT) parsed and answered, no sockets or storage involved.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mailrelay_crds::config::{AuthMode, Mechanism, Protocol};
use mailrelay_relay::security::Refusal;
use mailrelay_relay::smtp::{Event, Policy, Session, SessionConfig, SessionFacts};

struct AcceptAll;

impl Policy for AcceptAll {
    fn check_sender(&self, _: &SessionFacts, _: &str) -> Result<(), Refusal> {
        Ok(())
    }
    fn check_recipient(&self, _: &SessionFacts, _: &str, _: &str) -> Result<(), Refusal> {
        Ok(())
    }
}

fn session() -> Session {
    let cfg = SessionConfig {
        hostname: "relay.example.test".into(),
        protocol: Protocol::Smtp,
        starttls: true,
        max_message_size: 50 * 1024 * 1024,
        max_recipients: Some(100),
        max_failed_commands: Some(20),
        max_received_headers: Some(30),
        auth_mode: AuthMode::Optional,
        mechanisms: vec![Mechanism::Plain, Mechanism::ScramSha256],
        allow_plaintext_without_tls: false,
    };
    let facts = SessionFacts {
        service: "smtp".into(),
        client_ip: "192.0.2.1".parse().expect("ip"),
        helo: None,
        esmtp: false,
        tls: None,
        authenticated_as: None,
    };
    Session::new(cfg, facts, Box::new(AcceptAll))
}

fn transaction(body_lines: usize) -> Vec<u8> {
    let mut t = String::from(
        "EHLO client.example\r\nMAIL FROM:<sender@example.org> SIZE=1000 BODY=8BITMIME\r\n\
         RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n\
         Received: from x by y; Tue, 1 Jul 2003 10:52:37 +0000\r\nSubject: bench\r\n\
         From: sender@example.org\r\nTo: a@example.test\r\n\r\n",
    );
    for i in 0..body_lines {
        if i % 10 == 0 {
            t.push_str(".a dot-stuffed line that must be unstuffed by the core\r\n");
        } else {
            t.push_str(
                "The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
            );
        }
    }
    t.push_str(".\r\nQUIT\r\n");
    t.into_bytes()
}

fn run(input: &[u8], chunk: usize) -> usize {
    let mut s = session();
    s.greeting();
    let mut out = 0;
    for part in input.chunks(chunk) {
        s.feed(part);
        while let Some(e) = s.poll_event() {
            if let Event::Message(tx) = e {
                out += tx.data.len();
                s.message_stored(Ok("id".into()));
            }
        }
        out += s.take_output().len();
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("smtp_transaction");
    for lines in [10usize, 1000] {
        let input = transaction(lines);
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_with_input(BenchmarkId::new("one_read", lines), &input, |b, i| {
            b.iter(|| run(i, usize::MAX))
        });
        g.bench_with_input(BenchmarkId::new("4k_reads", lines), &input, |b, i| {
            b.iter(|| run(i, 4096))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
