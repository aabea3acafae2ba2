//! `operator render`: the offline GitOps check. Reads CR and Secret YAML, compiles, prints the
//! ConfigMap and Secret the operator would apply (or writes the relay's config files), and fails
//! with per-object messages when anything is invalid. With the previous output it compiles as
//! the operator does against what it applied: live objects win conflicts and keep their last
//! good version while invalid.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use mailrelay_crds::compile::{compile, Compiled, Previous};
use mailrelay_crds::config::{Credentials, RelayConfig, CONFIG_FILE, CREDENTIALS_FILE};
use serde::Deserialize;

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
    /// instead of printing Kubernetes objects. What is there is the previous output unless
    /// `--previous` names another, so re-rendering an unchanged policy changes nothing.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The previous output: a directory with `relay.yaml` and `credentials.yaml`, or a file with
    /// the ConfigMap and Secret an earlier render printed. Objects live in it win conflicts with
    /// new ones and keep their last good version while invalid (as the operator does), and
    /// verifiers are kept while passwords are unchanged. A lone `credentials.yaml` only keeps
    /// verifiers.
    #[arg(long)]
    pub previous: Option<PathBuf>,
}

/// Exit code 0 = rendered; 1 = some input was invalid (output still shows the valid rest on
/// stdout unless `--out-dir`, which then is not written).
pub fn run(args: &RenderArgs) -> anyhow::Result<i32> {
    let files = load::expand(&args.files)?;
    let (inputs, load_errors) = load::load(&files);
    let previous_path = args.previous.clone().or_else(|| args.out_dir.clone());
    let previous = match previous_path {
        Some(p) if p.exists() => Some(read_previous(&p)?),
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
    // What `status.dnsRecords` will show, so a GitOps review sees the DNS changes a policy needs.
    for r in &compiled.report.objects {
        for rec in &r.dns_records {
            // TXT data in quotes as zone files write it; a CNAME target bare.
            let value = if rec.type_ == "TXT" {
                format!("\"{}\"", rec.value)
            } else {
                rec.value.clone()
            };
            writeln!(
                stderr,
                "{}/{}: DNS record to publish: {} {} {} ({})",
                r.kind, r.name, rec.name, rec.type_, value, rec.purpose
            )?;
        }
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

/// Reads the previous output named by `--previous` (or the `--out-dir` directory).
pub fn read_previous(path: &Path) -> anyhow::Result<Previous> {
    fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
        serde_norway::from_str(text).with_context(|| format!("{}", path.display()))
    }
    fn read_optional<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
        match std::fs::read_to_string(path) {
            Ok(text) => parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(path.display().to_string())),
        }
    }
    if path.is_dir() {
        let config: Option<RelayConfig> = read_optional(&path.join(CONFIG_FILE))?;
        let credentials: Option<Credentials> = read_optional(&path.join(CREDENTIALS_FILE))?;
        return Ok(Previous {
            config: config.unwrap_or_default(),
            credentials: credentials.unwrap_or_default(),
        });
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    if let Ok(credentials) = serde_norway::from_str::<Credentials>(&text) {
        return Ok(Previous::credentials_only(credentials));
    }
    // The objects an earlier render printed (or `kubectl get -o yaml` of the applied ones).
    let mut config = None;
    let mut credentials = None;
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let where_ = || format!("{} document {}", path.display(), i + 1);
        let v = serde_json::Value::deserialize(doc).with_context(where_)?;
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("ConfigMap") => {
                let cm: ConfigMap = serde_json::from_value(v).with_context(where_)?;
                if let Some(t) = cm.data.as_ref().and_then(|d| d.get(CONFIG_FILE)) {
                    config = Some(parse::<RelayConfig>(path, t).with_context(where_)?);
                }
            }
            Some("Secret") => {
                let secret: Secret = serde_json::from_value(v).with_context(where_)?;
                let bytes = secret.data.as_ref().and_then(|d| d.get(CREDENTIALS_FILE));
                if let Some(b) = bytes {
                    let t = std::str::from_utf8(&b.0).with_context(where_)?;
                    credentials = Some(parse::<Credentials>(path, t).with_context(where_)?);
                }
            }
            _ => {}
        }
    }
    if config.is_none() && credentials.is_none() {
        anyhow::bail!(
            "{}: neither a credentials.yaml nor the ConfigMap ({CONFIG_FILE}) and Secret ({CREDENTIALS_FILE}) of an earlier render",
            path.display()
        );
    }
    Ok(Previous {
        config: config.unwrap_or_default(),
        credentials: credentials.unwrap_or_default(),
    })
}

/// Writes the relay's two files. Each is replaced atomically, so a relay polling the directory
/// reads a whole old or a whole new file, never a part of one; between the two renames it sees
/// a new `credentials.yaml` with the old `relay.yaml`, which their `configHash` stamps tell it
/// not to load together. Credentials go first, as the operator applies its Secret first.
fn write_dir(dir: &Path, c: &Compiled) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (config, credentials) = manifests::files(c)?;
    replace_file(dir, CREDENTIALS_FILE, credentials.as_bytes(), 0o600)?;
    replace_file(dir, CONFIG_FILE, config.as_bytes(), 0o644)?;
    Ok(())
}

/// Replaces `dir/name` with `contents` atomically: a temporary file in the same directory (so
/// the rename stays on one file system), fsynced, renamed over the old file, then the directory
/// fsynced so the rename survives a crash. A replaced file keeps its permissions; a new one gets
/// `new_mode` (less the umask).
fn replace_file(dir: &Path, name: &str, contents: &[u8], new_mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let target = dir.join(name);
    let keep = std::fs::metadata(&target).ok().map(|m| m.permissions());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        // Left behind by a killed render with the same pid: it is ours to replace.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(new_mode)
            .open(&tmp)?;
        if let Some(p) = &keep {
            f.set_permissions(std::fs::Permissions::from_mode(p.mode() & 0o7777))?;
        }
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", target.display()))
    })
}
