//! Node-bound kernels on ggml-cpu's own worker threads (ith of nth): no second pool, no
//! extra graph splits. One file per op ([`mmid`]), the work-buffer protocol ([`work`]) and
//! the pure thread layout ([`workers`]).
//!
//! A hooked op runs in three steps:
//!
//! 0. **Decision** ([`decide`]), on every thread before any of them touches shared state:
//!    everything that could make the hook unable to finish (shapes, plan lookups, the work
//!    buffer's size, thread indices) is checked here, from data every thread sees alike, so
//!    all threads decline together (ggml-cpu's stock kernel then runs) or compute together.
//! 1. **Phase A**: every thread finds the node it works for (pinning itself first, inside
//!    the CPU set ggml gave it), writes it to the roster and converts its share of the
//!    activations; thread 0 groups routed rows by expert. Then ggml's barrier.
//! 2. **Phase B**: threads are grouped by node; each group computes the (expert, row range)
//!    pieces its node holds, reading that node's copy, in chunks claimed from the group's
//!    counter.
//!
//! After the decision the op cannot be handed back to ggml: the other threads are already
//! at the barrier, and a thread that returned false would run ggml's stock kernel with its
//! own barriers and desynchronise the pool. So a failure after that point (a panic, which
//! the code above is written never to raise) aborts the process with a message naming the
//! op and the reason, instead of hanging or corrupting the output.

pub mod locality;
pub mod mm;
pub mod mmid;
pub mod stats;
pub mod work;
pub mod workers;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::buffer::{NumaBuffer, PlacedTensor};
use crate::config::{PinMode, Runtime};
use crate::ggml::{Api, NumaMoeComputeParams};
use crate::placement::Piece;
use crate::sys::CpuMask;
use mm::MmOp;
use mmid::MmidOp;
use work::Work;
use workers::{assign, PinPlan};

/// MUL_MAT_ID ops over placed weights: computed here, or left to ggml-cpu's stock kernel.
pub static OPS_COMPUTED: AtomicU64 = AtomicU64::new(0);
pub static OPS_DECLINED: AtomicU64 = AtomicU64::new(0);
/// MUL_MAT ops over placed weight matrices computed here.
pub static MM_OPS_COMPUTED: AtomicU64 = AtomicU64::new(0);
/// Pinned worker threads checked against their planned node (each op), and those found
/// running elsewhere.
pub static WORKERS_CHECKED: AtomicU64 = AtomicU64::new(0);
pub static WORKERS_OFF_NODE: AtomicU64 = AtomicU64::new(0);
/// Times a worker was narrowed to a node's CPUs (a first pin, or ggml resetting the
/// thread's mask, as OpenMP builds do at every graph).
pub static WORKER_PINS: AtomicU64 = AtomicU64::new(0);

/// A worker's pinning, kept per OS thread.
#[derive(Debug, Clone)]
struct Pinned {
    ith: usize,
    /// The CPU set ggml (or the OS) gave the thread.
    allowed: CpuMask,
    /// What numa-moe narrowed it to (`None`: left as it was), and the node.
    pinned: Option<(CpuMask, u32)>,
}

impl Pinned {
    /// The set the thread has while this pinning holds.
    fn mask(&self) -> CpuMask {
        self.pinned.map_or(self.allowed, |(m, _)| m)
    }
}

thread_local! {
    static PINNED: RefCell<Option<Pinned>> = const { RefCell::new(None) };
    /// (ith, node) of this thread on a described machine.
    static DESCRIBED: Cell<Option<(usize, u32)>> = const { Cell::new(None) };
}

/// Work buffer bytes for the op with `n_threads` threads.
pub fn work_size(op: &MmidOp, n_threads: usize) -> usize {
    op.layout(n_threads.max(1)).total
}

/// Step 0: whether this op is computed here, decided alike on every thread. `None`: decline.
pub fn decide(op: &MmidOp, placed: &PlacedTensor, params: &NumaMoeComputeParams) -> Option<Work> {
    decide_for(placed, op.src0, op.n_expert(), |n| op.layout(n), params)
}

/// [`decide`] for any hooked op over a stack of `stacked` matrices (experts, or heads).
fn decide_for(
    placed: &PlacedTensor,
    src0: crate::ggml::TensorRef,
    stacked: usize,
    layout: impl Fn(usize) -> work::WorkLayout,
    params: &NumaMoeComputeParams,
) -> Option<Work> {
    // the plan must describe these very weights (rows and matrices as laid out in the op)
    let t = &placed.plan.tensor;
    let ok_plan = placed.by_expert.len() == stacked
        && t.n_expert as usize == stacked
        && t.rows == src0.ne()[1] as u64
        && t.row_bytes == src0.nb()[1] as u64;
    let work = if ok_plan { Work::new(params, layout(params.nth.max(1) as usize)) } else { None };
    if work.is_none() && params.ith == 0 {
        OPS_DECLINED.fetch_add(1, Ordering::Relaxed);
    }
    work
}

/// Steps 1 and 2 on this thread, after [`decide`] said yes on every thread. Never returns
/// early: it finishes the op or aborts the process.
pub fn run(rt: &Runtime, api: &Api, op: &MmidOp, buf: &NumaBuffer, placed: &PlacedTensor, work: &Work) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phases(rt, api, op, buf, placed, work)));
    if let Err(payload) = outcome {
        fatal(&format!("MUL_MAT_ID {} over {}", op.dst.name(), op.src0.name()), &crate::error::panic_message(payload.as_ref()));
    }
}

/// Step 0 for a MUL_MAT over a placed weight matrix: as [`decide`].
pub fn decide_mm(op: &MmOp, placed: &PlacedTensor, params: &NumaMoeComputeParams) -> Option<Work> {
    decide_for(placed, op.src0, op.heads(), |n| op.layout(n), params)
}

/// Steps 1 and 2 of a MUL_MAT on this thread, after [`decide_mm`] said yes on every thread.
pub fn run_mm(rt: &Runtime, api: &Api, op: &MmOp, buf: &NumaBuffer, placed: &PlacedTensor, work: &Work) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phases_mm(rt, api, op, buf, placed, work)));
    if let Err(payload) = outcome {
        fatal(&mm::describe(op), &crate::error::panic_message(payload.as_ref()));
    }
}

/// Phase A, the part every hooked op shares, then the barrier: thread 0 reports and resets the
/// claim counters; every thread brings the replicas up to date, writes its node into the
/// roster and runs the op's own share of phase A (`prepare`: converting the activations, and
/// for MUL_MAT_ID thread 0's grouping of the routed rows); after the barrier thread 0 checks
/// the pages once.
fn phase_a(rt: &Runtime, api: &Api, buf: &NumaBuffer, placed: &PlacedTensor, work: &Work, prepare: impl FnOnce()) {
    let ith = work.ith();
    if ith == 0 {
        buf.report_once(rt);
        work.reset_claims();
    }
    buf.sync_replicas(placed);
    work.set_roster(thread_node(rt, api, ith));
    prepare();
    injected_fault(work);
    api.barrier(&work.params);
    if ith == 0 {
        buf.verify_once(rt);
    }
}

fn phases_mm(rt: &Runtime, api: &Api, op: &MmOp, buf: &NumaBuffer, placed: &PlacedTensor, work: &Work) {
    let (ith, nth) = (work.ith(), work.nth());
    if ith == 0 {
        MM_OPS_COMPUTED.fetch_add(1, Ordering::Relaxed);
    }
    phase_a(rt, api, buf, placed, work, || op.convert_src1(work));

    let columns = op.columns_per_head();
    let key = MmKey { roster: work.roster(), columns, row_group: op.row_group(), gemm: op.n_tokens() > 3 };
    // Every thread's share depends only on the roster and the op's shape, which repeat every
    // token: planned once per tensor and kept with it, rather than rebuilding the assignment
    // and the chunk lists (allocations, topology lookups) on every op of every token.
    let shares = {
        let cached = placed.mm_shares.read();
        match cached.as_ref() {
            Some((k, s)) if *k == key => Some(s.clone()),
            _ => None,
        }
    };
    let shares = shares.unwrap_or_else(|| {
        let s = std::sync::Arc::new(mm_shares(rt, placed, &key, nth));
        *placed.mm_shares.write() = Some((key, s.clone()));
        s
    });
    let Some(w) = shares.get(ith) else { return };
    debug_assert!(w.slot < nth);
    let primary = op.src0.data_ptr() as *const u8;
    let count = locality::enabled();
    let mut tally = locality::Tally::default();
    let row_bytes = placed.plan.tensor.row_bytes;
    loop {
        let i = work.claim(w.slot);
        let Some(&(head, ref rows, copy, node)) = w.items.get(i) else { break };
        op.compute_rows(work, placed.copy_base(primary, copy), head, rows.clone());
        if count {
            tally.read(w.group, node, (rows.end - rows.start) as u64 * row_bytes);
        }
    }
    if count {
        tally.flush(placed.category, op.n_tokens() == 1);
    }
}

/// What every thread's share of a MUL_MAT depends on.
#[derive(Debug, PartialEq, Eq)]
pub struct MmKey {
    roster: Vec<u32>,
    columns: i64,
    row_group: i64,
    /// Whether gemm runs (four or more activation rows per plane).
    gemm: bool,
}

/// One thread's share of a MUL_MAT: its group, the group's claim counter, the group's chunks.
#[derive(Debug)]
pub struct MmShare {
    group: u32,
    slot: usize,
    items: Vec<(usize, std::ops::Range<i64>, usize, u32)>,
}

/// Every thread's share of a MUL_MAT over `placed` for the roster and shape in `key`.
fn mm_shares(rt: &Runtime, placed: &PlacedTensor, key: &MmKey, nth: usize) -> Vec<MmShare> {
    let a = assign(&rt.topology, &key.roster, &placed.piece_nodes);
    (0..nth)
        .map(|ith| {
            let (group, _rank, size, slot) = a.of_thread(ith);
            let mine = |p: &&Piece| a.group_of_node.get(&p.node) == Some(&group);
            // repacked layouts with gemm's four-row groups (batches of four or more): as
            // CPU_REPACK's forward_mul_mat chunks its rows, four parts per thread (one long part
            // per thread streamed the whole slice past the cache for every group of four
            // activation rows: 1.07-1.23x CPU_REPACK's time in 128-token prefill); with gemv
            // alone (decode), one part per thread, as for the experts (four parts measured up
            // to 1.2x in decode)
            let split = if key.row_group > 1 && key.gemm { size * 4 } else { size };
            let items = chunks(&placed.by_expert, |_| key.columns as usize, &mine, &[], key.row_group, split);
            MmShare { group, slot, items }
        })
        .collect()
}

/// The op cannot be finished and cannot be handed back: say why, then abort.
#[cold]
fn fatal(what: &str, reason: &str) -> ! {
    let msg = format!(
        "numa-moe: fatal: {what} failed after every thread had committed to computing it ({reason}); \
         ggml's threads cannot continue in step, aborting\n"
    );
    // straight to stderr, not ggml's log: llama.cpp's logger is asynchronous and would lose it
    eprint!("{msg}");
    std::process::abort()
}

/// A failure injected after the decision point, for the test that proves such failures
/// abort cleanly instead of hanging ggml's barrier (builds with `--features fault-injection`
/// only; release builds have no such switch).
#[cfg(feature = "fault-injection")]
fn injected_fault(work: &Work) {
    if std::env::var("NUMA_MOE_INJECT_FAULT").as_deref() == Ok("after-decision") && work.ith() + 1 == work.nth() {
        panic!("injected fault (NUMA_MOE_INJECT_FAULT=after-decision)");
    }
}

#[cfg(not(feature = "fault-injection"))]
fn injected_fault(_: &Work) {}

fn phases(rt: &Runtime, api: &Api, op: &MmidOp, buf: &NumaBuffer, placed: &PlacedTensor, work: &Work) {
    let (ith, nth) = (work.ith(), work.nth());
    if ith == 0 {
        OPS_COMPUTED.fetch_add(1, Ordering::Relaxed);
    }

    phase_a(rt, api, buf, placed, work, || {
        op.convert_src1(work);
        if ith == 0 {
            op.group_rows(work);
            if stats::enabled() {
                let t = &placed.plan.tensor;
                if let Some(layer) = stats::layer_for(&t.name, t.layer, t.n_expert) {
                    layer.record(op.n_tokens() as u64, |e| op.routed(work, e) as u64);
                }
            }
        }
    });

    // Phase B.
    let a = assign(&rt.topology, &work.roster(), &placed.piece_nodes);
    let (group, rank, size, slot) = a.of_thread(ith);
    let primary = op.src0.data_ptr() as *const u8;
    let mine = |p: &&Piece| a.group_of_node.get(&p.node) == Some(&group);

    // Experts stock computes with ggml's tiled K-quant kernel are computed the same way, each
    // piece by its whole group (the kernel partitions its rows by rank itself).
    let record = stats::enabled();
    let count = locality::enabled();
    let mut reads = locality::Tally::default();
    let row_bytes = placed.plan.tensor.row_bytes;
    let mut tally = stats::WorkTally::default();
    let mut tiled = Vec::new();
    for (expert, pieces) in placed.by_expert.iter().enumerate() {
        let routed = op.routed(work, expert) as u64;
        if routed == 0 {
            continue;
        }
        for p in pieces.iter().filter(mine) {
            let base = placed.copy_base(primary, p.copy);
            if op.tiled(work, base, expert, p.rows.start as i64..p.rows.end as i64, rank, size) {
                tiled.push((expert, p.rows.start));
                let n = p.rows.end - p.rows.start;
                if record && rank == 0 {
                    tally.rows += n * routed;
                    tally.bytes += n * row_bytes;
                }
                if count && rank == 0 {
                    reads.read(group, p.node, n * row_bytes);
                }
            }
        }
    }
    // The rest in chunks the group's threads claim one at a time from the group's counter:
    // a thread that runs slower (a busy core, an SMT sibling) simply claims fewer, and no
    // thread leaves its node's pieces. Chunks as stock's: 64 rows for one token, else 16;
    // for repacked layouts one part per thread of each piece, as CPU_REPACK's.
    let items = chunks(&placed.by_expert, |e| op.routed(work, e), &mine, &tiled, op.row_group(), size);
    debug_assert!(slot < nth);
    loop {
        let i = work.claim(slot);
        let Some(&(expert, ref rows, copy, node)) = items.get(i) else { break };
        op.compute_rows(work, placed.copy_base(primary, copy), expert, rows.clone());
        let n = (rows.end - rows.start) as u64;
        if record {
            tally.rows += n * op.routed(work, expert) as u64;
            tally.bytes += n * row_bytes;
        }
        if count {
            reads.read(group, node, n * row_bytes);
        }
    }
    if record {
        tally.flush(group);
    }
    if count {
        reads.flush(placed.category, op.n_tokens() == 1);
    }
}

/// `vec_dot` of weight rows `rows` (row `r` at `weights + r * nb01`) with one activation column
/// `col`, one row per call as ggml-cpu's stock kernels call it, the results written to
/// `out[rows]`: the inner block of both hooks' standard-layout kernels (16 rows at most).
///
/// # Safety
/// The rows and the column must be readable for `ne00` elements of their types; `out` must be
/// writable at `rows`, and those outputs must be this thread's alone.
pub(crate) unsafe fn dot_block(
    vec_dot: unsafe extern "C" fn(i32, *mut f32, usize, *const std::ffi::c_void, usize, *const std::ffi::c_void, usize, i32),
    ne00: i32,
    weights: *const u8,
    nb01: usize,
    rows: std::ops::Range<i64>,
    col: *const u8,
    out: *mut f32,
) {
    let mut tmp = [0f32; 16];
    debug_assert!(rows.end - rows.start <= tmp.len() as i64);
    for r in rows.clone() {
        // SAFETY: per this function's contract; tmp has room for 16 rows.
        unsafe {
            vec_dot(ne00, tmp.as_mut_ptr().add((r - rows.start) as usize), 0, weights.add(r as usize * nb01).cast(), 0, col.cast(), 0, 1)
        };
    }
    // SAFETY: per this function's contract.
    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(rows.start as usize), (rows.end - rows.start) as usize) };
}

/// The node this thread works for: on a described topology its slot in the balanced
/// worker sequence (so multi-node plans can be exercised on any machine); on the host the
/// node it runs on, after narrowing it to its node's CPUs when that is ours to do.
fn thread_node(rt: &Runtime, api: &Api, ith: usize) -> u32 {
    let topo = &rt.topology;
    if !topo.is_host() {
        return DESCRIBED.with(|d| match d.get() {
            Some((i, node)) if i == ith => node,
            _ => {
                let node = workers::described_node(topo, ith);
                d.set(Some((ith, node)));
                node
            }
        });
    }
    // One node: nothing to pin and nothing to ask the kernel (a getcpu syscall per thread
    // and op is measurable in a decode op of a fifth of a millisecond).
    if let [only] = topo.nodes() {
        return only.id;
    }
    // The main thread (ith 0) is llama.cpp's own thread: pinning it would outlive the op and
    // be inherited by threads it starts later, so it only reports where it runs.
    let ours = ith != 0 && topo.compute_nodes().len() > 1 && rt.pin() == PinMode::Auto && !api.is_numa();
    let planned = if ours { pin(rt, ith) } else { None };
    let node = match crate::sys::getcpu() {
        Ok((_, node)) if topo.node(node).is_some() => node,
        _ => topo.node_ids()[0],
    };
    if let Some(want) = planned {
        WORKERS_CHECKED.fetch_add(1, Ordering::Relaxed);
        if want != node {
            WORKERS_OFF_NODE.fetch_add(1, Ordering::Relaxed);
        }
    }
    node
}

/// Narrows this worker to its node's CPUs inside the set it was given, once per thread
/// (again only if something else reset its mask). Returns the node it is pinned to. Every
/// op costs one sched_getaffinity and a compare of two sets; planning only when they differ.
fn pin(rt: &Runtime, ith: usize) -> Option<u32> {
    let current = CpuMask::of_this_thread().ok()?;
    PINNED.with(|cell| {
        let mut state = cell.borrow_mut();
        // Where the thread stands: still as we left it, reset to the set it had, or given
        // a new set by someone else (then that is the set to stay inside).
        let allowed = match state.as_ref() {
            Some(s) if s.ith == ith && s.mask() == current => return s.pinned.map(|(_, node)| node),
            Some(s) if s.allowed == current || s.mask() == current => s.allowed,
            _ => current,
        };
        let allowed_cpus = allowed.cpus();
        let plan = workers::pin_plan(rt.topology.nodes(), &allowed_cpus, ith);
        // the same plan again: ggml reset the thread's mask (OpenMP builds with a CPU mask do
        // at every graph); re-narrow it quietly
        let previous = state.as_ref().filter(|s| s.ith == ith).and_then(|s| s.pinned);
        let pinned = match plan {
            PinPlan::Leave => None,
            PinPlan::Pin { node, cpus } => {
                let mask = CpuMask::from_cpus(&cpus);
                if let Err(e) = mask.apply_to_this_thread() {
                    crate::log::warn_once(
                        rt,
                        "pin",
                        &format!("numa-moe: warning: cannot pin worker threads ({e}); assigning work by the node each thread runs on"),
                    );
                    *state = Some(Pinned { ith, allowed, pinned: None });
                    return None;
                }
                WORKER_PINS.fetch_add(1, Ordering::Relaxed);
                if previous != Some((mask, node)) {
                    crate::log::info(&format!(
                        "numa-moe: worker {ith} pinned to node {node}, CPUs {} (of {})",
                        crate::topology::render_cpu_list(&cpus),
                        crate::topology::render_cpu_list(&allowed_cpus)
                    ));
                }
                Some((mask, node))
            }
        };
        *state = Some(Pinned { ith, allowed, pinned });
        pinned.map(|(_, node)| node)
    })
}

/// This group's chunks of work, in the same order on every thread of the group.
fn chunks(
    by_expert: &[Vec<Piece>],
    routed: impl Fn(usize) -> usize,
    mine: &dyn Fn(&&Piece) -> bool,
    tiled: &[(usize, u64)],
    row_group: i64,
    split: usize,
) -> Vec<(usize, std::ops::Range<i64>, usize, u32)> {
    let mut items = Vec::new();
    for (expert, pieces) in by_expert.iter().enumerate() {
        let n = routed(expert);
        if n == 0 {
            continue;
        }
        let group = row_group.max(1);
        for p in pieces.iter().filter(mine) {
            // Repacked layouts: each piece in `split` (the group's threads) contiguous parts of
            // whole interleaved groups, as CPU_REPACK divides an expert's rows between its
            // threads: one long stream of weights per part. Short interleaved chunks measured
            // up to 1.5x slower in decode with 2 threads (the threads' streams interleave).
            let len = (p.rows.end - p.rows.start) as i64;
            let parts = split.max(1) as i64;
            let chunk = if group > 1 {
                ((len + parts - 1) / parts + group - 1) / group * group
            } else if n == 1 {
                64
            } else {
                16
            };
            if tiled.contains(&(expert, p.rows.start)) {
                continue;
            }
            let mut r = p.rows.start as i64;
            while r < p.rows.end as i64 {
                let end = (r + chunk).min(p.rows.end as i64);
                items.push((expert, r..end, p.copy, p.node));
                r = end;
            }
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_this_groups_rows_once_and_skip_tiled_pieces() {
        let piece = |expert, rows: std::ops::Range<u64>, node| Piece { expert, rows, node, copy: node as usize };
        let by_expert = vec![
            vec![piece(0, 0..100, 0), piece(0, 100..200, 1)],
            vec![piece(1, 0..100, 0), piece(1, 100..200, 1)],
            vec![piece(2, 0..100, 0), piece(2, 100..200, 1)],
        ];
        // expert 1 not routed; expert 2 has 5 rows (16-row chunks), expert 0 one (64-row chunks)
        let routed = |e: usize| [1, 0, 5][e];
        let on0 = |p: &&Piece| p.node == 0;
        let items = chunks(&by_expert, routed, &on0, &[], 1, 0);
        let rows: Vec<(usize, i64, i64)> = items.iter().map(|(e, r, _, _)| (*e, r.start, r.end)).collect();
        assert_eq!(rows[..2], [(0, 0, 64), (0, 64, 100)]);
        assert_eq!(rows[2..], [(2, 0, 16), (2, 16, 32), (2, 32, 48), (2, 48, 64), (2, 64, 80), (2, 80, 96), (2, 96, 100)]);
        assert!(items.iter().all(|(_, _, copy, node)| *copy == 0 && *node == 0));
        let skip = chunks(&by_expert, routed, &on0, &[(2, 0)], 1, 0);
        assert_eq!(skip.len(), 2);
    }

    #[test]
    fn repacked_chunks_are_one_contiguous_part_per_thread_in_whole_groups() {
        let piece = |expert, rows: std::ops::Range<u64>, node| Piece { expert, rows, node, copy: 0 };
        let by_expert = vec![vec![piece(0, 0..768, 0)], vec![piece(1, 0..384, 0), piece(1, 384..768, 1)], vec![piece(2, 0..104, 0)]];
        let routed = |_: usize| 3;
        let on0 = |p: &&Piece| p.node == 0;
        let rows = |items: Vec<(usize, std::ops::Range<i64>, usize, u32)>| {
            items.iter().map(|(e, r, _, _)| (*e, r.start, r.end)).collect::<Vec<_>>()
        };
        // 3 threads: 768 rows in parts of 256, 384 in parts of 128, 104 in parts of 40 (35 rounded up to 8-row groups)
        assert_eq!(
            rows(chunks(&by_expert, routed, &on0, &[], 8, 3)),
            [(0, 0, 256), (0, 256, 512), (0, 512, 768), (1, 0, 128), (1, 128, 256), (1, 256, 384), (2, 0, 40), (2, 40, 80), (2, 80, 104)]
        );
        for (_, r, _, _) in chunks(&by_expert, routed, &on0, &[], 8, 5) {
            assert!(r.start % 8 == 0 && (r.end % 8 == 0 || r.end == 104), "{r:?}");
        }
    }
}
