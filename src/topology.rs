//! What the machine is: NUMA nodes, their CPUs (physical cores and SMT siblings), their
//! memory, and the distances between them.
//!
//! Discovery reads hwloc (through hwlocality) and, on the host, the kernel's own view in
//! /sys/devices/system/node, which adds what hwloc leaves out: memory-less nodes, free memory
//! per node, and the SLIT distances. The result is a plain [`Topology`] value that the planner
//! takes as input, so tests can build any machine by hand, from an hwloc synthetic string
//! ("package:2 numa:4 core:24 pu:2") or from an XML file.
//!
//! Invariants: nodes are sorted by OS index; every CPU listed is one the process may use
//! (affinity mask, cpuset cgroup); `distances` is a full n*n matrix in node order.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::Topology as HwlocTopology;

/// The environment variable that replaces the host topology by a synthetic or XML one.
pub const TOPOLOGY_ENV: &str = "NUMA_MOE_TOPOLOGY";

/// One logical CPU (hwloc PU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// The OS index, as in /proc/cpuinfo and sched_setaffinity.
    pub os: u32,
    /// The physical core it belongs to (unique across the machine).
    pub core: u32,
    /// Its rank among the core's hardware threads (0 = first thread of the core).
    pub smt: u32,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The OS index (what mbind and numactl call the node).
    pub id: u32,
    /// CPUs local to this node that the process may use, sorted by OS index.
    pub cpus: Vec<Cpu>,
    /// Memory on the node in bytes; 0 for a memory-less node.
    pub total_bytes: u64,
    /// Memory free or reclaimable now, where known (the host; not synthetic machines).
    pub free_bytes: Option<u64>,
    /// Whether the process may allocate on this node (cpuset.mems, numactl --membind).
    pub mem_allowed: bool,
}

impl NumaNode {
    pub fn has_memory(&self) -> bool {
        self.total_bytes > 0
    }

    pub fn has_cpus(&self) -> bool {
        !self.cpus.is_empty()
    }

    /// Number of physical cores with at least one usable CPU.
    pub fn cores(&self) -> usize {
        let mut cores: Vec<u32> = self.cpus.iter().map(|c| c.core).collect();
        cores.sort_unstable();
        cores.dedup();
        cores.len()
    }

    /// CPUs ordered physical cores first: the first thread of every core, then the second
    /// thread of every core, and so on. Workers are laid out on CPUs in this order.
    pub fn cpus_cores_first(&self) -> Vec<Cpu> {
        let mut v = self.cpus.clone();
        v.sort_by_key(|c| (c.smt, c.core, c.os));
        v
    }

    /// Bytes the planner may place here: free memory where known, else the node's size.
    pub fn budget_bytes(&self) -> u64 {
        self.free_bytes.unwrap_or(self.total_bytes)
    }
}

/// Where a topology came from. Only a host topology can be bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Host,
    Synthetic(String),
    Xml(PathBuf),
    /// Built by hand (tests).
    Manual,
}

/// Errors while discovering or describing a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError(pub String);

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopologyError {}

fn err<T>(msg: impl Into<String>) -> Result<T, TopologyError> {
    Err(TopologyError(msg.into()))
}

/// The machine as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<NumaNode>,
    distances: Vec<u32>,
    source: Source,
}

impl Topology {
    /// Builds a topology from parts, checking its invariants.
    pub fn from_parts(mut nodes: Vec<NumaNode>, distances: Option<Vec<Vec<u32>>>, source: Source) -> Result<Self, TopologyError> {
        if nodes.is_empty() {
            return err("a topology needs at least one NUMA node");
        }
        // Distances are given in the order of `nodes`; sort both together.
        let n = nodes.len();
        let dist = match distances {
            Some(d) => {
                if d.len() != n || d.iter().any(|r| r.len() != n) {
                    return err(format!("distance matrix must be {n}x{n}"));
                }
                d
            }
            None => (0..n).map(|i| (0..n).map(|j| if i == j { 10 } else { 20 }).collect()).collect(),
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| nodes[i].id);
        let flat: Vec<u32> = order.iter().flat_map(|&i| order.iter().map(move |&j| (i, j))).map(|(i, j)| dist[i][j]).collect();
        nodes.sort_by_key(|n| n.id);
        for w in nodes.windows(2) {
            if w[0].id == w[1].id {
                return err(format!("node {} is listed twice", w[0].id));
            }
        }
        for node in &mut nodes {
            node.cpus.sort_by_key(|c| c.os);
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in nodes.iter().flat_map(|n| &n.cpus) {
            if !seen.insert(c.os) {
                return err(format!("cpu {} belongs to two nodes", c.os));
            }
        }
        Ok(Topology { nodes, distances: flat, source })
    }

    /// A machine of `n` nodes with `cores` single-threaded cores and `mem_gib` GiB each,
    /// numbered contiguously. Handy for tests and examples.
    pub fn uniform(n: u32, cores: u32, mem_gib: u64) -> Self {
        let nodes = (0..n)
            .map(|id| NumaNode {
                id,
                cpus: (0..cores).map(|c| Cpu { os: id * cores + c, core: id * cores + c, smt: 0 }).collect(),
                total_bytes: mem_gib << 30,
                free_bytes: None,
                mem_allowed: true,
            })
            .collect();
        Self::from_parts(nodes, None, Source::Manual).expect("uniform topology is valid")
    }

    /// The topology named by NUMA_MOE_TOPOLOGY, or the host's when it is unset or "host".
    pub fn detect() -> Result<Self, TopologyError> {
        match std::env::var(TOPOLOGY_ENV) {
            Ok(spec) if !spec.trim().is_empty() => Self::from_spec(spec.trim()),
            _ => Self::from_host(),
        }
    }

    /// "host", a path to an hwloc XML file, or an hwloc synthetic description.
    pub fn from_spec(spec: &str) -> Result<Self, TopologyError> {
        if spec == "host" {
            Self::from_host()
        } else if spec.ends_with(".xml") || Path::new(spec).is_file() {
            Self::from_xml(Path::new(spec))
        } else {
            Self::from_synthetic(spec)
        }
    }

    pub fn from_synthetic(desc: &str) -> Result<Self, TopologyError> {
        let topo = HwlocTopology::builder()
            .from_synthetic(desc)
            .map_err(|e| TopologyError(format!("invalid hwloc synthetic topology {desc:?}: {e}")))?
            .build()
            .map_err(|e| TopologyError(format!("hwloc could not build {desc:?}: {e}")))?;
        Self::from_hwloc(&topo, Source::Synthetic(desc.to_string()))
    }

    pub fn from_xml(path: &Path) -> Result<Self, TopologyError> {
        let topo = HwlocTopology::builder()
            .from_xml_file(path)
            .map_err(|e| TopologyError(format!("cannot read hwloc XML {}: {e}", path.display())))?
            .build()
            .map_err(|e| TopologyError(format!("hwloc could not load {}: {e}", path.display())))?;
        Self::from_hwloc(&topo, Source::Xml(path.to_path_buf()))
    }

    /// The machine this process runs on, restricted to what the process may use.
    pub fn from_host() -> Result<Self, TopologyError> {
        let hw = HwlocTopology::new().map_err(|e| TopologyError(format!("hwloc topology discovery failed: {e}")))?;
        let mut topo = Self::from_hwloc(&hw, Source::Host)?;
        topo.overlay_sysfs(Path::new("/sys/devices/system/node"));
        topo.restrict_to_process();
        Ok(topo)
    }

    fn from_hwloc(topo: &HwlocTopology, source: Source) -> Result<Self, TopologyError> {
        struct Raw {
            id: u32,
            cpuset: Vec<u32>,
            mem: u64,
        }
        let mut raw: Vec<Raw> = topo
            .objects_with_type(ObjectType::NUMANode)
            .map(|o| {
                let mem = match o.attributes() {
                    Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
                    _ => 0,
                };
                let cpuset = o.cpuset().map(|s| s.iter_set().map(|i| usize::from(i) as u32).collect()).unwrap_or_default();
                Raw { id: o.os_index().unwrap_or(0) as u32, cpuset, mem }
            })
            .collect();
        if raw.is_empty() {
            // hwloc always reports at least one node, but an odd XML might not.
            let all: Vec<u32> = topo.cpuset().iter_set().map(|i| usize::from(i) as u32).collect();
            raw.push(Raw { id: 0, cpuset: all, mem: 0 });
        }
        // Each PU goes to the most local node holding it: the smallest cpuset that contains it.
        // Memory-side nodes (HBM, CXL) that span a whole package therefore end up CPU-less.
        let mut nodes: Vec<NumaNode> =
            raw.iter().map(|r| NumaNode { id: r.id, cpus: Vec::new(), total_bytes: r.mem, free_bytes: None, mem_allowed: true }).collect();
        for pu in topo.objects_with_type(ObjectType::PU) {
            let Some(os) = pu.os_index() else { continue };
            let os = os as u32;
            let core = pu.first_ancestor_with_type(ObjectType::Core);
            let (core_id, smt) = match core {
                Some(c) => (c.logical_index() as u32, pu.sibling_rank() as u32),
                None => (1_000_000 + pu.logical_index() as u32, 0),
            };
            let best =
                raw.iter().enumerate().filter(|(_, r)| r.cpuset.contains(&os)).min_by_key(|(_, r)| (r.cpuset.len(), r.mem == 0, r.id));
            if let Some((i, _)) = best {
                nodes[i].cpus.push(Cpu { os, core: core_id, smt });
            }
        }
        let distances = hwloc_distances(topo, &nodes);
        Self::from_parts(nodes, distances, source)
    }

    /// Adds what sysfs knows and hwloc does not: memory-less nodes, free memory, distances.
    fn overlay_sysfs(&mut self, root: &Path) {
        let Ok(online) = fs::read_to_string(root.join("online")) else { return };
        let Some(ids) = parse_cpu_list(online.trim()) else { return };
        let cores: std::collections::HashMap<u32, Cpu> = self.nodes.iter().flat_map(|n| n.cpus.iter().map(|c| (c.os, *c))).collect();
        let mut nodes = Vec::new();
        for id in ids {
            let dir = root.join(format!("node{id}"));
            let cpus: Vec<Cpu> = fs::read_to_string(dir.join("cpulist"))
                .ok()
                .and_then(|s| parse_cpu_list(s.trim()))
                .unwrap_or_default()
                .into_iter()
                .map(|os| cores.get(&os).copied().unwrap_or(Cpu { os, core: 1_000_000 + os, smt: 0 }))
                .collect();
            let meminfo = fs::read_to_string(dir.join("meminfo")).unwrap_or_default();
            let kib = |key: &str| meminfo_kib(&meminfo, key);
            let total = kib("MemTotal").map(|k| k << 10);
            let free = match (kib("MemFree"), kib("FilePages"), kib("Shmem")) {
                (Some(f), Some(fp), Some(sh)) => Some((f + fp.saturating_sub(sh)) << 10),
                (Some(f), _, _) => Some(f << 10),
                _ => None,
            };
            let hw_total = self.node(id).map_or(0, |n| n.total_bytes);
            nodes.push(NumaNode { id, cpus, total_bytes: total.unwrap_or(hw_total), free_bytes: free, mem_allowed: true });
        }
        if nodes.is_empty() {
            return;
        }
        let n = nodes.len();
        let dist: Option<Vec<Vec<u32>>> = nodes
            .iter()
            .map(|node| {
                let s = fs::read_to_string(root.join(format!("node{}/distance", node.id))).ok()?;
                let row: Vec<u32> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                (row.len() == n).then_some(row)
            })
            .collect();
        if let Ok(t) = Self::from_parts(nodes, dist, Source::Host) {
            *self = t;
        }
    }

    /// Drops CPUs outside the thread's affinity mask and marks nodes outside mems_allowed.
    fn restrict_to_process(&mut self) {
        if let Ok(allowed) = crate::sys::thread_affinity() {
            for node in &mut self.nodes {
                node.cpus.retain(|c| allowed.contains(&c.os));
            }
        }
        if let Ok(mems) = crate::sys::mems_allowed() {
            if !mems.is_empty() {
                for node in &mut self.nodes {
                    node.mem_allowed = mems.contains(node.id);
                }
            }
        }
    }

    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Whether memory can really be bound here (synthetic and XML machines are plans only).
    pub fn is_host(&self) -> bool {
        self.source == Source::Host
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// SLIT-style distance from node `a` to node `b` (10 = local).
    pub fn distance(&self, a: u32, b: u32) -> u32 {
        match (self.index(a), self.index(b)) {
            (Some(i), Some(j)) => self.distances[i * self.nodes.len() + j],
            _ => u32::MAX,
        }
    }

    pub fn distance_row(&self, a: u32) -> Vec<u32> {
        self.nodes.iter().map(|n| self.distance(a, n.id)).collect()
    }

    /// Nodes that can hold experts and compute on them: memory, CPUs, and allowed.
    pub fn compute_nodes(&self) -> Vec<u32> {
        self.nodes.iter().filter(|n| n.has_memory() && n.has_cpus() && n.mem_allowed).map(|n| n.id).collect()
    }

    /// Among `candidates`, the node closest to `from` (ties: lowest id).
    pub fn nearest(&self, from: u32, candidates: &[u32]) -> Option<u32> {
        candidates.iter().copied().min_by_key(|&c| (self.distance(from, c), c))
    }

    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }

    /// The node a CPU belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes.iter().find(|n| n.cpus.iter().any(|c| c.os == cpu)).map(|n| n.id)
    }

    /// Human-readable description, as `numa-moe topology` prints it.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let src = match &self.source {
            Source::Host => "this machine".to_string(),
            Source::Synthetic(d) => format!("synthetic \"{d}\" (planning only)"),
            Source::Xml(p) => format!("XML {} (planning only)", p.display()),
            Source::Manual => "built by hand".to_string(),
        };
        s += &format!("{} NUMA node(s), {} usable CPU(s): {src}\n", self.nodes.len(), self.cpu_count());
        for n in &self.nodes {
            let mem = if n.has_memory() { format_gib(n.total_bytes) } else { "no memory".into() };
            let free = n.free_bytes.map(|f| format!(", {} free", format_gib(f))).unwrap_or_default();
            let allowed = if n.mem_allowed { "" } else { ", memory not allowed for this process" };
            let cpus = if n.has_cpus() {
                format!(
                    "{} core(s), {} cpu(s) [{}]",
                    n.cores(),
                    n.cpus.len(),
                    render_cpu_list(&n.cpus.iter().map(|c| c.os).collect::<Vec<_>>())
                )
            } else {
                "no cpus".into()
            };
            s += &format!("  node {}: {mem}{free}{allowed}; {cpus}\n", n.id);
        }
        s += "distances:\n      ";
        for n in &self.nodes {
            s += &format!("{:>5}", n.id);
        }
        s += "\n";
        for a in &self.nodes {
            s += &format!("  {:>3} ", a.id);
            for b in &self.nodes {
                s += &format!("{:>5}", self.distance(a.id, b.id));
            }
            s += "\n";
        }
        s
    }

    /// Machine-readable description (`numa-moe topology --json`).
    pub fn render_json(&self) -> String {
        let src = match &self.source {
            Source::Host => "\"host\"".to_string(),
            Source::Synthetic(d) => format!("{{\"synthetic\":{}}}", crate::json::string(d)),
            Source::Xml(p) => format!("{{\"xml\":{}}}", crate::json::string(&p.display().to_string())),
            Source::Manual => "\"manual\"".to_string(),
        };
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let cpus: Vec<String> =
                    n.cpus.iter().map(|c| format!("{{\"os\":{},\"core\":{},\"smt\":{}}}", c.os, c.core, c.smt)).collect();
                format!(
                    "{{\"id\":{},\"total_bytes\":{},\"free_bytes\":{},\"mem_allowed\":{},\"cores\":{},\"cpus\":[{}],\"distances\":[{}]}}",
                    n.id,
                    n.total_bytes,
                    n.free_bytes.map_or("null".into(), |f| f.to_string()),
                    n.mem_allowed,
                    n.cores(),
                    cpus.join(","),
                    self.distance_row(n.id).iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
                )
            })
            .collect();
        format!("{{\"source\":{src},\"nodes\":[{}]}}", nodes.join(","))
    }
}

fn hwloc_distances(topo: &HwlocTopology, nodes: &[NumaNode]) -> Option<Vec<Vec<u32>>> {
    let all = topo.distances_with_type(None, ObjectType::NUMANode).ok()?;
    let d = all.into_iter().find(|d| d.num_objects() == nodes.len())?;
    let ids: Vec<Option<u32>> = d.objects().map(|o| o.and_then(|o| o.os_index()).map(|i| i as u32)).collect();
    let pos: Vec<usize> = nodes.iter().map(|n| ids.iter().position(|&i| i == Some(n.id))).collect::<Option<_>>()?;
    let n = ids.len();
    let raw = d.distances();
    Some(pos.iter().map(|&i| pos.iter().map(|&j| raw[i * n + j] as u32).collect()).collect())
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    // Lines look like "Node 0 MemFree:   123456 kB".
    meminfo.lines().find_map(|l| {
        let rest = l.split_once(&format!(" {key}:"))?.1;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Parses a kernel CPU or node list such as "0-3,8,10-11".
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// Renders a sorted list compactly: [0,1,2,5] -> "0-2,5".
pub fn render_cpu_list(ids: &[u32]) -> String {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    parts.join(",")
}

/// Bytes as GiB with one decimal ("40.1 GiB"), or MiB below one GiB.
pub fn format_gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_render() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(render_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn synthetic_two_sockets_with_smt() {
        let t = Topology::from_synthetic("package:2 numa:1 core:4 pu:2").unwrap();
        assert_eq!(t.node_ids(), vec![0, 1]);
        for n in t.nodes() {
            assert_eq!(n.cpus.len(), 8);
            assert_eq!(n.cores(), 4);
            assert!(n.has_memory());
            // cores first: the first 4 CPUs in layout order are distinct cores.
            let first: Vec<u32> = n.cpus_cores_first().iter().take(4).map(|c| c.core).collect();
            let mut d = first.clone();
            d.dedup();
            assert_eq!(d.len(), 4);
            assert!(n.cpus_cores_first().iter().take(4).all(|c| c.smt == 0));
        }
        assert!(!t.is_host());
        assert_eq!(t.compute_nodes(), vec![0, 1]);
    }

    #[test]
    fn synthetic_eight_nodes() {
        let t = Topology::from_synthetic("package:2 numa:4 core:6 pu:1").unwrap();
        assert_eq!(t.nodes().len(), 8);
        assert!(t.nodes().iter().all(|n| n.cpus.len() == 6));
        assert_eq!(t.cpu_count(), 48);
        assert_eq!(t.distance(0, 0), 10);
    }

    #[test]
    fn interleaved_cpu_numbering_keeps_cpus_with_their_node() {
        // like some EPYC systems: node 0 has the even CPUs, node 1 the odd ones, and SMT
        // siblings are numbered far apart
        let t = Topology::from_synthetic("package:2 numa:1 core:2 pu:2(indexes=0,8,2,10,1,9,3,11)").unwrap();
        let os = |n: u32| t.node(n).unwrap().cpus.iter().map(|c| c.os).collect::<Vec<_>>();
        assert_eq!(os(0), vec![0, 2, 8, 10]);
        assert_eq!(os(1), vec![1, 3, 9, 11]);
        // physical cores first: CPUs 0 and 2 (first threads of their cores) before 8 and 10
        let first: Vec<u32> = t.node(0).unwrap().cpus_cores_first().iter().map(|c| c.os).collect();
        assert_eq!(first, vec![0, 2, 8, 10]);
        let w = crate::placement::plan_workers(&t, 4);
        assert_eq!(w.iter().map(|s| (s.node, s.cpu)).collect::<Vec<_>>(), vec![(0, 0), (0, 2), (1, 1), (1, 3)]);
        assert_eq!(t.node_of_cpu(9), Some(1));
    }

    #[test]
    fn bad_synthetic_is_a_clear_error() {
        let e = Topology::from_synthetic("package:banana").unwrap_err();
        assert!(e.0.contains("invalid hwloc synthetic topology"), "{e}");
    }

    #[test]
    fn nearest_uses_distances_then_id() {
        let nodes = Topology::uniform(3, 1, 1).nodes().to_vec();
        let d = vec![vec![10, 32, 16], vec![32, 10, 16], vec![16, 16, 10]];
        let t = Topology::from_parts(nodes, Some(d), Source::Manual).unwrap();
        assert_eq!(t.nearest(0, &[1, 2]), Some(2));
        assert_eq!(t.nearest(2, &[0, 1]), Some(0));
    }

    #[test]
    fn host_topology_lists_usable_cpus() {
        let t = Topology::from_host().unwrap();
        assert!(t.is_host());
        let allowed = crate::sys::thread_affinity().unwrap();
        let listed: Vec<u32> = t.nodes().iter().flat_map(|n| n.cpus.iter().map(|c| c.os)).collect();
        assert!(listed.iter().all(|c| allowed.contains(c)));
        assert_eq!(listed.len(), allowed.len());
        assert!(t.nodes().iter().any(|n| n.has_memory()));
    }
}
