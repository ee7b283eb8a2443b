//! NUMA-placed memory: anonymous mappings whose pages are bound to nodes before the first
//! write, and the checks that say where pages really are.
//!
//! A [`Region`] owns one mapping (RAII: unmapped on drop). Policies are applied per extent
//! with mbind before any byte is touched, so placement never depends on which thread writes
//! first, on the page cache or on the model file's mapping. Page-granular rule: a page
//! belongs to the extent that holds its first byte.
//!
//! Regions are shared with C: ggml reads and writes tensor bytes in them directly, so Rust
//! never forms references into a region; copies go through raw pointers.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use crate::placement::Binding;
use crate::sys::{self, NodeMask, PolicyMode, SysError};

/// How strictly pages are held to their planned node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// MPOL_BIND: pages only ever come from the planned node.
    Bind,
    /// MPOL_PREFERRED: the planned node first, others when it is full.
    Preferred,
}

/// An anonymous mapping. `ptr` is page aligned (or `align` aligned) and `len` bytes long.
pub struct Region {
    map_ptr: *mut u8,
    map_len: usize,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a Region is plain memory; all access goes through raw pointers under the
// callers' protocols (ggml's one-writer rules), never through Rust references.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl Region {
    /// Reserves `len` bytes (at least one page) aligned to `align` (a power of two, at least
    /// the page size). No page is allocated until first written.
    pub fn new(len: usize, align: usize) -> Result<Self, SysError> {
        let page = sys::page_size();
        let align = align.max(page);
        let len = len.max(1).div_ceil(page) * page;
        let map_len = len + align - page;
        let map_ptr = sys::mmap_anonymous(map_len)?;
        let ptr = ((map_ptr as usize).div_ceil(align) * align) as *mut u8;
        Ok(Region { map_ptr, map_len, ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, addr: usize) -> bool {
        (self.ptr as usize..self.ptr as usize + self.len).contains(&addr)
    }

    /// Binds the pages whose first byte lies in `range` (offsets into the region).
    pub fn bind(&self, range: Range<usize>, binding: &Binding, strict: Strictness) -> Result<(), SysError> {
        let page = sys::page_size();
        let start = range.start.div_ceil(page) * page;
        let end = range.end.min(self.len).div_ceil(page) * page;
        if end <= start {
            return Ok(());
        }
        let (mode, nodes) = match binding {
            Binding::Node(n) => (
                match strict {
                    Strictness::Bind => PolicyMode::Bind,
                    Strictness::Preferred => PolicyMode::Preferred,
                },
                NodeMask::from_nodes([*n]),
            ),
            Binding::Interleave(ns) => (PolicyMode::Interleave, NodeMask::from_nodes(ns.iter().copied())),
        };
        // SAFETY: the range lies inside this region's own mapping.
        unsafe { sys::mbind(self.ptr.add(start), end - start, mode, &nodes, 0) }
    }

    /// Drops any policy on the pages of `range` (they then follow the process default).
    pub fn unbind(&self, range: Range<usize>) -> Result<(), SysError> {
        let page = sys::page_size();
        let start = range.start.div_ceil(page) * page;
        let end = range.end.min(self.len).div_ceil(page) * page;
        if end <= start {
            return Ok(());
        }
        // SAFETY: the range lies inside this region's own mapping.
        unsafe { sys::mbind(self.ptr.add(start), end - start, PolicyMode::Default, &NodeMask::new(), 0) }
    }

    /// Asks for transparent huge pages on the region (placement is then 2 MiB grained).
    pub fn advise_huge_pages(&self) -> Result<(), SysError> {
        // SAFETY: MADV_HUGEPAGE never changes contents.
        unsafe { sys::madvise(self.ptr, self.len, libc::MADV_HUGEPAGE) }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "access {offset}+{len} outside a region of {} bytes", self.len);
    }

    /// Copies `len` bytes from `src` to `offset`.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes and not overlap the destination.
    pub unsafe fn write_from(&self, offset: usize, src: *const u8, len: usize) {
        self.check(offset, len);
        // SAFETY: destination checked above; source per the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, self.ptr.add(offset), len) }
    }

    /// Copies `len` bytes at `offset` to `dst`.
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes and not overlap the source.
    pub unsafe fn read_into(&self, offset: usize, dst: *mut u8, len: usize) {
        self.check(offset, len);
        // SAFETY: source checked above; destination per the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst, len) }
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        // SAFETY: a slice is readable for its length and cannot overlap our mapping's
        // bytes, since Rust never holds references into a region.
        unsafe { self.write_from(offset, data.as_ptr(), data.len()) }
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: as for write().
        unsafe { self.read_into(offset, out.as_mut_ptr(), out.len()) }
    }

    pub fn fill(&self, offset: usize, len: usize, value: u8) {
        self.check(offset, len);
        // SAFETY: checked above.
        unsafe { std::ptr::write_bytes(self.ptr.add(offset), value, len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it once the Region is dropped
        // (ggml frees tensors with their buffer, which owns the Region).
        let _ = unsafe { sys::munmap(self.map_ptr, self.map_len) };
    }
}

/// Copies between two regions (the primary and a replica of a buffer).
impl Region {
    /// Copies `len` bytes at `from` of `src` to `at` of this region.
    pub fn copy_from(&self, at: usize, src: &Region, from: usize, len: usize) {
        assert!(!std::ptr::eq(self, src), "copy within one region");
        src.check(from, len);
        self.check(at, len);
        // SAFETY: both ranges were checked against their own mappings, which are distinct
        // anonymous mappings and so cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.add(from), self.ptr.add(at), len) }
    }

    /// How many of the `len` bytes at `at` differ from those at `from` of `other`.
    pub fn count_differences(&self, at: usize, other: &Region, from: usize, len: usize) -> u64 {
        self.check(at, len);
        other.check(from, len);
        let (mut a, mut b) = (vec![0u8; len.min(1 << 20)], vec![0u8; len.min(1 << 20)]);
        let mut diff = 0u64;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(a.len());
            self.read(at + done, &mut a[..n]);
            other.read(from + done, &mut b[..n]);
            diff += a[..n].iter().zip(&b[..n]).filter(|(x, y)| x != y).count() as u64;
            done += n;
        }
        diff
    }
}

/// Where the pages of some memory are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageReport {
    /// Resident pages per node.
    pub per_node: BTreeMap<u32, u64>,
    /// Pages not yet allocated (never written).
    pub absent: u64,
    /// Resident pages on another node than planned.
    pub misplaced: u64,
    /// The first misplaced page: (where, planned node, actual node). `where` is the byte
    /// offset from the start of the queried range, or a description the caller made of it.
    pub first_misplaced: Option<(String, u32, u32)>,
}

impl PageReport {
    pub fn resident(&self) -> u64 {
        self.per_node.values().sum()
    }

    pub fn merge(&mut self, other: &PageReport) {
        for (n, c) in &other.per_node {
            *self.per_node.entry(*n).or_default() += c;
        }
        self.absent += other.absent;
        self.misplaced += other.misplaced;
        if self.first_misplaced.is_none() {
            self.first_misplaced = other.first_misplaced.clone();
        }
    }
}

/// Queries the node of every page whose first byte lies in `addr..addr+len` (the page rule
/// the binding follows: a page straddling two ranges belongs to the one holding its first
/// byte) and compares each resident page with `planned(offset of its first byte from addr)`;
/// `None` means no expectation.
pub fn page_report(addr: usize, len: usize, planned: impl Fn(usize) -> Option<u32>) -> Result<PageReport, SysError> {
    page_report_sampled(addr, len, 1, planned)
}

/// As [`page_report`], for every `stride`-th page only (counts are of the pages looked at).
pub fn page_report_sampled(addr: usize, len: usize, stride: usize, planned: impl Fn(usize) -> Option<u32>) -> Result<PageReport, SysError> {
    let stride = stride.max(1);
    let page = sys::page_size();
    let start = addr.div_ceil(page) * page;
    let end = (addr + len).div_ceil(page) * page;
    let mut report = PageReport::default();
    const BATCH: usize = 1 << 16;
    let mut pages: Vec<*const u8> = Vec::with_capacity(BATCH);
    let mut status = vec![0i32; BATCH];
    let mut p = start;
    while p < end {
        pages.clear();
        let n = ((end - p) / page).div_ceil(stride).min(BATCH);
        pages.extend((0..n).map(|i| (p + i * stride * page) as *const u8));
        sys::page_nodes(&pages, &mut status[..n])?;
        for (i, &s) in status[..n].iter().enumerate() {
            if s < 0 {
                report.absent += 1;
                continue;
            }
            *report.per_node.entry(s as u32).or_default() += 1;
            let first_byte = p + i * stride * page - addr;
            if let Some(want) = planned(first_byte) {
                if want != s as u32 {
                    report.misplaced += 1;
                    report.first_misplaced.get_or_insert((first_byte.to_string(), want, s as u32));
                }
            }
        }
        p += n * stride * page;
    }
    Ok(report)
}

/// What the kernel lets this process do with NUMA memory policies, found once by trying each
/// call on a scratch page (no node is named, so only a refusal of the call itself fails).
#[derive(Debug, Clone)]
pub struct KernelSupport {
    /// `mbind` (an MPOL_DEFAULT policy on the page).
    pub bind: Result<(), SysError>,
    /// `move_pages` asking where the page is.
    pub page_query: Result<(), SysError>,
}

impl KernelSupport {
    pub fn probe() -> Self {
        let page = sys::page_size();
        let r = match Region::new(page, page) {
            Ok(r) => r,
            Err(e) => return KernelSupport { bind: Err(e), page_query: Err(e) },
        };
        let bind = r.unbind(0..page);
        r.fill(0, 1, 0);
        let page_query = page_report(r.as_ptr() as usize, page, |_| None).map(|_| ());
        KernelSupport { bind, page_query }
    }
}

/// Resident bytes per node of this process's anonymous memory under a NUMA policy (bind,
/// preferred, interleave), from /proc/self/numa_maps text: the placed expert memory that is
/// already allocated, which the kernel no longer counts as free.
pub fn policy_resident_per_node(entries: &[NumaMapsEntry]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for e in entries.iter().filter(|e| e.anon && e.file.is_none() && e.policy != "default") {
        for &n in e.pages.keys() {
            *out.entry(n).or_default() += e.bytes_on(n);
        }
    }
    out
}

/// One mapping of a process, as /proc/PID/numa_maps describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaMapsEntry {
    pub addr: u64,
    pub policy: String,
    pub file: Option<String>,
    pub anon: bool,
    /// Pages per node (in units of `page_kib`).
    pub pages: BTreeMap<u32, u64>,
    pub page_kib: u64,
}

impl NumaMapsEntry {
    pub fn bytes_on(&self, node: u32) -> u64 {
        self.pages.get(&node).copied().unwrap_or(0) * self.page_kib * 1024
    }

    pub fn bytes(&self) -> u64 {
        self.pages.values().sum::<u64>() * self.page_kib * 1024
    }
}

/// Parses /proc/PID/numa_maps text.
pub fn parse_numa_maps(text: &str) -> Vec<NumaMapsEntry> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let policy = it.next()?.to_string();
            let mut e = NumaMapsEntry { addr, policy, file: None, anon: false, pages: BTreeMap::new(), page_kib: 4 };
            for tok in it {
                if let Some(f) = tok.strip_prefix("file=") {
                    e.file = Some(f.to_string());
                } else if tok.starts_with("anon=") {
                    e.anon = true;
                } else if let Some(k) = tok.strip_prefix("kernelpagesize_kB=") {
                    e.page_kib = k.parse().unwrap_or(4);
                } else if let Some(rest) = tok.strip_prefix('N') {
                    if let Some((n, c)) = rest.split_once('=') {
                        if let (Ok(n), Ok(c)) = (n.parse(), c.parse()) {
                            e.pages.insert(n, c);
                        }
                    }
                }
            }
            Some(e)
        })
        .collect()
}

/// A range of this process's memory known to lie inside one shared, file-backed mapping (a
/// model file mapped by llama.cpp's loader). Dropping such pages from our mapping discards no
/// data: they are re-read from the page cache if touched again.
pub struct SharedFileRange {
    start: usize,
    end: usize,
}

impl SharedFileRange {
    /// Finds the mapping holding `addr..addr+len` in /proc/self/maps, if it is shared and
    /// file-backed.
    pub fn find(addr: usize, len: usize) -> Option<Self> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            let (range, perms, _off, _dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
            let (a, b) = range.split_once('-')?;
            let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
            (perms.as_bytes().get(3) == Some(&b's') && inode != "0" && a <= addr && addr + len <= b)
                .then_some(SharedFileRange { start: a, end: b })
        })
    }

    /// Drops this process's mapping of the pages overlapping `addr..addr+len` (rounded out
    /// to pages, clipped to the file mapping), so bytes already copied elsewhere stop being
    /// resident twice.
    pub fn release(&self, addr: usize, len: usize) -> bool {
        let page = sys::page_size();
        let start = (addr / page * page).max(self.start);
        let end = (addr + len).div_ceil(page) * page;
        let end = end.min(self.end);
        if end <= start {
            return false;
        }
        // SAFETY: inside a MAP_SHARED file mapping (checked by find), where MADV_DONTNEED
        // discards no data.
        unsafe { sys::madvise(start as *mut u8, end - start, libc::MADV_DONTNEED).is_ok() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_maps_lines_parse() {
        let text = "7f1c00000000 bind:1 anon=4096 dirty=4096 N1=4096 kernelpagesize_kB=4\n\
                    7f1d00000000 default file=/m/model.gguf mapped=10 mapmax=2 N0=6 N1=4 kernelpagesize_kB=4\n";
        let e = parse_numa_maps(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].policy, "bind:1");
        assert!(e[0].anon);
        assert_eq!(e[0].bytes_on(1), 4096 * 4096);
        assert_eq!(e[1].file.as_deref(), Some("/m/model.gguf"));
        assert_eq!(e[1].bytes(), 10 * 4096);
    }

    #[test]
    fn only_anonymous_memory_under_a_policy_counts_as_placed() {
        let text = "7f1c00000000 bind:1 anon=10 dirty=10 N1=10 kernelpagesize_kB=4\n\
                    7f1c40000000 prefer:0 anon=3 dirty=3 N0=2 N1=1 kernelpagesize_kB=4\n\
                    7f1c80000000 interleave:0-1 anon=4 dirty=4 N0=2 N1=2 kernelpagesize_kB=4\n\
                    7f1d00000000 default anon=100 dirty=100 N0=100 kernelpagesize_kB=4\n\
                    7f1e00000000 default file=/m/model.gguf mapped=50 N0=50 kernelpagesize_kB=4\n";
        let r = policy_resident_per_node(&parse_numa_maps(text));
        assert_eq!(r.get(&0).copied(), Some(4 * 4096));
        assert_eq!(r.get(&1).copied(), Some(13 * 4096));
    }

    #[test]
    fn the_kernel_probe_works_on_this_machine() {
        let k = KernelSupport::probe();
        assert_eq!(k.bind, Ok(()));
        assert_eq!(k.page_query, Ok(()));
    }

    #[test]
    fn region_round_trips_bytes_at_any_offset() {
        let r = Region::new(3 * 4096 + 5, 4096).unwrap();
        assert_eq!(r.as_ptr() as usize % 4096, 0);
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        r.write(4093, &data);
        let mut out = vec![0u8; 5000];
        r.read(4093, &mut out);
        assert_eq!(out, data);
        r.fill(10, 3, 0xAB);
        let mut b = [0u8; 5];
        r.read(9, &mut b);
        assert_eq!(b, [0, 0xAB, 0xAB, 0xAB, 0]);
    }

    #[test]
    #[should_panic(expected = "outside a region")]
    fn region_rejects_out_of_bounds_writes() {
        let r = Region::new(4096, 4096).unwrap();
        r.write(4090, &[0u8; 16]);
    }

    #[test]
    fn anonymous_memory_is_never_released() {
        let r = Region::new(1 << 20, 4096).unwrap();
        r.fill(0, 1 << 20, 7);
        assert!(SharedFileRange::find(r.as_ptr() as usize, 1 << 20).is_none());
    }

    #[test]
    fn released_file_pages_read_back_the_same() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("numa-moe-release-{}", std::process::id()));
        let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY (test): a read-only shared mapping of a file nobody else writes.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let addr = map.as_ptr() as usize;
        let shared = SharedFileRange::find(addr + 100, 2 << 20).expect("a shared file mapping");
        assert!(shared.release(addr + 100, 2 << 20));
        assert_eq!(&map[..], &data[..], "the file's bytes are still there");
        std::fs::remove_file(&path).unwrap();
    }
}
