//! The routed MUL_MAT_ID kernel: ggml-cpu's own vec_dot and tiled kernels on the rows of
//! each expert a node group holds, on the same activations and in the same order of
//! operations as ggml-cpu's stock kernel, so results are bit-identical.
//!
//! Raw memory here is ggml's: the activations and ids of the node, its output, and the work
//! buffer ([`super::work`]); every access states which phase and which thread owns it.

use std::ops::Range;

use super::work::{pad, Work, WorkLayout, CACHE_LINE};
use crate::ggml::{raw, Api, CpuTraits, NumaMoeComputeParams, RepackLayout, RowMapping, TensorRef};

/// The MUL_MAT_ID node as the hook computes it, with its shapes and kernels resolved.
#[derive(Clone, Copy)]
pub struct MmidOp {
    pub dst: TensorRef,
    pub src0: TensorRef,
    pub src1: TensorRef,
    pub ids: TensorRef,
    traits: CpuTraits,
    /// from_float of vec_dot_type, where src1 needs converting.
    from_float: raw::ggml_from_float_t,
    row_size: usize,
    /// CPU_REPACK's layout of the weights, where they hold it (computed with its gemv).
    repack: Option<RepackLayout>,
    api: &'static Api,
}

impl MmidOp {
    /// Checks the node against everything ggml-cpu's stock kernel asserts (CPU_REPACK's, for
    /// weights in its `repack` layout), plus what the hook needs (F32 or vec_dot_type
    /// activations, I32 ids, sizes that fit the address space). `None`: let ggml compute it.
    pub fn new(api: &'static Api, dst: TensorRef, repack: Option<RepackLayout>) -> Option<Self> {
        if dst.op() != raw::GGML_OP_MUL_MAT_ID {
            return None;
        }
        let (src0, src1, ids) = (dst.src(0)?, dst.src(1)?, dst.src(2)?);
        let mut traits = api.cpu_traits(src0.ty())?;
        traits.vec_dot?;
        let mut from_float = None;
        if let Some(l) = repack {
            // CPU_REPACK quantizes F32 activations to its param type, row by row
            if src1.ty() != raw::GGML_TYPE_F32 || src0.ne()[1] % l.nb_cols as i64 != 0 {
                return None;
            }
            traits.vec_dot_type = l.param_type;
            from_float = Some(l.from_float);
        } else if src1.ty() != traits.vec_dot_type {
            if src1.ty() != raw::GGML_TYPE_F32 {
                return None;
            }
            from_float = Some(api.cpu_traits(traits.vec_dot_type)?.from_float?);
        }
        let (ne1, nb1) = (src1.ne(), src1.nb());
        let (ned, nbd) = (dst.ne(), dst.nb());
        let positive = [src0.ne(), ne1, ned, ids.ne()].iter().all(|ne| ne.iter().all(|&n| n >= 1));
        let ok = positive
            && src0.nb()[0] == api.type_size(src0.ty())
            && nb1[0] == api.type_size(src1.ty())
            && ne1[3] == 1
            && nbd[0] == 4
            && nbd[0] <= nbd[1]
            && nbd[1] <= nbd[2]
            && ids.ty() == raw::GGML_TYPE_I32
            && dst.ty() == raw::GGML_TYPE_F32
            && ned[0] == src0.ne()[1]
            && src0.ne()[0] == ne1[0];
        if !ok {
            return None;
        }
        let row_size = api.row_size(traits.vec_dot_type, ne1[0]);
        let op = MmidOp { dst, src0, src1, ids, traits, from_float, row_size, repack, api };
        // the routing table must be addressable: experts x slots x tokens mappings
        op.n_expert().checked_mul(op.n_ids())?.checked_mul(op.n_tokens())?.checked_mul(std::mem::size_of::<RowMapping>())?;
        Some(op)
    }

    pub fn n_expert(&self) -> usize {
        self.src0.ne()[2] as usize
    }

    fn n_ids(&self) -> usize {
        self.ids.ne()[0] as usize
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.ne()[1] as usize
    }

    fn needs_conversion(&self) -> bool {
        self.src1.ty() != self.traits.vec_dot_type
    }

    /// The work buffer this op needs with `n_threads` threads, laid out so that ggml-cpu's
    /// stock kernel could also run in it (it shares the buffer's size rules).
    pub fn layout(&self, n_threads: usize) -> WorkLayout {
        let mut off = 0;
        if self.needs_conversion() {
            off = pad(self.api.row_size(self.traits.vec_dot_type, self.src1.nelements()), 8);
        }
        let counts = off;
        off = pad(off + self.n_expert() * 8, 8);
        let rows = off;
        off = pad(off + self.n_expert() * self.n_ids() * self.n_tokens() * std::mem::size_of::<RowMapping>(), CACHE_LINE);
        let tiled_size = self.api.tiled_wdata_size(n_threads as i32, self.dst);
        let tiled = off;
        off = pad(off + tiled_size, CACHE_LINE);
        let l = WorkLayout { converted: 0, counts, rows, tiled, tiled_size, roster: 0, claims: 0, total: 0 };
        l.with_threads(off, n_threads, self.stock_work_size(tiled_size))
    }

    /// ggml-cpu's own work size for this node (ggml_graph_plan's MUL_MAT_ID case), given
    /// ggml_tiled_wdata_size for the op's thread count.
    fn stock_work_size(&self, tiled_size: usize) -> usize {
        let mut cur = 0;
        if self.needs_conversion() {
            cur += self.api.row_size(self.traits.vec_dot_type, self.src1.nelements()) + 8;
        }
        cur += self.n_expert() * 8 + 8;
        cur += self.n_expert() * self.n_ids() * self.n_tokens() * std::mem::size_of::<RowMapping>() + 8;
        cur += CACHE_LINE * self.n_expert() + CACHE_LINE;
        cur = pad(cur, 64);
        cur + tiled_size
    }

    /// Phase A, every thread: convert this thread's share of the activations to vec_dot_type,
    /// with ggml-cpu's partition (so the bytes are the ones stock produces).
    pub fn convert_src1(&self, w: &Work) {
        if let Some(from_float) = self.from_float {
            w.convert_like_stock(self.api, self.src1, self.traits.vec_dot_type, from_float);
        }
    }

    /// Phase A, thread 0 only: group the routed rows by expert, in ggml-cpu's layout. Ids
    /// outside 0..n_expert are skipped, as stock skips them.
    pub fn group_rows(&self, w: &Work) {
        let n_as = self.n_expert();
        let per = self.n_ids() * self.n_tokens();
        let counts = w.at(w.layout.counts).cast::<i64>();
        let rows = w.at(w.layout.rows).cast::<RowMapping>();
        let idd = self.ids.data_ptr();
        let nbi = self.ids.nb();
        // SAFETY: thread 0 alone writes these regions between the op's start and its barrier;
        // each expert's list has room for every (slot, token) pair.
        unsafe {
            std::ptr::write_bytes(counts, 0, n_as);
            for t in 0..self.n_tokens() {
                for slot in 0..self.n_ids() {
                    let e = *(idd.add(t * nbi[1] + slot * nbi[0]) as *const i32);
                    if e < 0 || e as usize >= n_as {
                        continue;
                    }
                    let c = counts.add(e as usize);
                    *rows.add(e as usize * per + *c as usize) = RowMapping { slot: slot as i32, token: t as i32 };
                    *c += 1;
                }
            }
        }
    }

    /// Phase B: how many rows were routed to `expert` (after the barrier).
    pub fn routed(&self, w: &Work, expert: usize) -> usize {
        // SAFETY: written by thread 0 before the barrier, only read after it.
        unsafe { *w.at(w.layout.counts).cast::<i64>().add(expert) as usize }
    }

    fn routed_rows(&self, w: &Work, expert: usize) -> *const RowMapping {
        w.at(w.layout.rows).cast::<RowMapping>().wrapping_add(expert * self.n_ids() * self.n_tokens())
    }

    /// Phase B: output rows `rows` of `expert` for every routed token, reading the weights
    /// of the copy at `base` (ggml layout), with ggml-cpu's vec_dot exactly as its stock
    /// kernel calls it, so the results are bit-identical.
    pub fn dot_rows(&self, w: &Work, base: *const u8, expert: usize, rows: Range<i64>) {
        let n = self.routed(w, expert);
        let Some(vec_dot) = self.traits.vec_dot else { return };
        if n == 0 || rows.is_empty() {
            return;
        }
        let ne00 = self.src0.ne()[0] as i32;
        let nb01 = self.src0.nb()[1];
        let nb02 = self.src0.nb()[2];
        let ne11 = self.src1.ne()[1];
        let (nb11, nb12) = (self.src1.nb()[1], self.src1.nb()[2]);
        let contiguous_or_converted = self.needs_conversion() || self.src1.is_contiguous_rows();
        let act = if self.needs_conversion() { w.at(w.layout.converted) as *const u8 } else { self.src1.data_ptr() as *const u8 };
        let nbd = self.dst.nb();
        let dst = self.dst.data_ptr();
        let weights = base.wrapping_add(expert * nb02);
        let mapping = self.routed_rows(w, expert);
        const BLK: i64 = 16;
        // Blocked like ggml's one_chunk: 16 tokens x 16 rows keeps the weights in cache.
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + BLK as usize).min(n);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let r1 = (r0 + BLK).min(rows.end);
                for t in t0..t1 {
                    // SAFETY: t < routed(expert), inside the mapping thread 0 wrote.
                    let m = unsafe { *mapping.add(t) };
                    let i11 = m.slot as i64 % ne11;
                    let i12 = m.token as i64;
                    let col = if contiguous_or_converted {
                        act.wrapping_add((i11 + i12 * ne11) as usize * self.row_size)
                    } else {
                        act.wrapping_add(i11 as usize * nb11 + i12 as usize * nb12)
                    };
                    let out = dst.wrapping_add(m.slot as usize * nbd[1] + m.token as usize * nbd[2]).cast::<f32>();
                    // SAFETY: rows r0..r1 of this expert and the activation row are inside their
                    // tensors; output rows r0..r1 of this (slot, token) belong to this thread
                    // alone: every (expert, row) is computed by exactly one thread.
                    unsafe { super::dot_block(vec_dot, ne00, weights, nb01, r0..r1, col, out) };
                }
                r0 = r1;
            }
            t0 = t1;
        }
    }

    /// Rows that must stay together in a chunk of work: the layout's interleaved group.
    pub fn row_group(&self) -> i64 {
        self.repack.map_or(1, |l| l.nb_cols as i64)
    }

    /// Phase B: output rows `rows` of `expert` for every routed token, from the weights of the
    /// copy at `base`: ggml-cpu's vec_dot on the standard layout, or CPU_REPACK's gemv on its
    /// layout (one call per token and chunk, as CPU_REPACK's own MUL_MAT_ID makes them).
    pub fn compute_rows(&self, w: &Work, base: *const u8, expert: usize, rows: Range<i64>) {
        match self.repack {
            Some(l) => self.gemv_rows(w, &l, base, expert, rows),
            None => self.dot_rows(w, base, expert, rows),
        }
    }

    /// CPU_REPACK's gemv on rows `rows` (whole interleaved groups) of `expert`, every routed
    /// token: the call CPU_REPACK's MUL_MAT_ID makes for its thread's rows, so each output
    /// is computed by the same kernel from the same bytes, bit for bit.
    fn gemv_rows(&self, w: &Work, l: &RepackLayout, base: *const u8, expert: usize, rows: Range<i64>) {
        let n = self.routed(w, expert);
        if n == 0 || rows.is_empty() {
            return;
        }
        let ne00 = self.src0.ne()[0] as i32;
        let ne01 = self.src0.ne()[1] as usize;
        let (nb01, nb02) = (self.src0.nb()[1], self.src0.nb()[2]);
        let ne11 = self.src1.ne()[1];
        let nbw1 = self.row_size;
        let nbw2 = nbw1 * ne11 as usize;
        let act = w.at(w.layout.converted) as *const u8;
        let nbd = self.dst.nb();
        let dst = self.dst.data_ptr();
        let weights = base.wrapping_add(expert * nb02 + rows.start as usize * nb01);
        let mapping = self.routed_rows(w, expert);
        for t in 0..n {
            // SAFETY: t < routed(expert), inside the mapping thread 0 wrote.
            let m = unsafe { *mapping.add(t) };
            let i11 = m.slot as i64 % ne11;
            let col = act.wrapping_add(i11 as usize * nbw1 + m.token as usize * nbw2);
            let out =
                dst.wrapping_add(m.slot as usize * nbd[1] + m.token as usize * nbd[2]).cast::<f32>().wrapping_add(rows.start as usize);
            // SAFETY: rows is whole interleaved groups of this expert inside the weights; the
            // converted activation row and the output row are inside their buffers; output
            // rows `rows` of this (slot, token) are this thread's alone.
            unsafe { (l.gemv)(ne00, out, ne01, weights.cast(), col.cast(), 1, (rows.end - rows.start) as i32) };
        }
    }

    /// Phase B: ggml-cpu's tiled K-quant kernel on rows `rows` of `expert` (copy `base`),
    /// shared by the `group_size` threads of one node group (this one is `rank`). Returns
    /// false, on every thread alike, where stock would not take the tiled path either.
    /// `base` is a copy of this op's weights from [`crate::buffer::PlacedTensor::copy_base`].
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn tiled(&self, w: &Work, base: *const u8, expert: usize, rows: Range<i64>, rank: usize, group_size: usize) -> bool {
        if self.repack.is_some() || !self.api.has_tiled() || w.layout.tiled_size <= 64 {
            return false;
        }
        let n = self.routed(w, expert);
        let params = NumaMoeComputeParams { ith: rank as i32, nth: group_size as i32, ..w.params };
        // ggml indexes its scratch by ith; shift the base so this thread lands on its own
        // slot (ith = its real index) even though it passes its rank in the group.
        let tiled_base = w.at(w.layout.tiled);
        let aligned = ((tiled_base as usize + 63) & !63) as *mut u8;
        // ggml reserves 64 bytes of alignment slack plus one slot per thread.
        let slot_size = (w.layout.tiled_size - 64) / w.nth();
        let slot = aligned.wrapping_add(w.ith() * slot_size).wrapping_sub(rank * slot_size);
        // SAFETY: the node is live and its src0 has the layout of `base`; slot + rank*slot_size
        // is this thread's own slot of the region reserved by layout(); the mapping holds
        // the n rows thread 0 wrote for this expert.
        unsafe { self.api.mmid_tiled_rows(&params, self.dst, base, rows, expert, n, self.routed_rows(w, expert), slot) }
    }
}
