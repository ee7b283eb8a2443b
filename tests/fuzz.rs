//! Fuzz-style property tests of everything numa-moe reads from users and files: the expert
//! map (through the library and through `numa_moe_map_check`) and GGUF tensor tables.
//!
//! Every case must come back with a result or an error, never a panic, an abort or a hang:
//! each is timed against a generous bound ([`CASE_LIMIT`]). Inputs lean on the edges: numbers
//! at and past every limit (1023/1024 experts, u32 and u64 wrap points), maps of thousands of
//! rules, and GGUF files made valid by `gguf::write_table_only` then mutated byte by byte,
//! count by count and dimension by dimension. Case counts keep the whole file to a few seconds
//! in release on a small machine.

use std::ffi::CString;
use std::time::{Duration, Instant};

use numa_moe::expert_map::{ExpertMap, MAX_EXPERTS};
use numa_moe::ffi::api::numa_moe_map_check;
use numa_moe::ffi::NumaMoeResult;
use numa_moe::gguf::{self, GgufFile, GGML_TYPES};
use numa_moe::placement::{check_budget, node_loads, plan_tensor, plan_workers, PlanOptions};
use numa_moe::topology::Topology;
use proptest::prelude::*;

/// Longest any one case may take. Real cases take microseconds to milliseconds; the failures
/// this guards against took seconds to minutes, or never returned.
const CASE_LIMIT: Duration = Duration::from_secs(1);

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, max_shrink_iters: 200, ..ProptestConfig::default() }
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let t0 = Instant::now();
    let v = f();
    let took = t0.elapsed();
    prop_assert!(took < CASE_LIMIT, "{what} took {took:?}");
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Expert maps

/// Numbers around every limit the map language has, and some ordinary ones.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u32..20).prop_map(|n| n.to_string()),
        1 => any::<u32>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            "1023", "1024", "1025", "511", "512", "4294967294", "4294967295", "4294967296",
            "18446744073709551615", "18446744073709551616", "000000000000000000000000007", "",
        ])
        .prop_map(String::from),
    ]
}

/// Pieces of the grammar and some that are not in it.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => number(),
        8 => prop::sample::select(vec![
            "-", ",", ";", ":", "+", "*", "@", "=", "blk.", " ", "rows", "block", "mirror", "off",
            "auto", "round-robin", "interleave", "rowz", "blk", ".", "\t", "é", "\u{0}", "-1",
        ])
        .prop_map(String::from),
        1 => any::<char>().prop_map(String::from),
    ]
}

fn map_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..40).prop_map(|t| t.concat())
}

/// Checks a map the ways numa-moe does: parse, render round trip, nodes, every rule against
/// `n_expert`, and a resolve for some layers.
fn exercise_map(text: &str, n_expert: u32, topo: &Topology) -> Result<(), TestCaseError> {
    timed(text, || {
        if let Ok(m) = ExpertMap::parse(text) {
            let r = ExpertMap::parse(&m.render()).expect("a rendered map parses");
            assert_eq!(r.render(), m.render());
            let _ = m.check_nodes(topo);
            let _ = m.check_experts(n_expert);
            for layer in [None, Some(0), Some(1), Some(511), Some(u32::MAX)] {
                let _ = m.resolve(layer, n_expert, "blk.0.ffn_up_exps.weight");
            }
        }
    })
}

fn n_expert() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..=16, Just(MAX_EXPERTS), Just(MAX_EXPERTS + 1), Just(0), Just(u32::MAX), any::<u32>()]
}

proptest! {
    #![proptest_config(config(25_000))]

    #[test]
    fn any_map_text_is_a_result_or_an_error(text in map_soup(), n in n_expert()) {
        exercise_map(&text, n, &Topology::uniform(2, 2, 1))?;
    }
}

/// A rule over small numbers, so that a brute-force walk can say what the checks must find.
#[derive(Debug, Clone)]
struct SmallRule {
    layers: Option<Vec<(u32, u32)>>,
    clauses: Vec<(u32, u32, u32)>,
}

fn range(max: u32) -> impl Strategy<Value = (u32, u32)> {
    (0..max, 0..max).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn small_rule() -> impl Strategy<Value = SmallRule> {
    (prop::option::weighted(0.9, prop::collection::vec(range(40), 1..4)), prop::collection::vec((range(24), 0u32..2), 0..4))
        .prop_map(|(layers, cl)| SmallRule { layers, clauses: cl.into_iter().map(|((a, b), n)| (a, b, n)).collect() })
}

fn render(rules: &[SmallRule]) -> String {
    let rs: Vec<String> = rules
        .iter()
        .map(|r| {
            let head = r
                .layers
                .as_ref()
                .map_or(String::new(), |ls| format!("blk.{}=", ls.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>().join(",")));
            let body = if r.clauses.is_empty() {
                "rows".to_string()
            } else {
                r.clauses.iter().map(|(a, b, n)| format!("{a}-{b}:{n}")).collect::<Vec<_>>().join(",")
            };
            head + &body
        })
        .collect();
    rs.join(";")
}

proptest! {
    #![proptest_config(config(5000))]

    /// The interval sweep finds exactly the overlaps a walk over every number finds, and the
    /// smallest shared layer.
    #[test]
    fn overlap_checks_agree_with_a_walk(rules in prop::collection::vec(small_rule(), 1..6)) {
        let text = render(&rules);
        let defaults = rules.iter().filter(|r| r.layers.is_none()).count();
        let shared_layer = (0..40u32).find(|l| {
            rules.iter().filter(|r| r.layers.as_ref().is_some_and(|ls| ls.iter().any(|&(a, b)| (a..=b).contains(l)))).count() > 1
        });
        let shared_expert = rules.iter().any(|r| {
            (0..24u32).any(|e| r.clauses.iter().filter(|&&(a, b, _)| (a..=b).contains(&e)).count() > 1)
        });
        let got = ExpertMap::parse(&text);
        match (defaults > 1, shared_layer, shared_expert) {
            (false, None, false) => prop_assert!(got.is_ok(), "{text}: {:?}", got.err()),
            (false, Some(l), false) => {
                let err = got.unwrap_err().to_string();
                prop_assert!(err.contains(&format!("layer {l} is selected by two rules")), "{text}: {err}");
            }
            _ => prop_assert!(got.is_err(), "{text}"),
        }
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// Thousands of rules, each with a few ranges anywhere in u32, and as many clauses.
    #[test]
    fn long_maps_are_checked_in_time(
        n_rules in 1000usize..4000,
        seed in any::<u64>(),
        disjoint in any::<bool>(),
        stray in prop::option::weighted(0.3, 0u32..1000),
        n in n_expert(),
    ) {
        let mut s = seed | 1;
        let mut next = move || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let step = u32::MAX / n_rules as u32;
        let mut rules = Vec::with_capacity(n_rules);
        for i in 0..n_rules as u32 {
            let (lo, hi) = if disjoint {
                let lo = i * step;
                (lo, lo + (next() % step as u64) as u32)
            } else {
                let a = next() as u32;
                let b = next() as u32;
                (a.min(b), a.max(b))
            };
            // consecutive expert ranges (a valid rule), in some maps one anywhere in one rule
            let width = 1 + next() % 256;
            let clauses: Vec<String> = (0..(next() % 4)).map(|c| {
                let lo = if stray == Some(i) && c == 1 { next() % 1100 } else { c * width };
                format!("{lo}-{}:{}", lo + width - 1, c % 2)
            }).collect();
            let body = if clauses.is_empty() { "rows".to_string() } else { clauses.join(",") };
            rules.push(format!("blk.{lo}-{hi}={body}"));
        }
        let text = rules.join(";");
        exercise_map(&text, n, &Topology::uniform(2, 2, 1))?;
        // one policy over every node a map may name, and one clause copying to all of them
        let nodes: Vec<String> = (0..n_rules.min(1024)).map(|i| i.to_string()).collect();
        exercise_map(&format!("rows@{}", nodes.join(",")), n, &Topology::uniform(2, 2, 1))?;
        exercise_map(&format!("*:{}", nodes.join("+")), n.min(MAX_EXPERTS), &Topology::uniform(2, 2, 1))?;
    }
}

proptest! {
    #![proptest_config(config(5000))]

    /// The C entry point: a code for every input (never NUMA_MOE_RESULT_PANIC), and an
    /// out-of-range expert count is an argument error whatever the map.
    #[test]
    fn map_check_through_the_c_abi(text in map_soup(), n in n_expert()) {
        let Ok(c) = CString::new(text.clone()) else { return Ok(()) };
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        let r = timed(&text, || unsafe { numa_moe_map_check(c.as_ptr(), n) })?;
        prop_assert_ne!(r, NumaMoeResult::Panic, "{}", text);
        if n > MAX_EXPERTS {
            prop_assert_eq!(r, NumaMoeResult::InvalidArgument);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF tensor tables

/// A valid tensor table: mostly expert stacks, some matrices and vectors; any known type.
fn table() -> impl Strategy<Value = Vec<(String, Vec<u64>, u32)>> {
    let dims = prop_oneof![3 => Just(2usize), 1 => 0usize..4];
    let tensor = (0usize..GGML_TYPES.len(), 1u64..8, dims, prop::collection::vec(prop_oneof![1u64..5, 5u64..300], 3), 0u32..4).prop_map(
        |(ti, cols, n, rest, layer)| {
            let (id, _, blck, _) = GGML_TYPES[ti];
            let mut ne = vec![blck * cols];
            ne.extend(&rest[..n]);
            (format!("blk.{layer}.ffn_up_exps.weight"), ne, id)
        },
    );
    prop::collection::vec(tensor, 0..6).prop_map(name_uniquely)
}

fn name_uniquely(mut v: Vec<(String, Vec<u64>, u32)>) -> Vec<(String, Vec<u64>, u32)> {
    for (i, t) in v.iter_mut().enumerate() {
        t.0 = t.0.replace("ffn_up", &format!("ffn_{i}"));
    }
    v
}

/// Tables whose shapes sit on the edges (huge, zero, wrapping, at the expert and layer
/// limits), written with offsets that follow each other, so the reader's checks and the
/// planner see them rather than an offset mismatch.
fn edge_table() -> impl Strategy<Value = Vec<(String, Vec<u64>, u32)>> {
    let dim = prop_oneof![1 => 1u64..5, 2 => edge()];
    let dims = prop_oneof![3 => Just(2usize), 1 => 0usize..4];
    let layer = prop_oneof![0u32..4, Just(511), Just(512), any::<u32>()];
    let tensor =
        (0usize..GGML_TYPES.len(), dim.clone(), dims, prop::collection::vec(dim, 3), layer).prop_map(|(ti, cols, n, rest, layer)| {
            let (id, _, blck, _) = GGML_TYPES[ti];
            let mut ne = vec![blck.saturating_mul(cols)];
            ne.extend(&rest[..n]);
            (format!("blk.{layer}.ffn_up_exps.weight"), ne, id)
        });
    prop::collection::vec(tensor, 1..3).prop_map(name_uniquely)
}

fn write(table: &[(String, Vec<u64>, u32)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u64], u32)> = table.iter().map(|(n, ne, t)| (n.as_str(), ne.as_slice(), *t)).collect();
    gguf::write_table_only(&refs)
}

/// Where the numbers of a `write_table_only` file are: the counts, and each tensor's
/// dimension count, dimensions, type and offset.
fn number_fields(table: &[(String, Vec<u64>, u32)]) -> Vec<(usize, usize)> {
    let mut f = vec![(8, 8), (16, 8)];
    // key "general.architecture", type, value "qwen3moe"
    let mut pos = 24 + 8 + 20 + 4 + 8 + 8;
    f.push((24, 8));
    for (name, ne, _) in table {
        f.push((pos, 8));
        pos += 8 + name.len();
        f.push((pos, 4));
        pos += 4;
        for _ in ne {
            f.push((pos, 8));
            pos += 8;
        }
        f.push((pos, 4));
        f.push((pos + 4, 8));
        pos += 12;
    }
    f
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite a number field (index into number_fields) with a value near an edge.
    Number(usize, u64),
    /// Overwrite one byte.
    Byte(usize, u8),
    /// Cut the file.
    Truncate(usize),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
}

fn edge() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            2,
            3,
            4,
            5,
            9,
            1023,
            1024,
            1025,
            511,
            512,
            64,
            u32::MAX as u64,
            1 << 32,
            (1 << 32) + 2,
            i64::MAX as u64,
            1 << 63,
            u64::MAX,
            u64::MAX - 7,
            1 << 31,
            1 << 40,
        ]),
        any::<u64>(),
        0u64..100,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), edge()).prop_map(|(i, v)| Mutation::Number(i, v)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Byte(i, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

fn mutate(mut b: Vec<u8>, fields: &[(usize, usize)], muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        match m {
            Mutation::Number(i, v) => {
                let (at, len) = fields[i % fields.len()];
                if at + len <= b.len() {
                    b[at..at + len].copy_from_slice(&v.to_le_bytes()[..len]);
                }
            }
            Mutation::Byte(i, v) if !b.is_empty() => {
                let n = b.len();
                b[i % n] = *v;
            }
            Mutation::Truncate(i) => b.truncate(i % (b.len() + 1)),
            Mutation::Insert(i, v) => {
                let at = i % (b.len() + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Byte(..) => {}
        }
    }
    b
}

/// A table the reader accepts can be used without further checks: every tensor has at most
/// four dimensions, a short name, a known type, a size in 64 bits and an aligned offset.
fn what_a_read_file_guarantees(f: &GgufFile) -> Result<(), TestCaseError> {
    for t in &f.tensors {
        prop_assert!(t.ne.len() <= 4 && t.name.len() < 64, "{t:?}");
        prop_assert!(t.bytes().is_some(), "{t:?}");
        prop_assert_eq!(t.offset % f.alignment, 0);
    }
    Ok(())
}

/// What `numa-moe plan` does with a file: read it, find the stacks, plan each under a map,
/// sum the loads and lay out workers.
fn plan_file(bytes: &[u8], topo: &Topology, maps: &[ExpertMap]) -> Result<(), TestCaseError> {
    let Ok(f) = GgufFile::parse(bytes) else { return Ok(()) };
    what_a_read_file_guarantees(&f)?;
    let Ok(stacks) = f.expert_tensors() else { return Ok(()) };
    for map in maps {
        let plans: Vec<_> = stacks.iter().filter_map(|t| plan_tensor(topo, map, t, &PlanOptions::default()).ok().flatten()).collect();
        for p in &plans {
            for n in topo.node_ids() {
                let _ = p.describe_share(n);
            }
        }
        let _ = check_budget(&node_loads(topo, &plans));
    }
    let _ = plan_workers(topo, 512);
    Ok(())
}

proptest! {
    #![proptest_config(config(25_000))]

    #[test]
    fn mutated_gguf_tables_are_a_result_or_an_error(
        table in table(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let valid = write(&table);
        let parsed = GgufFile::parse(&valid);
        prop_assert!(parsed.is_ok(), "the unmutated table must read: {:?}", parsed.err());
        let bytes = mutate(valid, &number_fields(&table), &muts);
        let topo = Topology::uniform(2, 2, 64);
        let maps: Vec<ExpertMap> =
            ["rows", "block", "mirror", "round-robin", "interleave", "0-1:0+1,*:1"].iter().map(|m| ExpertMap::parse(m).unwrap()).collect();
        timed("plan", || plan_file(&bytes, &topo, &maps))??;
    }

    #[test]
    fn edge_shapes_are_planned_or_refused(table in edge_table()) {
        let bytes = write(&table);
        let topo = Topology::uniform(2, 2, 64);
        let maps: Vec<ExpertMap> = ["rows", "mirror", "0-1:0+1,*:1"].iter().map(|m| ExpertMap::parse(m).unwrap()).collect();
        timed("plan", || plan_file(&bytes, &topo, &maps))??;
    }

    /// Random bytes behind a valid magic and version.
    #[test]
    fn random_gguf_headers_are_a_result_or_an_error(tail in prop::collection::vec(any::<u8>(), 0..512), version in 0u32..5) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tail);
        if let Ok(f) = timed("parse", || GgufFile::parse(&b))? {
            what_a_read_file_guarantees(&f)?;
        }
    }

    /// The GGUF reader and ggml's buffer agree on what a stacked expert tensor is, for any
    /// shape a file can hold.
    #[test]
    fn plan_and_buffer_see_the_same_stacks(
        ti in 0usize..GGML_TYPES.len(),
        cols in 0u64..4,
        ne in prop::collection::vec(prop_oneof![0u64..4, Just(1024u64), Just(1025), Just(u32::MAX as u64 + 3), any::<u32>().prop_map(u64::from)], 0..3),
        layer in prop_oneof![0u32..4, Just(511), Just(512), any::<u32>()],
    ) {
        let (id, name, blck, size) = GGML_TYPES[ti];
        let mut dims = vec![blck * cols];
        dims.extend(ne);
        let t = gguf::TensorInfo { name: format!("blk.{layer}.ffn_down_exps.weight"), ne: dims, ggml_type: id, offset: 0 };
        let Some(bytes) = t.bytes() else { return Ok(()) };
        prop_assume!(usize::try_from(bytes).is_ok());
        let ne4 = t.ne4();
        let row = t.row_bytes().unwrap();
        let nb = [size as usize, row as usize, (row * ne4[1]) as usize, (row * ne4[1] * ne4[2]) as usize];
        let b = numa_moe::buffer::TensorInfo { name: t.name.clone(), type_name: name.to_string(), ne: ne4.map(|n| n as i64), nb, packed: true, row_group: 1 };
        prop_assert_eq!(t.expert_tensor().ok().flatten(), b.expert_tensor());
    }
}
