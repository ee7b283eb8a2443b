//! The ggml side of the C ABI: the buffer type's callbacks and the entry points the ggml-cpu
//! adapter (ggml-integration/numa-moe-ggml.cpp) forwards to.
//!
//! Callbacks receive ggml pointers and turn them into [`TensorRef`] views at once; the logic
//! lives in [`crate::buffer`] and [`crate::compute`]. ggml callbacks have no error channel,
//! so failures are logged through ggml's log and reported by ggml's own status codes.

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;

use super::api::{rt, NumaMoePageReport};
use super::{arg_out, boundary, boundary_value, Fail, NumaMoeResult};
use crate::buffer::{plan_for, NumaBuffer, PlacedTensor, TensorInfo};
use crate::compute::mm::MmOp;
use crate::compute::mmid::MmidOp;
use crate::config::Runtime;
use crate::ggml::{self, raw, Api, NumaMoeComputeParams, NumaMoeGgmlApi, TensorRef};
use crate::placement::Compute;

const BUFT_NAME: &[u8] = b"NUMA_MOE\0";
const BUFT_NAME_REPACK: &[u8] = b"NUMA_MOE_REPACK\0";

/// Our buffer type objects: ggml keeps pointers to them for the life of the process. The
/// standard one holds ggml's standard layout and is a host buffer (a GPU backend may copy
/// from it); the repacked one holds CPU_REPACK's layouts and, like CPU_REPACK's, is not.
struct Bufts {
    standard: *mut raw::ggml_backend_buffer_type,
    repacked: *mut raw::ggml_backend_buffer_type,
}
// SAFETY: the objects are created once, never mutated, and ggml reads them from any thread.
unsafe impl Send for Bufts {}
// SAFETY: as above.
unsafe impl Sync for Bufts {}

static BUFTS: OnceLock<Bufts> = OnceLock::new();

fn our_buft() -> *mut raw::ggml_backend_buffer_type {
    BUFTS.get().map_or(std::ptr::null_mut(), |b| b.standard)
}

fn repack_buft() -> *mut raw::ggml_backend_buffer_type {
    BUFTS.get().map_or(std::ptr::null_mut(), |b| b.repacked)
}

/// Whether `buft` is one of ours.
fn is_ours(buft: *mut raw::ggml_backend_buffer_type) -> bool {
    !buft.is_null() && (buft == our_buft() || buft == repack_buft())
}

fn new_buft(api: &Api, context: *mut c_void, repacked: bool) -> *mut raw::ggml_backend_buffer_type {
    Box::into_raw(Box::new(raw::ggml_backend_buffer_type {
        iface: raw::ggml_backend_buffer_type_i {
            get_name: Some(if repacked { buft_get_name_repack } else { buft_get_name }),
            alloc_buffer: Some(buft_alloc_buffer),
            get_alignment: Some(buft_get_alignment),
            get_max_size: None,
            get_alloc_size: None,
            is_host: if repacked { None } else { Some(buft_is_host) },
        },
        device: api.cpu_device().cast(),
        context,
    }))
}

/// Attaches numa-moe to ggml: stores ggml's function table and returns our buffer type
/// (a ggml_backend_buffer_type_t) for ggml-cpu to list first among its extra buffer types.
/// Returns NULL, after logging why, when the table does not match this library.
///
/// # Safety
/// `api` must be NULL or point to a table whose pointers stay valid for the process.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_ggml_attach(api: *const NumaMoeGgmlApi) -> *mut c_void {
    boundary_value("numa_moe_ggml_attach", std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        let Some(table) = (unsafe { api.as_ref() }) else { return std::ptr::null_mut() };
        let api = match ggml::attach(table) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("numa-moe: not attached: {e}");
                return std::ptr::null_mut();
            }
        };
        let bufts = BUFTS.get_or_init(|| {
            // the routing report and NUMA_MOE_ROUTING_OUT at exit (once per process)
            // SAFETY: at_exit is a plain extern "C" function that never unwinds.
            unsafe { libc::atexit(super::routing::at_exit) };
            let repacked = if api.has_repack() { new_buft(api, api.extra_context_repack(), true) } else { std::ptr::null_mut() };
            Bufts { standard: new_buft(api, api.extra_context(), false), repacked }
        });
        announce(api);
        bufts.standard.cast()
    })
}

/// numa-moe's buffer type for CPU_REPACK's layouts (made by numa_moe_ggml_attach), or NULL
/// where ggml-cpu has no repack or before attach.
#[no_mangle]
pub extern "C" fn numa_moe_ggml_repack_buffer_type() -> *mut c_void {
    repack_buft().cast()
}

/// Says once, at attach, what numa-moe will do on this machine.
fn announce(_api: &Api) {
    match crate::config::runtime() {
        Ok(rt) => {
            let s = rt.settings();
            let nodes = rt.topology.compute_nodes().len();
            if let Some(e) = rt.pending_error() {
                crate::log::error(&format!("numa-moe: configuration error, model loads will stop: {e}"));
                return;
            }
            let what = if rt.placement_active() {
                format!("expert map \"{}\" ({})", s.map.render(), s.map_origin)
            } else if nodes <= 1 {
                "one NUMA node: experts stay on llama.cpp's own path (give --numa-expert-map to place them anyway)".into()
            } else {
                "expert map \"off\": experts stay on llama.cpp's own path".into()
            };
            crate::log::info(&format!(
                "numa-moe {}: {} NUMA node(s), {} with memory and CPUs; {what}",
                env!("CARGO_PKG_VERSION"),
                rt.topology.nodes().len(),
                nodes
            ));
        }
        Err(e) => crate::log::error(&format!("numa-moe: cannot read the machine's topology, placement disabled: {e}")),
    }
}

/// numa-moe's ggml buffer type, or NULL before ggml-cpu attached it (or without the adapter).
#[no_mangle]
pub extern "C" fn numa_moe_buffer_type() -> *mut c_void {
    our_buft().cast()
}

unsafe extern "C" fn buft_get_name(_: *mut raw::ggml_backend_buffer_type) -> *const c_char {
    BUFT_NAME.as_ptr().cast()
}

unsafe extern "C" fn buft_get_name_repack(_: *mut raw::ggml_backend_buffer_type) -> *const c_char {
    BUFT_NAME_REPACK.as_ptr().cast()
}

unsafe extern "C" fn buft_get_alignment(_: *mut raw::ggml_backend_buffer_type) -> usize {
    // Page alignment: every tensor starts on its own page, so binding one tensor never
    // moves a page another tensor shares.
    crate::sys::page_size()
}

unsafe extern "C" fn buft_is_host(_: *mut raw::ggml_backend_buffer_type) -> bool {
    true
}

unsafe extern "C" fn buft_alloc_buffer(buft: *mut raw::ggml_backend_buffer_type, size: usize) -> *mut raw::ggml_backend_buffer {
    boundary_value("alloc_buffer", std::ptr::null_mut(), || {
        let (Some(api), Ok(rt)) = (ggml::api(), crate::config::runtime()) else { return std::ptr::null_mut() };
        if rt.take_pending_error().is_some() {
            crate::log::error("numa-moe: stopping the load because of the expert map error above");
            return std::ptr::null_mut();
        }
        // what GPU backends offer for pinning host memory (all are registered by the time
        // weights load); NumaBuffer uses it for the standard layout's buffers only
        let buf = match NumaBuffer::new(rt, size, buft == repack_buft(), Some(api.host_registrar())) {
            Ok(b) => b,
            Err(e) => {
                crate::log::error(&format!("numa-moe: {e}"));
                return std::ptr::null_mut();
            }
        };
        let iface = raw::ggml_backend_buffer_i {
            free_buffer: Some(buf_free),
            get_base: Some(buf_get_base),
            init_tensor: Some(buf_init_tensor),
            memset_tensor: Some(buf_memset_tensor),
            set_tensor: Some(buf_set_tensor),
            get_tensor: Some(buf_get_tensor),
            set_tensor_2d: None,
            get_tensor_2d: None,
            cpy_tensor: Some(buf_cpy_tensor),
            clear: Some(buf_clear),
            reset: None,
        };
        let ctx = Box::into_raw(Box::new(buf));
        let b = api.buffer_init(buft, &iface, ctx.cast(), size);
        if b.is_null() {
            // SAFETY: ctx came from Box::into_raw above and ggml did not take it.
            drop(unsafe { Box::from_raw(ctx) });
        }
        b
    })
}

/// Our buffer behind a ggml buffer of our type.
///
/// # Safety
/// `b` must be a live buffer created by buft_alloc_buffer.
unsafe fn numa_buffer<'a>(b: *mut raw::ggml_backend_buffer) -> &'a NumaBuffer {
    // SAFETY: per the contract, context is the Box<NumaBuffer> made in buft_alloc_buffer.
    unsafe { &*((*b).context as *const NumaBuffer) }
}

/// The numa-moe buffer holding `t`, if `t` lives in one.
fn buffer_of<'a>(t: TensorRef) -> Option<&'a NumaBuffer> {
    if t.buffer().is_null() || !is_ours(t.buffer_type()) || t.buffer_context().is_null() {
        return None;
    }
    // SAFETY: a tensor in a buffer of our type lives in a live NumaBuffer (ggml frees tensors'
    // buffers only after the graphs using them).
    Some(unsafe { numa_buffer(t.buffer()) })
}

fn offset_in(buf: &NumaBuffer, t: TensorRef) -> usize {
    t.data_addr() - buf.base() as usize
}

unsafe extern "C" fn buf_free(b: *mut raw::ggml_backend_buffer) {
    boundary_value("free_buffer", (), || {
        // SAFETY: ggml calls free_buffer once; context is our Box.
        let nb = unsafe { Box::from_raw((*b).context as *mut NumaBuffer) };
        if let Some((p, r)) = nb.pinning().and_then(|p| p.registrar().map(|r| (p, r))) {
            for offset in p.take_registered() {
                // SAFETY: registered by buf_init_tensor at this offset of the region, which is
                // unmapped only when nb is dropped below.
                unsafe { r.unregister(nb.base().wrapping_add(offset)) };
            }
        }
        if let Ok(rt) = crate::config::runtime() {
            nb.release(rt);
        }
        drop(nb);
    })
}

unsafe extern "C" fn buf_get_base(b: *mut raw::ggml_backend_buffer) -> *mut c_void {
    // SAFETY: ggml passes one of our live buffers.
    unsafe { numa_buffer(b) }.base().cast()
}

/// ggml's view of `t` for the planner; `repacked`: as it will be stored in our repacked
/// buffer type (split points on CPU_REPACK's row groups).
fn tensor_info(api: &Api, t: TensorRef, repacked: bool) -> TensorInfo {
    let row_group = if repacked { api.repack_layout(t).map_or(1, |l| l.nb_cols) } else { 1 };
    TensorInfo {
        name: t.name(),
        type_name: api.type_name(t.ty()),
        ne: t.ne(),
        nb: t.nb(),
        packed: t.is_expert_stack_layout(api),
        row_group,
    }
}

unsafe extern "C" fn buf_init_tensor(b: *mut raw::ggml_backend_buffer, tensor: *mut raw::ggml_tensor) -> raw::ggml_status {
    boundary_value("init_tensor", raw::GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes a live tensor allocated in buffer b.
        let Some(t) = (unsafe { TensorRef::new(tensor) }) else { return raw::GGML_STATUS_FAILED };
        if t.view_src().is_some() {
            return raw::GGML_STATUS_SUCCESS;
        }
        let (Some(api), Ok(rt)) = (ggml::api(), crate::config::runtime()) else { return raw::GGML_STATUS_SUCCESS };
        // SAFETY: b is one of our live buffers.
        let buf = unsafe { numa_buffer(b) };
        let offset = offset_in(buf, t);
        match buf.init_tensor(rt, &tensor_info(api, t, buf.repacked()), offset) {
            Ok(()) => {
                pin(buf, offset);
                raw::GGML_STATUS_SUCCESS
            }
            Err(e) => {
                crate::log::error(&format!("numa-moe: {e}"));
                super::set_last_error(e.message);
                raw::GGML_STATUS_FAILED
            }
        }
    })
}

/// Registers the tensor just placed at `offset` with the GPU backend that pins host memory,
/// if there is one: after its extents are bound, so the pages registration faults in land on
/// their planned nodes (buffer/pinning.rs).
fn pin(buf: &NumaBuffer, offset: usize) {
    let (Some(p), Some(placed)) = (buf.pinning(), buf.placed_at(offset)) else { return };
    let Some(r) = p.registrar() else { return };
    if p.is_registered(offset) {
        return;
    }
    let bytes = placed.bytes();
    // SAFETY: the tensor's bytes lie inside the buffer's region (init_tensor checked), which
    // stays mapped until buf_free has unregistered them.
    let ok = unsafe { r.register(buf.base().wrapping_add(offset), bytes) };
    p.record(offset, bytes, ok);
}

unsafe extern "C" fn buf_memset_tensor(
    b: *mut raw::ggml_backend_buffer,
    tensor: *mut raw::ggml_tensor,
    value: u8,
    offset: usize,
    size: usize,
) {
    boundary_value("memset_tensor", (), || {
        // SAFETY: ggml passes a live tensor in our live buffer.
        let (buf, Some(t)) = (unsafe { numa_buffer(b) }, unsafe { TensorRef::new(tensor) }) else { return };
        buf.fill(offset_in(buf, t) + offset, size, value);
    })
}

unsafe extern "C" fn buf_set_tensor(
    b: *mut raw::ggml_backend_buffer,
    tensor: *mut raw::ggml_tensor,
    data: *const c_void,
    offset: usize,
    size: usize,
) {
    boundary_value("set_tensor", (), || {
        // SAFETY: ggml passes a live tensor in our live buffer.
        let (buf, Some(t)) = (unsafe { numa_buffer(b) }, unsafe { TensorRef::new(tensor) }) else { return };
        let (Ok(rt), false) = (crate::config::runtime(), data.is_null() && size > 0) else { return };
        // SAFETY: ggml passes `size` readable bytes at `data`, outside our buffer (its source
        // is host memory of another tensor, the model file or the loader's staging buffer).
        let src = unsafe { bytes(data.cast(), size) };
        write(rt, buf, t, offset, src);
    })
}

/// Writes `src` at `offset` of tensor `t`: as it is, or, in the repacked buffer type,
/// converted with CPU_REPACK's own routine into the layout its kernels read.
fn write(rt: &Runtime, buf: &NumaBuffer, t: TensorRef, offset: usize, src: &[u8]) {
    let at = offset_in(buf, t) + offset;
    let layout = if buf.repacked() { ggml::api().and_then(|api| api.repack_layout(t).map(|l| (api, l))) } else { None };
    let Some((api, layout)) = layout else {
        buf.write(rt, at, src);
        return;
    };
    let row_bytes = t.nb()[1];
    let group = row_bytes * layout.nb_cols as usize;
    let base = buf.base();
    let converted = buf.write_repacked(rt, at, src, group, |to, chunk| {
        // SAFETY: write_repacked hands whole row groups of the tensor inside our region;
        // `to` is their offset in the region, which holds chunk.len() bytes there.
        unsafe { api.repack(t, base.wrapping_add(to), (chunk.len() / row_bytes) as i64, chunk) }
    });
    if !converted {
        let msg = format!(
            "numa-moe: cannot write {} bytes at byte {offset} of {} in CPU_REPACK's layout (writes must cover whole {}-row groups); the tensor is left incomplete",
            src.len(),
            t.name(),
            layout.nb_cols
        );
        crate::log::error(&msg);
        super::set_last_error(msg);
    }
}

unsafe extern "C" fn buf_get_tensor(
    b: *mut raw::ggml_backend_buffer,
    tensor: *const raw::ggml_tensor,
    data: *mut c_void,
    offset: usize,
    size: usize,
) {
    boundary_value("get_tensor", (), || {
        // SAFETY: ggml passes a live tensor in our live buffer.
        let (buf, Some(t)) = (unsafe { numa_buffer(b) }, unsafe { TensorRef::new(tensor) }) else { return };
        if data.is_null() || size == 0 {
            return;
        }
        // SAFETY: ggml passes `size` writable bytes at `data`, outside our buffer.
        let out = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), size) };
        buf.read(offset_in(buf, t) + offset, out);
    })
}

/// `len` bytes at `p` as a slice (empty for a NULL or empty source).
///
/// # Safety
/// `p` must be readable for `len` bytes while the slice is used.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if p.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
}

unsafe extern "C" fn buf_cpy_tensor(b: *mut raw::ggml_backend_buffer, src: *const raw::ggml_tensor, dst: *mut raw::ggml_tensor) -> bool {
    boundary_value("cpy_tensor", false, || {
        let (Some(api), Ok(rt)) = (ggml::api(), crate::config::runtime()) else { return false };
        // SAFETY: ggml passes live tensors; dst is in our live buffer.
        let (buf, Some(s), Some(d)) = (unsafe { numa_buffer(b) }, unsafe { TensorRef::new(src) }, unsafe { TensorRef::new(dst) }) else {
            return false;
        };
        if !is_host_buffer(s) {
            return false;
        }
        // SAFETY: a host tensor's data is readable for its nbytes and is not in our region
        // (ggml copies between distinct tensors).
        let data = unsafe { bytes(s.data_ptr(), s.nbytes(api)) };
        write(rt, buf, d, 0, data);
        true
    })
}

fn is_host_buffer(t: TensorRef) -> bool {
    let buft = t.buffer_type();
    if buft.is_null() {
        return false;
    }
    // SAFETY: a live buffer's type is a live ggml_backend_buffer_type.
    unsafe { (*buft).iface.is_host.is_some_and(|f| f(buft)) }
}

unsafe extern "C" fn buf_clear(b: *mut raw::ggml_backend_buffer, value: u8) {
    boundary_value("clear", (), || {
        // SAFETY: ggml passes one of our live buffers.
        let buf = unsafe { numa_buffer(b) };
        buf.fill(0, buf.size(), value);
    })
}

/// The planned tensor of an op's weights, with its buffer, if they are numa-moe's.
fn placed_weights(op: TensorRef) -> Option<(&'static NumaBuffer, std::sync::Arc<PlacedTensor>)> {
    placed(op.src(0)?)
}

/// The buffer and plan of `t`, if it is a placed expert tensor.
fn placed(t: TensorRef) -> Option<(&'static NumaBuffer, std::sync::Arc<PlacedTensor>)> {
    let buf: &'static NumaBuffer = buffer_of(t)?;
    Some((buf, buf.placed_at(offset_in(buf, t))?))
}

/// An op numa-moe computes itself, with its kernels resolved.
enum Hooked {
    Mmid(MmidOp),
    Mm(MmOp),
}

impl Hooked {
    /// The work buffer bytes the op needs with `n` threads.
    fn work_size(&self, n: usize) -> usize {
        match self {
            Hooked::Mmid(op) => crate::compute::work_size(op, n),
            Hooked::Mm(op) => op.layout(n).total,
        }
    }

    /// Step 0 (see the compute module): compute the op here, or decline on every thread.
    fn decide(&self, placed: &PlacedTensor, params: &NumaMoeComputeParams) -> Option<crate::compute::work::Work> {
        match self {
            Hooked::Mmid(op) => crate::compute::decide(op, placed, params),
            Hooked::Mm(op) => crate::compute::decide_mm(op, placed, params),
        }
    }

    /// Steps 1 and 2 on this thread: finishes the op or aborts, never unwinds.
    fn run(&self, rt: &Runtime, api: &Api, buf: &NumaBuffer, placed: &PlacedTensor, work: &crate::compute::work::Work) {
        match self {
            Hooked::Mmid(op) => crate::compute::run(rt, api, op, buf, placed, work),
            Hooked::Mm(op) => crate::compute::run_mm(rt, api, op, buf, placed, work),
        }
    }
}

/// The parts of a MUL_MAT_ID or MUL_MAT numa-moe computes itself: its weights' buffer and
/// plan, and the op with its kernels resolved. `None`: ggml-cpu's stock kernel computes it.
fn hooked_op(api: &'static Api, op: TensorRef) -> Option<(&'static NumaBuffer, std::sync::Arc<PlacedTensor>, Hooked)> {
    let (buf, placed) = placed_weights(op)?;
    if placed.plan.compute == Compute::Stock {
        return None;
    }
    let layout = if buf.repacked() { Some(api.repack_layout(op.src(0)?)?) } else { None };
    let hooked = match op.op() {
        raw::GGML_OP_MUL_MAT_ID if !placed.is_dense() => Hooked::Mmid(MmidOp::new(api, op, layout)?),
        raw::GGML_OP_MUL_MAT if placed.is_dense() => Hooked::Mm(MmOp::new(api, op, layout)?),
        _ => return None,
    };
    Some((buf, placed, hooked))
}

/// Whether ggml-cpu can run `op` with a source in our buffer, and, while llama.cpp's loader
/// probes where to put an expert tensor (no data yet), whether we take that tensor.
///
/// # Safety
/// `op` must point to a live ggml tensor (graph node or loader probe).
#[no_mangle]
pub unsafe extern "C" fn numa_moe_ggml_supports_op(op: *const c_void) -> bool {
    boundary_value("numa_moe_ggml_supports_op", false, || {
        // SAFETY: forwarded from this function's contract.
        let Some(op) = (unsafe { TensorRef::new(op.cast()) }) else { return false };
        let (Some(api), Ok(rt)) = (ggml::api(), crate::config::runtime()) else { return false };
        supports_op(api, rt, op)
    })
}

fn supports_op(api: &'static Api, rt: &Runtime, op: TensorRef) -> bool {
    let Some(src0) = op.src(0) else { return false };
    // llama.cpp's loader asks whether a weight may live in our buffer by building a dummy
    // op over it in an empty buffer of our type: no data yet, and no name (every node of a
    // graph has one: ggml names the unnamed "node_N"; graphs reserved over a model loaded
    // without allocation, as llama.cpp's memory fitting does, also have weights without data).
    let probing = op.name_bytes().is_empty() && (0..4).filter_map(|i| op.src(i)).any(|s| is_ours(s.buffer_type()) && s.data_addr() == 0);
    let in_repack = |t: TensorRef| !t.buffer_type().is_null() && t.buffer_type() == repack_buft();
    let repacked = in_repack(src0);
    if !probing {
        // A graph node reading weights already in our buffer: ggml-cpu computes it (our hook,
        // or the stock kernel of the weights' layout). Repacked weights support what
        // CPU_REPACK's do for a stack: MUL_MAT_ID on F32 host activations.
        if (0..4).filter_map(|i| op.src(i)).any(in_repack) {
            let Some(src1) = op.src(1) else { return false };
            return repacked
                && (op.op() == raw::GGML_OP_MUL_MAT_ID || op.op() == raw::GGML_OP_MUL_MAT)
                && src1.ty() == raw::GGML_TYPE_F32
                && (src1.buffer().is_null() || is_host_buffer(src1));
        }
        if op.op() == raw::GGML_OP_MUL_MAT {
            let (Some(src1), Some(t)) = (op.src(1), api.cpu_traits(src0.ty())) else { return false };
            return src1.ty() == raw::GGML_TYPE_F32 || src1.ty() == t.vec_dot_type;
        }
        return true;
    }
    if !is_ours(src0.buffer_type()) {
        return false;
    }
    // The loader's probe: take the tensor if the map places it (expert stacks for MUL_MAT_ID,
    // weight matrices for MUL_MAT); in the repacked type, only the tensors CPU_REPACK would
    // take (so the layout, and the results, are stock's).
    let info = tensor_info(api, src0, repacked);
    let shape_ok = match op.op() {
        raw::GGML_OP_MUL_MAT_ID => info.expert_tensor().is_some(),
        raw::GGML_OP_MUL_MAT => info.matrix().is_some(),
        _ => false,
    };
    if !shape_ok {
        return false;
    }
    if repacked && (api.repack_layout(src0).is_none() || !api.stock_repacks(op)) {
        return false;
    }
    if rt.pending_error().is_some() {
        return true; // take it so the allocation fails with the message
    }
    if api.cpu_traits(src0.ty()).and_then(|c| c.vec_dot).is_none() {
        return false;
    }
    match plan_for(rt, &info) {
        Ok(None) => false,
        Ok(Some(_)) => true,
        Err(e) => {
            crate::log::error(&format!("numa-moe: {e}"));
            rt.set_pending_error(e);
            true
        }
    }
}

/// The work buffer the op needs when numa-moe computes it; false: ggml sizes it.
///
/// # Safety
/// `op` must be a live MUL_MAT_ID node; `size` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_ggml_work_size(n_threads: i32, op: *const c_void, size: *mut usize) -> bool {
    boundary_value("numa_moe_ggml_work_size", false, || {
        // SAFETY: forwarded from this function's contract.
        let (Some(op), Some(size)) = (unsafe { TensorRef::new(op.cast()) }, unsafe { size.as_mut() }) else { return false };
        let Some((_, _, hooked)) = ggml::api().and_then(|api| hooked_op(api, op)) else { return false };
        *size = hooked.work_size(n_threads.max(1) as usize);
        true
    })
}

/// Computes a MUL_MAT_ID whose weights numa-moe placed, on this ggml worker thread. Returns
/// false on every thread alike when it declines (decided before any thread touches shared
/// state); ggml-cpu then runs its stock kernel. Once it has decided to compute, it returns
/// true or aborts the process with the reason (see the compute module).
///
/// # Safety
/// `params` and `op` must be what ggml-cpu passes to an extra buffer type's compute_forward.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_ggml_compute_forward(params: *const NumaMoeComputeParams, op: *mut c_void) -> bool {
    let decided = boundary_value("numa_moe_ggml_compute_forward", None, || {
        // SAFETY: forwarded from this function's contract.
        let (Some(params), Some(op)) = (unsafe { params.as_ref() }, unsafe { TensorRef::new(op.cast()) }) else { return None };
        let (Some(api), Ok(rt)) = (ggml::api(), crate::config::runtime()) else { return None };
        let (buf, placed, hooked) = hooked_op(api, op)?;
        let work = hooked.decide(&placed, params)?;
        Some((api, rt, buf, placed, hooked, work))
    });
    let Some((api, rt, buf, placed, hooked, work)) = decided else { return false };
    // Past the decision point: run finishes the op or aborts, it never unwinds.
    hooked.run(rt, api, buf, &placed, &work);
    true
}

/// Counts the weight bytes an op ggml-cpu computes itself reads (called by the adapter on
/// thread 0 of every MUL_MAT, MUL_MAT_ID and GET_ROWS numa-moe does not compute): the
/// locality counters' "left to llama.cpp" share, and decoded tokens (one-row embedding
/// lookups). Ops whose first source is not a model weight are ignored.
///
/// # Safety
/// `op` must be a live graph node.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_ggml_count_stock(op: *const c_void) {
    boundary_value("numa_moe_ggml_count_stock", (), || {
        use crate::compute::locality;
        if !locality::enabled() {
            return;
        }
        // SAFETY: forwarded from this function's contract.
        let Some(op) = (unsafe { TensorRef::new(op.cast()) }) else { return };
        let (Some(api), Some(src0), Some(src1)) = (ggml::api(), op.src(0), op.src(1)) else { return };
        if !src0.is_weight() {
            return;
        }
        let category = crate::weights::category_of(std::str::from_utf8(src0.name_bytes()).unwrap_or_default());
        match op.op() {
            raw::GGML_OP_GET_ROWS => {
                let n = src1.nelements().max(0) as u64;
                locality::record_stock(category, n * src0.nb()[1] as u64, n == 1);
                if category == crate::weights::Category::Embeddings {
                    locality::record_tokens(n);
                }
            }
            raw::GGML_OP_MUL_MAT => {
                locality::record_stock(category, src0.nbytes(api) as u64, src1.ne()[1] == 1);
            }
            raw::GGML_OP_MUL_MAT_ID => {
                let Some(ids) = op.src(2) else { return };
                let experts = ids.distinct_ids(src0.ne()[2]);
                locality::record_stock(category, experts * src0.nb()[2] as u64, ids.ne()[1] == 1);
            }
            _ => {}
        }
    })
}

/// The numa-moe buffer and plan of a placed expert tensor.
fn placed_tensor(t: TensorRef) -> Result<(&'static NumaBuffer, std::sync::Arc<PlacedTensor>), Fail> {
    placed(t).ok_or_else(|| {
        let why = if buffer_of(t).is_none() { "is not in a numa-moe buffer" } else { "is not a placed expert tensor" };
        Fail::new(NumaMoeResult::NotPlaced, format!("{} {why}", t.name()))
    })
}

/// Where the pages of a placed expert tensor are, against its plan (all copies), and how
/// many bytes of its copies differ from the primary.
///
/// # Safety
/// `tensor` must be a live ggml tensor; `out` valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_tensor_verify(tensor: *const c_void, out: *mut NumaMoePageReport) -> NumaMoeResult {
    boundary("numa_moe_tensor_verify", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        // SAFETY: forwarded from this function's contract.
        let t = unsafe { TensorRef::new(tensor.cast()) }.ok_or_else(|| Fail::new(NumaMoeResult::NullArgument, "tensor is NULL"))?;
        let _ = rt()?;
        let (buf, p) = placed_tensor(t)?;
        let r = buf.verify_tensor(&p).map_err(|e| Fail::new(NumaMoeResult::SystemError, format!("cannot read page locations: {e}")))?;
        *out = (&r).into();
        out.stale_replica_bytes = buf.stale_replica_bytes(&p);
        Ok(())
    })
}

/// Copies a placed tensor's primary bytes into its other copies (mirror, `a+b`) again: for
/// callers that wrote straight into the tensor's data after its first compute. Must not
/// run while a graph reads the tensor.
///
/// # Safety
/// `tensor` must be a live ggml tensor.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_tensor_refresh(tensor: *const c_void) -> NumaMoeResult {
    boundary("numa_moe_tensor_refresh", || {
        // SAFETY: forwarded from this function's contract.
        let t = unsafe { TensorRef::new(tensor.cast()) }.ok_or_else(|| Fail::new(NumaMoeResult::NullArgument, "tensor is NULL"))?;
        let _ = rt()?;
        let (buf, p) = placed_tensor(t)?;
        buf.refresh_replicas(&p);
        Ok(())
    })
}
