//! What a weight tensor is for, by its GGUF name: the categories numa-moe reports bytes by
//! (`numa-moe plan`, the load and exit reports, the locality counters) and places by (the
//! map's expert rules for routed experts, its `dense=` rule for every other weight matrix).
//!
//! Names follow llama.cpp's `LLM_TENSOR_NAMES` (src/llama-arch.cpp of the pinned tree):
//! `blk.N.<what>.weight`, plus the model-level `token_embd`, `output`, `output_norm`.

use std::fmt;

/// The categories of weights a token reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Stacked routed experts (`ffn_{gate,up,down,gate_up}_exps`).
    RoutedExperts,
    /// Attention projections under every architecture's names (`attn_q`, `attn_k`, `attn_v`,
    /// `attn_output`, `attn_qkv`, MLA's `attn_q_a`, `attn_q_b`, `attn_kv_a_mqa`, `attn_kv_b`,
    /// `attn_k_b`, `attn_v_b`, ...), and their norms.
    Attention,
    /// Shared experts (`ffn_*_shexp`) and their gate.
    SharedExperts,
    /// The FFN of dense layers and of dense models (`ffn_gate`, `ffn_up`, `ffn_down`).
    DenseFfn,
    /// The output head (`output`, the logits' projection).
    OutputHead,
    /// The token embeddings (one row read per token).
    Embeddings,
    /// Everything else: norms, the router (`ffn_gate_inp`), biases, recurrent state weights.
    Other,
}

impl Category {
    pub const ALL: [Category; 7] = [
        Category::RoutedExperts,
        Category::Attention,
        Category::SharedExperts,
        Category::DenseFfn,
        Category::OutputHead,
        Category::Embeddings,
        Category::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::RoutedExperts => "routed experts",
            Category::Attention => "attention",
            Category::SharedExperts => "shared experts",
            Category::DenseFfn => "dense FFN",
            Category::OutputHead => "output head",
            Category::Embeddings => "embeddings",
            Category::Other => "other",
        }
    }

    /// A short key for JSON and C (`routed_experts`, ...).
    pub fn key(self) -> &'static str {
        match self {
            Category::RoutedExperts => "routed_experts",
            Category::Attention => "attention",
            Category::SharedExperts => "shared_experts",
            Category::DenseFfn => "dense_ffn",
            Category::OutputHead => "output_head",
            Category::Embeddings => "embeddings",
            Category::Other => "other",
        }
    }

    /// Its position in [`Category::ALL`] (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor's kind: its name without the "blk.N." prefix and the ".weight" suffix
/// ("blk.3.attn_k_b.weight" is "attn_k_b", "output.weight" is "output").
pub fn kind(name: &str) -> &str {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    match base.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((_, what)) => what,
        None => base,
    }
}

/// The category of the weight tensor named `name` (GGUF or ggml name; a ".weight" or
/// ".bias" suffix and a "blk.N." prefix are ignored).
pub fn category_of(name: &str) -> Category {
    let what = kind(name.strip_suffix(".bias").unwrap_or(name));
    if what.ends_with("_exps") || what.contains("_exps.") {
        return Category::RoutedExperts;
    }
    if what.contains("_shexp") || what.contains("_chexp") {
        return Category::SharedExperts;
    }
    if what.starts_with("attn_") || what.starts_with("attn.") {
        return Category::Attention;
    }
    if what == "token_embd" || what == "tok_embd" {
        return Category::Embeddings;
    }
    if what == "output" {
        return Category::OutputHead;
    }
    if matches!(what, "ffn_gate" | "ffn_up" | "ffn_down" | "ffn_gate_up") {
        return Category::DenseFfn;
    }
    Category::Other
}

/// Whether numa-moe leaves a weight to llama.cpp whatever its shape: norms, expert-bias
/// vectors and the token embeddings (one row read per token). The router (`ffn_gate_inp`, a
/// matrix every token multiplies: 0.4 GB per token in DeepSeek V3) is placed like the rest.
pub fn left_to_llama(name: &str) -> bool {
    category_of(name) == Category::Embeddings || name.contains("_norm") || name.contains("exp_probs") || name.ends_with(".bias")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_categorys_index_is_its_place_in_all() {
        for (i, c) in Category::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
        }
    }

    #[test]
    fn names_of_every_kind_land_in_their_category() {
        for (name, want) in [
            ("blk.3.ffn_up_exps.weight", Category::RoutedExperts),
            ("blk.3.ffn_gate_up_exps.weight", Category::RoutedExperts),
            ("blk.3.ffn_down_shexp.weight", Category::SharedExperts),
            ("blk.3.ffn_gate_inp_shexp.weight", Category::SharedExperts),
            ("blk.0.attn_q.weight", Category::Attention),
            ("blk.0.attn_kv_a_mqa.weight", Category::Attention),
            ("blk.0.attn_k_b.weight", Category::Attention),
            ("blk.0.attn_qkv.weight", Category::Attention),
            ("blk.0.attn_output.weight", Category::Attention),
            ("blk.0.attn_norm.weight", Category::Attention),
            ("blk.0.ffn_gate.weight", Category::DenseFfn),
            ("blk.0.ffn_down.weight", Category::DenseFfn),
            ("output.weight", Category::OutputHead),
            ("token_embd.weight", Category::Embeddings),
            ("blk.1.ffn_gate_inp.weight", Category::Other),
            ("blk.1.ffn_norm.weight", Category::Other),
            ("output_norm.weight", Category::Other),
        ] {
            assert_eq!(category_of(name), want, "{name}");
        }
    }
}
