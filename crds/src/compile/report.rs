//! What the compiler says about each object: the problems it found, with the field, a machine
//! reason (the condition reason) and a message that tells the administrator what to fix.

use std::fmt;

/// The resource kinds the compiler reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An `IpAddressGroup`.
    IpAddressGroup,
    /// A `MailDomain` (its accounts and recipients Secrets are reported on it).
    MailDomain,
    /// An `SmtpService`.
    SmtpService,
    /// A `DeliveryRule` (its relay-auth Secret is reported on it).
    DeliveryRule,
    /// An `AccessPolicy`.
    AccessPolicy,
}

impl Kind {
    /// The resource's `kind` as written in YAML, e.g. `SmtpService`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::IpAddressGroup => "IpAddressGroup",
            Kind::MailDomain => "MailDomain",
            Kind::SmtpService => "SmtpService",
            Kind::DeliveryRule => "DeliveryRule",
            Kind::AccessPolicy => "AccessPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The object is left out of the compiled policy.
    Invalid,
    /// Part of the object (e.g. one account) is left out; the rest compiles.
    Degraded,
    /// Compiled as written, but risky or probably not what was meant.
    Warning,
}

/// One finding about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What the problem does to the object: left out, partly left out, or only a warning.
    pub severity: Severity,
    /// JSON path of the offending field, e.g. `spec.match.recipients[1]`.
    pub field: String,
    /// CamelCase condition reason, e.g. `MissingReference`, `OpenRelay`.
    pub reason: &'static str,
    /// What is wrong and how to fix it, for the condition message and `operator render`.
    pub message: String,
}

impl Problem {
    /// A problem that leaves the whole object out of the compiled policy.
    pub fn invalid(
        field: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            severity: Severity::Invalid,
            field: field.into(),
            reason,
            message: message.into(),
        }
    }
    /// A problem that leaves part of the object (e.g. one account) out; the rest compiles.
    pub fn degraded(
        field: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            severity: Severity::Degraded,
            field: field.into(),
            reason,
            message: message.into(),
        }
    }
    /// A finding that does not stop the object from compiling as written.
    pub fn warning(
        field: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            severity: Severity::Warning,
            field: field.into(),
            reason,
            message: message.into(),
        }
    }
}

/// The compiler's verdict on one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectReport {
    /// The object's kind.
    pub kind: Kind,
    /// The object's `metadata.name`.
    pub name: String,
    /// The `metadata.generation` that was compiled (becomes `status.observedGeneration`).
    pub generation: Option<i64>,
    /// Everything found, in the order found; empty for a clean object.
    pub problems: Vec<Problem>,
    /// IpAddressGroup only: number of prefixes after resolution.
    pub resolved_prefixes: Option<usize>,
    /// MailDomain only: the DNS records it needs (`status.dnsRecords`).
    pub dns_records: Vec<crate::api::DnsRecord>,
    /// The object is invalid now but was live in the previous output, and that last good
    /// version stays live (its problems say why the current spec is not).
    pub stale: bool,
}

impl ObjectReport {
    /// The current spec was rejected. The object is left out of the compiled policy unless it
    /// is [`Self::stale`].
    pub fn is_invalid(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.severity == Severity::Invalid)
    }
    /// Part of the compiled policy: valid, or invalid with its last good version kept.
    pub fn is_live(&self) -> bool {
        self.stale || !self.is_invalid()
    }
    /// Anything that should fail a pre-merge check (invalid or partly left out).
    pub fn has_errors(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.severity != Severity::Warning)
    }
    /// The problems of severity [`Severity::Warning`].
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }
    /// The problems that are not warnings (invalid or degraded).
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity != Severity::Warning)
    }
}

/// Per-object verdicts, in kind then name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One entry per input object.
    pub objects: Vec<ObjectReport>,
}

impl Report {
    /// The verdict on one object, if it was among the inputs.
    pub fn get(&self, kind: Kind, name: &str) -> Option<&ObjectReport> {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
    }
    /// Whether any object has an error ([`ObjectReport::has_errors`]): what fails `operator
    /// render`.
    pub fn has_errors(&self) -> bool {
        self.objects.iter().any(ObjectReport::has_errors)
    }
    /// One line per problem: `SmtpService/submission: spec.tls: message (Reason)`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for o in &self.objects {
            for p in &o.problems {
                let sev = match p.severity {
                    Severity::Invalid if o.stale => "invalid (its last good version stays live)",
                    Severity::Invalid => "invalid",
                    Severity::Degraded => "partly invalid",
                    Severity::Warning => "warning",
                };
                out.push(format!(
                    "{}/{}: {sev}: {}: {} ({})",
                    o.kind, o.name, p.field, p.message, p.reason
                ));
            }
        }
        out
    }
}
