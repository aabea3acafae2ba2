//! `kubectl mailrelay logs --security`: owns the selection of the relay's security events from
//! the relay pods' logs. kubectl streams the logs of every relay pod (`kubectl logs -l
//! <relay selector> --prefix`); the plugin keeps the events of the `security` log target (every
//! refusal, limit hit, failed and successful login; relay/src/security.rs) and prints them one
//! per line with their pod.
//!
//! In a pod the relay logs JSON lines (stderr is not a terminal), so the target is the
//! `target` field. With `logging.securityLog: stderr` each security event is written twice (the
//! main log and the security stream); the second copy is dropped.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use clap::Args;
use serde_json::{Map, Value};

use super::pods::{self, RELAY_CONTAINER};
use super::{Output, Target, EXIT_ERROR};

/// The relay's log target for security events.
pub const SECURITY_TARGET: &str = "security";

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Only the security events (the only log this subcommand shows for now; required so that
    /// a later general log view does not change what this prints).
    #[arg(long, required = true)]
    pub security: bool,
    /// Keep streaming new events.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only events newer than this (`10m`, `2h`), as `kubectl logs --since`.
    #[arg(long)]
    pub since: Option<String>,
    /// Log lines per pod to look through (`-1`: all), as `kubectl logs --tail`; the security
    /// events are a part of them.
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    pub tail: String,
    /// `table`: one readable line per event; `json`: the relay's JSON with a `pod` field.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
}

/// `kubectl logs` of every relay pod of `instance`, each line prefixed with its pod.
pub fn logs_argv(
    flags: &[String],
    namespace: &str,
    instance: &str,
    args: &LogsArgs,
    pod_count: usize,
) -> Vec<String> {
    let mut argv = vec!["logs".to_string()];
    argv.extend(flags.iter().cloned());
    argv.extend([
        "-n".to_string(),
        namespace.to_string(),
        "-l".into(),
        pods::selector(instance),
        "-c".into(),
        RELAY_CONTAINER.into(),
        "--prefix".into(),
        format!("--tail={}", args.tail),
        // kubectl refuses to follow more pods than this (default 5).
        format!("--max-log-requests={}", pod_count.max(5)),
    ]);
    if let Some(s) = &args.since {
        argv.push(format!("--since={s}"));
    }
    if args.follow {
        argv.push("--follow".into());
    }
    argv
}

/// (pod, rest of the line) of a `kubectl logs --prefix` line: `[pod/<name>/<container>] …`.
pub fn split_prefix(line: &str) -> (Option<&str>, &str) {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((prefix, text)) = rest.split_once("] ") {
            let pod = prefix
                .strip_prefix("pod/")
                .and_then(|p| p.split('/').next())
                .unwrap_or(prefix);
            return (Some(pod), text);
        }
    }
    (None, line)
}

/// The security event of a log line, if it is one.
pub fn security_event(text: &str) -> Option<Map<String, Value>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let obj = v.as_object()?;
    (obj.get("target").and_then(Value::as_str) == Some(SECURITY_TARGET)).then(|| obj.clone())
}

/// `<time> <pod> <LEVEL> <kind> <message> key=value…`.
pub fn render_event(pod: &str, e: &Map<String, Value>) -> String {
    let s = |k: &str| match e.get(k) {
        Some(Value::String(v)) => v.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let mut line = format!("{} {} {:<5} {}", s("timestamp"), pod, s("level"), s("kind"));
    let message = s("message");
    if !message.is_empty() {
        line.push_str(&format!(" {message:?}"));
    }
    for (k, v) in e {
        if ["timestamp", "level", "kind", "message", "target"].contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::String(t) if t.contains(char::is_whitespace) => {
                line.push_str(&format!(" {k}={t:?}"))
            }
            Value::String(t) => line.push_str(&format!(" {k}={t}")),
            other => line.push_str(&format!(" {k}={other}")),
        }
    }
    line
}

/// Filters `kubectl logs --prefix` output down to the security events, writing each in the
/// chosen format. Stops at the end of `input` (or when `out` goes away, as with `| head`).
pub fn filter(input: impl BufRead, mut out: impl Write, output: Output) -> std::io::Result<()> {
    // The last event per pod, without its timestamp, to drop the duplicate of securityLog: stderr.
    let mut last: std::collections::HashMap<String, Map<String, Value>> = Default::default();
    for line in input.lines() {
        let line = line?;
        let (pod, text) = split_prefix(&line);
        let Some(event) = security_event(text) else {
            continue;
        };
        let pod = pod.unwrap_or("-").to_string();
        let mut key = event.clone();
        key.remove("timestamp");
        if last.get(&pod) == Some(&key) {
            continue;
        }
        last.insert(pod.clone(), key);
        let rendered = match output {
            Output::Table => render_event(&pod, &event),
            Output::Json => {
                let mut e = event;
                e.insert("pod".into(), Value::String(pod));
                Value::Object(e).to_string()
            }
        };
        if let Err(e) = writeln!(out, "{rendered}").and_then(|_| out.flush()) {
            return if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            };
        }
    }
    Ok(())
}

pub async fn run(target: &Target, args: &LogsArgs) -> anyhow::Result<i32> {
    let instance = target.instance().await?;
    let pods = pods::list(&target.client, &target.namespace, &instance).await?;
    if pods.is_empty() {
        anyhow::bail!("no relay pods with labels {}", pods::selector(&instance));
    }
    let argv = logs_argv(
        &target.kubectl_flags(),
        &target.namespace,
        &instance,
        args,
        pods.len(),
    );
    let mut child = Command::new("kubectl")
        .args(&argv)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running kubectl: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        anyhow::bail!("kubectl logs: no output pipe");
    };
    let output = args.output;
    let filtered = tokio::task::spawn_blocking(move || {
        filter(BufReader::new(stdout), std::io::stdout().lock(), output)
    })
    .await;
    let status = child.wait()?;
    match filtered {
        Ok(Ok(())) => {}
        Ok(Err(e)) => anyhow::bail!("reading kubectl logs: {e}"),
        Err(e) => anyhow::bail!("reading kubectl logs: {e}"),
    }
    Ok(status.code().unwrap_or(EXIT_ERROR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_logs_of_every_relay_pod_with_their_names() {
        let args = LogsArgs {
            security: true,
            follow: true,
            since: Some("1h".into()),
            tail: "-1".into(),
            output: Output::Table,
        };
        assert_eq!(
            logs_argv(&["--context=prod".into()], "mail", "mail", &args, 7),
            [
                "logs",
                "--context=prod",
                "-n",
                "mail",
                "-l",
                "app.kubernetes.io/component=relay,app.kubernetes.io/instance=mail,app.kubernetes.io/name=mailrelay",
                "-c",
                "relay",
                "--prefix",
                "--tail=-1",
                "--max-log-requests=7",
                "--since=1h",
                "--follow",
            ]
        );
    }

    #[test]
    fn keeps_only_security_events_once_each() {
        let input = concat!(
            "[pod/mail-relay-0/relay] {\"timestamp\":\"2026-01-01T10:00:00.000001Z\",\"level\":\"INFO\",\"message\":\"listening\",\"target\":\"mailrelay_relay::server\"}\n",
            "[pod/mail-relay-0/relay] {\"timestamp\":\"2026-01-01T10:00:01.000001Z\",\"level\":\"WARN\",\"kind\":\"auth_failure\",\"reason\":\"bad_password\",\"service\":\"submission\",\"client_ip\":\"192.0.2.7\",\"mechanism\":\"PLAIN\",\"detail\":\"no such account\",\"target\":\"security\"}\n",
            "[pod/mail-relay-0/relay] {\"timestamp\":\"2026-01-01T10:00:01.000002Z\",\"level\":\"WARN\",\"kind\":\"auth_failure\",\"reason\":\"bad_password\",\"service\":\"submission\",\"client_ip\":\"192.0.2.7\",\"mechanism\":\"PLAIN\",\"detail\":\"no such account\",\"target\":\"security\"}\n",
            "[pod/mail-relay-1/relay] {\"timestamp\":\"2026-01-01T10:00:02Z\",\"level\":\"WARN\",\"kind\":\"connection_refused\",\"service\":\"smtp\",\"client_ip\":\"198.51.100.9\",\"target\":\"security\"}\n",
            "[pod/mail-relay-1/relay] not json at all, target security\n",
        );
        let mut out = Vec::new();
        filter(input.as_bytes(), &mut out, Output::Table).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            "2026-01-01T10:00:01.000001Z mail-relay-0 WARN  auth_failure client_ip=192.0.2.7 detail=\"no such account\" mechanism=PLAIN reason=bad_password service=submission"
        );
        assert!(
            lines[1].starts_with("2026-01-01T10:00:02Z mail-relay-1 WARN  connection_refused"),
            "{text}"
        );

        let mut out = Vec::new();
        filter(input.as_bytes(), &mut out, Output::Json).unwrap();
        let first: Value =
            serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first["pod"], "mail-relay-0");
        assert_eq!(first["kind"], "auth_failure");
    }

    #[test]
    fn prefix_names_the_pod() {
        assert_eq!(split_prefix("[pod/a-0/relay] x"), (Some("a-0"), "x"));
        assert_eq!(split_prefix("plain"), (None, "plain"));
    }
}
