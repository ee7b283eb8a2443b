//! Routing profiles: how many routed token-slots each expert of each layer received, and the
//! work each node did, as recorded by the hook (`NUMA_MOE_ROUTING_OUT`) and read back by
//! `numa-moe routing` and by the `balanced` map. Pure data and file formats; recording
//! lives in [`crate::compute::stats`], planning from a profile in [`crate::placement`].
//!
//! The file is JSON or CSV (schema in docs/ROUTING.md); [`RoutingProfile::load`] tells them
//! apart by content, [`RoutingProfile::save`] by the path's extension. JSON:
//!
//! ```json
//! { "numa_moe_routing": 1,
//!   "model": { "n_expert": 32, "expert_layers": [0, 1] },
//!   "map": "rows",
//!   "layers": [ { "layer": 0, "tokens": [12, 0, ...], "recent": [3, 0, ...] } ],
//!   "nodes": [ { "node": 0, "rows": 123456, "bytes": 98765432 } ] }
//! ```
//!
//! `tokens[e]` counts (token, slot) pairs routed to expert `e` in that layer over the whole
//! run (one per MUL_MAT_ID op of the layer: gate, up and down each see the same routing, so
//! the recorder counts one op per layer, its `ffn_down_exps`); `recent` the same over the
//! layer's recent tokens: the previous and the current epoch of [`RECENT_TOKENS`] routed
//! tokens each, so between one and two windows.
//!
//! CSV is the same profile in long form, one row per (layer, expert), with the signature,
//! the map and the per-node work on `#` lines before the header (so `pandas.read_csv(f,
//! comment="#")` or a spreadsheet reads the rows):
//!
//! ```text
//! # numa_moe_routing 1
//! # n_expert 32
//! # map "rows"
//! # node 0 rows 123456 bytes 98765432
//! layer,expert,tokens,recent
//! 0,0,12,3
//! ```
//!
//! The summaries ([`entropy_bits`], [`hottest`], [`node_loads`], [`imbalance`]) are pure
//! functions of a profile; [`placements`] plans each layer of a profile under a map on a
//! topology with [`crate::placement::plan_tensor`], so "the load under a map" is the share of
//! every expert's rows each node computes exactly as numa-moe would place it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode};
use crate::expert_map::{ExpertMap, MAX_LAYERS};
use crate::placement::{plan_tensor, Binding, Compute, ExpertTensor, PlanOptions, TensorPlan};
use crate::topology::Topology;

/// The schema version written under "numa_moe_routing".
/// cbindgen:ignore
pub const SCHEMA: u32 = 1;

/// How many routed tokens the `recent` window spans per layer (a ring of this many tokens).
/// cbindgen:ignore
pub const RECENT_TOKENS: usize = 4096;

/// What the counts were recorded on, to refuse a profile of another model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelSignature {
    pub n_expert: u32,
    /// Layers that have stacked expert tensors, ascending.
    pub expert_layers: Vec<u32>,
}

/// One layer's routing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LayerRouting {
    pub layer: u32,
    /// Token-slots routed to each expert over the run (`n_expert` entries).
    pub tokens: Vec<u64>,
    /// The same over the most recent tokens (`n_expert` entries).
    #[serde(default)]
    pub recent: Vec<u64>,
}

/// The work one node's threads did over the run, in the ops numa-moe computed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeWork {
    pub node: u32,
    /// Output rows computed (expert rows x routed tokens).
    pub rows: u64,
    /// Weight bytes read (expert rows read once per op).
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RoutingProfile {
    #[serde(rename = "numa_moe_routing")]
    pub schema: u32,
    pub model: ModelSignature,
    /// The map in force while recording.
    #[serde(default)]
    pub map: String,
    /// By layer, ascending, one per layer of `model.expert_layers`.
    pub layers: Vec<LayerRouting>,
    #[serde(default)]
    pub nodes: Vec<NodeWork>,
}

impl RoutingProfile {
    /// Checks the invariants a reader relies on; `origin` names the file in messages.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let bad = |m: String| Err(Error::new(ErrorCode::InvalidArgument, format!("routing profile {origin}: {m}")));
        if self.schema != SCHEMA {
            return bad(format!("schema version {} is not the {SCHEMA} this numa-moe reads", self.schema));
        }
        let n = self.model.n_expert;
        if n == 0 || n > crate::expert_map::MAX_EXPERTS {
            return bad(format!("n_expert {n} is outside 1..={}", crate::expert_map::MAX_EXPERTS));
        }
        let layers: Vec<u32> = self.layers.iter().map(|l| l.layer).collect();
        if layers != self.model.expert_layers {
            return bad(format!("its layers {} are not the model's expert layers {}", short(&layers), short(&self.model.expert_layers)));
        }
        if layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad("layers are not in ascending order without repeats".into());
        }
        for l in &self.layers {
            if l.tokens.len() != n as usize || !(l.recent.is_empty() || l.recent.len() == n as usize) {
                return bad(format!("layer {} has {} token counts, the model has {n} experts", l.layer, l.tokens.len()));
            }
        }
        Ok(())
    }

    /// Refuses a profile recorded on another model: `n_expert` must match.
    pub fn check_model(&self, origin: &str, n_expert: u32) -> Result<(), Error> {
        if self.model.n_expert != n_expert {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("routing profile {origin} was recorded on a model with {} experts; this one has {n_expert}", self.model.n_expert),
            ));
        }
        Ok(())
    }

    /// Pretty JSON with every array of numbers on one line (a layer's counts are one line,
    /// not one line per expert).
    pub fn to_json(&self) -> String {
        collapse_number_arrays(&serde_json::to_string_pretty(self).unwrap_or_default())
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self, Error> {
        let p: RoutingProfile = serde_json::from_str(text)
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("routing profile {origin}: not a numa-moe routing file: {e}")))?;
        p.validate(origin)?;
        Ok(p)
    }

    /// Reads a profile, JSON when its first non-blank character is `{`, else CSV; files over
    /// 256 MiB are refused (1024 experts x 512 layers of counts is under 20 MiB as CSV).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("cannot read routing profile {origin}: {e}")))?;
        if meta.len() > 256 << 20 {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("routing profile {origin} is {} bytes, more than a profile can be", meta.len()),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("cannot read routing profile {origin}: {e}")))?;
        Self::parse(&text, &origin)
    }

    /// A profile from the text of a file: JSON when its first non-blank character is `{`,
    /// else CSV.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        if text.trim_start_matches('\u{feff}').trim_start().starts_with('{') {
            Self::from_json(text, origin)
        } else {
            Self::from_csv(text, origin)
        }
    }

    /// Writes the profile as CSV when the path ends in `.csv` (any case), else as JSON.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let text = if csv { self.to_csv() } else { self.to_json() + "\n" };
        std::fs::write(path, text)
            .map_err(|e| Error::new(ErrorCode::SystemError, format!("cannot write routing profile {}: {e}", path.display())))
    }

    /// The CSV form (see the module documentation and docs/ROUTING.md). A layer without
    /// `recent` counts has an empty `recent` column.
    pub fn to_csv(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "# numa_moe_routing {}", self.schema);
        let _ = writeln!(out, "# n_expert {}", self.model.n_expert);
        // JSON-quoted: a map may hold commas, and quoting keeps any character on one line
        let _ = writeln!(out, "# map {}", serde_json::to_string(&self.map).unwrap_or_else(|_| "\"\"".into()));
        for n in &self.nodes {
            let _ = writeln!(out, "# node {} rows {} bytes {}", n.node, n.rows, n.bytes);
        }
        out.push_str(CSV_HEADER);
        out.push('\n');
        for l in &self.layers {
            for (e, t) in l.tokens.iter().enumerate() {
                let _ = match l.recent.get(e) {
                    Some(r) => writeln!(out, "{},{e},{t},{r}", l.layer),
                    None => writeln!(out, "{},{e},{t},", l.layer),
                };
            }
        }
        out
    }

    /// Reads the CSV form; errors name `origin` and the line. Rows may come in any order,
    /// but every layer needs one row per expert, and a layer's `recent` column is either
    /// filled on every row or empty on every row.
    pub fn from_csv(text: &str, origin: &str) -> Result<Self, Error> {
        let bad = |line: usize, m: String| Error::new(ErrorCode::InvalidArgument, format!("routing profile {origin}, line {line}: {m}"));
        let mut schema: Option<u32> = None;
        let mut n_expert: Option<u32> = None;
        let mut map: Option<String> = None;
        let mut nodes: Vec<NodeWork> = Vec::new();
        let mut header_seen = false;
        // layer -> per expert (tokens, recent), with the line that gave it
        let mut cells: BTreeMap<u32, Vec<Option<CsvCell>>> = BTreeMap::new();
        let mut last_line = 0;
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let l = raw.trim_end_matches('\r');
            let l = if i == 0 { l.trim_start_matches('\u{feff}') } else { l };
            if l.trim().is_empty() {
                continue;
            }
            last_line = line;
            if schema.is_none() {
                let version = l.strip_prefix("# numa_moe_routing ").map(str::trim).ok_or_else(|| {
                    bad(
                        line,
                        format!(
                            "not a numa-moe routing file: expected \"# numa_moe_routing {SCHEMA}\" (CSV) or a JSON object, found \"{}\"",
                            clip(l)
                        ),
                    )
                })?;
                match version.parse::<u32>() {
                    Ok(SCHEMA) => schema = Some(SCHEMA),
                    _ => return Err(bad(line, format!("schema version {} is not the {SCHEMA} this numa-moe reads", clip(version)))),
                }
                continue;
            }
            if let Some(meta) = l.strip_prefix('#') {
                if header_seen {
                    continue; // a comment among the rows
                }
                let meta = meta.trim();
                let (key, value) = meta.split_once(char::is_whitespace).unwrap_or((meta, ""));
                let value = value.trim();
                match key {
                    "n_expert" => {
                        let max = crate::expert_map::MAX_EXPERTS;
                        match value.parse::<u32>() {
                            Ok(v) if (1..=max).contains(&v) => n_expert = Some(v),
                            _ => return Err(bad(line, format!("n_expert \"{}\" is not a number in 1..={max}", clip(value)))),
                        }
                    }
                    "map" => {
                        let m: String = serde_json::from_str(value)
                            .map_err(|_| bad(line, format!("the map {} is not a quoted string", clip(value))))?;
                        map = Some(m);
                    }
                    "node" => nodes.push(
                        parse_node_line(value)
                            .ok_or_else(|| bad(line, format!("expected \"# node NODE rows ROWS bytes BYTES\", found \"{}\"", clip(l))))?,
                    ),
                    _ => {} // a free comment
                }
                continue;
            }
            if !header_seen {
                if l.trim() != CSV_HEADER {
                    return Err(bad(line, format!("expected the header \"{CSV_HEADER}\", found \"{}\"", clip(l))));
                }
                if n_expert.is_none() {
                    return Err(bad(line, "the \"# n_expert N\" line must come before the header".into()));
                }
                header_seen = true;
                continue;
            }
            let n = n_expert.unwrap_or(0);
            let fields: Vec<&str> = l.split(',').map(str::trim).collect();
            if fields.len() != 4 {
                return Err(bad(line, format!("expected 4 fields ({CSV_HEADER}), found {}", fields.len())));
            }
            let number = |name: &str, text: &str| -> Result<u64, Error> {
                text.parse::<u64>().map_err(|_| bad(line, format!("{name} \"{}\" is not a whole number", clip(text))))
            };
            let layer = number("layer", fields[0])?;
            if layer >= MAX_LAYERS as u64 {
                return Err(bad(line, format!("layer {layer} is beyond the {MAX_LAYERS} layers llama.cpp supports")));
            }
            let expert = number("expert", fields[1])?;
            if expert >= n as u64 {
                return Err(bad(line, format!("expert {expert} is beyond the {n} experts of n_expert")));
            }
            let tokens = number("tokens", fields[2])?;
            let recent = if fields[3].is_empty() { None } else { Some(number("recent", fields[3])?) };
            let row = cells.entry(layer as u32).or_insert_with(|| vec![None; n as usize]);
            if let Some((_, _, first)) = row[expert as usize] {
                return Err(bad(line, format!("layer {layer}, expert {expert} was already given on line {first}")));
            }
            row[expert as usize] = Some((tokens, recent, line));
        }
        let Some(schema) = schema else {
            return Err(Error::new(ErrorCode::InvalidArgument, format!("routing profile {origin}: the file is empty")));
        };
        if !header_seen {
            return Err(bad(last_line.max(1), format!("the file ends before the header \"{CSV_HEADER}\"")));
        }
        let n = n_expert.unwrap_or(0);
        let mut layers = Vec::with_capacity(cells.len());
        for (layer, row) in cells {
            let mut tokens = Vec::with_capacity(row.len());
            let mut recent = Vec::with_capacity(row.len());
            let mut with_recent: Option<(bool, usize)> = None;
            for (e, cell) in row.into_iter().enumerate() {
                let Some((t, r, line)) = cell else {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!("routing profile {origin}: layer {layer} has no row for expert {e} (n_expert is {n})"),
                    ));
                };
                match with_recent {
                    None => with_recent = Some((r.is_some(), line)),
                    Some((w, first)) if w != r.is_some() => {
                        let (has, not) = if w { (first, line) } else { (line, first) };
                        return Err(bad(
                            line,
                            format!("layer {layer} has recent counts on line {has} but none on line {not}: give them on every row of the layer or none"),
                        ));
                    }
                    _ => {}
                }
                tokens.push(t);
                if let Some(r) = r {
                    recent.push(r);
                }
            }
            layers.push(LayerRouting { layer, tokens, recent });
        }
        let p = RoutingProfile {
            schema,
            model: ModelSignature { n_expert: n, expert_layers: layers.iter().map(|l| l.layer).collect() },
            map: map.unwrap_or_default(),
            layers,
            nodes,
        };
        p.validate(origin)?;
        Ok(p)
    }

    /// Token-slots per expert summed over every layer.
    pub fn expert_totals(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.model.n_expert as usize];
        for l in &self.layers {
            for (o, t) in out.iter_mut().zip(&l.tokens) {
                *o = o.saturating_add(*t);
            }
        }
        out
    }

    pub fn layer(&self, layer: u32) -> Option<&LayerRouting> {
        self.layers.binary_search_by_key(&layer, |l| l.layer).ok().map(|i| &self.layers[i])
    }
}

/// One CSV row's counts (tokens, recent) and its line number.
type CsvCell = (u64, Option<u64>, usize);

/// The CSV header line.
/// cbindgen:ignore
pub const CSV_HEADER: &str = "layer,expert,tokens,recent";

/// `NODE rows ROWS bytes BYTES`, the value of a CSV `# node` line.
fn parse_node_line(value: &str) -> Option<NodeWork> {
    let w: Vec<&str> = value.split_whitespace().collect();
    match w.as_slice() {
        [node, "rows", rows, "bytes", bytes] => {
            Some(NodeWork { node: node.parse().ok()?, rows: rows.parse().ok()?, bytes: bytes.parse().ok()? })
        }
        _ => None,
    }
}

/// At most 60 characters of a line, for messages about it.
fn clip(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// `[\n  1,\n  2\n]` -> `[1, 2]` for arrays holding only numbers; everything else unchanged.
fn collapse_number_arrays(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        let end = tail.find(']').unwrap_or(tail.len());
        let inner = &tail[..end];
        let numbers = inner.chars().all(|c| c.is_ascii_digit() || c == ',' || c == '-' || c == '.' || c.is_whitespace());
        if numbers && end < tail.len() {
            let items: Vec<&str> = inner.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
            out.push('[');
            out.push_str(&items.join(", "));
            out.push(']');
            rest = &tail[end + 1..];
        } else {
            out.push('[');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

fn short(v: &[u32]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!("[{}, {}, ... {} layers ..., {}]", v[0], v[1], v.len(), v[v.len() - 1])
    }
}

// ---- Summaries: pure functions of a profile ----

/// Shannon entropy of a layer's routing, in bits: 0 when every token-slot goes to one expert,
/// log2(n) when n experts get equal shares; `None` when the layer saw no tokens.
pub fn entropy_bits(tokens: &[u64]) -> Option<f64> {
    let total: f64 = tokens.iter().map(|&t| t as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let h: f64 = tokens
        .iter()
        .filter(|&&t| t > 0)
        .map(|&t| {
            let p = t as f64 / total;
            -p * p.log2()
        })
        .sum();
    Some(h.max(0.0))
}

/// [`entropy_bits`] over log2(number of experts): 1 when every expert gets the same share,
/// 0 when one expert gets everything; `None` without tokens or with a single expert.
pub fn normalised_entropy(tokens: &[u64]) -> Option<f64> {
    if tokens.len() < 2 {
        return None;
    }
    entropy_bits(tokens).map(|h| (h / (tokens.len() as f64).log2()).clamp(0.0, 1.0))
}

/// One of a layer's busiest experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotExpert {
    pub expert: u32,
    pub tokens: u64,
    /// Of the layer's token-slots, 0..=1.
    pub share: f64,
}

/// The `k` experts with the most token-slots, most first (ties: the lower expert first), each
/// with its share of the layer's; experts that saw no token are left out.
pub fn hottest(tokens: &[u64], k: usize) -> Vec<HotExpert> {
    let total: f64 = tokens.iter().map(|&t| t as f64).sum();
    let mut order: Vec<(u32, u64)> = tokens.iter().enumerate().filter(|(_, &t)| t > 0).map(|(e, &t)| (e as u32, t)).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    order.into_iter().take(k).map(|(expert, t)| HotExpert { expert, tokens: t, share: t as f64 / total }).collect()
}

/// For each expert, the nodes that compute its rows and the fraction of its rows each one
/// computes (fractions of an expert sum to 1).
pub type ExpertShares = Vec<Vec<(u32, f64)>>;

/// The work each node does: every expert's token-slots, of `layer` (or of every layer, for
/// `None`), split over the nodes by the fractions `assignment(layer, expert)` returns. Loads are
/// in token-slots: a token routed to an expert whose rows two nodes split evenly adds 0.5 to
/// each. Sorted by node; a node appears only if the assignment gives it a share.
pub fn node_loads(profile: &RoutingProfile, layer: Option<u32>, assignment: &dyn Fn(u32, u32) -> Vec<(u32, f64)>) -> Vec<(u32, f64)> {
    let mut acc: BTreeMap<u32, f64> = BTreeMap::new();
    for l in profile.layers.iter().filter(|l| layer.is_none_or(|x| x == l.layer)) {
        for (e, &t) in l.tokens.iter().enumerate() {
            for (node, f) in assignment(l.layer, e as u32) {
                *acc.entry(node).or_default() += t as f64 * f;
            }
        }
    }
    acc.into_iter().collect()
}

/// The busiest node's load per unit of weight over the mean load per unit of weight: 1 when
/// every node finishes together, 2 when the busiest takes twice as long as an even spread would.
/// `weight(node)` is the node's compute speed (its cores; `|_| 1` for none; 0 counts as 1).
/// Every node in `loads` counts, those with no load too. `None` when there is no load at all.
pub fn imbalance(loads: &[(u32, f64)], weight: &dyn Fn(u32) -> u64) -> Option<f64> {
    let total: f64 = loads.iter().map(|l| l.1).sum();
    if loads.is_empty() || total <= 0.0 {
        return None;
    }
    let w = |n: u32| weight(n).max(1) as f64;
    let mean = total / loads.iter().map(|l| w(l.0)).sum::<f64>();
    let busiest = loads.iter().map(|l| l.1 / w(l.0)).fold(0.0, f64::max);
    Some(busiest / mean)
}

/// Each node's compute weight as the planner sees it: its cores, and for a node without CPUs
/// the mean of the others.
pub fn node_weights(topo: &Topology) -> BTreeMap<u32, u64> {
    let ids = topo.node_ids();
    ids.iter().copied().zip(crate::placement::core_weights(topo, &ids)).collect()
}

/// The shares of a real plan: under [`Compute::Pieces`] each node's rows of each expert over
/// the expert's rows; under ggml's own kernel (`interleave`) every expert spread over the
/// interleaved nodes by `weights` (ggml's threads split rows evenly, so by threads).
pub fn expert_shares(plan: &TensorPlan, weights: &BTreeMap<u32, u64>) -> ExpertShares {
    let n = plan.tensor.n_expert as usize;
    let rows = plan.tensor.rows.max(1) as f64;
    match &plan.compute {
        Compute::Pieces(pieces) => {
            let mut out: ExpertShares = vec![Vec::new(); n];
            for p in pieces.iter().filter(|p| (p.expert as usize) < n) {
                add_share(&mut out[p.expert as usize], p.node, (p.rows.end - p.rows.start) as f64 / rows);
            }
            out
        }
        Compute::Stock => {
            let mut nodes: Vec<u32> = Vec::new();
            for e in plan.copies.iter().flat_map(|c| &c.extents) {
                match &e.binding {
                    Binding::Node(x) => nodes.push(*x),
                    Binding::Interleave(xs) => nodes.extend(xs),
                }
            }
            nodes.sort_unstable();
            nodes.dedup();
            vec![spread(&nodes, weights); n]
        }
    }
}

fn add_share(v: &mut Vec<(u32, f64)>, node: u32, f: f64) {
    match v.iter_mut().find(|x| x.0 == node) {
        Some(x) => x.1 += f,
        None => v.push((node, f)),
    }
}

/// `nodes` sharing one expert in proportion to their weights.
fn spread(nodes: &[u32], weights: &BTreeMap<u32, u64>) -> Vec<(u32, f64)> {
    let w = |n: &u32| weights.get(n).copied().unwrap_or(1).max(1) as f64;
    let total: f64 = nodes.iter().map(w).sum();
    nodes.iter().map(|n| (*n, w(n) / total)).collect()
}

/// Rows and row size of the stand-in tensor each layer is planned with: one page per row, so
/// row splits fall on whole rows as finely as on any real tensor.
const STAND_IN_ROWS: u64 = 4096;
const STAND_IN_ROW_BYTES: u64 = 4096;

/// One layer under a map.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlacement {
    /// What places the layer: "rows", "block", ..., "explicit map", or "off" (llama.cpp's
    /// own kernel on every thread).
    pub kind: String,
    pub shares: ExpertShares,
}

/// A map planned over the layers of a profile on a topology, as numa-moe would place a tensor
/// of the profile's `n_expert` experts in each layer ([`plan_tensor`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MapPlacement {
    /// The map, rendered.
    pub map: String,
    /// The nodes loads are reported for, ascending: the topology's compute nodes and any
    /// other node the plans use.
    pub nodes: Vec<u32>,
    pub weights: BTreeMap<u32, u64>,
    /// Distinct placements (layers under the same rule share one).
    placements: Vec<LayerPlacement>,
    by_layer: BTreeMap<u32, usize>,
}

impl MapPlacement {
    pub fn plan(profile: &RoutingProfile, topo: &Topology, map: &ExpertMap) -> Result<Self, Error> {
        map.check_nodes(topo)?;
        let weights = node_weights(topo);
        let mut nodes = topo.compute_nodes();
        let mut placements: Vec<LayerPlacement> = Vec::new();
        let mut by_layer = BTreeMap::new();
        let opts = PlanOptions::default();
        for &layer in &profile.model.expert_layers {
            let tensor = ExpertTensor {
                name: format!("blk.{layer} of the routing profile"),
                layer: Some(layer),
                type_name: "stand-in".into(),
                n_expert: profile.model.n_expert,
                rows: STAND_IN_ROWS,
                row_bytes: STAND_IN_ROW_BYTES,
                row_group: 1,
            };
            let lp = match plan_tensor(topo, map, &tensor, &opts)? {
                Some(plan) => LayerPlacement { kind: plan.kind.to_string(), shares: expert_shares(&plan, &weights) },
                None => {
                    let everyone = spread(&topo.compute_nodes(), &weights);
                    LayerPlacement { kind: "off".into(), shares: vec![everyone; profile.model.n_expert as usize] }
                }
            };
            for s in lp.shares.iter().flatten() {
                if !nodes.contains(&s.0) {
                    nodes.push(s.0);
                }
            }
            let idx = match placements.iter().position(|p| *p == lp) {
                Some(i) => i,
                None => {
                    placements.push(lp);
                    placements.len() - 1
                }
            };
            by_layer.insert(layer, idx);
        }
        nodes.sort_unstable();
        nodes.dedup();
        Ok(MapPlacement { map: map.render(), nodes, weights, placements, by_layer })
    }

    pub fn layer(&self, layer: u32) -> Option<&LayerPlacement> {
        self.by_layer.get(&layer).map(|&i| &self.placements[i])
    }

    /// The nodes computing `expert` of `layer` and their fractions of its rows.
    pub fn share(&self, layer: u32, expert: u32) -> Vec<(u32, f64)> {
        self.layer(layer).and_then(|p| p.shares.get(expert as usize)).cloned().unwrap_or_default()
    }

    /// [`node_loads`] under this map, with every node of [`MapPlacement::nodes`] (idle ones at 0).
    pub fn loads(&self, profile: &RoutingProfile, layer: Option<u32>) -> Vec<(u32, f64)> {
        let mut acc: BTreeMap<u32, f64> = self.nodes.iter().map(|&n| (n, 0.0)).collect();
        for (n, l) in node_loads(profile, layer, &|l, e| self.share(l, e)) {
            *acc.entry(n).or_default() += l;
        }
        acc.into_iter().collect()
    }

    fn weight(&self, node: u32) -> u64 {
        self.weights.get(&node).copied().unwrap_or(1)
    }

    /// [`imbalance`] of one layer under this map, weighted by cores.
    pub fn layer_imbalance(&self, profile: &RoutingProfile, layer: u32) -> Option<f64> {
        imbalance(&self.loads(profile, Some(layer)), &|n| self.weight(n))
    }

    /// The run's imbalance: every layer waits for its busiest node, so this is the sum over
    /// layers of the busiest node's time over the sum of the even-spread times (1 when every
    /// layer is even; layers without tokens do not count).
    pub fn run_imbalance(&self, profile: &RoutingProfile) -> Option<f64> {
        let total_w: f64 = self.nodes.iter().map(|&n| self.weight(n).max(1) as f64).sum();
        let (mut busiest, mut even) = (0.0, 0.0);
        for l in &profile.layers {
            let loads = self.loads(profile, Some(l.layer));
            let total: f64 = loads.iter().map(|x| x.1).sum();
            busiest += loads.iter().map(|x| x.1 / self.weight(x.0).max(1) as f64).fold(0.0, f64::max);
            even += total / total_w;
        }
        (even > 0.0).then(|| busiest / even)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> RoutingProfile {
        RoutingProfile {
            schema: SCHEMA,
            model: ModelSignature { n_expert: 4, expert_layers: vec![0, 2] },
            map: "rows".into(),
            layers: vec![
                LayerRouting { layer: 0, tokens: vec![10, 0, 5, 1], recent: vec![1, 0, 1, 0] },
                LayerRouting { layer: 2, tokens: vec![0, 7, 7, 2], recent: vec![] },
            ],
            nodes: vec![NodeWork { node: 0, rows: 100, bytes: 4096 }, NodeWork { node: 1, rows: 90, bytes: 4000 }],
        }
    }

    #[test]
    fn json_round_trips() {
        let p = sample();
        assert!(p.to_json().contains("\"tokens\": [10, 0, 5, 1]"), "{}", p.to_json());
        let back = RoutingProfile::from_json(&p.to_json(), "t").unwrap();
        assert_eq!(back, p);
        assert_eq!(p.expert_totals(), vec![10, 7, 12, 3]);
        assert_eq!(p.layer(2).unwrap().tokens[1], 7);
        assert!(p.layer(1).is_none());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = RoutingProfile::from_json("{", "f.json").unwrap_err();
        assert!(e.message.starts_with("routing profile f.json: not a numa-moe routing file"), "{e}");
        let mut p = sample();
        p.layers[1].tokens.pop();
        let e = RoutingProfile::from_json(&p.to_json(), "f.json").unwrap_err();
        assert!(e.message.contains("layer 2 has 3 token counts, the model has 4 experts"), "{e}");
        let mut p = sample();
        p.schema = 9;
        assert!(RoutingProfile::from_json(&p.to_json(), "f").unwrap_err().message.contains("schema version 9"));
        let e = sample().check_model("f.json", 32).unwrap_err();
        assert_eq!(e.message, "routing profile f.json was recorded on a model with 4 experts; this one has 32");
    }

    fn csv_err(text: &str) -> String {
        RoutingProfile::parse(text, "f.csv").unwrap_err().message
    }

    #[test]
    fn csv_round_trips_and_load_tells_the_formats_apart() {
        let mut p = sample();
        p.map = "0-1:0,*:1 \"x\"".into(); // commas and quotes survive
        let csv = p.to_csv();
        assert!(csv.starts_with("# numa_moe_routing 1\n# n_expert 4\n"), "{csv}");
        assert!(csv.contains("\nlayer,expert,tokens,recent\n0,0,10,1\n") && csv.contains("\n2,3,2,\n"), "{csv}");
        assert_eq!(RoutingProfile::from_csv(&csv, "t").unwrap(), p);
        // rows in any order, CRLF line ends, comments
        let mut lines: Vec<&str> = csv.lines().collect();
        let header = lines.iter().position(|l| *l == CSV_HEADER).unwrap();
        lines[header + 1..].reverse();
        lines.insert(1, "# recorded by hand");
        assert_eq!(RoutingProfile::parse(&lines.join("\r\n"), "t").unwrap(), p);

        let dir = std::env::temp_dir().join(format!("numa-moe-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["p.csv", "p.CSV", "p.json", "p"] {
            let path = dir.join(name);
            p.save(&path).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text.starts_with('{'), !name.to_lowercase().ends_with(".csv"), "{name}: {text}");
            assert_eq!(RoutingProfile::load(&path).unwrap(), p, "{name}");
        }
        // the content decides, not the name
        std::fs::write(dir.join("csv.json"), p.to_csv()).unwrap();
        assert_eq!(RoutingProfile::load(&dir.join("csv.json")).unwrap(), p);
        let e = RoutingProfile::load(&dir.join("missing.csv")).unwrap_err();
        assert!(e.message.starts_with(&format!("cannot read routing profile {}", dir.join("missing.csv").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_csv_names_the_line_and_the_problem() {
        let good = sample().to_csv();
        let with = |from: &str, to: &str| {
            assert!(good.contains(from), "{from}");
            good.replacen(from, to, 1)
        };
        // header is line 5 (schema, n_expert, map, 2 node lines come first: lines 1-5), rows from 7
        assert_eq!(good.lines().position(|l| l == CSV_HEADER), Some(5));
        let e = csv_err("hello\n");
        assert!(e.starts_with("routing profile f.csv, line 1: not a numa-moe routing file"), "{e}");
        assert_eq!(csv_err(""), "routing profile f.csv: the file is empty");
        assert!(csv_err(&with("routing 1", "routing 2")).contains("line 1: schema version 2 is not the 1"));
        assert!(csv_err(&with("n_expert 4", "n_expert 99999")).contains("line 2: n_expert \"99999\" is not a number in 1..=1024"));
        assert!(csv_err(&with("# map \"rows\"", "# map rows")).contains("line 3: the map rows is not a quoted string"));
        assert!(csv_err(&with("rows 90 bytes", "rows 9x bytes")).contains("line 5: expected \"# node NODE rows ROWS bytes BYTES\""));
        assert!(csv_err(&with(CSV_HEADER, "layer,expert,tokens")).contains("line 6: expected the header \"layer,expert,tokens,recent\""));
        let e = csv_err(&with("\n0,2,5,1\n", "\n0,2,five,1\n"));
        assert!(e.contains("line 9: tokens \"five\" is not a whole number"), "{e}");
        let e = csv_err(&with("\n0,2,5,1\n", "\n0,2,5\n"));
        assert!(e.contains("line 9: expected 4 fields (layer,expert,tokens,recent), found 3"), "{e}");
        let e = csv_err(&with("\n0,2,5,1\n", "\n0,7,5,1\n"));
        assert!(e.contains("line 9: expert 7 is beyond the 4 experts of n_expert"), "{e}");
        let e = csv_err(&with("\n0,2,5,1\n", "\n0,1,5,1\n"));
        assert!(e.contains("line 9: layer 0, expert 1 was already given on line 8"), "{e}");
        let e = csv_err(&with("\n0,2,5,1\n", "\n0,2,5,\n"));
        assert!(e.contains("layer 0 has recent counts on line 7 but none on line 9"), "{e}");
        let e = csv_err(&with("\n2,3,2,\n", "\n"));
        assert_eq!(e, "routing profile f.csv: layer 2 has no row for expert 3 (n_expert is 4)");
        let e = csv_err(&with("\n0,2,5,1\n", "\n600,2,5,1\n"));
        assert!(e.contains("line 9: layer 600 is beyond the 512 layers"), "{e}");
        let e = csv_err(&good[..good.find(CSV_HEADER).unwrap()]);
        assert!(e.contains("line 5: the file ends before the header"), "{e}");
        // a CSV of another model is refused like a JSON one
        let p = RoutingProfile::parse(&good, "f.csv").unwrap();
        assert!(p.check_model("f.csv", 8).unwrap_err().message.contains("recorded on a model with 4 experts; this one has 8"));
    }

    #[test]
    fn entropy_and_hottest_experts() {
        assert_eq!(entropy_bits(&[0, 9, 0, 0]), Some(0.0));
        assert_eq!(normalised_entropy(&[0, 9, 0, 0]), Some(0.0));
        assert_eq!(entropy_bits(&[5, 5, 5, 5]), Some(2.0));
        assert_eq!(normalised_entropy(&[5, 5, 5, 5]), Some(1.0));
        assert_eq!(entropy_bits(&[3, 3, 0, 0]), Some(1.0));
        assert_eq!(normalised_entropy(&[3, 3, 0, 0]), Some(0.5));
        let h = entropy_bits(&[2, 1, 1]).unwrap(); // 1/2*1 + 2 * 1/4*2
        assert!((h - 1.5).abs() < 1e-12, "{h}");
        assert_eq!(entropy_bits(&[0, 0]), None);
        assert_eq!(normalised_entropy(&[7]), None);
        let hot = hottest(&[1, 6, 0, 3, 6], 3);
        let got: Vec<(u32, u64, f64)> = hot.iter().map(|h| (h.expert, h.tokens, h.share)).collect();
        assert_eq!(got, vec![(1, 6, 0.375), (4, 6, 0.375), (3, 3, 0.1875)]);
        assert_eq!(hottest(&[0, 4, 0], 3), vec![HotExpert { expert: 1, tokens: 4, share: 1.0 }]);
        assert!(hottest(&[0, 0], 3).is_empty());
    }

    #[test]
    fn loads_and_imbalance_under_an_assignment() {
        let p = sample(); // layer 0: [10, 0, 5, 1], layer 2: [0, 7, 7, 2]
                          // experts 0-1 on node 0, 2-3 on node 1
        let block = |_: u32, e: u32| vec![(if e < 2 { 0 } else { 1 }, 1.0)];
        assert_eq!(node_loads(&p, Some(0), &block), vec![(0, 10.0), (1, 6.0)]);
        assert_eq!(node_loads(&p, None, &block), vec![(0, 17.0), (1, 15.0)]);
        assert_eq!(imbalance(&node_loads(&p, Some(0), &block), &|_| 1), Some(1.25));
        // node 1 twice as fast: 10 / (16 / 3)
        assert_eq!(imbalance(&node_loads(&p, Some(0), &block), &|n| 1 + n as u64), Some(1.875));
        let halves = |_: u32, _: u32| vec![(0, 0.5), (1, 0.5)];
        assert_eq!(node_loads(&p, Some(2), &halves), vec![(0, 8.0), (1, 8.0)]);
        assert_eq!(imbalance(&node_loads(&p, Some(2), &halves), &|_| 1), Some(1.0));
        // an idle node counts: everything on node 0 of two
        assert_eq!(imbalance(&[(0, 16.0), (1, 0.0)], &|_| 1), Some(2.0));
        assert_eq!(imbalance(&[(0, 0.0)], &|_| 1), None);
    }

    #[test]
    fn imbalance_under_a_map_is_the_planners_placement() {
        let p = sample();
        let topo = Topology::uniform(2, 4, 64);
        let plan = |m: &str| MapPlacement::plan(&p, &topo, &ExpertMap::parse(m).unwrap()).unwrap();
        let rows = plan("rows");
        assert_eq!(rows.layer(0).unwrap().kind, "rows");
        assert_eq!(rows.share(0, 3), vec![(0, 0.5), (1, 0.5)]);
        assert_eq!(rows.layer_imbalance(&p, 0), Some(1.0));
        assert_eq!(rows.run_imbalance(&p), Some(1.0));
        let block = plan("block");
        assert_eq!(block.loads(&p, Some(0)), vec![(0, 10.0), (1, 6.0)]);
        assert_eq!(block.layer_imbalance(&p, 0), Some(1.25));
        assert_eq!(block.layer_imbalance(&p, 2), Some(9.0 / 8.0));
        // (10 + 9) / (8 + 8)
        assert_eq!(block.run_imbalance(&p), Some(19.0 / 16.0));
        // explicit maps, copies split rows, an idle node, per-layer rules and off
        let m = plan("blk.0=0-2:0,3:0+1;blk.2=off;block@0");
        assert_eq!(m.layer(0).unwrap().kind, "explicit map");
        assert_eq!(m.loads(&p, Some(0)), vec![(0, 15.5), (1, 0.5)]);
        assert_eq!(m.layer(2).unwrap().kind, "off");
        assert_eq!(m.layer_imbalance(&p, 2), Some(1.0));
        let on0 = plan("block@0");
        assert_eq!(on0.loads(&p, None), vec![(0, 32.0), (1, 0.0)]);
        assert_eq!(on0.layer_imbalance(&p, 2), Some(2.0));
        // rows follow cores: a 4-core and a 2-core node are even per core
        let mut nodes = topo.nodes().to_vec();
        nodes[1].cpus.truncate(2);
        let uneven = Topology::from_parts(nodes, None, crate::topology::Source::Manual).unwrap();
        let r = MapPlacement::plan(&p, &uneven, &ExpertMap::parse("rows").unwrap()).unwrap();
        let s = r.share(2, 0);
        assert!((s[0].1 - 2.0 / 3.0).abs() < 1e-3 && (s[1].1 - 1.0 / 3.0).abs() < 1e-3, "{s:?}");
        assert!((r.layer_imbalance(&p, 0).unwrap() - 1.0).abs() < 1e-3);
        // a map naming a node the machine lacks, or experts the profile lacks
        let e = MapPlacement::plan(&p, &topo, &ExpertMap::parse("rows@0,5").unwrap()).unwrap_err();
        assert!(e.message.contains("node 5 does not exist"), "{e}");
        let e = MapPlacement::plan(&p, &topo, &ExpertMap::parse("0-1:0").unwrap()).unwrap_err();
        assert!(e.message.contains("experts 2-3") && e.message.contains("blk.0 of the routing profile"), "{e}");
    }
}
