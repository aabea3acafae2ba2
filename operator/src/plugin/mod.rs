//! `kubectl mailrelay`, the kubectl plugin (binary `kubectl-mailrelay`): owns its command line,
//! the connection to the cluster (kubeconfig, context, namespace, the same way kubectl chooses
//! them), which mailrelay instance of the namespace is meant, and the dispatch to its
//! subcommands:
//!
//! - [`status`]: every mailrelay object's conditions, the compiled policy's hash and whether
//!   each relay pod serves it (read through the API only);
//! - [`exec`]: `diagnose` and `queue`, run inside relay pods with `kubectl exec` (one pod, or
//!   every pod with the queue views merged);
//! - [`logs`]: the relay pods' security log through `kubectl logs`;
//! - [`pods`]: finding the relay pods and choosing the one to exec into.
//!
//! Reads go through kube-rs; what needs a stream into a container (exec, logs) is handed to the
//! `kubectl` that runs the plugin, with the same kubeconfig and context.

pub mod exec;
pub mod logs;
pub mod pods;
pub mod status;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::manifests::FIELD_MANAGER;

/// Exit code when everything looked at is fine.
pub const EXIT_OK: i32 = 0;
/// Exit code when something is not in effect (a condition, a pod, a stale policy).
pub const EXIT_PROBLEMS: i32 = 1;
/// Exit code when the plugin could not do its job (no cluster, no pod, bad arguments).
pub const EXIT_ERROR: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-mailrelay",
    bin_name = "kubectl mailrelay",
    version,
    about = "Status, diagnosis, queues and security log of a mailrelay installation"
)]
pub struct Cli {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where to look: the flags kubectl itself would take, passed on to every `kubectl` the plugin
/// runs.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the mailrelay installation (default: the context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The instance (Helm release name) when a namespace holds several.
    #[arg(long, global = true)]
    pub instance: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Conditions of every mailrelay object, the compiled policy's hash, and whether each relay
    /// pod serves it. Exit code 1 when anything is not in effect.
    Status(status::StatusArgs),
    /// Run `relay diagnose <recipient|domain|host[:port]> …` inside a ready relay pod.
    Diagnose(exec::DiagnoseArgs),
    /// Run `relay queue …` inside a relay pod, or in every one (`--all-pods`; `list` merges the
    /// queues into one table with a pod column).
    Queue(exec::QueueArgs),
    /// Tail the relay pods' security log (log target `security`).
    Logs(logs::LogsArgs),
}

/// Output format of `status` and `queue list`.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// The cluster connection and the namespace everything happens in.
pub struct Target {
    pub client: Client,
    pub namespace: String,
    pub cluster: ClusterArgs,
}

impl Target {
    /// Connects as kubectl would: an explicit `--kubeconfig`, else $KUBECONFIG or
    /// ~/.kube/config, else the in-cluster service account.
    pub async fn connect(cluster: &ClusterArgs) -> anyhow::Result<Target> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = KubeConfigOptions {
            context: cluster.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match &cluster.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &options).await?
            }
            None if cluster.context.is_some() => Config::from_kubeconfig(&options).await?,
            None => Config::infer().await?,
        };
        let namespace = cluster
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)?;
        Ok(Target {
            client,
            namespace,
            cluster: cluster.clone(),
        })
    }

    /// The flags every `kubectl` call of the plugin starts with, so it talks to the same cluster
    /// as the plugin's own reads ($KUBECONFIG reaches it through the environment).
    pub fn kubectl_flags(&self) -> Vec<String> {
        kubectl_flags(&self.cluster)
    }

    /// The instance meant: `--instance`, else the only one in the namespace (found by the
    /// policy ConfigMap the operator writes, else by the relay pods' labels).
    pub async fn instance(&self) -> anyhow::Result<String> {
        if let Some(i) = &self.cluster.instance {
            return Ok(i.clone());
        }
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!(
            "app.kubernetes.io/managed-by={FIELD_MANAGER},app.kubernetes.io/component=policy"
        );
        let found: BTreeSet<String> = cms
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "listing ConfigMaps in {}: {}",
                    self.namespace,
                    api_error(&e)
                )
            })?
            .items
            .iter()
            .filter_map(|c| c.metadata.labels.as_ref()?.get(INSTANCE_LABEL).cloned())
            .collect();
        let found = if found.is_empty() {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
            pods.list_metadata(
                &ListParams::default()
                    .labels("app.kubernetes.io/name=mailrelay,app.kubernetes.io/component=relay"),
            )
            .await
            .map_err(|e| anyhow::anyhow!("listing pods in {}: {}", self.namespace, api_error(&e)))?
            .items
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get(INSTANCE_LABEL).cloned())
            .collect()
        } else {
            found
        };
        one_instance(&self.namespace, found)
    }
}

const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

fn one_instance(namespace: &str, found: BTreeSet<String>) -> anyhow::Result<String> {
    let mut it = found.iter();
    match (it.next(), it.next()) {
        (Some(one), None) => Ok(one.clone()),
        (None, _) => anyhow::bail!(
            "no mailrelay instance in namespace {namespace} (no policy ConfigMap, no relay pods); \
             pass -n <namespace> or --instance <release>"
        ),
        (Some(_), Some(_)) => anyhow::bail!(
            "namespace {namespace} holds several mailrelay instances ({}); pick one with --instance",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A kube error in one line: `404 NotFound: …` for an API answer (a 403 names the missing
/// permission), the error's own text otherwise.
pub fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// See [`Target::kubectl_flags`].
pub fn kubectl_flags(cluster: &ClusterArgs) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(k) = &cluster.kubeconfig {
        out.push(format!("--kubeconfig={}", k.display()));
    }
    if let Some(c) = &cluster.context {
        out.push(format!("--context={c}"));
    }
    out
}

/// The plugin's own flags among the arguments handed to the relay. Everything after the relay
/// arguments' first word goes to the relay unparsed, yet `kubectl mailrelay diagnose
/// bob@example.com -n mail` is how kubectl users type; the relay's `diagnose` and `queue` take
/// none of these flags, so they are taken back out (the plugin's meaning wins).
pub fn take_plugin_flags(cli: &mut Cli) -> Result<(), String> {
    let (args, mut pod, mut all_pods, mut output) = match &mut cli.command {
        Command::Diagnose(d) => (&mut d.args, Some(&mut d.pod), None, None),
        Command::Queue(q) => (
            &mut q.args,
            Some(&mut q.pod),
            Some(&mut q.all_pods),
            Some(&mut q.output),
        ),
        _ => return Ok(()),
    };
    let mut rest = Vec::new();
    let mut it = std::mem::take(args).into_iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let slot: Option<&mut Option<String>> = match flag.as_str() {
            "-n" | "--namespace" => Some(&mut cli.cluster.namespace),
            "--context" => Some(&mut cli.cluster.context),
            "--instance" => Some(&mut cli.cluster.instance),
            "--pod" => pod.as_deref_mut(),
            "--kubeconfig" => {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().ok_or("--kubeconfig needs a value")?,
                };
                cli.cluster.kubeconfig = Some(value.into());
                continue;
            }
            "--all-pods" if all_pods.is_some() => {
                if let Some(all) = all_pods.as_deref_mut() {
                    *all = true;
                }
                continue;
            }
            "-o" | "--output" if output.is_some() => {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().ok_or("-o needs a value")?,
                };
                let parsed = Output::from_str(&value, true)
                    .map_err(|_| format!("-o {value}: table or json"))?;
                if let Some(o) = output.as_deref_mut() {
                    *o = parsed;
                }
                continue;
            }
            _ => None,
        };
        match slot {
            Some(slot) => {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| format!("{flag} needs a value"))?,
                };
                *slot = Some(value);
            }
            None => rest.push(a),
        }
    }
    if let (Some(_), Some(true)) = (pod.as_deref().and_then(Option::as_ref), all_pods.as_deref()) {
        return Err("--pod and --all-pods exclude each other".into());
    }
    if rest.is_empty() {
        return Err("the relay's arguments are missing".into());
    }
    *args = rest;
    Ok(())
}

/// Runs the plugin; returns the process exit code.
pub fn main(mut cli: Cli) -> i32 {
    if let Err(e) = take_plugin_flags(&mut cli) {
        eprintln!("kubectl mailrelay: {e}");
        return EXIT_ERROR;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl mailrelay: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let result = runtime.block_on(async {
        let target = Target::connect(&cli.cluster).await?;
        match &cli.command {
            Command::Status(a) => status::run(&target, a).await,
            Command::Diagnose(a) => exec::diagnose(&target, a).await,
            Command::Queue(a) => exec::queue(&target, a).await,
            Command::Logs(a) => logs::run(&target, a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubectl mailrelay: {e:#}");
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_is_the_only_one_or_an_error_naming_them() {
        let one = BTreeSet::from(["mail".to_string()]);
        assert_eq!(one_instance("ns", one).unwrap(), "mail");
        let e = one_instance("ns", BTreeSet::new()).unwrap_err().to_string();
        assert!(e.contains("no mailrelay instance in namespace ns"), "{e}");
        let two = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let e = one_instance("ns", two).unwrap_err().to_string();
        assert!(e.contains("(a, b)") && e.contains("--instance"), "{e}");
    }

    #[test]
    fn kubectl_gets_the_same_kubeconfig_and_context() {
        assert!(kubectl_flags(&ClusterArgs::default()).is_empty());
        let c = ClusterArgs {
            kubeconfig: Some("/k/config".into()),
            context: Some("prod".into()),
            namespace: Some("mail".into()),
            instance: None,
        };
        assert_eq!(
            kubectl_flags(&c),
            ["--kubeconfig=/k/config", "--context=prod"]
        );
    }

    /// deploy/krew/mailrelay.yaml: a krew Plugin manifest for this version, every platform's
    /// archive named by the scheme deploy/krew/package.sh writes.
    #[test]
    fn krew_manifest_follows_the_release_naming_scheme() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/krew/mailrelay.yaml");
        let m: serde_json::Value =
            serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            m["apiVersion"],
            "krew.googlecontainertools.github.com/v1alpha2"
        );
        assert_eq!(m["kind"], "Plugin");
        assert_eq!(m["metadata"]["name"], "mailrelay");
        let version = format!("v{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(m["spec"]["version"], version.as_str());
        let platforms = m["spec"]["platforms"].as_array().unwrap();
        assert!(!platforms.is_empty());
        for p in platforms {
            let labels = &p["selector"]["matchLabels"];
            let (os, arch) = (
                labels["os"].as_str().unwrap(),
                labels["arch"].as_str().unwrap(),
            );
            assert_eq!(
                p["uri"],
                format!("https://github.com/mailrelay/mailrelay/releases/download/{version}/kubectl-mailrelay_{version}_{os}_{arch}.tar.gz")
            );
            let sha = p["sha256"].as_str().unwrap();
            assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(p["bin"], "kubectl-mailrelay");
        }
    }

    #[test]
    fn plugin_flags_after_the_relay_arguments_are_the_plugins() {
        let parse = |args: &[&str]| {
            let mut cli = Cli::try_parse_from(args).unwrap();
            take_plugin_flags(&mut cli).map(|()| cli)
        };
        let cli = parse(&[
            "kubectl-mailrelay",
            "diagnose",
            "bob@example.com",
            "--from",
            "a@example.com",
            "-n",
            "mail",
            "--context=prod",
            "--pod",
            "mail-relay-1",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.cluster.namespace.as_deref(), Some("mail"));
        assert_eq!(cli.cluster.context.as_deref(), Some("prod"));
        let Command::Diagnose(d) = cli.command else {
            panic!("diagnose")
        };
        assert_eq!(d.pod.as_deref(), Some("mail-relay-1"));
        assert_eq!(
            d.args,
            ["bob@example.com", "--from", "a@example.com", "--json"]
        );

        let cli = parse(&[
            "kubectl-mailrelay",
            "queue",
            "list",
            "--all-pods",
            "-o",
            "json",
            "--kubeconfig",
            "/k",
            "--instance=mail",
        ])
        .unwrap();
        assert_eq!(cli.cluster.instance.as_deref(), Some("mail"));
        assert_eq!(cli.cluster.kubeconfig, Some("/k".into()));
        let Command::Queue(q) = cli.command else {
            panic!("queue")
        };
        assert!(q.all_pods && q.output == Output::Json);
        assert_eq!(q.args, ["list"]);

        let e = parse(&[
            "kubectl-mailrelay",
            "queue",
            "list",
            "--pod",
            "a",
            "--all-pods",
        ]);
        assert!(e.unwrap_err().contains("exclude each other"));
        let e = parse(&["kubectl-mailrelay", "queue", "list", "-n"]);
        assert!(e.unwrap_err().contains("-n needs a value"));
        // Before the relay's arguments, the flags are clap's: nothing left for the relay.
        assert!(Cli::try_parse_from(["kubectl-mailrelay", "diagnose", "-n", "mail"]).is_err());
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "kubectl-mailrelay",
            "status",
            "-n",
            "mail",
            "--context",
            "prod",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.cluster.namespace.as_deref(), Some("mail"));
        assert_eq!(cli.cluster.context.as_deref(), Some("prod"));
        assert!(matches!(cli.command, Command::Status(ref s) if s.output == Output::Json));
    }
}
