//! `numa-moe plan --map balanced:FILE`, run as a user would: the expected load per node next
//! to `block`'s and `rows`', and the errors of a profile that does not fit.

use std::path::PathBuf;
use std::process::Command;

use numa_moe::gguf::write_table_only;
use numa_moe::routing::{LayerRouting, ModelSignature, RoutingProfile, SCHEMA};

const TWO_NODES: &str = "package:2 numa:1 core:4 pu:1";

fn tool(args: &[&str], profile_env: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_numa-moe"));
    c.args(args).env_remove("NUMA_MOE_TOPOLOGY").env_remove("NUMA_MOE_ROUTING_PROFILE");
    if let Some(p) = profile_env {
        c.env("NUMA_MOE_ROUTING_PROFILE", p);
    }
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("numa-moe-balanced-cli-{}-{name}", std::process::id()))
}

/// Two layers of 16 experts (gate, up, down), q4_K.
fn model(name: &str) -> PathBuf {
    let mut t: Vec<(String, Vec<u64>, u32)> = Vec::new();
    for l in 0..2 {
        t.push((format!("blk.{l}.ffn_gate_exps.weight"), vec![2048, 768, 16], 12));
        t.push((format!("blk.{l}.ffn_up_exps.weight"), vec![2048, 768, 16], 12));
        t.push((format!("blk.{l}.ffn_down_exps.weight"), vec![768, 2048, 16], 12));
    }
    let refs: Vec<(&str, &[u64], u32)> = t.iter().map(|(n, ne, ty)| (n.as_str(), ne.as_slice(), *ty)).collect();
    let path = temp(name);
    std::fs::write(&path, write_table_only(&refs)).unwrap();
    path
}

/// Zipf-like routing over `n_expert` experts, the same in both layers: the hot ones are the
/// low ones, so `block` puts most of the work on the first node.
fn profile(name: &str, n_expert: u32) -> PathBuf {
    let zipf: Vec<u64> = (0..n_expert as u64).map(|e| 10_000 / (e + 1)).collect();
    let layers =
        vec![LayerRouting { layer: 0, tokens: zipf.clone(), recent: vec![] }, LayerRouting { layer: 1, tokens: zipf, recent: vec![] }];
    let p = RoutingProfile {
        schema: SCHEMA,
        model: ModelSignature { n_expert, expert_layers: vec![0, 1] },
        map: "rows".into(),
        layers,
        nodes: vec![],
    };
    let path = temp(name);
    p.save(&path).unwrap();
    path
}

/// The busiest node's share under `map` in the JSON's expected_load.
fn busiest(json: &str, map: &str) -> f64 {
    let at = json.find(&format!("{{\"map\":\"{map}\"")).unwrap_or_else(|| panic!("{map} in {json}"));
    let end = at + json[at..].find("]}").unwrap();
    json[at..end].split("\"share\":").skip(1).map(|s| s.split(['}', ',']).next().unwrap().parse::<f64>().unwrap()).fold(0.0, f64::max)
}

#[test]
fn plan_shows_balanced_next_to_block_and_rows() {
    let (m, p) = (model("a.gguf"), profile("zipf.json", 16));
    let (m, p) = (m.to_str().unwrap(), p.to_str().unwrap());
    let map = format!("balanced:{p}");
    let (code, out, err) = tool(&["plan", "--model", m, "--map", &map, "--topology", TWO_NODES, "--json"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"expected_load\":{{\"profile\":\"{p}\"")), "{out}");
    let (balanced, block, rows) = (busiest(&out, &map), busiest(&out, "block"), busiest(&out, "rows"));
    // Zipf over 16 experts: block gives node 0 experts 0-7, 80% of the work; LPT gets within
    // 1% of even
    assert!(block > 0.8, "{out}");
    assert!(balanced < 0.51, "{out}");
    assert!((rows - 0.5).abs() < 1e-6, "{out}");
    // the table a user reads
    let (code, out, _) = tool(&["plan", "--model", m, "--map", &map, "--topology", TWO_NODES], None);
    assert_eq!(code, 0);
    assert!(out.contains("expected load per node if the model routes as") && out.contains("node 0 (50%)"), "{out}");
    let line =
        |label: &str| out.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{label}: {out}")).to_string();
    assert!(line("block").contains(&format!("node 0 {:.1}%", block * 100.0)) && line("rows").contains("50.0%"), "{out}");
    // a bare `balanced` takes the variable's profile; copies within 25% of each tensor
    let (code, out, err) = tool(&["plan", "--model", m, "--map", "balanced+copies=25%", "--topology", TWO_NODES, "--json"], Some(p));
    assert_eq!(code, 0, "{err}");
    assert!(busiest(&out, "balanced+copies=25%") < 0.51, "{out}");
    let expert_bytes: u64 = out.split("\"expert_bytes\":").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let placed: u64 = out.split("\"bytes\":").skip(1).map(|s| s.split(',').next().unwrap().parse::<u64>().unwrap()).sum();
    assert!(placed > expert_bytes && placed <= expert_bytes + expert_bytes / 4, "{placed} vs {expert_bytes}");
}

#[test]
fn plan_without_a_profile_is_block_and_says_so() {
    let m = model("b.gguf");
    let (code, out, err) = tool(&["plan", "--model", m.to_str().unwrap(), "--map", "balanced", "--topology", TWO_NODES], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("experts 0-7") && out.contains("experts 8-15"), "{out}");
    assert!(out.contains("warning: the expert map asks for \"balanced\" without a routing profile"), "{out}");
    assert!(!out.contains("expected load"), "{out}");
}

#[test]
fn profiles_that_do_not_fit_are_clear_errors() {
    let m = model("c.gguf");
    let m = m.to_str().unwrap();
    let p8 = profile("eight.json", 8);
    let p8 = p8.to_str().unwrap();
    let (code, _, err) = tool(&["plan", "--model", m, "--map", &format!("blk.0-1=balanced:{p8}"), "--topology", TWO_NODES], None);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "routing profile {p8} was recorded on a model with 8 experts; this one has 16 (checking blk.0.ffn_gate_exps.weight)"
        )),
        "{err}"
    );
    assert!(err.contains(&format!("(at characters 18-{}: \"{p8}\")", 17 + p8.len())), "{err}");
    let (code, _, err) = tool(&["plan", "--model", m, "--map", "balanced:/nonexistent/p.json", "--topology", TWO_NODES], None);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read routing profile /nonexistent/p.json") && err.contains("(at characters 10-28"), "{err}");
    let (code, _, err) = tool(&["plan", "--model", m, "--map", "balanced", "--topology", TWO_NODES], Some("/nonexistent/q.json"));
    assert_eq!(code, 1);
    assert!(err.contains("NUMA_MOE_ROUTING_PROFILE: cannot read routing profile /nonexistent/q.json"), "{err}");
    let (code, _, err) = tool(&["plan", "--model", m, "--map", "balanced:a,b.json", "--topology", TWO_NODES], None);
    assert_eq!(code, 1);
    assert!(err.contains("a routing profile path cannot contain ','") && err.contains("(at character 11)"), "{err}");
}
