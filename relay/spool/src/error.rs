//! The spool's error type: what went wrong, in the terms a caller acts on (the message is gone,
//! the disk is full, the spool must be restarted, or an I/O failure with what the spool was
//! doing and where).

use std::io;

use crate::MessageId;

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message is not (or no longer) in the spool.
    #[error("message {0} is not in the spool")]
    NotFound(MessageId),
    /// The file system holding the spool is full or over quota (`ENOSPC`, `EDQUOT`): nothing
    /// was stored; try again later, and free space.
    #[error("spool file system is full: {0}")]
    Full(io::Error),
    /// A directory sync failed earlier; the spool refuses every change until the process
    /// restarts (recovery then decides what is committed).
    #[error("spool refuses changes after a failed directory sync ({0}); restart to recover")]
    Poisoned(String),
    /// The spool's committer thread has stopped (the process is shutting down or it panicked).
    #[error("spool committer thread has stopped")]
    Stopped,
    /// What the caller asked to store is not a valid message (envelope and data disagree, or
    /// the envelope cannot be encoded).
    #[error("invalid message: {0}")]
    Invalid(String),
    /// An earlier write of this incoming message failed; it can only be dropped.
    #[error("an earlier write of this message failed")]
    Abandoned,
    /// Any other I/O failure; the message says what the spool was doing and on which file.
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Error::Full(e),
            _ => Error::Io(e),
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Io(io::Error::other(e))
    }
}

/// Result of a spool operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_are_told_apart() {
        let full = Error::from(io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(full, Error::Full(_)), "{full:?}");
        let quota = Error::from(io::Error::from(io::ErrorKind::QuotaExceeded));
        assert!(matches!(quota, Error::Full(_)), "{quota:?}");
        let other = Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(matches!(other, Error::Io(_)), "{other:?}");
    }
}
