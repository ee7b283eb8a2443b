//! The memory budget of one tensor: what its plan puts on each node, reserved against what
//! the node can hold, alongside every other live buffer.

use crate::config::Runtime;
use crate::error::{Error, ErrorCode};
use crate::memory::Strictness;
use crate::placement::TensorPlan;
use crate::topology::format_gib;

/// What the budget allows for one tensor.
pub struct Reservation {
    /// The bytes reserved per node (released with the buffer).
    pub loads: Vec<(u32, u64)>,
    /// Bind, or only prefer the planned nodes because one is short of memory.
    pub strictness: Strictness,
    /// Why placement is weaker than planned, for the report.
    pub shortfall: Option<String>,
}

/// Reserves `plan`'s bytes per node. A node short of memory stops the load when `strict`
/// (nothing stays reserved), else the tensor is placed by preference and every later
/// tensor sees the node as full.
pub fn reserve(rt: &Runtime, plan: &TensorPlan, strict: bool) -> Result<Reservation, Error> {
    let loads = plan.bytes_per_node();
    for (i, &(node, b)) in loads.iter().enumerate() {
        if let Err(s) = rt.reserve(node, b) {
            let limit = if s.cgroup {
                format!("the process's cgroup (memory.max) allows {} more", format_gib(s.have))
            } else {
                format!("the node has {} free", format_gib(s.have))
            };
            let msg = format!(
                "cannot place {} on node {node}: expert memory planned there would reach {} but {limit} ({} short)",
                plan.tensor.name,
                format_gib(s.need),
                format_gib(s.need.saturating_sub(s.have))
            );
            if strict {
                for &(n, b) in &loads[..i] {
                    rt.release(n, b);
                }
                return Err(Error::new(ErrorCode::OutOfMemory, msg));
            }
            crate::log::warn_once(
                rt,
                &format!("short{node}"),
                &format!("numa-moe: warning: {msg}; using preferred (not bound) placement for such tensors"),
            );
            for &(n, b) in &loads[i..] {
                rt.reserve_unchecked(n, b);
            }
            return Ok(Reservation {
                loads,
                strictness: Strictness::Preferred,
                shortfall: Some(format!("{msg}; preferred (not bound) placement")),
            });
        }
    }
    Ok(Reservation { loads, strictness: Strictness::Bind, shortfall: None })
}
