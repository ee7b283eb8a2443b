//! ggml as numa-moe sees it: bindgen views of the pinned ggml structs and the table of ggml
//! functions the ggml-cpu adapter hands us.
//!
//! This is the only file that dereferences ggml structs. Everything above it works with
//! [`TensorRef`] views and the [`Api`] table; the kernels live in [`crate::compute`].
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
    /// The same for the buffer type of repacked layouts.
    pub extra_context_repack: *mut c_void,
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
    /// The interleaved layout and kernels ggml-cpu's CPU_REPACK gives these weights (a
    /// ggml_tensor) on this CPU; false where it leaves them. NULL where ggml-cpu has no repack.
    pub repack_layout: Option<unsafe extern "C" fn(*const c_void, *mut NumaMoeRepackLayout) -> bool>,
    /// CPU_REPACK's conversion: writes `size` bytes of standard-layout data, described by the
    /// tensor header (a ggml_tensor whose data is the destination), repacked. 0 on success.
    pub repack: Option<unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> i32>,
    /// Fills in what ggml's registered backends offer for pinning host memory; NULL where the
    /// adapter cannot see ggml's backend registry.
    pub host_registration: Option<unsafe extern "C" fn(*mut NumaMoeHostRegistration)>,
}

/// A GPU backend's registration of host memory as pinned memory, as the adapter finds it among
/// ggml's registered backends (each backend's proc address `ggml_backend_register_host_buffer`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NumaMoeHostRegistration {
    /// ggml_backend_register_host_buffer(ptr, size) of the first backend that offers it, or NULL.
    pub register_host: Option<unsafe extern "C" fn(*mut c_void, usize) -> bool>,
    /// That backend's ggml_backend_unregister_host_buffer(ptr), or NULL.
    pub unregister_host: Option<unsafe extern "C" fn(*mut c_void)>,
    /// That backend's name (ggml_backend_reg_name), or NULL.
    pub backend: *const c_char,
    /// A GPU device whose backend offers no registration (ggml_backend_dev_name), or NULL.
    pub gpu_without: *const c_char,
}

/// What the GPU backends in the process offer for pinning numa-moe's host memory.
#[derive(Clone, Debug, Default)]
pub struct HostRegistrar {
    /// The backend that registers host memory (ggml-cuda at the pin), if any.
    pub backend: Option<String>,
    /// A GPU device that cannot (its backend offers no registration), if any.
    pub gpu_without: Option<String>,
    register: Option<RegisterHost>,
    unregister: Option<UnregisterHost>,
}

/// ggml_backend_register_host_buffer(ptr, size) and its inverse.
pub type RegisterHost = unsafe extern "C" fn(*mut c_void, usize) -> bool;
pub type UnregisterHost = unsafe extern "C" fn(*mut c_void);

impl HostRegistrar {
    pub fn new(
        backend: Option<String>,
        gpu_without: Option<String>,
        register: Option<RegisterHost>,
        unregister: Option<UnregisterHost>,
    ) -> Self {
        HostRegistrar { backend, gpu_without, register, unregister }
    }

    /// Whether a backend registers host memory.
    pub fn available(&self) -> bool {
        self.register.is_some() && self.unregister.is_some()
    }

    /// Registers `len` bytes at `ptr` as pinned host memory; false when the backend declines.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped memory of this process that stays mapped until
    /// [`HostRegistrar::unregister`] is called with `ptr`.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> bool {
        // SAFETY: per this function's contract; the backend only pins the range.
        self.register.is_some_and(|f| unsafe { f(ptr.cast(), len) })
    }

    /// Undoes a successful [`HostRegistrar::register`] of `ptr`.
    ///
    /// # Safety
    /// `ptr` must have been registered by this registrar and still be mapped.
    pub unsafe fn unregister(&self, ptr: *mut u8) {
        if let Some(f) = self.unregister {
            // SAFETY: per this function's contract.
            unsafe { f(ptr.cast()) }
        }
    }
}

/// A NUL-terminated string from ggml (a backend's or device's name), or None for NULL.
fn ggml_string(p: *const c_char) -> Option<String> {
    // SAFETY: ggml's names are NUL-terminated strings that live as long as their backend.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// ggml-cpu's gemv/gemm kernels for repacked weights (ggml-cpu/repack.h): `n` columns,
/// output `s` with row stride `bs`, weights `vx`, activations `vy`, `nr` activation rows,
/// `nc` weight rows (a multiple of the interleave).
pub type RepackKernel = unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, *const c_void, i32, i32);

/// The interleaved layout CPU_REPACK gives one weight tensor, and its kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NumaMoeRepackLayout {
    /// Rows interleaved together: split points must be multiples of it.
    pub nb_cols: i64,
    /// The type activations are quantized to (a ggml_type).
    pub param_type: i32,
    pub gemv: Option<unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, *const c_void, i32, i32)>,
    pub gemm: Option<unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, *const c_void, i32, i32)>,
    /// ggml_quantize_mat_t: `nrow` (4) rows of `n_per_row` floats, interleaved for gemm.
    pub quantize_mat: Option<unsafe extern "C" fn(*const f32, *mut c_void, i64, i64)>,
}

/// A repacked layout as the kernels use it.
#[derive(Clone, Copy, Debug)]
pub struct RepackLayout {
    pub nb_cols: u64,
    pub param_type: GgmlType,
    pub gemv: RepackKernel,
    /// from_float of `param_type`: how the activations are quantized for gemv.
    pub from_float: unsafe extern "C" fn(*const f32, *mut c_void, i64),
    /// The kernel for four activation rows at a time and the quantizer that interleaves
    /// them for it (CPU_REPACK's MUL_MAT of a batch), where the layout has them.
    pub gemm: Option<RepackKernel>,
    pub quantize_mat: Option<unsafe extern "C" fn(*const f32, *mut c_void, i64, i64)>,
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
    /// Rows vec_dot may take at once (2 for ARM's int8 matrix-multiply kernels, else 1).
    pub nrows: i64,
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
        Some(CpuTraits { from_float: t.from_float, vec_dot: t.vec_dot, vec_dot_type: t.vec_dot_type, nrows: t.nrows })
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

    pub fn extra_context_repack(&self) -> *mut c_void {
        self.0.extra_context_repack
    }

    /// Whether ggml-cpu can repack here at all.
    pub fn has_repack(&self) -> bool {
        self.0.repack_layout.is_some() && self.0.repack.is_some() && !self.0.extra_context_repack.is_null()
    }

    /// The layout CPU_REPACK gives `weights` on this CPU (ggml's rule, by type, shape and CPU
    /// features), with kernels numa-moe can call; `None` where it keeps the standard layout.
    pub fn repack_layout(&self, weights: TensorRef) -> Option<RepackLayout> {
        let f = self.0.repack_layout?;
        let mut l = NumaMoeRepackLayout { nb_cols: 0, param_type: 0, gemv: None, gemm: None, quantize_mat: None };
        // SAFETY: weights is a live tensor (or a loader probe); the adapter only reads its header.
        if !unsafe { f(weights.0.as_ptr().cast(), &mut l) } {
            return None;
        }
        let param_type = GgmlType::try_from(l.param_type).ok().filter(|&t| t < raw::GGML_TYPE_COUNT)?;
        (l.nb_cols >= 1).then_some(RepackLayout {
            nb_cols: l.nb_cols as u64,
            param_type,
            gemv: l.gemv?,
            from_float: self.cpu_traits(param_type)?.from_float?,
            gemm: l.gemm,
            quantize_mat: l.quantize_mat,
        })
    }

    /// Writes `data` (standard layout, `rows` whole rows of `like`'s type and row length, a
    /// whole number of interleaved groups) repacked into `dest`, with CPU_REPACK's own
    /// conversion (rows of consecutive experts may share a call: groups never straddle them).
    ///
    /// # Safety
    /// `dest` must be writable for `data.len()` bytes; `data.len()` must be the bytes of
    /// `rows` rows of `like`.
    pub unsafe fn repack(&self, like: TensorRef, dest: *mut u8, rows: i64, data: &[u8]) -> bool {
        let Some(f) = self.0.repack else { return false };
        let mut t = *like.t();
        t.ne[1] = rows;
        t.ne[2] = 1;
        t.ne[3] = 1;
        t.nb[2] = t.nb[1] * rows as usize;
        t.nb[3] = t.nb[2];
        t.data = dest.cast();
        t.extra = std::ptr::null_mut();
        t.view_src = std::ptr::null_mut();
        // SAFETY: t describes exactly the bytes at dest (this function's contract).
        unsafe { f((&mut t as *mut raw::ggml_tensor).cast(), data.as_ptr().cast(), data.len()) == 0 }
    }

    /// What the GPU backends registered with ggml now offer for pinning host memory.
    pub fn host_registrar(&self) -> HostRegistrar {
        let Some(f) = self.0.host_registration else { return HostRegistrar::default() };
        let mut r = NumaMoeHostRegistration {
            register_host: None,
            unregister_host: None,
            backend: std::ptr::null(),
            gpu_without: std::ptr::null(),
        };
        // SAFETY: the adapter only writes the struct it is given.
        unsafe { f(&mut r) };
        HostRegistrar::new(ggml_string(r.backend), ggml_string(r.gpu_without), r.register_host, r.unregister_host)
    }

    /// Creates a ggml buffer object (ggml owns and frees it; `free_buffer` gets `context`,
    /// which ggml only stores).
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
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
        String::from_utf8_lossy(self.name_bytes()).into_owned()
    }

    /// The name's bytes as ggml holds them, up to the first NUL (no copy: for hot paths).
    pub fn name_bytes(&self) -> &[u8] {
        let n = &self.t().name;
        // SAFETY: c_char and u8 have the same size and alignment; the array lives as long as
        // the tensor, which outlives self per the constructor's contract.
        let bytes = unsafe { std::slice::from_raw_parts(n.as_ptr().cast::<u8>(), n.len()) };
        &bytes[..bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len())]
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

    /// The op's `i`-th 32-bit parameter (ggml_get_op_params_i32), 0 past the end.
    pub fn op_param_i32(&self, i: usize) -> i32 {
        self.t().op_params.get(i).copied().unwrap_or(0)
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

    /// Whether the tensor lives in a buffer llama.cpp allocated for model weights.
    pub fn is_weight(&self) -> bool {
        let b = self.t().buffer;
        // SAFETY: a tensor's buffer is a live ggml buffer object.
        !b.is_null() && unsafe { (*b).usage } == raw::GGML_BACKEND_BUFFER_USAGE_WEIGHTS
    }

    /// How many distinct values in 0..n the I32 tensor holds (the experts an ids tensor routes
    /// to); values outside are skipped, as ggml skips them.
    pub fn distinct_ids(&self, n: i64) -> u64 {
        let (ne, nb) = (self.ne(), self.nb());
        if self.ty() != raw::GGML_TYPE_I32 || self.data_ptr().is_null() || n <= 0 || ne.iter().any(|&x| x < 1) {
            return 0;
        }
        let mut seen = vec![false; n as usize];
        let mut count = 0;
        for i1 in 0..ne[1] as usize {
            for i0 in 0..ne[0] as usize {
                // SAFETY: (i0, i1) is inside the tensor's first two dimensions.
                let e = unsafe { *(self.data_ptr().add(i1 * nb[1] + i0 * nb[0]) as *const i32) };
                if e >= 0 && (e as i64) < n && !seen[e as usize] {
                    seen[e as usize] = true;
                    count += 1;
                }
            }
        }
        count
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

/// A copy of a MUL_MAT_ID node's header whose weights are rows `rows` of copy `base`:
/// what ggml's tiled kernel is handed to compute one node's piece of an expert.
struct RowsView {
    src0: raw::ggml_tensor,
    dst: raw::ggml_tensor,
}

impl Api {
    /// Whether ggml-cpu has its tiled MUL_MAT_ID kernel.
    pub fn has_tiled(&self) -> bool {
        self.0.mmid_tiled.is_some()
    }

    /// ggml_tiled_wdata_size for the node (0 where ggml-cpu has no tiled path).
    pub fn tiled_wdata_size(&self, n_tasks: i32, dst: TensorRef) -> usize {
        match self.0.tiled_wdata_size {
            // SAFETY: dst is a live MUL_MAT_ID node; the function only reads its sources.
            Some(f) => unsafe { f(n_tasks, dst.0.as_ptr().cast()) },
            None => 0,
        }
    }

    /// ggml-cpu's tiled kernel for output rows `rows` of `expert`, reading the weights of the
    /// copy at `base` (ggml layout), for the `n` routed rows listed at `mapping`. `params`
    /// carries the thread's rank and group size as ith/nth. Returns false where stock would
    /// not take the tiled path either.
    ///
    /// # Safety
    /// `dst` must be a live MUL_MAT_ID node whose src0 has the layout of `base`; `mapping`
    /// must hold `n` entries; `scratch` must be this thread's tiled slot in the work buffer.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn mmid_tiled_rows(
        &self,
        params: &NumaMoeComputeParams,
        dst: TensorRef,
        base: *const u8,
        rows: Range<i64>,
        expert: usize,
        n: usize,
        mapping: *const RowMapping,
        scratch: *mut u8,
    ) -> bool {
        let Some(f) = self.0.mmid_tiled else { return false };
        let Some(src0) = dst.src(0) else { return false };
        let mut v = RowsView { src0: src0.with_rows(base, &rows), dst: *dst.t() };
        v.dst.ne[0] = rows.end - rows.start;
        v.dst.data = dst.data_ptr().wrapping_add(rows.start as usize * 4).cast();
        v.dst.src[0] = &mut v.src0;
        // SAFETY: per this function's contract; the header copies live until it returns.
        unsafe { f(params, (&mut v.dst as *mut raw::ggml_tensor).cast(), expert as i64, n as i64, mapping.cast(), scratch.cast()) }
    }
}

impl TensorRef {
    /// Rows, matrices and batches packed back to back.
    pub fn is_contiguous_rows(&self) -> bool {
        let ne = self.ne();
        let nb = self.nb();
        nb[1] == nb[0] * ne[0] as usize && nb[2] == nb[1] * ne[1] as usize && nb[3] == nb[2] * ne[2] as usize
    }
}
