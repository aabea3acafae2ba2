//! The sans-IO SMTP protocol core: command parsing ([`parser`]), replies ([`reply`]), the session
//! state machine ([`session`]) and the trace header ([`received`]). Nothing in here touches a
//! socket, a file or a clock of its own.

pub mod parser;
pub mod received;
pub mod reply;
pub mod session;

pub use reply::Reply;
pub use session::{
    Event, Policy, Session, SessionConfig, SessionFacts, StoreFailure, TlsInfo, Transaction,
};

#[cfg(test)]
mod tests;
