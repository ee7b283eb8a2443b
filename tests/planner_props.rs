//! Property tests of the planner and the map language, on machines built by hand.
//!
//! For every policy and random explicit maps, on random machines (1-8 nodes, uneven cores,
//! memory-less and CPU-less nodes): every byte of every expert tensor is placed exactly once
//! by the primary copy (N times over all copies under mirror), every (expert, row) is computed
//! exactly once and from a copy that holds it on the computing node, and `rows` gives nodes of
//! equal weight row counts within one unit. The parser never panics and render round-trips.

use numa_moe::expert_map::{ExpertMap, Policy, Resolved};
use numa_moe::placement::{plan_tensor, Binding, Compute, ExpertTensor, PlanOptions, TensorPlan};
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
