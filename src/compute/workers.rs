//! Which node each of ggml-cpu's worker threads works for, and who computes what: pure
//! functions of the machine, the CPUs a thread may use and the roster of thread nodes.
//!
//! Two rules shape the layout:
//! - numa-moe never widens what llama.cpp set: a worker is only ever narrowed to the CPUs of
//!   one node *inside* the set ggml's threadpool gave it (`--cpu-mask`, `--cpu-range`,
//!   `--cpu-strict`, taskset, cgroups), and is left alone when that set lies on one node.
//! - a worker's node depends on its index only, never on the op's thread count: the nodes
//!   are dealt out by [`crate::placement::worker_sequence`] (one per node first, then by
//!   cores), so the threads 0..n of any n are spread evenly, and switching between
//!   llama.cpp's n_threads and n_threads_batch moves no thread.

use std::collections::BTreeMap;

use crate::placement::{plan_workers, worker_sequence};
use crate::topology::{NumaNode, Topology};

/// The node worker `ith` works for among `nodes` (id, weight).
pub fn node_of_worker(nodes: &[(u32, u64)], ith: usize) -> Option<u32> {
    let weights: Vec<u64> = nodes.iter().map(|n| n.1).collect();
    worker_sequence(&weights, ith + 1).last().map(|&i| nodes[i].0)
}

/// The node of worker `ith` on a described machine: its slot in [`plan_workers`].
pub fn described_node(topo: &Topology, ith: usize) -> u32 {
    plan_workers(topo, ith + 1).last().map_or_else(|| topo.node_ids()[0], |w| w.node)
}

/// Where a worker thread on the host should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinPlan {
    /// Its CPU set lies on one node (or on none the machine knows): leave its affinity.
    Leave,
    /// Narrow it to `cpus`, the CPUs of `node` inside its set.
    Pin { node: u32, cpus: Vec<u32> },
}

/// The pinning of worker `ith` whose CPU set is `allowed` (sorted OS indices).
pub fn pin_plan(nodes: &[NumaNode], allowed: &[u32], ith: usize) -> PinPlan {
    let mut candidates = Vec::new();
    for n in nodes {
        let cpus: Vec<_> = n.cpus.iter().filter(|c| allowed.binary_search(&c.os).is_ok()).collect();
        if cpus.is_empty() {
            continue;
        }
        let mut cores: Vec<u32> = cpus.iter().map(|c| c.core).collect();
        cores.sort_unstable();
        cores.dedup();
        candidates.push((n.id, cores.len() as u64, cpus.iter().map(|c| c.os).collect::<Vec<u32>>()));
    }
    if candidates.len() <= 1 {
        return PinPlan::Leave;
    }
    let weights: Vec<(u32, u64)> = candidates.iter().map(|c| (c.0, c.1)).collect();
    match node_of_worker(&weights, ith) {
        Some(node) => {
            let cpus = candidates.into_iter().find(|c| c.0 == node).map(|c| c.2).unwrap_or_default();
            PinPlan::Pin { node, cpus }
        }
        None => PinPlan::Leave,
    }
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

impl Assignment {
    /// Thread `ith`'s group, its rank in it, the group's size and the group's index among
    /// the groups (its claim counter). Total: every thread of the roster is in a group.
    pub fn of_thread(&self, ith: usize) -> (u32, usize, usize, usize) {
        let group = self.group_of_thread[ith];
        let size = self.group_size.get(&group).copied().unwrap_or(1);
        let slot = self.group_size.range(..group).count();
        (group, self.rank[ith], size, slot)
    }
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
    // A node no thread joined goes to the nearest group; among equally near groups, to the
    // one with the fewest nodes per thread so far (4 described nodes and 2 threads: each
    // thread takes two nodes' pieces, not one thread three and the other one).
    let mut load: BTreeMap<u32, usize> = groups.iter().map(|&g| (g, usize::from(piece_nodes.contains(&g)))).collect();
    let mut group_of_node = BTreeMap::new();
    for &p in piece_nodes {
        let g = if groups.contains(&p) {
            Some(p)
        } else {
            let best = groups.iter().map(|&g| topo.distance(p, g)).min();
            groups.iter().copied().filter(|&g| Some(topo.distance(p, g)) == best).min_by(|&a, &b| {
                // (load + 1) / threads, compared without division; ties to the lower id
                let (la, lb) = (load[&a] + 1, load[&b] + 1);
                (la * group_size[&b]).cmp(&(lb * group_size[&a])).then(a.cmp(&b))
            })
        };
        if let Some(g) = g {
            if !groups.contains(&p) {
                *load.entry(g).or_default() += 1;
            }
            group_of_node.insert(p, g);
        }
    }
    Assignment { group_of_thread, rank, group_size, group_of_node }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Cpu, Source};

    #[test]
    fn every_prefix_of_the_sequence_is_balanced() {
        for weights in [vec![1u64, 1], vec![3, 1], vec![8, 8, 8, 8], vec![5, 3, 2], vec![1; 80]] {
            let total: u64 = weights.iter().sum();
            let seq = worker_sequence(&weights, 300);
            let mut taken = vec![0u64; weights.len()];
            for (k, &i) in seq.iter().enumerate() {
                taken[i] += 1;
                let n = (k + 1) as u64;
                for (j, &w) in weights.iter().enumerate() {
                    let share = (w * n) as f64 / total as f64;
                    assert!((taken[j] as f64 - share).abs() < 1.0 + 1e-9, "weights {weights:?} prefix {n}: {taken:?}");
                }
            }
        }
    }

    #[test]
    fn every_node_gets_a_worker_when_there_are_enough() {
        // 3 cores against 1: with 2 threads the small node still computes its own pieces
        assert_eq!(worker_sequence(&[3, 1], 2), vec![0, 1]);
        assert_eq!(worker_sequence(&[1, 3], 2), vec![1, 0]);
        let seq = worker_sequence(&[6, 1, 1], 8);
        assert_eq!(seq[..3].iter().copied().collect::<std::collections::BTreeSet<_>>().len(), 3);
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 6);
        assert!(worker_sequence(&[0, 0], 3).is_empty());
    }

    #[test]
    fn a_workers_node_does_not_depend_on_the_thread_count() {
        let topo = Topology::uniform(2, 4, 1);
        // decode with 8 threads and batch with 3: threads 0..3 keep their nodes, and 3
        // threads still use both nodes
        let eight: Vec<u32> = (0..8).map(|i| described_node(&topo, i)).collect();
        assert_eq!(eight, vec![0, 1, 0, 1, 0, 1, 0, 1]);
        let three: Vec<u32> = (0..3).map(|i| described_node(&topo, i)).collect();
        assert_eq!(three[..], eight[..3]);
    }

    fn node(id: u32, cpus: &[u32]) -> NumaNode {
        NumaNode {
            id,
            cpus: cpus.iter().map(|&os| Cpu { os, core: os, smt: 0 }).collect(),
            total_bytes: 1 << 30,
            free_bytes: None,
            mem_allowed: true,
        }
    }

    #[test]
    fn pinning_never_widens_the_cpu_set_it_was_given() {
        let nodes = vec![node(0, &[0, 1, 2, 3]), node(1, &[4, 5, 6, 7])];
        // the whole machine: alternate nodes, each worker on its node's CPUs
        assert_eq!(pin_plan(&nodes, &[0, 1, 2, 3, 4, 5, 6, 7], 1), PinPlan::Pin { node: 1, cpus: vec![4, 5, 6, 7] });
        // --cpu-range 2-5: only CPUs 2,3 and 4,5
        assert_eq!(pin_plan(&nodes, &[2, 3, 4, 5], 2), PinPlan::Pin { node: 0, cpus: vec![2, 3] });
        assert_eq!(pin_plan(&nodes, &[2, 3, 4, 5], 3), PinPlan::Pin { node: 1, cpus: vec![4, 5] });
        // a mask on one node (or --cpu-strict's single CPU): left as it is
        assert_eq!(pin_plan(&nodes, &[5, 6], 1), PinPlan::Leave);
        assert_eq!(pin_plan(&nodes, &[6], 3), PinPlan::Leave);
        // CPUs the machine description does not know
        assert_eq!(pin_plan(&nodes, &[100, 101], 1), PinPlan::Leave);
        // uneven masks: three CPUs of node 0, one of node 1 -> weighted 3:1
        let seq: Vec<PinPlan> = (0..4).map(|i| pin_plan(&nodes, &[0, 1, 2, 7], i)).collect();
        let on1 = seq.iter().filter(|p| matches!(p, PinPlan::Pin { node: 1, .. })).count();
        assert_eq!(on1, 1);
        for p in &seq {
            if let PinPlan::Pin { cpus, .. } = p {
                assert!(cpus.iter().all(|c| [0, 1, 2, 7].contains(c)));
            }
        }
    }

    #[test]
    fn threads_group_by_node_and_rank_within() {
        let topo = Topology::uniform(2, 2, 1);
        let a = assign(&topo, &[0, 1, 0, 1, 1], &[0, 1]);
        assert_eq!(a.group_of_thread, vec![0, 1, 0, 1, 1]);
        assert_eq!(a.rank, vec![0, 0, 1, 1, 2]);
        assert_eq!(a.group_size[&0], 2);
        assert_eq!(a.group_size[&1], 3);
        assert_eq!(a.group_of_node[&1], 1);
        assert_eq!(a.of_thread(4), (1, 2, 3, 1));
        assert_eq!(a.of_thread(2), (0, 1, 2, 0));
    }

    #[test]
    fn more_groups_than_any_fixed_limit() {
        // 80 nodes, one thread each: 80 groups with distinct claim slots 0..80
        let topo = Topology::uniform(80, 1, 1);
        let roster: Vec<u32> = (0..80).collect();
        let a = assign(&topo, &roster, &roster);
        let slots: Vec<usize> = (0..80).map(|i| a.of_thread(i).3).collect();
        assert_eq!(slots, (0..80).collect::<Vec<_>>());
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
    fn nodes_without_threads_are_shared_among_equally_near_groups() {
        // 2 packages of 2 nodes (described "package:2 numa:2"), 2 threads on nodes 0 and 2:
        // each thread computes its own node's pieces and its package neighbour's
        let topo = Topology::from_synthetic("package:2 numa:2 core:1 pu:1").unwrap();
        let a = assign(&topo, &[0, 2], &[0, 1, 2, 3]);
        assert_eq!((per_group_of(&a, 0), per_group_of(&a, 2)), (2, 2), "{:?}", a.group_of_node);
        // threads on nodes 0 and 1 (same package): nodes 2 and 3 are equally far from both
        // groups and are dealt one to each, never both to the lower id
        let a = assign(&topo, &[0, 1], &[0, 1, 2, 3]);
        assert_eq!((per_group_of(&a, 0), per_group_of(&a, 1)), (2, 2), "{:?}", a.group_of_node);
        // a group with more threads takes more of the orphans: 3 threads on 0, 1 on 1
        let a = assign(&topo, &[0, 0, 0, 1], &[0, 1, 2, 3]);
        assert_eq!((per_group_of(&a, 0), per_group_of(&a, 1)), (3, 1), "{:?}", a.group_of_node);
    }

    fn per_group_of(a: &Assignment, g: u32) -> usize {
        a.group_of_node.values().filter(|&&x| x == g).count()
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
}
