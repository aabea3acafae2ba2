//! The server side of SASL GSSAPI (RFC 4752, Kerberos V5 only) on MIT krb5's GSS-API through
//! the `libgssapi` crate; compiled with the `gssapi` feature only (it links the system's
//! libgssapi_krb5).
//!
//! The exchange, as the server sees it (each [`Acceptor::step`] gets one client message):
//! 1. the Kerberos AP-REQ: `gss_accept_sec_context` until the context is complete; a last
//!    token (the AP-REP of mutual authentication) goes out as a challenge, and the client's
//!    (empty) answer is ignored, as Cyrus SASL does;
//! 2. the server sends `gss_wrap` (integrity only) of its security-layer offer: only "none"
//!    (1), because SMTP runs over TLS, and a maximum size of 0;
//! 3. the client answers with its wrapped choice (which must be "none") and the authorization
//!    identity. The outcome is the client's principal (`alice@EXAMPLE.COM`) and that identity;
//!    which account that is, is [`super::Exchange`]'s business.
//!
//! The service key comes from the service's keytab in the credentials ([`service_cred`]), written
//! to a private file and handed to MIT through its credential store (`gss_acquire_cred_from` with
//! `keytab=FILE:…` and a replay cache beside it), never through the process-global
//! `KRB5_KTNAME`. Failure texts come from `gss_display_status` and are formatted on the thread
//! that made the failing call, because MIT keeps the detailed krb5 message ("Request ticket
//! server … not found in keytab") thread-local until the next call.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libgssapi::context::{SecurityContext, ServerCtx};
use libgssapi::credential::Cred;
use libgssapi::error::{Error as GssError, MajorFlags};
use libgssapi_sys as sys;

/// RFC 4752 security layer bits.
const LAYER_NONE: u8 = 1;

/// The Kerberos V5 mechanism, 1.2.840.113554.1.2.2.
const OID_KRB5_MECH: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02";
/// GSS_KRB5_NT_PRINCIPAL_NAME, 1.2.840.113554.1.2.2.1 ("service/host@REALM" syntax).
const OID_KRB5_PRINCIPAL_NAME: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01";

// MIT krb5 error codes (krb5.h), as they come back in the GSS minor status.
const KRB5KRB_AP_ERR_BAD_INTEGRITY: i32 = -1765328353;
const KRB5KRB_AP_ERR_TKT_EXPIRED: i32 = -1765328352;
const KRB5KRB_AP_ERR_TKT_NYV: i32 = -1765328351;
const KRB5KRB_AP_ERR_REPEAT: i32 = -1765328350;
const KRB5KRB_AP_ERR_NOT_US: i32 = -1765328349;
const KRB5KRB_AP_ERR_SKEW: i32 = -1765328347;
const KRB5KRB_AP_ERR_MODIFIED: i32 = -1765328343;
const KRB5KRB_AP_ERR_BADKEYVER: i32 = -1765328340;
const KRB5KRB_AP_ERR_NOKEY: i32 = -1765328339;
const KRB5KRB_AP_WRONG_PRINC: i32 = -1765328240;
const KRB5_KT_NOTFOUND: i32 = -1765328203;
const KRB5_KT_KVNONOTFOUND: i32 = -1765328154;
const KRB5_RC_REPLAY: i32 = -1765328221;

/// The service's acceptor credential: the keytab (and optionally the one principal in it that
/// clients must ask for). Cheap to clone (reference counted), `Send + Sync`: acquired once per
/// keytab ([`service_cred`]; a missing or empty keytab fails there, loudly), and each AUTH gets
/// an [`Acceptor`] from it.
#[derive(Clone)]
pub struct ServiceCred {
    cred: Cred,
    description: String,
}

impl ServiceCred {
    /// The credential for the keys in the keytab file `keytab` (only `principal`'s, when given:
    /// e.g. `smtp/mx.example.com@EXAMPLE.COM`), with MIT's replay cache named explicitly (cred
    /// store key `rcache`, e.g. `file2:/run/relay/krb5.rcache2`; `none:` disables replay
    /// detection). `None` = MIT's default, `$KRB5RCACHEDIR/krb5_<uid>.rcache2` (default directory
    /// `/var/tmp`), which must be writable.
    pub fn acquire_with_rcache(
        keytab: &Path,
        principal: Option<&str>,
        rcache: Option<&str>,
    ) -> Result<Self, String> {
        let meta =
            std::fs::metadata(keytab).map_err(|e| format!("keytab {}: {e}", keytab.display()))?;
        if !meta.is_file() || meta.len() == 0 {
            return Err(format!("keytab {}: not a non-empty file", keytab.display()));
        }
        let path = keytab
            .to_str()
            .ok_or_else(|| format!("keytab {}: path is not UTF-8", keytab.display()))?;
        let store_value = CString::new(format!("FILE:{path}"))
            .map_err(|_| format!("keytab {}: path contains NUL", keytab.display()))?;
        let rcache_value = rcache
            .map(|r| CString::new(r).map_err(|_| "rcache name contains NUL".to_string()))
            .transpose()?;
        let mut elements = vec![sys::gss_key_value_element_desc {
            key: c"keytab".as_ptr(),
            value: store_value.as_ptr(),
        }];
        if let Some(r) = &rcache_value {
            elements.push(sys::gss_key_value_element_desc {
                key: c"rcache".as_ptr(),
                value: r.as_ptr(),
            });
        }
        let store = sys::gss_key_value_set_desc {
            count: elements.len() as u32,
            elements: elements.as_mut_ptr(),
        };
        let mut mech_oid = sys::gss_OID_desc {
            length: OID_KRB5_MECH.len() as u32,
            elements: OID_KRB5_MECH.as_ptr() as *mut _,
        };
        let mut mechs = sys::gss_OID_set_desc {
            count: 1,
            elements: &mut mech_oid,
        };

        let mut name: sys::gss_name_t = ptr::null_mut();
        if let Some(p) = principal {
            let mut buf = sys::gss_buffer_desc {
                length: p.len(),
                value: p.as_ptr() as *mut _,
            };
            let mut name_type = sys::gss_OID_desc {
                length: OID_KRB5_PRINCIPAL_NAME.len() as u32,
                elements: OID_KRB5_PRINCIPAL_NAME.as_ptr() as *mut _,
            };
            let mut minor = 0;
            // SAFETY: all pointers are to live locals; gss_import_name copies the buffer.
            let major =
                unsafe { sys::gss_import_name(&mut minor, &mut buf, &mut name_type, &mut name) };
            if major != sys::GSS_S_COMPLETE {
                return Err(format!(
                    "service principal {p:?}: {}",
                    status_text(major, minor)
                ));
            }
        }

        let mut minor = 0;
        let mut raw: sys::gss_cred_id_t = ptr::null_mut();
        // SAFETY: store, mechs and name are valid for the call; MIT copies what it keeps.
        let major = unsafe {
            sys::gss_acquire_cred_from(
                &mut minor,
                name,
                sys::_GSS_C_INDEFINITE,
                &mut mechs,
                sys::GSS_C_ACCEPT as sys::gss_cred_usage_t,
                &store,
                &mut raw,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        let text = if major != sys::GSS_S_COMPLETE {
            Some(status_text(major, minor))
        } else {
            None
        };
        if !name.is_null() {
            let mut m = 0;
            // SAFETY: name came from gss_import_name and is released once.
            unsafe { sys::gss_release_name(&mut m, &mut name) };
        }
        let mut description = match principal {
            Some(p) => format!("{p} from {}", keytab.display()),
            None => format!("any key in {}", keytab.display()),
        };
        if let Some(r) = rcache {
            description.push_str(&format!(", replay cache {r}"));
        }
        match text {
            Some(t) => Err(format!(
                "acquiring the acceptor credential ({description}): {t}"
            )),
            // SAFETY: gss_acquire_cred_from succeeded and handed us the only reference.
            None => Ok(ServiceCred {
                cred: unsafe { Cred::from_c(raw) },
                description,
            }),
        }
    }

    /// What was acquired (keytab path, principal, replay cache), for logs.
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// One RFC 4752 exchange (one `AUTH GSSAPI` command).
pub struct Acceptor {
    ctx: ServerCtx,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Feeding the client's tokens to gss_accept_sec_context.
    Accepting,
    /// The context is complete and its last token was sent: the client's (empty) answer is next.
    AwaitEmpty,
    /// The wrapped layer offer was sent: the client's wrapped choice + authzid is next.
    AwaitChoice,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GssStep {
    /// Send this to the client (SMTP: `334 <base64>`; empty = `334 `) and feed the answer to `step`.
    Challenge(Vec<u8>),
    /// Authenticated: the client's Kerberos principal (e.g. `alice@MAILRELAY.TEST`) and the
    /// authorization identity it asked for (`None` when empty).
    Done {
        principal: String,
        authzid: Option<String>,
    },
}

/// Why an exchange failed; each carries a precise text (GSS major and minor status) for the log.
/// None of it is meant for the client: answer 535 whatever the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GssFailure {
    /// The ticket is expired or not yet valid, or the client's clock is too far off.
    Expired(String),
    /// The ticket is for a key this server does not hold: another service principal, another
    /// realm, an old key version (the keytab was not updated), or a different key. A ticket
    /// altered in transit also lands here (MIT reports it as a failed decryption).
    WrongServiceKey(String),
    /// The same authenticator was presented before.
    Replay(String),
    /// Not a Kerberos token, a token for another mechanism, a tampered or truncated message, or an
    /// RFC 4752 protocol violation (bad layer choice, authzid not UTF-8, message after the end).
    Malformed(String),
    /// The relay's side: the service credential (keytab) cannot be used.
    Other(String),
}

impl GssFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            GssFailure::Expired(_) => "expired ticket",
            GssFailure::WrongServiceKey(_) => "wrong service key",
            GssFailure::Replay(_) => "replayed token",
            GssFailure::Malformed(_) => "malformed exchange",
            GssFailure::Other(_) => "GSS-API failure",
        }
    }
    pub fn detail(&self) -> &str {
        match self {
            GssFailure::Expired(s)
            | GssFailure::WrongServiceKey(s)
            | GssFailure::Replay(s)
            | GssFailure::Malformed(s)
            | GssFailure::Other(s) => s,
        }
    }
}

impl fmt::Display for GssFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind(), self.detail())
    }
}

impl std::error::Error for GssFailure {}

impl Acceptor {
    pub fn with_cred(cred: &ServiceCred) -> Self {
        Acceptor {
            ctx: ServerCtx::new(Some(cred.cred.clone())),
            state: State::Accepting,
        }
    }

    /// Feed one client message (already base64-decoded); returns the next server challenge or
    /// the outcome. After an error the exchange is over (further calls fail).
    pub fn step(&mut self, input: &[u8]) -> Result<GssStep, GssFailure> {
        let state = std::mem::replace(&mut self.state, State::Finished);
        let (next, out) = match state {
            State::Accepting => self.accept(input)?,
            State::AwaitEmpty => (State::AwaitChoice, self.offer_layers()?),
            State::AwaitChoice => (State::Finished, self.read_choice(input)?),
            State::Finished => {
                return Err(GssFailure::Malformed(
                    "message after the end of the exchange".into(),
                ));
            }
        };
        self.state = next;
        Ok(out)
    }

    fn accept(&mut self, input: &[u8]) -> Result<(State, GssStep), GssFailure> {
        if input.is_empty() {
            return Err(GssFailure::Malformed(
                "empty initial token (the client sent no Kerberos AP-REQ)".into(),
            ));
        }
        let token = self
            .ctx
            .step(input, None)
            .map_err(|e| classify(&e, "accepting the client's token"))?;
        if !self.ctx.is_complete() {
            // A continuation token: only multi-round mechanisms need it; krb5 with mutual
            // authentication completes in one round, but follow the protocol anyway.
            let tok = token.map(|t| t.to_vec()).unwrap_or_default();
            return Ok((State::Accepting, GssStep::Challenge(tok)));
        }
        match token {
            Some(t) if !t.is_empty() => Ok((State::AwaitEmpty, GssStep::Challenge(t.to_vec()))),
            _ => Ok((State::AwaitChoice, self.offer_layers()?)),
        }
    }

    fn offer_layers(&mut self) -> Result<GssStep, GssFailure> {
        let offer = [LAYER_NONE, 0, 0, 0];
        let wrapped = self
            .ctx
            .wrap(false, &offer)
            .map_err(|e| classify(&e, "wrapping the layer offer"))?;
        Ok(GssStep::Challenge(wrapped.to_vec()))
    }

    fn read_choice(&mut self, input: &[u8]) -> Result<GssStep, GssFailure> {
        let plain = self
            .ctx
            .unwrap(input)
            .map_err(|e| classify(&e, "unwrapping the client's layer choice"))?;
        if plain.len() < 4 {
            return Err(GssFailure::Malformed(format!(
                "the client's layer choice is {} octets, at least 4 expected",
                plain.len()
            )));
        }
        if plain[0] != LAYER_NONE {
            return Err(GssFailure::Malformed(format!(
                "the client chose security layer {:#04x}; only 0x01 (none) was offered",
                plain[0]
            )));
        }
        let authzid = match std::str::from_utf8(&plain[4..]) {
            Ok("") => None,
            Ok(s) if s.contains('\0') => {
                return Err(GssFailure::Malformed("authzid contains NUL".into()));
            }
            Ok(s) => Some(s.to_string()),
            Err(_) => return Err(GssFailure::Malformed("authzid is not UTF-8".into())),
        };
        let name = self
            .ctx
            .source_name()
            .map_err(|e| classify(&e, "reading the client's name"))?;
        let display = name
            .display_name()
            .map_err(|e| classify(&e, "displaying the client's name"))?;
        let principal = String::from_utf8(display.to_vec())
            .map_err(|_| GssFailure::Other("the client's principal name is not UTF-8".into()))?;
        Ok(GssStep::Done { principal, authzid })
    }
}

/// "major text; minor text [major 0x..., minor N]" from gss_display_status, on this thread.
fn status_text(major: u32, minor: u32) -> String {
    let e = GssError {
        major: MajorFlags::from_bits_retain(major),
        minor,
    };
    // libgssapi's Display: the major text, then " (minor text)"; minor 0 says "Unknown error".
    let text = e.to_string();
    let text = if minor == 0 {
        text.trim_end_matches(" (Unknown error)").to_string()
    } else {
        text
    };
    format!("{text} [major {major:#010x}, minor {}]", minor as i32)
}

fn classify(e: &GssError, what: &str) -> GssFailure {
    let major = e.major.bits();
    let text = format!("{what}: {}", status_text(major, e.minor));
    let routine = major & 0x00ff_0000; // GSS_C_ROUTINE_ERROR_MASK << 16
    let is = |f: MajorFlags| routine == f.bits();
    match e.minor as i32 {
        KRB5KRB_AP_ERR_TKT_EXPIRED | KRB5KRB_AP_ERR_TKT_NYV | KRB5KRB_AP_ERR_SKEW => {
            return GssFailure::Expired(text);
        }
        KRB5KRB_AP_ERR_REPEAT | KRB5_RC_REPLAY => return GssFailure::Replay(text),
        KRB5KRB_AP_ERR_BAD_INTEGRITY
        | KRB5KRB_AP_ERR_NOT_US
        | KRB5KRB_AP_ERR_BADKEYVER
        | KRB5KRB_AP_ERR_NOKEY
        | KRB5KRB_AP_WRONG_PRINC
        | KRB5_KT_NOTFOUND
        | KRB5_KT_KVNONOTFOUND => return GssFailure::WrongServiceKey(text),
        KRB5KRB_AP_ERR_MODIFIED => return GssFailure::Malformed(text),
        _ => {}
    }
    if is(MajorFlags::GSS_S_CREDENTIALS_EXPIRED) || is(MajorFlags::GSS_S_CONTEXT_EXPIRED) {
        GssFailure::Expired(text)
    } else if e.major.contains(MajorFlags::GSS_S_DUPLICATE_TOKEN) {
        GssFailure::Replay(text)
    } else if is(MajorFlags::GSS_S_NO_CRED)
        || is(MajorFlags::GSS_S_DEFECTIVE_CREDENTIAL)
        || is(MajorFlags::GSS_S_UNAVAILABLE)
    {
        // The relay's own credential: the keytab cannot be used.
        GssFailure::Other(text)
    } else {
        // Everything else went wrong with what the client sent (a token that is no Kerberos
        // AP-REQ gets a bare GSS_S_FAILURE from the mechanism glue).
        GssFailure::Malformed(text)
    }
}

/// Where keytabs and the replay cache are written: `MAILRELAY_GSSAPI_DIR`, or a private
/// directory under the temporary directory. It must be writable (an `emptyDir` in a pod with a
/// read-only root file system).
fn run_dir() -> PathBuf {
    std::env::var_os("MAILRELAY_GSSAPI_DIR")
        .map(PathBuf::from)
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("mailrelay-gssapi-{}", unsafe { libc::getuid() }))
        })
}

/// The acceptor credential of `service`, from its keytab as the credentials carry it (base64)
/// and the principal clients must ask for. Acquired once per keytab content and principal; a
/// changed keytab (a key rotation) is written and acquired anew, and the service's older keytab
/// files are removed.
pub fn service_cred(
    service: &str,
    keytab_b64: &str,
    principal: Option<&str>,
) -> Result<ServiceCred, String> {
    /// Per service: the keytab (base64) and principal a credential was acquired for.
    struct Cached {
        keytab_b64: String,
        principal: Option<String>,
        cred: ServiceCred,
    }
    static CACHE: Mutex<BTreeMap<String, Cached>> = Mutex::new(BTreeMap::new());
    let hit = CACHE.lock().ok().and_then(|c| {
        c.get(service)
            .filter(|e| e.keytab_b64 == keytab_b64 && e.principal.as_deref() == principal)
            .map(|e| e.cred.clone())
    });
    if let Some(cred) = hit {
        return Ok(cred);
    }
    let bytes = B64
        .decode(keytab_b64)
        .map_err(|e| format!("the keytab of service {service:?} is not base64: {e}"))?;
    let dir = run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("GSSAPI directory {}: {e}", dir.display()))?;
    let digest = {
        use sha2::Digest as _;
        hex::encode(&sha2::Sha256::digest(&bytes)[..8])
    };
    let safe: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{safe}-{digest}.keytab"));
    if !path.exists() {
        let tmp = dir.join(format!(".{safe}-{digest}.keytab.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("writing keytab {}: {e}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("writing keytab {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| format!("writing keytab {}: {e}", path.display()))?;
    }
    // Older keytabs of this service are secrets no longer in use.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{safe}-"))
                && name.ends_with(".keytab")
                && e.path() != path
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let rcache = format!("file2:{}", dir.join("krb5.rcache2").display());
    let cred = ServiceCred::acquire_with_rcache(&path, principal, Some(&rcache))?;
    if let Ok(mut c) = CACHE.lock() {
        c.insert(
            service.to_string(),
            Cached {
                keytab_b64: keytab_b64.to_string(),
                principal: principal.map(str::to_string),
                cred: cred.clone(),
            },
        );
    }
    Ok(cred)
}
