//! Routing profiles: how many routed token-slots each expert of each layer received, and the
//! work each node did, as recorded by the hook (`NUMA_MOE_ROUTING_OUT`) and read back by
//! `numa-moe routing` and by the `balanced` map. Pure data and file formats; recording
//! lives in [`crate::compute::stats`], planning from a profile in [`crate::placement`].
//!
//! The file is JSON (schema in docs/ROUTING.md):
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
//! the recorder counts one op per layer, the first one it sees); `recent` the same over the
//! last [`RECENT_TOKENS`] routed tokens of the layer.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode};

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
            return bad(format!(
                "its layers {:?} are not the model's expert layers {:?}",
                short(&layers),
                short(&self.model.expert_layers)
            ));
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

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self, Error> {
        let p: RoutingProfile = serde_json::from_str(text)
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("routing profile {origin}: not a numa-moe routing file: {e}")))?;
        p.validate(origin)?;
        Ok(p)
    }

    /// Reads a profile; files over 256 MiB are refused (1024 experts x 512 layers of
    /// counts is under 10 MiB).
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
        Self::from_json(&text, &origin)
    }

    pub fn save(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, self.to_json() + "\n")
            .map_err(|e| Error::new(ErrorCode::SystemError, format!("cannot write routing profile {}: {e}", path.display())))
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

fn short(v: &[u32]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!("[{}, {}, ... {} layers ..., {}]", v[0], v[1], v.len(), v[v.len() - 1])
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
}
