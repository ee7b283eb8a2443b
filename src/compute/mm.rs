//! MUL_MAT over a placed weight matrix (attention, shared experts, dense FFN, output head):
//! each node's threads compute the output rows their node holds, with the kernel ggml-cpu's
//! stock path would use for the op, so every output element is computed by the same kernel
//! from the same bytes, bit for bit:
//!
//! - ggml's standard layout: `vec_dot`, as ggml_compute_forward_mul_mat's chunked path calls
//!   it. That path is stock's for one activation column per plane (decode): llamafile's sgemm
//!   only serves two or more columns on x86 and ARM, and the tiled K-quant kernel eight or
//!   more. Wider batches are left to ggml-cpu (which then reads the placed bytes itself).
//! - CPU_REPACK's layouts: its gemm for each whole group of four activation rows and its gemv
//!   for the rest, with the activations quantized as CPU_REPACK quantizes them, for any batch.

use std::ops::Range;

use super::work::{pad, Work, WorkLayout, CACHE_LINE};
use crate::ggml::{raw, Api, CpuTraits, RepackLayout, TensorRef};

/// A MUL_MAT node numa-moe computes, with its kernels resolved.
pub struct MmOp {
    pub dst: TensorRef,
    pub src0: TensorRef,
    pub src1: TensorRef,
    traits: CpuTraits,
    /// Converts F32 activations to the kernel's type (None: src1 already has it).
    from_float: Option<unsafe extern "C" fn(*const f32, *mut std::ffi::c_void, i64)>,
    /// Bytes of one converted activation row.
    row_size: usize,
    repack: Option<RepackLayout>,
    api: &'static Api,
}

/// Whether ggml-cpu's tiled kernel is forced onto every batch (GGML_CPU_TILED_MM_FORCE=1, a
/// test switch of ggml's): then stock would not take the vec_dot path this hook mirrors.
fn tiled_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("GGML_CPU_TILED_MM_FORCE").is_ok_and(|v| v.trim().parse::<i32>() == Ok(1)))
}

impl MmOp {
    /// Checks the node against what ggml-cpu's stock kernel asserts (CPU_REPACK's, for weights
    /// in its `repack` layout) and against the path this hook mirrors. `None`: ggml computes.
    pub fn new(api: &'static Api, dst: TensorRef, repack: Option<RepackLayout>) -> Option<Self> {
        if dst.op() != raw::GGML_OP_MUL_MAT || dst.op_param_i32(1) != 0 {
            return None; // a hint (the Hadamard transform) takes another path in stock
        }
        let (src0, src1) = (dst.src(0)?, dst.src(1)?);
        let (ne0, ne1, ned) = (src0.ne(), src1.ne(), dst.ne());
        let (nb1, nbd) = (src1.nb(), dst.nb());
        let positive = [ne0, ne1, ned].iter().all(|ne| ne.iter().all(|&n| n >= 1));
        let shaped = positive
            && ne0[3] == 1
            && ne1[2] % ne0[2] == 0
            && ned[0] == ne0[1]
            && ned[1] == ne1[1]
            && ned[2] == ne1[2]
            && ned[3] == ne1[3]
            && ne0[0] == ne1[0]
            && src0.nb()[0] == api.type_size(src0.ty())
            && nb1[0] == api.type_size(src1.ty())
            && dst.ty() == raw::GGML_TYPE_F32
            && nbd[0] == 4
            && nbd[0] <= nbd[1]
            && nbd[1] <= nbd[2]
            && nbd[2] <= nbd[3];
        if !shaped {
            return None;
        }
        let mut traits = api.cpu_traits(src0.ty())?;
        let from_float;
        if let Some(l) = repack {
            // CPU_REPACK: F32 activations of at most three dimensions, whole row groups
            if src1.ty() != raw::GGML_TYPE_F32 || ne0[2] != 1 || ne1[3] != 1 || ne0[1] % l.nb_cols as i64 != 0 {
                return None;
            }
            if ne1[1] > 3 && (l.gemm.is_none() || l.quantize_mat.is_none()) {
                return None;
            }
            traits.vec_dot_type = l.param_type;
            from_float = Some(l.from_float);
        } else {
            // stock's chunked vec_dot path: one column per plane, one row per call
            if cfg!(target_arch = "powerpc64") || ne1[1] != 1 || traits.nrows != 1 || tiled_forced() {
                return None;
            }
            traits.vec_dot?;
            from_float = if src1.ty() == traits.vec_dot_type {
                None
            } else if src1.ty() == raw::GGML_TYPE_F32 {
                Some(api.cpu_traits(traits.vec_dot_type)?.from_float?)
            } else {
                return None; // F16/BF16 activations are widened by stock; not mirrored here
            };
        }
        let row_size = api.row_size(traits.vec_dot_type, ne1[0]);
        // the converted activations must be addressable
        row_size.checked_mul(src1.nelements() as usize / ne1[0] as usize)?;
        Some(MmOp { dst, src0, src1, traits, from_float, row_size, repack, api })
    }

    /// Activation columns over all planes.
    pub fn columns(&self) -> i64 {
        let ne = self.src1.ne();
        ne[1] * ne[2] * ne[3]
    }

    /// Weight matrices in the stack (1, or the heads of a per-head attention stack).
    pub fn heads(&self) -> usize {
        self.src0.ne()[2] as usize
    }

    /// Activation columns each weight matrix of the stack multiplies (stock broadcasts
    /// matrix `i02` over planes `i02 * r2 .. (i02 + 1) * r2`).
    pub fn columns_per_head(&self) -> i64 {
        self.columns() / self.heads() as i64
    }

    /// Columns per plane (tokens of a batch).
    pub fn n_tokens(&self) -> usize {
        self.src1.ne()[1] as usize
    }

    /// Rows that must stay together in a chunk of work: the layout's interleaved group.
    pub fn row_group(&self) -> i64 {
        self.repack.map_or(1, |l| l.nb_cols as i64)
    }

    fn converted_bytes(&self) -> usize {
        if self.from_float.is_some() {
            self.row_size * self.columns() as usize
        } else {
            0
        }
    }

    /// The work buffer this op needs with `n_threads` threads, never smaller than what
    /// ggml-cpu's (or CPU_REPACK's) own kernel needs, so that it could run in it too.
    pub fn layout(&self, n_threads: usize) -> WorkLayout {
        let converted = pad(self.converted_bytes(), CACHE_LINE);
        let stock = if self.repack.is_some() {
            self.api.row_size(self.traits.vec_dot_type, self.src1.nelements())
        } else {
            let cur = if self.src1.ty() != self.traits.vec_dot_type {
                self.api.row_size(self.traits.vec_dot_type, self.src1.nelements())
            } else {
                0
            };
            pad(cur, 64) + self.api.tiled_wdata_size(n_threads as i32, self.dst)
        };
        let l = WorkLayout {
            converted: 0,
            counts: converted,
            rows: converted,
            tiled: converted,
            tiled_size: 0,
            roster: 0,
            claims: 0,
            total: 0,
        };
        l.with_threads(converted, n_threads, stock)
    }

    /// Phase A, every thread: convert this thread's share of the activations, as the stock
    /// kernel of the layout partitions it (the bytes do not depend on the partition).
    pub fn convert_src1(&self, w: &Work) {
        let Some(from_float) = self.from_float else { return };
        let ne = self.src1.ne();
        let nb = self.src1.nb();
        let (ith, nth) = (w.ith() as i64, w.nth() as i64);
        let out = w.at(w.layout.converted);
        if let Some(l) = self.repack {
            // CPU_REPACK: per plane, groups of four rows interleaved for gemm, the rest one by one
            let nbw1 = self.row_size;
            let nbw2 = nbw1 * ne[1] as usize;
            let whole = ne[1] - ne[1] % 4;
            for i12 in 0..ne[2] {
                let x = self.src1.data_ptr().wrapping_add(i12 as usize * nb[2]);
                let y = out.wrapping_add(i12 as usize * nbw2);
                // (new() made sure quantize_mat exists where there are whole groups of four)
                if let Some(quantize_mat) = l.quantize_mat {
                    for i11 in (ith * 4..whole).step_by(nth as usize * 4) {
                        // SAFETY: rows i11..i11+4 of this plane and their converted slots are
                        // inside src1 and the work buffer; each thread takes its own groups.
                        unsafe {
                            quantize_mat(x.wrapping_add(i11 as usize * nb[1]).cast(), y.wrapping_add(i11 as usize * nbw1).cast(), 4, ne[0])
                        };
                    }
                }
                for i11 in (whole + ith..ne[1]).step_by(nth as usize) {
                    // SAFETY: as above, one row.
                    unsafe { from_float(x.wrapping_add(i11 as usize * nb[1]).cast(), y.wrapping_add(i11 as usize * nbw1).cast(), ne[0]) };
                }
            }
            return;
        }
        w.convert_like_stock(self.api, self.src1, self.traits.vec_dot_type, from_float);
    }

    /// Phase B: output rows `rows` for every activation column, reading the weights of the
    /// copy at `base` (whole interleaved groups for repacked layouts).
    pub fn compute_rows(&self, w: &Work, base: *const u8, head: usize, rows: Range<i64>) {
        if rows.is_empty() || head >= self.heads() {
            return;
        }
        match self.repack {
            Some(l) => self.gemm_rows(w, &l, base, rows),
            None => self.dot_rows(w, base, head, rows),
        }
    }

    /// ggml_compute_forward_mul_mat_one_chunk on rows `rows`: vec_dot of each weight row with
    /// each activation column, blocked 16 x 16 as stock blocks it.
    fn dot_rows(&self, w: &Work, base: *const u8, head: usize, rows: Range<i64>) {
        let Some(vec_dot) = self.traits.vec_dot else { return };
        let ne00 = self.src0.ne()[0] as i32;
        let nb01 = self.src0.nb()[1];
        let ne1 = self.src1.ne();
        let nb1 = self.src1.nb();
        let nbd = self.dst.nb();
        let converted = self.from_float.is_some();
        let contiguous_or_converted = converted || self.src1.is_contiguous_rows();
        let act = if converted { w.at(w.layout.converted) as *const u8 } else { self.src1.data_ptr() as *const u8 };
        let dst = self.dst.data_ptr();
        // the columns of this head's matrix: planes head * r2 .. (head + 1) * r2 of every i13
        let r2 = ne1[2] / self.heads() as i64;
        let base = base.wrapping_add(head * self.src0.nb()[2]);
        let nr1 = self.columns_per_head();
        const BLK: i64 = 16;
        let mut c0 = 0;
        while c0 < nr1 {
            let c1 = (c0 + BLK).min(nr1);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let r1 = (r0 + BLK).min(rows.end);
                for c in c0..c1 {
                    let i11 = c % ne1[1];
                    let i12 = head as i64 * r2 + (c / ne1[1]) % r2;
                    let i13 = c / (ne1[1] * r2);
                    let col = if contiguous_or_converted {
                        act.wrapping_add((i11 + i12 * ne1[1] + i13 * ne1[2] * ne1[1]) as usize * self.row_size)
                    } else {
                        act.wrapping_add(i11 as usize * nb1[1] + i12 as usize * nb1[2] + i13 as usize * nb1[3])
                    };
                    let out = dst.wrapping_add(i11 as usize * nbd[1] + i12 as usize * nbd[2] + i13 as usize * nbd[3]).cast::<f32>();
                    // SAFETY: rows r0..r1 of the weights and the activation column are inside
                    // their tensors; output rows r0..r1 of this column are this thread's alone:
                    // every row is computed by exactly one thread.
                    unsafe { super::dot_block(vec_dot, ne00, base, nb01, r0..r1, col, out) };
                }
                r0 = r1;
            }
            c0 = c1;
        }
    }

    /// CPU_REPACK's forward_mul_mat_one_chunk on rows `rows` (whole groups) of every plane:
    /// gemm over the whole groups of four activation rows, gemv over the rest.
    fn gemm_rows(&self, w: &Work, l: &RepackLayout, base: *const u8, rows: Range<i64>) {
        let ne00 = self.src0.ne()[0] as i32;
        let ne01 = self.src0.ne()[1] as usize;
        let nb01 = self.src0.nb()[1];
        let ne1 = self.src1.ne();
        let nbd = self.dst.nb();
        let nbw1 = self.row_size;
        let act = w.at(w.layout.converted) as *const u8;
        let weights = base.wrapping_add(rows.start as usize * nb01);
        let ncols = (rows.end - rows.start) as i32;
        let nrows = ne1[1];
        let whole = nrows - nrows % 4;
        for i12 in 0..ne1[2] {
            let src1 = act.wrapping_add(i12 as usize * ne1[1] as usize * nbw1);
            let dst = self.dst.data_ptr().wrapping_add(i12 as usize * nbd[2]);
            if whole > 0 {
                if let Some(gemm) = l.gemm {
                    let out = dst.cast::<f32>().wrapping_add(rows.start as usize);
                    // SAFETY: rows are whole interleaved groups of the weights; the first
                    // `whole` converted rows of this plane were interleaved by quantize_mat;
                    // these output rows of every column of the plane are this thread's alone.
                    unsafe { gemm(ne00, out, nbd[1] / nbd[0], weights.cast(), src1.cast(), whole as i32, ncols) };
                }
            }
            for iter in whole..nrows {
                let out = dst.wrapping_add(iter as usize * nbd[1]).cast::<f32>().wrapping_add(rows.start as usize);
                // SAFETY: as above, for one converted row (from_float's layout) and column.
                unsafe { (l.gemv)(ne00, out, ne01, weights.cast(), src1.wrapping_add(iter as usize * nbw1).cast(), 1, ncols) };
            }
        }
    }
}

/// The op and its weights, for messages.
pub fn describe(op: &MmOp) -> String {
    format!("MUL_MAT {} over {}", op.dst.name(), op.src0.name())
}
