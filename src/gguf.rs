//! The tensor table of a GGUF model file, read without loading the model: what
//! `numa-moe plan` needs to plan a model on any machine (no ggml, no llama.cpp).
//!
//! Only the header, the key/value section (skipped, except the alignment and the
//! architecture) and the tensor infos are read, through a read-only mapping.

use std::fmt;
use std::path::Path;

use crate::placement::ExpertTensor;

/// ggml's element types as of ggml 0.25.3: (id, name, block size, bytes per block).
/// Checked against real model files by the tests (tensor offsets must add up).
pub const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
];

pub fn type_info(id: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES.iter().find(|t| t.0 == id).map(|t| (t.1, t.2, t.3))
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn type_name(&self) -> String {
        type_info(self.ggml_type).map_or_else(|| format!("type{}", self.ggml_type), |t| t.0.to_string())
    }

    /// Bytes of one row (ne[0] elements).
    pub fn row_bytes(&self) -> Option<u64> {
        let (_, blck, size) = type_info(self.ggml_type)?;
        Some(self.ne.first().copied().unwrap_or(1) / blck * size)
    }

    pub fn bytes(&self) -> Option<u64> {
        Some(self.row_bytes()? * self.ne.iter().skip(1).product::<u64>())
    }

    /// The planner's view, if this is a stacked expert tensor (3-D, more than one expert).
    pub fn expert_tensor(&self) -> Option<ExpertTensor> {
        if self.ne.len() != 3 || self.ne[2] < 2 {
            return None;
        }
        Some(ExpertTensor {
            name: self.name.clone(),
            layer: crate::expert_map::layer_of(&self.name),
            type_name: self.type_name(),
            n_expert: self.ne[2] as u32,
            rows: self.ne[1],
            row_bytes: self.row_bytes()?,
        })
    }
}

/// The parts of a GGUF file numa-moe uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFile {
    pub version: u32,
    pub architecture: Option<String>,
    pub alignment: u64,
    pub tensors: Vec<TensorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError(pub String);

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GgufError {}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
                GgufError(format!("truncated GGUF file: needs {n} bytes at offset {} but it has {}", self.pos, self.b.len()))
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// Skips one value of GGUF type `t`, or returns it when it is an integer or a string.
    fn value(&mut self, t: u32) -> Result<Value, GgufError> {
        Ok(match t {
            0 | 1 | 7 => Value::Int(self.take(1)?[0] as u64),
            2 | 3 => Value::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            4 | 5 => Value::Int(self.u32()? as u64),
            6 => {
                self.take(4)?;
                Value::Other
            }
            8 => Value::Str(self.string()?),
            9 => {
                let et = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(et)?;
                }
                Value::Other
            }
            10 | 11 => Value::Int(self.u64()?),
            12 => {
                self.take(8)?;
                Value::Other
            }
            _ => return Err(GgufError(format!("unknown GGUF value type {t} at offset {}", self.pos))),
        })
    }
}

enum Value {
    Int(u64),
    Str(String),
    Other,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let f = std::fs::File::open(path).map_err(|e| GgufError(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the mapping is read-only and only read while `map` lives; a concurrent
        // writer could change bytes under us, which at worst yields a parse error.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| GgufError(format!("cannot map {}: {e}", path.display())))?;
        Self::parse(&map).map_err(|e| GgufError(format!("{}: {e}", path.display())))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4)? != b"GGUF" {
            return Err(GgufError("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut alignment = 32;
        let mut architecture = None;
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            match (key.as_str(), r.value(t)?) {
                ("general.alignment", Value::Int(a)) if a > 0 => alignment = a,
                ("general.architecture", Value::Str(s)) => architecture = Some(s),
                _ => {}
            }
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20) as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(GgufError(format!("tensor {name} has {n_dims} dimensions")));
            }
            let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        Ok(GgufFile { version, architecture, alignment, tensors })
    }

    /// Every stacked expert tensor in the file.
    pub fn expert_tensors(&self) -> Vec<ExpertTensor> {
        self.tensors.iter().filter_map(|t| t.expert_tensor()).collect()
    }
}

/// A GGUF file holding only the header, `general.architecture` and a tensor table (no
/// data): enough for `numa-moe plan`. For tests and examples.
pub fn write_table_only(tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "qwen3moe");
    let mut off = 0u64;
    for (name, ne, t) in tensors {
        s(&mut b, name);
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in *ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        let info = TensorInfo { name: name.to_string(), ne: ne.to_vec(), ggml_type: *t, offset: off };
        off += info.bytes().unwrap().div_ceil(32) * 32;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tensor_table() {
        let b = write_table_only(&[("token_embd.weight", &[2048, 1000], 1), ("blk.3.ffn_up_exps.weight", &[2048, 768, 128], 12)]);
        let f = GgufFile::parse(&b).unwrap();
        assert_eq!(f.architecture.as_deref(), Some("qwen3moe"));
        assert_eq!(f.tensors.len(), 2);
        let e = f.expert_tensors();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].layer, Some(3));
        assert_eq!(e[0].row_bytes, 2048 / 256 * 144);
        assert_eq!(e[0].n_expert, 128);
        assert_eq!(e[0].type_name, "q4_K");
    }

    #[test]
    fn truncated_and_foreign_files_are_clear_errors() {
        let b = write_table_only(&[("a", &[4, 4], 0)]);
        assert!(GgufFile::parse(&b[..b.len() - 3]).unwrap_err().0.contains("truncated GGUF file"));
        assert!(GgufFile::parse(b"GGML....").unwrap_err().0.contains("not a GGUF file"));
    }
}
