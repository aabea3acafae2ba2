//! What the compiler says about each object: the problems it found, with the field, a machine
//! reason (the condition reason) and a message that tells the administrator what to fix.

use std::fmt;

/// The resource kinds the compiler reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    IpAddressGroup,
    MailDomain,
    SmtpService,
    DeliveryRule,
    AccessPolicy,
}

impl Kind {
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
    pub severity: Severity,
    /// JSON path of the offending field, e.g. `spec.match.recipients[1]`.
    pub field: String,
    /// CamelCase condition reason, e.g. `MissingReference`, `OpenRelay`.
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
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
    pub kind: Kind,
    pub name: String,
    pub generation: Option<i64>,
    pub problems: Vec<Problem>,
    /// IpAddressGroup only: number of prefixes after resolution.
    pub resolved_prefixes: Option<usize>,
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
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity != Severity::Warning)
    }
}

/// Per-object verdicts, in kind then name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub objects: Vec<ObjectReport>,
}

impl Report {
    pub fn get(&self, kind: Kind, name: &str) -> Option<&ObjectReport> {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
    }
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
