//! Property tests of the planner and the map language, on machines built by hand.
//!
//! For every policy and random explicit maps, on random machines (1-8 nodes, uneven cores,
//! memory-less and CPU-less nodes): every byte of every expert tensor is placed exactly once
//! by the primary copy (N times over all copies under mirror), every (expert, row) is computed
//! exactly once and from a copy that holds it on the computing node, and `rows` gives nodes of
//! equal weight row counts within one unit. The parser never panics and render round-trips.
//!
//! `balanced` ([`balanced_assignment`], LPT on nodes weighted by cores): every expert goes to
//! exactly one listed node; the busiest node's load per weight stays within the greedy bound
//! `(T + (m-1)·p) / W` (T total load, p the largest, W the weights' sum, m nodes: proved in
//! placement.rs) on any input, and within LPT's approximation ratio of the exact optimum on
//! small inputs: `4/3 - 1/(3m)` on equal weights (Graham 1969), `1 + 1/sqrt(3)` on any
//! (Kovács, "New approximation bounds for LPT scheduling", Algorithmica 2010). Its plans keep
//! the invariants above, and its copies stay within their budget.

use std::sync::Arc;

use numa_moe::expert_map::{Body, ExpertMap, Policy, Resolved};
use numa_moe::placement::{balanced_assignment, plan_tensor, Binding, Compute, ExpertTensor, PlanOptions, TensorPlan};
use numa_moe::routing::{LayerRouting, ModelSignature, RoutingProfile, SCHEMA};
use numa_moe::topology::{Cpu, NumaNode, Source, Topology};
use proptest::prelude::*;

fn machine() -> impl Strategy<Value = Topology> {
    (1usize..=8).prop_flat_map(|n| {
        proptest::collection::vec((1u32..=6, prop::bool::weighted(0.15), prop::bool::weighted(0.1)), n).prop_map(|spec| {
            let mut next_cpu = 0;
            let mut nodes: Vec<NumaNode> = spec
                .iter()
                .enumerate()
                .map(|(i, &(cores, memless, cpuless))| {
                    let cpus = if cpuless {
                        vec![]
                    } else {
                        (0..cores)
                            .map(|_| {
                                // one CPU per core: SMT siblings do not change a plan's bytes
                                next_cpu += 1;
                                Cpu { os: next_cpu - 1, core: next_cpu - 1, smt: 0 }
                            })
                            .collect()
                    };
                    NumaNode { id: i as u32, cpus, total_bytes: if memless { 0 } else { 64 << 30 }, free_bytes: None, mem_allowed: true }
                })
                .collect();
            // at least one node that can hold and compute experts
            nodes[0].total_bytes = 64 << 30;
            if nodes[0].cpus.is_empty() {
                nodes[0].cpus.push(Cpu { os: 1000, core: 1000, smt: 0 });
            }
            Topology::from_parts(nodes, None, Source::Manual).unwrap()
        })
    })
}

fn tensor() -> impl Strategy<Value = ExpertTensor> {
    (2u32..=64, 1u64..=700, prop::sample::select(vec![4u64, 64, 144, 210, 1152, 4032, 4096, 8192, 1000])).prop_map(
        |(n_expert, rows, row_bytes)| ExpertTensor {
            name: "blk.1.ffn_down_exps.weight".into(),
            layer: Some(1),
            type_name: "q4_K".into(),
            n_expert,
            rows,
            row_bytes,
            row_group: 1,
        },
    )
}

/// An explicit map over the machine's memory nodes: random ranges, some with copies, a rest.
fn explicit_map(topo: &Topology, n_expert: u32, seed: u64) -> String {
    let mem: Vec<u32> = topo.nodes().iter().filter(|n| n.has_memory()).map(|n| n.id).collect();
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut clauses = Vec::new();
    let mut e = 0;
    while e < n_expert {
        let len = 1 + (next() % 5) as u32;
        let hi = (e + len - 1).min(n_expert - 1);
        let a = mem[(next() % mem.len() as u64) as usize];
        let mut nodes = vec![a];
        if next() % 3 == 0 {
            let b = mem[(next() % mem.len() as u64) as usize];
            if b != a {
                nodes.push(b);
            }
        }
        if next() % 4 != 0 {
            let range = if e == hi { e.to_string() } else { format!("{e}-{hi}") };
            clauses.push(format!("{range}:{}", nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("+")));
        }
        e = hi + 1;
    }
    clauses.push(format!("*:{}", mem[0]));
    clauses.join(",")
}

fn check_plan(topo: &Topology, t: &ExpertTensor, p: &TensorPlan, mirror: bool) -> Result<(), TestCaseError> {
    let bytes = t.bytes();
    // primary copy: every byte exactly once, in order, no gaps
    let mut at = 0;
    for e in &p.copies[0].extents {
        prop_assert_eq!(e.offset, at, "primary extents must tile the tensor");
        prop_assert!(e.len > 0);
        at += e.len;
    }
    prop_assert_eq!(at, bytes);
    if mirror {
        let copies: u64 = p.copies.iter().map(|c| c.extents.iter().map(|e| e.len).sum::<u64>()).sum();
        let n = p.copies.len() as u64;
        prop_assert_eq!(copies, n * bytes, "mirror: one full copy per node");
        let mut nodes: Vec<u32> = p
            .copies
            .iter()
            .map(|c| match &c.extents[0].binding {
                Binding::Node(n) => *n,
                Binding::Interleave(_) => u32::MAX,
            })
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        prop_assert_eq!(nodes.len() as u64, n, "mirror copies live on distinct nodes");
    }
    // replicas never overlap themselves
    for c in &p.copies[1..] {
        for w in c.extents.windows(2) {
            prop_assert!(w[0].offset + w[0].len <= w[1].offset);
        }
    }
    match &p.compute {
        Compute::Stock => {}
        Compute::Pieces(pieces) => {
            let mut count = vec![0u8; (t.n_expert as u64 * t.rows) as usize];
            for pc in pieces {
                prop_assert!(pc.rows.start < pc.rows.end && pc.rows.end <= t.rows);
                for r in pc.rows.clone() {
                    count[(pc.expert as u64 * t.rows + r) as usize] += 1;
                }
                // the piece's rows are held by its copy, on its node
                let first = pc.expert as u64 * t.expert_bytes() + pc.rows.start * t.row_bytes;
                let last = pc.expert as u64 * t.expert_bytes() + pc.rows.end * t.row_bytes - 1;
                for off in [first, last] {
                    let b = p.node_of_byte(pc.copy, off);
                    prop_assert_eq!(b, Some(&Binding::Node(pc.node)), "piece {:?} reads a byte its copy does not hold on its node", pc);
                }
                prop_assert!(topo.node(pc.node).is_some());
            }
            prop_assert!(count.iter().all(|&c| c == 1), "every (expert, row) computed exactly once");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn every_policy_places_every_byte_and_computes_every_row_once(topo in machine(), t in tensor()) {
        let opts = PlanOptions::default();
        for policy in [Policy::Rows, Policy::Block, Policy::RoundRobin, Policy::Mirror, Policy::Interleave, Policy::Auto] {
            let map = ExpertMap::policy(policy);
            match plan_tensor(&topo, &map, &t, &opts) {
                Ok(Some(p)) => check_plan(&topo, &t, &p, policy == Policy::Mirror)?,
                Ok(None) => prop_assert!(policy == Policy::Auto && topo.compute_nodes().len() <= 1),
                Err(e) => prop_assert!(false, "{:?} failed: {}", policy, e),
            }
        }
    }

    #[test]
    fn explicit_maps_place_and_compute_exactly(topo in machine(), t in tensor(), seed in any::<u64>()) {
        let text = explicit_map(&topo, t.n_expert, seed);
        let map = ExpertMap::parse(&text).unwrap();
        prop_assert!(map.check_nodes(&topo).is_ok());
        let p = plan_tensor(&topo, &map, &t, &PlanOptions::default()).unwrap().unwrap();
        check_plan(&topo, &t, &p, false)?;
        // copies: a replica for each extra holder of an expert
        if let Resolved::Explicit { holders } = map.resolve(t.layer, t.n_expert, &t.name).unwrap() {
            let extra: u64 = holders.iter().map(|h| h.len() as u64 - 1).sum();
            let replica_bytes: u64 = p.copies[1..].iter().flat_map(|c| &c.extents).map(|e| e.len).sum();
            prop_assert_eq!(replica_bytes, extra * t.expert_bytes());
        }
    }

    #[test]
    fn rows_are_balanced_within_one_unit(nodes in 2u32..=8, cores in 1u32..=8, t in tensor()) {
        let topo = Topology::uniform(nodes, cores, 64);
        let p = plan_tensor(&topo, &ExpertMap::policy(Policy::Rows), &t, &PlanOptions::default()).unwrap().unwrap();
        let mut per_node = vec![0u64; nodes as usize];
        for pc in p.pieces() {
            if pc.expert == 0 {
                per_node[pc.node as usize] += pc.rows.end - pc.rows.start;
            }
        }
        let unit = {
            let g = gcd(4096, t.row_bytes);
            let mut u = 4096 / g;
            while u > 1 && u * 32 * nodes as u64 > t.rows { u /= 2; }
            u.max(1)
        };
        let (min, max) = (*per_node.iter().min().unwrap(), *per_node.iter().max().unwrap());
        prop_assert!(max - min <= unit, "rows per node {:?} (unit {})", per_node, unit);
    }

    #[test]
    fn the_parser_never_panics(s in ".{0,40}") {
        let _ = ExpertMap::parse(&s);
    }

    #[test]
    fn the_parser_never_panics_on_map_alphabet(s in "[0-9:,;+*@=blk.a-z -]{0,40}") {
        if let Ok(m) = ExpertMap::parse(&s) {
            let r = m.render();
            let again = ExpertMap::parse(&r).unwrap();
            prop_assert_eq!(again.render(), r);
        }
    }

    #[test]
    fn render_round_trips(seed in any::<u64>(), n in 2u32..64, nodes in 1u32..6) {
        let topo = Topology::uniform(nodes, 2, 8);
        let text = explicit_map(&topo, n, seed);
        let m = ExpertMap::parse(&text).unwrap();
        prop_assert_eq!(m.render(), text.clone());
        prop_assert_eq!(ExpertMap::parse(&m.render()).unwrap().render(), text);
    }
}

/// Load per weight of every node under `assign`, as (load, weight) pairs to compare exactly.
fn node_loads(loads: &[u64], nodes: &[(u32, u64)], assign: &[u32]) -> Vec<(u128, u128)> {
    nodes.iter().map(|&(id, w)| (loads.iter().zip(assign).filter(|(_, &n)| n == id).map(|(&l, _)| l as u128).sum(), w as u128)).collect()
}

/// The busiest node's load per weight.
fn makespan(per_node: &[(u128, u128)]) -> f64 {
    per_node.iter().map(|&(l, w)| l as f64 / w as f64).fold(0.0, f64::max)
}

/// The best makespan over every assignment (small inputs only: m^n of them).
fn optimum(loads: &[u64], nodes: &[(u32, u64)]) -> f64 {
    let m = nodes.len();
    let mut best = f64::INFINITY;
    let mut assign = vec![0usize; loads.len()];
    loop {
        let ids: Vec<u32> = assign.iter().map(|&i| nodes[i].0).collect();
        best = best.min(makespan(&node_loads(loads, nodes, &ids)));
        let mut i = 0;
        while i < assign.len() && assign[i] + 1 == m {
            assign[i] = 0;
            i += 1;
        }
        if i == assign.len() {
            return best;
        }
        assign[i] += 1;
    }
}

/// A one-layer profile of `tokens`, recorded on layer `layer`.
fn profile(tokens: Vec<u64>, layer: u32) -> Arc<RoutingProfile> {
    let model = ModelSignature { n_expert: tokens.len() as u32, expert_layers: vec![layer] };
    Arc::new(RoutingProfile {
        schema: SCHEMA,
        model,
        map: String::new(),
        layers: vec![LayerRouting { layer, tokens, recent: vec![] }],
        nodes: vec![],
    })
}

/// `text` (a `balanced` map) with `p` loaded, as config loads it when the map is set.
fn with_profile(text: &str, p: &Arc<RoutingProfile>) -> ExpertMap {
    let mut m = ExpertMap::parse(text).unwrap();
    for r in &mut m.rules {
        if let Body::Balanced { balanced, .. } = &mut r.body {
            balanced.profile = Some(p.clone());
            balanced.origin = "profile.json".into();
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn lpt_places_every_expert_once_within_the_greedy_bound(
        loads in proptest::collection::vec(prop_oneof![Just(0u64), 0u64..1000, 0u64..=u32::MAX as u64], 0..=256),
        weights in proptest::collection::vec(1u64..=64, 1..=8),
        equal in any::<bool>(),
    ) {
        // node ids out of order and sparse: ties go to the lower id, not the earlier entry
        let nodes: Vec<(u32, u64)> =
            weights.iter().enumerate().map(|(i, &w)| ((7 * i as u32 + 3) % 17, if equal { 1 } else { w })).collect();
        let assign = balanced_assignment(&loads, &nodes);
        prop_assert_eq!(assign.len(), loads.len());
        prop_assert!(assign.iter().all(|n| nodes.iter().any(|&(id, _)| id == *n)), "{:?}", assign);
        let per_node = node_loads(&loads, &nodes, &assign);
        let total: u128 = loads.iter().map(|&l| l as u128).sum();
        prop_assert_eq!(per_node.iter().map(|p| p.0).sum::<u128>(), total, "every load counted once");
        let (m, p) = (nodes.len() as u128, loads.iter().copied().max().unwrap_or(0) as u128);
        let sum_w: u128 = nodes.iter().map(|&(_, w)| w as u128).sum();
        for &(l, w) in &per_node {
            // l / w <= (T + (m-1) p) / W
            prop_assert!(l * sum_w <= (total + (m - 1) * p) * w, "node load {} weight {} over the bound: {:?}", l, w, per_node);
        }
    }

    #[test]
    fn lpt_is_within_its_ratio_of_the_optimum(
        loads in proptest::collection::vec(0u64..100, 1..=7),
        weights in proptest::collection::vec(1u64..=4, 1..=3),
        equal in any::<bool>(),
    ) {
        let nodes: Vec<(u32, u64)> = weights.iter().enumerate().map(|(i, &w)| (i as u32, if equal { 1 } else { w })).collect();
        let m = nodes.len() as f64;
        let ratio = if equal { 4.0 / 3.0 - 1.0 / (3.0 * m) } else { 1.0 + 1.0 / 3f64.sqrt() };
        let lpt = makespan(&node_loads(&loads, &nodes, &balanced_assignment(&loads, &nodes)));
        let opt = optimum(&loads, &nodes);
        prop_assert!(lpt <= ratio * opt * (1.0 + 1e-12), "LPT {} vs optimum {} (ratio {})", lpt, opt, ratio);
    }

    #[test]
    fn balanced_plans_place_whole_experts_and_compute_every_row_once(
        topo in machine(),
        t in tensor(),
        seed in any::<u64>(),
        percent in prop_oneof![Just(0u32), 0u32..=150],
        same_layer in any::<bool>(),
    ) {
        let mut s = seed | 1;
        let tokens: Vec<u64> = (0..t.n_expert).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; if s % 4 == 0 { 0 } else { s % 5000 } }).collect();
        // a layer the profile lacks plans from the profile's totals
        let p = profile(tokens, if same_layer { t.layer.unwrap() } else { 40 });
        let map = with_profile(&format!("balanced:profile.json+copies={percent}%"), &p);
        let Some(plan) = plan_tensor(&topo, &map, &t, &PlanOptions::default()).unwrap() else {
            return Err(TestCaseError::fail("balanced always plans"));
        };
        check_plan(&topo, &t, &plan, false)?;
        let nodes = topo.compute_nodes();
        // copies: every node holds a whole copy of a copied expert, within the budget
        let replica_bytes: u64 = plan.copies[1..].iter().flat_map(|c| &c.extents).map(|e| e.len).sum();
        prop_assert!(replica_bytes as u128 * 100 <= t.bytes() as u128 * percent as u128, "{} bytes of copies", replica_bytes);
        prop_assert_eq!(replica_bytes % (t.expert_bytes() * (nodes.len() as u64 - 1).max(1)), 0);
        for e in 0..t.n_expert {
            let pieces: Vec<_> = plan.pieces().iter().filter(|x| x.expert == e).collect();
            let copied = pieces.len() > 1;
            if !copied {
                prop_assert_eq!(&pieces[0].rows, &(0..t.rows), "expert {} is whole on one node", e);
            }
            prop_assert!(pieces.iter().all(|x| nodes.contains(&x.node)));
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[test]
fn eight_node_epyc_plan_is_balanced() {
    let topo = Topology::from_synthetic("package:2 numa:4 core:12 pu:2").unwrap();
    // DeepSeek-V3 down projection: 256 experts of 7168 rows x 2048 columns, q4_K
    let t = ExpertTensor {
        name: "blk.3.ffn_down_exps.weight".into(),
        layer: Some(3),
        type_name: "q4_K".into(),
        n_expert: 256,
        rows: 7168,
        row_bytes: 2048 / 256 * 144,
        row_group: 1,
    };
    let p = plan_tensor(&topo, &ExpertMap::policy(Policy::Rows), &t, &PlanOptions::default()).unwrap().unwrap();
    let loads = p.bytes_per_node();
    assert_eq!(loads.len(), 8);
    assert!(loads.iter().all(|&(_, b)| b == t.bytes() / 8), "{loads:?}");
}

/// The described machines shipped in tests/topologies load, and `auto` plans on the nodes
/// that have both memory and CPUs, evenly.
#[test]
fn shipped_topologies_load_and_plan() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/topologies");
    let cases = [("xeon-2s.xml", 2, 2), ("epyc-2s-nps4.xml", 8, 8), ("xeon-6980p-snc3.xml", 6, 6), ("memoryless-node.xml", 3, 2)];
    let t = ExpertTensor {
        name: "blk.0.ffn_up_exps.weight".into(),
        layer: Some(0),
        type_name: "q4_K".into(),
        n_expert: 128,
        rows: 768,
        row_bytes: 1152,
        row_group: 1,
    };
    for (file, nodes, compute) in cases {
        let topo = Topology::from_xml(&dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(topo.nodes().len(), nodes, "{file}");
        assert_eq!(topo.compute_nodes().len(), compute, "{file}");
        assert!(topo.nodes().iter().all(|n| topo.distance(n.id, n.id) == 10), "{file}");
        let p = plan_tensor(&topo, &ExpertMap::policy(Policy::Auto), &t, &PlanOptions::default()).unwrap().unwrap();
        let loads = p.bytes_per_node();
        assert_eq!(loads.len(), compute, "{file}: {loads:?}");
        let (min, max) = (loads.iter().map(|l| l.1).min().unwrap(), loads.iter().map(|l| l.1).max().unwrap());
        assert!(max - min <= 32 * 1152 * 128, "{file}: {loads:?}");
    }
    let memless = Topology::from_xml(&dir.join("memoryless-node.xml")).unwrap();
    assert!(!memless.node(2).unwrap().has_memory() && memless.node(2).unwrap().has_cpus());
    let err = ExpertMap::parse("0-63:2,*:0").unwrap().check_nodes(&memless).unwrap_err().to_string();
    assert!(err.contains("node 2 has no memory"), "{err}");
}
