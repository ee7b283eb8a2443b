//! The memory behind one ggml buffer of numa-moe's type: a [`Region`] in ggml's standard
//! layout whose expert tensors are bound to nodes by their plan when ggml initialises them,
//! before any byte is written, plus the replica copies that mirror and multi-node maps need.
//!
//! Tensors that are not planned (anything but a stacked expert tensor the map places) are
//! plain host memory and pass through unchanged. Reads return exactly what was written, for
//! any offset and size; writes reach every copy of the bytes they cover.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use parking_lot::{Mutex, RwLock};

use crate::config::{OnError, Runtime};
use crate::memory::{self, PageReport, Region, Strictness};
use crate::placement::{self, Binding, ExpertTensor, Piece, PlanOptions, TensorPlan};
use crate::topology::format_gib;

/// How many pages of expert memory the load-time check asks the kernel about at most.
pub(crate) const VERIFY_PAGES: u64 = 1 << 20;

/// Expert tensors placed by live buffers, and their bytes (all copies).
pub static PLACED_TENSORS: AtomicU64 = AtomicU64::new(0);
pub static PLACED_BYTES: AtomicU64 = AtomicU64::new(0);

/// ggml's view of a tensor being placed, taken by the ffi layer.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub type_name: String,
    pub ne: [i64; 4],
    pub nb: [usize; 4],
    /// Whether rows and experts are packed back to back (ggml's standard layout).
    pub packed: bool,
}

impl TensorInfo {
    /// The planner's description, if this is a stacked expert tensor numa-moe can place.
    pub fn expert_tensor(&self) -> Option<ExpertTensor> {
        // one rule with `numa-moe plan`; a stack llama.cpp could not load stays on its path
        let ne = self.ne.map(|n| u64::try_from(n).unwrap_or(0));
        placement::stacked_expert(&self.name, &self.type_name, ne, Some(self.nb[1] as u64), self.packed).ok().flatten()
    }
}

/// The plan for one tensor under the current settings (`Ok(None)`: not ours to place).
pub fn plan_for(rt: &Runtime, info: &TensorInfo) -> Result<Option<TensorPlan>, String> {
    let Some(t) = info.expert_tensor() else { return Ok(None) };
    let s = rt.settings();
    let opts = PlanOptions { page_size: crate::sys::page_size() as u64, by_cores: true };
    placement::plan_tensor(&rt.topology, &s.map, &t, &opts).map_err(|e| e.to_string())
}

/// A planned tensor living in a buffer.
pub struct PlacedTensor {
    pub plan: TensorPlan,
    /// Offset of the tensor's first byte in the buffer's region.
    pub offset: usize,
    /// Replica copies (copy k >= 1 is `replicas[k - 1]`); `None` where one could not be made.
    replicas: Vec<Option<Region>>,
    /// Pieces indexed by expert.
    pub by_expert: Vec<Vec<Piece>>,
    /// Nodes that hold pieces.
    pub piece_nodes: Vec<u32>,
    /// Bytes written through set_tensor; replicas are refreshed from the primary at first
    /// compute when ggml wrote the bytes directly instead (llama.cpp's --no-mmap load).
    written: AtomicU64,
    synced: Once,
    /// Set when binding failed and the fallback policy kept the tensor with default placement.
    pub degraded: Mutex<Option<String>>,
}

impl PlacedTensor {
    pub fn bytes(&self) -> usize {
        self.plan.tensor.bytes() as usize
    }

    /// Bytes over all copies that exist.
    fn all_bytes(&self) -> u64 {
        let replicas: u64 = self
            .plan
            .copies
            .iter()
            .skip(1)
            .zip(&self.replicas)
            .filter(|(_, r)| r.is_some())
            .map(|(c, _)| c.extents.iter().map(|e| e.len).sum::<u64>())
            .sum();
        self.plan.tensor.bytes() + replicas
    }

    /// Base address of copy `copy` (the primary is `primary_base`).
    pub fn copy_base(&self, primary_base: *const u8, copy: usize) -> *const u8 {
        match copy.checked_sub(1).and_then(|i| self.replicas.get(i)).and_then(|r| r.as_ref()) {
            Some(r) => r.as_ptr(),
            None => primary_base,
        }
    }
}

/// One ggml buffer of numa-moe's type.
pub struct NumaBuffer {
    region: Region,
    placed: RwLock<Vec<Arc<PlacedTensor>>>,
    reserved: Mutex<Vec<(u32, u64)>>,
    reported: AtomicBool,
    verified: AtomicBool,
}

impl NumaBuffer {
    pub fn new(rt: &Runtime, size: usize) -> Result<Self, String> {
        let s = rt.settings();
        let align = if s.huge_pages { 2 << 20 } else { crate::sys::page_size() };
        let region = Region::new(size, align).map_err(|e| format!("cannot reserve {} for expert weights: {e}", format_gib(size as u64)))?;
        if s.huge_pages {
            if let Err(e) = region.advise_huge_pages() {
                crate::log::warn_once(rt, "thp", &format!("numa-moe: transparent huge pages not available ({e}); using 4 KiB pages"));
            }
        }
        Ok(NumaBuffer {
            region,
            placed: RwLock::new(Vec::new()),
            reserved: Mutex::new(Vec::new()),
            reported: AtomicBool::new(false),
            verified: AtomicBool::new(false),
        })
    }

    pub fn base(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    pub fn size(&self) -> usize {
        self.region.len()
    }

    /// Plans and binds a tensor at `offset` before any of its bytes is written.
    pub fn init_tensor(&self, rt: &Runtime, info: &TensorInfo, offset: usize) -> Result<(), String> {
        let Some(plan) = plan_for(rt, info)? else {
            crate::log::debug(&format!("numa-moe: {} stays plain host memory (not an expert tensor the map places)", info.name));
            return Ok(());
        };
        let bytes = plan.tensor.bytes() as usize;
        if offset + bytes > self.region.len() {
            return Err(format!("{} ({} bytes at offset {offset}) does not fit its buffer", info.name, bytes));
        }
        let s = rt.settings();
        let strict = s.on_error == OnError::Strict;
        let mut strictness = Strictness::Bind;
        let mut degraded = None;

        // The budget: what every live buffer has planned per node, against free memory.
        let loads = plan.bytes_per_node();
        for (i, &(node, b)) in loads.iter().enumerate() {
            if let Err((need, have)) = rt.reserve(node, b) {
                let msg = format!(
                    "cannot place {} on node {node}: expert memory planned there would reach {} but the node has {} free ({} short)",
                    info.name,
                    format_gib(need),
                    format_gib(have),
                    format_gib(need - have)
                );
                if strict {
                    for &(n, b) in &loads[..i] {
                        rt.release(n, b);
                    }
                    return Err(msg);
                }
                crate::log::warn_once(
                    rt,
                    &format!("short{node}"),
                    &format!("numa-moe: warning: {msg}; using preferred (not bound) placement for such tensors"),
                );
                strictness = Strictness::Preferred;
                degraded = Some(format!("{msg}; preferred (not bound) placement"));
                // what this tensor still plans is counted, so later tensors see the node as full
                for &(n, b) in &loads[i..] {
                    rt.reserve_unchecked(n, b);
                }
                break;
            }
        }
        self.reserved.lock().extend(loads.iter().copied());

        let bind = rt.binds();
        if bind {
            for e in &plan.copies[0].extents {
                if let Err(err) = self.region.bind(offset + e.offset as usize..offset + (e.offset + e.len) as usize, &e.binding, strictness)
                {
                    let msg = format!(
                        "cannot bind {} of {} (from {}) to {}: {err}",
                        format_gib(e.len),
                        info.name,
                        describe_extent(&plan, e.offset),
                        describe_binding(&e.binding)
                    );
                    if strict {
                        return Err(msg);
                    }
                    crate::log::warn_once(rt, "bind", &format!("numa-moe: warning: {msg}; continuing with the kernel's default placement"));
                    let _ = self.region.unbind(offset..offset + bytes);
                    degraded = Some(msg);
                    break;
                }
            }
        }
        let mut replicas = Vec::new();
        for c in &plan.copies[1..] {
            let made = Region::new(bytes, crate::sys::page_size()).map_err(|e| e.to_string()).and_then(|r| {
                if bind {
                    for e in &c.extents {
                        r.bind(e.offset as usize..(e.offset + e.len) as usize, &e.binding, strictness)
                            .map_err(|err| format!("cannot bind the copy of {} for node {}: {err}", info.name, c.node.unwrap_or(0)))?;
                    }
                }
                Ok(r)
            });
            match made {
                Ok(r) => replicas.push(Some(r)),
                Err(msg) if strict => return Err(msg),
                Err(msg) => {
                    crate::log::warn_once(rt, "replica", &format!("numa-moe: warning: {msg}; that node reads the primary copy instead"));
                    replicas.push(None);
                }
            }
        }
        let mut by_expert = vec![Vec::new(); plan.tensor.n_expert as usize];
        let mut piece_nodes = Vec::new();
        for p in plan.pieces() {
            by_expert[p.expert as usize].push(p.clone());
            if !piece_nodes.contains(&p.node) {
                piece_nodes.push(p.node);
            }
        }
        piece_nodes.sort_unstable();
        let placed = Arc::new(PlacedTensor {
            plan,
            offset,
            replicas,
            by_expert,
            piece_nodes,
            written: AtomicU64::new(0),
            synced: Once::new(),
            degraded: Mutex::new(degraded),
        });
        PLACED_TENSORS.fetch_add(1, Ordering::Relaxed);
        PLACED_BYTES.fetch_add(placed.all_bytes(), Ordering::Relaxed);
        let mut v = self.placed.write();
        let at = v.partition_point(|p| p.offset < offset);
        v.insert(at, placed);
        Ok(())
    }

    /// The planned tensor whose first byte is at `offset`, if any.
    pub fn placed_at(&self, offset: usize) -> Option<Arc<PlacedTensor>> {
        let v = self.placed.read();
        let i = v.partition_point(|p| p.offset < offset);
        v.get(i).filter(|p| p.offset == offset).cloned()
    }

    pub fn placed(&self) -> Vec<Arc<PlacedTensor>> {
        self.placed.read().clone()
    }

    fn overlapping(&self, start: usize, end: usize) -> Vec<Arc<PlacedTensor>> {
        self.placed.read().iter().filter(|p| p.offset < end && start < p.offset + p.bytes()).cloned().collect()
    }

    /// Writes `len` bytes from `src` at `offset` of the buffer, into every copy.
    ///
    /// llama.cpp's loader copies expert bytes out of the mapped model file: when `src` is
    /// such a mapping, the copy goes in chunks and each chunk's file pages are dropped from
    /// this process right after, so expert bytes are not resident twice, not even while
    /// loading (peak RSS stays within a chunk of stock's).
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes and lie outside this buffer.
    pub unsafe fn write(&self, rt: &Runtime, offset: usize, src: *const u8, len: usize) {
        const CHUNK: usize = 16 << 20;
        let shared = if len >= CHUNK && !self.overlapping(offset, offset + len).is_empty() {
            memory::SharedFileRange::find(src as usize, len)
        } else {
            None
        };
        let Some(shared) = shared else {
            // SAFETY: per this function's contract.
            unsafe { self.write_copies(rt, offset, src, len) };
            return;
        };
        let page = crate::sys::page_size();
        let mut done = 0;
        while done < len {
            // chunk ends on a page boundary of the source, so each chunk's pages are complete
            let end = ((src as usize + done + CHUNK).div_ceil(page) * page - src as usize).min(len);
            // SAFETY: done..end lies inside src's range.
            unsafe { self.write_copies(rt, offset + done, src.add(done), end - done) };
            shared.release(src as usize + done, end - done);
            done = end;
        }
    }

    /// # Safety
    /// As for [`NumaBuffer::write`].
    unsafe fn write_copies(&self, rt: &Runtime, offset: usize, src: *const u8, len: usize) {
        // SAFETY: per this function's contract.
        unsafe { self.region.write_from(offset, src, len) };
        self.for_each_replica_span(offset, len, |r, at, from, n| {
            // SAFETY: from..from+n lies inside src's range (0..len).
            unsafe { r.write_from(at, src.add(from), n) }
        });
        for p in self.overlapping(offset, offset + len) {
            let (s, e) = (offset.max(p.offset), (offset + len).min(p.offset + p.bytes()));
            p.written.fetch_add((e - s) as u64, Ordering::Relaxed);
            self.report_once(rt);
        }
    }

    /// Calls `f(replica, offset in the replica, offset from `offset`, length)` for every
    /// replica extent overlapping the buffer range `offset..offset+len`.
    fn for_each_replica_span(&self, offset: usize, len: usize, mut f: impl FnMut(&Region, usize, usize, usize)) {
        for p in self.overlapping(offset, offset + len) {
            let (s, e) = (offset.max(p.offset), (offset + len).min(p.offset + p.bytes()));
            for (c, r) in p.plan.copies[1..].iter().zip(&p.replicas) {
                let Some(r) = r else { continue };
                for ext in &c.extents {
                    let (a, b) = ((p.offset + ext.offset as usize).max(s), (p.offset + (ext.offset + ext.len) as usize).min(e));
                    if a < b {
                        f(r, a - p.offset, a - offset, b - a);
                    }
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` into `dst`.
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes and lie outside this buffer.
    pub unsafe fn read(&self, offset: usize, dst: *mut u8, len: usize) {
        // SAFETY: per this function's contract.
        unsafe { self.region.read_into(offset, dst, len) }
    }

    /// Sets `len` bytes at `offset` to `value`, in every copy.
    pub fn fill(&self, offset: usize, len: usize, value: u8) {
        self.region.fill(offset, len, value);
        self.for_each_replica_span(offset, len, |r, at, _, n| r.fill(at, n, value));
    }

    /// Copies the primary into the replicas of `p` once, unless set_tensor already wrote
    /// every byte of it (then the replicas are current).
    pub fn sync_replicas(&self, p: &PlacedTensor) {
        p.synced.call_once(|| {
            if p.written.load(Ordering::Relaxed) >= p.bytes() as u64 {
                return;
            }
            for (c, r) in p.plan.copies[1..].iter().zip(&p.replicas) {
                let Some(r) = r else { continue };
                for ext in &c.extents {
                    // SAFETY: both ranges lie within the tensor's bytes in two mappings.
                    unsafe {
                        r.write_from(ext.offset as usize, self.region.as_ptr().add(p.offset + ext.offset as usize), ext.len as usize)
                    };
                }
            }
        });
    }

    /// Logs what went where, once per buffer.
    pub fn report_once(&self, rt: &Runtime) {
        if self.reported.load(Ordering::Relaxed) || self.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        for line in self.placement_report(rt) {
            crate::log::info(&line);
        }
    }

    pub fn placement_report(&self, rt: &Runtime) -> Vec<String> {
        let placed = self.placed();
        if placed.is_empty() {
            return Vec::new();
        }
        let s = rt.settings();
        let total: u64 = placed.iter().map(|p| p.plan.tensor.bytes()).sum();
        let mut lines = vec![format!(
            "numa-moe: {} expert tensors ({}) placed by map \"{}\" ({}){}",
            placed.len(),
            format_gib(total),
            s.map.render(),
            s.map_origin,
            if rt.binds() { String::new() } else { " on a described topology: planned, not bound".into() }
        )];
        let loads = placement::node_loads(&rt.topology, &placed.iter().map(|p| p.plan.clone()).collect::<Vec<_>>());
        let mut parts = Vec::new();
        for l in loads.iter().filter(|l| l.bytes > 0) {
            let example = placed.iter().find(|p| p.plan.pieces().iter().any(|x| x.node == l.node));
            let share =
                example.map(|p| format!(", {}: {}", short_name(&p.plan.tensor.name), p.plan.describe_share(l.node))).unwrap_or_default();
            parts.push(format!("node {}: {} ({} tensors{share})", l.node, format_gib(l.bytes), l.tensors));
        }
        lines.push(format!("numa-moe: {}", parts.join(" | ")));
        for p in &placed {
            if let Some(d) = p.degraded.lock().as_ref() {
                lines.push(format!("numa-moe: {} not placed as planned: {d}", p.plan.tensor.name));
            }
        }
        lines
    }

    /// Where the pages of one planned tensor are (every copy), against its plan.
    pub fn verify_tensor(&self, p: &PlacedTensor) -> Result<PageReport, crate::sys::SysError> {
        self.verify_tensor_sampled(p, 1)
    }

    /// As [`NumaBuffer::verify_tensor`], looking at every `stride`-th page.
    fn verify_tensor_sampled(&self, p: &PlacedTensor, stride: usize) -> Result<PageReport, crate::sys::SysError> {
        let mut total = PageReport::default();
        let primary = self.region.as_ptr().wrapping_add(p.offset);
        let degraded = p.degraded.lock().is_some();
        for (k, c) in p.plan.copies.iter().enumerate() {
            let base = p.copy_base(primary, k);
            if k > 0 && base == primary as *const u8 {
                continue; // replica missing: nothing to check
            }
            for e in &c.extents {
                let planned = |_: usize| match &e.binding {
                    Binding::Node(n) if !degraded => Some(*n),
                    _ => None,
                };
                let mut r = memory::page_report_sampled(base as usize + e.offset as usize, e.len as usize, stride, planned)?;
                if let Some((off, want, got)) = r.first_misplaced.take() {
                    let at = e.offset + off.parse::<u64>().unwrap_or(0);
                    let copy = if k == 0 { String::new() } else { format!(" (copy for node {})", c.node.unwrap_or(0)) };
                    r.first_misplaced =
                        Some((format!("{}{copy} at byte {at} ({})", p.plan.tensor.name, describe_extent(&p.plan, at)), want, got));
                }
                total.merge(&r);
            }
        }
        Ok(total)
    }

    /// Where the pages of every planned tensor are, against the plan: every page of up to
    /// [`VERIFY_PAGES`] pages of expert memory, an even sample of larger models (a 300 GiB
    /// model has 80 million pages; asking the kernel about all of them would stall the first
    /// token for many seconds). Returns the report and the stride used.
    pub fn verify(&self) -> Result<(PageReport, usize), crate::sys::SysError> {
        let placed = self.placed();
        let page = crate::sys::page_size() as u64;
        let pages: u64 = placed.iter().map(|p| p.all_bytes() / page).sum();
        let stride = pages.div_ceil(VERIFY_PAGES).max(1) as usize;
        let mut total = PageReport::default();
        for p in placed {
            total.merge(&self.verify_tensor_sampled(&p, stride)?);
        }
        Ok((total, stride))
    }

    /// Verifies once (at first compute, when the weights are loaded) and logs the result.
    pub fn verify_once(&self, rt: &Runtime) {
        if self.verified.load(Ordering::Relaxed) || self.verified.swap(true, Ordering::Relaxed) || !rt.settings().verify || !rt.binds() {
            return;
        }
        match self.verify() {
            Ok((r, stride)) => {
                let scale = stride as u64 * crate::sys::page_size() as u64;
                let nodes: Vec<String> = r.per_node.iter().map(|(n, c)| format!("node {n} {}", format_gib(c * scale))).collect();
                let sample = if stride > 1 { format!(" (every {stride}th page)") } else { String::new() };
                if r.misplaced == 0 {
                    crate::log::info(&format!(
                        "numa-moe: verified {} resident pages{sample} of expert memory ({}): none off its planned node",
                        r.resident(),
                        nodes.join(", ")
                    ));
                } else {
                    let (at, want, got) = r.first_misplaced.clone().unwrap_or_default();
                    crate::log::warn(&format!(
                        "numa-moe: warning: {} of {} expert pages{sample} are off their planned node ({}); the first is {at}: planned node {want}, found on node {got}",
                        r.misplaced,
                        r.resident(),
                        nodes.join(", ")
                    ));
                }
            }
            Err(e) => crate::log::warn(&format!("numa-moe: warning: cannot verify expert placement: {e}")),
        }
    }

    pub fn release(&self, rt: &Runtime) {
        for (n, b) in self.reserved.lock().drain(..) {
            rt.release(n, b);
        }
        for p in self.placed.write().drain(..) {
            PLACED_TENSORS.fetch_sub(1, Ordering::Relaxed);
            PLACED_BYTES.fetch_sub(p.all_bytes(), Ordering::Relaxed);
        }
    }
}

fn short_name(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

fn describe_binding(b: &Binding) -> String {
    match b {
        Binding::Node(n) => format!("node {n}"),
        Binding::Interleave(ns) => format!("nodes {} (interleaved)", crate::topology::render_cpu_list(ns)),
    }
}

fn describe_extent(plan: &TensorPlan, offset: u64) -> String {
    let eb = plan.tensor.expert_bytes();
    let e = offset / eb;
    let row = (offset % eb) / plan.tensor.row_bytes;
    format!("expert {e}, row {row}")
}
