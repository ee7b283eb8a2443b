//! The routed mul_mat_id on node-bound workers.
//!
//! Runs on ggml-cpu's own worker threads (ith of nth): no second pool, no extra graph
//! splits. Each op has two phases separated by ggml's barrier:
//!
//! A. every thread finds the node it runs on (pinning itself first, once, unless llama.cpp's
//!    own --numa or NUMA_MOE_PIN=off says otherwise) and writes it to the roster; converts
//!    its share of the activations to vec_dot_type; thread 0 groups routed rows by expert.
//! B. threads are grouped by node ([`assign`]); each group computes the (expert, row range)
//!    pieces placed on its node, reading that node's copy, split among its threads.
//!
//! Pieces of a node with no threads (a CPU-less node, a node outside taskset, fewer threads
//! than nodes) go to the nearest group, so every (expert, row) is computed exactly once.
//! Kernels are ggml-cpu's own (vec_dot, and its tiled K-quant path where stock takes it),
//! on the same rows and activations, so results are bit-identical to stock.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::buffer::{NumaBuffer, PlacedTensor};
use crate::config::{PinMode, Runtime};
use crate::ggml::{Api, MmidOp, NumaMoeComputeParams, Work};
use crate::placement::{plan_workers, Piece};
use crate::topology::Topology;

/// MUL_MAT_ID ops over placed weights: computed here, or left to ggml-cpu's stock kernel.
pub static OPS_COMPUTED: AtomicU64 = AtomicU64::new(0);
pub static OPS_DECLINED: AtomicU64 = AtomicU64::new(0);
/// Pinned worker threads checked against their planned node (each op), and those found
/// running elsewhere.
pub static WORKERS_CHECKED: AtomicU64 = AtomicU64::new(0);
pub static WORKERS_OFF_NODE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The (thread count, node) this thread last pinned itself for.
    static PINNED: Cell<Option<(usize, u32)>> = const { Cell::new(None) };
}

/// Who computes what, from the roster of thread nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The group (a node id) of each thread.
    pub group_of_thread: Vec<u32>,
    /// Each thread's rank inside its group.
    pub rank: Vec<usize>,
    /// Threads per group.
    pub group_size: BTreeMap<u32, usize>,
    /// For each node holding pieces, the group that computes them.
    pub group_of_node: BTreeMap<u32, u32>,
}

/// Groups threads by node: a thread on a node that holds pieces computes there; a thread
/// on another node (memory-less, or holding nothing of this tensor) joins the nearest node
/// that does. Pieces of a node that no thread joined go to the nearest group.
pub fn assign(topo: &Topology, roster: &[u32], piece_nodes: &[u32]) -> Assignment {
    let group_of_thread: Vec<u32> = roster
        .iter()
        .map(|&n| if piece_nodes.contains(&n) || piece_nodes.is_empty() { n } else { topo.nearest(n, piece_nodes).unwrap_or(n) })
        .collect();
    let mut group_size = BTreeMap::new();
    let mut rank = Vec::with_capacity(roster.len());
    for g in &group_of_thread {
        let c = group_size.entry(*g).or_insert(0usize);
        rank.push(*c);
        *c += 1;
    }
    let groups: Vec<u32> = group_size.keys().copied().collect();
    let group_of_node =
        piece_nodes.iter().map(|&p| (p, if groups.contains(&p) { p } else { topo.nearest(p, &groups).unwrap_or(groups[0]) })).collect();
    Assignment { group_of_thread, rank, group_size, group_of_node }
}

/// The node this thread works for: on a synthetic topology its planned slot (so multi-node
/// plans can be exercised on any machine); on the host the node it runs on, after pinning
/// it to its planned node's CPUs when that is ours to do.
fn thread_node(rt: &Runtime, api: &Api, ith: usize, nth: usize) -> u32 {
    let topo = &rt.topology;
    if !topo.is_host() {
        return plan_workers(topo, nth).get(ith).map_or(0, |s| s.node);
    }
    // The main thread (ith 0) is llama.cpp's own thread: pinning it would outlive the op and
    // be inherited by threads it starts later, so it only reports where it runs.
    let ours = ith != 0 && topo.compute_nodes().len() > 1 && rt.pin() == PinMode::Auto && !api.is_numa();
    let mut planned = None;
    if ours {
        PINNED.with(|p| {
            if p.get().map(|(n, _)| n) != Some(nth) {
                if let Some(slot) = plan_workers(topo, nth).get(ith) {
                    let cpus: Vec<u32> = topo.node(slot.node).map(|n| n.cpus.iter().map(|c| c.os).collect()).unwrap_or_default();
                    if let Err(e) = crate::sys::set_thread_affinity(&cpus) {
                        crate::log::warn_once(
                            rt,
                            "pin",
                            &format!("numa-moe: warning: cannot pin worker threads ({e}); assigning work by the node each thread runs on"),
                        );
                    }
                    p.set(Some((nth, slot.node)));
                }
            }
            planned = p.get().map(|(_, n)| n);
        });
    }
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

/// Work buffer bytes for the op with `n_threads` threads.
pub fn work_size(op: &MmidOp, n_threads: usize) -> usize {
    op.layout(n_threads).total
}

/// Computes the op on this thread. Returns false (on every thread alike) when ggml gave too
/// little work memory; ggml-cpu's stock kernel then runs on the same memory.
pub fn compute(rt: &Runtime, api: &Api, op: &MmidOp, buf: &NumaBuffer, placed: &PlacedTensor, params: &NumaMoeComputeParams) -> bool {
    let (ith, nth) = (params.ith as usize, params.nth as usize);
    let Some(work) = Work::new(params, op.layout(nth)) else {
        if ith == 0 {
            OPS_DECLINED.fetch_add(1, Ordering::Relaxed);
        }
        return false;
    };
    if ith == 0 {
        OPS_COMPUTED.fetch_add(1, Ordering::Relaxed);
    }

    // Phase A.
    if ith == 0 {
        buf.report_once(rt);
        work.reset_claims();
    }
    buf.sync_replicas(placed);
    work.set_roster(thread_node(rt, api, ith, nth));
    op.convert_src1(&work);
    if ith == 0 {
        op.group_rows(&work);
    }
    api.barrier(params);

    // Phase B.
    if ith == 0 {
        buf.verify_once(rt);
    }
    let a = assign(&rt.topology, &work.roster(), &placed.piece_nodes);
    let group = a.group_of_thread[ith];
    let (rank, size) = (a.rank[ith], a.group_size[&group]);
    let slot = a.group_size.keys().position(|&g| g == group).expect("this thread's group");
    let primary = op.src0.data_ptr() as *const u8;
    let mine = |p: &&Piece| a.group_of_node.get(&p.node) == Some(&group);

    // Experts stock computes with ggml's tiled K-quant kernel are computed the same way, each
    // piece by its whole group (the kernel partitions its rows by rank itself).
    let mut tiled = Vec::new();
    for (expert, pieces) in placed.by_expert.iter().enumerate() {
        if op.routed(&work, expert) == 0 {
            continue;
        }
        for p in pieces.iter().filter(mine) {
            let base = placed.copy_base(primary, p.copy);
            if op.tiled(&work, base, expert, p.rows.start as i64..p.rows.end as i64, rank, size) {
                tiled.push((expert, p.rows.start));
            }
        }
    }
    // The rest in chunks the group's threads claim one at a time from the group's counter:
    // a thread that runs slower (a busy core, an SMT sibling) simply claims fewer, and no
    // thread leaves its node's pieces. Chunks as stock's: 64 rows for one token, else 16.
    let items = chunks(&placed.by_expert, |e| op.routed(&work, e), &mine, &tiled);
    loop {
        let i = work.claim(slot);
        let Some(&(expert, ref rows, copy)) = items.get(i) else { break };
        op.dot_rows(&work, placed.copy_base(primary, copy), expert, rows.clone());
    }
    true
}

/// This group's chunks of work, in the same order on every thread of the group.
fn chunks(
    by_expert: &[Vec<Piece>],
    routed: impl Fn(usize) -> usize,
    mine: &dyn Fn(&&Piece) -> bool,
    tiled: &[(usize, u64)],
) -> Vec<(usize, Range<i64>, usize)> {
    let mut items = Vec::new();
    for (expert, pieces) in by_expert.iter().enumerate() {
        let n = routed(expert);
        if n == 0 {
            continue;
        }
        let chunk = if n == 1 { 64 } else { 16 };
        for p in pieces.iter().filter(mine) {
            if tiled.contains(&(expert, p.rows.start)) {
                continue;
            }
            let mut r = p.rows.start as i64;
            while r < p.rows.end as i64 {
                let end = (r + chunk).min(p.rows.end as i64);
                items.push((expert, r..end, p.copy));
                r = end;
            }
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Source;

    #[test]
    fn threads_group_by_node_and_rank_within() {
        let topo = Topology::uniform(2, 2, 1);
        let a = assign(&topo, &[0, 1, 0, 1, 1], &[0, 1]);
        assert_eq!(a.group_of_thread, vec![0, 1, 0, 1, 1]);
        assert_eq!(a.rank, vec![0, 0, 1, 1, 2]);
        assert_eq!(a.group_size[&0], 2);
        assert_eq!(a.group_size[&1], 3);
        assert_eq!(a.group_of_node[&1], 1);
    }

    #[test]
    fn pieces_of_a_node_without_threads_go_to_the_nearest_group() {
        let nodes = Topology::uniform(3, 1, 1).nodes().to_vec();
        let d = vec![vec![10, 16, 32], vec![16, 10, 32], vec![32, 16, 10]];
        let topo = Topology::from_parts(nodes, Some(d), Source::Manual).unwrap();
        // one thread, on node 2; pieces on all three nodes
        let a = assign(&topo, &[2], &[0, 1, 2]);
        assert_eq!(a.group_of_node, [(0, 2), (1, 2), (2, 2)].into_iter().collect());
        // threads on 0 only: node 1 and 2 pieces computed by group 0
        let a = assign(&topo, &[0, 0], &[0, 1, 2]);
        assert!(a.group_of_node.values().all(|&g| g == 0));
    }

    #[test]
    fn a_thread_on_a_node_holding_nothing_joins_the_nearest_holder() {
        let nodes = Topology::uniform(3, 1, 1).nodes().to_vec();
        let d = vec![vec![10, 32, 16], vec![32, 10, 16], vec![16, 16, 10]];
        let topo = Topology::from_parts(nodes, Some(d), Source::Manual).unwrap();
        let a = assign(&topo, &[0, 2, 1], &[0, 1]);
        // node 2 (memory-less, say) is nearer to 0 (16) than... both 16: lowest id wins
        assert_eq!(a.group_of_thread, vec![0, 0, 1]);
        assert_eq!(a.rank, vec![0, 1, 0]);
    }

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
        let items = chunks(&by_expert, routed, &on0, &[]);
        let rows: Vec<(usize, i64, i64)> = items.iter().map(|(e, r, _)| (*e, r.start, r.end)).collect();
        assert_eq!(rows[..2], [(0, 0, 64), (0, 64, 100)]);
        assert_eq!(rows[2..], [(2, 0, 16), (2, 16, 32), (2, 32, 48), (2, 48, 64), (2, 64, 80), (2, 80, 96), (2, 96, 100)]);
        assert!(items.iter().all(|(_, _, copy)| *copy == 0));
        let skip = chunks(&by_expert, routed, &on0, &[(2, 0)]);
        assert_eq!(skip.len(), 2);
    }
}
