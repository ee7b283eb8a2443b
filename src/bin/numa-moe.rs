//! `numa-moe`: see and check expert placement.
//!
//!   numa-moe topology [--topology SPEC] [--json]
//!   numa-moe check-map MAP [--experts N] [--topology SPEC]
//!   numa-moe plan --model M.gguf [--map MAP] [--topology SPEC] [--threads N] [--json]
//!   numa-moe verify --pid PID [--json]
//!   numa-moe --version
//!
//! SPEC is "host", an hwloc synthetic description ("package:2 numa:4 core:8 pu:2") or an
//! hwloc XML file; it defaults to NUMA_MOE_TOPOLOGY, else this machine.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use numa_moe::expert_map::{Body, ExpertMap, Policy, MAX_EXPERTS};
use numa_moe::gguf::GgufFile;
use numa_moe::json;
use numa_moe::memory::parse_numa_maps;
use numa_moe::placement::{self, plan_tensor, plan_workers, PlanOptions, TensorPlan};
use numa_moe::routing::RoutingProfile;
use numa_moe::topology::{format_gib, render_cpu_list, Topology};

const USAGE: &str = "usage:
  numa-moe topology [--topology SPEC] [--json]
  numa-moe check-map MAP [--experts N] [--topology SPEC]
  numa-moe plan --model M.gguf [--map MAP] [--topology SPEC] [--threads N] [--json]
  numa-moe verify --pid PID [--json]
  numa-moe --version

SPEC: \"host\", an hwloc synthetic description such as \"package:2 numa:4 core:8 pu:2\",
or an hwloc XML file (default: NUMA_MOE_TOPOLOGY, else this machine).
MAP: see docs/EXPERT_MAP.md (e.g. rows, block, mirror, \"0-7:0,8-15:1\").";

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
    let map = ExpertMap::parse(text).map_err(|e| e.to_string())?;
    map.check_nodes(&t).map_err(|e| e.to_string())?;
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

fn cmd_plan(a: &Args) -> Result<(), String> {
    a.check(&["json"], &["model", "map", "topology", "threads"], 0)?;
    let model = PathBuf::from(a.options.get("model").ok_or("plan needs --model M.gguf")?);
    let topo = a.topology()?;
    let map_text = a.options.get("map").map(String::as_str).unwrap_or("auto");
    let mut map = ExpertMap::parse(map_text).map_err(|e| e.to_string())?;
    map.check_nodes(&topo).map_err(|e| e.to_string())?;
    // `balanced` rules read their routing profiles, as at load
    let profile_env = std::env::var(numa_moe::config::ROUTING_PROFILE_ENV).ok().filter(|v| !v.trim().is_empty());
    let fallback = numa_moe::config::load_profiles(&mut map, &profile_env).map_err(|e| e.to_string())?;
    let gguf = GgufFile::open(&model).map_err(|e| e.to_string())?;
    let experts = gguf.expert_tensors().map_err(|e| format!("{}: {e}", model.display()))?;
    if experts.is_empty() {
        return Err(format!("{} has no stacked expert tensors (not a Mixture-of-Experts model?)", model.display()));
    }
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
            "{{\"model\":{},\"architecture\":{},\"expert_tensors\":{},\"expert_bytes\":{},\"map\":{},\"threads\":{},\"nodes\":[{}],\"warnings\":[{}]{expected_json}}}",
            json::string(&model.display().to_string()),
            gguf.architecture.as_deref().map_or("null".into(), json::string),
            experts.len(),
            total,
            json::string(&map.render()),
            threads,
            nodes.join(","),
            warnings.iter().map(|w| json::string(w)).collect::<Vec<_>>().join(",")
        );
        return Ok(());
    }
    println!(
        "model: {} ({}), {} expert tensors, {} of experts",
        model.display(),
        gguf.architecture.as_deref().unwrap_or("?"),
        experts.len(),
        format_gib(total)
    );
    print!("machine: {}", topo.render_text().lines().next().unwrap_or(""));
    println!();
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
    for w in &warnings {
        println!("warning: {w}");
    }
    Ok(())
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
    let with_value = ["topology", "map", "model", "threads", "pid", "experts"];
    let result = match cmd {
        "--version" | "-V" | "version" => {
            println!("numa-moe {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        "topology" | "check-map" | "plan" | "verify" => match parse_args(rest, &with_value) {
            Ok(a) => match cmd {
                "topology" => cmd_topology(&a),
                "check-map" => cmd_check_map(&a),
                "plan" => cmd_plan(&a),
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
