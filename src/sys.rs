//! Raw Linux syscalls for memory policy, page location and CPU affinity.
//!
//! This is the only layer that talks to the kernel about NUMA. Each wrapper turns the C
//! convention (0/-1 + errno) into a typed [`SysError`] that keeps the errno and names the call,
//! so callers above can say *which* node, size and tensor failed. No libnuma: libc gives the
//! syscall numbers and the MPOL_* modes; the flags libc lacks are defined here.

use std::fmt;
use std::io;

/// `get_mempolicy` flag: return the node of the page at `addr` instead of the policy.
pub(crate) const MPOL_F_NODE: libc::c_ulong = 1;
/// `get_mempolicy` flag: look up the policy governing `addr`.
pub(crate) const MPOL_F_ADDR: libc::c_ulong = 2;
/// `get_mempolicy` flag: return the set of nodes the process may allocate on.
pub(crate) const MPOL_F_MEMS_ALLOWED: libc::c_ulong = 4;
// The mbind flags libc lacks. numa-moe binds memory before its first touch, so it never
// needs to move pages; they are defined for completeness and for tests.
/// `mbind` flag: fail if pages already in the range are not on the policy's nodes.
#[allow(dead_code)]
pub(crate) const MPOL_MF_STRICT: libc::c_uint = 1;
/// `mbind` flag: move pages of this process that are not on the policy's nodes.
#[allow(dead_code)]
pub(crate) const MPOL_MF_MOVE: libc::c_uint = 2;
/// `mbind` flag: move pages even if they are shared with other processes (needs privilege).
#[allow(dead_code)]
pub(crate) const MPOL_MF_MOVE_ALL: libc::c_uint = 4;
/// Memory policy mode for several preferred nodes (Linux 5.15+).
#[allow(dead_code)]
pub(crate) const MPOL_PREFERRED_MANY: libc::c_int = 5;

/// What went wrong in a syscall, in the terms a user can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysErrorKind {
    /// EINVAL: a node that does not exist, has no memory, or a bad range.
    InvalidArgument,
    /// EPERM / EACCES: the kernel or a container policy forbids it.
    PermissionDenied,
    /// ENOMEM: the kernel could not satisfy the request.
    OutOfMemory,
    /// ENOSYS: the kernel has no NUMA support (or seccomp hides the call).
    Unsupported,
    /// EFAULT: the address range is not mapped.
    BadAddress,
    /// Anything else; the errno is kept.
    Other,
}

/// A failed syscall: which call, the errno and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysError {
    pub call: &'static str,
    pub errno: i32,
    pub kind: SysErrorKind,
}

impl SysError {
    /// The error `call` failing with `errno` would give (also for tests that fake a refusal).
    pub fn from_errno(call: &'static str, errno: i32) -> Self {
        let kind = match errno {
            libc::EINVAL => SysErrorKind::InvalidArgument,
            libc::EPERM | libc::EACCES => SysErrorKind::PermissionDenied,
            libc::ENOMEM => SysErrorKind::OutOfMemory,
            libc::ENOSYS => SysErrorKind::Unsupported,
            libc::EFAULT => SysErrorKind::BadAddress,
            _ => SysErrorKind::Other,
        };
        SysError { call, errno, kind }
    }

    fn last(call: &'static str) -> Self {
        Self::from_errno(call, io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Whether the call fails whatever its arguments: the kernel has no NUMA support (ENOSYS)
    /// or a policy forbids the call (EPERM/EACCES: Docker's default seccomp profile without
    /// CAP_SYS_NICE). Retrying it for the next tensor would only fail again.
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, SysErrorKind::PermissionDenied | SysErrorKind::Unsupported)
    }

    /// What the user can do about it, for the kinds that have a usual cause.
    fn hint(&self) -> Option<&'static str> {
        match self.kind {
            SysErrorKind::PermissionDenied => {
                Some("NUMA memory policy calls are refused here, as in containers run without CAP_SYS_NICE under a default seccomp profile")
            }
            SysErrorKind::Unsupported => Some("this kernel has no NUMA support, or a seccomp filter hides the call"),
            _ => None,
        }
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // io::Error's text ends in " (os error N)"; say it once, as errno.
        let text = io::Error::from_raw_os_error(self.errno).to_string();
        let text = text.split(" (os error").next().unwrap_or(&text).to_string();
        write!(f, "{} failed: {text} (errno {})", self.call, self.errno)?;
        if let Some(h) = self.hint() {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SysError {}

/// A set of NUMA node numbers in the kernel's `unsigned long` bitmask layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMask {
    words: Vec<libc::c_ulong>,
}

const WORD_BITS: usize = libc::c_ulong::BITS as usize;

impl NodeMask {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_nodes(nodes: impl IntoIterator<Item = u32>) -> Self {
        let mut m = Self::new();
        for n in nodes {
            m.set(n);
        }
        m
    }

    pub fn set(&mut self, node: u32) {
        let (w, b) = (node as usize / WORD_BITS, node as usize % WORD_BITS);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }

    pub fn contains(&self, node: u32) -> bool {
        let (w, b) = (node as usize / WORD_BITS, node as usize % WORD_BITS);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    pub fn nodes(&self) -> Vec<u32> {
        (0..self.words.len() * WORD_BITS).filter(|&n| self.contains(n as u32)).map(|n| n as u32).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The `maxnode` argument for this mask. The kernel reads `maxnode - 1` bits, so one more
    /// than the mask's width is passed (the same convention libnuma uses).
    fn maxnode(&self) -> libc::c_ulong {
        (self.words.len() * WORD_BITS + 1) as libc::c_ulong
    }

    fn as_ptr(&self) -> *const libc::c_ulong {
        if self.words.is_empty() {
            std::ptr::null()
        } else {
            self.words.as_ptr()
        }
    }
}

/// Memory policy modes used by numa-moe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    Default,
    Bind,
    Preferred,
    Interleave,
}

impl PolicyMode {
    fn raw(self) -> libc::c_int {
        match self {
            PolicyMode::Default => libc::MPOL_DEFAULT,
            PolicyMode::Bind => libc::MPOL_BIND,
            PolicyMode::Preferred => libc::MPOL_PREFERRED,
            PolicyMode::Interleave => libc::MPOL_INTERLEAVE,
        }
    }
}

/// The system page size.
/// Restores the default action for SIGPIPE (the Rust runtime ignores it, so a closed pipe
/// turns every print into a panic): a command-line tool piped into `head` then just ends.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        4096
    } else {
        v as usize
    }
}

/// Anonymous private read-write mapping of `len` bytes, untouched (no page is allocated yet,
/// so a policy set on it before the first write decides where every page lands).
pub fn mmap_anonymous(len: usize) -> Result<*mut u8, SysError> {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(SysError::last("mmap"))
    } else {
        Ok(p.cast())
    }
}

/// Unmaps a range obtained from [`mmap_anonymous`].
///
/// # Safety
/// `ptr..ptr+len` must be a mapping owned by the caller that nothing references any more.
pub unsafe fn munmap(ptr: *mut u8, len: usize) -> Result<(), SysError> {
    // SAFETY: the caller owns the mapping and guarantees no live references into it.
    if unsafe { libc::munmap(ptr.cast(), len) } == 0 {
        Ok(())
    } else {
        Err(SysError::last("munmap"))
    }
}

/// `madvise` on a page-aligned range.
///
/// # Safety
/// The range must be mapped and owned by the caller, and `advice` must not discard data
/// the caller still needs (MADV_DONTNEED on private anonymous memory zeroes it).
pub unsafe fn madvise(ptr: *mut u8, len: usize, advice: libc::c_int) -> Result<(), SysError> {
    // SAFETY: forwarded to the caller's contract.
    if unsafe { libc::madvise(ptr.cast(), len, advice) } == 0 {
        Ok(())
    } else {
        Err(SysError::last("madvise"))
    }
}

/// Sets the memory policy of a page-aligned range (`mbind(2)`).
///
/// # Safety
/// `addr..addr+len` must be a mapping owned by the caller. A policy never changes the
/// contents of memory, but MPOL_MF_MOVE may migrate pages, which is invisible to Rust.
pub unsafe fn mbind(addr: *mut u8, len: usize, mode: PolicyMode, nodes: &NodeMask, flags: libc::c_uint) -> Result<(), SysError> {
    let (mask, maxnode) = if mode == PolicyMode::Default { (std::ptr::null(), 0) } else { (nodes.as_ptr(), nodes.maxnode()) };
    // SAFETY: the mask pointer is valid for maxnode-1 bits (or null with maxnode 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            mode.raw() as libc::c_ulong,
            mask,
            maxnode,
            flags as libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("mbind"))
    }
}

/// `get_mempolicy(2)` with a 1024-node mask: the mode and the nodes it reports for `flags`.
fn get_mempolicy(addr: *const u8, flags: libc::c_ulong) -> Result<(libc::c_int, NodeMask), SysError> {
    let mut words = vec![0 as libc::c_ulong; 16]; // 1024 nodes
    let mut mode: libc::c_int = 0;
    // SAFETY: words has room for the number of bits passed; the kernel only reads `addr` as a
    // lookup key (MPOL_F_ADDR) or ignores it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            words.as_mut_ptr(),
            (words.len() * WORD_BITS) as libc::c_ulong,
            addr,
            flags,
        )
    };
    if r != 0 {
        return Err(SysError::last("get_mempolicy"));
    }
    while words.last() == Some(&0) {
        words.pop();
    }
    Ok((mode, NodeMask { words }))
}

/// The nodes this process may allocate memory on (cpuset / cgroup limits).
pub fn mems_allowed() -> Result<NodeMask, SysError> {
    get_mempolicy(std::ptr::null(), MPOL_F_MEMS_ALLOWED).map(|(_, m)| m)
}

/// The policy mode and nodes governing the page at `addr` (`get_mempolicy(MPOL_F_ADDR)`).
pub fn policy_of_addr(addr: *const u8) -> Result<(libc::c_int, NodeMask), SysError> {
    get_mempolicy(addr, MPOL_F_ADDR)
}

/// The node holding the page at `addr` (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`); the
/// page must be resident.
pub fn node_of_addr(addr: *const u8) -> Result<u32, SysError> {
    let mut node: libc::c_int = -1;
    // SAFETY: with MPOL_F_NODE|MPOL_F_ADDR the kernel writes one int; no mask is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            // only a lookup key for the kernel, never dereferenced here
            addr as libc::c_ulong,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if r == 0 {
        Ok(node as u32)
    } else {
        Err(SysError::last("get_mempolicy"))
    }
}

/// Where each page is: for every page address, the node holding it, or a negative errno
/// (-ENOENT: not present yet, -EFAULT: not mapped). Queries in chunks; moves nothing.
pub fn page_nodes(pages: &[*const u8], status: &mut [i32]) -> Result<(), SysError> {
    assert_eq!(pages.len(), status.len());
    const CHUNK: usize = 1 << 16;
    for (p, s) in pages.chunks(CHUNK).zip(status.chunks_mut(CHUNK)) {
        // SAFETY: with nodes == NULL move_pages only reports; both arrays hold p.len() entries.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0 as libc::pid_t,
                p.len() as libc::c_ulong,
                p.as_ptr(),
                std::ptr::null::<libc::c_int>(),
                s.as_mut_ptr(),
                0 as libc::c_int,
            )
        };
        if r < 0 {
            return Err(SysError::last("move_pages"));
        }
    }
    Ok(())
}

/// The CPU and NUMA node the calling thread runs on right now.
pub fn getcpu() -> Result<(u32, u32), SysError> {
    let mut cpu: libc::c_uint = 0;
    let mut node: libc::c_uint = 0;
    // SAFETY: both out-pointers are valid; the third argument is unused by Linux.
    let r = unsafe {
        libc::syscall(libc::SYS_getcpu, &mut cpu as *mut libc::c_uint, &mut node as *mut libc::c_uint, std::ptr::null_mut::<libc::c_void>())
    };
    if r == 0 {
        Ok((cpu, node))
    } else {
        Err(SysError::last("getcpu"))
    }
}

/// A thread's CPU set as the kernel keeps it (a cpu_set_t: CPUs below 1024). Comparing two
/// is a plain memory compare, so a worker can check every op, without allocating, whether
/// its set is still the one it left.
#[derive(Clone, Copy)]
pub struct CpuMask(libc::cpu_set_t);

impl PartialEq for CpuMask {
    fn eq(&self, other: &Self) -> bool {
        // SAFETY: both are valid cpu_set_t values; CPU_EQUAL only reads them.
        unsafe { libc::CPU_EQUAL(&self.0, &other.0) }
    }
}

impl Eq for CpuMask {}

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuMask({:?})", self.cpus())
    }
}

impl CpuMask {
    const BITS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

    /// The calling thread's CPUs.
    pub fn of_this_thread() -> Result<Self, SysError> {
        // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid cpu_set_t of the size passed.
        let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if r != 0 {
            return Err(SysError::last("sched_getaffinity"));
        }
        Ok(CpuMask(set))
    }

    /// The set of `cpus` (those at or above 1024 are left out).
    pub fn from_cpus(cpus: &[u32]) -> Self {
        // SAFETY: zeroed cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus {
            if (c as usize) < Self::BITS {
                // SAFETY: c is below the set's bit width.
                unsafe { libc::CPU_SET(c as usize, &mut set) };
            }
        }
        CpuMask(set)
    }

    /// The CPUs in the set, ascending.
    pub fn cpus(&self) -> Vec<u32> {
        // SAFETY: CPU_ISSET reads within the set for indices below its bit width.
        (0..Self::BITS).filter(|&c| unsafe { libc::CPU_ISSET(c, &self.0) }).map(|c| c as u32).collect()
    }

    /// Restricts the calling thread to this set.
    pub fn apply_to_this_thread(&self) -> Result<(), SysError> {
        // SAFETY: the set is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        if r == 0 {
            Ok(())
        } else {
            Err(SysError::last("sched_setaffinity"))
        }
    }
}

/// CPUs the calling thread may run on.
pub fn thread_affinity() -> Result<Vec<u32>, SysError> {
    CpuMask::of_this_thread().map(|m| m.cpus())
}

/// Restricts the calling thread to `cpus`.
pub fn set_thread_affinity(cpus: &[u32]) -> Result<(), SysError> {
    CpuMask::from_cpus(cpus).apply_to_this_thread()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_mask_round_trips_and_sizes_maxnode() {
        let m = NodeMask::from_nodes([0, 3, 64, 70]);
        assert_eq!(m.nodes(), vec![0, 3, 64, 70]);
        assert!(m.contains(64) && !m.contains(1));
        assert_eq!(m.maxnode(), 2 * 64 + 1);
        assert!(NodeMask::new().is_empty());
    }

    #[test]
    fn cpu_masks_round_trip_and_compare_by_content() {
        let m = CpuMask::from_cpus(&[0, 3, 64, 1023, 5000]);
        assert_eq!(m.cpus(), vec![0, 3, 64, 1023]);
        assert_eq!(m, CpuMask::from_cpus(&[1023, 64, 3, 0]));
        assert_ne!(m, CpuMask::from_cpus(&[0, 3, 64]));
        let here = CpuMask::of_this_thread().unwrap();
        assert_eq!(here.cpus(), thread_affinity().unwrap());
    }

    #[test]
    fn errno_kinds_are_named() {
        assert_eq!(SysError::from_errno("mbind", libc::EINVAL).kind, SysErrorKind::InvalidArgument);
        assert_eq!(SysError::from_errno("mbind", libc::EPERM).kind, SysErrorKind::PermissionDenied);
        assert_eq!(SysError::from_errno("mbind", libc::ENOMEM).kind, SysErrorKind::OutOfMemory);
        assert_eq!(SysError::from_errno("mbind", libc::ENOSYS).kind, SysErrorKind::Unsupported);
        assert_eq!(SysError::from_errno("mbind", libc::EACCES).kind, SysErrorKind::PermissionDenied);
        assert_eq!(SysError::from_errno("mbind", libc::EIO).kind, SysErrorKind::Other);
        let e = SysError::from_errno("mbind", libc::EINVAL);
        assert_eq!(e.to_string(), "mbind failed: Invalid argument (errno 22)");
        assert!(!e.is_unavailable());
    }

    #[test]
    fn refusals_whatever_the_arguments_are_unavailable_and_say_why() {
        let eperm = SysError::from_errno("mbind", libc::EPERM);
        assert!(eperm.is_unavailable());
        assert_eq!(eperm.errno, libc::EPERM);
        let text = eperm.to_string();
        assert!(text.starts_with("mbind failed: Operation not permitted (errno 1); "), "{text}");
        assert!(text.contains("CAP_SYS_NICE") && text.contains("seccomp"), "{text}");
        let enosys = SysError::from_errno("move_pages", libc::ENOSYS);
        assert!(enosys.is_unavailable());
        let text = enosys.to_string();
        assert!(text.starts_with("move_pages failed: Function not implemented (errno 38); "), "{text}");
        assert!(text.contains("no NUMA support"), "{text}");
        assert!(!SysError::from_errno("mbind", libc::ENOMEM).is_unavailable());
    }
}
