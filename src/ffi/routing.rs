//! The routing statistics through the C ABI: per layer and expert, per node, saved as a
//! routing profile (docs/ROUTING.md), and the exit report.

use std::ffi::c_char;

use super::api::rt;
use super::{arg_out, arg_str, boundary, Fail, NumaMoeResult};
use crate::compute::stats;

/// The work one node's threads did in the ops numa-moe computed.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NumaMoeNodeWork {
    /// Output rows computed (expert rows x routed tokens).
    pub rows: u64,
    /// Weight bytes read (each routed expert's rows once per op).
    pub bytes: u64,
}

/// Copies layer `layer`'s token-slots per expert (whole run into `tokens`, the recent
/// window into `recent`, which may be NULL) for a model of `n_expert` experts.
/// NUMA_MOE_RESULT_NOT_PLACED: nothing was recorded for that layer;
/// NUMA_MOE_RESULT_INVALID_ARGUMENT: the layer has another expert count.
///
/// # Safety
/// `tokens` (and `recent` unless NULL) must be writable for `n_expert` values.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_routing_layer(layer: u32, tokens: *mut u64, recent: *mut u64, n_expert: usize) -> NumaMoeResult {
    boundary("numa_moe_routing_layer", || {
        if tokens.is_null() {
            return Err(Fail::new(NumaMoeResult::NullArgument, "tokens is NULL"));
        }
        let l = stats::layers()
            .into_iter()
            .find(|l| l.layer == layer)
            .ok_or_else(|| Fail::new(NumaMoeResult::NotPlaced, format!("no routing recorded for layer {layer}")))?;
        if l.n_expert() != n_expert {
            return Err(Fail::new(NumaMoeResult::InvalidArgument, format!("layer {layer} has {} experts, not {n_expert}", l.n_expert())));
        }
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(tokens, n_expert) }.copy_from_slice(&l.tokens());
        if !recent.is_null() {
            // SAFETY: per this function's contract.
            unsafe { std::slice::from_raw_parts_mut(recent, n_expert) }.copy_from_slice(&l.recent());
        }
        Ok(())
    })
}

/// What node `node`'s threads computed so far.
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_routing_node_work(node: u32, out: *mut NumaMoeNodeWork) -> NumaMoeResult {
    boundary("numa_moe_routing_node_work", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        let (rows, bytes) = stats::node_work(node);
        *out = NumaMoeNodeWork { rows, bytes };
        Ok(())
    })
}

/// Writes what was recorded as a routing profile (JSON, docs/ROUTING.md) to `path`.
/// NUMA_MOE_RESULT_NOT_PLACED: nothing was recorded yet.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_routing_save(path: *const c_char) -> NumaMoeResult {
    boundary("numa_moe_routing_save", || {
        // SAFETY: forwarded from this function's contract.
        let path = unsafe { arg_str(path, "path") }?;
        let map = rt()?.settings().map.render();
        let p = stats::profile(&map).ok_or_else(|| Fail::new(NumaMoeResult::NotPlaced, "no routing recorded yet"))?;
        p.save(std::path::Path::new(path)).map_err(Fail::from)
    })
}

/// Zeroes every routing counter.
#[no_mangle]
pub extern "C" fn numa_moe_routing_reset() -> NumaMoeResult {
    boundary("numa_moe_routing_reset", || {
        stats::reset();
        Ok(())
    })
}

/// Turns recording on or off (on by default; NUMA_MOE_ROUTING_STATS=0 starts it off).
#[no_mangle]
pub extern "C" fn numa_moe_routing_set_enabled(on: bool) -> NumaMoeResult {
    boundary("numa_moe_routing_set_enabled", || {
        stats::set_enabled(on);
        Ok(())
    })
}

/// At process exit: the routing report on stderr, and the profile written to
/// NUMA_MOE_ROUTING_OUT when set. Registered once, at attach.
pub(crate) extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Ok(rt) = crate::config::runtime() else { return };
        if rt.placement_active() {
            for line in super::locality::report_lines() {
                eprintln!("{line}");
            }
        }
        let Some(p) = stats::profile(&rt.settings().map.render()) else { return };
        for line in stats::report_lines(&p) {
            eprintln!("{line}");
        }
        if let Ok(path) = std::env::var("NUMA_MOE_ROUTING_OUT") {
            if !path.trim().is_empty() {
                match p.save(std::path::Path::new(path.trim())) {
                    Ok(()) => eprintln!("numa-moe: routing profile written to {} (numa-moe routing {0})", path.trim()),
                    Err(e) => eprintln!("numa-moe: {e}"),
                }
            }
        }
    });
}
