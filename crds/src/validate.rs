//! Syntax checks shared by the compiler and the relay: domain names, DNS labels, host names.

/// A DNS domain name with at least two labels (`example.test`), letters, digits and hyphens.
pub fn domain_name(d: &str) -> Result<(), String> {
    if d.is_empty() || d.len() > 253 {
        return Err(format!("domain {d:?} must be 1 to 253 characters"));
    }
    let labels: Vec<&str> = d.trim_end_matches('.').split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "domain {d:?} needs at least two labels, e.g. example.com"
        ));
    }
    if let Some(l) = labels.into_iter().find(|l| !valid_label(l)) {
        return Err(format!(
            "domain {d:?} has an invalid label {l:?} (letters, digits and inner hyphens only)"
        ));
    }
    Ok(())
}

/// A host name (one or more labels) or an IP literal, as used for relay hosts.
pub fn host_name(h: &str) -> Result<(), String> {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if h.is_empty() || h.len() > 253 {
        return Err(format!("host {h:?} must be 1 to 253 characters"));
    }
    match h.trim_end_matches('.').split('.').find(|l| !valid_label(l)) {
        Some(l) => Err(format!("host {h:?} has an invalid label {l:?}")),
        None => Ok(()),
    }
}

/// An LDH label (RFC 1035 §2.3.1): 1-63 letters, digits and hyphens, no hyphen at either end.
fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

#[cfg(test)]
mod tests {
    #[test]
    fn domains() {
        assert!(super::domain_name("example.test").is_ok());
        assert!(super::domain_name("localhost").is_err());
        assert!(super::domain_name("-a.test").is_err());
        assert!(super::domain_name("a_b.test").is_err());
        assert!(super::host_name("localhost").is_ok());
        assert!(super::host_name("127.0.0.1").is_ok());
        assert!(super::host_name("smtp..x").is_err());
    }
}
