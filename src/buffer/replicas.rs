//! The extra copies of a tensor that `mirror` and `a+b` maps plan: one [`Region`] per copy,
//! bound to its node before any byte is written, and kept equal to the primary.
//!
//! Bytes reach the copies two ways. Writes through ggml's buffer interface (set_tensor,
//! memset, cpy) go to every copy at once and are recorded in [`Coverage`]. Bytes ggml writes
//! straight into tensor data (llama.cpp's loader without mmap reads the file into the
//! primary) reach the copies at the first compute, which copies exactly what the coverage
//! lacks. A direct write after the first compute is not seen: [`Replicas::stale_bytes`]
//! detects it (numa_moe_tensor_verify reports it) and [`Replicas::refresh`] repairs it.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::coverage::Coverage;
use crate::error::{Error, ErrorCode};
use crate::memory::{Region, Strictness};
use crate::placement::TensorPlan;

pub struct Replicas {
    /// Copy k >= 1 of the plan is `regions[k - 1]`; `None` where it could not be made.
    regions: Vec<Option<Region>>,
    /// Tensor bytes written through the buffer interface (to every copy).
    written: Mutex<Coverage>,
    /// Whether the first compute has brought the copies up to date (set with Release after
    /// the copy, under `sync`; read with Acquire by every thread of every op).
    synced: AtomicBool,
    sync: Mutex<()>,
}

impl Replicas {
    /// Makes and binds the copies `plan` asks for beyond the primary. A copy that cannot be
    /// made is `None` with the reason in the returned warnings (its node then reads the
    /// primary), unless `strict`, where the first failure is the error.
    pub fn new(plan: &TensorPlan, bind: bool, strictness: Strictness, strict: bool) -> Result<(Replicas, Vec<String>), Error> {
        let bytes = plan.tensor.bytes() as usize;
        let mut regions = Vec::new();
        let mut warnings = Vec::new();
        for c in &plan.copies[1..] {
            let made = Region::new(bytes, crate::sys::page_size()).map_err(|e| e.to_string()).and_then(|r| {
                if bind {
                    for e in &c.extents {
                        r.bind(e.offset as usize..(e.offset + e.len) as usize, &e.binding, strictness).map_err(|err| {
                            format!("cannot bind the copy of {} for node {}: {err}", plan.tensor.name, c.node.unwrap_or(0))
                        })?;
                    }
                }
                Ok(r)
            });
            match made {
                Ok(r) => regions.push(Some(r)),
                Err(msg) if strict => return Err(Error::new(ErrorCode::SystemError, msg)),
                Err(msg) => {
                    warnings.push(msg);
                    regions.push(None);
                }
            }
        }
        Ok((Replicas { regions, written: Mutex::new(Coverage::default()), synced: AtomicBool::new(false), sync: Mutex::new(()) }, warnings))
    }

    /// The region of copy `copy` (>= 1), if it was made.
    pub fn region(&self, copy: usize) -> Option<&Region> {
        copy.checked_sub(1).and_then(|i| self.regions.get(i)).and_then(|r| r.as_ref())
    }

    /// Bytes over the copies that exist, beyond the primary.
    pub fn bytes(&self, plan: &TensorPlan) -> u64 {
        plan.copies
            .iter()
            .skip(1)
            .zip(&self.regions)
            .filter(|(_, r)| r.is_some())
            .map(|(c, _)| c.extents.iter().map(|e| e.len).sum::<u64>())
            .sum()
    }

    /// Calls `f(replica, offset in the tensor, length)` for every replica extent overlapping
    /// the tensor's bytes `range`.
    pub fn for_each_span(&self, plan: &TensorPlan, range: std::ops::Range<u64>, mut f: impl FnMut(&Region, u64, u64)) {
        for (c, r) in plan.copies[1..].iter().zip(&self.regions) {
            let Some(r) = r else { continue };
            for ext in &c.extents {
                let (a, b) = (ext.offset.max(range.start), (ext.offset + ext.len).min(range.end));
                if a < b {
                    f(r, a, b - a);
                }
            }
        }
    }

    /// Records that the tensor's bytes `range` were written to every copy.
    pub fn record_write(&self, range: std::ops::Range<u64>) {
        self.written.lock().insert(range);
    }

    /// Before the first compute: copies the primary (`primary`, the tensor at `offset`)
    /// into every replica extent wherever the bytes did not come through the buffer
    /// interface. Runs once; every thread of the first op waits for it.
    pub fn sync_once(&self, plan: &TensorPlan, primary: &Region, offset: usize) {
        if self.synced.load(Ordering::Acquire) {
            return;
        }
        let _guard = self.sync.lock();
        if self.synced.load(Ordering::Acquire) {
            return;
        }
        let written = self.written.lock().clone();
        let total = plan.tensor.bytes();
        for gap in written.gaps(0..total) {
            self.for_each_span(plan, gap, |r, at, len| r.copy_from(at as usize, primary, offset + at as usize, len as usize));
        }
        self.synced.store(true, Ordering::Release);
    }

    /// Bytes in which a replica differs from the primary (a direct write to tensor data
    /// after the first compute).
    pub fn stale_bytes(&self, plan: &TensorPlan, primary: &Region, offset: usize) -> u64 {
        let mut stale = 0;
        self.for_each_span(plan, 0..plan.tensor.bytes(), |r, at, len| {
            stale += r.count_differences(at as usize, primary, offset + at as usize, len as usize)
        });
        stale
    }

    /// Copies the primary into every replica extent again.
    pub fn refresh(&self, plan: &TensorPlan, primary: &Region, offset: usize) {
        let _guard = self.sync.lock();
        self.for_each_span(plan, 0..plan.tensor.bytes(), |r, at, len| {
            r.copy_from(at as usize, primary, offset + at as usize, len as usize)
        });
    }
}
