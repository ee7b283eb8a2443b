//! The bytes one decoded token reads, by category of weight and by node under a placement:
//! what `numa-moe plan` reports next to the expert placement, so that the share numa-moe
//! places node-local can be weighed against everything else a token reads.
//!
//! Pure: the input is a tensor table, the model's MoE hyper-parameters, a topology and the
//! plans of the tensors ([`plan_weights`] makes them with the planner); nothing is read from
//! the machine. The per-token figures are expectations under a stated model, not measurements:
//! - a token reads `n_used / n_expert` of every routed-expert tensor (uniform routing), one row
//!   of the token embeddings, and every other tensor whole;
//! - a placed tensor's pieces are read by the threads of the node that computes them, from the
//!   copy the plan gives them (node-local by the planner's invariants); a piece of a node
//!   without CPUs is read by the nearest node that has some;
//! - a tensor left to llama.cpp lies on the node where the loading thread first touched it
//!   (the first node with memory) and is read by the threads of every node in proportion to
//!   its cores, so only that node's share of the reads is local;
//! - interleaved pages are read the same way, from every node they lie on.
//!
//! The KV cache is estimated apart ([`KvShape`]): f16, every layer attending to the whole
//! context.

use std::collections::BTreeMap;

use crate::expert_map::ExpertMap;
use crate::gguf::TensorInfo;
use crate::placement::{self, Binding, Compute, ExpertTensor, PlanOptions, TensorPlan};
use crate::topology::Topology;
use crate::weights::{category_of, Category};

/// One tensor of a model, as the footprint needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weight {
    /// GGUF name, e.g. "blk.3.attn_q_b.weight".
    pub name: String,
    pub category: Category,
    /// ggml type name ("q8_0").
    pub type_name: String,
    /// Shape, padded to four dimensions with 1s.
    pub ne: [u64; 4],
    /// Bytes of one row (ne[0] elements).
    pub row_bytes: u64,
    /// Bytes of the whole tensor.
    pub bytes: u64,
}

impl Weight {
    /// The tensor `t` of a table; an error for a type whose size is unknown.
    pub fn from_info(t: &TensorInfo) -> Result<Weight, String> {
        match (t.row_bytes(), t.bytes()) {
            (Some(row_bytes), Some(bytes)) => {
                Ok(Weight { name: t.name.clone(), category: category_of(&t.name), type_name: t.type_name(), ne: t.ne4(), row_bytes, bytes })
            }
            _ => Err(format!("tensor \"{}\" has type {}, whose size is unknown", t.name, t.type_name())),
        }
    }

    /// Elements (parameters).
    pub fn params(&self) -> u64 {
        // the GGUF reader checks that the element count fits in 63 bits
        self.ne.iter().fold(1u64, |a, &n| a.saturating_mul(n))
    }

    /// What the map's `dense=` rule places of it: a weight matrix as
    /// [`placement::weight_matrix`] says (2-D, not a norm, a bias or the token embeddings),
    /// planned as one "expert", or a stack of per-head attention matrices such as MLA's
    /// `attn_k_b` (ne = [128, 512, n_head], a batched MUL_MAT: [`placement::head_stack`]).
    /// Routed-expert tensors that are not stacks stay with llama.cpp.
    pub fn dense_tensor(&self) -> Option<ExpertTensor> {
        if self.category == Category::RoutedExperts {
            return None;
        }
        let rb = Some(self.row_bytes);
        placement::weight_matrix(&self.name, &self.type_name, self.ne, rb, true)
            .or_else(|| placement::head_stack(&self.name, &self.type_name, self.ne, rb, true))
    }

    /// The stacked expert tensor the expert map places, for a routed-expert stack.
    pub fn expert_tensor(&self) -> Result<Option<ExpertTensor>, String> {
        if self.category != Category::RoutedExperts {
            return Ok(None);
        }
        placement::stacked_expert(&self.name, &self.type_name, self.ne, Some(self.row_bytes), true)
    }
}

/// The tensors of a table as the footprint sees them. When the model has no `output.weight`,
/// the token embeddings are also its output head (tied, as llama.cpp then uses them) and are
/// counted as the head: a token reads them whole.
pub fn weights_of(table: &[TensorInfo]) -> Result<Vec<Weight>, String> {
    let tied = !table.iter().any(|t| t.name == "output.weight");
    table
        .iter()
        .map(|t| {
            let mut w = Weight::from_info(t)?;
            if tied && w.category == Category::Embeddings && w.ne[1] >= 2 {
                w.category = Category::OutputHead;
            }
            Ok(w)
        })
        .collect()
}

/// The MoE hyper-parameters the footprint needs (`<arch>.expert_count`,
/// `<arch>.expert_used_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeParams {
    pub n_expert: u32,
    pub n_expert_used: u32,
}

impl MoeParams {
    /// Checked: at least one expert used, no more than there are.
    pub fn new(n_expert: u64, n_expert_used: u64) -> Result<MoeParams, String> {
        if n_expert == 0 || n_expert > crate::expert_map::MAX_EXPERTS as u64 {
            return Err(format!("expert_count {n_expert} is out of range (1-{})", crate::expert_map::MAX_EXPERTS));
        }
        if n_expert_used == 0 || n_expert_used > n_expert {
            return Err(format!("expert_used_count {n_expert_used} is out of range for {n_expert} experts (1-{n_expert})"));
        }
        Ok(MoeParams { n_expert: n_expert as u32, n_expert_used: n_expert_used as u32 })
    }
}

/// How much of a tensor one decoded token reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Whole,
    /// One row of this many (the token embeddings).
    OneRow(u64),
    /// `used` of `of` experts (a routed-expert tensor whose outermost dimension is the
    /// model's expert count).
    Experts {
        used: u32,
        of: u32,
    },
}

impl Reading {
    pub fn share(self) -> f64 {
        match self {
            Reading::Whole => 1.0,
            Reading::OneRow(rows) => 1.0 / rows.max(1) as f64,
            Reading::Experts { used, of } => used as f64 / of.max(1) as f64,
        }
    }
}

/// What one decoded token reads of `w`.
pub fn reading(w: &Weight, moe: &MoeParams) -> Reading {
    match w.category {
        Category::RoutedExperts => {
            // the expert dimension is the outermost (ne[2] of a stack, ne[1] of a bias)
            let outer = w.ne.iter().rev().copied().find(|&n| n > 1).unwrap_or(1);
            if outer == moe.n_expert as u64 {
                Reading::Experts { used: moe.n_expert_used, of: moe.n_expert }
            } else {
                Reading::Whole
            }
        }
        Category::Embeddings if w.ne[1] >= 2 => Reading::OneRow(w.ne[1] * w.ne[2] * w.ne[3]),
        _ => Reading::Whole,
    }
}

/// The three placements `numa-moe plan` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Nothing placed: every tensor where the loading thread first touched it.
    Stock,
    /// The map places the routed experts; every other tensor is left to llama.cpp.
    ExpertsOnly,
    /// The map places the routed experts and its dense rule every other weight matrix.
    WholeModel,
}

impl Placement {
    /// Not part of the C API:
    /// cbindgen:ignore
    pub const ALL: [Placement; 3] = [Placement::Stock, Placement::ExpertsOnly, Placement::WholeModel];

    pub fn label(self) -> &'static str {
        match self {
            Placement::Stock => "stock (first touch)",
            Placement::ExpertsOnly => "experts only",
            Placement::WholeModel => "whole model",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Placement::Stock => "stock",
            Placement::ExpertsOnly => "experts_only",
            Placement::WholeModel => "whole_model",
        }
    }
}

/// The maps a placement plans with: `experts` for routed-expert stacks, `dense` for every
/// other weight matrix ([`Weight::dense_tensor`], by the map's `dense=` rule); `None` leaves
/// those tensors to llama.cpp.
#[derive(Debug, Clone, Copy, Default)]
pub struct Maps<'a> {
    pub experts: Option<&'a ExpertMap>,
    pub dense: Option<&'a ExpertMap>,
}

/// The plan of every weight under `maps` (`None`: left to llama.cpp). `row_group` gives the
/// rows a tensor's layout interleaves (CPU_REPACK's groups; 1 for the standard layout).
pub fn plan_weights(
    topo: &Topology,
    weights: &[Weight],
    maps: Maps,
    opts: &PlanOptions,
    row_group: &dyn Fn(&ExpertTensor) -> u64,
) -> Result<Vec<Option<TensorPlan>>, String> {
    weights
        .iter()
        .map(|w| {
            let (map, tensor) = match (w.expert_tensor()?, maps) {
                (Some(t), Maps { experts: Some(m), .. }) => (m, t),
                (Some(_), _) => return Ok(None),
                (None, Maps { dense: Some(m), .. }) => match w.dense_tensor() {
                    Some(t) => (m, t),
                    None => return Ok(None),
                },
                (None, _) => return Ok(None),
            };
            let tensor = ExpertTensor { row_group: row_group(&tensor).max(1), ..tensor };
            placement::plan_tensor(topo, map, &tensor, opts).map_err(|e| e.to_string())
        })
        .collect()
}

/// One category's part of a token's reads.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryRead {
    pub category: Category,
    pub tensors: usize,
    /// Bytes of its tensors (one copy).
    pub held: u64,
    /// Parameters and bytes one decoded token reads.
    pub params: f64,
    pub bytes: f64,
    /// Of `bytes`, what the reading threads find on their own node.
    pub local: f64,
}

/// One node's part.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRead {
    pub node: u32,
    pub cores: usize,
    /// Bytes of weights on the node, every copy counted, by category ([`Category::index`]).
    pub held: [u64; Category::ALL.len()],
    /// Bytes its threads read per decoded token from their own node, and from other nodes.
    pub local: f64,
    pub remote: f64,
}

impl NodeRead {
    pub fn held_total(&self) -> u64 {
        self.held.iter().sum()
    }
}

/// A token's reads under one placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// Every category, in [`Category::ALL`] order.
    pub categories: Vec<CategoryRead>,
    /// Every node of the topology.
    pub nodes: Vec<NodeRead>,
    /// What stays with llama.cpp, by kind of tensor (its name without `blk.N.` and
    /// `.weight`): (kind, tensors, bytes read per token), most bytes first.
    pub unplaced: Vec<(String, usize, f64)>,
}

impl Footprint {
    pub fn bytes(&self) -> f64 {
        self.categories.iter().map(|c| c.bytes).sum()
    }

    pub fn params(&self) -> f64 {
        self.categories.iter().map(|c| c.params).sum()
    }

    /// The share of the bytes read node-local (1 when nothing is read).
    pub fn local_share(&self) -> f64 {
        let b = self.bytes();
        if b > 0.0 {
            self.categories.iter().map(|c| c.local).sum::<f64>() / b
        } else {
            1.0
        }
    }

    pub fn category(&self, c: Category) -> &CategoryRead {
        &self.categories[c.index()]
    }
}

/// The node a tensor left to llama.cpp lies on: where the loading thread first touches it,
/// taken as the first node with memory.
pub fn first_touch_node(topo: &Topology) -> u32 {
    topo.nodes().iter().find(|n| n.has_memory()).or(topo.nodes().first()).map_or(0, |n| n.id)
}

/// The reads of one decoded token of the model `weights` under `plans` (one per weight, as
/// [`plan_weights`] returns them).
pub fn footprint(topo: &Topology, weights: &[Weight], moe: &MoeParams, plans: &[Option<TensorPlan>]) -> Footprint {
    let mut categories: Vec<CategoryRead> =
        Category::ALL.iter().map(|&category| CategoryRead { category, tensors: 0, held: 0, params: 0.0, bytes: 0.0, local: 0.0 }).collect();
    let mut nodes: BTreeMap<u32, NodeRead> = topo
        .nodes()
        .iter()
        .map(|n| (n.id, NodeRead { node: n.id, cores: n.cores(), held: [0; Category::ALL.len()], local: 0.0, remote: 0.0 }))
        .collect();
    let holder = first_touch_node(topo);
    // the threads reading what is not placed: every node with CPUs, by its cores
    let cpu_nodes: Vec<u32> = topo.nodes().iter().filter(|n| n.has_cpus()).map(|n| n.id).collect();
    let cores: f64 = topo.nodes().iter().map(|n| n.cores() as f64).sum();
    let readers: Vec<(u32, f64)> = if cores > 0.0 {
        topo.nodes().iter().filter(|n| n.has_cpus()).map(|n| (n.id, n.cores() as f64 / cores)).collect()
    } else {
        vec![(holder, 1.0)]
    };
    let mut unplaced: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for (i, w) in weights.iter().enumerate() {
        let ci = w.category.index();
        let share = reading(w, moe).share();
        let read = w.bytes as f64 * share;
        let c = &mut categories[ci];
        c.tensors += 1;
        c.held += w.bytes;
        c.params += w.params() as f64 * share;
        c.bytes += read;
        // (reading node, bytes, local?) of every read of this tensor
        let mut reads: Vec<(u32, f64, bool)> = Vec::new();
        match plans.get(i).and_then(Option::as_ref) {
            None => {
                let e = unplaced.entry(crate::weights::kind(&w.name).to_string()).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += read;
                if let Some(n) = nodes.get_mut(&holder) {
                    n.held[ci] += w.bytes;
                }
                reads.extend(readers.iter().map(|&(r, s)| (r, read * s, r == holder)));
            }
            Some(plan) => {
                for (node, b) in plan.bytes_per_node() {
                    if let Some(n) = nodes.get_mut(&node) {
                        n.held[ci] += b;
                    }
                }
                match &plan.compute {
                    Compute::Pieces(pieces) => {
                        let t = &plan.tensor;
                        for p in pieces {
                            let bytes = (p.rows.end - p.rows.start) as f64 * t.row_bytes as f64 * share;
                            let reader = if topo.node(p.node).is_some_and(|n| n.has_cpus()) {
                                p.node
                            } else {
                                topo.nearest(p.node, &cpu_nodes).unwrap_or(p.node)
                            };
                            let at = p.expert as u64 * t.expert_bytes() + p.rows.start * t.row_bytes;
                            match plan.node_of_byte(p.copy, at) {
                                Some(Binding::Interleave(ns)) => {
                                    let on = ns.len().max(1) as f64;
                                    for &m in ns {
                                        reads.push((reader, bytes / on, m == reader));
                                    }
                                }
                                Some(Binding::Node(m)) => reads.push((reader, bytes, *m == reader)),
                                None => reads.push((reader, bytes, p.node == reader)),
                            }
                        }
                    }
                    Compute::Stock => {
                        // pages spread over nodes, read by every node's threads
                        let spread = plan.bytes_per_node();
                        let total = spread.iter().map(|s| s.1).sum::<u64>().max(1) as f64;
                        for &(m, b) in &spread {
                            for &(r, s) in &readers {
                                reads.push((r, read * s * b as f64 / total, r == m));
                            }
                        }
                    }
                }
            }
        }
        for (r, b, local) in reads {
            if local {
                categories[ci].local += b;
            }
            if let Some(n) = nodes.get_mut(&r) {
                if local {
                    n.local += b;
                } else {
                    n.remote += b;
                }
            }
        }
    }
    let mut unplaced: Vec<(String, usize, f64)> = unplaced.into_iter().map(|(k, (n, b))| (k, n, b)).collect();
    unplaced.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    Footprint { categories, nodes: nodes.into_values().collect(), unplaced }
}

/// What a model's KV cache holds per layer per position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvLayout {
    /// Multi-head latent attention: the compressed latent and the shared rope key
    /// (`kv_lora_rank + rope dims`), V read from the same cache.
    Mla { kv_lora_rank: u64, rope_dims: u64 },
    /// Grouped-query attention: `n_head_kv · (head_dim_k + head_dim_v)`, `n_head_kv` per layer.
    Gqa { n_head_kv: Vec<u64>, head_dim_k: u64, head_dim_v: u64 },
}

/// The shape of a model's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvShape {
    pub n_layer: u64,
    pub layout: KvLayout,
}

impl KvShape {
    /// Values cached per position over all layers.
    pub fn values_per_position(&self) -> u128 {
        let n = self.n_layer as u128;
        match &self.layout {
            KvLayout::Mla { kv_lora_rank, rope_dims } => n * (*kv_lora_rank as u128 + *rope_dims as u128),
            KvLayout::Gqa { n_head_kv, head_dim_k, head_dim_v } => {
                let per_head = *head_dim_k as u128 + *head_dim_v as u128;
                match n_head_kv.as_slice() {
                    [one] => n * *one as u128 * per_head,
                    per_layer => per_layer.iter().take(self.n_layer as usize).map(|&h| h as u128 * per_head).sum(),
                }
            }
        }
    }

    /// Bytes of an f16 cache one decoded token reads at a context of `ctx` positions: the
    /// whole cache of every layer (no sliding windows).
    pub fn bytes_per_token(&self, ctx: u64) -> u128 {
        self.values_per_position() * 2 * ctx as u128
    }

    /// "MLA: 576 values per layer per position" and the like, for reports.
    pub fn describe(&self) -> String {
        match &self.layout {
            KvLayout::Mla { kv_lora_rank, rope_dims } => {
                format!("MLA: {} values ({kv_lora_rank} latent + {rope_dims} rope) per layer per position", kv_lora_rank + rope_dims)
            }
            KvLayout::Gqa { n_head_kv, head_dim_k, head_dim_v } => match n_head_kv.as_slice() {
                [h] => format!("GQA: {h} KV heads x ({head_dim_k} + {head_dim_v}) values per layer per position"),
                _ => format!("GQA: per-layer KV heads x ({head_dim_k} + {head_dim_v}) values per position"),
            },
        }
    }

    /// The cache of a GGUF model from its keys (`get(key)` reads `<arch>.<key>`): MLA where
    /// the file gives `attention.key_length_mla` (llama.cpp then caches the latent only),
    /// otherwise GQA from `attention.head_count_kv` (default `attention.head_count`) and
    /// `attention.key_length`/`value_length` (default `embedding_length / head_count`).
    /// `None` when the keys needed are missing.
    pub fn from_keys<'a>(get: impl Fn(&str) -> Option<&'a [u64]>) -> Option<KvShape> {
        let one = |k: &str| get(k).and_then(|v| v.first().copied());
        let n_layer = one("block_count").filter(|&n| n > 0)?;
        if one("attention.key_length_mla").is_some_and(|k| k > 0) {
            let kv_lora_rank = one("attention.kv_lora_rank")?;
            let rope_dims = one("rope.dimension_count")?;
            return Some(KvShape { n_layer, layout: KvLayout::Mla { kv_lora_rank, rope_dims } });
        }
        let n_head = one("attention.head_count");
        let n_head_kv = get("attention.head_count_kv").map(<[u64]>::to_vec).or_else(|| n_head.map(|h| vec![h]))?;
        let default_dim = one("embedding_length").zip(n_head).filter(|&(_, h)| h > 0).map(|(e, h)| e / h);
        let head_dim_k = one("attention.key_length").or(default_dim)?;
        let head_dim_v = one("attention.value_length").or(default_dim)?;
        Some(KvShape { n_layer, layout: KvLayout::Gqa { n_head_kv, head_dim_k, head_dim_v } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, ne: &[u64], ggml_type: u32) -> TensorInfo {
        TensorInfo { name: name.into(), ne: ne.to_vec(), ggml_type, offset: 0 }
    }

    /// Two layers of a small MoE: 8 experts (2 used) of 256x512 q4_K, a q8_0 attention
    /// projection and shared expert, f32 norms, token embeddings and an output head.
    fn model() -> Vec<Weight> {
        let mut t =
            vec![info("token_embd.weight", &[256, 1000], 8), info("output.weight", &[256, 1000], 8), info("output_norm.weight", &[256], 0)];
        for l in 0..2 {
            t.push(info(&format!("blk.{l}.attn_norm.weight"), &[256], 0));
            t.push(info(&format!("blk.{l}.attn_q.weight"), &[256, 512], 8));
            t.push(info(&format!("blk.{l}.ffn_gate_inp.weight"), &[256, 8], 0));
            t.push(info(&format!("blk.{l}.ffn_up_exps.weight"), &[256, 512, 8], 12));
            t.push(info(&format!("blk.{l}.ffn_up_shexp.weight"), &[256, 512], 8));
        }
        weights_of(&t).unwrap()
    }

    const MOE: MoeParams = MoeParams { n_expert: 8, n_expert_used: 2 };

    fn plans(topo: &Topology, w: &[Weight], placement: Placement) -> Vec<Option<TensorPlan>> {
        let rows = ExpertMap::parse("rows;dense=rows").unwrap();
        let maps = match placement {
            Placement::Stock => Maps::default(),
            Placement::ExpertsOnly => Maps { experts: Some(&rows), dense: None },
            Placement::WholeModel => Maps { experts: Some(&rows), dense: Some(&rows) },
        };
        plan_weights(topo, w, maps, &PlanOptions::default(), &|_| 1).unwrap()
    }

    #[test]
    fn a_token_reads_its_experts_one_embedding_row_and_the_rest_whole() {
        let w = model();
        let topo = Topology::uniform(1, 4, 64);
        let f = footprint(&topo, &w, &MOE, &plans(&topo, &w, Placement::Stock));
        // q4_K: 144 bytes per 256; q8_0: 34 per 32 (272 per 256); f32: 4 per element
        let expert_row = 144.0;
        assert_eq!(f.category(Category::RoutedExperts).bytes, 2.0 * 512.0 * 8.0 * expert_row * 2.0 / 8.0);
        assert_eq!(f.category(Category::RoutedExperts).params, 2.0 * 2.0 * 256.0 * 512.0);
        assert_eq!(f.category(Category::RoutedExperts).held, 2 * 512 * 8 * 144);
        assert_eq!(f.category(Category::Attention).bytes, 2.0 * (512.0 * 272.0 + 1024.0));
        assert_eq!(f.category(Category::SharedExperts).bytes, 2.0 * 512.0 * 272.0);
        assert_eq!(f.category(Category::Embeddings).bytes, 272.0);
        assert_eq!(f.category(Category::OutputHead).bytes, 1000.0 * 272.0);
        assert_eq!(f.category(Category::Other).bytes, 2.0 * 256.0 * 8.0 * 4.0 + 1024.0);
        // one node: everything is local
        assert_eq!(f.local_share(), 1.0);
        assert_eq!(f.nodes[0].held_total(), w.iter().map(|w| w.bytes).sum::<u64>());
    }

    #[test]
    fn tied_embeddings_are_the_head() {
        let w = weights_of(&[info("token_embd.weight", &[256, 1000], 8), info("blk.0.attn_q.weight", &[256, 256], 8)]).unwrap();
        assert_eq!(w[0].category, Category::OutputHead);
        assert_eq!(reading(&w[0], &MOE), Reading::Whole);
        // the dense rule leaves the token embeddings to llama.cpp, tied or not
        assert!(w[0].dense_tensor().is_none());
        let w = weights_of(&[info("token_embd.weight", &[256, 1000], 8), info("output.weight", &[256, 1000], 8)]).unwrap();
        assert_eq!((w[0].category, reading(&w[0], &MOE)), (Category::Embeddings, Reading::OneRow(1000)));
        assert!(w[0].dense_tensor().is_none());
    }

    #[test]
    fn matrices_and_per_head_stacks_are_planned_and_norms_are_not() {
        let w = weights_of(&[
            info("blk.0.attn_q_b.weight", &[1536, 24576], 8),
            info("blk.0.attn_k_b.weight", &[128, 512, 128], 8),
            info("blk.0.attn_norm.weight", &[7168], 0),
            info("blk.0.ffn_down_exps.weight", &[2048, 7168, 256], 12),
            info("blk.0.ffn_gate_inp.weight", &[7168, 256], 0),
        ])
        .unwrap();
        // the router is a matrix like the others
        assert_eq!(w[4].dense_tensor().unwrap().rows, 256);
        let d = w[0].dense_tensor().unwrap();
        assert_eq!((d.n_expert, d.rows, d.row_bytes, d.layer), (1, 24576, 1632, Some(0)));
        assert_eq!(d.bytes(), w[0].bytes);
        assert!(w[0].expert_tensor().unwrap().is_none());
        // MLA's per-head stack is a batched MUL_MAT: a stack of heads the dense rule places
        assert_eq!(w[1].dense_tensor().unwrap().n_expert, 128);
        assert!(w[1].expert_tensor().unwrap().is_none());
        assert!(w[2].dense_tensor().is_none());
        assert!(w[3].dense_tensor().is_none());
        assert_eq!(w[3].expert_tensor().unwrap().unwrap().n_expert, 256);
    }

    #[test]
    fn on_two_nodes_stock_is_half_local_and_the_whole_model_all_local() {
        let w = model();
        let topo = Topology::uniform(2, 4, 64);
        let stock = footprint(&topo, &w, &MOE, &plans(&topo, &w, Placement::Stock));
        let experts = footprint(&topo, &w, &MOE, &plans(&topo, &w, Placement::ExpertsOnly));
        let whole = footprint(&topo, &w, &MOE, &plans(&topo, &w, Placement::WholeModel));
        // every placement reads the same bytes
        assert_eq!(stock.bytes(), whole.bytes());
        assert_eq!(stock.bytes(), experts.bytes());
        // stock: everything on node 0, read half by each node's threads
        assert!((stock.local_share() - 0.5).abs() < 1e-12, "{}", stock.local_share());
        assert_eq!(stock.nodes[1].held_total(), 0);
        assert_eq!(stock.nodes[0].local, stock.nodes[1].remote);
        // experts only: the experts local, the rest half
        assert_eq!(experts.category(Category::RoutedExperts).local, experts.category(Category::RoutedExperts).bytes);
        assert_eq!(experts.category(Category::Attention).local, experts.category(Category::Attention).bytes / 2.0);
        // whole model: every matrix split, the routers too; only the three f32 norms and the
        // embedding row stay on node 0
        let unplaced = whole.category(Category::Embeddings).bytes + 3.0 * 1024.0;
        assert!((whole.bytes() - whole.categories.iter().map(|c| c.local).sum::<f64>() - unplaced / 2.0).abs() < 1e-6);
        assert!(whole.local_share() > 0.99 && whole.local_share() > experts.local_share() && experts.local_share() > stock.local_share());
        let kinds: Vec<(&str, usize)> = whole.unplaced.iter().map(|u| (u.0.as_str(), u.1)).collect();
        assert_eq!(kinds, vec![("attn_norm", 2), ("output_norm", 1), ("token_embd", 1)]);
        for n in &whole.nodes {
            assert!((n.local - whole.bytes() / 2.0).abs() < whole.bytes() * 0.01, "{n:?}");
        }
    }

    #[test]
    fn mirror_holds_a_copy_on_every_node_and_reads_it_locally() {
        let w = model();
        let topo = Topology::uniform(2, 4, 64);
        let mirror = ExpertMap::parse("mirror;dense=mirror").unwrap();
        let p = plan_weights(&topo, &w, Maps { experts: Some(&mirror), dense: Some(&mirror) }, &PlanOptions::default(), &|_| 1).unwrap();
        let f = footprint(&topo, &w, &MOE, &p);
        let experts = f.category(Category::RoutedExperts);
        assert_eq!(experts.local, experts.bytes);
        let ri = Category::RoutedExperts.index();
        assert_eq!((f.nodes[0].held[ri], f.nodes[1].held[ri]), (experts.held, experts.held));
    }

    #[test]
    fn interleaved_experts_are_read_from_every_node() {
        let w = model();
        let topo = Topology::uniform(2, 4, 64);
        let il = ExpertMap::policy(crate::expert_map::Policy::Interleave);
        let p = plan_weights(&topo, &w, Maps { experts: Some(&il), dense: None }, &PlanOptions::default(), &|_| 1).unwrap();
        let e = footprint(&topo, &w, &MOE, &p).category(Category::RoutedExperts).clone();
        assert!((e.local / e.bytes - 0.5).abs() < 1e-12);
    }

    #[test]
    fn moe_params_are_checked() {
        assert!(MoeParams::new(256, 8).is_ok());
        assert_eq!(MoeParams::new(8, 9).unwrap_err(), "expert_used_count 9 is out of range for 8 experts (1-8)");
        assert!(MoeParams::new(0, 0).unwrap_err().contains("expert_count 0 is out of range"));
        assert!(MoeParams::new(8, 0).is_err());
    }

    #[test]
    fn kv_cache_of_mla_and_gqa_models() {
        let keys = |kv: &'static [(&'static str, &'static [u64])]| move |k: &str| kv.iter().find(|e| e.0 == k).map(|e| e.1);
        // DeepSeek-V3 as llama.cpp's converter writes it now: the latent is cached
        let mla = KvShape::from_keys(keys(&[
            ("block_count", &[61]),
            ("attention.key_length_mla", &[192]),
            ("attention.kv_lora_rank", &[512]),
            ("rope.dimension_count", &[64]),
            ("attention.head_count_kv", &[1]),
        ]))
        .unwrap();
        assert_eq!(mla.values_per_position(), 61 * 576);
        assert_eq!(mla.bytes_per_token(4096), 61 * 576 * 2 * 4096);
        // an older file without the MLA keys: llama.cpp caches full heads
        let mha = KvShape::from_keys(keys(&[
            ("block_count", &[61]),
            ("attention.kv_lora_rank", &[512]),
            ("attention.head_count", &[128]),
            ("attention.head_count_kv", &[128]),
            ("attention.key_length", &[192]),
            ("attention.value_length", &[128]),
        ]))
        .unwrap();
        assert_eq!(mha.values_per_position(), 61 * 128 * 320);
        // Qwen3-235B: 4 KV heads of 128; dims from embedding_length / head_count when absent
        let gqa = KvShape::from_keys(keys(&[
            ("block_count", &[94]),
            ("attention.head_count", &[64]),
            ("attention.head_count_kv", &[4]),
            ("embedding_length", &[8192]),
        ]))
        .unwrap();
        assert_eq!(gqa.values_per_position(), 94 * 4 * 256);
        // per-layer head counts (0: a layer without attention)
        let per_layer = KvShape::from_keys(keys(&[
            ("block_count", &[3]),
            ("attention.head_count_kv", &[2, 0, 2]),
            ("attention.key_length", &[64]),
            ("attention.value_length", &[64]),
        ]))
        .unwrap();
        assert_eq!(per_layer.values_per_position(), 2 * 2 * 128);
        assert_eq!(KvShape::from_keys(keys(&[("block_count", &[3])])), None);
    }
}
