//! The live configuration: compiled policy, credentials and certificates read from the config
//! directory into one immutable [`Snapshot`]. Loading validates everything a session will rely on,
//! so a snapshot that exists is usable; the reloader swaps whole snapshots atomically.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::Path;

use mailrelay_crds::config::{
    Credentials, RelayConfig, RelayControl, ServicePolicy, CONFIG_FILE, CREDENTIALS_FILE, TLS_DIR,
};

use crate::settings::{RuntimeSettings, RUNTIME_FILE};
use crate::tls::{load_pem_dir, LoadedCert, SelfSignedCache};

#[derive(Debug)]
pub struct Snapshot {
    pub config: RelayConfig,
    pub credentials: Credentials,
    /// Certificates by TLS Secret name.
    pub certs: BTreeMap<String, LoadedCert>,
    /// Content hash of the files this snapshot was built from.
    pub fingerprint: u64,
    /// Name used when a service sets no host name.
    pub default_hostname: String,
}

impl Snapshot {
    pub fn service(&self, name: &str) -> Option<&ServicePolicy> {
        self.config.services.iter().find(|s| s.name == name)
    }

    pub fn hostname_for(&self, service: &ServicePolicy) -> String {
        service
            .hostname
            .clone()
            .unwrap_or_else(|| self.default_hostname.clone())
    }
}

/// Hash of every file that makes up a snapshot (contents, not mtimes: Kubernetes swaps whole
/// directories through symlinks and mtimes of the targets are not reliable).
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    for name in [CONFIG_FILE, CREDENTIALS_FILE, RUNTIME_FILE] {
        name.hash(&mut h);
        std::fs::read(dir.join(name)).ok().hash(&mut h);
    }
    let tls = dir.join(TLS_DIR);
    if let Ok(entries) = std::fs::read_dir(&tls) {
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            n.hash(&mut h);
            for f in ["tls.crt", "tls.key"] {
                std::fs::read(tls.join(&n).join(f)).ok().hash(&mut h);
            }
        }
    }
    h.finish()
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads and validates the config directory.
pub fn load(
    dir: &Path,
    settings: &RuntimeSettings,
    self_signed: &SelfSignedCache,
) -> anyhow::Result<Snapshot> {
    let fp = fingerprint(dir);
    let config: RelayConfig = read_yaml(&dir.join(CONFIG_FILE))?;
    let credentials: Credentials = match std::fs::metadata(dir.join(CREDENTIALS_FILE)) {
        Ok(_) => read_yaml(&dir.join(CREDENTIALS_FILE))?,
        Err(_) => Credentials::default(),
    };
    validate(&config, &credentials)?;
    let default_hostname = settings.effective_hostname();
    let mut certs = BTreeMap::new();
    for svc in &config.services {
        let Some(tls) = &svc.tls else { continue };
        if certs.contains_key(&tls.secret_name) {
            continue;
        }
        let path = dir.join(TLS_DIR).join(&tls.secret_name);
        let mut names = tls.dns_names.clone();
        if names.is_empty() {
            names.push(
                svc.hostname
                    .clone()
                    .unwrap_or_else(|| default_hostname.clone()),
            );
        }
        let key = if path.join("tls.crt").exists() || !settings.self_signed_if_missing {
            load_pem_dir(&path).map_err(|e| {
                anyhow::anyhow!(
                    "service {:?}: TLS Secret {:?}: {e}",
                    svc.name,
                    tls.secret_name
                )
            })?
        } else {
            self_signed.get(&tls.secret_name, &names)?
        };
        certs.insert(
            tls.secret_name.clone(),
            LoadedCert {
                key,
                dns_names: names,
            },
        );
    }
    Ok(Snapshot {
        config,
        credentials,
        certs,
        fingerprint: fp,
        default_hostname,
    })
}

/// Cross-reference checks the compiler should already guarantee; the relay re-checks because a
/// hand-written or stale config must not half-work.
pub fn validate(config: &RelayConfig, creds: &Credentials) -> anyhow::Result<()> {
    let group = |what: &str, g: &str| -> anyhow::Result<()> {
        if config.ip_groups.contains_key(g) {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{what} refers to unknown IP group {g:?}"))
        }
    };
    let mut ports = BTreeSet::new();
    let mut names = BTreeSet::new();
    for s in &config.services {
        let what = format!("service {:?}", s.name);
        if !names.insert(&s.name) {
            anyhow::bail!("{what} is defined twice");
        }
        if !ports.insert(s.port) {
            anyhow::bail!("{what}: port {} is used by another service", s.port);
        }
        if s.port == 0 {
            anyhow::bail!("{what}: port 0 is not a valid listener port");
        }
        if s.protocol == mailrelay_crds::config::Protocol::Smtps && s.tls.is_none() {
            anyhow::bail!("{what}: Smtps needs a TLS certificate");
        }
        for g in s.allowed_from.iter().chain(&s.trusted_from) {
            group(&what, g)?;
        }
        if let Some(g) = &s.hide_client_ip_for {
            group(&what, g)?;
        }
        if let Some(g) = &s.limits.exempt_ip_group {
            group(&what, g)?;
        }
        if let RelayControl::Restricted {
            ip_group: Some(g), ..
        } = &s.relay_control
        {
            group(&what, g)?;
        }
        if let Some(p) = &s.proxy_protocol {
            for g in &p.trusted_from {
                group(&what, g)?;
            }
        }
    }
    for (name, p) in &config.access_policies {
        for g in &p.from_ip_groups {
            group(&format!("access policy {name:?}"), g)?;
        }
    }
    for a in &creds.accounts {
        if let Some(p) = &a.access_policy {
            if !config.access_policies.contains_key(p) {
                anyhow::bail!(
                    "account {:?} refers to unknown access policy {p:?}",
                    a.login
                );
            }
        }
    }
    Ok(())
}
