//! The tensor table of a GGUF model file, read without loading the model: what
//! `numa-moe plan` needs to plan a model on any machine (no ggml, no llama.cpp).
//!
//! Only the header, the key/value section (skipped, except the alignment and the
//! architecture) and the tensor infos are read, through a read-only mapping.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::placement::{self, ExpertTensor};

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

/// Most dimensions a tensor has: ggml's GGML_MAX_DIMS.
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_DIMS: u32 = 4;

/// Longest tensor name plus its NUL: ggml's GGML_MAX_NAME (gguf.cpp rejects longer names).
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_NAME: usize = 64;

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

    /// The shape padded to four dimensions with 1s, as ggml holds it.
    pub fn ne4(&self) -> [u64; 4] {
        let mut ne = [1; 4];
        for (d, n) in ne.iter_mut().zip(&self.ne) {
            *d = *n;
        }
        ne
    }

    /// Bytes of one row (ne[0] elements); `None` for an unknown type.
    pub fn row_bytes(&self) -> Option<u64> {
        let (_, blck, size) = type_info(self.ggml_type)?;
        (self.ne4()[0] / blck).checked_mul(size)
    }

    /// Bytes of the whole tensor; `None` for an unknown type or a size beyond 64 bits.
    pub fn bytes(&self) -> Option<u64> {
        self.ne4()[1..].iter().try_fold(self.row_bytes()?, |acc, &n| acc.checked_mul(n))
    }

    /// The planner's view, if this is a stacked expert tensor (see
    /// [`placement::stacked_expert`]); an error names a stack llama.cpp could not load.
    pub fn expert_tensor(&self) -> Result<Option<ExpertTensor>, GgufError> {
        placement::stacked_expert(&self.name, &self.type_name(), self.ne4(), self.row_bytes(), true).map_err(GgufError)
    }
}

/// The parts of a GGUF file numa-moe uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFile {
    pub version: u32,
    pub architecture: Option<String>,
    pub alignment: u64,
    pub tensors: Vec<TensorInfo>,
    /// Integer keys and short integer arrays (at most [`MAX_INT_ARRAY`] elements, e.g. a
    /// per-layer `head_count_kv`), by key: the hyper-parameters `numa-moe plan` reads
    /// (`<arch>.expert_used_count`, ...). A scalar is a one-element list; signed values are
    /// kept as their two's complement bits.
    pub ints: BTreeMap<String, Vec<u64>>,
}

/// Longest integer array [`GgufFile::ints`] keeps: per-layer values fit (llama.cpp has at most
/// 512 layers); token lists and other long arrays are skipped.
/// Not part of the C API:
/// cbindgen:ignore
pub const MAX_INT_ARRAY: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError(pub String);

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GgufError {}

fn err<T>(msg: String) -> Result<T, GgufError> {
    Err(GgufError(msg))
}

/// The bytes of a value of a fixed-size GGUF type, `None` for strings, arrays and unknown types.
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A cursor over the file. Every read is bounds-checked, and every count the file states is
/// checked against the bytes left before anything is allocated or looped over.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.left() {
            return err(format!("truncated GGUF file: needs {n} bytes at offset {} but it has {}", self.pos, self.b.len()));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// A count of `what` read at the cursor, each at least `min_bytes` long in the file: a
    /// count the rest of the file cannot hold is an error before anything is allocated.
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<u64, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        if n > self.left() / min_bytes {
            return err(format!(
                "the GGUF file claims {n} {what} at offset {at}, but the {} bytes left can hold at most {}",
                self.left(),
                self.left() / min_bytes
            ));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// Reads one value of GGUF type `t` of key `key`: integers and strings are returned, the
    /// rest skipped. Arrays of arrays are refused, as llama.cpp's own reader does (gguf.cpp:
    /// "invalid GGUF type"), so nothing here recurses.
    fn value(&mut self, key: &str, t: u32) -> Result<Value, GgufError> {
        let at = self.pos;
        Ok(match t {
            0 | 1 | 7 => Value::Int(self.take(1)?[0] as u64),
            2 | 3 => {
                let b = self.take(2)?;
                Value::Int(u16::from_le_bytes([b[0], b[1]]) as u64)
            }
            4 | 5 => Value::Int(self.u32()? as u64),
            10 | 11 => Value::Int(self.u64()?),
            6 | 12 => {
                self.take(scalar_size(t).unwrap_or(8))?;
                Value::Other
            }
            8 => Value::Str(self.string()?),
            9 => {
                let et = self.u32()?;
                match et {
                    8 => {
                        for _ in 0..self.count("strings", 8)? {
                            let n = self.u64()?;
                            self.take(n)?;
                        }
                    }
                    9 => return err(format!("key \"{key}\" at offset {at} holds an array of arrays, which GGUF readers do not accept")),
                    _ => {
                        let size = scalar_size(et).ok_or_else(|| {
                            GgufError(format!("key \"{key}\" at offset {at} is an array of unknown GGUF value type {et}"))
                        })?;
                        let n = self.count("array elements", size)?;
                        let bytes = self.take(n * size)?;
                        // integers (not floats or bools), few enough to be per-layer values
                        if matches!(et, 0..=5 | 10 | 11) && n <= MAX_INT_ARRAY {
                            return Ok(Value::Ints(bytes.chunks_exact(size as usize).map(le_int).collect()));
                        }
                    }
                }
                Value::Other
            }
            // the offset of the type itself, read just before
            _ => return err(format!("key \"{key}\" at offset {} has unknown GGUF value type {t}", at.saturating_sub(4))),
        })
    }
}

/// A little-endian unsigned integer of 1, 2, 4 or 8 bytes.
fn le_int(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, &x| acc << 8 | x as u64)
}

enum Value {
    Int(u64),
    Ints(Vec<u64>),
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

    /// Reads the header, keys and tensor table, checking what llama.cpp's gguf.cpp checks:
    /// at most four dimensions, names shorter than 64 bytes and unique, known types, rows of
    /// whole blocks, sizes that fit in 64 bits, and offsets that follow each other.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4)? != b"GGUF" {
            return err("not a GGUF file (bad magic)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return err(format!("unsupported GGUF version {version}"));
        }
        // a tensor info takes at least 24 bytes (name length, dims, type, offset), a key 13
        let n_tensors = r.count("tensors", 24)?;
        let n_kv = r.count("keys", 13)?;
        let mut alignment = 32;
        let mut architecture = None;
        let mut ints = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            match (key.as_str(), r.value(&key, t)?) {
                ("general.alignment", Value::Int(a)) => {
                    if !a.is_power_of_two() {
                        return err(format!("general.alignment {a} is not a power of 2"));
                    }
                    alignment = a;
                }
                ("general.architecture", Value::Str(s)) => architecture = Some(s),
                (_, Value::Int(v)) => {
                    ints.insert(key, vec![v]);
                }
                (_, Value::Ints(v)) => {
                    ints.insert(key, v);
                }
                _ => {}
            }
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::with_capacity(n_tensors as usize);
        let mut next_offset = 0u64;
        for i in 0..n_tensors {
            let at = r.pos;
            let name = r.string()?;
            if name.len() >= MAX_NAME {
                return err(format!("tensor {i} at offset {at} has a name of {} bytes; ggml allows at most {}", name.len(), MAX_NAME - 1));
            }
            let n_dims = r.u32()?;
            if n_dims > MAX_DIMS {
                return err(format!("tensor \"{name}\" has {n_dims} dimensions; ggml allows at most {MAX_DIMS}"));
            }
            let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            let t = TensorInfo { name, ne, ggml_type, offset };
            let shape = || format!("[{}]", t.ne.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "));
            // ggml holds dimensions as int64_t
            if let Some(n) = t.ne.iter().find(|&&n| n > i64::MAX as u64) {
                return err(format!("tensor \"{}\" has a dimension of {n} elements, more than ggml can count", t.name));
            }
            let Some((type_name, blck, _)) = type_info(ggml_type) else {
                return err(format!("tensor \"{}\" has unknown ggml type {ggml_type}", t.name));
            };
            if t.ne4()[0] % blck != 0 {
                return err(format!(
                    "tensor \"{}\" of type {type_name} has rows of {} elements, not a multiple of {blck}",
                    t.name,
                    t.ne4()[0]
                ));
            }
            let elements = t.ne4().iter().try_fold(1u64, |acc, &n| acc.checked_mul(n)).filter(|&n| n <= i64::MAX as u64);
            let Some(size) = t.bytes().filter(|_| elements.is_some()) else {
                return err(format!("tensor \"{}\" of shape {} and type {type_name}: its size overflows 64 bits", t.name, shape()));
            };
            if offset != next_offset {
                return err(format!("tensor \"{}\" has data offset {offset}, but the tensors before it end at {next_offset}", t.name));
            }
            next_offset = size.checked_next_multiple_of(alignment).and_then(|s| s.checked_add(offset)).ok_or_else(|| {
                GgufError(format!("tensor \"{}\" of shape {} ends beyond 64 bits of data (offset {offset}, {size} bytes)", t.name, shape()))
            })?;
            if !names.insert(t.name.clone()) {
                return err(format!("tensor name \"{}\" appears twice", t.name));
            }
            tensors.push(t);
        }
        Ok(GgufFile { version, architecture, alignment, tensors, ints })
    }

    /// The integer hyper-parameter `<architecture>.<key>` (`expert_used_count`,
    /// `attention.head_count_kv`, ...): one value, or one per layer.
    pub fn hparam(&self, key: &str) -> Option<&[u64]> {
        let arch = self.architecture.as_deref()?;
        self.ints.get(&format!("{arch}.{key}")).map(Vec::as_slice)
    }

    /// Every stacked expert tensor in the file; an error names the first stack that
    /// llama.cpp could not load (too many experts, a layer beyond its limit).
    pub fn expert_tensors(&self) -> Result<Vec<ExpertTensor>, GgufError> {
        self.tensors.iter().filter_map(|t| t.expert_tensor().transpose()).collect()
    }
}

/// A GGUF file holding only the header, `general.architecture` and a tensor table (no
/// data): enough for `numa-moe plan`. For tests and examples.
pub fn write_table_only(tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    write_table_with_keys("qwen3moe", &[], tensors)
}

/// [`write_table_only`] for architecture `arch`, with integer keys `<arch>.<key>` (u32 values,
/// as llama.cpp's converter writes them).
pub fn write_table_with_keys(arch: &str, keys: &[(&str, u32)], tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(1 + keys.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, arch);
    for (k, v) in keys {
        s(&mut b, &format!("{arch}.{k}"));
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
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
        // saturating: the tests also write tables whose sizes overflow, to see them refused
        off = off.saturating_add(info.bytes().and_then(|n| n.checked_next_multiple_of(32)).unwrap_or(u64::MAX));
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
        let e = f.expert_tensors().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].layer, Some(3));
        assert_eq!(e[0].row_bytes, 2048 / 256 * 144);
        assert_eq!(e[0].n_expert, 128);
        assert_eq!(e[0].type_name, "q4_K");
    }

    /// A header claiming `n_tensors` tensors and `n_kv` keys, followed by `rest`.
    fn header(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(rest);
        b
    }

    fn key(name: &str, t: u32, value: &[u8]) -> Vec<u8> {
        let mut b = (name.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(value);
        b
    }

    fn parse_err(b: &[u8]) -> String {
        GgufFile::parse(b).unwrap_err().0
    }

    #[test]
    fn counts_are_bounded_by_the_bytes_left() {
        let err = parse_err(&header(u64::MAX, 0, &[]));
        assert!(err.contains("claims 18446744073709551615 tensors at offset 8"), "{err}");
        let err = parse_err(&header(0, 1 << 40, &[0; 26]));
        assert!(err.contains("claims 1099511627776 keys at offset 16, but the 26 bytes left can hold at most 2"), "{err}");
        // an array of 2^61 u64s (2^64 bytes: the product must not wrap) and of 2^60 strings
        let mut v = 11u32.to_le_bytes().to_vec();
        v.extend_from_slice(&(1u64 << 61).to_le_bytes());
        assert!(parse_err(&header(0, 1, &key("a", 9, &v))).contains("claims 2305843009213693952 array elements"));
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_err(&header(0, 1, &key("a", 9, &v))).contains("claims 1152921504606846976 strings"));
        // a string longer than the file
        let mut k = key("general.architecture", 8, &u64::MAX.to_le_bytes());
        k.extend_from_slice(b"qwen");
        assert!(parse_err(&header(0, 1, &k)).contains("truncated GGUF file: needs 18446744073709551615 bytes"));
    }

    #[test]
    fn arrays_are_skipped_and_arrays_of_arrays_refused() {
        let mut strings = 8u32.to_le_bytes().to_vec();
        strings.extend_from_slice(&2u64.to_le_bytes());
        for s in ["ab", "cde"] {
            strings.extend_from_slice(&(s.len() as u64).to_le_bytes());
            strings.extend_from_slice(s.as_bytes());
        }
        let mut floats = 6u32.to_le_bytes().to_vec();
        floats.extend_from_slice(&3u64.to_le_bytes());
        floats.extend_from_slice(&[0; 12]);
        let mut kv = key("tokenizer.ggml.tokens", 9, &strings);
        kv.extend(key("tokenizer.ggml.scores", 9, &floats));
        kv.extend(key("general.architecture", 8, &[3, 0, 0, 0, 0, 0, 0, 0, b'm', b'o', b'e']));
        assert_eq!(GgufFile::parse(&header(0, 3, &kv)).unwrap().architecture.as_deref(), Some("moe"));

        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend_from_slice(&1u64.to_le_bytes());
        nested.extend_from_slice(&4u32.to_le_bytes());
        nested.extend_from_slice(&0u64.to_le_bytes());
        let err = parse_err(&header(0, 1, &key("x.y", 9, &nested)));
        assert_eq!(err, "key \"x.y\" at offset 39 holds an array of arrays, which GGUF readers do not accept");
        assert!(parse_err(&header(0, 1, &key("x", 13, &[]))).contains("key \"x\" at offset 33 has unknown GGUF value type 13"));
        let err = parse_err(&header(0, 1, &key("general.alignment", 4, &48u32.to_le_bytes())));
        assert!(err.contains("general.alignment 48 is not a power of 2"), "{err}");
    }

    #[test]
    fn integer_keys_and_short_integer_arrays_are_kept() {
        let b = write_table_with_keys("deepseek2", &[("expert_count", 256), ("expert_used_count", 8)], &[]);
        let f = GgufFile::parse(&b).unwrap();
        assert_eq!(f.hparam("expert_count"), Some(&[256][..]));
        assert_eq!(f.hparam("expert_used_count"), Some(&[8][..]));
        assert_eq!(f.hparam("block_count"), None);
        // a per-layer i32 array is kept; a u8 scalar is read; a long array is not kept
        let arr = |et: u32, vals: &[u8], n: u64| {
            let mut v = et.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.extend_from_slice(vals);
            v
        };
        let mut kv = key("general.architecture", 8, &[1, 0, 0, 0, 0, 0, 0, 0, b'm']);
        kv.extend(key("m.attention.head_count_kv", 9, &arr(5, &[4, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0], 3)));
        kv.extend(key("m.x", 0, &[7]));
        kv.extend(key("m.tokens", 9, &arr(1, &[0; 1025], 1025)));
        let f = GgufFile::parse(&header(0, 4, &kv)).unwrap();
        assert_eq!(f.hparam("attention.head_count_kv"), Some(&[4, 0, 258][..]));
        assert_eq!(f.hparam("x"), Some(&[7][..]));
        assert_eq!(f.hparam("tokens"), None);
    }

    #[test]
    fn tensor_infos_are_checked_as_llama_cpp_checks_them() {
        let e = |t: &[(&str, &[u64], u32)]| parse_err(&write_table_only(t));
        assert!(e(&[("a", &[1, 1, 1, 1, 1], 0)]).contains("tensor \"a\" has 5 dimensions; ggml allows at most 4"));
        assert!(e(&[(&"n".repeat(64), &[4], 0)]).contains("has a name of 64 bytes; ggml allows at most 63"));
        assert!(e(&[("a", &[4], 4)]).contains("tensor \"a\" has unknown ggml type 4"));
        assert!(e(&[("a", &[100, 2], 12)]).contains("tensor \"a\" of type q4_K has rows of 100 elements, not a multiple of 256"));
        assert!(e(&[("a", &[1 << 63, 1], 0)]).contains("a dimension of 9223372036854775808 elements"));
        // 2^62 f32 elements: fits ggml's element count, not 64 bits of bytes
        let err = e(&[("blk.0.ffn_up_exps.weight", &[1 << 31, 1 << 29, 4], 0)]);
        assert_eq!(err, "tensor \"blk.0.ffn_up_exps.weight\" of shape [2147483648, 536870912, 4] and type f32: its size overflows 64 bits");
        // each fits, their sum does not
        let err = e(&[("a", &[1 << 61], 0), ("b", &[1 << 61], 0)]);
        assert!(err.contains("tensor \"b\" of shape [2305843009213693952] ends beyond 64 bits of data"), "{err}");
        assert!(e(&[("a", &[4], 0), ("a", &[4], 0)]).contains("tensor name \"a\" appears twice"));
        // offsets must follow each other, aligned
        let mut b = write_table_only(&[("a", &[4], 0), ("b", &[4], 0)]);
        let at = b.len() - 8;
        b[at..].copy_from_slice(&16u64.to_le_bytes());
        assert_eq!(parse_err(&b), "tensor \"b\" has data offset 16, but the tensors before it end at 32");
    }

    #[test]
    fn expert_stacks_llama_cpp_cannot_load_are_errors() {
        let f = |ne: &[u64]| GgufFile::parse(&write_table_only(&[("blk.2.ffn_up_exps.weight", ne, 8)])).unwrap().expert_tensors();
        assert_eq!(f(&[64, 8, 1024]).unwrap()[0].n_expert, 1024);
        assert_eq!(
            f(&[64, 8, 1025]).unwrap_err().0,
            "tensor \"blk.2.ffn_up_exps.weight\" has 1025 experts (ne[2]); llama.cpp supports at most 1024"
        );
        // not stacks: one expert, a fourth dimension, no rows
        assert!(f(&[64, 8, 1]).unwrap().is_empty());
        assert!(f(&[64, 8, 4, 2]).unwrap().is_empty());
        assert!(f(&[64, 0, 4]).unwrap().is_empty());
        // a trailing 1 is the same tensor to ggml
        assert_eq!(f(&[64, 8, 4, 1]).unwrap()[0].n_expert, 4);
        let deep = GgufFile::parse(&write_table_only(&[("blk.512.ffn_up_exps.weight", &[64, 8, 4], 8)])).unwrap();
        assert!(deep.expert_tensors().unwrap_err().0.contains("is in layer 512; llama.cpp supports at most 512 layers (0-511)"));
    }

    #[test]
    fn truncated_and_foreign_files_are_clear_errors() {
        let b = write_table_only(&[("a", &[4, 4], 0)]);
        assert!(GgufFile::parse(&b[..b.len() - 3]).unwrap_err().0.contains("truncated GGUF file"));
        assert!(GgufFile::parse(b"GGML....").unwrap_err().0.contains("not a GGUF file"));
    }
}
