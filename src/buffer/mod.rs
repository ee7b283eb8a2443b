//! The memory behind one ggml buffer of numa-moe's type: a [`Region`] in ggml's standard
//! layout whose expert tensors are bound to nodes by their plan when ggml initialises them,
//! before any byte is written, plus the replica copies that mirror and multi-node maps need.
//!
//! Placing a tensor is three steps, each in its own module: [`budget`] (reserve its bytes
//! per node), [`binding`] (mbind the primary's extents), [`replicas`] (make and bind the
//! extra copies and keep them current); with a GPU backend that pins host memory, a fourth
//! ([`pinning`]) registers it. What the user is told lives in [`crate::report`].
//!
//! Tensors that are not planned (anything but a stacked expert tensor the map places) are
//! plain host memory and pass through unchanged. Reads return exactly what was written, for
//! any offset and size; writes reach every copy of the bytes they cover. No unsafe code:
//! ggml's raw pointers become slices in the ffi layer.

pub mod binding;
pub mod budget;
pub mod coverage;
pub mod pinning;
pub mod replicas;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::{OnError, Runtime};
use crate::error::{Error, ErrorCode};
use crate::ggml::HostRegistrar;
use crate::memory::{self, PageReport, Region};
use crate::placement::{self, Binding, ExpertTensor, Piece, PlanOptions, TensorPlan};
use crate::topology::format_gib;
use pinning::Pinning;
use replicas::Replicas;

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
    /// Rows CPU_REPACK's layout interleaves (1: the standard layout).
    pub row_group: u64,
}

impl TensorInfo {
    /// The planner's description, if this is a stacked expert tensor numa-moe can place.
    pub fn expert_tensor(&self) -> Option<ExpertTensor> {
        // one rule with `numa-moe plan`; a stack llama.cpp could not load stays on its path
        let ne = self.ne.map(|n| u64::try_from(n).unwrap_or(0));
        let t = placement::stacked_expert(&self.name, &self.type_name, ne, Some(self.nb[1] as u64), self.packed).ok().flatten()?;
        Some(ExpertTensor { row_group: self.row_group.max(1), ..t })
    }

    /// The planner's description, if this is a 2-D weight matrix (one "expert") or a stack of
    /// per-head attention matrices, planned by the map's dense= rule.
    pub fn matrix(&self) -> Option<ExpertTensor> {
        let ne = self.ne.map(|n| u64::try_from(n).unwrap_or(0));
        let rb = Some(self.nb[1] as u64);
        let t = placement::weight_matrix(&self.name, &self.type_name, ne, rb, self.packed)
            .or_else(|| placement::head_stack(&self.name, &self.type_name, ne, rb, self.packed))?;
        Some(ExpertTensor { row_group: self.row_group.max(1), ..t })
    }

    /// An expert stack or a weight matrix.
    pub fn placeable(&self) -> Option<ExpertTensor> {
        self.expert_tensor().or_else(|| self.matrix())
    }
}

/// The plan for one tensor under the current settings (`Ok(None)`: not ours to place).
pub fn plan_for(rt: &Runtime, info: &TensorInfo) -> Result<Option<TensorPlan>, Error> {
    let Some(t) = info.placeable() else { return Ok(None) };
    let s = rt.settings();
    let opts = PlanOptions { page_size: crate::sys::page_size() as u64, by_cores: true };
    placement::plan_tensor(&rt.topology, &s.map, &t, &opts).map_err(Error::from)
}

/// A planned tensor living in a buffer.
pub struct PlacedTensor {
    pub plan: TensorPlan,
    /// Offset of the tensor's first byte in the buffer's region.
    pub offset: usize,
    /// The extra copies (mirror, `a+b`).
    replicas: Replicas,
    /// Pieces indexed by expert.
    pub by_expert: Vec<Vec<Piece>>,
    /// Nodes that hold pieces.
    pub piece_nodes: Vec<u32>,
    /// Set when binding failed and the fallback policy kept the tensor with default placement.
    pub degraded: Mutex<Option<String>>,
    /// What the weights are for (reports and locality counters).
    pub category: crate::weights::Category,
    /// Every thread's share of the last MUL_MAT shape computed over it (compute::phases_mm).
    pub mm_shares: RwLock<Option<(crate::compute::MmKey, Arc<Vec<crate::compute::MmShare>>)>>,
}

impl PlacedTensor {
    pub fn bytes(&self) -> usize {
        self.plan.tensor.bytes() as usize
    }

    /// Whether the map's dense= rule placed it ([`crate::placement::ExpertTensor::is_dense`],
    /// from the category kept at placement rather than the name).
    pub fn is_dense(&self) -> bool {
        placement::is_dense(self.plan.tensor.n_expert, self.category)
    }

    /// Bytes over all copies that exist.
    fn all_bytes(&self) -> u64 {
        self.plan.tensor.bytes() + self.replicas.bytes(&self.plan)
    }

    /// Base address of copy `copy` (the primary is `primary_base`).
    pub fn copy_base(&self, primary_base: *const u8, copy: usize) -> *const u8 {
        match self.replicas.region(copy) {
            Some(r) => r.as_ptr(),
            None => primary_base,
        }
    }
}

/// One ggml buffer of numa-moe's type.
pub struct NumaBuffer {
    region: Region,
    /// Whether its expert tensors hold CPU_REPACK's layouts (the repacked buffer type).
    repacked: bool,
    /// Registration with a GPU backend as pinned host memory (standard layout only).
    pinning: Option<Pinning>,
    placed: RwLock<Vec<Arc<PlacedTensor>>>,
    reserved: Mutex<Vec<(u32, u64)>>,
    reported: AtomicBool,
    verified: AtomicBool,
}

impl NumaBuffer {
    /// A buffer of `size` bytes; `registrar`: what GPU backends offer for pinning it (the
    /// standard layout's buffers only, which a GPU may copy from).
    pub fn new(rt: &Runtime, size: usize, repacked: bool, registrar: Option<HostRegistrar>) -> Result<Self, Error> {
        let s = rt.settings();
        let align = if s.huge_pages { 2 << 20 } else { crate::sys::page_size() };
        let region = Region::new(size, align).map_err(|e| {
            Error::new(ErrorCode::OutOfMemory, format!("cannot reserve {} for expert weights: {e}", format_gib(size as u64)))
        })?;
        if s.huge_pages {
            if let Err(e) = region.advise_huge_pages() {
                crate::log::warn_once(rt, "thp", &format!("numa-moe: transparent huge pages not available ({e}); using 4 KiB pages"));
            }
        }
        Ok(NumaBuffer {
            region,
            repacked,
            pinning: registrar.filter(|_| !repacked).map(Pinning::new),
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

    pub fn repacked(&self) -> bool {
        self.repacked
    }

    /// Its registrations with a GPU backend, where it has a registrar.
    pub fn pinning(&self) -> Option<&Pinning> {
        self.pinning.as_ref()
    }

    /// Plans and binds a tensor at `offset` before any of its bytes is written: budget,
    /// binding of the primary, then the replicas.
    pub fn init_tensor(&self, rt: &Runtime, info: &TensorInfo, offset: usize) -> Result<(), Error> {
        let Some(plan) = plan_for(rt, info)? else {
            crate::log::debug(&format!("numa-moe: {} stays plain host memory (not an expert tensor the map places)", info.name));
            return Ok(());
        };
        let bytes = plan.tensor.bytes() as usize;
        if offset.checked_add(bytes).is_none_or(|end| end > self.region.len()) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("{} ({} bytes at offset {offset}) does not fit its buffer", info.name, bytes),
            ));
        }
        let strict = rt.settings().on_error == OnError::Strict;

        let reservation = budget::reserve(rt, &plan, strict)?;
        self.reserved.lock().extend(reservation.loads.iter().copied());
        let mut degraded = reservation.shortfall;

        let bind = rt.binds();
        if bind {
            if let Err(msg) = binding::bind_primary(&self.region, &plan, offset, reservation.strictness) {
                if strict {
                    return Err(msg);
                }
                crate::log::warn_once(rt, "bind", &format!("numa-moe: warning: {msg}; continuing with the kernel's default placement"));
                degraded = Some(msg.message);
            }
        }
        let (replicas, warnings) = Replicas::new(&plan, bind, reservation.strictness, strict)?;
        for msg in warnings {
            crate::log::warn_once(rt, "replica", &format!("numa-moe: warning: {msg}; that node reads the primary copy instead"));
        }
        let mut by_expert = vec![Vec::new(); plan.tensor.n_expert as usize];
        let mut piece_nodes = Vec::new();
        for p in plan.pieces() {
            if let Some(v) = by_expert.get_mut(p.expert as usize) {
                v.push(p.clone());
            }
            if !piece_nodes.contains(&p.node) {
                piece_nodes.push(p.node);
            }
        }
        piece_nodes.sort_unstable();
        let category = crate::weights::category_of(&plan.tensor.name);
        let placed = Arc::new(PlacedTensor {
            plan,
            offset,
            replicas,
            by_expert,
            piece_nodes,
            degraded: Mutex::new(degraded),
            category,
            mm_shares: RwLock::new(None),
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

    /// Writes `data` at `offset` of the buffer, into every copy.
    ///
    /// llama.cpp's loader copies expert bytes out of the mapped model file: when `data` is
    /// such a mapping, the copy goes in chunks and each chunk's file pages are dropped from
    /// this process right after, so expert bytes are not resident twice, not even while
    /// loading (peak RSS stays within a chunk of stock's).
    pub fn write(&self, rt: &Runtime, offset: usize, data: &[u8]) {
        self.write_chunked(offset, data, 1, |at, chunk| {
            self.write_copies(rt, at, chunk);
            true
        });
    }

    /// Writes `data`, standard-layout rows starting at `offset`, converted into CPU_REPACK's
    /// layout: `convert(offset, rows)` writes the converted bytes into the primary at `offset`
    /// (ggml's own conversion, called by the ffi layer), in chunks of whole `group_bytes`
    /// (interleaved row groups), dropping the file's pages as [`NumaBuffer::write`] does; the
    /// converted bytes then reach every replica. False, with nothing converted, when the
    /// write does not cover whole row groups of one planned tensor, or when `convert` fails.
    pub fn write_repacked(
        &self,
        rt: &Runtime,
        offset: usize,
        data: &[u8],
        group_bytes: usize,
        convert: impl Fn(usize, &[u8]) -> bool,
    ) -> bool {
        let (len, group) = (data.len(), group_bytes.max(1));
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.region.len()) else { return false };
        let start_of = self.overlapping(offset, end).first().map_or(offset, |p| p.offset);
        if (offset - start_of) % group != 0 || len % group != 0 {
            return false;
        }
        let mut ok = true;
        self.write_chunked(offset, data, group, |at, chunk| {
            ok = ok && convert(at, chunk);
            if ok {
                self.copy_to_replicas(at, chunk.len());
            }
            ok
        });
        self.report_once(rt);
        ok
    }

    /// Calls `put(offset, bytes)` over `data` in chunks of about 16 MiB (whole `unit`s), and
    /// when `data` is part of a mapped file, drops each chunk's file pages after it. Stops at
    /// the first chunk `put` refuses.
    fn write_chunked(&self, offset: usize, data: &[u8], unit: usize, mut put: impl FnMut(usize, &[u8]) -> bool) {
        const CHUNK: usize = 16 << 20;
        let (src, len) = (data.as_ptr() as usize, data.len());
        let shared =
            if len >= CHUNK && !self.overlapping(offset, offset + len).is_empty() { memory::SharedFileRange::find(src, len) } else { None };
        let Some(shared) = shared else {
            put(offset, data);
            return;
        };
        let page = crate::sys::page_size();
        let unit = unit.max(1);
        let mut done = 0;
        while done < len {
            // chunk ends on a page boundary of the source (so each chunk's pages are
            // complete), rounded up to whole units
            let end = ((src + done + CHUNK).div_ceil(page) * page - src).min(len);
            let end = (done + (end - done).div_ceil(unit) * unit).min(len);
            if !put(offset + done, &data[done..end]) {
                return;
            }
            shared.release(src + done, end - done);
            done = end;
        }
    }

    /// Copies the primary's bytes `offset..offset + len` into the replicas of the tensors
    /// they belong to, and records them as written.
    fn copy_to_replicas(&self, offset: usize, len: usize) {
        self.each_replica_span(offset, len, |r, p, at, n| r.copy_from(at as usize, &self.region, p.offset + at as usize, n as usize));
    }

    /// Calls `span(replica, tensor, offset in the tensor, length)` for every replica extent of
    /// every planned tensor overlapping the buffer's bytes `offset..offset + len`, and records
    /// those bytes as written to every copy. Returns whether any planned tensor overlapped.
    fn each_replica_span(&self, offset: usize, len: usize, mut span: impl FnMut(&Region, &PlacedTensor, u64, u64)) -> bool {
        let overlapping = self.overlapping(offset, offset + len);
        for p in &overlapping {
            let (s, e) = (offset.max(p.offset), (offset + len).min(p.offset + p.bytes()));
            let range = (s - p.offset) as u64..(e - p.offset) as u64;
            p.replicas.for_each_span(&p.plan, range.clone(), |r, at, n| span(r, p, at, n));
            p.replicas.record_write(range);
        }
        !overlapping.is_empty()
    }

    fn write_copies(&self, rt: &Runtime, offset: usize, data: &[u8]) {
        self.region.write(offset, data);
        let placed = self.each_replica_span(offset, data.len(), |r, p, at, n| {
            let from = p.offset + at as usize - offset;
            r.write(at as usize, &data[from..from + n as usize]);
        });
        if placed {
            self.report_once(rt);
        }
    }

    /// Reads `out.len()` bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        self.region.read(offset, out);
    }

    /// Sets `len` bytes at `offset` to `value`, in every copy.
    pub fn fill(&self, offset: usize, len: usize, value: u8) {
        self.region.fill(offset, len, value);
        self.each_replica_span(offset, len, |r, _, at, n| r.fill(at as usize, n as usize, value));
    }

    /// Brings the replicas of `p` up to date before its first compute (see [`replicas`]).
    pub fn sync_replicas(&self, p: &PlacedTensor) {
        p.replicas.sync_once(&p.plan, &self.region, p.offset);
    }

    /// Bytes in which a replica of `p` differs from the primary.
    pub fn stale_replica_bytes(&self, p: &PlacedTensor) -> u64 {
        p.replicas.stale_bytes(&p.plan, &self.region, p.offset)
    }

    /// Copies the primary of `p` into its replicas again (after a direct write to its data).
    pub fn refresh_replicas(&self, p: &PlacedTensor) {
        p.replicas.refresh(&p.plan, &self.region, p.offset);
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
        let mut lines = crate::report::placement(rt, &placed);
        if !placed.is_empty() {
            let cuda_switch_off = std::env::var_os("GGML_CUDA_REGISTER_HOST").is_none();
            lines.extend(self.pinning.as_ref().and_then(|p| p.report(cuda_switch_off)));
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
            if k > 0 && std::ptr::eq(base, primary) {
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
                    r.first_misplaced = Some((
                        format!("{}{copy} at byte {at} ({})", p.plan.tensor.name, crate::report::describe_extent(&p.plan, at)),
                        want,
                        got,
                    ));
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
            Ok((r, stride)) => match crate::report::page_check(&r, stride) {
                (true, line) => crate::log::info(&line),
                (false, line) => crate::log::warn(&line),
            },
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
