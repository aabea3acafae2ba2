//! `kubectl mailrelay diagnose` and `kubectl mailrelay queue`: owns the one call that runs the
//! relay's own tools inside a relay pod, and the merged view of several pods' queues.
//!
//! The call is `kubectl exec -n <ns> <pod> -c relay -- relay --config <dir> diagnose|queue …` (see
//! [`exec_argv`]): the relay binary in the pod, with the config directory the chart mounts, so it
//! uses the pod's resolver, network, TLS settings and policy. kubectl streams it; the plugin
//! adds nothing in between but the pod choice, which keeps the boundary one testable argv.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use super::pods::{self, RelayPod, CONFIG_DIR, RELAY_CONTAINER};
use super::status::columns;
use super::{Output, Target, EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS};

#[derive(Args, Debug)]
pub struct DiagnoseArgs {
    /// Run in this relay pod (default: the first ready one).
    #[arg(long)]
    pub pod: Option<String>,
    /// Passed to `relay diagnose`: `<recipient|domain|host[:port]> [--from <sender>] [--json]`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct QueueArgs {
    /// Run in this relay pod (default: the first ready one).
    #[arg(long, conflicts_with = "all_pods")]
    pub pod: Option<String>,
    /// Run in every ready relay pod; `list` shows one table with a pod column.
    #[arg(long)]
    pub all_pods: bool,
    /// Output of `list`: `table`, or `json` (every pod's answer, by pod).
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
    /// Passed to `relay queue`: `list`, `show <id>`, `retry <id>`, `delete <id>`, `bounce <id>`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

/// The relay command line for `relay diagnose`. `--config` is the relay's top-level option
/// (not one of the subcommand's), so it goes before the subcommand.
pub fn diagnose_command(args: &[String]) -> Vec<String> {
    relay_command("diagnose", args)
}

/// The relay command line for `relay queue`.
pub fn queue_command(args: &[String]) -> Vec<String> {
    relay_command("queue", args)
}

fn relay_command(subcommand: &str, args: &[String]) -> Vec<String> {
    let mut cmd = vec![
        "relay".to_string(),
        "--config".into(),
        CONFIG_DIR.into(),
        subcommand.into(),
    ];
    cmd.extend(args.iter().cloned());
    cmd
}

/// `kubectl exec` of `command` in the relay container of `pod`: the whole exec boundary.
/// `flags` are the kubeconfig/context flags of [`super::kubectl_flags`].
pub fn exec_argv(flags: &[String], namespace: &str, pod: &str, command: &[String]) -> Vec<String> {
    let mut argv = vec!["exec".to_string()];
    argv.extend(flags.iter().cloned());
    argv.extend([
        "-n".to_string(),
        namespace.to_string(),
        pod.to_string(),
        "-c".into(),
        RELAY_CONTAINER.into(),
        "--".into(),
    ]);
    argv.extend(command.iter().cloned());
    argv
}

/// The kubectl that runs the plugin (kubectl puts itself on PATH for plugins).
fn kubectl() -> Command {
    Command::new("kubectl")
}

/// Runs `kubectl <argv>` with the terminal attached; its exit code.
fn run_attached(argv: &[String]) -> anyhow::Result<i32> {
    let status = kubectl()
        .args(argv)
        .status()
        .map_err(|e| anyhow::anyhow!("running kubectl: {e}"))?;
    Ok(status.code().unwrap_or(EXIT_ERROR))
}

pub async fn diagnose(target: &Target, args: &DiagnoseArgs) -> anyhow::Result<i32> {
    let instance = target.instance().await?;
    let pods = pods::list(&target.client, &target.namespace, &instance).await?;
    let pod = pods::choose(&pods, args.pod.as_deref())?;
    eprintln!(
        "kubectl mailrelay: running relay diagnose in pod {}",
        pod.name
    );
    run_attached(&exec_argv(
        &target.kubectl_flags(),
        &target.namespace,
        &pod.name,
        &diagnose_command(&args.args),
    ))
}

/// One pod's answer to `relay queue …`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodAnswer {
    pub pod: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `relay queue …` in each pod, in parallel, capturing the output.
fn run_captured(target: &Target, pods: &[&RelayPod], command: &[String]) -> Vec<PodAnswer> {
    let flags = target.kubectl_flags();
    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| {
                let argv = exec_argv(&flags, &target.namespace, &p.name, command);
                let name = p.name.clone();
                s.spawn(
                    move || match kubectl().args(&argv).stdin(Stdio::null()).output() {
                        Ok(o) => PodAnswer {
                            pod: name,
                            code: o.status.code().unwrap_or(EXIT_ERROR),
                            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                        },
                        Err(e) => PodAnswer {
                            pod: name,
                            code: EXIT_ERROR,
                            stdout: String::new(),
                            stderr: format!("running kubectl: {e}"),
                        },
                    },
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| PodAnswer {
                    pod: String::new(),
                    code: EXIT_ERROR,
                    stdout: String::new(),
                    stderr: "kubectl exec thread panicked".into(),
                })
            })
            .collect()
    })
}

pub async fn queue(target: &Target, args: &QueueArgs) -> anyhow::Result<i32> {
    let instance = target.instance().await?;
    let pods = pods::list(&target.client, &target.namespace, &instance).await?;
    let chosen: Vec<&RelayPod> = if args.all_pods {
        let ready: Vec<&RelayPod> = pods.iter().filter(|p| p.ready).collect();
        if ready.is_empty() {
            // choose() words the error with every pod's state.
            pods::choose(&pods, None)?;
        }
        ready
    } else {
        vec![pods::choose(&pods, args.pod.as_deref())?]
    };
    let command = queue_command(&args.args);
    let is_list = args.args.first().is_some_and(|a| a == "list");
    if !is_list && !args.all_pods {
        // One pod, any action: the relay's own output, unchanged.
        let Some(pod) = chosen.first() else {
            return Ok(EXIT_ERROR);
        };
        return run_attached(&exec_argv(
            &target.kubectl_flags(),
            &target.namespace,
            &pod.name,
            &command,
        ));
    }
    let answers = run_captured(target, &chosen, &command);
    if is_list {
        let merged = merge_lists(&answers);
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&merged.json)?),
            Output::Table => print!("{}", render_list(&merged, now_unix())),
        }
        Ok(if merged.failed {
            EXIT_PROBLEMS
        } else {
            EXIT_OK
        })
    } else {
        // An action on a message id in every pod: the id lives in one spool, the others say
        // they do not know it. Every answer is shown; success if any pod did it.
        let mut any_ok = false;
        for a in &answers {
            any_ok |= a.code == 0;
            println!("== {} (exit {})", a.pod, a.code);
            print!("{}", a.stdout);
            if !a.stderr.is_empty() {
                eprint!("{}", a.stderr);
            }
        }
        Ok(if any_ok { EXIT_OK } else { EXIT_PROBLEMS })
    }
}

/// Every pod's `relay queue list` answer put together.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedList {
    /// `{"pods": [{"pod", "messages"} | {"pod", "error"}]}`.
    pub json: Value,
    /// (pod, message) in pod order, each pod's messages as it listed them.
    pub rows: Vec<(String, Value)>,
    /// (pod, error) of the pods that gave no list.
    pub errors: Vec<(String, String)>,
    pub failed: bool,
}

/// Merges the per-pod answers of `relay queue list` (`{"messages": [...]}` each).
pub fn merge_lists(answers: &[PodAnswer]) -> MergedList {
    let mut pods = Vec::new();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for a in answers {
        let parsed: Option<Vec<Value>> = (a.code == 0)
            .then(|| serde_json::from_str::<Value>(a.stdout.trim()).ok())
            .flatten()
            .and_then(|v| v.get("messages")?.as_array().cloned());
        match parsed {
            Some(messages) => {
                rows.extend(messages.iter().map(|m| (a.pod.clone(), m.clone())));
                pods.push(serde_json::json!({"pod": a.pod, "messages": messages}));
            }
            None => {
                let why = first_line(&a.stderr)
                    .or_else(|| first_line(&a.stdout))
                    .unwrap_or_else(|| format!("exit code {}", a.code));
                pods.push(serde_json::json!({"pod": a.pod, "error": why}));
                errors.push((a.pod.clone(), why));
            }
        }
    }
    MergedList {
        json: serde_json::json!({ "pods": pods }),
        failed: !errors.is_empty(),
        rows,
        errors,
    }
}

fn first_line(s: &str) -> Option<String> {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `3d4h`, `5m12s`: the largest two units.
pub fn age(seconds: u64) -> String {
    let units = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut rest = seconds;
    for (name, size) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join("")
}

/// The merged queue as one table: a row per message with its pod.
pub fn render_list(m: &MergedList, now: u64) -> String {
    let mut rows = vec![[
        "POD",
        "ID",
        "SENDER",
        "RCPTS",
        "SIZE",
        "AGE",
        "NEXT",
        "LAST REPLY",
    ]
    .map(String::from)
    .to_vec()];
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for (pod, msg) in &m.rows {
        *per_pod.entry(pod).or_default() += 1;
        let text = |k: &str| msg.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let num = |k: &str| msg.get(k).and_then(Value::as_u64);
        let rcpts = msg.get("recipients").and_then(Value::as_array);
        let pending = rcpts.map_or(0, |r| {
            r.iter()
                .filter(|x| x.get("state").and_then(Value::as_str) == Some("pending"))
                .count()
        });
        let total = rcpts.map_or(0, Vec::len);
        let reply = rcpts
            .and_then(|r| {
                r.iter()
                    .filter(|x| x.get("state").and_then(Value::as_str) == Some("pending"))
                    .find_map(|x| x.get("reply").and_then(Value::as_str))
            })
            .unwrap_or("")
            .to_string();
        let sender = match text("sender") {
            s if s.is_empty() => "<>".to_string(),
            s => s,
        };
        let next = if msg.get("inFlight").and_then(Value::as_bool) == Some(true) {
            "now (in flight)".to_string()
        } else {
            num("nextAttemptAt").map_or("-".into(), |t| {
                if t <= now {
                    "due".into()
                } else {
                    format!("in {}", age(t - now))
                }
            })
        };
        rows.push(vec![
            pod.clone(),
            text("id"),
            sender,
            format!("{pending}/{total} pending"),
            num("size").map_or("-".into(), |s| s.to_string()),
            num("receivedAt").map_or("-".into(), |t| age(now.saturating_sub(t))),
            next,
            reply,
        ]);
    }
    let mut out = if m.rows.is_empty() {
        "No queued messages.\n".to_string()
    } else {
        columns(&rows)
    };
    for (pod, err) in &m.errors {
        out.push_str(&format!("{pod}: no queue list: {err}\n"));
    }
    let answered = m.json["pods"].as_array().map_or(0, Vec::len) - m.errors.len();
    out.push_str(&format!(
        "{} message(s) in {} pod(s) answering{}\n",
        m.rows.len(),
        answered,
        if m.errors.is_empty() {
            String::new()
        } else {
            format!(", {} pod(s) failed", m.errors.len())
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_exec_call_is_kubectl_exec_of_the_relay_in_its_container() {
        let argv = exec_argv(
            &s(&["--kubeconfig=/k", "--context=prod"]),
            "mail",
            "mail-relay-1",
            &diagnose_command(&s(&[
                "jane@example.net",
                "--from",
                "a@example.com",
                "--json",
            ])),
        );
        assert_eq!(
            argv,
            s(&[
                "exec",
                "--kubeconfig=/k",
                "--context=prod",
                "-n",
                "mail",
                "mail-relay-1",
                "-c",
                "relay",
                "--",
                "relay",
                "--config",
                "/etc/mailrelay/config",
                "diagnose",
                "jane@example.net",
                "--from",
                "a@example.com",
                "--json",
            ])
        );
        assert_eq!(
            exec_argv(
                &[],
                "mail",
                "mail-relay-0",
                &queue_command(&s(&["show", "0001"]))
            ),
            s(&[
                "exec",
                "-n",
                "mail",
                "mail-relay-0",
                "-c",
                "relay",
                "--",
                "relay",
                "--config",
                "/etc/mailrelay/config",
                "queue",
                "show",
                "0001",
            ])
        );
    }

    #[test]
    fn relay_args_pass_through_untouched() {
        use clap::Parser;
        let cli = super::super::Cli::try_parse_from([
            "kubectl-mailrelay",
            "-n",
            "mail",
            "diagnose",
            "--pod",
            "mail-relay-1",
            "example.net:25",
            "--from",
            "x@example.com",
            "--json",
        ])
        .unwrap();
        let super::super::Command::Diagnose(d) = cli.command else {
            panic!("not diagnose")
        };
        assert_eq!(d.pod.as_deref(), Some("mail-relay-1"));
        assert_eq!(
            d.args,
            s(&["example.net:25", "--from", "x@example.com", "--json"])
        );

        let cli = super::super::Cli::try_parse_from([
            "kubectl-mailrelay",
            "queue",
            "--all-pods",
            "-o",
            "json",
            "list",
        ])
        .unwrap();
        let super::super::Command::Queue(q) = cli.command else {
            panic!("not queue")
        };
        assert!(q.all_pods && q.output == Output::Json);
        assert_eq!(q.args, s(&["list"]));
    }

    #[test]
    fn queue_lists_merge_with_a_pod_column() {
        let answers = vec![
            PodAnswer {
                pod: "mail-relay-0".into(),
                code: 0,
                stdout: r#"{"messages":[{"id":"0000000000000001","sender":"a@example.com","size":1200,"receivedAt":1000,"nextAttemptAt":1900,"inFlight":false,"warned":false,"recipients":[{"address":"x@example.net","state":"pending","attempts":2,"reply":"451 4.4.4 greylisted"},{"address":"y@example.net","state":"delivered","attempts":1,"reply":"250 2.0.0 ok"}]}]}"#.into(),
                stderr: String::new(),
            },
            PodAnswer {
                pod: "mail-relay-1".into(),
                code: 0,
                stdout: r#"{"messages":[{"id":"0000000000000009","sender":"","size":500,"receivedAt":1500,"nextAttemptAt":null,"inFlight":true,"warned":false,"recipients":[{"address":"z@example.org","state":"pending","attempts":0,"reply":null}]}]}"#.into(),
                stderr: String::new(),
            },
            PodAnswer {
                pod: "mail-relay-2".into(),
                code: 1,
                stdout: String::new(),
                stderr: "relay queue: connecting to 127.0.0.1:9091: Connection refused\n".into(),
            },
        ];
        let m = merge_lists(&answers);
        assert!(m.failed);
        assert_eq!(m.rows.len(), 2);
        assert_eq!(m.json["pods"][1]["messages"][0]["id"], "0000000000000009");
        assert_eq!(
            m.json["pods"][2]["error"],
            "relay queue: connecting to 127.0.0.1:9091: Connection refused"
        );
        let t = render_list(&m, 1600);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("POD"), "{t}");
        let cells = |l: &str| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1]),
            [
                "mail-relay-0",
                "0000000000000001",
                "a@example.com",
                "1/2 pending",
                "1200",
                "10m",
                "in 5m",
                "451 4.4.4 greylisted"
            ],
            "{t}"
        );
        assert!(
            lines[2].starts_with("mail-relay-1  0000000000000009  <>"),
            "{t}"
        );
        assert!(lines[2].contains("now (in flight)"), "{t}");
        assert!(
            t.contains("mail-relay-2: no queue list: relay queue: connecting"),
            "{t}"
        );
        assert!(
            t.contains("2 message(s) in 2 pod(s) answering, 1 pod(s) failed"),
            "{t}"
        );
    }

    #[test]
    fn ages_use_two_units() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59), "59s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3_725), "1h2m");
        assert_eq!(age(90_061), "1d1h");
    }
}
