//! The C ABI: result codes, the panic boundary, NULL checks and the last-error message.
//!
//! Every exported function is `numa_moe_<object>_<verb>`, runs its body inside
//! [`boundary`] (a panic becomes `NUMA_MOE_RESULT_PANIC`, never an unwind into C), checks
//! pointers with the helpers below, and leaves a human message for
//! `numa_moe_last_error()` when it fails. Handles and ownership are documented per function.

pub mod api;
pub mod ggml_hooks;
pub mod locality;
pub mod routing;

use std::cell::RefCell;
use std::ffi::{c_char, CStr};

/// Result of every fallible exported function. The numbers are stable.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumaMoeResult {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is out of range or not valid UTF-8.
    InvalidArgument = 2,
    /// The expert map is malformed or names nodes/experts that do not exist.
    InvalidMap = 3,
    /// The machine's topology could not be read.
    TopologyUnavailable = 4,
    /// The tensor is not in a numa-moe buffer, or is not a placed expert tensor.
    NotPlaced = 5,
    /// A system call failed (the message names it and the errno).
    SystemError = 6,
    /// The output buffer is too small (the message says how large it must be).
    BufferTooSmall = 7,
    /// A node (or the process's cgroup) has too little memory for what the plan puts there,
    /// or memory could not be reserved.
    OutOfMemory = 8,
    /// numa-moe panicked; the message says where. The process state is otherwise intact.
    Panic = 255,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records the message behind the next failing result on this thread.
pub fn set_last_error(msg: impl Into<String>) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg.into());
}

pub fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// An error carried to the boundary: the code and its message.
pub struct Fail(pub NumaMoeResult, pub String);

impl Fail {
    pub fn new(code: NumaMoeResult, msg: impl Into<String>) -> Self {
        Fail(code, msg.into())
    }
}

impl From<crate::error::ErrorCode> for NumaMoeResult {
    fn from(c: crate::error::ErrorCode) -> Self {
        use crate::error::ErrorCode as C;
        match c {
            C::InvalidArgument => NumaMoeResult::InvalidArgument,
            C::InvalidMap => NumaMoeResult::InvalidMap,
            C::TopologyUnavailable => NumaMoeResult::TopologyUnavailable,
            C::NotPlaced => NumaMoeResult::NotPlaced,
            C::SystemError => NumaMoeResult::SystemError,
            C::OutOfMemory => NumaMoeResult::OutOfMemory,
        }
    }
}

impl From<crate::error::Error> for Fail {
    fn from(e: crate::error::Error) -> Self {
        Fail(e.code.into(), e.message)
    }
}

/// Runs `f` for an exported function returning a result code.
pub fn boundary(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> NumaMoeResult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => NumaMoeResult::Ok,
        Ok(Err(Fail(code, msg))) => {
            set_last_error(msg);
            code
        }
        Err(p) => {
            set_last_error(format!("numa-moe panicked in {name}: {}", crate::error::panic_message(p.as_ref())));
            NumaMoeResult::Panic
        }
    }
}

/// Runs `f` for an exported function returning a plain value; a panic logs its message
/// (ggml callbacks have no error channel) and yields `default`.
pub fn boundary_value<T>(name: &str, default: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = format!("numa-moe panicked in {name}: {}", crate::error::panic_message(p.as_ref()));
            crate::log::error(&msg);
            set_last_error(msg);
            default
        }
    }
}

/// A borrowed C string argument.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string that outlives the returned reference.
pub unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::new(NumaMoeResult::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: per the contract above.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| Fail::new(NumaMoeResult::InvalidArgument, format!("{what} is not valid UTF-8")))
}

/// A required output pointer.
///
/// # Safety
/// `p` must be NULL or valid for writes of a `T` for the duration of the call.
pub unsafe fn arg_out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: per the contract above.
    unsafe { p.as_mut() }.ok_or_else(|| Fail::new(NumaMoeResult::NullArgument, format!("{what} is NULL")))
}

/// Copies `s` and a NUL into `buf` (truncating) and returns the full length of `s`.
///
/// # Safety
/// `buf` must be NULL (with any `len`) or writable for `len` bytes.
pub unsafe fn copy_out(s: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let n = s.len().min(len - 1);
        // SAFETY: n < len bytes of buf are writable, plus the NUL at index n.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr().cast(), buf, n);
            *buf.add(n) = 0;
        }
    }
    s.len()
}
