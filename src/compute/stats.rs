//! Routing statistics recorded by the hook, at a cost of a few relaxed atomic adds per op:
//!
//! - per layer, per expert: token-slots routed, over the whole run and over a recent window;
//! - per node: output rows computed and weight bytes read by that node's threads.
//!
//! Routing is counted once per layer, on its `ffn_down_exps` op (gate, up and down of a layer
//! see the same routing; down exists in every MoE architecture, gate and up may be fused).
//! Thread 0 counts it from the grouping it builds anyway, before the op's barrier. Rows and
//! bytes are counted on every op, by each thread for the chunks it computed, in one add per
//! node per thread. The recent window is two epochs of [`RECENT_TOKENS`] routed tokens per
//! layer: `recent` = the previous epoch plus the current one (between one and two windows).
//!
//! `NUMA_MOE_ROUTING_STATS=0` turns recording off; [`set_enabled`] does the same at run time
//! (the overhead benchmark). [`profile`] builds a [`RoutingProfile`] of what was recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::routing::{LayerRouting, ModelSignature, NodeWork, RoutingProfile, RECENT_TOKENS, SCHEMA};

/// One layer's counters.
pub struct LayerStats {
    pub layer: u32,
    tokens: Vec<AtomicU64>,
    current: Vec<AtomicU64>,
    previous: Vec<AtomicU64>,
    /// Routed tokens in the current epoch.
    epoch_tokens: AtomicU64,
    /// Held by the thread that rotates the epochs (rare).
    rotating: Mutex<()>,
}

impl LayerStats {
    fn new(layer: u32, n_expert: usize) -> Self {
        let zeros = || (0..n_expert).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        LayerStats {
            layer,
            tokens: zeros(),
            current: zeros(),
            previous: zeros(),
            epoch_tokens: AtomicU64::new(0),
            rotating: Mutex::new(()),
        }
    }

    pub fn n_expert(&self) -> usize {
        self.tokens.len()
    }

    /// Adds one op's routing: `count(e)` token-slots for each expert, over `n_tokens` tokens.
    pub fn record(&self, n_tokens: u64, count: impl Fn(usize) -> u64) {
        for (e, t) in self.tokens.iter().enumerate() {
            let c = count(e);
            if c != 0 {
                t.fetch_add(c, Ordering::Relaxed);
                self.current[e].fetch_add(c, Ordering::Relaxed);
            }
        }
        if self.epoch_tokens.fetch_add(n_tokens, Ordering::Relaxed) + n_tokens >= RECENT_TOKENS as u64 {
            let _g = self.rotating.lock();
            if self.epoch_tokens.load(Ordering::Relaxed) >= RECENT_TOKENS as u64 {
                for (p, c) in self.previous.iter().zip(&self.current) {
                    p.store(c.swap(0, Ordering::Relaxed), Ordering::Relaxed);
                }
                self.epoch_tokens.store(0, Ordering::Relaxed);
            }
        }
    }

    pub fn tokens(&self) -> Vec<u64> {
        self.tokens.iter().map(|t| t.load(Ordering::Relaxed)).collect()
    }

    pub fn recent(&self) -> Vec<u64> {
        self.current.iter().zip(&self.previous).map(|(c, p)| c.load(Ordering::Relaxed) + p.load(Ordering::Relaxed)).collect()
    }

    fn reset(&self) {
        for v in [&self.tokens, &self.current, &self.previous] {
            v.iter().for_each(|t| t.store(0, Ordering::Relaxed));
        }
        self.epoch_tokens.store(0, Ordering::Relaxed);
    }
}

/// Rows and bytes of one node, on a cache line of its own (threads of different nodes add
/// to their own node's counters at the end of every op).
#[repr(align(64))]
struct NodeCounters {
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Whether the node ever did work (nodes listed in the profile).
    seen: AtomicBool,
}

impl NodeCounters {
    const fn new() -> Self {
        NodeCounters { rows: AtomicU64::new(0), bytes: AtomicU64::new(0), seen: AtomicBool::new(false) }
    }
}

/// One counter set per possible node id (Linux has at most 1024 nodes; see MAX_NODES).
static NODES: [NodeCounters; crate::expert_map::MAX_NODES as usize] =
    [const { NodeCounters::new() }; crate::expert_map::MAX_NODES as usize];

#[derive(Default)]
struct Registry {
    layers: Mutex<BTreeMap<u32, Arc<LayerStats>>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();
static ENABLED: OnceLock<AtomicBool> = OnceLock::new();

fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Registry::default)
}

fn enabled_flag() -> &'static AtomicBool {
    ENABLED.get_or_init(|| AtomicBool::new(std::env::var("NUMA_MOE_ROUTING_STATS").map_or(true, |v| v.trim() != "0")))
}

/// Whether the hook records statistics.
pub fn enabled() -> bool {
    enabled_flag().load(Ordering::Relaxed)
}

pub fn set_enabled(on: bool) {
    enabled_flag().store(on, Ordering::Relaxed);
}

/// The counters routing of `layer` goes to, for the tensor named `name` with `n_expert`
/// experts: `Some` for a layer's down projection (the one op per layer that counts routing).
pub fn layer_for(name: &str, layer: Option<u32>, n_expert: u32) -> Option<Arc<LayerStats>> {
    let layer = layer?;
    if !name.contains("ffn_down_exps") {
        return None;
    }
    let mut m = registry().layers.lock();
    let s = m.entry(layer).or_insert_with(|| Arc::new(LayerStats::new(layer, n_expert as usize)));
    (s.n_expert() == n_expert as usize).then(|| s.clone())
}

/// Per-thread sums of the work a thread did in one op, added to the node's counters once.
#[derive(Default)]
pub struct WorkTally {
    pub rows: u64,
    pub bytes: u64,
}

impl WorkTally {
    pub fn flush(&self, node: u32) {
        if self.rows == 0 && self.bytes == 0 {
            return;
        }
        let Some(c) = NODES.get(node as usize) else { return };
        c.rows.fetch_add(self.rows, Ordering::Relaxed);
        c.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        if !c.seen.load(Ordering::Relaxed) {
            c.seen.store(true, Ordering::Relaxed);
        }
    }
}

/// What one node did so far: (rows, bytes).
pub fn node_work(node: u32) -> (u64, u64) {
    NODES.get(node as usize).map_or((0, 0), |c| (c.rows.load(Ordering::Relaxed), c.bytes.load(Ordering::Relaxed)))
}

/// The layers with recorded routing.
pub fn layers() -> Vec<Arc<LayerStats>> {
    registry().layers.lock().values().cloned().collect()
}

/// Zeroes every counter (layers and nodes stay registered).
pub fn reset() {
    for l in layers() {
        l.reset();
    }
    for c in NODES.iter().filter(|c| c.seen.load(Ordering::Relaxed)) {
        c.rows.store(0, Ordering::Relaxed);
        c.bytes.store(0, Ordering::Relaxed);
    }
}

/// A profile of what was recorded; `None` before any routing was counted.
pub fn profile(map: &str) -> Option<RoutingProfile> {
    let layers = layers();
    let n_expert = layers.first()?.n_expert() as u32;
    // one model's layers: those with the first layer's expert count
    let layers: Vec<_> = layers.into_iter().filter(|l| l.n_expert() == n_expert as usize).collect();
    if layers.iter().all(|l| l.tokens().iter().all(|&t| t == 0)) {
        return None;
    }
    let nodes = NODES
        .iter()
        .enumerate()
        .filter(|(_, c)| c.seen.load(Ordering::Relaxed))
        .map(|(node, c)| NodeWork { node: node as u32, rows: c.rows.load(Ordering::Relaxed), bytes: c.bytes.load(Ordering::Relaxed) })
        .collect();
    Some(RoutingProfile {
        schema: SCHEMA,
        model: ModelSignature { n_expert, expert_layers: layers.iter().map(|l| l.layer).collect() },
        map: map.to_string(),
        layers: layers.iter().map(|l| LayerRouting { layer: l.layer, tokens: l.tokens(), recent: l.recent() }).collect(),
        nodes,
    })
}

/// The exit report: routed tokens, the hottest experts and each node's share of the rows.
pub fn report_lines(p: &RoutingProfile) -> Vec<String> {
    let totals = p.expert_totals();
    let all: u64 = totals.iter().sum();
    let mut order: Vec<usize> = (0..totals.len()).collect();
    order.sort_by_key(|&e| (std::cmp::Reverse(totals[e]), e));
    let pct = |x: u64, of: u64| if of == 0 { 0.0 } else { 100.0 * x as f64 / of as f64 };
    let top: Vec<String> =
        order.iter().take(5).filter(|&&e| totals[e] > 0).map(|&e| format!("{e} ({:.1}%)", pct(totals[e], all))).collect();
    let mut lines = vec![format!(
        "numa-moe: routing: {all} token-slots over {} layers of {} experts; hottest experts over all layers: {}",
        p.layers.len(),
        p.model.n_expert,
        top.join(", ")
    )];
    let rows: u64 = p.nodes.iter().map(|n| n.rows).sum();
    if rows > 0 && !p.nodes.is_empty() {
        let busiest = p.nodes.iter().map(|n| n.rows).max().unwrap_or(0);
        let mean = rows as f64 / p.nodes.len() as f64;
        let shares: Vec<String> = p.nodes.iter().map(|n| format!("node {} {:.1}%", n.node, pct(n.rows, rows))).collect();
        lines.push(format!(
            "numa-moe: rows computed per node: {} (busiest node's share over the mean: {:.2})",
            shares.join(", "),
            busiest as f64 / mean
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_window_rotates_and_the_total_keeps_everything() {
        let l = LayerStats::new(0, 3);
        // a window's worth of tokens on expert 0, then one window on expert 2
        l.record(RECENT_TOKENS as u64, |e| if e == 0 { 2 * RECENT_TOKENS as u64 } else { 0 });
        assert_eq!(l.recent(), vec![2 * RECENT_TOKENS as u64, 0, 0]);
        l.record(RECENT_TOKENS as u64, |e| if e == 2 { 5 } else { 0 });
        assert_eq!(l.recent(), vec![0, 0, 5]);
        assert_eq!(l.tokens(), vec![2 * RECENT_TOKENS as u64, 0, 5]);
        l.record(1, |e| (e == 1) as u64);
        assert_eq!(l.recent(), vec![0, 1, 5]);
    }

    #[test]
    fn the_report_names_the_hottest_experts_and_the_imbalance() {
        let p = RoutingProfile {
            schema: SCHEMA,
            model: ModelSignature { n_expert: 4, expert_layers: vec![0] },
            map: "block".into(),
            layers: vec![LayerRouting { layer: 0, tokens: vec![6, 0, 3, 1], recent: vec![] }],
            nodes: vec![NodeWork { node: 0, rows: 300, bytes: 0 }, NodeWork { node: 1, rows: 100, bytes: 0 }],
        };
        let lines = report_lines(&p);
        assert_eq!(lines[0], "numa-moe: routing: 10 token-slots over 1 layers of 4 experts; hottest experts over all layers: 0 (60.0%), 2 (30.0%), 3 (10.0%)");
        assert_eq!(lines[1], "numa-moe: rows computed per node: node 0 75.0%, node 1 25.0% (busiest node's share over the mean: 1.50)");
    }
}
