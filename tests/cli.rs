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
    // 128 threads by default: 16 per node, dealt out in turn as the hook pins them
    assert!(out.contains("\"threads\":[0,8,16,24,32,40,48,56,64,72,80,88,96,104,112,120]"), "{out}");
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

/// A routing profile of 8 experts over layers 0, 1 and 3: layer 1 sends every token to
/// expert 5, layer 3 spreads them evenly, layer 0 favours experts 0-3.
fn routing_profile(name: &str) -> PathBuf {
    let json = r#"{ "numa_moe_routing": 1,
      "model": { "n_expert": 8, "expert_layers": [0, 1, 3] },
      "map": "rows",
      "layers": [
        { "layer": 0, "tokens": [30, 30, 30, 30, 10, 10, 10, 10], "recent": [3, 3, 3, 3, 1, 1, 1, 1] },
        { "layer": 1, "tokens": [0, 0, 0, 0, 0, 160, 0, 0], "recent": [] },
        { "layer": 3, "tokens": [20, 20, 20, 20, 20, 20, 20, 20] } ],
      "nodes": [ { "node": 0, "rows": 1000, "bytes": 4096 }, { "node": 1, "rows": 900, "bytes": 4000 } ] }"#;
    temp_file(name, json.as_bytes())
}

/// The text of every `<text>` element of an SVG picture.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
}

/// The row of `layer` in the routing table.
fn table_row<'a>(out: &'a str, layer: &str) -> Vec<&'a str> {
    let line = out.lines().find(|l| l.split_whitespace().next() == Some(layer)).unwrap_or_else(|| panic!("no row {layer}: {out}"));
    line.split_whitespace().collect()
}

#[test]
fn routing_summarises_a_profile_and_draws_it() {
    let file = routing_profile("routing.json");
    let out_dir = std::env::temp_dir().join(format!("numa-moe-cli-{}-routing-out", std::process::id()));
    let (code, out, err) =
        tool(&["routing", file.to_str().unwrap(), "--map", "block", "--topology", TWO_NODES, "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(8 experts, 3 expert layers, recorded under map \"rows\")"), "{out}");
    // layer 1: one expert takes everything: entropy 0, that expert 100%, and under block
    // (experts 0-3 on node 0, 4-7 on node 1) node 1 does it all: twice the mean
    assert_eq!(table_row(&out, "1"), ["1", "160", "0.00", "0.00", "5", "(100.0%)", "block", "2.00"], "{out}");
    // layer 3: even routing: log2(8) = 3 bits, evenness 1, block even
    assert_eq!(table_row(&out, "3")[..4], ["3", "160", "3.00", "1.00"], "{out}");
    assert_eq!(table_row(&out, "3").last(), Some(&"1.00"), "{out}");
    // layer 0: experts 0-3 hold 120 of 160 slots: node 0 has 1.5 times the mean
    assert_eq!(table_row(&out, "0")[4..7], ["0", "(18.8%),", "1"], "{out}");
    assert_eq!(table_row(&out, "0").last(), Some(&"1.50"), "{out}");
    // the run: (120 + 160 + 80) / (80 + 80 + 80)
    assert_eq!(table_row(&out, "all").last(), Some(&"1.50"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("node   1:") && l.contains(" 900 rows (47.4%)")), "{out}");
    let heat_labels = ["expert", "layer", "share", "100%"];
    for (suffix, labels) in [("heatmap", &heat_labels[..]), ("loads", &["node 0", "node 1", "under block (imbalance 1.50)"][..])] {
        let path = out_dir.join(format!("numa-moe-cli-{}-routing.{suffix}.svg", std::process::id()));
        assert!(out.contains(&format!("wrote {}", path.display())), "{out}");
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let texts = svg_texts(&svg);
        for l in labels {
            assert!(texts.iter().any(|t| t == l), "{suffix} lacks the label {l}: {texts:?}");
        }
        if suffix == "heatmap" {
            // the layer axis (0, 1, 3: no layer 2), then the expert axis (0-7)
            let axes = ["0", "1", "3", "0", "1", "2", "3", "4", "5", "6", "7"];
            assert!(texts.windows(axes.len()).any(|w| w == axes), "{texts:?}");
        }
    }
    // the default map is rows, which is even whatever the routing; the pictures go next to FILE
    let (code, out, err) = tool(&["routing", file.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table_row(&out, "1")[6..], ["rows", "1.00", "2.00"], "{out}");
    assert!(file.with_extension("heatmap.svg").exists() && file.with_extension("loads.svg").exists(), "{out}");
    std::fs::remove_dir_all(&out_dir).unwrap();
    for f in [file.with_extension("heatmap.svg"), file.with_extension("loads.svg"), file] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn routing_reads_csv_and_refuses_bad_files() {
    let csv = "# numa_moe_routing 1\n# n_expert 2\n# map \"rows\"\nlayer,expert,tokens,recent\n4,0,7,\n4,1,0,\n";
    let file = temp_file("routing-from-csv.csv", csv.as_bytes());
    let (code, out, err) = tool(&["routing", file.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table_row(&out, "4")[..6], ["4", "7", "0.00", "0.00", "0", "(100.0%)"], "{out}");

    let (code, _, err) = tool(&["routing", "/nonexistent/routing.json"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read routing profile /nonexistent/routing.json"), "{err}");
    let bad = temp_file("bad-routing.csv", csv.replace("4,1,0,", "4,1,zero,").as_bytes());
    let (code, _, err) = tool(&["routing", bad.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("routing profile {}, line 6: tokens \"zero\" is not a whole number", bad.display())), "{err}");
    let bad =
        temp_file("bad-routing.json", br#"{ "numa_moe_routing": 1, "model": { "n_expert": 2, "expert_layers": [0] }, "layers": [] }"#);
    let (code, _, err) = tool(&["routing", bad.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("its layers [] are not the model's expert layers [0]"), "{err}");
    // a map that does not fit the profile's experts or the machine's nodes
    let (code, _, err) = tool(&["routing", file.to_str().unwrap(), "--map", "0:0", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("expert 1 is not mapped"), "{err}");
    let (code, _, err) = tool(&["routing", file.to_str().unwrap(), "--map", "rows@0,7", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("node 7 does not exist"), "{err}");
    let (code, _, err) = tool(&["routing"]);
    assert_eq!(code, 1);
    assert!(err.contains("routing needs a FILE"), "{err}");
    for f in [file.with_extension("heatmap.svg"), file.with_extension("loads.svg"), file] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn check_map_reads_balanced_profiles() {
    // a 4-expert profile: fine for 4 experts, refused for 8 with the file named
    let dir = std::env::temp_dir().join(format!("numa-moe-cli-balanced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.json");
    let p = numa_moe::routing::RoutingProfile {
        schema: numa_moe::routing::SCHEMA,
        model: numa_moe::routing::ModelSignature { n_expert: 4, expert_layers: vec![0] },
        map: "rows".into(),
        layers: vec![numa_moe::routing::LayerRouting { layer: 0, tokens: vec![9, 1, 1, 1], recent: vec![] }],
        nodes: vec![],
    };
    p.save(&path).unwrap();
    let map = format!("balanced:{}", path.display());
    let (code, out, _) = tool(&["check-map", &map, "--experts", "4"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = tool(&["check-map", &map, "--experts", "8"]);
    assert_eq!(code, 1);
    assert!(err.contains("p.json was recorded on a model with 4 experts; this one has 8"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plan_shows_the_layout_each_stack_gets() {
    // q4_K gate/up (type 12) and q6_K down (type 14): CPU_REPACK takes q4_K on x86 with AVX2
    let model = qwen3_like(1);
    let m = model.to_str().unwrap();
    let (code, out, err) = tool(&["plan", "--model", m, "--map", "rows", "--topology", "package:2 numa:1 core:4 pu:1"]);
    assert_eq!(code, 0, "{err}");
    let repacks = numa_moe::placement::predicted_repack_group("q4_K", 768, numa_moe::placement::RepackCpu::this_machine()).is_some();
    let want = if repacks {
        "layout: 2 q4_K in CPU_REPACK's layout (8-row groups), 1 q6_K standard"
    } else {
        "layout: 2 q4_K standard, 1 q6_K standard"
    };
    assert!(out.contains(want), "{out}");
    if repacks {
        // split on 8-row groups: 768 rows over 2 nodes, 384 each
        assert!(out.contains("rows 0-383 of every expert"), "{out}");
    }
    let (code, out, err) = tool(&["plan", "--model", m, "--map", "rows", "--no-repack", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("{\"type\":\"q4_K\",\"row_group\":1,\"tensors\":2,\"repacked\":false}"), "{out}");
}

/// `numa-moe plan ... --json`, parsed.
fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = tool(&all);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The footprint's per-token figure `key` of category `cat`.
fn per_token(j: &serde_json::Value, cat: &str, key: &str) -> f64 {
    let cats = j["footprint"]["categories"].as_array().unwrap();
    cats.iter().find(|c| c["category"] == cat).unwrap_or_else(|| panic!("no {cat}"))[key].as_f64().unwrap()
}

/// The share read node-local under `placement` (of category `cat`, or of everything).
fn local_share(j: &serde_json::Value, placement: &str, cat: Option<&str>) -> f64 {
    let p = j["footprint"]["placements"].as_array().unwrap().iter().find(|p| p["placement"] == placement).unwrap();
    match cat {
        None => p["local_share"].as_f64().unwrap(),
        Some(c) => p["categories"].as_array().unwrap().iter().find(|x| x["category"] == c).unwrap()["local_share"].as_f64().unwrap(),
    }
}

fn within_1pct(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= want * 0.01, "{what}: {got} vs {want}");
}

const TWO_SOCKETS: &str = "package:2 numa:1 core:64 pu:2";

#[test]
fn plan_shapes_read_what_the_published_configs_say() {
    // DeepSeek-V3: 58 MoE layers of 8 routed experts (3 x 7168 x 2048 each), MLA attention in
    // 61 layers, one shared expert per MoE layer, 3 dense FFN layers, the output head
    let ds = plan_json(&["--shape", "deepseek-v3", "--topology", TWO_SOCKETS]);
    let mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 2 * 128 * 512 * 128 + 128 * 128 * 7168;
    for (cat, want, issue) in [
        ("routed_experts", 58.0 * 8.0 * 3.0 * 7168.0 * 2048.0, 20.4),
        ("attention", 61.0 * mla as f64, 11.4),
        ("shared_experts", 58.0 * 3.0 * 7168.0 * 2048.0, 2.6),
        ("dense_ffn", 3.0 * 3.0 * 7168.0 * 18432.0, 1.2),
        ("output_head", 7168.0 * 129280.0, 0.9),
    ] {
        let got = per_token(&ds, cat, "params_per_token");
        within_1pct(got, want, cat);
        // the issue's figures, to the one decimal it gives
        assert_eq!(format!("{:.1}", got / 1e9), format!("{issue:.1}"), "{cat}");
    }
    // q4_K experts (144 bytes per 256 weights), q8_0 elsewhere (34 per 32)
    within_1pct(per_token(&ds, "routed_experts", "bytes_per_token"), 58.0 * 8.0 * 3.0 * 7168.0 * 2048.0 * 144.0 / 256.0, "expert bytes");
    within_1pct(per_token(&ds, "output_head", "bytes_per_token"), 7168.0 * 129280.0 * 34.0 / 32.0, "head bytes");
    assert_eq!(ds["expert_tensors"], 174, "attn_k_b/attn_v_b are not expert stacks");
    assert_eq!(ds["kv_cache"]["bytes_per_token"], 61 * 576 * 2 * 4096);

    let qw = plan_json(&["--shape", "qwen3-235b", "--topology", TWO_SOCKETS, "--ctx", "32768"]);
    let gqa = 4096 * 8192 + 2 * 4096 * 512 + 8192 * 4096;
    for (cat, want, issue) in [
        ("routed_experts", 94.0 * 8.0 * 3.0 * 4096.0 * 1536.0, 14.2),
        ("attention", 94.0 * gqa as f64, 6.7),
        ("output_head", 4096.0 * 151936.0, 0.6),
    ] {
        let got = per_token(&qw, cat, "params_per_token");
        within_1pct(got, want, cat);
        assert_eq!(format!("{:.1}", got / 1e9), format!("{issue:.1}"), "{cat}");
    }
    assert_eq!(per_token(&qw, "shared_experts", "params_per_token"), 0.0);
    assert_eq!(qw["kv_cache"]["bytes_per_token"], 94u64 * 4 * 256 * 2 * 32768);
    assert_eq!(qw["kv_cache"]["layout"], "gqa");
}

#[test]
fn plan_shapes_predict_locality_of_each_placement_on_two_sockets() {
    let qw = plan_json(&["--shape", "qwen3-235b", "--topology", TWO_SOCKETS]);
    let ds = plan_json(&["--shape", "deepseek-v3", "--topology", TWO_SOCKETS]);
    for j in [&qw, &ds] {
        let (stock, experts, whole) =
            (local_share(j, "stock", None), local_share(j, "experts_only", None), local_share(j, "whole_model", None));
        // two equal nodes: what node 0 holds, node 1's threads read remotely
        assert!((stock - 0.5).abs() < 1e-6, "{stock}");
        assert!(stock < experts && experts < whole, "{stock} {experts} {whole}");
        assert_eq!(local_share(j, "experts_only", Some("routed_experts")), 1.0);
        assert!((local_share(j, "experts_only", Some("attention")) - 0.5).abs() < 1e-6);
        for cat in ["routed_experts", "output_head"] {
            assert_eq!(local_share(j, "whole_model", Some(cat)), 1.0, "{cat}");
        }
    }
    // Qwen3-235B: everything but the norms is placed
    assert!(local_share(&qw, "whole_model", None) >= 0.99, "{}", local_share(&qw, "whole_model", None));
    // DeepSeek-V3: MLA's per-head attn_k_b/attn_v_b (a batched MUL_MAT over a stack of heads)
    // and the f32 routers are placed too; norms, biases and the embeddings are what is left
    let whole = &ds["footprint"]["placements"][2];
    let unplaced = whole["unplaced"].as_array().unwrap();
    let left: f64 = unplaced.iter().map(|u| u["bytes_per_token"].as_f64().unwrap()).sum();
    let small = |k: &str| k.ends_with("norm") || k.ends_with(".bias") || k == "token_embd";
    assert!(unplaced.iter().all(|u| small(u["kind"].as_str().unwrap())), "{unplaced:?}");
    let total = ds["footprint"]["bytes_per_token"].as_f64().unwrap();
    assert!((1.0 - local_share(&ds, "whole_model", None) - left / 2.0 / total).abs() < 1e-4, "remote share");
    assert!(local_share(&ds, "whole_model", None) >= 0.99, "{}", local_share(&ds, "whole_model", None));
    assert!(local_share(&ds, "whole_model", Some("shared_experts")) == 1.0);
    // per node: the whole model splits the reads evenly, each node reading its own
    let nodes = whole["nodes"].as_array().unwrap();
    let read = |n: usize, k: &str| nodes[n][k].as_f64().unwrap();
    within_1pct(read(0, "read_local"), read(1, "read_local") + read(1, "read_remote"), "node reads");
    assert_eq!(read(0, "read_remote"), 0.0);
    // one node: nothing to place, everything local
    let one = plan_json(&["--shape", "qwen3-235b", "--topology", "package:1 numa:1 core:8 pu:1"]);
    for p in ["stock", "experts_only", "whole_model"] {
        assert_eq!(local_share(&one, p, None), 1.0, "{p}");
    }
}

#[test]
fn plan_whole_model_follows_the_maps_dense_rule() {
    let held = |j: &serde_json::Value, node: usize, cat: &str| {
        j["footprint"]["placements"][2]["nodes"][node]["held_by_category"][cat].as_u64().unwrap()
    };
    // dense=off: the whole model is the experts only
    let off = plan_json(&["--shape", "qwen3-235b", "--map", "rows;dense=off", "--topology", TWO_SOCKETS]);
    assert_eq!(local_share(&off, "whole_model", None), local_share(&off, "experts_only", None));
    assert_eq!(off["footprint"]["placements"][2]["dense_map"], "off");
    // dense=mirror: a copy of every matrix on each node, read locally
    let rows = plan_json(&["--shape", "qwen3-235b", "--topology", TWO_SOCKETS]);
    let mirror = plan_json(&["--shape", "qwen3-235b", "--map", "rows;dense=mirror", "--topology", TWO_SOCKETS]);
    assert_eq!(mirror["footprint"]["placements"][2]["dense_map"], "mirror");
    assert_eq!(local_share(&mirror, "whole_model", Some("attention")), local_share(&rows, "whole_model", Some("attention")));
    let (r, m) = (held(&rows, 1, "output_head"), held(&mirror, 1, "output_head"));
    within_1pct(m as f64, 2.0 * r as f64, "a whole copy of the head on node 1");
    // the map "off": llama.cpp's placement for every weight
    let all_off = plan_json(&["--shape", "qwen3-235b", "--map", "off", "--topology", TWO_SOCKETS]);
    assert_eq!(local_share(&all_off, "whole_model", None), local_share(&all_off, "stock", None));
}

#[test]
fn plan_shape_text_and_types() {
    let (code, out, err) = tool(&["plan", "--shape", "qwen3-235b", "--topology", TWO_SOCKETS]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("model: qwen3-235b (qwen3moe), 282 expert tensors"), "{out}");
    let total = out.lines().find(|l| l.trim_start().starts_with("total ")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(total.split_whitespace().rev().take(3).collect::<Vec<_>>(), ["100.0%", "75.0%", "50.0%"], "{total}");
    assert!(out.contains("KV cache (a model: f16") && out.contains("at --ctx 4096 (GQA: 4 KV heads x (128 + 128)"), "{out}");
    // q8_0 experts: 34 bytes per 32 weights
    let j = plan_json(&["--shape", "qwen3-235b", "--topology", TWO_SOCKETS, "--expert-type", "q8_0", "--dense-type", "bf16"]);
    within_1pct(per_token(&j, "routed_experts", "bytes_per_token"), 94.0 * 8.0 * 3.0 * 4096.0 * 1536.0 * 34.0 / 32.0, "q8_0 experts");
    within_1pct(per_token(&j, "output_head", "bytes_per_token"), 4096.0 * 151936.0 * 2.0, "bf16 head");
}

#[test]
fn plan_shape_errors_name_the_problem() {
    let (code, _, err) = tool(&["plan", "--shape", "llama-4-maverick", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown --shape \"llama-4-maverick\" (built-in shapes: deepseek-v3, qwen3-235b)"), "{err}");
    let model = qwen3_like(1);
    let (code, _, err) = tool(&["plan", "--shape", "deepseek-v3", "--model", model.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("give --model M.gguf or --shape NAME, not both"), "{err}");
    let (code, _, err) = tool(&["plan", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("plan needs --model M.gguf or --shape NAME (deepseek-v3, qwen3-235b)"), "{err}");
    let (code, _, err) = tool(&["plan", "--model", model.to_str().unwrap(), "--expert-type", "q8_0", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("--expert-type is for --shape NAME"), "{err}");
    let (code, _, err) = tool(&["plan", "--shape", "deepseek-v3", "--dense-type", "q9_K", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("--dense-type: \"q9_K\" is not a ggml type"), "{err}");
    let (code, _, err) = tool(&["plan", "--shape", "deepseek-v3", "--ctx", "0", "--topology", TWO_NODES]);
    assert_eq!(code, 1);
    assert!(err.contains("--ctx 0 is out of range (1-4294967295)"), "{err}");
}

#[test]
fn plan_a_model_file_reports_its_bytes_per_token_from_its_keys() {
    // 2 layers of 8 experts (2 used) of 256 x 512 q4_K, a q8_0 attention projection, and the keys
    let tensors: Vec<(String, Vec<u64>, u32)> = (0..2)
        .flat_map(|l| {
            [
                (format!("blk.{l}.attn_q.weight"), vec![256, 512], 8),
                (format!("blk.{l}.attn_norm.weight"), vec![256], 0),
                (format!("blk.{l}.ffn_up_exps.weight"), vec![256, 512, 8], 12),
            ]
        })
        .collect();
    let refs: Vec<(&str, &[u64], u32)> = tensors.iter().map(|(n, ne, t)| (n.as_str(), ne.as_slice(), *t)).collect();
    let keys = [
        ("expert_count", 8),
        ("expert_used_count", 2),
        ("block_count", 2),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("embedding_length", 256),
    ];
    let model = temp_file("with-keys.gguf", &numa_moe::gguf::write_table_with_keys("qwen3moe", &keys, &refs));
    let j = plan_json(&["--model", model.to_str().unwrap(), "--map", "rows", "--topology", TWO_NODES, "--ctx", "100"]);
    assert_eq!(per_token(&j, "routed_experts", "bytes_per_token"), 2.0 * 2.0 * 512.0 * 144.0);
    assert_eq!(per_token(&j, "attention", "bytes_per_token"), 2.0 * (512.0 * 272.0 + 1024.0));
    assert_eq!(j["footprint"]["n_expert_used"], 2);
    // 2 layers x 2 KV heads x (64 + 64) values x 2 bytes x 100 positions
    assert_eq!(j["kv_cache"]["bytes_per_token"], 2 * 2 * 128 * 2 * 100);
    // the whole model places the attention too: only the norms stay on node 0
    assert_eq!(local_share(&j, "whole_model", Some("routed_experts")), 1.0);
    assert!(local_share(&j, "whole_model", Some("attention")) > 0.99);
    // a file without expert_used_count: the plan as before, the footprint not estimated
    let bare = qwen3_like(1);
    let j = plan_json(&["--model", bare.to_str().unwrap(), "--map", "rows", "--topology", TWO_NODES]);
    assert!(j["footprint"].is_null());
    assert_eq!(j["footprint_note"], "the file does not give qwen3moe.expert_used_count");
    assert_eq!(j["warnings"], serde_json::json!([]));
    let (code, out, _) = tool(&["plan", "--model", bare.to_str().unwrap(), "--topology", TWO_NODES]);
    assert_eq!(code, 0);
    assert!(out.contains("bytes per decoded token: not estimated (the file does not give qwen3moe.expert_used_count)"), "{out}");
}
