//! The work buffer of one hooked op and the protocol its threads follow on it.
//!
//! ggml hands every thread of an op the same work buffer (`wdata`, `wsize` bytes, sized by
//! the op's `work_size` for the plan's thread count). numa-moe lays it out as:
//!
//! | region      | written by                 | read by                  |
//! |-------------|----------------------------|--------------------------|
//! | `converted` | each thread its block range (phase A) | every thread (phase B) |
//! | `counts`, `rows` | thread 0 (phase A)    | every thread (phase B)   |
//! | `tiled`     | ggml's tiled kernel, one slot per thread (phase B) | the same thread |
//! | `roster`    | each thread its own line (phase A) | every thread (phase B) |
//! | `claims`    | thread 0 zeroes (phase A); atomics (phase B) | the group's threads |
//!
//! Phase A and phase B are separated by one `ggml_barrier`, whose sequentially consistent
//! read-modify-write publishes every plain write of phase A to every thread of phase B, so
//! the regions above need no ordering of their own. The claim counters are the only memory
//! written concurrently: `fetch_add` with `Relaxed` ordering is enough, because a counter
//! hands out indices into a list every thread of the group built identically from data
//! published by the barrier; no other memory is released or acquired through it.
//!
//! There is one roster line and one claim counter per thread: a group is a set of threads,
//! so there are never more groups than threads, whatever the number of nodes.

use crate::ggml::{Api, GgmlType, NumaMoeComputeParams, TensorRef};

pub(crate) const CACHE_LINE: usize = 64;

pub fn pad(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Offsets into the op's work buffer. The first region has ggml-cpu's own layout (the
/// src1 rows converted to vec_dot_type) because ggml's tiled kernel reads it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkLayout {
    pub converted: usize,
    pub counts: usize,
    pub rows: usize,
    pub tiled: usize,
    pub tiled_size: usize,
    pub roster: usize,
    pub claims: usize,
    pub total: usize,
}

impl WorkLayout {
    /// The layout for `n_threads` threads after `head` bytes of op-specific regions
    /// (`counts`, `rows`, `tiled` already placed by the caller), never smaller than `stock`
    /// so that ggml-cpu's own kernel could run in the same buffer.
    pub fn with_threads(mut self, head: usize, n_threads: usize, stock: usize) -> Self {
        self.roster = pad(head, CACHE_LINE);
        self.claims = self.roster + n_threads * CACHE_LINE;
        self.total = (self.claims + n_threads * CACHE_LINE).max(stock);
        self
    }
}

/// The op's work buffer and this thread's parameters, checked at the decision point.
pub struct Work {
    pub params: NumaMoeComputeParams,
    pub layout: WorkLayout,
}

impl Work {
    /// `None` if the parameters or the buffer cannot carry the layout: no work memory, less
    /// of it than the layout needs, or a thread index outside the op's threads. Every thread
    /// gets the same answer (ggml passes all of them the same buffer, size and count).
    pub fn new(params: &NumaMoeComputeParams, layout: WorkLayout) -> Option<Self> {
        let ok = params.nth >= 1
            && params.ith >= 0
            && params.ith < params.nth
            && !params.wdata.is_null()
            && params.wsize >= layout.total
            && layout.roster + params.nth as usize * CACHE_LINE <= layout.claims
            && layout.claims + params.nth as usize * CACHE_LINE <= layout.total;
        ok.then_some(Work { params: *params, layout })
    }

    pub fn ith(&self) -> usize {
        self.params.ith as usize
    }

    pub fn nth(&self) -> usize {
        self.params.nth as usize
    }

    /// Address `off` bytes into the work buffer (pointer arithmetic only).
    pub fn at(&self, off: usize) -> *mut u8 {
        self.params.wdata.cast::<u8>().wrapping_add(off)
    }

    /// Phase A: this thread's share of `src1` converted to `vt` with `from_float` into the
    /// `converted` region, with ggml-cpu's partition (every row, its blocks split evenly over
    /// the threads): the layout stock's kernels read, rows back to back, planes after planes.
    /// The bytes do not depend on the partition.
    pub fn convert_like_stock(
        &self,
        api: &Api,
        src1: TensorRef,
        vt: GgmlType,
        from_float: unsafe extern "C" fn(*const f32, *mut std::ffi::c_void, i64),
    ) {
        let (ne, nb) = (src1.ne(), src1.nb());
        let bs = api.blck_size(vt).max(1);
        let nbw0 = api.type_size(vt);
        let nbw1 = api.row_size(vt, ne[0]);
        let nbw2 = nbw1 * ne[1] as usize;
        let nbw3 = nbw2 * ne[2] as usize;
        let (ith, nth) = (self.ith() as i64, self.nth() as i64);
        let start = (ith * ne[0] / bs) / nth;
        let end = ((ith + 1) * ne[0] / bs) / nth;
        if end <= start {
            return;
        }
        let (base_in, base_out) = (src1.data_ptr(), self.at(self.layout.converted));
        for i13 in 0..ne[3] as usize {
            for i12 in 0..ne[2] as usize {
                for i11 in 0..ne[1] as usize {
                    let x = base_in.wrapping_add(i13 * nb[3] + i12 * nb[2] + i11 * nb[1] + (start * bs) as usize * nb[0]);
                    let y = base_out.wrapping_add(i13 * nbw3 + i12 * nbw2 + i11 * nbw1 + start as usize * nbw0);
                    // SAFETY: x and y address this thread's disjoint block range of one row of
                    // src1 and of the converted copy, which the op's layout sized for the whole
                    // tensor.
                    unsafe { from_float(x.cast(), y.cast(), (end - start) * bs) };
                }
            }
        }
    }

    /// Phase A: this thread records the node it works for (its own cache line).
    pub fn set_roster(&self, node: u32) {
        let p = self.at(self.layout.roster + self.ith() * CACHE_LINE).cast::<u32>();
        // SAFETY: the roster has one aligned line per thread (checked in new); each thread
        // writes only its own before the barrier.
        unsafe { p.write_volatile(node) }
    }

    /// Phase A, thread 0: zeroes every group's claim counter (read only after the barrier).
    pub fn reset_claims(&self) {
        for g in 0..self.nth() {
            let p = self.at(self.layout.claims + g * CACHE_LINE).cast::<usize>();
            // SAFETY: one aligned line per thread (checked in new); thread 0 alone writes the
            // counters before the barrier.
            unsafe { p.write_volatile(0) }
        }
    }

    /// Phase B: claims the next chunk of work of group `slot` (index into its list). A
    /// group index is below the number of groups, which is at most the number of threads.
    pub fn claim(&self, slot: usize) -> usize {
        debug_assert!(slot < self.nth());
        let slot = slot.min(self.nth() - 1);
        let p = self.at(self.layout.claims + slot * CACHE_LINE).cast::<std::sync::atomic::AtomicUsize>();
        // SAFETY: the counter is an aligned usize in the work buffer, zeroed before the barrier
        // and from then on only touched atomically; the barrier publishes the zero.
        unsafe { (*p).fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
    }

    /// Phase B: the node of every thread (after the barrier).
    pub fn roster(&self) -> Vec<u32> {
        (0..self.nth())
            .map(|i| {
                let p = self.at(self.layout.roster + i * CACHE_LINE).cast::<u32>();
                // SAFETY: all lines were written before the barrier and are only read now.
                unsafe { p.read_volatile() }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(ith: i32, nth: i32, buf: &mut [u8]) -> NumaMoeComputeParams {
        NumaMoeComputeParams {
            ith,
            nth,
            wsize: buf.len(),
            wdata: buf.as_mut_ptr().cast(),
            threadpool: std::ptr::null_mut(),
            use_ref: false,
        }
    }

    fn layout(n: usize) -> WorkLayout {
        let l = WorkLayout { converted: 0, counts: 0, rows: 0, tiled: 0, tiled_size: 0, roster: 0, claims: 0, total: 0 };
        l.with_threads(100, n, 0)
    }

    #[test]
    fn roster_and_claims_scale_with_threads_not_a_fixed_group_limit() {
        // 200 threads, each its own group (a 200-node machine): every counter independent
        let l = layout(200);
        assert_eq!(l.roster % CACHE_LINE, 0);
        assert_eq!(l.total, l.claims + 200 * CACHE_LINE);
        let mut buf = vec![0u8; l.total + CACHE_LINE];
        let off = buf.as_ptr().align_offset(CACHE_LINE);
        let w = Work::new(&params(0, 200, &mut buf[off..]), l).expect("fits");
        w.reset_claims();
        for g in 0..200 {
            w.set_roster(g as u32);
            assert_eq!(w.claim(g), 0);
        }
        assert_eq!(w.claim(199), 1);
        assert_eq!(w.claim(0), 1);
    }

    #[test]
    fn too_little_memory_or_bad_indices_are_refused() {
        let l = layout(4);
        let mut buf = vec![0u8; l.total];
        assert!(Work::new(&params(0, 4, &mut buf[..l.total - 1]), l).is_none());
        assert!(Work::new(&params(4, 4, &mut buf), l).is_none());
        assert!(Work::new(&params(-1, 4, &mut buf), l).is_none());
        assert!(Work::new(&params(0, 0, &mut buf), l).is_none());
        // a layout made for 4 threads cannot serve 8
        let mut big = vec![0u8; l.total * 4];
        assert!(Work::new(&params(0, 8, &mut big[..l.total]), l).is_none());
        assert!(Work::new(&params(3, 4, &mut buf), l).is_some());
    }
}
