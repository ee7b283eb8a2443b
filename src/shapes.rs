//! Built-in tensor tables of published MoE models, for `numa-moe plan --shape NAME`: every
//! tensor under the GGUF name and shape llama.cpp gives it (src/models/*.cpp of the pinned
//! tree), built from the model's published config, so that a plan and the bytes a token reads
//! can be reported without the file.
//!
//! Types: the routed experts in one type (default q4_K), every other weight matrix in another
//! (default q8_0), the norms, the router (`ffn_gate_inp`) and the expert bias in f32, as
//! llama-quantize leaves them. A type whose block does not divide a tensor's rows falls back
//! as llama-quantize falls back (`tensor_type_fallback` in src/llama-quant.cpp).

use crate::footprint::{KvLayout, KvShape, MoeParams};
use crate::gguf::{type_info, TensorInfo, GGML_TYPES};

/// The shapes `--shape` knows, with the config each is built from.
pub const SHAPES: &[(&str, &str)] = &[
    ("deepseek-v3", "DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json: 61 layers, 3 dense, 256 experts, 8 used, MLA)"),
    ("qwen3-235b", "Qwen3-235B-A22B (Qwen/Qwen3-235B-A22B config.json: 94 layers, 128 experts, 8 used, GQA 64/4)"),
];

const F32: u32 = 0;
const F16: u32 = 1;

/// The types a shaped table is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Types {
    /// Routed experts.
    pub experts: u32,
    /// Every other weight matrix (not norms, the router or biases).
    pub dense: u32,
}

impl Default for Types {
    fn default() -> Self {
        Types { experts: 12, dense: 8 } // q4_K, q8_0
    }
}

/// The ggml type named `name` (case-insensitive: "q4_k" is q4_K).
pub fn type_by_name(name: &str) -> Result<u32, String> {
    GGML_TYPES
        .iter()
        .find(|t| t.1.eq_ignore_ascii_case(name))
        .map(|t| t.0)
        .ok_or_else(|| format!("\"{name}\" is not a ggml type (one of: {})", GGML_TYPES.iter().map(|t| t.1).collect::<Vec<_>>().join(", ")))
}

/// The type llama-quantize writes a tensor of `cols` columns in when asked for `want`: `want`
/// itself where its block divides the rows, else its fallback, else f16.
pub fn fitting_type(want: u32, cols: u64) -> u32 {
    let fits = |t: u32| type_info(t).is_some_and(|(_, blck, _)| cols % blck == 0);
    if fits(want) {
        return want;
    }
    let fallback = match type_info(want).map(|t| t.0) {
        Some("iq1_s" | "iq1_m" | "iq2_xxs" | "iq2_xs" | "iq2_s" | "iq3_xxs" | "iq3_s" | "iq4_xs") => Some(20), // iq4_nl
        Some("q2_0" | "q2_K" | "q3_K" | "tq1_0" | "tq2_0") => Some(2),                                         // q4_0
        Some("q4_K") => Some(6),                                                                               // q5_0
        Some("q5_K") => Some(7),                                                                               // q5_1
        Some("q6_K") => Some(8),                                                                               // q8_0
        _ => None,
    };
    fallback.filter(|&t| fits(t)).unwrap_or(F16)
}

/// A built-in model: its tensor table and the hyper-parameters `numa-moe plan` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapedModel {
    pub name: &'static str,
    pub description: &'static str,
    /// llama.cpp's architecture name.
    pub architecture: &'static str,
    pub tensors: Vec<TensorInfo>,
    pub moe: MoeParams,
    pub kv: KvShape,
}

/// Collects tensors with their data offsets laid out as a GGUF file would (32-byte aligned).
struct Table {
    tensors: Vec<TensorInfo>,
    next: u64,
    types: Types,
}

enum Kind {
    /// A norm, the router, a bias: f32.
    F32,
    Dense,
    Experts,
}

impl Table {
    fn add(&mut self, name: String, ne: &[u64], kind: Kind) {
        let want = match kind {
            Kind::F32 => F32,
            Kind::Dense => self.types.dense,
            Kind::Experts => self.types.experts,
        };
        let ggml_type = fitting_type(want, ne[0]);
        let t = TensorInfo { name, ne: ne.to_vec(), ggml_type, offset: self.next };
        // every shape here is far below 2^64 bytes in any type
        self.next += t.bytes().unwrap_or(0).next_multiple_of(32);
        self.tensors.push(t);
    }
}

/// The model `name` (one of [`SHAPES`]) in `types`.
pub fn build(name: &str, types: Types) -> Result<ShapedModel, String> {
    let mut t = Table { tensors: Vec::new(), next: 0, types };
    let (entry, architecture, moe, kv) = match name {
        "deepseek-v3" => {
            deepseek_v3(&mut t);
            let kv = KvShape { n_layer: 61, layout: KvLayout::Mla { kv_lora_rank: 512, rope_dims: 64 } };
            (0, "deepseek2", MoeParams { n_expert: 256, n_expert_used: 8 }, kv)
        }
        "qwen3-235b" => {
            qwen3_235b(&mut t);
            let kv = KvShape { n_layer: 94, layout: KvLayout::Gqa { n_head_kv: vec![4], head_dim_k: 128, head_dim_v: 128 } };
            (1, "qwen3moe", MoeParams { n_expert: 128, n_expert_used: 8 }, kv)
        }
        other => {
            return Err(format!(
                "unknown --shape \"{other}\" (built-in shapes: {})",
                SHAPES.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let (name, description) = SHAPES[entry];
    Ok(ShapedModel { name, description, architecture, tensors: t.tensors, moe, kv })
}

/// DeepSeek-V3 as llama.cpp's converter writes it now (src/models/deepseek2.cpp): MLA with
/// the split `attn_k_b`/`attn_v_b` (what makes the cache the latent only), no MTP layer.
fn deepseek_v3(t: &mut Table) {
    let (n_embd, n_vocab, n_layer, n_dense) = (7168, 129280, 61, 3);
    let (n_ff, n_ff_exp, n_expert, n_head) = (18432, 2048, 256, 128);
    let (q_lora, kv_lora, nope, rope, v_head) = (1536, 512, 128, 64, 128);
    t.add("token_embd.weight".into(), &[n_embd, n_vocab], Kind::Dense);
    for l in 0..n_layer {
        let n = |w: &str| format!("blk.{l}.{w}");
        t.add(n("attn_norm.weight"), &[n_embd], Kind::F32);
        t.add(n("attn_q_a_norm.weight"), &[q_lora], Kind::F32);
        t.add(n("attn_kv_a_norm.weight"), &[kv_lora], Kind::F32);
        t.add(n("attn_q_a.weight"), &[n_embd, q_lora], Kind::Dense);
        t.add(n("attn_q_b.weight"), &[q_lora, n_head * (nope + rope)], Kind::Dense);
        t.add(n("attn_kv_a_mqa.weight"), &[n_embd, kv_lora + rope], Kind::Dense);
        t.add(n("attn_k_b.weight"), &[nope, kv_lora, n_head], Kind::Dense);
        t.add(n("attn_v_b.weight"), &[kv_lora, v_head, n_head], Kind::Dense);
        t.add(n("attn_output.weight"), &[n_head * v_head, n_embd], Kind::Dense);
        t.add(n("ffn_norm.weight"), &[n_embd], Kind::F32);
        if l < n_dense {
            t.add(n("ffn_gate.weight"), &[n_embd, n_ff], Kind::Dense);
            t.add(n("ffn_up.weight"), &[n_embd, n_ff], Kind::Dense);
            t.add(n("ffn_down.weight"), &[n_ff, n_embd], Kind::Dense);
        } else {
            t.add(n("ffn_gate_inp.weight"), &[n_embd, n_expert], Kind::F32);
            t.add(n("exp_probs_b.bias"), &[n_expert], Kind::F32);
            t.add(n("ffn_gate_exps.weight"), &[n_embd, n_ff_exp, n_expert], Kind::Experts);
            t.add(n("ffn_up_exps.weight"), &[n_embd, n_ff_exp, n_expert], Kind::Experts);
            t.add(n("ffn_down_exps.weight"), &[n_ff_exp, n_embd, n_expert], Kind::Experts);
            t.add(n("ffn_gate_shexp.weight"), &[n_embd, n_ff_exp], Kind::Dense);
            t.add(n("ffn_up_shexp.weight"), &[n_embd, n_ff_exp], Kind::Dense);
            t.add(n("ffn_down_shexp.weight"), &[n_ff_exp, n_embd], Kind::Dense);
        }
    }
    t.add("output_norm.weight".into(), &[n_embd], Kind::F32);
    t.add("output.weight".into(), &[n_embd, n_vocab], Kind::Dense);
}

/// Qwen3-235B-A22B (src/models/qwen3moe.cpp): q/k norms per head, no shared experts, an
/// untied output head.
fn qwen3_235b(t: &mut Table) {
    let (n_embd, n_vocab, n_layer) = (4096, 151936, 94);
    let (n_head, n_head_kv, head_dim, n_ff_exp, n_expert) = (64, 4, 128, 1536, 128);
    t.add("token_embd.weight".into(), &[n_embd, n_vocab], Kind::Dense);
    for l in 0..n_layer {
        let n = |w: &str| format!("blk.{l}.{w}");
        t.add(n("attn_norm.weight"), &[n_embd], Kind::F32);
        t.add(n("attn_q.weight"), &[n_embd, n_head * head_dim], Kind::Dense);
        t.add(n("attn_k.weight"), &[n_embd, n_head_kv * head_dim], Kind::Dense);
        t.add(n("attn_v.weight"), &[n_embd, n_head_kv * head_dim], Kind::Dense);
        t.add(n("attn_q_norm.weight"), &[head_dim], Kind::F32);
        t.add(n("attn_k_norm.weight"), &[head_dim], Kind::F32);
        t.add(n("attn_output.weight"), &[n_head * head_dim, n_embd], Kind::Dense);
        t.add(n("ffn_norm.weight"), &[n_embd], Kind::F32);
        t.add(n("ffn_gate_inp.weight"), &[n_embd, n_expert], Kind::F32);
        t.add(n("ffn_gate_exps.weight"), &[n_embd, n_ff_exp, n_expert], Kind::Experts);
        t.add(n("ffn_up_exps.weight"), &[n_embd, n_ff_exp, n_expert], Kind::Experts);
        t.add(n("ffn_down_exps.weight"), &[n_ff_exp, n_embd, n_expert], Kind::Experts);
    }
    t.add("output_norm.weight".into(), &[n_embd], Kind::F32);
    t.add("output.weight".into(), &[n_embd, n_vocab], Kind::Dense);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::footprint::{footprint, weights_of};
    use crate::topology::Topology;
    use crate::weights::Category;

    /// Parameters one token reads, by category, from the table (one node, nothing placed).
    fn params(name: &str) -> Vec<(Category, f64)> {
        let m = build(name, Types::default()).unwrap();
        let w = weights_of(&m.tensors).unwrap();
        let topo = Topology::uniform(1, 4, 64);
        let f = footprint(&topo, &w, &m.moe, &vec![None; w.len()]);
        f.categories.iter().map(|c| (c.category, c.params)).collect()
    }

    fn get(p: &[(Category, f64)], c: Category) -> f64 {
        p.iter().find(|x| x.0 == c).unwrap().1
    }

    #[test]
    fn deepseek_v3_reads_what_its_config_says() {
        let p = params("deepseek-v3");
        // 58 MoE layers x 8 experts x 3 matrices of 7168 x 2048
        assert_eq!(get(&p, Category::RoutedExperts), (58u64 * 8 * 3 * 7168 * 2048) as f64);
        // per layer: q_a, q_b, kv_a_mqa, k_b + v_b, output, and three norms
        let attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 2 * 128 * 512 * 128 + 128 * 128 * 7168 + 7168 + 1536 + 512;
        assert_eq!(get(&p, Category::Attention), (61u64 * attn) as f64);
        assert_eq!(get(&p, Category::SharedExperts), (58u64 * 3 * 7168 * 2048) as f64);
        assert_eq!(get(&p, Category::DenseFfn), (3u64 * 3 * 7168 * 18432) as f64);
        assert_eq!(get(&p, Category::OutputHead), (7168u64 * 129280) as f64);
        assert_eq!(get(&p, Category::Embeddings), 7168.0);
        // the figures, to its one decimal: 20.4, 11.4, 2.6, 1.2, 0.9 billion
        for (c, want) in [
            (Category::RoutedExperts, 20.4),
            (Category::Attention, 11.4),
            (Category::SharedExperts, 2.6),
            (Category::DenseFfn, 1.2),
            (Category::OutputHead, 0.9),
        ] {
            assert_eq!(format!("{:.1}", get(&p, c) / 1e9), format!("{want:.1}"), "{c}");
        }
    }

    #[test]
    fn qwen3_235b_reads_what_its_config_says() {
        let p = params("qwen3-235b");
        assert_eq!(get(&p, Category::RoutedExperts), (94u64 * 8 * 3 * 4096 * 1536) as f64);
        let attn = 4096 * 8192 + 2 * 4096 * 512 + 8192 * 4096 + 4096 + 2 * 128;
        assert_eq!(get(&p, Category::Attention), (94u64 * attn) as f64);
        assert_eq!(get(&p, Category::SharedExperts), 0.0);
        assert_eq!(get(&p, Category::DenseFfn), 0.0);
        for (c, want) in [(Category::RoutedExperts, 14.2), (Category::Attention, 6.7), (Category::OutputHead, 0.6)] {
            assert_eq!(format!("{:.1}", get(&p, c) / 1e9), format!("{want:.1}"), "{c}");
        }
    }

    #[test]
    fn types_fall_back_where_llama_quantize_falls_back() {
        let q4_k = type_by_name("q4_k").unwrap();
        assert_eq!(type_info(q4_k).unwrap().0, "q4_K");
        assert_eq!(type_info(fitting_type(q4_k, 128)).unwrap().0, "q5_0");
        assert_eq!(type_info(fitting_type(q4_k, 7168)).unwrap().0, "q4_K");
        assert_eq!(type_info(fitting_type(14, 128)).unwrap().0, "q8_0");
        assert_eq!(type_info(fitting_type(8, 100)).unwrap().0, "f16");
        assert!(type_by_name("q9_K").unwrap_err().starts_with("\"q9_K\" is not a ggml type (one of: f32, f16, q4_0"));
        // attn_k_b's 128-column rows cannot be q4_K; its shape stays
        let m = build("deepseek-v3", Types { experts: q4_k, dense: q4_k }).unwrap();
        let kb = m.tensors.iter().find(|t| t.name == "blk.0.attn_k_b.weight").unwrap();
        assert_eq!((kb.type_name(), kb.ne.clone()), ("q5_0".to_string(), vec![128, 512, 128]));
    }

    #[test]
    fn tables_are_well_formed_and_unknown_names_are_errors() {
        for (name, _) in SHAPES {
            let m = build(name, Types::default()).unwrap();
            let b = crate::gguf::write_table_only(
                &m.tensors.iter().map(|t| (t.name.as_str(), t.ne.as_slice(), t.ggml_type)).collect::<Vec<_>>(),
            );
            let f = crate::gguf::GgufFile::parse(&b).unwrap();
            assert_eq!(f.tensors, m.tensors, "{name}: offsets as a GGUF file lays them out");
        }
        assert_eq!(
            build("llama-4", Types::default()).unwrap_err(),
            "unknown --shape \"llama-4\" (built-in shapes: deepseek-v3, qwen3-235b)"
        );
    }
}
