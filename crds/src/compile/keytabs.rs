//! SmtpService `authentication.gssapi` → the service's Kerberos keytab in the credentials and
//! its service principal in the policy. A keytab that cannot be used leaves the service up
//! without GSSAPI (degraded, with the reason); the other mechanisms are unaffected.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kube::ResourceExt;

use super::report::{Kind, ObjectReport, Problem};
use super::Ctx;
use crate::api::SmtpService;
use crate::config::{DomainPolicy, Mechanism, ServicePolicy};
use crate::verifier::SecretString;

/// Default key of the keytab in its Secret.
pub const KEYTAB_KEY: &str = "krb5.keytab";

/// Fills in the keytab of every compiled service that offers GSSAPI, or takes GSSAPI off it
/// with a `Degraded` problem saying why; warns when no MailDomain has a `kerberosRealm`.
pub fn compile(
    ctx: &Ctx<'_>,
    objs: &[SmtpService],
    services: &mut [ServicePolicy],
    domains: &[DomainPolicy],
    reports: &mut [ObjectReport],
) -> BTreeMap<String, SecretString> {
    let mut keytabs = BTreeMap::new();
    for svc in services
        .iter_mut()
        .filter(|s| s.auth.mechanisms.contains(&Mechanism::Gssapi))
    {
        let spec = objs
            .iter()
            .find(|o| o.name_any() == svc.name)
            .and_then(|o| o.spec.authentication.as_ref())
            .and_then(|a| a.gssapi.as_ref());
        let Some(r) = reports
            .iter_mut()
            .find(|r| r.kind == Kind::SmtpService && r.name == svc.name)
        else {
            continue;
        };
        let keytab = match spec {
            None => Err((
                "spec.authentication.mechanisms",
                "GSSAPI is listed but authentication.gssapi.keytabSecretRef is not set; GSSAPI is not offered".to_string(),
            )),
            Some(g) => {
                let key = g.keytab_secret_ref.key.as_deref().unwrap_or(KEYTAB_KEY);
                ctx.secrets
                    .get_bytes(&g.keytab_secret_ref.name, key)
                    .and_then(|b| check_keytab(&b).map(|()| b))
                    .map_err(|m| {
                        (
                            "spec.authentication.gssapi.keytabSecretRef",
                            format!("{m}; GSSAPI is not offered"),
                        )
                    })
            }
        };
        match keytab {
            Ok(bytes) => {
                keytabs.insert(svc.name.clone(), SecretString::new(B64.encode(bytes)));
                svc.auth.gssapi_principal = spec.and_then(|g| g.service_principal.clone());
                if domains.iter().all(|d| d.kerberos_realm.is_none()) {
                    r.problems.push(Problem::warning(
                        "spec.authentication.mechanisms",
                        "NoKerberosRealm",
                        "GSSAPI is offered but no MailDomain sets kerberosRealm, so every Kerberos login fails; set kerberosRealm (the upper-case DNS form, e.g. EXAMPLE.COM) on the MailDomains whose accounts use Kerberos",
                    ));
                }
            }
            Err((field, message)) => {
                svc.auth.mechanisms.retain(|m| *m != Mechanism::Gssapi);
                r.problems
                    .push(Problem::degraded(field, "KeytabUnusable", message));
            }
        }
    }
    keytabs
}

/// An MIT keytab file starts with 0x05 and format version 1 or 2, and has at least one entry.
fn check_keytab(bytes: &[u8]) -> Result<(), String> {
    match bytes {
        [0x05, 0x01 | 0x02, _, _, _, _, ..] => Ok(()),
        [] => Err("the keytab is empty".into()),
        _ => Err("this is not a keytab file (MIT keytabs start with 0x05 0x02; export one with `kadmin -q \"ktadd -k smtp.keytab smtp/<host>\"` or `ktutil`)".into()),
    }
}
