//! The live configuration: compiled policy, credentials and certificates read from the config
//! directory into one immutable [`Snapshot`]. Loading validates everything a session will rely on,
//! so a snapshot that exists is usable; the reloader swaps whole snapshots atomically. A
//! `relay.yaml` and `credentials.yaml` from different compiles (one replaced before the other)
//! are never loaded together ([`is_mismatched`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::Path;

use mailrelay_crds::config::{
    check_pair, Credentials, PairMismatch, Protocol, RelayConfig, RelayControl, ServicePolicy,
    CONFIG_FILE, CREDENTIALS_FILE,
};
use tracing::warn;

use crate::settings::{RuntimeSettings, RUNTIME_FILE};
use crate::tls::{cert_files, load_pem_files, LoadedCert, SelfSignedCache, SelfSignedOutcome};

#[derive(Debug)]
pub struct Snapshot {
    pub config: RelayConfig,
    pub credentials: Credentials,
    /// Certificates by TLS Secret name.
    pub certs: BTreeMap<String, LoadedCert>,
    /// TLS Secrets the policy names whose certificate is not there, with the services that use
    /// them: those services offer no STARTTLS, and an SMTPS service does not listen.
    pub missing_certs: BTreeMap<String, Vec<String>>,
    /// False while `relay.yaml` does not exist yet (a pod that started before the operator's
    /// first reconcile): nothing is served and `/readyz` says not ready.
    pub policy_loaded: bool,
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

    /// The listeners to run: (service name, policy port) of every service, except SMTPS
    /// services without a certificate (implicit TLS cannot be served without one, so the port
    /// refuses connections instead of failing every handshake).
    pub fn listeners(&self) -> Vec<(String, u16)> {
        self.config
            .services
            .iter()
            .filter(|s| {
                s.protocol != Protocol::Smtps
                    || s.tls
                        .as_ref()
                        .is_some_and(|t| self.certs.contains_key(&t.secret_name))
            })
            .map(|s| (s.name.clone(), s.port))
            .collect()
    }
}

/// Hash of every file that makes up a snapshot (contents, not mtimes: Kubernetes swaps whole
/// directories through symlinks and mtimes of the targets are not reliable). `tls_dir` is hashed
/// in both layouts: top-level files (`<secret>.crt`/`.key`) and `<secret>/tls.{crt,key}`.
///
/// A file that does not exist hashes as absent; any other I/O error (out of file descriptors, a
/// volume being remounted) is returned, so that an unreadable directory is never mistaken for a
/// changed one.
pub fn fingerprint(dir: &Path, tls_dir: &Path) -> Result<u64, Unreadable> {
    fn read(path: &Path) -> Result<Option<Vec<u8>>, Unreadable> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Unreadable {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
    let mut h = DefaultHasher::new();
    for name in [CONFIG_FILE, CREDENTIALS_FILE, RUNTIME_FILE] {
        name.hash(&mut h);
        read(&dir.join(name))?.hash(&mut h);
    }
    let entries = match std::fs::read_dir(tls_dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(Unreadable {
                path: tls_dir.to_path_buf(),
                source,
            })
        }
    };
    if let Some(entries) = entries {
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            // Kubernetes' `..data` and timestamped directories: the visible names link into them.
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            n.hash(&mut h);
            let p = tls_dir.join(&n);
            if p.is_dir() {
                for f in ["tls.crt", "tls.key"] {
                    read(&p.join(f))?.hash(&mut h);
                }
            } else {
                read(&p)?.hash(&mut h);
            }
        }
    }
    Ok(h.finish())
}

/// A file of the config directory could not be read (an I/O error such as running out of file
/// descriptors), as opposed to a configuration that was read and found invalid: the reloader
/// keeps the live configuration and tries again, without calling anything rejected.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct Unreadable {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Whether `e` is (or was caused by) an [`Unreadable`] file.
pub fn is_unreadable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unreadable>())
}

/// Whether `e` is (or was caused by) a `relay.yaml` and `credentials.yaml` that are not a pair:
/// a transient state while one of them is being replaced, not an invalid configuration.
pub fn is_mismatched(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<PairMismatch>())
}

/// Reads a file of the config directory; I/O errors become [`Unreadable`].
pub fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        anyhow::Error::new(Unreadable {
            path: path.to_path_buf(),
            source,
        })
    })
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = read_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A snapshot without a policy: no services, `policy_loaded: false` (the relay waits for its
/// policy), for the directory as it is now.
pub fn without_policy(dir: &Path, settings: &RuntimeSettings) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        config: RelayConfig::default(),
        credentials: Credentials::default(),
        certs: BTreeMap::new(),
        missing_certs: BTreeMap::new(),
        policy_loaded: false,
        fingerprint: fingerprint(dir, &settings.tls_path(dir))?,
        default_hostname: settings.effective_hostname(),
    })
}

/// Reads and validates the config directory. Without `relay.yaml` the result is
/// [`without_policy`]. A `relay.yaml` and `credentials.yaml` whose `configHash` stamps differ
/// are an error for which [`is_mismatched`] holds.
pub fn load(
    dir: &Path,
    settings: &RuntimeSettings,
    self_signed: &SelfSignedCache,
) -> anyhow::Result<Snapshot> {
    let tls_dir = settings.tls_path(dir);
    let fp = fingerprint(dir, &tls_dir)?;
    let default_hostname = settings.effective_hostname();
    let config_path = dir.join(CONFIG_FILE);
    match std::fs::metadata(&config_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Snapshot {
                config: RelayConfig::default(),
                credentials: Credentials::default(),
                certs: BTreeMap::new(),
                missing_certs: BTreeMap::new(),
                policy_loaded: false,
                fingerprint: fp,
                default_hostname,
            });
        }
        Err(source) => {
            return Err(anyhow::Error::new(Unreadable {
                path: config_path,
                source,
            }))
        }
        Ok(_) => {}
    }
    let config: RelayConfig = read_yaml(&config_path)?;
    let credentials_path = dir.join(CREDENTIALS_FILE);
    let credentials: Credentials = match std::fs::metadata(&credentials_path) {
        Ok(_) => read_yaml(&credentials_path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Credentials::default(),
        Err(source) => {
            return Err(anyhow::Error::new(Unreadable {
                path: credentials_path,
                source,
            }))
        }
    };
    // Before anything else is judged: half of a new policy is not an invalid one.
    check_pair(&config, &credentials)?;
    validate(&config, &credentials)?;
    if !cfg!(feature = "gssapi") {
        for svc in config.services.iter().filter(|s| {
            s.auth
                .mechanisms
                .contains(&mailrelay_crds::config::Mechanism::Gssapi)
        }) {
            tracing::warn!(service = %svc.name, "the policy offers GSSAPI on this service, but this relay was built without Kerberos support (cargo feature gssapi): GSSAPI is not offered; use an image built with it");
        }
    }
    let mut certs = BTreeMap::new();
    let mut missing_certs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in &config.services {
        let Some(tls) = &svc.tls else { continue };
        let secret = &tls.secret_name;
        if certs.contains_key(secret) {
            continue;
        }
        if let Some(users) = missing_certs.get_mut(secret) {
            users.push(svc.name.clone());
            continue;
        }
        let mut names = tls.dns_names.clone();
        if names.is_empty() {
            names.push(
                svc.hostname
                    .clone()
                    .unwrap_or_else(|| default_hostname.clone()),
            );
        }
        let found = cert_files(&tls_dir, secret);
        let generated = SelfSignedCache::is_generated(&tls_dir.join(secret));
        let key = match found {
            // A certificate somebody put there is used as it is.
            Some((crt, key)) if !(settings.self_signed_if_missing && generated) => {
                load_pem_files(&crt, &key).map_err(|e| {
                    anyhow::anyhow!("service {:?}: TLS Secret {secret:?}: {e}", svc.name)
                })?
            }
            _ if settings.self_signed_if_missing => {
                let (key, outcome) = self_signed.ensure(&tls_dir, secret, &names)?;
                if outcome != SelfSignedOutcome::Kept {
                    warn!(service = %svc.name, secret = %secret, dir = %tls_dir.join(secret).display(), ?outcome, "no certificate for this TLS Secret: generated a self-signed one (selfSignedIfMissing)");
                }
                key
            }
            _ => {
                missing_certs.insert(secret.clone(), vec![svc.name.clone()]);
                continue;
            }
        };
        certs.insert(
            secret.clone(),
            LoadedCert {
                key,
                dns_names: names,
            },
        );
    }
    for (secret, services) in &missing_certs {
        for name in services {
            let smtps = config
                .services
                .iter()
                .any(|s| &s.name == name && s.protocol == Protocol::Smtps);
            let effect = if smtps {
                "implicit TLS cannot be served: this SMTPS service does not listen"
            } else {
                "STARTTLS is not offered on this service"
            };
            warn!(service = %name, secret = %secret, tls_dir = %tls_dir.display(), "TLS certificate missing ({secret}.crt/.key or {secret}/tls.crt/tls.key): {effect} until it appears");
        }
    }
    Ok(Snapshot {
        config,
        credentials,
        certs,
        missing_certs,
        policy_loaded: true,
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
