//! The `numa-moe` tool, run as a user would, on model files with a real tensor table.

use std::path::PathBuf;
use std::process::Command;

use numa_moe::gguf::write_table_only;

fn tool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_numa-moe")).args(args).env_remove("NUMA_MOE_TOPOLOGY").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A Qwen3-30B-A3B-shaped model table: `layers` blocks of 128 experts, q4_K experts.
fn qwen3_like(layers: u32) -> PathBuf {
    let mut t: Vec<(String, Vec<u64>, u32)> = vec![("token_embd.weight".into(), vec![2048, 1000], 1)];
    for l in 0..layers {
        t.push((format!("blk.{l}.attn_q.weight"), vec![2048, 4096], 12));
        t.push((format!("blk.{l}.ffn_gate_exps.weight"), vec![2048, 768, 128], 12));
        t.push((format!("blk.{l}.ffn_up_exps.weight"), vec![2048, 768, 128], 12));
        t.push((format!("blk.{l}.ffn_down_exps.weight"), vec![768, 2048, 128], 14));
    }
    let refs: Vec<(&str, &[u64], u32)> = t.iter().map(|(n, ne, ty)| (n.as_str(), ne.as_slice(), *ty)).collect();
    let path = std::env::temp_dir().join(format!("numa-moe-cli-{}-{layers}.gguf", std::process::id()));
    std::fs::write(&path, write_table_only(&refs)).unwrap();
    path
}

fn json_number(json: &str, key: &str, after: &str) -> u64 {
    let at = json.find(after).unwrap_or(0);
    let rest = &json[at..];
    let i = rest.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
    rest[i..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
}

#[test]
fn version() {
    let (code, out, _) = tool(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("numa-moe {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn topology_of_a_described_machine() {
    let (code, out, err) = tool(&["topology", "--topology", "package:2 numa:4 core:8 pu:2", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("\"id\":").count(), 8);
    assert_eq!(out.matches("\"cores\":8").count(), 8);
    let (code, out, _) = tool(&["topology"]);
    assert_eq!(code, 0);
    assert!(out.contains("this machine") && out.contains("node 0"), "{out}");
}

#[test]
fn plan_rows_on_eight_nodes_is_balanced() {
    let model = qwen3_like(2);
    let (code, out, err) =
        tool(&["plan", "--model", model.to_str().unwrap(), "--map", "rows", "--topology", "package:2 numa:4 core:8 pu:2", "--json"]);
    assert_eq!(code, 0, "{err}");
    // 2 layers x (2 x 128 x 768 x 1152 + 128 x 2048 x 630) bytes
    let total = 2 * (2 * 128 * 768 * 1152 + 128 * 2048 * 630);
    assert_eq!(json_number(&out, "expert_bytes", ""), total);
    assert_eq!(json_number(&out, "expert_tensors", ""), 6);
    for n in 0..8 {
        let at = format!("{{\"node\":{n},");
        assert_eq!(json_number(&out, "bytes", &at), total / 8, "node {n}: {out}");
        assert_eq!(json_number(&out, "tensors", &at), 6);
    }
    assert!(out.contains("rows 0-95 of every expert"), "{out}");
    assert!(out.contains("\"warnings\":[]"), "{out}");
    // 128 threads by default: 16 per node, contiguous
    assert!(out.contains("\"threads\":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]"), "{out}");
}

#[test]
fn plan_block_and_explicit_maps() {
    let model = qwen3_like(1);
    let m = model.to_str().unwrap();
    let (code, out, err) = tool(&["plan", "--model", m, "--map", "block", "--topology", "package:2 numa:1 core:4 pu:1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("experts 0-63") && out.contains("experts 64-127"), "{out}");
    let (code, out, _) = tool(&["plan", "--model", m, "--map", "0-99:0,*:1", "--topology", "package:2 numa:1 core:4 pu:1"]);
    assert_eq!(code, 0);
    assert!(out.contains("warning: imbalance: node 0 holds"), "{out}");
    let (code, _, err) = tool(&["plan", "--model", m, "--map", "0-99:0", "--topology", "package:2 numa:1 core:4 pu:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("experts 100-127 are not mapped"), "{err}");
}

#[test]
fn plan_warns_when_a_node_is_over_full() {
    let model = qwen3_like(4);
    let (code, out, err) = tool(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--map",
        "0-119:0,*:1",
        "--topology",
        "package:2 numa:1(memory=1GB) core:2 pu:1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning: node 0 is over-full: the plan places"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let (code, _, err) = tool(&["check-map", "0-7:0,8-15:5", "--topology", "package:2 numa:1 core:1 pu:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 5 does not exist (nodes on this machine: 0, 1)"), "{err}");
    let (code, out, _) = tool(&["check-map", " rows @ 0 , 1 ", "--topology", "package:2 numa:1 core:1 pu:1"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "ok: rows@0,1");
    let (code, _, err) = tool(&["plan", "--model", "/nonexistent.gguf"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot open /nonexistent.gguf"), "{err}");
    let (code, _, err) = tool(&["frobnicate"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown command \"frobnicate\""));
    let (code, _, err) = tool(&["plan", "--modle", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown option --modle"), "{err}");
}

#[test]
fn verify_a_process_without_placed_memory() {
    let (code, out, err) = tool(&["verify", "--pid", "self"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("numa-moe placed nothing"), "{out}");
}

/// Writes `bytes` as a fresh file in the temp dir and returns its path.
fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("numa-moe-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The tool's result and how long it ran.
fn timed(args: &[&str]) -> (i32, String, String, std::time::Duration) {
    let t0 = std::time::Instant::now();
    let (code, out, err) = tool(args);
    (code, out, err, t0.elapsed())
}

const TWO_NODES: &str = "package:2 numa:1 core:2 pu:1";

#[test]
fn plan_rejects_nested_arrays_without_recursing() {
    // one key whose value is an array of arrays ... a million deep (12 bytes a level)
    let depth = 1_000_000;
    let mut b = Vec::with_capacity(64 + 12 * depth);
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // keys
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"deep.");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..depth {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    let model = temp_file("nested.gguf", &b);
    let (code, _, err, took) = timed(&["plan", "--model", model.to_str().unwrap(), "--topology", TWO_NODES]);
    std::fs::remove_file(&model).unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("key \"deep.\"") && err.contains("array of arrays"), "{err}");
    assert!(took.as_secs_f64() < 5.0, "{took:?}");
}

#[test]
fn plan_rejects_more_experts_than_llama_cpp_supports() {
    let model = temp_file("many-experts.gguf", &write_table_only(&[("blk.0.ffn_up_exps.weight", &[256, 4, 4_000_000_000], 0)]));
    let (code, _, err) = tool(&["plan", "--model", model.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tensor \"blk.0.ffn_up_exps.weight\" has 4000000000 experts") && err.contains("at most 1024"), "{err}");
    // ne[2] = 2^32 + 2 must not be read as 2 experts
    let model = temp_file("wrapped-experts.gguf", &write_table_only(&[("blk.0.ffn_up_exps.weight", &[256, 4, (1 << 32) + 2], 0)]));
    let (code, _, err) = tool(&["plan", "--model", model.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has 4294967298 experts"), "{err}");
}

#[test]
fn plan_rejects_a_tensor_whose_size_overflows() {
    // 2^33 f32 columns (2^35 bytes a row) x 2^29 rows x 2 experts: 2^65 bytes, which wraps to 0
    let model = temp_file("wrapping.gguf", &write_table_only(&[("blk.7.ffn_down_exps.weight", &[1 << 33, 1 << 29, 2], 0)]));
    let (code, out, err) = tool(&["plan", "--model", model.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("tensor \"blk.7.ffn_down_exps.weight\"") && err.contains("overflows"), "{err}");
}

#[test]
fn check_map_bounds_the_expert_count() {
    let (code, _, err) = tool(&["check-map", "*:0", "--experts", "4294967295", "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--experts 4294967295") && err.contains("1-1024"), "{err}");
    let (code, _, err) = tool(&["check-map", "*:0", "--experts", "0", "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--experts 0"), "{err}");
    let (code, out, err) = tool(&["check-map", "*:0", "--experts", "1024", "--topology", TWO_NODES]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok: *:0");
    let (code, _, err) = tool(&["check-map", "0-4999:0", "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("expert 4999 is beyond the 1024 experts") && err.contains("characters 1-6"), "{err}");
}

#[test]
fn check_map_with_huge_layer_numbers_is_quick() {
    for map in ["blk.0-4294967290=rows;blk.4294967291=block", "blk.4294967291=block;blk.0-4294967290=rows"] {
        let (code, out, err, took) = timed(&["check-map", map, "--experts", "8", "--topology", TWO_NODES]);
        assert_eq!(code, 0, "{map}: {err}");
        assert_eq!(out.trim(), format!("ok: {map}"));
        assert!(took.as_secs_f64() < 2.0, "{map}: {took:?}");
    }
    let (code, _, err, took) =
        timed(&["check-map", "blk.4294967295=off;blk.0-4294967290,4294967292-4294967295=rows", "--topology", TWO_NODES]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("layer 4294967295 is selected by two rules"), "{err}");
    assert!(took.as_secs_f64() < 2.0, "{took:?}");
}

#[test]
fn cli_numbers_are_checked() {
    let model = qwen3_like(1);
    let m = model.to_str().unwrap();
    for threads in ["18446744073709551615", "4294967296", "513", "0"] {
        let (code, _, err) = tool(&["plan", "--model", m, "--threads", threads, "--topology", TWO_NODES]);
        assert_eq!(code, 1, "--threads {threads}: {err}");
        assert!(err.contains(&format!("--threads {threads} is out of range (1-512)")), "{err}");
    }
    let (code, _, err) = tool(&["plan", "--model", m, "--threads", "-3", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("--threads -3 is not a number"), "{err}");
    let (code, out, err) = tool(&["plan", "--model", m, "--threads", "512", "--topology", TWO_NODES]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("threads: 512"), "{out}");
    let (code, _, err) = tool(&["verify", "--pid", "../../etc"]);
    assert_eq!(code, 1);
    assert!(err.contains("--pid ../../etc is not a process id"), "{err}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `numa-moe topology | head -1` on a big machine: the reader goes away early
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_numa-moe"))
        .arg("topology")
        .env("NUMA_MOE_TOPOLOGY", "package:2 numa:64 core:4 pu:2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}
