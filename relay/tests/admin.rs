//! The administration listener and `relay queue` through the binary: the CLI finds the listener
//! and its token from the config directory; every endpoint needs the token; the metrics port
//! serves none of it; a non-loopback administration address without a token is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::process::Command;

use common::*;

const TOKEN: &str = "s3cret-admin-token";

/// `relay queue --config <dir> <args...>`: (success, stdout, stderr).
fn queue(relay: &Relay, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(relay.path())
        .arg("queue")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`queue`], repeated while a delivery attempt holds the message (`409`).
fn queue_when_idle(relay: &Relay, args: &[&str]) -> (bool, String, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = queue(relay, args);
        if !r.1.contains("delivery attempt is running") || std::time::Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn send(relay: &Relay, to: &str) -> String {
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    let (code, text) = c.send_mail("sender@far.example", &[to], "Subject: q\r\n\r\nq");
    assert_eq!(code, 250, "{text}");
    text.trim_end().rsplit(' ').next().unwrap().to_string()
}

fn ids(list: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(list).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn queue_cli_against_a_running_relay_with_a_token() {
    let tmp_token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp_token.path(), "some-other-token\n").unwrap();
    // The token file lives in the config directory (as a mounted Secret key would); the relay
    // is restarted once it is there.
    let relay = {
        let r = Relay::start();
        std::fs::write(r.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
        let runtime = r.path().join("runtime.yaml");
        let text = std::fs::read_to_string(&runtime).unwrap().replace(
            "delivery:\n",
            "adminTokenFile: admin-token\ndelivery:\n  adminEndpoint: true\n",
        );
        write(&runtime, &text);
        let mut r = r;
        r.kill9();
        r.spawn();
        r
    };
    let a = send(&relay, "alice@example.test");
    let b = send(&relay, "script@example.test");

    let (ok, out, err) = queue(&relay, &["list"]);
    assert!(ok, "{out}{err}");
    let listed = ids(&out);
    assert!(listed.contains(&a) && listed.contains(&b), "{out}");

    let (ok, out, _) = queue(&relay, &["show", &a]);
    assert!(ok);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["recipients"][0]["address"], "alice@example.test");
    assert_eq!(shown["recipients"][0]["state"], "pending");

    let (ok, out, _) = queue_when_idle(&relay, &["retry", &a]);
    assert!(ok, "{out}");
    assert!(out.contains("scheduled"));

    let (ok, out, _) = queue_when_idle(&relay, &["delete", &a]);
    assert!(ok, "{out}");
    assert!(out.contains("deleted"));
    let (ok, out, _) = queue(&relay, &["show", &a]);
    assert!(!ok, "a deleted message is gone: {out}");

    let (ok, out, _) = queue_when_idle(&relay, &["bounce", &b]);
    assert!(ok, "{out}");
    assert!(out.contains("bounced"));
    let (_, out, _) = queue(&relay, &["list"]);
    let left = ids(&out);
    assert!(!left.contains(&a) && !left.contains(&b), "{out}");
    // The bounce produced a failure DSN to the sender, queued like any message.
    assert_eq!(left.len(), 1, "{out}");

    let (ok, _, _) = queue(&relay, &["show", "not-an-id"]);
    assert!(!ok);

    // Without the token, or with a wrong one: 401 and nothing done.
    let admin = format!("http://127.0.0.1:{}", relay.ports.admin);
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["queue", "--admin", &admin, "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wants a token"));
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["queue", "--admin", &admin, "--token-file"])
        .arg(tmp_token.path())
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a different token must not work");
    // The metrics port serves no administration.
    assert!(relay.http("/queue").starts_with("HTTP/1.1 404"));
    assert!(relay.log().contains("admin_unauthorized"));
}

#[test]
fn an_exposed_administration_address_needs_a_token() {
    let relay = Relay::start();
    let runtime = relay.path().join("runtime.yaml");
    let text = std::fs::read_to_string(&runtime)
        .unwrap()
        .replace(
            &format!("adminAddress: 127.0.0.1:{}", relay.ports.admin),
            &format!("adminAddress: 0.0.0.0:{}", relay.ports.admin),
        )
        .replace("delivery:\n", "delivery:\n  adminEndpoint: true\n");
    write(&runtime, &text);
    let mut relay = relay;
    relay.kill9();
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(relay.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("adminTokenFile"),
        "{err}"
    );
}
