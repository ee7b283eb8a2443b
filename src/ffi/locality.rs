//! The locality counters through the C ABI (see [`crate::compute::locality`]): where the
//! weight bytes every op ggml-cpu computed were read, per decoded token and over the run.

use super::{arg_out, boundary, NumaMoeResult};
use crate::compute::locality::{self, Snapshot};

/// Categories of weights, in the order of the `*_by_category` arrays: routed experts,
/// attention, shared experts, dense FFN, output head, embeddings, other.
pub const NUMA_MOE_CATEGORIES: usize = 7;

/// Weight bytes read, by where they were read.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NumaMoeLocality {
    /// Decoded tokens: one-token graphs, counted by their one-row token-embedding lookup.
    pub tokens: u64,
    /// Weight bytes read by one-token ops: by numa-moe's threads from their own node, from
    /// another node, and by ops left to llama.cpp (their node is llama.cpp's first touch).
    pub local_bytes: u64,
    pub remote_bytes: u64,
    pub stock_bytes: u64,
    /// The same by category (see NUMA_MOE_CATEGORIES).
    pub local_by_category: [u64; NUMA_MOE_CATEGORIES],
    pub remote_by_category: [u64; NUMA_MOE_CATEGORIES],
    pub stock_by_category: [u64; NUMA_MOE_CATEGORIES],
    /// Over every op of every batch size, and every token embedded.
    pub all_tokens: u64,
    pub all_local_bytes: u64,
    pub all_remote_bytes: u64,
    pub all_stock_bytes: u64,
}

impl From<(&Snapshot, &Snapshot)> for NumaMoeLocality {
    fn from((d, a): (&Snapshot, &Snapshot)) -> Self {
        NumaMoeLocality {
            tokens: d.tokens,
            local_bytes: d.local_total(),
            remote_bytes: d.remote_total(),
            stock_bytes: d.stock_total(),
            local_by_category: d.local,
            remote_by_category: d.remote,
            stock_by_category: d.stock,
            all_tokens: a.tokens,
            all_local_bytes: a.local_total(),
            all_remote_bytes: a.remote_total(),
            all_stock_bytes: a.stock_total(),
        }
    }
}

/// The locality counters so far.
///
/// # Safety
/// `out` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn numa_moe_locality_get(out: *mut NumaMoeLocality) -> NumaMoeResult {
    boundary("numa_moe_locality_get", || {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { arg_out(out, "out") }?;
        let (d, a) = locality::snapshot();
        *out = (&d, &a).into();
        Ok(())
    })
}

/// Zeroes the locality counters.
#[no_mangle]
pub extern "C" fn numa_moe_locality_reset() -> NumaMoeResult {
    boundary("numa_moe_locality_reset", || {
        locality::reset();
        Ok(())
    })
}

/// Turns counting on or off (on by default; NUMA_MOE_LOCALITY=0 starts it off).
#[no_mangle]
pub extern "C" fn numa_moe_locality_set_enabled(on: bool) -> NumaMoeResult {
    boundary("numa_moe_locality_set_enabled", || {
        locality::set_enabled(on);
        Ok(())
    })
}

/// The exit report's locality lines.
pub(crate) fn report_lines() -> Vec<String> {
    let (d, a) = locality::snapshot();
    locality::report_lines(&d, &a)
}
