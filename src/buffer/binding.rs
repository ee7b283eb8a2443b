//! Binding a tensor's primary copy: every extent of the plan mbind-ed to its node (or
//! interleaved over its nodes) before any byte is written.

use crate::error::{Error, ErrorCode};
use crate::memory::{Region, Strictness};
use crate::placement::TensorPlan;
use crate::report::{describe_binding, describe_extent};
use crate::topology::format_gib;

/// Binds the primary extents of `plan` for the tensor at `offset` of `region`. On the first
/// failure the tensor's range is returned to the default policy and the error describes
/// the tensor, the extent and the node.
pub fn bind_primary(region: &Region, plan: &TensorPlan, offset: usize, strictness: Strictness) -> Result<(), Error> {
    for e in &plan.copies[0].extents {
        if let Err(err) = region.bind(offset + e.offset as usize..offset + (e.offset + e.len) as usize, &e.binding, strictness) {
            let _ = region.unbind(offset..offset + plan.tensor.bytes() as usize);
            return Err(Error::new(
                ErrorCode::from(&err),
                format!(
                    "cannot bind {} of {} (from {}) to {}: {err}",
                    format_gib(e.len),
                    plan.tensor.name,
                    describe_extent(plan, e.offset),
                    describe_binding(&e.binding)
                ),
            ));
        }
    }
    Ok(())
}
