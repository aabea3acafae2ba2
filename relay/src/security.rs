//! The vocabulary of security events: every kind the relay logs (target `security`) and counts
//! (`mailrelay_security_events_total{kind}`), with the limit it belongs to
//! (`mailrelay_limit_hits_total{limit}`), and [`Refusal`], the one type for "no, and here is
//! why" that admission, limits and the envelope policy return. Labels are written here once; the
//! compiler checks every use.

use std::fmt;

use crate::limits::{
    gate::{CLIENT_WITHOUT_PTR, SENDER_DOMAIN_WITHOUT_DNS},
    AUTH_BLOCK, AUTH_FAILURES_PER_ACCOUNT, AUTH_FAILURES_PER_IP, CONNECTIONS_PER_IP, HARVEST_BLOCK,
    MESSAGES_PER_HOUR_PER_ACCOUNT, MESSAGES_PER_HOUR_PER_IP, UNKNOWN_RECIPIENTS_PER_IP,
};
use crate::smtp::Reply;

/// What happened, as the security log and metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityKind {
    // Connections.
    /// Not in the service's `allowedFrom` groups.
    ConnectionRefused,
    /// Concurrent connections per IP reached.
    ConnectionLimit,
    /// Refused while blocked for directory harvesting.
    HarvestBlocked,
    /// A PROXY header that does not parse, or none in time from a trusted proxy.
    ProxyHeaderInvalid,
    /// A PROXY header from a peer that is not a trusted proxy.
    ProxyHeaderUntrusted,
    /// A client too slow for the line or data-rate deadlines.
    SlowClient,
    /// A client without a PTR record, refused by `rejectClientWithoutPtr`.
    ClientWithoutPtr,
    /// A client listed on the service's DNS blocklists (refused, or only logged and tagged).
    DnsblListed,
    // Protocol abuse.
    /// A command line ending in a bare LF.
    BareLfCommand,
    /// A bare CR or LF in message content (SMTP smuggling attempt or broken client).
    BareNewline,
    /// Commands pipelined behind STARTTLS (CVE-2011-0411 style injection).
    StarttlsInjection,
    /// `maxFailedCommands` reached.
    TooManyFailedCommands,
    /// `maxRecipientsPerMessage` reached.
    TooManyRecipients,
    /// `maxMessageSizeBytes` exceeded.
    MessageTooLarge,
    /// More `Received:` headers than `maxReceivedHeaders`.
    MailLoop,
    // Authentication.
    /// A mail command before AUTH where authentication is required.
    AuthRequired,
    /// AUTH before TLS where clear-text authentication is not allowed.
    AuthTlsRequired,
    /// AUTH with a mechanism the service does not offer.
    AuthMechanismNotAllowed,
    /// A failed login.
    AuthFailure,
    /// No verification slot free in time.
    AuthQueueFull,
    /// An account over its failed-login threshold: attempts are delayed.
    AccountAuthThrottled,
    /// An address reached the failed-login threshold and is blocked from now on.
    AuthBruteForce,
    /// A blocked address refused.
    AuthBlocked,
    // Envelope.
    /// The sender is refused (sender binding).
    SenderRejected,
    /// The sender's domain has no DNS records, refused by `rejectSenderDomainWithoutDns`.
    SenderDomainWithoutDns,
    /// A recipient in a local domain that does not exist (counted for harvest detection).
    UnknownRecipient,
    /// A recipient refused for another reason (relaying denied).
    RecipientRejected,
    /// Unknown recipients per IP reached: the address is blocked.
    DirectoryHarvestAttack,
    /// `maxMessagesPerHour` per IP reached.
    MessageRateLimit,
    /// The access policy's `maxMessagesPerHour` per account reached.
    AccountRateLimit,
}

impl SecurityKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [SecurityKind; 30] = [
        SecurityKind::ConnectionRefused,
        SecurityKind::ConnectionLimit,
        SecurityKind::HarvestBlocked,
        SecurityKind::ProxyHeaderInvalid,
        SecurityKind::ProxyHeaderUntrusted,
        SecurityKind::SlowClient,
        SecurityKind::ClientWithoutPtr,
        SecurityKind::DnsblListed,
        SecurityKind::BareLfCommand,
        SecurityKind::BareNewline,
        SecurityKind::StarttlsInjection,
        SecurityKind::TooManyFailedCommands,
        SecurityKind::TooManyRecipients,
        SecurityKind::MessageTooLarge,
        SecurityKind::MailLoop,
        SecurityKind::AuthRequired,
        SecurityKind::AuthTlsRequired,
        SecurityKind::AuthMechanismNotAllowed,
        SecurityKind::AuthFailure,
        SecurityKind::AuthQueueFull,
        SecurityKind::AccountAuthThrottled,
        SecurityKind::AuthBruteForce,
        SecurityKind::AuthBlocked,
        SecurityKind::SenderRejected,
        SecurityKind::SenderDomainWithoutDns,
        SecurityKind::UnknownRecipient,
        SecurityKind::RecipientRejected,
        SecurityKind::DirectoryHarvestAttack,
        SecurityKind::MessageRateLimit,
        SecurityKind::AccountRateLimit,
    ];

    /// The `kind` of the log line and of `mailrelay_security_events_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SecurityKind::ConnectionRefused => "connection_refused",
            SecurityKind::ConnectionLimit => "connection_limit",
            SecurityKind::HarvestBlocked => "harvest_blocked",
            SecurityKind::ProxyHeaderInvalid => "proxy_header_invalid",
            SecurityKind::ProxyHeaderUntrusted => "proxy_header_untrusted",
            SecurityKind::SlowClient => "slow_client",
            SecurityKind::ClientWithoutPtr => "client_without_ptr",
            SecurityKind::DnsblListed => "dnsbl_listed",
            SecurityKind::BareLfCommand => "bare_lf_command",
            SecurityKind::BareNewline => "bare_newline",
            SecurityKind::StarttlsInjection => "starttls_injection",
            SecurityKind::TooManyFailedCommands => "too_many_failed_commands",
            SecurityKind::TooManyRecipients => "too_many_recipients",
            SecurityKind::MessageTooLarge => "message_too_large",
            SecurityKind::MailLoop => "mail_loop",
            SecurityKind::AuthRequired => "auth_required",
            SecurityKind::AuthTlsRequired => "auth_tls_required",
            SecurityKind::AuthMechanismNotAllowed => "auth_mechanism_not_allowed",
            SecurityKind::AuthFailure => "auth_failure",
            SecurityKind::AuthQueueFull => "auth_queue_full",
            SecurityKind::AccountAuthThrottled => "account_auth_throttled",
            SecurityKind::AuthBruteForce => "auth_brute_force",
            SecurityKind::AuthBlocked => "auth_blocked",
            SecurityKind::SenderRejected => "sender_rejected",
            SecurityKind::SenderDomainWithoutDns => "sender_domain_without_dns",
            SecurityKind::UnknownRecipient => "unknown_recipient",
            SecurityKind::RecipientRejected => "recipient_rejected",
            SecurityKind::DirectoryHarvestAttack => "directory_harvest_attack",
            SecurityKind::MessageRateLimit => "message_rate_limit",
            SecurityKind::AccountRateLimit => "account_rate_limit",
        }
    }

    /// The limit this event is a hit of (`mailrelay_limit_hits_total{limit}`), if any.
    pub const fn limit(self) -> Option<&'static str> {
        Some(match self {
            SecurityKind::ConnectionLimit => CONNECTIONS_PER_IP,
            SecurityKind::HarvestBlocked => HARVEST_BLOCK,
            SecurityKind::ClientWithoutPtr => CLIENT_WITHOUT_PTR,
            SecurityKind::TooManyFailedCommands => "failed_commands",
            SecurityKind::TooManyRecipients => "recipients_per_message",
            SecurityKind::MessageTooLarge => "message_size",
            SecurityKind::MailLoop => "received_headers",
            SecurityKind::AuthQueueFull => crate::limits::auth::AUTH_VERIFICATIONS,
            SecurityKind::AccountAuthThrottled => AUTH_FAILURES_PER_ACCOUNT,
            SecurityKind::AuthBruteForce => AUTH_FAILURES_PER_IP,
            SecurityKind::AuthBlocked => AUTH_BLOCK,
            SecurityKind::SenderDomainWithoutDns => SENDER_DOMAIN_WITHOUT_DNS,
            SecurityKind::DirectoryHarvestAttack => UNKNOWN_RECIPIENTS_PER_IP,
            SecurityKind::MessageRateLimit => MESSAGES_PER_HOUR_PER_IP,
            SecurityKind::AccountRateLimit => MESSAGES_PER_HOUR_PER_ACCOUNT,
            _ => return None,
        })
    }
}

impl SecurityKind {
    /// The `reason` of `mailrelay_connections_refused_total` when this kind turns a connection
    /// away before any command (a fixed set, documented on the metric).
    pub const fn refused_reason(self) -> &'static str {
        match self {
            SecurityKind::ConnectionRefused => "not_allowed",
            k => k.as_str(),
        }
    }
}

impl fmt::Display for SecurityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the reply the client gets, the event it is, and the precise reason for the
/// security log (the client only ever sees the generic reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub kind: SecurityKind,
    pub detail: String,
}

impl Refusal {
    pub fn new(reply: Reply, kind: SecurityKind, detail: impl Into<String>) -> Refusal {
        Refusal {
            reply,
            kind,
            detail: detail.into(),
        }
    }

    /// The `limit` label: the kind's limit, or the kind itself for refusals that are not a
    /// configured limit.
    pub fn limit(&self) -> &'static str {
        self.kind.limit().unwrap_or(self.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn labels_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for k in SecurityKind::ALL {
            let s = k.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
        }
        let limits: Vec<&str> = SecurityKind::ALL.iter().filter_map(|k| k.limit()).collect();
        let unique: HashSet<&&str> = limits.iter().collect();
        assert_eq!(unique.len(), limits.len(), "one kind per limit: {limits:?}");
    }
}
