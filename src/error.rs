//! One error type for the whole crate: a stable code (the C ABI's result numbers, see
//! `NumaMoeResult`) and the message a user reads. Lower layers keep their own precise
//! errors ([`crate::expert_map::MapError`], [`crate::topology::TopologyError`],
//! [`crate::sys::SysError`], [`crate::gguf::GgufError`]); they become an [`Error`] where
//! they leave the library: the C ABI, ggml's log, the load report.

use std::fmt;

/// What kind of failure, with numbers that never change (they are the C ABI's).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// An argument or setting is out of range or not understood.
    InvalidArgument = 2,
    /// The expert map is malformed or names nodes or experts that do not exist.
    InvalidMap = 3,
    /// The machine's topology could not be read.
    TopologyUnavailable = 4,
    /// The tensor is not in a numa-moe buffer, or is not a placed expert tensor.
    NotPlaced = 5,
    /// A system call failed (the message names it and the errno).
    SystemError = 6,
    /// A node (or the process's cgroup) has too little memory for what the plan puts there,
    /// or memory could not be reserved.
    OutOfMemory = 8,
}

/// A failure with its code and the message naming the problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<crate::expert_map::MapError> for Error {
    fn from(e: crate::expert_map::MapError) -> Self {
        Error::new(ErrorCode::InvalidMap, e.to_string())
    }
}

impl From<crate::topology::TopologyError> for Error {
    fn from(e: crate::topology::TopologyError) -> Self {
        Error::new(ErrorCode::TopologyUnavailable, e.to_string())
    }
}

impl From<&crate::sys::SysError> for ErrorCode {
    fn from(e: &crate::sys::SysError) -> Self {
        match e.kind {
            crate::sys::SysErrorKind::OutOfMemory => ErrorCode::OutOfMemory,
            _ => ErrorCode::SystemError,
        }
    }
}

impl From<crate::sys::SysError> for Error {
    fn from(e: crate::sys::SysError) -> Self {
        Error::new(ErrorCode::from(&e), e.to_string())
    }
}

impl From<crate::placement::PlanError> for Error {
    fn from(e: crate::placement::PlanError) -> Self {
        let code = match e {
            crate::placement::PlanError::Map(_) => ErrorCode::InvalidMap,
            crate::placement::PlanError::OverFull { .. } => ErrorCode::OutOfMemory,
            _ => ErrorCode::InvalidArgument,
        };
        Error::new(code, e.to_string())
    }
}

impl From<crate::gguf::GgufError> for Error {
    fn from(e: crate::gguf::GgufError) -> Self {
        Error::new(ErrorCode::InvalidArgument, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The text of a caught panic's payload (what `panic!` was given).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_match_the_c_abi() {
        use crate::ffi::NumaMoeResult as R;
        for (code, abi) in [
            (ErrorCode::InvalidArgument, R::InvalidArgument),
            (ErrorCode::InvalidMap, R::InvalidMap),
            (ErrorCode::TopologyUnavailable, R::TopologyUnavailable),
            (ErrorCode::NotPlaced, R::NotPlaced),
            (ErrorCode::SystemError, R::SystemError),
            (ErrorCode::OutOfMemory, R::OutOfMemory),
        ] {
            assert_eq!(code as u32, abi as u32);
            assert_eq!(R::from(code), abi);
        }
        assert_eq!(ErrorCode::OutOfMemory as u32, 8);
    }

    #[test]
    fn lower_errors_keep_their_message_and_get_their_code() {
        let e: Error = crate::expert_map::ExpertMap::parse("0-7:").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::InvalidMap);
        assert!(e.message.contains("0-7:"), "{e}");
        let e: Error = crate::sys::SysError::from_errno("mbind", libc::ENOMEM).into();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        let e: Error = crate::sys::SysError::from_errno("mbind", libc::EPERM).into();
        assert_eq!(e.code, ErrorCode::SystemError);
    }
}
