//! IP address groups: parsing entries (addresses, prefixes, ranges), rejecting host bits and
//! overlaps inside a group, and resolving includes with cycle detection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};

use super::report::Problem;
use crate::config::IpSet;

/// Parses one entry into prefixes.
pub fn parse_entry(entry: &str) -> Result<Vec<IpNet>, String> {
    let e = entry.trim();
    if let Some((a, b)) = e.split_once('-') {
        let start: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("range {e:?}: {a:?} is not an IP address"))?;
        let end: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| format!("range {e:?}: {b:?} is not an IP address"))?;
        return match (start, end) {
            (IpAddr::V4(s), IpAddr::V4(t)) if s <= t => {
                Ok(Ipv4Subnets::new(s, t, 0).map(IpNet::V4).collect())
            }
            (IpAddr::V6(s), IpAddr::V6(t)) if s <= t => {
                Ok(Ipv6Subnets::new(s, t, 0).map(IpNet::V6).collect())
            }
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Err(format!("range {e:?} ends before it starts"))
            }
            _ => Err(format!("range {e:?} mixes IPv4 and IPv6")),
        };
    }
    if e.contains('/') {
        let net: IpNet = e.parse().map_err(|_| {
            format!("{e:?} is not a CIDR prefix (e.g. 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        if net.network() != net.addr() {
            return Err(format!(
                "{e:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(vec![net]);
    }
    let ip: IpAddr = e
        .parse()
        .map_err(|_| format!("{e:?} is not an IP address, CIDR prefix or range"))?;
    Ok(vec![IpNet::from(ip)])
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A group's own entries, parsed and checked. Problems are reported per entry.
pub fn own_prefixes(addresses: &[String]) -> (Vec<(usize, Vec<IpNet>)>, Vec<Problem>) {
    let mut parsed = Vec::new();
    let mut problems = Vec::new();
    for (i, a) in addresses.iter().enumerate() {
        match parse_entry(a) {
            Ok(nets) => parsed.push((i, nets)),
            Err(m) => problems.push(Problem::invalid(
                format!("spec.addresses[{i}]"),
                "InvalidAddress",
                m,
            )),
        }
    }
    for x in 0..parsed.len() {
        for y in (x + 1)..parsed.len() {
            let (i, ref a) = parsed[x];
            let (j, ref b) = parsed[y];
            if a.iter().any(|n| b.iter().any(|m| overlaps(n, m))) {
                problems.push(Problem::invalid(
                    format!("spec.addresses[{j}]"),
                    "OverlappingAddresses",
                    format!(
                        "{:?} overlaps {:?} (entry {i}); remove one or merge them",
                        addresses[j], addresses[i]
                    ),
                ));
            }
        }
    }
    (parsed, problems)
}

/// Resolves includes. `own` holds the groups whose own entries are valid; the result holds every
/// group that resolved, and problems for the rest (missing or invalid includes, cycles).
pub fn resolve(
    own: &BTreeMap<String, (Vec<IpNet>, Vec<String>)>,
    all_names: &BTreeSet<String>,
) -> (BTreeMap<String, IpSet>, BTreeMap<String, Vec<Problem>>) {
    let mut done: BTreeMap<String, IpSet> = BTreeMap::new();
    let mut failed: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
    for name in own.keys() {
        let mut stack = Vec::new();
        visit(name, own, all_names, &mut stack, &mut done, &mut failed);
    }
    (done, failed)
}

fn visit(
    name: &str,
    own: &BTreeMap<String, (Vec<IpNet>, Vec<String>)>,
    all_names: &BTreeSet<String>,
    stack: &mut Vec<String>,
    done: &mut BTreeMap<String, IpSet>,
    failed: &mut BTreeMap<String, Vec<Problem>>,
) -> bool {
    if done.contains_key(name) {
        return true;
    }
    if failed.contains_key(name) {
        return false;
    }
    let Some((nets, includes)) = own.get(name) else {
        return false;
    };
    if let Some(pos) = stack.iter().position(|s| s == name) {
        let mut cycle: Vec<String> = stack[pos..].to_vec();
        cycle.push(name.to_string());
        let path = cycle.join(" -> ");
        for member in &stack[pos..] {
            failed
                .entry(member.clone())
                .or_default()
                .push(Problem::invalid(
                    "spec.includes",
                    "IncludeCycle",
                    format!("include cycle {path}; remove one of these includes"),
                ));
        }
        return false;
    }
    stack.push(name.to_string());
    let mut all = nets.clone();
    let mut problems = Vec::new();
    for (i, inc) in includes.iter().enumerate() {
        if !all_names.contains(inc) {
            problems.push(Problem::invalid(
                format!("spec.includes[{i}]"),
                "MissingReference",
                format!("includes IpAddressGroup {inc:?}, which does not exist"),
            ));
            continue;
        }
        if visit(inc, own, all_names, stack, done, failed) {
            if let Some(set) = done.get(inc) {
                all.extend(set.0.iter().copied());
            }
        } else if !failed.contains_key(name) {
            problems.push(Problem::invalid(
                format!("spec.includes[{i}]"),
                "InvalidReference",
                format!("includes IpAddressGroup {inc:?}, which is invalid; fix that group first"),
            ));
        }
    }
    stack.pop();
    if let Some(existing) = failed.get_mut(name) {
        existing.extend(problems);
        return false;
    }
    if !problems.is_empty() {
        failed.insert(name.to_string(), problems);
        return false;
    }
    done.insert(name.to_string(), IpSet(IpNet::aggregate(&all)));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert_eq!(parse_entry("10.0.0.0/8").unwrap().len(), 1);
        assert_eq!(
            parse_entry("192.0.2.1").unwrap()[0].to_string(),
            "192.0.2.1/32"
        );
        assert_eq!(
            parse_entry("192.0.2.0-192.0.2.255").unwrap()[0].to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(parse_entry("192.0.2.1-192.0.2.2").unwrap().len(), 2);
        assert!(parse_entry("10.0.0.1/8")
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8"));
        assert!(parse_entry("10.0.0.0/33").is_err());
        assert!(parse_entry("300.1.1.1").is_err());
        assert!(parse_entry("192.0.2.9-192.0.2.1").is_err());
        assert!(parse_entry("192.0.2.1-::1").is_err());
        assert_eq!(parse_entry("2001:db8::/32").unwrap().len(), 1);
    }

    #[test]
    fn overlaps_are_reported() {
        let (_, p) = own_prefixes(&["10.0.0.0/8".into(), "10.1.0.0/16".into()]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].reason, "OverlappingAddresses");
    }
}
