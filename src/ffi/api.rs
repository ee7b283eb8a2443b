//! Exported functions that need no ggml: version, errors, the map, the topology, and where
//! pages of memory are.

use std::ffi::c_char;

use super::{arg_out, arg_str, boundary, copy_out, Fail, NumaMoeResult};
use crate::config::{runtime, OnError};
use crate::expert_map::{ExpertMap, MAX_EXPERTS};

/// Most nodes a NumaMoePageReport or NumaMoeNodeInfo can describe.
pub const NUMA_MOE_MAX_NODES: usize = 64;

/// One NUMA node as numa-moe sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NumaMoeNodeInfo {
    /// OS node number (as numactl and mbind name it).
    pub id: u32,
    /// CPUs of the node this process may use.
    pub n_cpus: u32,
    /// Physical cores among them.
    pub n_cores: u32,
    /// False for a memory-less node.
    pub has_memory: bool,
    /// False when cpusets or numactl forbid allocating here.
    pub mem_allowed: bool,
    /// Memory on the node, bytes.
    pub total_bytes: u64,
    /// Free or reclaimable memory, bytes; 0 when unknown (synthetic topologies).
    pub free_bytes: u64,
}

/// Where some memory's pages are.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NumaMoePageReport {
    /// Resident pages on each node (index = node number).
    pub per_node: [u64; NUMA_MOE_MAX_NODES],
    /// Resident pages in all.
    pub resident: u64,
    /// Pages not allocated yet (never written).
    pub absent: u64,
    /// Resident pages on another node than the plan says.
    pub misplaced: u64,
    /// Bytes in which a copy of the tensor (mirror, `a+b`) differs from the primary: bytes
    /// written straight into tensor data after the first compute. numa_moe_tensor_refresh
    /// copies the primary over them. Always 0 for numa_moe_memory_pages_per_node.
    pub stale_replica_bytes: u64,
}

impl Default for NumaMoePageReport {
    fn default() -> Self {
        NumaMoePageReport { per_node: [0; NUMA_MOE_MAX_NODES], resident: 0, absent: 0, misplaced: 0, stale_replica_bytes: 0 }
    }
}

impl From<&crate::memory::PageReport> for NumaMoePageReport {
    fn from(r: &crate::memory::PageReport) -> Self {
        let mut out = NumaMoePageReport { resident: r.resident(), absent: r.absent, misplaced: r.misplaced, ..Default::default() };
        for (&n, &c) in &r.per_node {
            if (n as usize) < NUMA_MOE_MAX_NODES {
                out.per_node[n as usize] = c;
            }
        }
        out
    }
}

/// Counters of what numa-moe did in this process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NumaMoeStats {
    /// MUL_MAT_ID ops computed by numa-moe's node-local hook.
    pub ops_computed: u64,
    /// MUL_MAT_ID ops over placed weights left to ggml-cpu's stock kernel.
    pub ops_declined: u64,
    /// Expert tensors placed by live buffers.
    pub tensors_placed: u64,
    /// Their bytes, over all copies.
    pub bytes_placed: u64,
    /// Times a pinned worker thread was checked against its planned node during an op.
    pub workers_checked: u64,
    /// Times one was found running on another node (0 unless something overrides affinity).
    pub workers_off_node: u64,
    /// MUL_MAT ops over placed weight matrices computed by numa-moe's node-local hook.
    pub mm_ops_computed: u64,
}

/// Reads the counters into `*out`.
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_stats_get(out: *mut NumaMoeStats) -> NumaMoeResult {
    use std::sync::atomic::Ordering::Relaxed;
    boundary("numa_moe_stats_get", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        *out = NumaMoeStats {
            ops_computed: crate::compute::OPS_COMPUTED.load(Relaxed),
            ops_declined: crate::compute::OPS_DECLINED.load(Relaxed),
            tensors_placed: crate::buffer::PLACED_TENSORS.load(Relaxed),
            bytes_placed: crate::buffer::PLACED_BYTES.load(Relaxed),
            workers_checked: crate::compute::WORKERS_CHECKED.load(Relaxed),
            workers_off_node: crate::compute::WORKERS_OFF_NODE.load(Relaxed),
            mm_ops_computed: crate::compute::MM_OPS_COMPUTED.load(Relaxed),
        };
        Ok(())
    })
}

pub(crate) fn rt() -> Result<&'static crate::config::Runtime, Fail> {
    runtime().map_err(Fail::from)
}

/// The library version ("0.1.0"). A static string: do not free it.
#[no_mangle]
pub extern "C" fn numa_moe_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Copies the message behind the last failed call on this thread into `buf` (at most
/// `len` bytes including the NUL; `buf` may be NULL to ask the length) and returns the
/// message's full length. An empty message means no call has failed on this thread.
///
/// # Safety
/// `buf` must be NULL or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_last_error(buf: *mut c_char, len: usize) -> usize {
    super::boundary_value("numa_moe_last_error", 0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_out(&super::last_error(), buf, len) }
    })
}

/// Checks a `--numa-expert-map` value: its syntax, and that every node it names exists on
/// this machine, has memory and is allowed. With `n_expert` > 0 it also checks the experts
/// against a tensor of that many experts (beyond the model, mapped twice, not mapped);
/// `n_expert` above 1024 (llama.cpp's LLAMA_MAX_EXPERTS) is NUMA_MOE_RESULT_INVALID_ARGUMENT.
///
/// # Safety
/// `map` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_map_check(map: *const c_char, n_expert: u32) -> NumaMoeResult {
    boundary("numa_moe_map_check", || {
        // SAFETY: forwarded from this function's contract.
        let text = unsafe { arg_str(map, "map") }?;
        if n_expert > MAX_EXPERTS {
            return Err(Fail::new(
                NumaMoeResult::InvalidArgument,
                format!("n_expert {n_expert} is out of range: llama.cpp supports 1-{MAX_EXPERTS} experts (LLAMA_MAX_EXPERTS)"),
            ));
        }
        // as setting the map would: against the machine, with `balanced` profiles read
        let (m, _) = crate::config::parse_map(&rt()?.topology, text).map_err(|e| Fail::new(NumaMoeResult::InvalidMap, e.to_string()))?;
        if n_expert > 0 {
            m.check_experts(n_expert).map_err(|e| Fail::new(NumaMoeResult::InvalidMap, e.to_string()))?;
        }
        Ok(())
    })
}

/// Writes the canonical form of `map` into `buf` (see numa_moe_last_error for the buffer
/// convention) and its full length into `*out_len`.
///
/// # Safety
/// `map` must be a NUL-terminated string, `buf` NULL or writable for `len` bytes, and
/// `out_len` valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_map_render(map: *const c_char, buf: *mut c_char, len: usize, out_len: *mut usize) -> NumaMoeResult {
    boundary("numa_moe_map_render", || {
        // SAFETY: forwarded from this function's contract.
        let (text, out) = unsafe { (arg_str(map, "map")?, arg_out(out_len, "out_len")?) };
        let m = ExpertMap::parse(text).map_err(|e| Fail::new(NumaMoeResult::InvalidMap, e.to_string()))?;
        let s = m.render();
        // SAFETY: forwarded from this function's contract.
        *out = unsafe { copy_out(&s, buf, len) };
        if buf.is_null() || len <= s.len() {
            return Err(Fail::new(NumaMoeResult::BufferTooSmall, format!("the rendered map needs {} bytes", s.len() + 1)));
        }
        Ok(())
    })
}

/// Sets the expert map every numa-moe buffer allocated from now on uses (what llama.cpp's
/// `--numa-expert-map` calls). The map is checked against this machine first; on error
/// nothing changes and the message names the problem.
///
/// # Safety
/// `map` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_config_set_map(map: *const c_char) -> NumaMoeResult {
    boundary("numa_moe_config_set_map", || {
        // SAFETY: forwarded from this function's contract.
        let text = unsafe { arg_str(map, "map") }?;
        rt()?.set_map(text, "--numa-expert-map").map_err(|e| Fail::new(NumaMoeResult::InvalidMap, e.to_string()))
    })
}

/// `strict` true: a tensor whose memory cannot be bound as planned stops the load with a
/// message; false (the default): warn once and continue with default placement.
#[no_mangle]
pub extern "C" fn numa_moe_config_set_strict(strict: bool) -> NumaMoeResult {
    boundary("numa_moe_config_set_strict", || {
        rt()?.set_on_error(if strict { OnError::Strict } else { OnError::Fallback });
        Ok(())
    })
}

/// Number of NUMA nodes (NUMA_MOE_TOPOLOGY may replace the host by a described machine).
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_topology_node_count(out: *mut usize) -> NumaMoeResult {
    boundary("numa_moe_topology_node_count", || {
        // SAFETY: forwarded from this function's contract.
        *unsafe { arg_out(out, "out") }? = rt()?.topology.nodes().len();
        Ok(())
    })
}

/// Describes node number `index` (0-based position, not OS id) into `*out`.
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_topology_node_info(index: usize, out: *mut NumaMoeNodeInfo) -> NumaMoeResult {
    boundary("numa_moe_topology_node_info", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        let topo = &rt()?.topology;
        let n = topo.nodes().get(index).ok_or_else(|| {
            Fail::new(
                NumaMoeResult::InvalidArgument,
                format!("node index {index} is out of range (the machine has {} nodes)", topo.nodes().len()),
            )
        })?;
        *out = NumaMoeNodeInfo {
            id: n.id,
            n_cpus: n.cpus.len() as u32,
            n_cores: n.cores() as u32,
            has_memory: n.has_memory(),
            mem_allowed: n.mem_allowed,
            total_bytes: n.total_bytes,
            free_bytes: n.free_bytes.unwrap_or(0),
        };
        Ok(())
    })
}

/// The SLIT distance between the nodes at positions `from` and `to` (10 = local).
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_topology_distance(from: usize, to: usize, out: *mut u32) -> NumaMoeResult {
    boundary("numa_moe_topology_distance", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        let topo = &rt()?.topology;
        let ids = topo.node_ids();
        let (Some(&a), Some(&b)) = (ids.get(from), ids.get(to)) else {
            return Err(Fail::new(
                NumaMoeResult::InvalidArgument,
                format!("node index out of range (the machine has {} nodes)", ids.len()),
            ));
        };
        *out = topo.distance(a, b);
        Ok(())
    })
}

/// Counts where the pages of `addr .. addr+len` are (any memory of this process).
///
/// # Safety
/// `out` must be valid for writes; `addr..addr+len` must be mapped in this process.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_memory_pages_per_node(addr: *const u8, len: usize, out: *mut NumaMoePageReport) -> NumaMoeResult {
    boundary("numa_moe_memory_pages_per_node", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        if addr.is_null() {
            return Err(Fail::new(NumaMoeResult::NullArgument, "addr is NULL"));
        }
        let r = crate::memory::page_report(addr as usize, len, |_| None)
            .map_err(|e| Fail::new(NumaMoeResult::SystemError, format!("cannot read page locations: {e}")))?;
        *out = (&r).into();
        Ok(())
    })
}
