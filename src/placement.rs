//! Pure planning: which bytes of every stacked expert tensor live on which node, which node
//! computes which (expert, row range), and how worker threads are laid out on nodes.
//!
//! No syscalls and no unsafe: the input is a [`Topology`], an [`ExpertMap`] and the shape of
//! each expert tensor; the output is a [`TensorPlan`] the memory layer binds and the compute
//! hook follows. Invariants the tests check for every policy:
//! - the primary copy places every byte of the tensor exactly once (replicas add copies);
//! - every (expert, row) is computed exactly once, from a copy that holds it on that node;
//! - under `rows`, nodes of equal weight get row counts that differ by at most one unit;
//! - under `balanced`, every expert not copied to every node lives whole on one node, chosen
//!   by LPT on the routing profile's counts ([`balanced_assignment`]).

use std::fmt;
use std::ops::Range;

use crate::expert_map::{layer_of, ExpertMap, MapError, Policy, Resolved, MAX_EXPERTS, MAX_LAYERS};
use crate::routing::RoutingProfile;
use crate::topology::{format_gib, Topology};

/// One stacked expert tensor, as the planner needs to know it. [`stacked_expert`] makes them
/// from a file's or ggml's view, with at most [`MAX_EXPERTS`] experts and a size that fits in
/// 64 bits, so [`ExpertTensor::bytes`] does not overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTensor {
    /// GGUF name, e.g. "blk.3.ffn_up_exps.weight".
    pub name: String,
    /// The block number parsed from the name, if any.
    pub layer: Option<u32>,
    /// ggml type name for reports ("q4_K").
    pub type_name: String,
    /// ne[2]
    pub n_expert: u32,
    /// ne[1]: rows of one expert's matrix (outputs of the matmul).
    pub rows: u64,
    /// nb[1]: bytes of one row.
    pub row_bytes: u64,
    /// Rows stored interleaved as one group (CPU_REPACK's layouts, e.g. 8 for q4_K 8x8; 1 for
    /// ggml's standard layout): every split point is a multiple of it.
    pub row_group: u64,
}

impl ExpertTensor {
    /// Whether the map's `dense=` rule places it: a weight matrix (one "expert"), or a stack
    /// of per-head attention matrices (MLA's `attn_k_b`, `attn_v_b`), rather than routed experts.
    pub fn is_dense(&self) -> bool {
        is_dense(self.n_expert, crate::weights::category_of(&self.name))
    }

    pub fn expert_bytes(&self) -> u64 {
        self.rows * self.row_bytes
    }

    pub fn bytes(&self) -> u64 {
        self.expert_bytes() * self.n_expert as u64
    }
}

/// [`ExpertTensor::is_dense`] from a tensor's matrix count and category (for callers that keep
/// the category, such as a placed tensor on the compute path).
pub fn is_dense(n_expert: u32, category: crate::weights::Category) -> bool {
    n_expert == 1 || category == crate::weights::Category::Attention
}

/// The one rule for what a stacked expert tensor is, shared by the GGUF reader (what
/// `numa-moe plan` reports) and the ggml buffer (what is placed at load), so that both agree:
///
/// - a packed tensor (rows and experts back to back, ggml's standard layout) of shape
///   `ne = [cols, rows, n_expert, 1]` with `n_expert >= 2`, `rows >= 1` and rows of at least one
///   byte is a stack: `Ok(Some(..))`;
/// - anything else is not ours and passes through to llama.cpp: `Ok(None)`;
/// - a stack llama.cpp could not load either is an error naming the tensor, never a smaller or
///   wrapped-around one: more than [`MAX_EXPERTS`] experts, a block number of
///   [`MAX_LAYERS`] or more, an unknown element type (`row_bytes` is `None`), or a size that
///   does not fit in 64 bits.
///
/// `row_bytes` is the size of one row (ggml's nb[1]).
pub fn stacked_expert(
    name: &str,
    type_name: &str,
    ne: [u64; 4],
    row_bytes: Option<u64>,
    packed: bool,
) -> Result<Option<ExpertTensor>, String> {
    let [_, rows, n_expert, outer] = ne;
    if !packed || outer != 1 || n_expert < 2 || rows < 1 || row_bytes == Some(0) {
        return Ok(None);
    }
    let Some(row_bytes) = row_bytes else {
        return Err(format!("tensor \"{name}\" has an unknown element type ({type_name}), so its size is unknown"));
    };
    if n_expert > MAX_EXPERTS as u64 {
        return Err(format!("tensor \"{name}\" has {n_expert} experts (ne[2]); llama.cpp supports at most {MAX_EXPERTS}"));
    }
    let layer = layer_of(name);
    if let Some(l) = layer.filter(|&l| l >= MAX_LAYERS) {
        return Err(format!("tensor \"{name}\" is in layer {l}; llama.cpp supports at most {MAX_LAYERS} layers (0-{})", MAX_LAYERS - 1));
    }
    if rows.checked_mul(row_bytes).and_then(|b| b.checked_mul(n_expert)).is_none() {
        return Err(format!("tensor \"{name}\": {n_expert} experts of {rows} rows of {row_bytes} bytes: its size overflows 64 bits"));
    }
    Ok(Some(ExpertTensor {
        name: name.to_string(),
        layer,
        type_name: type_name.to_string(),
        n_expert: n_expert as u32,
        rows,
        row_bytes,
        row_group: 1,
    }))
}

/// A 2-D weight matrix (attention, shared expert, dense FFN, output head: any weight a
/// MUL_MAT multiplies), planned as one "expert" by the map's `dense=` rule: ggml's packed
/// layout, shape `[cols, rows, 1, 1]`, named `*.weight` (llama.cpp probes scale tensors with
/// their weight's op), at least two rows of at least one byte, a known type and
/// a size that fits in 64 bits, and not one of the small weights left to llama.cpp
/// ([`crate::weights::left_to_llama`]: norms, biases, the embeddings). Anything else is
/// `None`.
pub fn weight_matrix(name: &str, type_name: &str, ne: [u64; 4], row_bytes: Option<u64>, packed: bool) -> Option<ExpertTensor> {
    let [cols, rows, n2, n3] = ne;
    let row_bytes = row_bytes.filter(|&b| b > 0)?;
    // a weight (not a scale or bias tensor: llama.cpp probes those with their weight's op),
    // of at least two rows (one row cannot be split)
    let weight = name.ends_with(".weight") && !crate::weights::left_to_llama(name);
    if !weight || !packed || n2 != 1 || n3 != 1 || rows < 2 || cols < 1 || rows.checked_mul(row_bytes).is_none() {
        return None;
    }
    Some(ExpertTensor {
        name: name.to_string(),
        layer: layer_of(name).filter(|&l| l < MAX_LAYERS),
        type_name: type_name.to_string(),
        n_expert: 1,
        rows,
        row_bytes,
        row_group: 1,
    })
}

/// A stack of per-head attention matrices multiplied by one batched MUL_MAT (MLA's
/// `attn_k_b`, `attn_v_b`: `[cols, rows, n_head, 1]`), planned like an expert stack whose
/// "experts" are heads, by the map's `dense=` rule ([`ExpertTensor::is_dense`]).
pub fn head_stack(name: &str, type_name: &str, ne: [u64; 4], row_bytes: Option<u64>, packed: bool) -> Option<ExpertTensor> {
    if !name.ends_with(".weight") || crate::weights::category_of(name) != crate::weights::Category::Attention {
        return None;
    }
    stacked_expert(name, type_name, ne, row_bytes, packed).ok().flatten()
}

/// The CPU features ggml-cpu's CPU_REPACK chooses its layouts by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepackCpu {
    pub avx2: bool,
    pub avx512: bool,
    /// aarch64 dot-product and int8 matrix-multiply extensions.
    pub dotprod: bool,
    pub i8mm: bool,
}

impl RepackCpu {
    /// This machine's features. ggml-cpu asks its build's features: a portable x86-64-v3
    /// build has no AVX-512 even on a CPU that has it, so AVX-512 layouts are predicted for
    /// a native build.
    pub fn this_machine() -> RepackCpu {
        #[cfg(target_arch = "x86_64")]
        return RepackCpu { avx2: is_x86_feature_detected!("avx2"), avx512: is_x86_feature_detected!("avx512f"), ..Default::default() };
        #[cfg(target_arch = "aarch64")]
        return RepackCpu {
            dotprod: std::arch::is_aarch64_feature_detected!("dotprod"),
            i8mm: std::arch::is_aarch64_feature_detected!("i8mm"),
            ..Default::default()
        };
        #[allow(unreachable_code)]
        RepackCpu::default()
    }
}

/// The rows CPU_REPACK interleaves for a stack of `type_name` with `rows` rows per expert on
/// `cpu`: ggml's rule at the pin (ggml_repack_get_optimal_repack_type in ggml-cpu/repack.cpp),
/// for `numa-moe plan`, which cannot ask ggml. `None`: ggml keeps the standard layout. At load,
/// numa-moe asks ggml itself; this is the prediction.
pub fn predicted_repack_group(type_name: &str, rows: u64, cpu: RepackCpu) -> Option<u64> {
    let group = match type_name {
        "q4_0" if cpu.avx2 => 8,
        "q4_0" if cpu.i8mm || cpu.dotprod => 4,
        "q4_K" if cpu.avx2 || cpu.i8mm || cpu.dotprod => 8,
        "q2_K" if cpu.avx512 => 8,
        "q5_K" | "q6_K" if cpu.i8mm || cpu.dotprod => 8,
        "iq4_nl" | "mxfp4" if cpu.avx2 => 8,
        "iq4_nl" | "mxfp4" if cpu.dotprod => 4,
        "q8_0" if cpu.i8mm || cpu.dotprod => 4,
        _ => return None,
    };
    (rows % group == 0).then_some(group)
}

/// Where an extent's pages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// All pages on this node.
    Node(u32),
    /// Pages spread round-robin over these nodes by the kernel.
    Interleave(Vec<u32>),
}

/// A byte range of one copy of a tensor (offsets from the tensor's first byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub binding: Binding,
}

impl Extent {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// One copy of a tensor's bytes. Copy 0 is the primary: the ggml tensor's own memory, in
/// ggml's standard layout, covering every byte. Replicas hold the experts that a map places
/// on several nodes (every expert, under `mirror`), at the same offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// The node a replica serves; `None` for the primary.
    pub node: Option<u32>,
    pub extents: Vec<Extent>,
}

/// Rows of one expert computed by the threads of one node, reading one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub expert: u32,
    pub rows: Range<u64>,
    pub node: u32,
    pub copy: usize,
}

/// How the expert matmuls of a tensor are computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compute {
    /// Node-local pieces (see [`Piece`]).
    Pieces(Vec<Piece>),
    /// ggml-cpu's own kernel on the primary copy (`interleave`).
    Stock,
}

/// Which policy produced a plan, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    Policy(Policy),
    Explicit,
}

impl fmt::Display for PlanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanKind::Policy(p) => f.write_str(p.name()),
            PlanKind::Explicit => f.write_str("explicit map"),
        }
    }
}

/// The plan for one expert tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub tensor: ExpertTensor,
    pub kind: PlanKind,
    pub copies: Vec<CopyPlan>,
    pub compute: Compute,
}

impl TensorPlan {
    /// Bytes this plan places on each node, over all copies; interleaved extents are
    /// counted evenly over their nodes.
    pub fn bytes_per_node(&self) -> Vec<(u32, u64)> {
        let mut acc: std::collections::BTreeMap<u32, u64> = Default::default();
        for c in &self.copies {
            for e in &c.extents {
                match &e.binding {
                    Binding::Node(n) => *acc.entry(*n).or_default() += e.len,
                    Binding::Interleave(ns) => {
                        for n in ns {
                            *acc.entry(*n).or_default() += e.len / ns.len() as u64;
                        }
                    }
                }
            }
        }
        acc.into_iter().collect()
    }

    pub fn pieces(&self) -> &[Piece] {
        match &self.compute {
            Compute::Pieces(p) => p,
            Compute::Stock => &[],
        }
    }

    /// The node that should hold byte `offset` of copy `copy`, if the copy holds it.
    pub fn node_of_byte(&self, copy: usize, offset: u64) -> Option<&Binding> {
        self.copies.get(copy)?.extents.iter().find(|e| e.range().contains(&offset)).map(|e| &e.binding)
    }

    /// The rows of every expert that `node` computes, as a short description
    /// ("rows 0-383 of every expert", "experts 0-63", ...), for reports.
    pub fn describe_share(&self, node: u32) -> String {
        let pieces: Vec<&Piece> = self.pieces().iter().filter(|p| p.node == node).collect();
        if let Compute::Stock = self.compute {
            return "interleaved pages".into();
        }
        if pieces.is_empty() {
            return "nothing".into();
        }
        let n = self.tensor.n_expert as usize;
        let rows = self.tensor.rows;
        let first = &pieces[0].rows;
        if n == 1 {
            let list: Vec<String> = pieces.iter().map(|p| format!("{}-{}", p.rows.start, p.rows.end - 1)).collect();
            return if pieces.iter().all(|p| p.rows == (0..rows)) { "all rows".into() } else { format!("rows {}", list.join(",")) };
        }
        if pieces.len() == n && pieces.iter().all(|p| p.rows == *first) && first.clone() != (0..rows) {
            return format!("rows {}-{} of every expert", first.start, first.end - 1);
        }
        let experts: Vec<u32> = pieces.iter().map(|p| p.expert).collect();
        let whole = pieces.iter().all(|p| p.rows == (0..rows));
        let list = crate::topology::render_cpu_list(&experts);
        let noun = if experts.len() == 1 { "expert" } else { "experts" };
        if whole {
            format!("{noun} {list}")
        } else {
            format!("parts of {noun} {list}")
        }
    }
}

/// Options a user can set around a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Page size of the memory the plan will be bound to; row splits are aligned to it
    /// where whole rows allow.
    pub page_size: u64,
    /// Split rows by node cores (true) or evenly (false).
    pub by_cores: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { page_size: 4096, by_cores: true }
    }
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    Map(MapError),
    /// A node would receive more than it has free.
    OverFull {
        node: u32,
        need: u64,
        free: u64,
    },
    /// No node can hold experts (none has both memory and CPUs).
    NoNodes,
    /// The tensor's layout is not one numa-moe can place.
    Unsupported(String),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Map(e) => e.fmt(f),
            PlanError::OverFull { node, need, free } => write!(
                f,
                "node {node} is over-full: the plan places {} there but it has {} free ({} short)",
                format_gib(*need),
                format_gib(*free),
                format_gib(need - free)
            ),
            PlanError::NoNodes => f.write_str("no NUMA node has both memory and usable CPUs"),
            PlanError::Unsupported(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for PlanError {}

impl From<MapError> for PlanError {
    fn from(e: MapError) -> Self {
        PlanError::Map(e)
    }
}

/// Plans one tensor, or returns `None` when the map leaves it to llama.cpp.
pub fn plan_tensor(topo: &Topology, map: &ExpertMap, tensor: &ExpertTensor, opts: &PlanOptions) -> Result<Option<TensorPlan>, PlanError> {
    if tensor.n_expert == 0 || tensor.rows == 0 || tensor.row_bytes == 0 {
        return Err(PlanError::Unsupported(format!("{} has an empty expert dimension", tensor.name)));
    }
    if tensor.row_group == 0 || tensor.rows % tensor.row_group != 0 {
        return Err(PlanError::Unsupported(format!(
            "{}: {} rows are not a whole number of {}-row interleaved groups",
            tensor.name, tensor.rows, tensor.row_group
        )));
    }
    let planner = Planner { topo, tensor, opts };
    // a weight matrix outside the routed experts (one "expert", or per-head attention
    // matrices): the map's dense= rule
    let resolved = if tensor.is_dense() { map.resolve_dense() } else { map.resolve(tensor.layer, tensor.n_expert, &tensor.name)? };
    match resolved {
        Resolved::Off => Ok(None),
        Resolved::Policy { policy, nodes } => {
            let nodes = match nodes {
                Some(n) => n,
                None => topo.compute_nodes(),
            };
            if nodes.is_empty() {
                return Err(PlanError::NoNodes);
            }
            let policy = match policy {
                Policy::Auto if topo.compute_nodes().len() > 1 => Policy::Rows,
                Policy::Auto => return Ok(None),
                p => p,
            };
            let kind = PlanKind::Policy(policy);
            Ok(Some(match policy {
                Policy::Rows => planner.explicit(kind, &vec![nodes; tensor.n_expert as usize], false),
                Policy::Mirror => planner.explicit(kind, &vec![nodes; tensor.n_expert as usize], true),
                Policy::Block | Policy::Balanced => planner.explicit(PlanKind::Policy(Policy::Block), &planner.block(&nodes), true),
                Policy::RoundRobin => {
                    let holders: Vec<Vec<u32>> = (0..tensor.n_expert as usize).map(|e| vec![nodes[e % nodes.len()]]).collect();
                    planner.explicit(kind, &holders, true)
                }
                Policy::Interleave => TensorPlan {
                    tensor: tensor.clone(),
                    kind,
                    copies: vec![CopyPlan {
                        node: None,
                        extents: vec![Extent { offset: 0, len: tensor.bytes(), binding: Binding::Interleave(nodes) }],
                    }],
                    compute: Compute::Stock,
                },
                Policy::Auto | Policy::Off => unreachable!("resolved above"),
            }))
        }
        Resolved::Explicit { holders } => Ok(Some(planner.explicit(PlanKind::Explicit, &holders, true))),
        Resolved::Balanced { nodes, profile, copies_percent } => {
            let nodes = nodes.unwrap_or_else(|| topo.compute_nodes());
            if nodes.is_empty() {
                return Err(PlanError::NoNodes);
            }
            Ok(Some(match profile {
                // no profile: `block`, which config has said once
                None => planner.explicit(PlanKind::Policy(Policy::Block), &planner.block(&nodes), true),
                Some(p) => planner.explicit(PlanKind::Policy(Policy::Balanced), &planner.balanced(&nodes, &p, copies_percent), true),
            }))
        }
    }
}

/// The load of each of `n_expert` experts of `layer` as `profile` recorded it: the layer's
/// counts; where the layer has none (absent, or all zero), the counts over all layers; where
/// those are zero too, 1 each (no knowledge: every expert alike). Always `n_expert` entries
/// (a profile of another size, which [`ExpertMap::resolve`] refuses, is cut or padded with 0).
pub fn expert_loads(profile: &RoutingProfile, layer: Option<u32>, n_expert: u32) -> Vec<u64> {
    let n = n_expert as usize;
    let fit = |mut v: Vec<u64>| {
        v.resize(n, 0);
        v
    };
    if let Some(l) = layer.and_then(|l| profile.layer(l)).filter(|l| l.tokens.iter().any(|&t| t > 0)) {
        return fit(l.tokens.clone());
    }
    let totals = fit(profile.expert_totals());
    if totals.iter().any(|&t| t > 0) {
        totals
    } else {
        vec![1; n]
    }
}

/// Longest processing time first, on nodes of different speeds: experts by descending load
/// (ties: lower expert first), each to the node whose load per weight is smallest once it is
/// added (ties: lower node id). `nodes` are (node id, weight); a weight is taken as at least
/// 1 and at most 2^32. Returns the node of every expert, or an empty vector when `nodes` is.
///
/// Bound (what tests/planner_props.rs checks): with total load `T`, weights summing to `W`,
/// `m` nodes and the largest load `p`, every node ends with load/weight at most
/// `(T + (m-1)·p) / W` (when a job is placed, `(L_k + p_j)/w_k >= C` for every node `k`;
/// summing over the nodes gives `C·W <= T + (m-1)·p_j`). With equal weights this is
/// Graham's bound; LPT's own is also checked there, against the exact optimum of small cases.
pub fn balanced_assignment(loads: &[u64], nodes: &[(u32, u64)]) -> Vec<u32> {
    lpt(loads, &vec![true; loads.len()], nodes).into_iter().map(|n| n.unwrap_or(0)).collect()
}

/// [`balanced_assignment`] of the experts with `take[e]`; the others get `None`.
fn lpt(loads: &[u64], take: &[bool], nodes: &[(u32, u64)]) -> Vec<Option<u32>> {
    let mut out = vec![None; loads.len()];
    if nodes.is_empty() {
        return Vec::new();
    }
    let weight: Vec<u128> = nodes.iter().map(|&(_, w)| w.clamp(1, 1 << 32) as u128).collect();
    let mut order: Vec<usize> = (0..loads.len()).filter(|&e| take.get(e).copied().unwrap_or(false)).collect();
    order.sort_by(|&a, &b| loads[b].cmp(&loads[a]).then(a.cmp(&b)));
    // sums of at most 1024 u64 loads, times weights below 2^33: well inside u128
    let mut sum = vec![0u128; nodes.len()];
    for e in order {
        let l = loads[e] as u128;
        let mut best = 0;
        for k in 1..nodes.len() {
            // (sum_k + l) / w_k  vs  (sum_best + l) / w_best, without division
            let (a, b) = ((sum[k] + l) * weight[best], (sum[best] + l) * weight[k]);
            if a < b || (a == b && nodes[k].0 < nodes[best].0) {
                best = k;
            }
        }
        sum[best] += l;
        out[e] = Some(nodes[best].0);
    }
    out
}

/// The experts to copy to every one of `nodes_len` nodes: the hottest with a non-zero load
/// (ties: lower expert first), as many as fit in `percent` of the tensor's size, each copy
/// costing one expert's bytes on every node but its primary's.
fn hot_experts(tensor: &ExpertTensor, loads: &[u64], percent: u32, nodes_len: usize) -> Vec<bool> {
    let mut hot = vec![false; loads.len()];
    if percent == 0 || nodes_len < 2 {
        return hot;
    }
    let budget = tensor.bytes() as u128 * percent as u128 / 100;
    let cost = tensor.expert_bytes() as u128 * (nodes_len as u128 - 1);
    let fit = (budget / cost.max(1)).min(loads.len() as u128) as usize;
    let mut order: Vec<usize> = (0..loads.len()).filter(|&e| loads[e] > 0).collect();
    order.sort_by(|&a, &b| loads[b].cmp(&loads[a]).then(a.cmp(&b)));
    for e in order.into_iter().take(fit) {
        hot[e] = true;
    }
    hot
}

/// Rows of one expert per node: what [`Planner::split_rows`] returns.
type RowSplit = Vec<(u32, Range<u64>)>;

struct Planner<'a> {
    topo: &'a Topology,
    tensor: &'a ExpertTensor,
    opts: &'a PlanOptions,
}

impl Planner<'_> {
    /// Compute weight of each node: its cores (or 1 each when splitting evenly). A node with
    /// no CPUs (memory only) gets the mean of the others, so it still holds a fair share.
    fn weights(&self, nodes: &[u32]) -> Vec<u64> {
        if !self.opts.by_cores {
            return vec![1; nodes.len()];
        }
        core_weights(self.topo, nodes)
    }

    /// `block`: contiguous ranges of whole experts, sized by the nodes' weights.
    fn block(&self, nodes: &[u32]) -> Vec<Vec<u32>> {
        let counts = apportion(self.tensor.n_expert as u64, &self.weights(nodes));
        let mut holders = Vec::new();
        for (n, c) in nodes.iter().zip(counts) {
            holders.extend(std::iter::repeat_n(vec![*n], c as usize));
        }
        holders
    }

    /// `balanced`: the hottest experts on every node within the copy budget (each node then
    /// computes its share of their rows, which adds the same load per weight to every node,
    /// so it does not change where the others go), every other expert whole on the node LPT
    /// picks for it from the profile's counts.
    fn balanced(&self, nodes: &[u32], profile: &RoutingProfile, copies_percent: u32) -> Vec<Vec<u32>> {
        let t = self.tensor;
        let loads = expert_loads(profile, t.layer, t.n_expert);
        let weighted: Vec<(u32, u64)> = nodes.iter().copied().zip(self.weights(nodes)).collect();
        let hot = hot_experts(t, &loads, copies_percent, nodes.len());
        let cold: Vec<bool> = hot.iter().map(|h| !h).collect();
        let at = lpt(&loads, &cold, &weighted);
        (0..loads.len()).map(|e| if hot[e] { nodes.to_vec() } else { vec![at[e].unwrap_or(nodes[0])] }).collect()
    }

    /// Rows per split unit: the fewest whole row groups whose bytes are a multiple of the page
    /// size, so that row boundaries fall on page boundaries, halved (never below one row
    /// group) until every node gets at least 32 units. Coarser units would unbalance the
    /// split (one unit is the most two equal nodes may differ by); a boundary that is not
    /// page aligned costs one shared page.
    fn row_unit(&self, parts: usize) -> u64 {
        let group = self.tensor.row_group.max(1);
        let gb = self.tensor.row_bytes * group;
        let page = self.opts.page_size.max(1);
        let mut groups = page / gcd(page, gb);
        while groups > 1 && groups * group * 32 * parts as u64 > self.tensor.rows {
            groups /= 2;
        }
        groups.max(1) * group
    }

    /// Splits `0..rows` over `nodes` by weight, contiguously in node order, in whole units
    /// (largest remainder, so ties favour earlier nodes); the rows past the last whole unit go
    /// to the last node, which gets the smaller share on a tie. Nodes of equal weight thus
    /// differ by at most one unit.
    fn split_rows(&self, nodes: &[u32]) -> RowSplit {
        let rows = self.tensor.rows;
        let unit = self.row_unit(nodes.len());
        let counts = apportion(rows / unit, &self.weights(nodes));
        let mut start = 0;
        let mut out = Vec::new();
        for (i, (&n, c)) in nodes.iter().zip(counts).enumerate() {
            let end = if i + 1 == nodes.len() { rows } else { start + c * unit };
            if end > start {
                out.push((n, start..end));
            }
            start = end;
        }
        out
    }

    /// The general plan: `holders[e]` lists the nodes that hold expert `e`. With one holder the
    /// expert lives there whole; with several, either each holds a full copy (`copies`) and
    /// computes its share of rows from it, or (`rows`) each holds only its share of rows.
    fn explicit(&self, kind: PlanKind, holders: &[Vec<u32>], copies: bool) -> TensorPlan {
        let t = self.tensor;
        let eb = t.expert_bytes();
        let rb = t.row_bytes;
        let mut primary: Vec<Extent> = Vec::new();
        let mut replicas: Vec<CopyPlan> = Vec::new();
        let mut pieces = Vec::new();
        let push = |extents: &mut Vec<Extent>, offset: u64, len: u64, node: u32| {
            if let Some(last) = extents.last_mut() {
                if last.binding == Binding::Node(node) && last.offset + last.len == offset {
                    last.len += len;
                    return;
                }
            }
            extents.push(Extent { offset, len, binding: Binding::Node(node) });
        };
        // Row splits depend only on the holder set; compute each distinct one once.
        let mut splits: Vec<(Vec<u32>, RowSplit)> = Vec::new();
        for (e, nodes) in holders.iter().enumerate() {
            let base = e as u64 * eb;
            if nodes.len() == 1 {
                push(&mut primary, base, eb, nodes[0]);
                pieces.push(Piece { expert: e as u32, rows: 0..t.rows, node: nodes[0], copy: 0 });
                continue;
            }
            let split = match splits.iter().find(|(k, _)| k == nodes) {
                Some((_, s)) => s.clone(),
                None => {
                    let s = self.split_rows(nodes);
                    splits.push((nodes.clone(), s.clone()));
                    s
                }
            };
            if copies {
                push(&mut primary, base, eb, nodes[0]);
                for &n in &nodes[1..] {
                    let idx = match replicas.iter().position(|c| c.node == Some(n)) {
                        Some(i) => i,
                        None => {
                            replicas.push(CopyPlan { node: Some(n), extents: Vec::new() });
                            replicas.len() - 1
                        }
                    };
                    push(&mut replicas[idx].extents, base, eb, n);
                }
            } else {
                for (n, r) in &split {
                    push(&mut primary, base + r.start * rb, (r.end - r.start) * rb, *n);
                }
            }
            for (n, r) in split {
                let copy = if !copies || n == nodes[0] {
                    0
                } else {
                    1 + replicas.iter().position(|c| c.node == Some(n)).expect("replica made above")
                };
                pieces.push(Piece { expert: e as u32, rows: r, node: n, copy });
            }
        }
        let mut all = vec![CopyPlan { node: None, extents: primary }];
        all.extend(replicas);
        TensorPlan { tensor: t.clone(), kind, copies: all, compute: Compute::Pieces(pieces) }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The weight of each of `nodes` when work is shared by cores: its cores, and for a node
/// without CPUs the mean of the others (its pieces are computed by a neighbour's threads).
pub fn core_weights(topo: &Topology, nodes: &[u32]) -> Vec<u64> {
    let cores: Vec<u64> = nodes.iter().map(|&n| topo.node(n).map_or(0, |n| n.cores() as u64)).collect();
    let with: Vec<u64> = cores.iter().copied().filter(|&c| c > 0).collect();
    let mean = if with.is_empty() { 1 } else { (with.iter().sum::<u64>() / with.len() as u64).max(1) };
    cores.into_iter().map(|c| if c == 0 { mean } else { c }).collect()
}

/// Divides `total` into parts proportional to `weights` (largest remainder; ties to the
/// earlier part), so parts of equal weight differ by at most one.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u64 = weights.iter().sum();
    if sum == 0 || weights.is_empty() {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = weights.iter().map(|&w| (total as u128 * w as u128 / sum as u128) as u64).collect();
    let mut rem: Vec<(u128, usize)> = weights.iter().enumerate().map(|(i, &w)| ((total as u128 * w as u128) % sum as u128, i)).collect();
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let short = total - parts.iter().sum::<u64>();
    for &(_, i) in rem.iter().take(short as usize) {
        parts[i] += 1;
    }
    parts
}

/// Bytes per node over many plans, checked against each node's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub node: u32,
    pub bytes: u64,
    pub tensors: usize,
    pub budget: u64,
}

/// Sums what `plans` place on each node and fails on the first node that cannot hold it.
pub fn node_loads(topo: &Topology, plans: &[TensorPlan]) -> Vec<NodeLoad> {
    topo.nodes()
        .iter()
        .map(|n| {
            let mut bytes = 0;
            let mut tensors = 0;
            for p in plans {
                if let Some((_, b)) = p.bytes_per_node().into_iter().find(|(id, _)| *id == n.id) {
                    bytes += b;
                    tensors += 1;
                }
            }
            NodeLoad { node: n.id, bytes, tensors, budget: n.budget_bytes() }
        })
        .collect()
}

pub fn check_budget(loads: &[NodeLoad]) -> Result<(), PlanError> {
    for l in loads {
        if l.bytes > l.budget {
            return Err(PlanError::OverFull { node: l.node, need: l.bytes, free: l.budget });
        }
    }
    Ok(())
}

/// A worker thread's place: the node it serves and the CPU it prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSlot {
    pub node: u32,
    pub cpu: u32,
}

/// The node index (into `weights`) of each of the first `len` workers. Every node with weight
/// gets one worker first (heaviest first, lower index on ties), so that with at least as many
/// threads as nodes each node computes its own pieces; every further worker goes to the node
/// furthest below its weighted share. A worker's node depends on its index only, never on how
/// many workers there are: switching between llama.cpp's n_threads and n_threads_batch moves
/// no thread, and the workers 0..n of any n are spread by weight.
pub fn worker_sequence(weights: &[u64], len: usize) -> Vec<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let mut first: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0).collect();
    first.sort_by_key(|&i| (std::cmp::Reverse(weights[i]), i));
    let mut taken = vec![0u64; weights.len()];
    let mut out = Vec::with_capacity(len);
    for k in 1..=len as u64 {
        let pick = match first.get(k as usize - 1) {
            Some(&i) => i,
            // deficit of i after k picks: w_i * k / total - taken_i, compared times total
            None => (0..weights.len())
                .max_by_key(|&i| {
                    ((weights[i] as u128 * k as u128) as i128 - (taken[i] as u128 * total as u128) as i128, std::cmp::Reverse(i))
                })
                .expect("non-empty"),
        };
        taken[pick] += 1;
        out.push(pick);
    }
    out
}

/// Lays out `n_threads` workers as the hook does: worker i on the node [`worker_sequence`]
/// gives it over the nodes with usable CPUs, weighted by cores; inside a node, physical cores
/// first and SMT siblings only once every core has a worker.
pub fn plan_workers(topo: &Topology, n_threads: usize) -> Vec<WorkerSlot> {
    let nodes: Vec<_> = topo.nodes().iter().filter(|n| n.has_cpus()).collect();
    let weights: Vec<u64> = nodes.iter().map(|n| n.cores() as u64).collect();
    let orders: Vec<_> = nodes.iter().map(|n| n.cpus_cores_first()).collect();
    let mut on_node = vec![0usize; nodes.len()];
    worker_sequence(&weights, n_threads)
        .into_iter()
        .map(|i| {
            let cpu = orders[i][on_node[i] % orders[i].len()].os;
            on_node[i] += 1;
            WorkerSlot { node: nodes[i].id, cpu }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(name: &str, rows: u64) -> ExpertTensor {
        weight_matrix(name, "q8_0", [7168, rows, 1, 1], Some(7616), true).expect("a matrix")
    }

    #[test]
    fn weight_matrices_follow_the_dense_rule() {
        let two = Topology::from_spec("package:2 numa:1 core:4 pu:1").unwrap();
        let one = Topology::from_spec("package:1 numa:1 core:4 pu:1").unwrap();
        let opts = PlanOptions::default();
        let t = matrix("blk.0.attn_q_b.weight", 1536);
        // auto: rows on two nodes, each node its half of the rows, one copy of every byte
        let plan = plan_tensor(&two, &ExpertMap::parse("block").unwrap(), &t, &opts).unwrap().expect("placed");
        assert_eq!(plan.kind, PlanKind::Policy(Policy::Rows));
        assert_eq!(plan.pieces().iter().map(|p| (p.node, p.rows.clone())).collect::<Vec<_>>(), vec![(0, 0..768), (1, 768..1536)]);
        assert_eq!(plan.bytes_per_node(), vec![(0, 768 * 7616), (1, 768 * 7616)]);
        assert_eq!(plan.describe_share(1), "rows 768-1535");
        // off on one node, and where the map says so
        assert!(plan_tensor(&one, &ExpertMap::parse("rows").unwrap(), &t, &opts).unwrap().is_none());
        assert!(plan_tensor(&two, &ExpertMap::parse("rows;dense=off").unwrap(), &t, &opts).unwrap().is_none());
        assert!(plan_tensor(&two, &ExpertMap::parse("off").unwrap(), &t, &opts).unwrap().is_none());
        // mirror: a copy on each node, each computing its half from its own
        let m = plan_tensor(&two, &ExpertMap::parse("rows;dense=mirror").unwrap(), &t, &opts).unwrap().expect("placed");
        assert_eq!(m.bytes_per_node(), vec![(0, 1536 * 7616), (1, 1536 * 7616)]);
        // restricted to a node; an explicit dense rule places on one node too
        let r = plan_tensor(&two, &ExpertMap::parse("rows;dense=rows@1").unwrap(), &t, &opts).unwrap().expect("placed");
        assert_eq!(r.bytes_per_node(), vec![(1, 1536 * 7616)]);
        assert!(plan_tensor(&one, &ExpertMap::parse("dense=rows").unwrap(), &t, &opts).unwrap().is_some());
    }

    #[test]
    fn per_head_attention_stacks_follow_the_dense_rule() {
        let two = Topology::from_spec("package:2 numa:1 core:4 pu:1").unwrap();
        let opts = PlanOptions::default();
        let k_b = head_stack("blk.3.attn_k_b.weight", "q8_0", [128, 512, 16, 1], Some(136), true).expect("a head stack");
        assert!(k_b.is_dense() && k_b.n_expert == 16);
        assert!(head_stack("blk.3.ffn_up_exps.weight", "q8_0", [128, 512, 16, 1], Some(136), true).is_none());
        // every head's rows split, as the experts' under rows; off with the dense rule
        let plan = plan_tensor(&two, &ExpertMap::parse("block").unwrap(), &k_b, &opts).unwrap().expect("placed");
        assert_eq!(plan.kind, PlanKind::Policy(Policy::Rows));
        assert_eq!(plan.pieces().len(), 32);
        assert!(plan_tensor(&two, &ExpertMap::parse("block;dense=off").unwrap(), &k_b, &opts).unwrap().is_none());
    }

    #[test]
    fn only_packed_two_dimensional_weights_are_matrices() {
        assert!(weight_matrix("w.weight", "f32", [8, 4, 1, 1], Some(32), true).is_some());
        assert!(weight_matrix("blk.0.attn_q.scale", "f32", [1, 1, 1, 1], Some(4), true).is_none());
        assert!(weight_matrix("blk.0.attn_q.weight", "f32", [8, 1, 1, 1], Some(32), true).is_none());
        assert!(weight_matrix("blk.0.ffn_gate_inp.weight", "f32", [8, 4, 1, 1], Some(32), true).is_some());
        assert!(weight_matrix("token_embd.weight", "f32", [8, 4, 1, 1], Some(32), true).is_none());
        assert!(weight_matrix("blk.0.attn_norm.weight", "f32", [8, 4, 1, 1], Some(32), true).is_none());
        assert!(weight_matrix("w.weight", "f32", [8, 4, 2, 1], Some(32), true).is_none());
        assert!(weight_matrix("w.weight", "f32", [8, 4, 1, 1], Some(32), false).is_none());
        assert!(weight_matrix("w.weight", "f32", [8, 4, 1, 1], None, true).is_none());
        assert!(weight_matrix("w.weight", "f32", [8, u64::MAX, 1, 1], Some(32), true).is_none());
    }
    use crate::topology::Source;

    #[test]
    fn repack_prediction_follows_ggmls_x86_rule() {
        let avx2 = RepackCpu { avx2: true, ..Default::default() };
        for t in ["q4_0", "q4_K", "iq4_nl", "mxfp4"] {
            assert_eq!(predicted_repack_group(t, 768, avx2), Some(8), "{t}");
            assert_eq!(predicted_repack_group(t, 764, avx2), None, "{t}: rows not a multiple of 8");
            assert_eq!(predicted_repack_group(t, 768, RepackCpu::default()), None, "{t} without AVX2");
        }
        for t in ["q8_0", "q6_K", "f16", "bf16", "iq4_xs", "q2_K"] {
            assert_eq!(predicted_repack_group(t, 768, avx2), None, "{t}");
        }
        assert_eq!(predicted_repack_group("q2_K", 768, RepackCpu { avx512: true, ..avx2 }), Some(8));
    }

    #[test]
    fn row_groups_are_never_split() {
        let topo = Topology::uniform(4, 3, 64);
        for (rows, group) in [(768u64, 8u64), (2048, 8), (136, 8), (96, 4), (512, 16)] {
            let t = ExpertTensor { row_group: group, ..tensor(8, rows, 144) };
            let plan = plan_tensor(&topo, &ExpertMap::policy(Policy::Rows), &t, &PlanOptions::default()).unwrap().unwrap();
            for p in plan.pieces() {
                assert!(p.rows.start % group == 0 && p.rows.end % group == 0, "{rows} rows in groups of {group}: piece {:?}", p.rows);
            }
            let mut starts: Vec<u64> = plan.pieces().iter().filter(|p| p.expert == 0).map(|p| p.rows.start).collect();
            starts.dedup();
            assert_eq!(starts.len(), 4, "{rows} rows: every node gets a share");
        }
        let odd = ExpertTensor { row_group: 8, ..tensor(8, 100, 144) };
        assert!(plan_tensor(&topo, &ExpertMap::policy(Policy::Rows), &odd, &PlanOptions::default()).is_err());
    }

    fn tensor(n_expert: u32, rows: u64, row_bytes: u64) -> ExpertTensor {
        ExpertTensor {
            name: "blk.0.ffn_up_exps.weight".into(),
            layer: Some(0),
            type_name: "q4_K".into(),
            n_expert,
            rows,
            row_bytes,
            row_group: 1,
        }
    }

    fn plan(topo: &Topology, map: &str, t: &ExpertTensor) -> TensorPlan {
        plan_tensor(topo, &ExpertMap::parse(map).unwrap(), t, &PlanOptions::default()).unwrap().unwrap()
    }

    #[test]
    fn one_rule_says_what_a_stacked_expert_tensor_is() {
        let name = "blk.3.ffn_down_exps.weight";
        let stack = |ne: [u64; 4], row_bytes: Option<u64>, packed: bool| stacked_expert(name, "q8_0", ne, row_bytes, packed);
        let t = stack([2048, 768, 128, 1], Some(2176), true).unwrap().unwrap();
        assert_eq!((t.layer, t.n_expert, t.rows, t.row_bytes, t.bytes()), (Some(3), 128, 768, 2176, 128 * 768 * 2176));
        // not stacks: left to llama.cpp
        for (ne, rb, packed) in [
            ([2048, 768, 128, 1], Some(2176), false),
            ([2048, 768, 1, 1], Some(2176), true),
            ([2048, 768, 128, 2], Some(2176), true),
            ([2048, 0, 128, 1], Some(2176), true),
            ([0, 768, 128, 1], Some(0), true),
        ] {
            assert_eq!(stack(ne, rb, packed), Ok(None), "{ne:?}");
        }
        // stacks llama.cpp could not load: errors that name the tensor
        let err = stack([2048, 768, 4_000_000_000, 1], Some(2176), true).unwrap_err();
        assert_eq!(err, "tensor \"blk.3.ffn_down_exps.weight\" has 4000000000 experts (ne[2]); llama.cpp supports at most 1024");
        let err = stack([2048, 1 << 40, 1024, 1], Some(1 << 20), true).unwrap_err();
        assert!(err.contains("1024 experts of 1099511627776 rows of 1048576 bytes: its size overflows 64 bits"), "{err}");
        assert!(stack([2048, 768, 8, 1], None, true).unwrap_err().contains("unknown element type (q8_0)"));
        let err = stacked_expert("blk.4294967295.ffn_up_exps.weight", "f32", [4, 4, 4, 1], Some(16), true).unwrap_err();
        assert!(err.contains("is in layer 4294967295; llama.cpp supports at most 512 layers"), "{err}");
    }

    #[test]
    fn apportion_is_exact_and_fair() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(24, &[1, 1]), vec![12, 12]);
        assert_eq!(apportion(7, &[2, 1]), vec![5, 2]);
        assert_eq!(apportion(5, &[0, 0]), vec![0, 0]);
    }

    #[test]
    fn rows_on_two_nodes_split_every_expert_on_page_boundaries() {
        let topo = Topology::uniform(2, 4, 64);
        // Qwen3-30B-A3B up/gate: 768 rows of 2048 q4_K columns (1152 bytes a row): the split
        // at row 384 is 108 pages.
        let t = tensor(128, 768, 1152);
        let p = plan(&topo, "rows", &t);
        assert_eq!(p.copies.len(), 1);
        assert_eq!(p.describe_share(0), "rows 0-383 of every expert");
        assert_eq!(p.describe_share(1), "rows 384-767 of every expert");
        for e in &p.copies[0].extents {
            assert_eq!(e.offset % 4096, 0, "{e:?}");
        }
        assert_eq!(p.bytes_per_node(), vec![(0, t.bytes() / 2), (1, t.bytes() / 2)]);
    }

    #[test]
    fn coarse_page_units_do_not_unbalance_the_split() {
        // gpt-oss-120b q8_0: 2880 rows of 3060 bytes; a page-aligned unit would be 1024 rows
        let topo = Topology::uniform(2, 4, 64);
        let p = plan(&topo, "rows", &tensor(4, 2880, 3060));
        assert_eq!(p.describe_share(0), "rows 0-1439 of every expert");
        assert_eq!(p.describe_share(1), "rows 1440-2879 of every expert");
    }

    #[test]
    fn rows_follow_cores_when_nodes_differ() {
        let mut nodes = Topology::uniform(2, 4, 64).nodes().to_vec();
        nodes[1].cpus.truncate(2);
        let topo = Topology::from_parts(nodes, None, Source::Manual).unwrap();
        let p = plan(&topo, "rows", &tensor(4, 1536, 4096));
        let on0: u64 = p.pieces().iter().filter(|x| x.node == 0).map(|x| x.rows.end - x.rows.start).sum();
        let on1: u64 = p.pieces().iter().filter(|x| x.node == 1).map(|x| x.rows.end - x.rows.start).sum();
        assert_eq!((on0, on1), (4 * 1024, 4 * 512));
    }

    #[test]
    fn block_and_round_robin_place_whole_experts() {
        let topo = Topology::uniform(2, 4, 64);
        let t = tensor(16, 64, 4096);
        let b = plan(&topo, "block", &t);
        assert_eq!(b.describe_share(0), "experts 0-7");
        assert_eq!(b.describe_share(1), "experts 8-15");
        let r = plan(&topo, "round-robin", &t);
        assert_eq!(r.describe_share(0), "experts 0,2,4,6,8,10,12,14");
    }

    fn profile(tokens: Vec<u64>) -> std::sync::Arc<RoutingProfile> {
        use crate::routing::{LayerRouting, ModelSignature, SCHEMA};
        let model = ModelSignature { n_expert: tokens.len() as u32, expert_layers: vec![0] };
        let layers = vec![LayerRouting { layer: 0, tokens, recent: vec![] }];
        std::sync::Arc::new(RoutingProfile { schema: SCHEMA, model, map: "block".into(), layers, nodes: vec![] })
    }

    /// Plans `t` under `balanced` with `profile` loaded, as config does when the map is set.
    fn plan_balanced(topo: &Topology, map: &str, t: &ExpertTensor, p: std::sync::Arc<RoutingProfile>) -> TensorPlan {
        let mut m = ExpertMap::parse(map).unwrap();
        for r in &mut m.rules {
            if let crate::expert_map::Body::Balanced { balanced, .. } = &mut r.body {
                balanced.profile = Some(p.clone());
                balanced.origin = "p.json".into();
            }
        }
        plan_tensor(topo, &m, t, &PlanOptions::default()).unwrap().unwrap()
    }

    /// Load per node of a plan: the profile's count of each piece's expert times its rows.
    fn routed_load(p: &TensorPlan, loads: &[u64]) -> Vec<(u32, u64)> {
        let mut acc: std::collections::BTreeMap<u32, u64> = Default::default();
        for x in p.pieces() {
            *acc.entry(x.node).or_default() += loads[x.expert as usize] * (x.rows.end - x.rows.start);
        }
        acc.into_iter().collect()
    }

    #[test]
    fn lpt_deals_hot_experts_apart_and_follows_weights() {
        // equal nodes: 100 | 50+40+30 on the other, then the rest to whichever is lighter
        let loads = [100, 50, 40, 30, 20, 10, 5, 5];
        assert_eq!(balanced_assignment(&loads, &[(0, 1), (1, 1)]), vec![0, 1, 1, 1, 0, 0, 1, 1]);
        // node 0 twice as fast: a tie in load per weight goes to the lower node id
        assert_eq!(balanced_assignment(&[3, 3, 3], &[(0, 2), (1, 1)]), vec![0, 0, 1]);
        assert_eq!(balanced_assignment(&[3, 3, 3], &[(1, 1), (0, 1)]), vec![0, 1, 0]);
        assert!(balanced_assignment(&[1, 2], &[]).is_empty());
        assert_eq!(balanced_assignment(&[0, 0, 0], &[(4, 0), (7, u64::MAX)]), vec![4, 4, 4]);
    }

    #[test]
    fn balanced_evens_out_a_skewed_profile_that_block_does_not() {
        let topo = Topology::uniform(2, 4, 64);
        let t = tensor(8, 64, 4096);
        let loads = vec![100, 50, 40, 30, 20, 10, 5, 5];
        let b = plan_balanced(&topo, "balanced:p.json", &t, profile(loads.clone()));
        assert_eq!(b.kind, PlanKind::Policy(Policy::Balanced));
        assert_eq!(b.describe_share(0), "experts 0,4-5");
        assert_eq!(routed_load(&b, &loads), vec![(0, 130 * 64), (1, 130 * 64)]);
        let block = plan(&topo, "block", &t);
        assert_eq!(routed_load(&block, &loads), vec![(0, 220 * 64), (1, 40 * 64)]);
        // whole experts, one copy: what the hook computes for block and explicit maps
        assert_eq!(b.copies.len(), 1);
        assert!(b.pieces().iter().all(|x| x.rows == (0..64) && x.copy == 0));
        // layers the profile lacks follow its totals; an all-zero profile is block-like even
        let other = ExpertTensor { layer: Some(5), name: "blk.5.ffn_up_exps.weight".into(), ..t.clone() };
        assert_eq!(plan_balanced(&topo, "balanced:p.json", &other, profile(loads.clone())).describe_share(0), "experts 0,4-5");
        let even = plan_balanced(&topo, "balanced:p.json", &t, profile(vec![0; 8]));
        assert_eq!(even.bytes_per_node(), vec![(0, t.bytes() / 2), (1, t.bytes() / 2)]);
    }

    #[test]
    fn balanced_copies_the_hottest_experts_within_the_budget() {
        let topo = Topology::uniform(2, 4, 64);
        let t = tensor(8, 64, 4096);
        let loads = vec![100, 50, 40, 30, 20, 10, 5, 5];
        // 30% of the tensor is 2.4 experts' bytes; one copy on the other node costs one expert's
        let p = plan_balanced(&topo, "balanced:p.json+copies=30%", &t, profile(loads.clone()));
        assert_eq!(p.copies.len(), 2);
        let extra: u64 = p.copies[1].extents.iter().map(|e| e.len).sum();
        assert_eq!(extra, 2 * t.expert_bytes());
        assert!(extra <= t.bytes() * 30 / 100);
        let split: Vec<u32> = (0..8).filter(|&e| p.pieces().iter().filter(|x| x.expert == e).count() == 2).collect();
        assert_eq!(split, vec![0, 1]);
        let l = routed_load(&p, &loads);
        assert!(l[0].1.abs_diff(l[1].1) <= 5 * 64, "{l:?}");
        // a budget below one expert copies nothing; one node has nothing to copy to
        assert_eq!(plan_balanced(&topo, "balanced:p.json+copies=12%", &t, profile(loads.clone())).copies.len(), 1);
        assert_eq!(plan_balanced(&topo, "balanced:p.json+copies=100%@1", &t, profile(loads)).copies.len(), 1);
    }

    #[test]
    fn balanced_without_a_profile_is_block() {
        let topo = Topology::uniform(2, 4, 64);
        let t = tensor(16, 64, 4096);
        let p = plan(&topo, "balanced", &t);
        let b = plan(&topo, "block", &t);
        assert_eq!((p.kind, &p.copies, &p.compute), (b.kind, &b.copies, &b.compute));
    }

    #[test]
    fn explicit_map_with_a_copy_on_two_nodes() {
        let topo = Topology::uniform(2, 4, 64);
        let t = tensor(8, 64, 4096);
        let p = plan(&topo, "0-3:0+1,4-7:1", &t);
        assert_eq!(p.copies.len(), 2);
        assert_eq!(p.copies[1].node, Some(1));
        assert_eq!(p.copies[1].extents, vec![Extent { offset: 0, len: 4 * t.expert_bytes(), binding: Binding::Node(1) }]);
        // experts 0-3 are computed half on each node, node 1 reading its own copy
        let e0: Vec<(u32, usize)> = p.pieces().iter().filter(|x| x.expert == 0).map(|x| (x.node, x.copy)).collect();
        assert_eq!(e0, vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn mirror_puts_a_full_copy_on_every_node() {
        let topo = Topology::uniform(4, 2, 64);
        let t = tensor(8, 256, 1024);
        let p = plan(&topo, "mirror", &t);
        assert_eq!(p.copies.len(), 4);
        assert_eq!(p.bytes_per_node(), (0..4).map(|n| (n, t.bytes())).collect::<Vec<_>>());
    }

    #[test]
    fn auto_is_off_on_one_node_and_rows_on_several() {
        let t = tensor(8, 256, 1024);
        let one = Topology::uniform(1, 2, 64);
        assert!(plan_tensor(&one, &ExpertMap::policy(Policy::Auto), &t, &PlanOptions::default()).unwrap().is_none());
        let two = Topology::uniform(2, 2, 64);
        assert_eq!(plan(&two, "auto", &t).kind, PlanKind::Policy(Policy::Rows));
    }

    #[test]
    fn memory_less_and_cpu_less_nodes_are_not_default_targets() {
        let mut nodes = Topology::uniform(3, 2, 64).nodes().to_vec();
        nodes[1].total_bytes = 0; // CPUs, no memory
        nodes[2].cpus.clear(); // memory, no CPUs
        let topo = Topology::from_parts(nodes, None, Source::Manual).unwrap();
        assert_eq!(topo.compute_nodes(), vec![0]);
        let p = plan(&topo, "rows@0,2", &tensor(2, 64, 4096));
        // the CPU-less node gets a fair share (the mean weight), computed elsewhere at run time
        assert_eq!(p.bytes_per_node(), vec![(0, 2 * 32 * 4096), (2, 2 * 32 * 4096)]);
    }

    #[test]
    fn over_full_node_names_node_and_shortfall() {
        let mut nodes = Topology::uniform(2, 2, 1).nodes().to_vec();
        nodes[1].free_bytes = Some(100 << 20);
        let topo = Topology::from_parts(nodes, None, Source::Manual).unwrap();
        let p = plan(&topo, "rows", &tensor(8, 1024, 65536)); // 512 MiB
        let err = check_budget(&node_loads(&topo, &[p])).unwrap_err().to_string();
        assert_eq!(err, "node 1 is over-full: the plan places 256.0 MiB there but it has 100.0 MiB free (156.0 MiB short)");
    }

    #[test]
    fn workers_alternate_by_cores_and_take_cores_first() {
        // the layout the hook pins to: worker i's node depends on i only
        let topo = Topology::from_synthetic("package:2 numa:1 core:2 pu:2").unwrap();
        let w = plan_workers(&topo, 6);
        let nodes: Vec<u32> = w.iter().map(|s| s.node).collect();
        assert_eq!(nodes, vec![0, 1, 0, 1, 0, 1]);
        let n0 = topo.node(0).unwrap();
        let smt = |cpu: u32| n0.cpus.iter().find(|c| c.os == cpu).map(|c| c.smt);
        assert_eq!((smt(w[0].cpu), smt(w[2].cpu), smt(w[4].cpu)), (Some(0), Some(0), Some(1)));
        assert_eq!(plan_workers(&topo, 4)[..], w[..4]);
        // fewer threads than nodes: still valid
        assert_eq!(plan_workers(&topo, 1).len(), 1);
        // more threads than CPUs wrap around
        assert_eq!(plan_workers(&topo, 20).len(), 20);
    }

    #[test]
    fn a_node_without_cpus_gets_no_workers() {
        let mut nodes = Topology::uniform(2, 2, 1).nodes().to_vec();
        nodes[1].cpus.clear();
        let topo = Topology::from_parts(nodes, None, Source::Manual).unwrap();
        assert!(plan_workers(&topo, 4).iter().all(|w| w.node == 0));
    }
}
