//! `numa-moe`: see and check expert placement.
//!
//!   numa-moe topology [--topology SPEC] [--json]
//!   numa-moe check-map MAP [--experts N] [--topology SPEC]
//!   numa-moe plan --model M.gguf [--map MAP] [--topology SPEC] [--threads N] [--no-repack] [--ctx N] [--json]
//!   numa-moe plan --shape NAME [--expert-type T] [--dense-type T] [same options]
//!   numa-moe verify --pid PID [--json]
//!   numa-moe routing FILE [--map MAP] [--topology SPEC] [--out DIR]
//!   numa-moe --version
//!
//! SPEC is "host", an hwloc synthetic description ("package:2 numa:4 core:8 pu:2") or an
//! hwloc XML file; it defaults to NUMA_MOE_TOPOLOGY, else this machine.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use numa_moe::expert_map::{Body, ExpertMap, Policy, Resolved, MAX_EXPERTS};
use numa_moe::footprint::{self, Footprint, KvLayout, KvShape, Maps, MoeParams, Placement};
use numa_moe::gguf::{self, GgufFile, TensorInfo};
use numa_moe::json;
use numa_moe::memory::parse_numa_maps;
use numa_moe::placement::{self, plan_tensor, plan_workers, PlanOptions, TensorPlan};
use numa_moe::routing::{self as rt, MapPlacement, RoutingProfile};
use numa_moe::shapes;
use numa_moe::topology::{format_gib, render_cpu_list, Topology};
use numa_moe::weights::{category_of, Category};

const USAGE: &str = "usage:
  numa-moe topology [--topology SPEC] [--json]
  numa-moe check-map MAP [--experts N] [--topology SPEC]
  numa-moe plan --model M.gguf [--map MAP] [--topology SPEC] [--threads N] [--no-repack] [--ctx N] [--json]
  numa-moe plan --shape NAME [--expert-type T] [--dense-type T] [same options as with --model]
  numa-moe verify --pid PID [--json]
  numa-moe routing FILE [--map MAP] [--topology SPEC] [--out DIR]
  numa-moe --version

SPEC: \"host\", an hwloc synthetic description such as \"package:2 numa:4 core:8 pu:2\",
or an hwloc XML file (default: NUMA_MOE_TOPOLOGY, else this machine).
MAP: see docs/EXPERT_MAP.md (e.g. rows, block, mirror, \"0-7:0,8-15:1\").
FILE: a routing profile (NUMA_MOE_ROUTING_OUT), JSON or CSV: see docs/ROUTING.md.
NAME: a built-in model shape: deepseek-v3, qwen3-235b (experts q4_K, the rest q8_0 unless
--expert-type/--dense-type say otherwise). plan also reports the bytes a decoded token reads
by category and node (a model), and the KV cache's at --ctx N (default 4096).";

/// Most threads a plan may lay out: ggml's GGML_MAX_N_THREADS (ggml.h of the pinned llama.cpp).
const MAX_THREADS: usize = 512;

struct Args {
    positional: Vec<String>,
    options: BTreeMap<String, String>,
    flags: Vec<String>,
}

fn parse_args(args: &[String], with_value: &[&str]) -> Result<Args, String> {
    let mut a = Args { positional: Vec::new(), options: BTreeMap::new(), flags: Vec::new() };
    let mut i = 0;
    while i < args.len() {
        let s = &args[i];
        if let Some(name) = s.strip_prefix("--") {
            if let Some((k, v)) = name.split_once('=') {
                a.options.insert(k.to_string(), v.to_string());
            } else if with_value.contains(&name) {
                let v = args.get(i + 1).ok_or_else(|| format!("--{name} needs a value"))?;
                a.options.insert(name.to_string(), v.clone());
                i += 1;
            } else {
                a.flags.push(name.to_string());
            }
        } else {
            a.positional.push(s.clone());
        }
        i += 1;
    }
    Ok(a)
}

impl Args {
    fn check(&self, allowed_flags: &[&str], allowed_opts: &[&str], max_positional: usize) -> Result<(), String> {
        if let Some(f) = self.flags.iter().find(|f| !allowed_flags.contains(&f.as_str())) {
            return Err(format!("unknown option --{f}"));
        }
        if let Some(o) = self.options.keys().find(|o| !allowed_opts.contains(&o.as_str())) {
            return Err(format!("unknown option --{o}"));
        }
        if self.positional.len() > max_positional {
            return Err(format!("unexpected argument \"{}\"", self.positional[max_positional]));
        }
        Ok(())
    }

    fn json(&self) -> bool {
        self.flags.iter().any(|f| f == "json")
    }

    /// The number given as `--name`, if any, checked against `range`.
    fn number<T>(&self, name: &str, range: std::ops::RangeInclusive<T>) -> Result<Option<T>, String>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display,
    {
        let Some(text) = self.options.get(name) else { return Ok(None) };
        // a number too large for T is out of range, not "not a number"
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return match text.parse::<T>() {
                Ok(v) if range.contains(&v) => Ok(Some(v)),
                _ => Err(format!("--{name} {text} is out of range ({}-{})", range.start(), range.end())),
            };
        }
        Err(format!("--{name} {text} is not a number"))
    }

    fn topology(&self) -> Result<Topology, String> {
        match self.options.get("topology") {
            Some(spec) => Topology::from_spec(spec),
            None => Topology::detect(),
        }
        .map_err(|e| e.to_string())
    }
}

fn cmd_topology(a: &Args) -> Result<(), String> {
    a.check(&["json"], &["topology"], 0)?;
    let t = a.topology()?;
    if a.json() {
        println!("{}", t.render_json());
    } else {
        print!("{}", t.render_text());
    }
    Ok(())
}

fn cmd_check_map(a: &Args) -> Result<(), String> {
    a.check(&[], &["topology", "experts"], 1)?;
    let text = a.positional.first().ok_or("check-map needs a MAP")?;
    let t = a.topology()?;
    // as at load: `balanced` rules read their routing profiles (and --experts checks them)
    let (map, fallback) = numa_moe::config::parse_map(&t, text).map_err(|e| e.to_string())?;
    if let Some(fallback) = fallback {
        eprintln!("{fallback}");
    }
    if let Some(n) = a.number("experts", 1..=MAX_EXPERTS)? {
        map.check_experts(n).map_err(|e| e.to_string())?;
    }
    println!("ok: {}", map.render());
    Ok(())
}

struct NodeRow {
    node: u32,
    bytes: u64,
    tensors: usize,
    budget: u64,
    share: String,
    threads: Vec<usize>,
    cpus: Vec<u32>,
}

/// (type, row group, tensors) over the planned stacks, in order of first appearance.
fn layout_summary(experts: &[placement::ExpertTensor]) -> Vec<(String, u64, usize)> {
    let mut out: Vec<(String, u64, usize)> = Vec::new();
    for t in experts {
        match out.iter_mut().find(|(ty, g, _)| *ty == t.type_name && *g == t.row_group) {
            Some(e) => e.2 += 1,
            None => out.push((t.type_name.clone(), t.row_group, 1)),
        }
    }
    out
}

/// The model `numa-moe plan` plans: a GGUF file's tensor table, or a built-in shape.
struct PlannedModel {
    /// The file's path, or the shape's name.
    name: String,
    architecture: Option<String>,
    /// For a shape: what it is built from, and its types.
    shape: Option<(String, String)>,
    tensors: Vec<TensorInfo>,
    /// The MoE hyper-parameters, or why they are unknown.
    moe: Result<MoeParams, String>,
    kv: Option<KvShape>,
}

fn planned_model(a: &Args) -> Result<PlannedModel, String> {
    let (model, shape) = (a.options.get("model"), a.options.get("shape"));
    if shape.is_none() {
        if let Some(o) = ["expert-type", "dense-type"].iter().find(|o| a.options.contains_key(**o)) {
            return Err(format!("--{o} is for --shape NAME (a model file's tensors have their own types)"));
        }
    }
    match (model, shape) {
        (Some(_), Some(_)) => Err("give --model M.gguf or --shape NAME, not both".into()),
        (None, None) => Err(format!("plan needs --model M.gguf or --shape NAME ({})", shape_names())),
        (None, Some(name)) => {
            let mut types = shapes::Types::default();
            if let Some(t) = a.options.get("expert-type") {
                types.experts = shapes::type_by_name(t).map_err(|e| format!("--expert-type: {e}"))?;
            }
            if let Some(t) = a.options.get("dense-type") {
                types.dense = shapes::type_by_name(t).map_err(|e| format!("--dense-type: {e}"))?;
            }
            let m = shapes::build(name, types)?;
            let type_name = |id: u32| gguf::type_info(id).map_or("?", |t| t.0);
            let how = format!(
                "routed experts {}, other weight matrices {}, norms and router f32",
                type_name(types.experts),
                type_name(types.dense)
            );
            Ok(PlannedModel {
                name: m.name.to_string(),
                architecture: Some(m.architecture.to_string()),
                shape: Some((m.description.to_string(), how)),
                tensors: m.tensors,
                moe: Ok(m.moe),
                kv: Some(m.kv),
            })
        }
        (Some(path), None) => {
            let gguf = GgufFile::open(Path::new(path)).map_err(|e| e.to_string())?;
            let key = |k: &str| gguf.hparam(k).and_then(|v| v.first().copied());
            let arch = gguf.architecture.as_deref().unwrap_or("?");
            let moe = match (key("expert_count"), key("expert_used_count")) {
                (Some(n), Some(used)) => MoeParams::new(n, used).map_err(|e| format!("{arch}.{e}")),
                (_, None) => Err(format!("the file does not give {arch}.expert_used_count")),
                (None, _) => Err(format!("the file does not give {arch}.expert_count")),
            };
            Ok(PlannedModel {
                name: path.clone(),
                architecture: gguf.architecture.clone(),
                shape: None,
                moe,
                kv: KvShape::from_keys(|k| gguf.hparam(k)),
                tensors: gguf.tensors,
            })
        }
    }
}

fn shape_names() -> String {
    shapes::SHAPES.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
}

fn cmd_plan(a: &Args) -> Result<(), String> {
    a.check(&["json", "no-repack"], &["model", "shape", "expert-type", "dense-type", "map", "topology", "threads", "ctx"], 0)?;
    let pm = planned_model(a)?;
    let model = PathBuf::from(&pm.name);
    let ctx: u64 = a.number("ctx", 1..=u32::MAX as u64)?.unwrap_or(4096);
    let topo = a.topology()?;
    let map_text = a.options.get("map").map(String::as_str).unwrap_or("auto");
    // as at load: `balanced` rules read their routing profiles
    let (map, fallback) = numa_moe::config::parse_map(&topo, map_text).map_err(|e| e.to_string())?;
    // routed experts only: MLA's per-head attn_k_b/attn_v_b are stacks too, but llama.cpp
    // multiplies them with MUL_MAT, which numa-moe's expert buffer never takes
    let mut experts: Vec<placement::ExpertTensor> = pm
        .tensors
        .iter()
        .filter(|t| category_of(&t.name) == Category::RoutedExperts)
        .filter_map(|t| t.expert_tensor().transpose())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", model.display()))?;
    if experts.is_empty() {
        return Err(format!("{} has no stacked expert tensors (not a Mixture-of-Experts model?)", model.display()));
    }
    // the layout each stack gets: CPU_REPACK's where ggml-cpu would repack it (as llama.cpp
    // runs by default), the standard one with --no-repack
    let cpu = placement::RepackCpu::this_machine();
    let no_repack = a.flags.iter().any(|f| f == "no-repack");
    if !no_repack {
        for t in experts.iter_mut() {
            t.row_group = placement::predicted_repack_group(&t.type_name, t.rows, cpu).unwrap_or(1);
        }
    }
    let layout = layout_summary(&experts);
    let threads: usize = match a.number("threads", 1..=MAX_THREADS)? {
        Some(t) => t,
        None => topo.cpu_count().clamp(1, MAX_THREADS),
    };
    let opts = PlanOptions { page_size: 4096, by_cores: true };
    let mut plans: Vec<TensorPlan> = Vec::new();
    let mut stock = 0u64;
    for t in &experts {
        match plan_tensor(&topo, &map, t, &opts).map_err(|e| e.to_string())? {
            Some(p) => plans.push(p),
            None => stock += t.bytes(),
        }
    }
    let loads = placement::node_loads(&topo, &plans);
    let workers = plan_workers(&topo, threads);
    let rows: Vec<NodeRow> = loads
        .iter()
        .map(|l| {
            let example = plans.iter().find(|p| p.pieces().iter().any(|x| x.node == l.node));
            let threads: Vec<usize> = workers.iter().enumerate().filter(|(_, w)| w.node == l.node).map(|(i, _)| i).collect();
            let cpus: Vec<u32> = workers.iter().filter(|w| w.node == l.node).map(|w| w.cpu).collect();
            NodeRow {
                node: l.node,
                bytes: l.bytes,
                tensors: l.tensors,
                budget: l.budget,
                share: example
                    .map(|p| format!("{}: {}", p.tensor.name.trim_end_matches(".weight"), p.describe_share(l.node)))
                    .unwrap_or_default(),
                threads,
                cpus,
            }
        })
        .collect();
    let mut warnings = Vec::new();
    if let Some(note) = fallback {
        warnings.push(note.trim_start_matches("numa-moe: warning: ").to_string());
    }
    let expected = match first_profile(&map) {
        Some((origin, profile)) => {
            let mut rows = Vec::new();
            for (label, m) in [
                (map.render(), map.clone()),
                ("block".to_string(), ExpertMap::policy(Policy::Block)),
                ("rows".to_string(), ExpertMap::policy(Policy::Rows)),
            ] {
                rows.push((label, expected_load(&topo, &m, &experts, &profile, &opts)?));
            }
            Some((origin, rows))
        }
        None => None,
    };
    if let Err(e) = placement::check_budget(&loads) {
        warnings.push(e.to_string());
    }
    let holding: Vec<&NodeRow> = rows.iter().filter(|r| r.bytes > 0).collect();
    if holding.len() > 1 {
        let mean = holding.iter().map(|r| r.bytes).sum::<u64>() as f64 / holding.len() as f64;
        if let Some(max) = holding.iter().max_by_key(|r| r.bytes) {
            let over = max.bytes as f64 / mean - 1.0;
            if over > 0.10 {
                warnings.push(format!("imbalance: node {} holds {:.0}% more expert bytes than the average node", max.node, over * 100.0));
            }
        }
    }
    for r in rows.iter().filter(|r| r.bytes > 0 && r.threads.is_empty()) {
        warnings.push(format!("node {} holds experts but no worker thread: its share is computed by the nearest node's threads", r.node));
    }
    if stock > 0 {
        warnings.push(format!("{} of expert tensors stay on llama.cpp's own path (map \"off\" for their layers)", format_gib(stock)));
    }
    // each tensor's size fits in 64 bits (the reader checks), and so does their sum: the
    // reader checks that the data section's offsets do not overflow
    let total: u64 = experts.iter().map(|t| t.bytes()).sum();
    let row_group =
        |t: &placement::ExpertTensor| if no_repack { 1 } else { placement::predicted_repack_group(&t.type_name, t.rows, cpu).unwrap_or(1) };
    let reads = token_reads(&topo, &pm, &map, &opts, &row_group)?;
    if a.json() {
        let nodes: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"node\":{},\"bytes\":{},\"tensors\":{},\"budget\":{},\"share\":{},\"threads\":[{}],\"cpus\":[{}]}}",
                    r.node,
                    r.bytes,
                    r.tensors,
                    r.budget,
                    json::string(&r.share),
                    r.threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
                    r.cpus.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
                )
            })
            .collect();
        let expected_json = expected.as_ref().map_or(String::new(), |(origin, rows)| {
            let maps: Vec<String> = rows
                .iter()
                .map(|(label, load)| {
                    let total = load.iter().map(|l| l.1).sum::<u128>().max(1) as f64;
                    let nodes: Vec<String> =
                        load.iter().map(|(n, l)| format!("{{\"node\":{n},\"share\":{:.6}}}", *l as f64 / total)).collect();
                    format!("{{\"map\":{},\"nodes\":[{}]}}", json::string(label), nodes.join(","))
                })
                .collect();
            format!(",\"expected_load\":{{\"profile\":{},\"maps\":[{}]}}", json::string(origin), maps.join(","))
        });
        println!(
            "{{\"model\":{},\"shape\":{},\"architecture\":{},\"expert_tensors\":{},\"expert_bytes\":{},\"layouts\":[{}],\"map\":{},\"threads\":{},\"nodes\":[{}],\"warnings\":[{}]{expected_json},{}}}",
            json::string(&model.display().to_string()),
            pm.shape.is_some(),
            pm.architecture.as_deref().map_or("null".into(), json::string),
            experts.len(),
            total,
            layout
                .iter()
                .map(|(ty, g, n)| format!("{{\"type\":{},\"row_group\":{g},\"tensors\":{n},\"repacked\":{}}}", json::string(ty), *g > 1))
                .collect::<Vec<_>>()
                .join(","),
            json::string(&map.render()),
            threads,
            nodes.join(","),
            warnings.iter().map(|w| json::string(w)).collect::<Vec<_>>().join(","),
            token_reads_json(&reads, pm.kv.as_ref(), ctx)
        );
        return Ok(());
    }
    println!(
        "model: {} ({}), {} expert tensors, {} of experts",
        model.display(),
        pm.architecture.as_deref().unwrap_or("?"),
        experts.len(),
        format_gib(total)
    );
    if let Some((what, types)) = &pm.shape {
        println!("shape: {what}; {types}");
    }
    print!("machine: {}", topo.render_text().lines().next().unwrap_or(""));
    println!();
    let layouts: Vec<String> = layout
        .iter()
        .map(|(ty, g, n)| match g {
            1 => format!("{n} {ty} standard"),
            g => format!("{n} {ty} in CPU_REPACK's layout ({g}-row groups)"),
        })
        .collect();
    let why = if no_repack { "--no-repack" } else { "predicted from ggml-cpu's rule for this CPU; --no-repack: standard" };
    println!("layout: {} ({why})", layouts.join(", "));
    println!("map: {}   threads: {threads}", map.render());
    println!("{:>5}  {:>10}  {:>7}  {:>10}  {:<16}  share", "node", "placed", "tensors", "budget", "threads");
    for r in &rows {
        let threads = if r.threads.is_empty() {
            "-".to_string()
        } else {
            format!("{} (cpus {})", render_cpu_list(&r.threads.iter().map(|&t| t as u32).collect::<Vec<_>>()), render_cpu_list(&r.cpus))
        };
        println!(
            "{:>5}  {:>10}  {:>7}  {:>10}  {:<16}  {}",
            r.node,
            format_gib(r.bytes),
            r.tensors,
            format_gib(r.budget),
            threads,
            r.share
        );
    }
    if let Some((origin, rows)) = &expected {
        print_expected_load(&topo, origin, rows);
    }
    print_token_reads(&reads, pm.kv.as_ref(), ctx);
    for w in &warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// What a decoded token reads under the three placements `numa-moe plan` compares.
struct TokenReads {
    moe: MoeParams,
    /// (placement, its expert map, its dense rule, the reads).
    placements: Vec<(Placement, String, String, Footprint)>,
}

/// The reads of one decoded token of `pm` under stock (nothing placed), experts only (`map`
/// for the experts) and the whole model (`map`, and its dense rule for the rest); `Ok(Err)`
/// says why they cannot be estimated (hyper-parameters the file does not give).
fn token_reads(
    topo: &Topology,
    pm: &PlannedModel,
    map: &ExpertMap,
    opts: &PlanOptions,
    row_group: &dyn Fn(&placement::ExpertTensor) -> u64,
) -> Result<Result<TokenReads, String>, String> {
    let moe = match &pm.moe {
        Ok(m) => *m,
        Err(e) => return Ok(Err(e.clone())),
    };
    let weights = footprint::weights_of(&pm.tensors)?;
    let auto = |p: Policy| match p {
        Policy::Auto => format!("auto ({})", if topo.compute_nodes().len() > 1 { "rows" } else { "off" }),
        p => p.name().to_string(),
    };
    // the experts' rules alone, and the dense rule as it resolves on this machine
    let rules = ExpertMap { dense: None, ..map.clone() };
    let experts_label = match rules.rules.as_slice() {
        [r] if matches!(r.body, Body::Policy { policy: Policy::Auto, nodes: None, .. }) && r.layers.is_none() => auto(Policy::Auto),
        _ => rules.render(),
    };
    let dense_label = match map.resolve_dense() {
        Resolved::Policy { policy, nodes: Some(n) } => {
            format!("{}@{}", policy.name(), n.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","))
        }
        Resolved::Policy { policy, nodes: None } => auto(policy),
        _ => "off".to_string(),
    };
    let mut placements = Vec::new();
    for p in Placement::ALL {
        let (maps, experts, rest) = match p {
            Placement::Stock => (Maps::default(), "off".to_string(), "off".to_string()),
            Placement::ExpertsOnly => (Maps { experts: Some(map), dense: None }, experts_label.clone(), "off".to_string()),
            Placement::WholeModel => (Maps { experts: Some(map), dense: Some(map) }, experts_label.clone(), dense_label.clone()),
        };
        let plans = footprint::plan_weights(topo, &weights, maps, opts, row_group)?;
        placements.push((p, experts, rest, footprint::footprint(topo, &weights, &moe, &plans)));
    }
    Ok(Ok(TokenReads { moe, placements }))
}

/// Bytes or counts with an SI prefix: "11.49 GB", "424.9 MB", "7.2 k".
fn si(v: f64, unit: &str) -> String {
    let sp = if unit.is_empty() { "" } else { " " };
    for (scale, prefix) in [(1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if v >= scale {
            let digits = if scale == 1e9 { 2 } else { 1 };
            return format!("{:.digits$} {prefix}{unit}", v / scale);
        }
    }
    format!("{v:.0}{sp}{unit}")
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

const FOOTPRINT_MODEL: &str = "a model, not a measurement: a token reads n_used/n_expert of every routed-expert tensor, one \
     embedding row and every other tensor whole; placed pieces are read by the node that computes them; a tensor left to \
     llama.cpp lies on the node that first touched it at load and is read by every node's threads in proportion to their cores";

fn print_token_reads(reads: &Result<TokenReads, String>, kv: Option<&KvShape>, ctx: u64) {
    let r = match reads {
        Ok(r) => r,
        Err(why) => {
            println!("bytes per decoded token: not estimated ({why})");
            return;
        }
    };
    let Some((_, _, _, first)) = r.placements.first() else { return };
    let total = first.bytes();
    println!();
    println!(
        "bytes one decoded token reads ({} of {} experts per layer), and the share read node-local under three placements",
        r.moe.n_expert_used, r.moe.n_expert
    );
    println!("({FOOTPRINT_MODEL}):");
    print!("  {:<16}  {:>12}  {:>11}  {:>6}", "category", "params/token", "bytes/token", "share");
    for (p, ..) in &r.placements {
        print!("  {:>19}", p.label());
    }
    println!();
    for c in &first.categories {
        if c.tensors == 0 {
            continue;
        }
        print!("  {:<16}  {:>12}  {:>11}  {:>6}", c.category.name(), si(c.params, ""), si(c.bytes, "B"), pct(c.bytes / total.max(1.0)));
        for (.., f) in &r.placements {
            let cf = f.category(c.category);
            print!("  {:>19}", pct(if cf.bytes > 0.0 { cf.local / cf.bytes } else { 1.0 }));
        }
        println!();
    }
    print!("  {:<16}  {:>12}  {:>11}  {:>6}", "total", si(first.params(), ""), si(total, "B"), pct(1.0));
    for (.., f) in &r.placements {
        print!("  {:>19}", pct(f.local_share()));
    }
    println!();
    for (p, experts, rest, f) in &r.placements[1..] {
        println!("  {}: routed experts by the map \"{experts}\", every other weight matrix \"{rest}\"", p.label());
        if *p == Placement::WholeModel && !f.unplaced.is_empty() {
            let left: f64 = f.unplaced.iter().map(|u| u.2).sum();
            let kinds: Vec<String> = f.unplaced.iter().take(4).map(|(k, n, b)| format!("{k} x{n} {}", si(*b, "B"))).collect();
            let more = if f.unplaced.len() > 4 { ", ..." } else { "" };
            println!("    left to llama.cpp: {} per token: {}{more}", si(left, "B"), kinds.join(", "));
        }
    }
    println!("per node: weights held (every copy) and bytes read per decoded token by the node's threads:");
    println!("  {:<19}  {:>4}  {:>5}  {:>10}  {:>11}  {:>12}", "placement", "node", "cores", "held", "read local", "read remote");
    for (p, _, _, f) in &r.placements {
        for (i, n) in f.nodes.iter().enumerate() {
            let label = if i == 0 { p.label() } else { "" };
            println!(
                "  {:<19}  {:>4}  {:>5}  {:>10}  {:>11}  {:>12}",
                label,
                n.node,
                n.cores,
                format_gib(n.held_total()),
                si(n.local, "B"),
                si(n.remote, "B")
            );
        }
    }
    match kv {
        Some(kv) => println!(
            "KV cache (a model: f16, every layer over the whole context): {} read per decoded token at --ctx {ctx} ({}, {} layers); weights: {}",
            si(kv.bytes_per_token(ctx) as f64, "B"),
            kv.describe(),
            kv.n_layer,
            si(total, "B")
        ),
        None => println!("KV cache: not estimated (the file does not give the attention's shape)"),
    }
}

fn token_reads_json(reads: &Result<TokenReads, String>, kv: Option<&KvShape>, ctx: u64) -> String {
    let kv_json = kv.map_or("null".to_string(), |kv| {
        format!(
            "{{\"ctx\":{ctx},\"layout\":{},\"layers\":{},\"values_per_position\":{},\"bytes_per_token\":{},\"describe\":{}}}",
            json::string(match kv.layout {
                KvLayout::Mla { .. } => "mla",
                KvLayout::Gqa { .. } => "gqa",
            }),
            kv.n_layer,
            kv.values_per_position(),
            kv.bytes_per_token(ctx),
            json::string(&kv.describe())
        )
    });
    let r = match reads {
        Ok(r) => r,
        Err(why) => return format!("\"footprint\":null,\"footprint_note\":{},\"kv_cache\":{kv_json}", json::string(why)),
    };
    let Some((_, _, _, first)) = r.placements.first() else { return format!("\"footprint\":null,\"kv_cache\":{kv_json}") };
    let total = first.bytes().max(1.0);
    let categories: Vec<String> = first
        .categories
        .iter()
        .map(|c| {
            format!(
                "{{\"category\":{},\"tensors\":{},\"held\":{},\"params_per_token\":{:.0},\"bytes_per_token\":{:.0},\"share\":{:.6}}}",
                json::string(c.category.key()),
                c.tensors,
                c.held,
                c.params,
                c.bytes,
                c.bytes / total
            )
        })
        .collect();
    let placements: Vec<String> = r
        .placements
        .iter()
        .map(|(p, experts, rest, f)| {
            let cats: Vec<String> = f
                .categories
                .iter()
                .map(|c| {
                    format!(
                        "{{\"category\":{},\"local_share\":{:.6}}}",
                        json::string(c.category.key()),
                        if c.bytes > 0.0 { c.local / c.bytes } else { 1.0 }
                    )
                })
                .collect();
            let nodes: Vec<String> = f
                .nodes
                .iter()
                .map(|n| {
                    let held: Vec<String> =
                        Category::ALL.iter().map(|c| format!("{}:{}", json::string(c.key()), n.held[c.index()])).collect();
                    format!(
                        "{{\"node\":{},\"cores\":{},\"held\":{},\"held_by_category\":{{{}}},\"read_local\":{:.0},\"read_remote\":{:.0}}}",
                        n.node,
                        n.cores,
                        n.held_total(),
                        held.join(","),
                        n.local,
                        n.remote
                    )
                })
                .collect();
            let unplaced: Vec<String> = f
                .unplaced
                .iter()
                .map(|(k, n, b)| format!("{{\"kind\":{},\"tensors\":{n},\"bytes_per_token\":{b:.0}}}", json::string(k)))
                .collect();
            format!(
                "{{\"placement\":{},\"label\":{},\"experts_map\":{},\"dense_map\":{},\"local_share\":{:.6},\"categories\":[{}],\"nodes\":[{}],\"unplaced\":[{}]}}",
                json::string(p.key()),
                json::string(p.label()),
                json::string(experts),
                json::string(rest),
                f.local_share(),
                cats.join(","),
                nodes.join(","),
                unplaced.join(",")
            )
        })
        .collect();
    format!(
        "\"footprint\":{{\"model\":{},\"n_expert\":{},\"n_expert_used\":{},\"params_per_token\":{:.0},\"bytes_per_token\":{:.0},\"categories\":[{}],\"placements\":[{}]}},\"kv_cache\":{kv_json}",
        json::string(FOOTPRINT_MODEL),
        r.moe.n_expert,
        r.moe.n_expert_used,
        first.params(),
        first.bytes(),
        categories.join(","),
        placements.join(",")
    )
}

/// The first routing profile a `balanced` rule of `map` loaded, and its file.
fn first_profile(map: &ExpertMap) -> Option<(String, Arc<RoutingProfile>)> {
    map.rules.iter().find_map(|r| match &r.body {
        Body::Balanced { balanced, .. } => balanced.profile.clone().map(|p| (balanced.origin.clone(), p)),
        _ => None,
    })
}

/// The work `map` gives each node if the model routes as `profile` recorded: for every
/// piece, the expert's token-slots times the weight bytes of its rows (what the node's threads
/// read and multiply). Tensors the map leaves to llama.cpp count for no node.
fn expected_load(
    topo: &Topology,
    map: &ExpertMap,
    experts: &[placement::ExpertTensor],
    profile: &RoutingProfile,
    opts: &PlanOptions,
) -> Result<Vec<(u32, u128)>, String> {
    let mut per_node: BTreeMap<u32, u128> = topo.nodes().iter().map(|n| (n.id, 0)).collect();
    for t in experts {
        let Some(plan) = plan_tensor(topo, map, t, opts).map_err(|e| e.to_string())? else { continue };
        let loads = placement::expert_loads(profile, t.layer, t.n_expert);
        for p in plan.pieces() {
            *per_node.entry(p.node).or_default() +=
                loads[p.expert as usize] as u128 * (p.rows.end - p.rows.start) as u128 * t.row_bytes as u128;
        }
    }
    Ok(per_node.into_iter().collect())
}

/// One line per map: the busiest node's share of the expected work and every node's share
/// (a node's fair share follows its cores, shown in the header).
fn print_expected_load(topo: &Topology, origin: &str, rows: &[(String, Vec<(u32, u128)>)]) {
    println!("expected load per node if the model routes as {origin} recorded (share of the work):");
    let cores: u64 = topo.nodes().iter().map(|n| n.cores() as u64).sum::<u64>().max(1);
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).clamp(8, 40);
    print!("  {:<width$}  {:>16}", "map", "busiest");
    for n in topo.nodes() {
        print!("  {:>14}", format!("node {} ({:.0}%)", n.id, n.cores() as f64 * 100.0 / cores as f64));
    }
    println!();
    for (label, load) in rows {
        let total = load.iter().map(|l| l.1).sum::<u128>().max(1) as f64;
        let share = |l: u128| l as f64 * 100.0 / total;
        let busiest = load.iter().max_by_key(|l| l.1).map_or("-".into(), |(n, l)| format!("node {n} {:.1}%", share(*l)));
        print!("  {:<width$}  {:>16}", label, busiest);
        for (_, l) in load {
            print!("  {:>14}", format!("{:.1}%", share(*l)));
        }
        println!();
    }
}

fn cmd_verify(a: &Args) -> Result<(), String> {
    a.check(&["json"], &["pid"], 0)?;
    let pid = a.options.get("pid").ok_or("verify needs --pid PID")?;
    if pid != "self" && !pid.parse::<u32>().is_ok_and(|p| p > 0) {
        return Err(format!("--pid {pid} is not a process id (a positive number, or self)"));
    }
    let path = format!("/proc/{pid}/numa_maps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let entries = parse_numa_maps(&text);
    // numa-moe's memory is anonymous and carries a memory policy; llama.cpp's is default.
    let mut placed: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    let mut off_policy = 0u64;
    let mut files: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for e in &entries {
        let bucket = if e.file.is_none() && e.policy != "default" {
            let nodes = policy_nodes(&e.policy);
            for n in e.pages.keys() {
                if !nodes.contains(n) && e.policy.starts_with("bind") {
                    off_policy += e.bytes_on(*n);
                }
            }
            placed.entry(e.policy.clone()).or_default()
        } else if let Some(f) = e.file.as_ref().filter(|f| f.ends_with(".gguf")) {
            files.entry(f.clone()).or_default()
        } else {
            continue;
        };
        for n in e.pages.keys() {
            *bucket.entry(*n).or_default() += e.bytes_on(*n);
        }
    }
    let fmt_nodes = |m: &BTreeMap<u32, u64>| m.iter().map(|(n, b)| format!("node {n} {}", format_gib(*b))).collect::<Vec<_>>().join(", ");
    if a.json() {
        let obj = |m: &BTreeMap<String, BTreeMap<u32, u64>>| {
            m.iter()
                .map(|(k, v)| {
                    format!("{}:{{{}}}", json::string(k), v.iter().map(|(n, b)| format!("\"{n}\":{b}")).collect::<Vec<_>>().join(","))
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{{\"pid\":{},\"placed\":{{{}}},\"bytes_off_policy\":{off_policy},\"model_files\":{{{}}}}}",
            json::string(pid),
            obj(&placed),
            obj(&files)
        );
        return Ok(());
    }
    println!("process {pid}:");
    if placed.is_empty() {
        println!("  no memory with a NUMA policy: numa-moe placed nothing in this process (map off, one node, or not loaded)");
    } else {
        println!("  memory placed by policy (numa-moe's expert tensors):");
        for (policy, nodes) in &placed {
            println!("    {:<16} {:>10}  {}", policy, format_gib(nodes.values().sum()), fmt_nodes(nodes));
        }
        println!("  bytes on a node their bind policy does not allow: {}", format_gib(off_policy));
    }
    for (f, nodes) in &files {
        println!("  model file {f}: {} mapped ({})", format_gib(nodes.values().sum()), fmt_nodes(nodes));
    }
    Ok(())
}

/// Nodes named by a numa_maps policy such as "bind:0-1", "prefer:1", "interleave:0,2".
fn policy_nodes(policy: &str) -> Vec<u32> {
    policy.split_once(':').and_then(|(_, l)| numa_moe::topology::parse_cpu_list(l)).unwrap_or_default()
}

/// `numa-moe routing FILE`: the per-layer summary of a routing profile, and two pictures next
/// to it (or in --out DIR): a layer x expert heat map and the per-node load under the map.
fn cmd_routing(a: &Args) -> Result<(), String> {
    a.check(&[], &["map", "topology", "out"], 1)?;
    let file = PathBuf::from(a.positional.first().ok_or("routing needs a FILE (a routing profile, see docs/ROUTING.md)")?);
    let profile = RoutingProfile::load(&file).map_err(|e| e.to_string())?;
    let topo = a.topology()?;
    let map_text = a.options.get("map").map(String::as_str).unwrap_or("rows");
    let map = ExpertMap::parse(map_text).map_err(|e| e.to_string())?;
    let under = MapPlacement::plan(&profile, &topo, &map).map_err(|e| e.to_string())?;
    // block is the usual whole-expert map: the comparison a user choosing one wants
    let block = if under.map == "block" {
        None
    } else {
        Some(MapPlacement::plan(&profile, &topo, &ExpertMap::parse("block").map_err(|e| e.to_string())?).map_err(|e| e.to_string())?)
    };

    let m = &profile.model;
    println!(
        "routing profile: {} ({} experts, {} expert layers{})",
        file.display(),
        m.n_expert,
        m.expert_layers.len(),
        if profile.map.is_empty() { String::new() } else { format!(", recorded under map \"{}\"", profile.map) }
    );
    println!("machine: {}", topo.render_text().lines().next().unwrap_or(""));
    let imb_head = |p: &MapPlacement| format!("imbalance({})", p.map);
    print!(
        "{:>5}  {:>12}  {:>7}  {:>5}  {:<40}  {:<13}  {:>16}",
        "layer",
        "token-slots",
        "entropy",
        "even",
        "hottest experts (share)",
        "placed by",
        imb_head(&under)
    );
    match &block {
        Some(b) => println!("  {:>16}", imb_head(b)),
        None => println!(),
    }
    let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for l in &profile.layers {
        let total: u64 = l.tokens.iter().fold(0u64, |s, t| s.saturating_add(*t));
        let hot = rt::hottest(&l.tokens, 3);
        let hot = if hot.is_empty() {
            "-".to_string()
        } else {
            hot.iter().map(|h| format!("{} ({:.1}%)", h.expert, h.share * 100.0)).collect::<Vec<_>>().join(", ")
        };
        let kind = under.layer(l.layer).map_or("-", |p| p.kind.as_str());
        print!(
            "{:>5}  {:>12}  {:>7}  {:>5}  {:<40}  {:<13}  {:>16}",
            l.layer,
            total,
            ratio(rt::entropy_bits(&l.tokens)),
            ratio(rt::normalised_entropy(&l.tokens)),
            hot,
            kind,
            ratio(under.layer_imbalance(&profile, l.layer))
        );
        match &block {
            Some(b) => println!("  {:>16}", ratio(b.layer_imbalance(&profile, l.layer))),
            None => println!(),
        }
    }
    let totals = profile.expert_totals();
    let hot: Vec<String> = rt::hottest(&totals, 3).iter().map(|h| format!("{} ({:.1}%)", h.expert, h.share * 100.0)).collect();
    print!(
        "{:>5}  {:>12}  {:>7}  {:>5}  {:<40}  {:<13}  {:>16}",
        "all",
        totals.iter().fold(0u64, |s, t| s.saturating_add(*t)),
        ratio(rt::entropy_bits(&totals)),
        ratio(rt::normalised_entropy(&totals)),
        if hot.is_empty() { "-".to_string() } else { hot.join(", ") },
        "",
        ratio(under.run_imbalance(&profile))
    );
    match &block {
        Some(b) => println!("  {:>16}", ratio(b.run_imbalance(&profile))),
        None => println!(),
    }
    println!("entropy in bits; even: entropy over log2({}), 1 = every expert used alike; imbalance: the busiest node's load", m.n_expert);
    println!("per core over the mean (1.00 = even; \"all\": summed over layers, each waiting for its busiest node)");
    if !profile.nodes.is_empty() {
        let rows: u64 = profile.nodes.iter().fold(0u64, |s, n| s.saturating_add(n.rows));
        println!("recorded work per node:");
        for n in &profile.nodes {
            let share = if rows > 0 { n.rows as f64 * 100.0 / rows as f64 } else { 0.0 };
            println!("  node {:>3}: {:>14} rows ({share:.1}%), {} read", n.node, n.rows, format_gib(n.bytes));
        }
    }

    let dir = match a.options.get("out") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).map_err(|e| format!("cannot create --out {}: {e}", d.display()))?;
            d
        }
        None => file.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    let stem = file.file_stem().map_or_else(|| "routing".into(), |s| s.to_string_lossy().into_owned());
    let heat = dir.join(format!("{stem}.heatmap.svg"));
    let loads = dir.join(format!("{stem}.loads.svg"));
    let name = file.file_name().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    write_svg(&heat, &heatmap_svg(&profile, &name)?)?;
    let named = |p: &MapPlacement| match p.run_imbalance(&profile) {
        Some(v) => format!("under {} (imbalance {v:.2})", p.map),
        None => format!("under {}", p.map),
    };
    let mut series = vec![(named(&under), under.loads(&profile, None))];
    if let Some(b) = &block {
        series.push((named(b), b.loads(&profile, None)));
    }
    if !profile.nodes.is_empty() {
        series.push(("recorded rows".to_string(), profile.nodes.iter().map(|n| (n.node, n.rows as f64)).collect()));
    }
    write_svg(&loads, &loads_svg(&series, &under.weights, &name)?)?;
    println!("wrote {}", heat.display());
    println!("wrote {}", loads.display());
    Ok(())
}

fn write_svg(path: &Path, svg: &str) -> Result<(), String> {
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn plot_err<E: std::error::Error>(e: E) -> String {
    format!("cannot draw the picture: {e}")
}

/// Layer x expert heat map of each layer's token shares, layer 0 at the top, with a colour bar.
fn heatmap_svg(profile: &RoutingProfile, name: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let n_expert = profile.model.n_expert as i32;
    let n_layers = profile.layers.len().max(1) as i32;
    let cell_h = (720 / n_layers).clamp(4, 24) as u32;
    let (width, height) = (1280u32, 150 + cell_h * n_layers as u32);
    let shares: Vec<Vec<f64>> = profile
        .layers
        .iter()
        .map(|l| {
            let t: f64 = l.tokens.iter().map(|&x| x as f64).sum();
            l.tokens.iter().map(|&x| if t > 0.0 { x as f64 / t } else { 0.0 }).collect()
        })
        .collect();
    let max = shares.iter().flatten().copied().fold(0.0, f64::max).max(1e-9);
    let layer_numbers: Vec<u32> = profile.layers.iter().map(|l| l.layer).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (main, bar) = root.split_horizontally(width - 130);
        // cells centred on whole numbers, so the axis labels sit on the cells they name
        let (xs, ys) = (n_expert as f64, n_layers as f64);
        let mut chart = ChartBuilder::on(&main)
            .caption(format!("{name}: share of each layer's token-slots per expert"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5..xs - 0.5, ys - 0.5..-0.5)
            .map_err(plot_err)?;
        let whole = |v: f64, n: f64| (v >= 0.0 && v < n && (v - v.round()).abs() < 1e-6).then_some(v.round() as usize);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels((n_expert as usize).min(24))
            .y_labels((n_layers as usize).min(720 / 16))
            .x_label_formatter(&|v| whole(*v, xs).map_or(String::new(), |e| e.to_string()))
            .y_label_formatter(&|v| whole(*v, ys).and_then(|i| layer_numbers.get(i)).map_or(String::new(), |l| l.to_string()))
            .x_desc("expert")
            .y_desc("layer")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        // a square-root colour scale: one hot expert does not wash out the rest
        chart
            .draw_series(shares.iter().enumerate().flat_map(|(y, row)| {
                row.iter().enumerate().map(move |(x, &v)| {
                    let (x, y) = (x as f64, y as f64);
                    Rectangle::new(
                        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                        ViridisRGB::get_color_normalized(v.sqrt(), 0.0, max.sqrt()).filled(),
                    )
                })
            }))
            .map_err(plot_err)?;
        // the colour bar, on the same square-root scale, labelled in shares
        let top = (max * 100.0).sqrt();
        let mut legend = ChartBuilder::on(&bar)
            .caption("share", ("sans-serif", 15))
            .margin_top(40)
            .margin_bottom(55)
            .margin_right(10)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..1.0, 0.0..top)
            .map_err(plot_err)?;
        legend
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(10)
            .y_label_formatter(&|v| {
                let pct = v * v;
                if pct >= 10.0 || pct == 0.0 {
                    format!("{pct:.0}%")
                } else if pct >= 1.0 {
                    format!("{pct:.1}%")
                } else {
                    format!("{pct:.2}%")
                }
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        let steps = 100;
        legend
            .draw_series((0..steps).map(|i| {
                let (lo, hi) = (top * i as f64 / steps as f64, top * (i + 1) as f64 / steps as f64);
                Rectangle::new([(0.0, lo), (1.0, hi)], ViridisRGB::get_color_normalized(lo, 0.0, top).filled())
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Per-node bars: each series' share of the total load on each node, with each node's even
/// share (by cores) marked.
fn loads_svg(series: &[(String, Vec<(u32, f64)>)], weights: &BTreeMap<u32, u64>, name: &str) -> Result<String, String> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let mut nodes: Vec<u32> = series.iter().flat_map(|s| s.1.iter().map(|x| x.0)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let shares: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, loads)| {
            let total: f64 = loads.iter().map(|x| x.1).sum();
            nodes
                .iter()
                .map(|n| loads.iter().find(|x| x.0 == *n).map_or(0.0, |x| if total > 0.0 { x.1 * 100.0 / total } else { 0.0 }))
                .collect()
        })
        .collect();
    let w = |n: &u32| weights.get(n).copied().unwrap_or(1).max(1) as f64;
    let w_total: f64 = nodes.iter().map(w).sum();
    let even: Vec<f64> = nodes.iter().map(|n| w(n) * 100.0 / w_total).collect();
    let top = shares.iter().flatten().chain(&even).copied().fold(0.0, f64::max).max(1.0) * 1.45; // room for the legend
    let width = (160 + 90 * nodes.len() as u32 * series.len().max(1) as u32).clamp(640, 1600);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{name}: share of the expert work per node"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..(nodes.len() as f64 - 0.5), 0.0..top)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|v| format!("{v:.0}%"))
            .x_desc("node")
            .y_desc("share of the work")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        let k = series.len().max(1) as f64;
        let bar = 0.8 / k;
        for (j, ((label, _), vals)) in series.iter().zip(&shares).enumerate() {
            let colour = Palette99::pick(j).to_rgba();
            chart
                .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                    let x0 = i as f64 - 0.4 + j as f64 * bar;
                    Rectangle::new([(x0, 0.0), (x0 + bar * 0.92, v)], colour.filled())
                }))
                .map_err(plot_err)?
                .label(label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        }
        chart
            .draw_series(
                even.iter()
                    .enumerate()
                    .map(|(i, &v)| PathElement::new(vec![(i as f64 - 0.45, v), (i as f64 + 0.45, v)], BLACK.stroke_width(2))),
            )
            .map_err(plot_err)?
            .label("even share (by cores)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        let style = ("sans-serif", 14).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, n) in nodes.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64, 0.0));
            root.draw(&Text::new(format!("node {n}"), (px, py + 6), style.clone())).map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn main() -> ExitCode {
    numa_moe::sys::default_sigpipe();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let with_value = ["topology", "map", "model", "shape", "expert-type", "dense-type", "ctx", "threads", "pid", "experts", "out"];
    let result = match cmd {
        "--version" | "-V" | "version" => {
            println!("numa-moe {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        "topology" | "check-map" | "plan" | "verify" | "routing" => match parse_args(rest, &with_value) {
            Ok(a) => match cmd {
                "topology" => cmd_topology(&a),
                "check-map" => cmd_check_map(&a),
                "plan" => cmd_plan(&a),
                "routing" => cmd_routing(&a),
                _ => cmd_verify(&a),
            },
            Err(e) => Err(e),
        },
        other => Err(format!("unknown command \"{other}\"\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("numa-moe: {e}");
            ExitCode::from(1)
        }
    }
}
