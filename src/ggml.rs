//! ggml as numa-moe sees it: bindgen views of the pinned ggml structs, the table of ggml
//! functions the ggml-cpu adapter hands us, and the kernel calls of the routed matmul.
//!
//! This is the only file that dereferences ggml pointers. Everything above it works with
//! [`TensorRef`] and [`MmidOp`], whose methods state the threading protocol they rely on.
//! No ggml library is linked: ggml's functions arrive as pointers in [`NumaMoeGgmlApi`],
//! so the library works when LD_PRELOADed into any patched llama.cpp build.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void, CStr};
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::OnceLock;

#[allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, clippy::all)]
pub mod raw {
    include!(concat!(env!("OUT_DIR"), "/ggml_bindings.rs"));
}

pub use raw::ggml_type as GgmlType;

/// The ggml functions numa-moe calls, handed over by the adapter compiled into ggml-cpu.
/// ggml objects travel as `void *` so this header does not depend on ggml's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NumaMoeGgmlApi {
    /// sizeof(NumaMoeGgmlApi) as the caller compiled it.
    pub struct_size: u32,
    /// GGML_BACKEND_API_VERSION of the caller.
    pub backend_api_version: u32,
    /// The CPU device (ggml_backend_dev_t) buffers of our type belong to.
    pub cpu_device: *mut c_void,
    /// The ggml::cpu::extra_buffer_type object, stored as the buffer type's context.
    pub extra_context: *mut c_void,
    /// ggml_backend_buffer_init(buft, *iface, context, size).
    pub buffer_init: Option<unsafe extern "C" fn(*mut c_void, *const c_void, *mut c_void, usize) -> *mut c_void>,
    /// ggml_get_type_traits(type): const struct ggml_type_traits *.
    pub get_type_traits: Option<unsafe extern "C" fn(i32) -> *const c_void>,
    /// ggml_get_type_traits_cpu(type): const struct ggml_type_traits_cpu *.
    pub get_type_traits_cpu: Option<unsafe extern "C" fn(i32) -> *const c_void>,
    /// ggml_barrier(threadpool).
    pub barrier: Option<unsafe extern "C" fn(*mut c_void)>,
    /// ggml_is_numa(): llama.cpp's own --numa pinning is active.
    pub is_numa: Option<unsafe extern "C" fn() -> bool>,
    /// Logs one line through ggml's log callback (level: enum ggml_log_level).
    pub log: Option<unsafe extern "C" fn(i32, *const c_char)>,
    /// ggml_tiled_wdata_size(n_tasks, dst); NULL where ggml-cpu has no tiled path.
    pub tiled_wdata_size: Option<unsafe extern "C" fn(i32, *const c_void) -> usize>,
    /// ggml_compute_forward_mul_mat_id_tiled for one expert; NULL where absent.
    pub mmid_tiled: Option<unsafe extern "C" fn(*const NumaMoeComputeParams, *mut c_void, i64, i64, *const i32, *mut c_char) -> bool>,
    /// Whether ggml-cpu's CPU_REPACK buffer type would take the weights of this MUL_MAT_ID
    /// (asked the way llama.cpp's loader asks it); NULL where ggml-cpu has no repack.
    pub stock_repacks: Option<unsafe extern "C" fn(*const c_void) -> bool>,
}

/// ggml-cpu's compute parameters, unpacked by the adapter.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NumaMoeComputeParams {
    pub ith: i32,
    pub nth: i32,
    pub wsize: usize,
    pub wdata: *mut c_void,
    pub threadpool: *mut c_void,
    pub use_ref: bool,
}

/// The validated table. The pointers in it stay valid for the life of the process (they
/// point into libggml-base/libggml-cpu, which are never unloaded while ggml runs).
pub struct Api(NumaMoeGgmlApi);

// SAFETY: the table holds function pointers and two process-lifetime ggml objects, all of
// which ggml itself uses from any thread.
unsafe impl Send for Api {}
// SAFETY: as above; the table is never mutated after attach.
unsafe impl Sync for Api {}

static API: OnceLock<Api> = OnceLock::new();

/// Stores the ggml function table. The first successful attach wins; later calls must
/// describe the same ggml.
pub fn attach(table: &NumaMoeGgmlApi) -> Result<&'static Api, String> {
    if table.struct_size as usize != std::mem::size_of::<NumaMoeGgmlApi>() {
        return Err(format!(
            "ggml adapter table is {} bytes, this library expects {}: the patched llama.cpp and libnuma_moe.so come from different numa-moe versions",
            table.struct_size,
            std::mem::size_of::<NumaMoeGgmlApi>()
        ));
    }
    if table.backend_api_version != raw::GGML_BACKEND_API_VERSION {
        return Err(format!(
            "ggml backend API version {} does not match the {} this library was built for",
            table.backend_api_version,
            raw::GGML_BACKEND_API_VERSION
        ));
    }
    if table.buffer_init.is_none() || table.get_type_traits.is_none() || table.get_type_traits_cpu.is_none() || table.barrier.is_none() {
        return Err("ggml adapter table lacks a required function".into());
    }
    Ok(API.get_or_init(|| Api(*table)))
}

pub fn api() -> Option<&'static Api> {
    API.get()
}

/// The kernel functions of one ggml type on this CPU.
#[derive(Clone, Copy)]
pub struct CpuTraits {
    pub from_float: raw::ggml_from_float_t,
    pub vec_dot: raw::ggml_vec_dot_t,
    pub vec_dot_type: GgmlType,
}

impl Api {
    fn traits(&self, ty: GgmlType) -> Option<&'static raw::ggml_type_traits> {
        if ty >= raw::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: ggml returns a pointer into its static type table for any valid type.
        unsafe { (self.0.get_type_traits?(ty as i32) as *const raw::ggml_type_traits).as_ref() }
    }

    pub fn cpu_traits(&self, ty: GgmlType) -> Option<CpuTraits> {
        if ty >= raw::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: as above, for ggml-cpu's static table.
        let t = unsafe { (self.0.get_type_traits_cpu?(ty as i32) as *const raw::ggml_type_traits_cpu).as_ref()? };
        Some(CpuTraits { from_float: t.from_float, vec_dot: t.vec_dot, vec_dot_type: t.vec_dot_type })
    }

    pub fn type_name(&self, ty: GgmlType) -> String {
        self.traits(ty)
            .filter(|t| !t.type_name.is_null())
            // SAFETY: type_name is a static NUL-terminated string in ggml's table.
            .map(|t| unsafe { CStr::from_ptr(t.type_name) }.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("type{ty}"))
    }

    /// Bytes of `ne` elements of type `ty` (ggml_row_size).
    pub fn row_size(&self, ty: GgmlType, ne: i64) -> usize {
        match self.traits(ty) {
            Some(t) if t.blck_size > 0 => t.type_size * (ne as usize) / t.blck_size as usize,
            _ => 0,
        }
    }

    pub fn type_size(&self, ty: GgmlType) -> usize {
        self.traits(ty).map_or(0, |t| t.type_size)
    }

    pub fn blck_size(&self, ty: GgmlType) -> i64 {
        self.traits(ty).map_or(0, |t| t.blck_size)
    }

    pub fn is_numa(&self) -> bool {
        // SAFETY: a plain query of ggml-cpu's global state.
        self.0.is_numa.is_some_and(|f| unsafe { f() })
    }

    pub fn log(&self, level: i32, text: &str) {
        let Some(f) = self.0.log else {
            eprint!("{text}");
            return;
        };
        let c = std::ffi::CString::new(text.replace('\0', " ")).unwrap_or_default();
        // SAFETY: c is a valid NUL-terminated string for the duration of the call.
        unsafe { f(level, c.as_ptr()) }
    }

    /// Whether stock llama.cpp would put these MUL_MAT_ID weights in CPU_REPACK.
    pub fn stock_repacks(&self, op: TensorRef) -> bool {
        // SAFETY: op is a live loader probe; the adapter only reads it and copies headers.
        self.0.stock_repacks.is_some_and(|f| unsafe { f(op.0.as_ptr().cast()) })
    }

    pub fn cpu_device(&self) -> *mut c_void {
        self.0.cpu_device
    }

    pub fn extra_context(&self) -> *mut c_void {
        self.0.extra_context
    }

    /// Creates a ggml buffer object (ggml owns and frees it; `free_buffer` gets `context`).
    pub fn buffer_init(
        &self,
        buft: *mut raw::ggml_backend_buffer_type,
        iface: &raw::ggml_backend_buffer_i,
        context: *mut c_void,
        size: usize,
    ) -> *mut raw::ggml_backend_buffer {
        let f = self.0.buffer_init.expect("checked at attach");
        // SAFETY: ggml copies iface and stores the other arguments; buft is our static type.
        unsafe { f(buft.cast(), (iface as *const raw::ggml_backend_buffer_i).cast(), context, size).cast() }
    }

    /// ggml_barrier on the op's threadpool.
    pub fn barrier(&self, params: &NumaMoeComputeParams) {
        let f = self.0.barrier.expect("checked at attach");
        // SAFETY: every thread of the op calls this with the threadpool ggml gave it.
        unsafe { f(params.threadpool) }
    }

    fn tiled_wdata_size(&self, n_tasks: i32, dst: TensorRef) -> usize {
        match self.0.tiled_wdata_size {
            // SAFETY: dst is a live MUL_MAT_ID node; the function only reads its sources.
            Some(f) => unsafe { f(n_tasks, dst.0.as_ptr().cast()) },
            None => 0,
        }
    }
}

/// A live ggml tensor. Construction is unsafe: the pointer must stay valid while used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TensorRef(NonNull<raw::ggml_tensor>);

// SAFETY: ggml tensors are shared by all threads of a graph compute; numa-moe only reads
// their metadata and writes output rows under ggml's one-writer-per-element protocol.
unsafe impl Send for TensorRef {}
// SAFETY: as above.
unsafe impl Sync for TensorRef {}

impl TensorRef {
    /// # Safety
    /// `p` must be null or point to a ggml tensor that outlives every use of the result.
    pub unsafe fn new(p: *const raw::ggml_tensor) -> Option<Self> {
        NonNull::new(p as *mut raw::ggml_tensor).map(TensorRef)
    }

    fn t(&self) -> &raw::ggml_tensor {
        // SAFETY: valid per the constructor's contract.
        unsafe { self.0.as_ref() }
    }

    pub fn as_ptr(&self) -> *mut raw::ggml_tensor {
        self.0.as_ptr()
    }

    pub fn name(&self) -> String {
        // SAFETY: name is a fixed-size char array; stop at the first NUL or its end.
        let bytes: Vec<u8> = self.t().name.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn ty(&self) -> GgmlType {
        self.t().type_
    }

    pub fn op(&self) -> raw::ggml_op {
        self.t().op
    }

    pub fn ne(&self) -> [i64; 4] {
        self.t().ne
    }

    pub fn nb(&self) -> [usize; 4] {
        self.t().nb
    }

    pub fn data_addr(&self) -> usize {
        self.t().data as usize
    }

    pub fn src(&self, i: usize) -> Option<TensorRef> {
        // SAFETY: sources of a live node are live tensors (or null).
        unsafe { TensorRef::new(*self.t().src.get(i)?) }
    }

    pub fn view_src(&self) -> Option<TensorRef> {
        // SAFETY: as for src().
        unsafe { TensorRef::new(self.t().view_src) }
    }

    pub fn buffer(&self) -> *mut raw::ggml_backend_buffer {
        self.t().buffer
    }

    /// The buffer type of the tensor's buffer, if it has one.
    pub fn buffer_type(&self) -> *mut raw::ggml_backend_buffer_type {
        let b = self.t().buffer;
        if b.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: a tensor's buffer is a live ggml buffer object.
            unsafe { (*b).buft }
        }
    }

    /// The `context` of the tensor's buffer.
    pub fn buffer_context(&self) -> *mut c_void {
        let b = self.t().buffer;
        if b.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: as above.
            unsafe { (*b).context }
        }
    }

    pub fn nelements(&self) -> i64 {
        self.ne().iter().product()
    }

    /// Bytes spanned by the tensor (ggml_nbytes for block types).
    pub fn nbytes(&self, api: &Api) -> usize {
        let ne = self.ne();
        let nb = self.nb();
        if ne.iter().any(|&n| n <= 0) {
            return 0;
        }
        let blck = api.blck_size(self.ty()).max(1);
        let mut bytes = if blck == 1 { api.type_size(self.ty()) } else { (ne[0] as usize) * nb[0] / blck as usize };
        for i in (if blck == 1 { 0 } else { 1 })..4 {
            bytes += (ne[i] as usize - 1) * nb[i];
        }
        bytes
    }

    /// Rows packed back to back and experts back to back (what the planner assumes).
    pub fn is_expert_stack_layout(&self, api: &Api) -> bool {
        let ne = self.ne();
        let nb = self.nb();
        ne[3] == 1 && nb[0] == api.type_size(self.ty()) && nb[1] == api.row_size(self.ty(), ne[0]) && nb[2] == nb[1] * ne[1] as usize
    }

    /// Raw pointer to the tensor's first byte, for copying in and out of our own memory.
    pub fn data_ptr(&self) -> *mut u8 {
        self.t().data.cast()
    }

    /// A copy of the tensor header with another data pointer and row count: the view of
    /// rows `rows` of every expert that the tiled kernel is handed.
    fn with_rows(&self, base: *const u8, rows: &Range<i64>) -> raw::ggml_tensor {
        let mut t = *self.t();
        t.ne[1] = rows.end - rows.start;
        // SAFETY (pointer arithmetic only): base + rows.start*nb1 stays inside the copy.
        t.data = base.wrapping_add(rows.start as usize * t.nb[1]) as *mut c_void;
        t.extra = std::ptr::null_mut();
        t
    }
}

/// One src1 row routed to an expert: (expert slot in ids, token), as ggml-cpu lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowMapping {
    pub slot: i32,
    pub token: i32,
}

/// Offsets into the op's work buffer. The first region has ggml-cpu's own layout (the
/// src1 rows converted to vec_dot_type) because ggml's tiled kernel reads it there.
#[derive(Clone, Copy, Debug)]
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

/// Most thread groups (nodes) an op's claim counters cover.
const MAX_GROUPS: usize = 64;

const CACHE_LINE: usize = 64;

fn pad(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// The MUL_MAT_ID node as the hook computes it, with its shapes and kernels resolved.
#[derive(Clone, Copy)]
pub struct MmidOp {
    pub dst: TensorRef,
    pub src0: TensorRef,
    pub src1: TensorRef,
    pub ids: TensorRef,
    traits: CpuTraits,
    row_size: usize,
    api: &'static Api,
}

impl MmidOp {
    /// Checks the node against everything ggml-cpu's stock kernel asserts, plus what the
    /// hook needs (F32 or vec_dot_type activations, I32 ids). `None`: let ggml compute it.
    pub fn new(api: &'static Api, dst: TensorRef) -> Option<Self> {
        if dst.op() != raw::GGML_OP_MUL_MAT_ID {
            return None;
        }
        let (src0, src1, ids) = (dst.src(0)?, dst.src(1)?, dst.src(2)?);
        let traits = api.cpu_traits(src0.ty())?;
        traits.vec_dot?;
        if src1.ty() != traits.vec_dot_type {
            if src1.ty() != raw::GGML_TYPE_F32 {
                return None;
            }
            api.cpu_traits(traits.vec_dot_type)?.from_float?;
        }
        let (ne1, nb1) = (src1.ne(), src1.nb());
        let (ned, nbd) = (dst.ne(), dst.nb());
        let ok = src0.nb()[0] == api.type_size(src0.ty())
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
        Some(MmidOp { dst, src0, src1, ids, traits, row_size, api })
    }

    pub fn n_expert(&self) -> usize {
        self.src0.ne()[2] as usize
    }

    fn n_ids(&self) -> usize {
        self.ids.ne()[0] as usize
    }

    fn n_tokens(&self) -> usize {
        self.ids.ne()[1] as usize
    }

    fn needs_conversion(&self) -> bool {
        self.src1.ty() != self.traits.vec_dot_type
    }

    /// The work buffer this op needs with `n_threads` threads, laid out so that ggml-cpu's
    /// stock kernel could also run in it (the fallback shares the buffer).
    pub fn layout(&self, n_threads: usize) -> WorkLayout {
        let mut off = 0;
        let converted = 0;
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
        let roster = off;
        off += n_threads * CACHE_LINE;
        let claims = off;
        off += MAX_GROUPS * CACHE_LINE;
        WorkLayout { converted, counts, rows, tiled, tiled_size, roster, claims, total: off.max(self.stock_work_size(n_threads)) }
    }

    /// ggml-cpu's own work size for this node (ggml_graph_plan's MUL_MAT_ID case).
    fn stock_work_size(&self, n_threads: usize) -> usize {
        let mut cur = 0;
        if self.needs_conversion() {
            cur += self.api.row_size(self.traits.vec_dot_type, self.src1.nelements()) + 8;
        }
        cur += self.n_expert() * 8 + 8;
        cur += self.n_expert() * self.n_ids() * self.n_tokens() * std::mem::size_of::<RowMapping>() + 8;
        cur += CACHE_LINE * self.n_expert() + CACHE_LINE;
        cur = pad(cur, 64);
        cur + self.api.tiled_wdata_size(n_threads as i32, self.dst)
    }

    /// Phase A, every thread: convert this thread's share of the activations to vec_dot_type,
    /// with ggml-cpu's partition (so the bytes are the ones stock produces).
    pub fn convert_src1(&self, w: &Work) {
        if !self.needs_conversion() {
            return;
        }
        let from_float = self.api.cpu_traits(self.traits.vec_dot_type).and_then(|t| t.from_float).expect("checked in new");
        let ne = self.src1.ne();
        let nb = self.src1.nb();
        let vt = self.traits.vec_dot_type;
        let bs = self.api.blck_size(vt) as i64;
        let nbw0 = self.api.type_size(vt);
        let nbw1 = self.api.row_size(vt, ne[0]);
        let nbw2 = nbw1 * ne[1] as usize;
        let (ith, nth) = (w.params.ith as i64, w.params.nth as i64);
        let start = (ith * ne[0] / bs) / nth;
        let end = ((ith + 1) * ne[0] / bs) / nth;
        if end <= start {
            return;
        }
        let base_in = self.src1.data_ptr();
        let base_out = w.at(w.layout.converted);
        for i12 in 0..ne[2] {
            for i11 in 0..ne[1] {
                let x = base_in.wrapping_add(i12 as usize * nb[2] + i11 as usize * nb[1] + (start * bs) as usize * nb[0]);
                let y = base_out.wrapping_add(i12 as usize * nbw2 + i11 as usize * nbw1 + start as usize * nbw0);
                // SAFETY: x and y address this thread's disjoint block range of one row of
                // src1 and of the converted copy, both sized by ggml for the whole tensor.
                unsafe { from_float(x.cast(), y.cast(), (end - start) * bs) };
            }
        }
    }

    /// Phase A, thread 0 only: group the routed rows by expert, in ggml-cpu's layout.
    pub fn group_rows(&self, w: &Work) {
        let n_as = self.n_expert();
        let per = self.n_ids() * self.n_tokens();
        let counts = w.at(w.layout.counts).cast::<i64>();
        let rows = w.at(w.layout.rows).cast::<RowMapping>();
        let idd = self.ids.data_ptr();
        let nbi = self.ids.nb();
        // SAFETY: thread 0 alone writes these regions between the op's start and its barrier.
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
    /// of copy `base` (ggml layout), with ggml-cpu's vec_dot exactly as its stock kernel
    /// calls it, so the results are bit-identical.
    pub fn dot_rows(&self, w: &Work, base: *const u8, expert: usize, rows: Range<i64>) {
        let n = self.routed(w, expert);
        if n == 0 || rows.is_empty() {
            return;
        }
        let vec_dot = self.traits.vec_dot.expect("checked in new");
        let ne00 = self.src0.ne()[0] as i32;
        let nb01 = self.src0.nb()[1];
        let nb02 = self.src0.nb()[2];
        let ne11 = self.src1.ne()[1];
        let (nb11, nb12) = (self.src1.nb()[1], self.src1.nb()[2]);
        let contiguous_or_converted = self.needs_conversion() || is_contiguous(self.src1);
        let act = if self.needs_conversion() { w.at(w.layout.converted) as *const u8 } else { self.src1.data_ptr() as *const u8 };
        let nbd = self.dst.nb();
        let dst = self.dst.data_ptr();
        let weights = base.wrapping_add(expert * nb02);
        let mapping = self.routed_rows(w, expert);
        const BLK: i64 = 16;
        let mut tmp = [0f32; BLK as usize];
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
                    for r in r0..r1 {
                        // SAFETY: row r of this expert and the activation row are inside
                        // their tensors; tmp has room for one float.
                        unsafe {
                            vec_dot(
                                ne00,
                                tmp.as_mut_ptr().add((r - r0) as usize),
                                0,
                                weights.add(r as usize * nb01).cast(),
                                0,
                                col.cast(),
                                0,
                                1,
                            )
                        };
                    }
                    let out = dst.wrapping_add(m.slot as usize * nbd[1] + m.token as usize * nbd[2]).cast::<f32>();
                    // SAFETY: output rows r0..r1 of this (slot, token) belong to this thread
                    // alone: every (expert, row) is computed by exactly one thread.
                    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(r0 as usize), (r1 - r0) as usize) };
                }
                r0 = r1;
            }
            t0 = t1;
        }
    }

    /// Phase B: ggml-cpu's tiled K-quant kernel on rows `rows` of `expert` (copy `base`),
    /// shared by the `group_size` threads of one node group (this one is `rank`). Returns
    /// false, on every thread alike, where stock would not take the tiled path either.
    pub fn tiled(&self, w: &Work, base: *const u8, expert: usize, rows: Range<i64>, rank: usize, group_size: usize) -> bool {
        let Some(f) = self.api.0.mmid_tiled else { return false };
        if w.layout.tiled_size == 0 {
            return false;
        }
        let n = self.routed(w, expert);
        let mut src0 = self.src0.with_rows(base, &rows);
        let mut dst = *self.dst_ref();
        dst.ne[0] = rows.end - rows.start;
        dst.data = self.dst.data_ptr().wrapping_add(rows.start as usize * 4).cast();
        dst.src[0] = &mut src0;
        let params = NumaMoeComputeParams { ith: rank as i32, nth: group_size as i32, ..w.params };
        // ggml indexes its scratch by ith; shift the base so this thread lands on its own
        // slot (ith = its real index) even though it passes its rank in the group.
        let tiled_base = w.at(w.layout.tiled);
        let aligned = ((tiled_base as usize + 63) & !63) as *mut u8;
        // ggml reserves 64 bytes of alignment slack plus one slot per thread.
        let slot_size = (w.layout.tiled_size - 64) / w.params.nth.max(1) as usize;
        let slot = aligned.wrapping_add(w.params.ith as usize * slot_size).wrapping_sub(rank * slot_size);
        // SAFETY: dst and src0 are header copies of live tensors pointing at valid row
        // ranges; scratch + rank*slot is this thread's own 512 KiB slot of the region
        // reserved by layout(); the mapping is what thread 0 wrote for this expert.
        unsafe {
            f(&params, (&mut dst as *mut raw::ggml_tensor).cast(), expert as i64, n as i64, self.routed_rows(w, expert).cast(), slot.cast())
        }
    }

    fn dst_ref(&self) -> &raw::ggml_tensor {
        self.dst.t()
    }
}

fn is_contiguous(t: TensorRef) -> bool {
    let ne = t.ne();
    let nb = t.nb();
    nb[1] == nb[0] * ne[0] as usize && nb[2] == nb[1] * ne[1] as usize && nb[3] == nb[2] * ne[2] as usize
}

/// The op's work buffer and this thread's parameters.
pub struct Work {
    pub params: NumaMoeComputeParams,
    pub layout: WorkLayout,
}

impl Work {
    /// `None` if ggml gave less work memory than the layout needs.
    pub fn new(params: &NumaMoeComputeParams, layout: WorkLayout) -> Option<Self> {
        (params.wsize >= layout.total && !params.wdata.is_null()).then_some(Work { params: *params, layout })
    }

    fn at(&self, off: usize) -> *mut u8 {
        self.params.wdata.cast::<u8>().wrapping_add(off)
    }

    /// Phase A: this thread records the node it runs on (its own cache line).
    pub fn set_roster(&self, node: u32) {
        let p = self.at(self.layout.roster + self.params.ith as usize * CACHE_LINE).cast::<u32>();
        // SAFETY: each thread writes only its own slot before the barrier.
        unsafe { p.write_volatile(node) }
    }

    /// Phase A, thread 0: zeroes every group's claim counter (read only after the barrier).
    pub fn reset_claims(&self) {
        for g in 0..MAX_GROUPS {
            let p = self.at(self.layout.claims + g * CACHE_LINE).cast::<usize>();
            // SAFETY: thread 0 alone writes the counters before the barrier.
            unsafe { p.write_volatile(0) }
        }
    }

    /// Phase B: claims the next chunk of work of group `slot` (index into its list).
    pub fn claim(&self, slot: usize) -> usize {
        assert!(slot < MAX_GROUPS, "more than {MAX_GROUPS} thread groups");
        let p = self.at(self.layout.claims + slot * CACHE_LINE).cast::<std::sync::atomic::AtomicUsize>();
        // SAFETY: the counter is an aligned usize in the work buffer, zeroed before the barrier
        // and from then on only touched atomically; the barrier's ordering publishes the zero.
        unsafe { (*p).fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
    }

    /// Phase B: the node of every thread (after the barrier).
    pub fn roster(&self) -> Vec<u32> {
        (0..self.params.nth as usize)
            .map(|i| {
                let p = self.at(self.layout.roster + i * CACHE_LINE).cast::<u32>();
                // SAFETY: all slots were written before the barrier and are only read now.
                unsafe { p.read_volatile() }
            })
            .collect()
    }
}
