//! `operator render`: the offline GitOps check. Reads CR and Secret YAML, compiles, prints the
//! ConfigMap and Secret the operator would apply (or writes the relay's config files), and fails
//! with per-object messages when anything is invalid.

use std::io::Write;
use std::path::PathBuf;

use mailrelay_crds::compile::{compile, Compiled};
use mailrelay_crds::config::{Credentials, CONFIG_FILE, CREDENTIALS_FILE};

use crate::{load, manifests};

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// CR / Secret YAML files or directories (searched recursively for *.yaml, *.yml).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Relay instance name: objects are called `<instance>-policy` and `<instance>-credentials`.
    #[arg(long, default_value = "mailrelay")]
    pub instance: String,
    /// Namespace written into the output objects (default: taken from the inputs, else none).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Write `relay.yaml` and `credentials.yaml` into this directory (a relay config directory)
    /// instead of printing Kubernetes objects. Existing credentials there are reused when they
    /// still match, so re-rendering an unchanged policy changes nothing.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Previously rendered `credentials.yaml` whose verifiers to keep when passwords are unchanged.
    #[arg(long)]
    pub previous: Option<PathBuf>,
}

/// Exit code 0 = rendered; 1 = some input was invalid (output still shows the valid rest on
/// stdout unless `--out-dir`, which then is not written).
pub fn run(args: &RenderArgs) -> anyhow::Result<i32> {
    let files = load::expand(&args.files)?;
    let (inputs, load_errors) = load::load(&files);
    let previous_path = args
        .previous
        .clone()
        .or_else(|| args.out_dir.as_ref().map(|d| d.join(CREDENTIALS_FILE)));
    let previous: Option<Credentials> = match previous_path {
        Some(p) if p.exists() => Some(
            serde_norway::from_str(&std::fs::read_to_string(&p)?)
                .map_err(|e| anyhow::anyhow!("{}: not a credentials file: {e}", p.display()))?,
        ),
        _ => None,
    };
    let compiled = compile(&inputs, previous.as_ref());

    let mut stderr = std::io::stderr().lock();
    for e in &load_errors {
        writeln!(stderr, "error: {e}")?;
    }
    for line in compiled.report.lines() {
        writeln!(stderr, "{line}")?;
    }
    let failed = !load_errors.is_empty() || compiled.report.has_errors();

    match &args.out_dir {
        Some(dir) => {
            if failed {
                writeln!(
                    stderr,
                    "not writing {}: fix the errors above",
                    dir.display()
                )?;
                return Ok(1);
            }
            write_dir(dir, &compiled)?;
            writeln!(
                stderr,
                "wrote {} and {} (config hash {})",
                dir.join(CONFIG_FILE).display(),
                dir.join(CREDENTIALS_FILE).display(),
                compiled.hash
            )?;
        }
        None => {
            let namespace = args.namespace.clone().or_else(|| namespace_of(&inputs));
            let (cm, secret) = manifests::objects(&compiled, namespace.as_deref(), &args.instance)?;
            let mut out = std::io::stdout().lock();
            write!(
                out,
                "{}---\n{}",
                serde_norway::to_string(&cm)?,
                serde_norway::to_string(&secret)?
            )?;
        }
    }
    Ok(if failed { 1 } else { 0 })
}

fn namespace_of(inputs: &mailrelay_crds::compile::Inputs) -> Option<String> {
    inputs
        .smtp_services
        .iter()
        .filter_map(|s| s.metadata.namespace.clone())
        .next()
}

fn write_dir(dir: &std::path::Path, c: &Compiled) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (config, credentials) = manifests::files(c)?;
    std::fs::write(dir.join(CONFIG_FILE), config)?;
    std::fs::write(dir.join(CREDENTIALS_FILE), credentials)?;
    Ok(())
}
