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

/// Most NUMA nodes a described machine may have: Linux's MAX_NUMNODES is at most 1024
/// (CONFIG_NODES_SHIFT 10), so no real machine has more.
pub(crate) const MAX_NODES: u64 = 1024;
/// Most logical CPUs a described machine may have (Linux's NR_CPUS is at most 8192 on x86,
/// twice that leaves room): hwloc builds every object of a description, so a description of
/// millions of PUs would stall it.
pub(crate) const MAX_PUS: u64 = 16384;
/// How much work a synthetic description may ask of hwloc, in bitmap words compared. hwloc
/// inserts each object by comparing its cpuset with every sibling's, so a level of n objects
/// under one parent costs n^2 comparisons of (CPUs / 64) words: "core:16384 pu:1" took five
/// minutes. 64M words take about half a second; an 8-socket machine with 3 nodes per socket
/// and 120 threads each asks for 4M.
pub(crate) const MAX_HWLOC_WORK: u64 = 64 << 20;
/// Largest hwloc XML file read: a real 8-socket machine's XML is well under 1 MiB.
pub(crate) const MAX_XML_BYTES: u64 = 16 << 20;
/// Largest CPU or node number accepted in a kernel list ("0-3,8"): lists are expanded, so an
/// absurd range ("0-4294967295") must not allocate gigabytes.
pub(crate) const MAX_LIST_ID: u32 = 1 << 16;

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
    /// Memory free or reclaimable when the topology was read, where known (the host; not
    /// synthetic machines): MemFree + unmapped page cache, see [`node_free_from_meminfo`]. The
    /// budget reads it again whenever it checks ([`MemorySources`]).
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
    /// Detection failed (the message says why): a one-node stand-in so that `off` (and
    /// `auto`, which then means off) still work; nothing is placed.
    Undetected(String),
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
        check_synthetic_size(desc)?;
        let topo = HwlocTopology::builder()
            .from_synthetic(desc)
            .map_err(|e| TopologyError(format!("invalid hwloc synthetic topology {desc:?}: {e}")))?
            .build()
            .map_err(|e| TopologyError(format!("hwloc could not build {desc:?}: {e}")))?;
        Self::from_hwloc(&topo, Source::Synthetic(desc.to_string()))
    }

    pub fn from_xml(path: &Path) -> Result<Self, TopologyError> {
        match fs::metadata(path) {
            Ok(m) if m.len() > MAX_XML_BYTES => {
                return err(format!(
                    "hwloc XML {} is {} bytes; at most {} MiB is read (a real machine's XML is well under 1 MiB)",
                    path.display(),
                    m.len(),
                    MAX_XML_BYTES >> 20
                ))
            }
            Ok(_) => {}
            Err(e) => return err(format!("cannot read hwloc XML {}: {e}", path.display())),
        }
        let topo = HwlocTopology::builder()
            .from_xml_file(path)
            .map_err(|e| TopologyError(format!("cannot read hwloc XML {}: {e}", path.display())))?
            .build()
            .map_err(|e| TopologyError(format!("hwloc could not load {}: {e}", path.display())))?;
        Self::from_hwloc(&topo, Source::Xml(path.to_path_buf()))
    }

    /// The machine this process runs on, restricted to what the process may use.
    /// A kernel without NUMA support (no /sys/devices/system/node) is one node, as hwloc
    /// reports it.
    pub fn from_host() -> Result<Self, TopologyError> {
        let hw = HwlocTopology::new().map_err(|e| TopologyError(format!("hwloc topology discovery failed: {e}")))?;
        let mut topo = Self::from_hwloc(&hw, Source::Host)?;
        topo.overlay_sysfs(Path::new(SYSFS_NODES));
        topo.restrict_to_process();
        Ok(topo)
    }

    /// The stand-in used when detection failed: one node with the CPUs this thread may use
    /// and the machine's memory, marked [`Source::Undetected`] so nothing is bound or placed.
    pub fn undetected(reason: &str) -> Self {
        let cpus = crate::sys::thread_affinity().unwrap_or_default().into_iter().map(|os| Cpu { os, core: os, smt: 0 }).collect();
        let total = fs::read_to_string("/proc/meminfo").ok().and_then(|m| meminfo_kib(&m, "MemTotal")).unwrap_or(0) << 10;
        let node = NumaNode { id: 0, cpus, total_bytes: total, free_bytes: None, mem_allowed: true };
        Topology { nodes: vec![node], distances: vec![10], source: Source::Undetected(reason.to_string()) }
    }

    /// Why detection failed, when this is the stand-in.
    pub fn detection_error(&self) -> Option<&str> {
        match &self.source {
            Source::Undetected(r) => Some(r),
            _ => None,
        }
    }

    fn from_hwloc(topo: &HwlocTopology, source: Source) -> Result<Self, TopologyError> {
        let (n_nodes, n_pus) =
            (topo.objects_with_type(ObjectType::NUMANode).count() as u64, topo.objects_with_type(ObjectType::PU).count() as u64);
        if n_nodes > MAX_NODES || n_pus > MAX_PUS {
            return err(format!(
                "the described machine has {n_nodes} NUMA nodes and {n_pus} CPUs; at most {MAX_NODES} nodes (Linux's MAX_NUMNODES) and {MAX_PUS} CPUs are supported"
            ));
        }
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
        // One pass over the nodes' cpusets (not PUs x nodes: described machines can be large).
        let mut best: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        let key = |r: &Raw| (r.cpuset.len(), r.mem == 0, r.id);
        for (i, r) in raw.iter().enumerate() {
            for &os in &r.cpuset {
                let e = best.entry(os).or_insert(i);
                if key(r) < key(&raw[*e]) {
                    *e = i;
                }
            }
        }
        for pu in topo.objects_with_type(ObjectType::PU) {
            let Some(os) = pu.os_index() else { continue };
            let os = os as u32;
            let core = pu.first_ancestor_with_type(ObjectType::Core);
            let (core_id, smt) = match core {
                Some(c) => (c.logical_index() as u32, pu.sibling_rank() as u32),
                None => (1_000_000 + pu.logical_index() as u32, 0),
            };
            if let Some(&i) = best.get(&os) {
                nodes[i].cpus.push(Cpu { os, core: core_id, smt });
            }
        }
        let distances = hwloc_distances(topo, &nodes);
        Self::from_parts(nodes, distances, source)
    }

    /// Adds what sysfs knows and hwloc does not: memory-less nodes, free memory, distances.
    /// `root` is /sys/devices/system/node on the host, a directory tree in tests; without an
    /// `online` file there (a kernel without NUMA) the topology stays as hwloc saw it.
    fn overlay_sysfs(&mut self, root: &Path) {
        let Ok(online) = fs::read_to_string(root.join("online")) else { return };
        let Some(ids) = parse_cpu_list(online.trim()) else { return };
        if ids.len() as u64 > MAX_NODES {
            return;
        }
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
            let total = meminfo_kib(&meminfo, "MemTotal").map(|k| k << 10);
            let free = node_free_from_meminfo(&meminfo);
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

    /// Drops CPUs outside the thread's affinity mask and marks nodes outside mems_allowed
    /// (cpuset.mems, `numactl --membind`). mems_allowed comes from /proc/self/status, so it
    /// needs no syscall that a container may refuse; get_mempolicy only when that is missing.
    fn restrict_to_process(&mut self) {
        let cpus = crate::sys::thread_affinity().ok();
        let mems = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_mems_allowed(&s))
            .or_else(|| crate::sys::mems_allowed().ok().map(|m| m.nodes()));
        self.restrict(cpus.as_deref(), mems.as_deref());
    }

    /// Keeps only the CPUs in `cpus` and allows memory only on the nodes in `mems` (`None`:
    /// not known, no restriction; an empty list is treated as not known, never as "nowhere").
    pub fn restrict(&mut self, cpus: Option<&[u32]>, mems: Option<&[u32]>) {
        if let Some(allowed) = cpus {
            let allowed: std::collections::HashSet<u32> = allowed.iter().copied().collect();
            for node in &mut self.nodes {
                node.cpus.retain(|c| allowed.contains(&c.os));
            }
        }
        if let Some(mems) = mems.filter(|m| !m.is_empty()) {
            for node in &mut self.nodes {
                node.mem_allowed = mems.contains(&node.id);
            }
        }
    }

    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.index(id).map(|i| &self.nodes[i])
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
        // nodes are sorted by id (from_parts)
        self.nodes.binary_search_by_key(&id, |n| n.id).ok()
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
            Source::Undetected(e) => format!("topology detection failed ({e}); nothing is placed"),
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
            Source::Undetected(e) => format!("{{\"undetected\":{}}}", crate::json::string(e)),
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

/// Where the kernel describes NUMA nodes.
pub const SYSFS_NODES: &str = "/sys/devices/system/node";

/// Bytes a node can give now, from its sysfs meminfo text: MemFree plus the page cache no
/// process has mapped (Active(file) + Inactive(file) - Mapped).
///
/// Such cache is clean or under writeback, and the kernel drops it under pressure without
/// swapping, so an allocation bound to the node gets it. Counting only Inactive(file) would
/// be safer still but wrong on the commonest path: when a model runs a second time its file is
/// still cached, mostly on the active list, and the node would look full when it is not.
/// Not counted: shmem/tmpfs and anonymous memory (swap-backed: reclaiming them means swapping,
/// and without swap MPOL_BIND on a node that cannot reclaim ends in the OOM killer), file pages
/// mapped by running processes (executables, another process's model), unevictable pages and
/// kernel memory. (FilePages - Shmem, the figure before, counted mapped and unevictable file
/// pages too.) `None` when the text lacks MemFree.
pub fn node_free_from_meminfo(meminfo: &str) -> Option<u64> {
    let free = meminfo_kib(meminfo, "MemFree")?;
    let kib = |k: &str| meminfo_kib(meminfo, k).unwrap_or(0);
    let cache = kib("Active(file)").saturating_add(kib("Inactive(file)")).saturating_sub(kib("Mapped"));
    Some(free.saturating_add(cache).saturating_mul(1024))
}

/// The nodes in `Mems_allowed_list` of /proc/self/status text (what cpusets and
/// `numactl --membind` allow this process to allocate on).
pub fn parse_mems_allowed(status: &str) -> Option<Vec<u32>> {
    let list = status.lines().find_map(|l| l.strip_prefix("Mems_allowed_list:"))?;
    parse_cpu_list(list.trim()).filter(|v| v.iter().all(|&n| (n as u64) < MAX_NODES))
}

/// Checks an hwloc synthetic description's size before hwloc builds it: hwloc creates every
/// object, so "numa:100000" or millions of PUs would stall it. Counts the NUMA nodes (levels
/// named numa/node and memory children in brackets) and the PUs (the product of all arities);
/// what it cannot read is left to hwloc to reject.
pub fn check_synthetic_size(desc: &str) -> Result<(), TopologyError> {
    // levels are separated by spaces; attributes in (...) and memory children in [...] may
    // themselves hold spaces
    let mut levels = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for ch in desc.chars() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            _ => {}
        }
        if ch.is_whitespace() && depth <= 0 {
            if !cur.is_empty() {
                levels.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(ch);
        }
    }
    if !cur.is_empty() {
        levels.push(cur);
    }
    let (mut objects, mut numa, mut saw_numa) = (1u64, 0u64, false);
    // sibling comparisons: objects at a level times their siblings; the widest level names it
    let (mut pairs, mut widest) = (0u64, (0u64, ""));
    for level in &levels {
        if level.starts_with('[') {
            numa = numa.saturating_add(objects);
            pairs = pairs.saturating_add(objects);
            saw_numa = true;
            continue;
        }
        let Some((ty, rest)) = level.split_once(':') else { continue };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(arity) = digits.parse::<u64>() else {
            if !digits.is_empty() {
                return err(format!("hwloc synthetic topology {desc:?}: the level {level:?} has an arity beyond any machine"));
            }
            continue;
        };
        objects = objects.saturating_mul(arity);
        pairs = pairs.saturating_add(objects.saturating_mul(arity));
        if arity > widest.0 {
            widest = (arity, level.as_str());
        }
        let ty = ty.to_ascii_lowercase();
        if ty.starts_with("numa") || ty == "node" {
            numa = numa.saturating_add(objects);
            saw_numa = true;
        }
    }
    let numa = if saw_numa { numa } else { 1 };
    if numa > MAX_NODES {
        return err(format!(
            "hwloc synthetic topology {desc:?} describes {numa} NUMA nodes; at most {MAX_NODES} are supported (Linux's MAX_NUMNODES)"
        ));
    }
    if objects > MAX_PUS {
        return err(format!("hwloc synthetic topology {desc:?} describes {objects} CPUs; at most {MAX_PUS} are supported"));
    }
    if pairs.saturating_mul(objects / 64 + 1) > MAX_HWLOC_WORK {
        return err(format!(
            "hwloc synthetic topology {desc:?} is too wide for hwloc to build quickly (it compares every object with its siblings, \
             and the level {:?} puts {} objects under one parent); describe fewer objects per level, e.g. more packages or nodes \
             with fewer cores each",
            widest.1, widest.0
        ));
    }
    Ok(())
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    // "Node 0 MemFree:   123456 kB" (sysfs) or "MemFree:   123456 kB" (/proc/meminfo)
    meminfo.lines().find_map(|l| {
        let (head, rest) = l.split_once(':')?;
        (head.rsplit(' ').next()? == key).then_some(())?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Where the kernel says how much memory is free now: per-node meminfo in sysfs and the
/// memory limits of the process's cgroup. Paths rather than fixed files so that tests can
/// point them at a directory tree of their own; [`MemorySources::host`] is the real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySources {
    /// /sys/devices/system/node
    pub nodes: PathBuf,
    /// /proc/self/cgroup
    pub proc_cgroup: PathBuf,
    /// /sys/fs/cgroup (cgroup v2 there; v1's memory controller under memory/)
    pub cgroup_fs: PathBuf,
    /// /proc/self/numa_maps
    pub numa_maps: PathBuf,
}

impl MemorySources {
    pub fn host() -> Self {
        MemorySources {
            nodes: PathBuf::from(SYSFS_NODES),
            proc_cgroup: PathBuf::from("/proc/self/cgroup"),
            cgroup_fs: PathBuf::from("/sys/fs/cgroup"),
            numa_maps: PathBuf::from("/proc/self/numa_maps"),
        }
    }

    /// Bytes free or cheaply reclaimable on `node` now ([`node_free_from_meminfo`]).
    pub fn node_free(&self, node: u32) -> Option<u64> {
        node_free_from_meminfo(&fs::read_to_string(self.nodes.join(format!("node{node}/meminfo"))).ok()?)
    }

    /// Bytes the process's memory cgroup (and every cgroup above it) still lets it allocate,
    /// over all nodes; `None` when no limit is set or none can be read.
    pub fn cgroup_headroom(&self) -> Option<u64> {
        let text = fs::read_to_string(&self.proc_cgroup).ok()?;
        let mut best: Option<u64> = None;
        for (dir, v2) in cgroup_memory_dirs(&text, &self.cgroup_fs) {
            let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
            let (limit, usage) = if v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
            let (Some(limit), Some(usage)) = (read(limit), read(usage)) else { continue };
            if let Some(h) = cgroup_headroom_from(&limit, &usage, read("memory.stat").as_deref().unwrap_or("")) {
                best = Some(best.map_or(h, |b| b.min(h)));
            }
        }
        best
    }

    /// Resident bytes per node of this process's memory under a NUMA policy (the placed
    /// expert memory already allocated), from numa_maps; empty when it cannot be read.
    pub fn placed_resident(&self) -> std::collections::BTreeMap<u32, u64> {
        let text = fs::read_to_string(&self.numa_maps).unwrap_or_default();
        crate::memory::policy_resident_per_node(&crate::memory::parse_numa_maps(&text))
    }
}

/// The directories holding the memory limits that apply to this process, innermost first,
/// from /proc/self/cgroup text: for cgroup v2 (`0::/path`) `<fs>/path` and every parent up to
/// `<fs>`; for v1 (`N:...memory...:/path`) the same under `<fs>/memory`. Directories that do not
/// exist are left out (inside a container the path the kernel reports may not be visible,
/// while the container's own cgroup is mounted at the root). Flag: true for v2.
pub fn cgroup_memory_dirs(proc_cgroup: &str, fs_root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (it.next(), it.next(), it.next()) else { continue };
        let (base, v2) = if controllers.is_empty() {
            (fs_root.to_path_buf(), true)
        } else if controllers.split(',').any(|c| c == "memory") {
            (fs_root.join("memory"), false)
        } else {
            continue;
        };
        let rel: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != "." && *p != "..").collect();
        for depth in (0..=rel.len()).rev() {
            let dir = rel[..depth].iter().fold(base.clone(), |d, p| d.join(p));
            if dir.is_dir() && !out.iter().any(|(d, _)| d == &dir) {
                out.push((dir, v2));
            }
        }
    }
    out
}

/// Bytes a cgroup still allows: its limit (`memory.max` / `memory.limit_in_bytes` text) minus
/// its usage (`memory.current` / `memory.usage_in_bytes`), plus the unmapped page cache in its
/// `memory.stat` (active_file + inactive_file - file_mapped: counted in the usage, and
/// reclaimed when the cgroup reaches its limit; the same choice as for a node,
/// [`node_free_from_meminfo`]). `None` for no limit ("max", or v1's huge "unlimited" number)
/// or unreadable text.
pub fn cgroup_headroom_from(limit: &str, usage: &str, stat: &str) -> Option<u64> {
    let limit = limit.trim();
    if limit == "max" {
        return None;
    }
    let limit: u64 = limit.parse().ok()?;
    if limit >= 1 << 60 {
        return None; // cgroup v1 writes "no limit" as a page-rounded i64::MAX
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let stat_value = |key: &str| {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    // v1 gives the hierarchical figures as total_*; v2 names them plainly
    let value = |v1: &str, v2: &str| stat_value(v1).or_else(|| stat_value(v2)).unwrap_or(0);
    let cache = value("total_active_file", "active_file")
        .saturating_add(value("total_inactive_file", "inactive_file"))
        .saturating_sub(value("total_mapped_file", "file_mapped"))
        .min(usage);
    Some(limit.saturating_sub(usage - cache))
}

/// Parses a kernel CPU or node list such as "0-3,8,10-11"; `None` when malformed or when a
/// number exceeds [`MAX_LIST_ID`].
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b > MAX_LIST_ID || out.len() > MAX_LIST_ID as usize {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                let n: u32 = part.trim().parse().ok()?;
                if n > MAX_LIST_ID || out.len() > MAX_LIST_ID as usize {
                    return None;
                }
                out.push(n);
            }
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
        assert_eq!(w.iter().map(|s| (s.node, s.cpu)).collect::<Vec<_>>(), vec![(0, 0), (1, 1), (0, 2), (1, 3)]);
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

    /// A fresh directory tree for one test, filled from (relative path, contents) pairs.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("numa-moe-topo-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        for (path, text) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        root
    }

    #[test]
    fn a_kernel_without_numa_is_one_node() {
        // no /sys/devices/system/node at all: what hwloc saw stays, one node with every CPU
        let mut t = Topology::from_synthetic("core:4 pu:2").unwrap();
        let before = t.clone();
        let root = tree("nonuma", &[]);
        t.overlay_sysfs(&root.join("missing"));
        t.overlay_sysfs(&root);
        assert_eq!(t, before);
        assert_eq!(t.node_ids(), vec![0]);
        assert_eq!(t.cpu_count(), 8);
        assert_eq!(t.compute_nodes(), vec![0]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn sysfs_adds_nodes_free_memory_and_distances() {
        let meminfo = |n: u32, free: u64, inactive: u64| {
            format!(
                "Node {n} MemTotal:  8000000 kB\nNode {n} MemFree:  {free} kB\nNode {n} Active(file):  300 kB\n\
                 Node {n} Inactive(file):  {inactive} kB\nNode {n} Mapped:  300 kB\nNode {n} FilePages:  5000000 kB\n\
                 Node {n} Shmem:  10 kB\n"
            )
        };
        let (m0, m1) = (meminfo(0, 1000, 500), meminfo(1, 2000, 0));
        let root = tree(
            "twonodes",
            &[
                ("online", "0-2\n"),
                ("node0/cpulist", "0-1\n"),
                ("node0/meminfo", &m0),
                ("node0/distance", "10 21 31\n"),
                ("node1/cpulist", "2-3\n"),
                ("node1/meminfo", &m1),
                ("node1/distance", "21 10 31\n"),
                ("node2/cpulist", "\n"),
                ("node2/distance", "31 31 10\n"),
            ],
        );
        let mut t = Topology::from_synthetic("package:2 numa:1 core:2 pu:1").unwrap();
        t.overlay_sysfs(&root);
        assert_eq!(t.node_ids(), vec![0, 1, 2]);
        // MemFree + unmapped page cache, not all of FilePages
        assert_eq!(t.node(0).unwrap().free_bytes, Some(1500 << 10));
        assert_eq!(t.node(1).unwrap().free_bytes, Some(2000 << 10));
        assert_eq!(t.node(1).unwrap().total_bytes, 8000000 << 10);
        assert!(!t.node(2).unwrap().has_cpus());
        assert_eq!(t.distance(0, 2), 31);
        assert_eq!(t.compute_nodes(), vec![0, 1]);
        let src = MemorySources { nodes: root.clone(), ..MemorySources::host() };
        assert_eq!(src.node_free(0), Some(1500 << 10));
        fs::write(root.join("node0/meminfo"), meminfo(0, 10, 0)).unwrap();
        assert_eq!(src.node_free(0), Some(10 << 10), "read again at every check");
        assert_eq!(src.node_free(7), None);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn free_memory_is_memfree_plus_inactive_file() {
        // a warm page cache (a model's second run) is mostly active: it counts unless mapped
        let proc_meminfo = "MemTotal: 100 kB\nMemFree: 40 kB\nActive(file): 30 kB\nInactive(file): 20 kB\nMapped: 15 kB\n\
                            FilePages: 60 kB\nShmem: 5 kB\nUnevictable: 5 kB\n";
        assert_eq!(node_free_from_meminfo(proc_meminfo), Some(75 << 10));
        assert_eq!(node_free_from_meminfo("MemFree: 40 kB\nActive(file): 3 kB\nMapped: 50 kB\n"), Some(40 << 10));
        assert_eq!(node_free_from_meminfo("Node 3 MemFree: 7 kB\n"), Some(7 << 10));
        assert_eq!(node_free_from_meminfo("Node 3 MemTotal: 7 kB\n"), None);
    }

    #[test]
    fn nodes_outside_mems_allowed_are_not_used() {
        let status = "Name:\tllama\nCpus_allowed_list:\t0-7\nMems_allowed:\t00000000,00000005\nMems_allowed_list:\t0,2\nvoluntary_ctxt_switches:\t1\n";
        assert_eq!(parse_mems_allowed(status), Some(vec![0, 2]));
        assert_eq!(parse_mems_allowed("Mems_allowed_list:\t0-3,8\n"), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_mems_allowed("Name: x\n"), None);
        assert_eq!(parse_mems_allowed("Mems_allowed_list:\t0-5000\n"), None, "beyond MAX_NUMNODES");
        let mut t = Topology::uniform(4, 2, 1);
        t.restrict(None, parse_mems_allowed(status).as_deref());
        assert_eq!(t.compute_nodes(), vec![0, 2]);
        assert!(!t.node(1).unwrap().mem_allowed);
        // and the map checker refuses the fenced node by name
        let e = crate::expert_map::ExpertMap::parse("0-3:1,*:0").unwrap().check_nodes(&t).unwrap_err();
        assert!(e.to_string().contains("node 1 is not allowed for this process"), "{e}");
        // taskset: CPUs outside the mask go; an empty mems list restricts nothing
        t.restrict(Some(&[0, 1, 4]), Some(&[]));
        assert_eq!(t.cpu_count(), 3);
        assert_eq!(t.compute_nodes(), vec![0, 2]);
    }

    #[test]
    fn huge_descriptions_are_refused_before_hwloc_sees_them() {
        let start = std::time::Instant::now();
        let e = Topology::from_synthetic("package:2 numa:100000 core:1 pu:1").unwrap_err();
        assert!(e.0.contains("describes 200000 NUMA nodes; at most 1024"), "{e}");
        let e = Topology::from_synthetic("numa:4 core:100000 pu:4").unwrap_err();
        assert!(e.0.contains("describes 1600000 CPUs; at most 16384"), "{e}");
        let e = Topology::from_synthetic("pack:99999999999999999999999 pu:1").unwrap_err();
        assert!(e.0.contains("arity beyond any machine"), "{e}");
        let e = Topology::from_synthetic("pack:65536 [numa] core:1 pu:1").unwrap_err();
        assert!(e.0.contains("65536 NUMA nodes"), "{e}");
        assert!(start.elapsed().as_millis() < 100, "refused in {:?}", start.elapsed());
        // flat levels make hwloc quadratic: refused before it starts (this took five minutes)
        let e = Topology::from_synthetic("core:16384 pu:1").unwrap_err();
        assert!(e.0.contains("too wide for hwloc to build quickly") && e.0.contains("\"core:16384\" puts 16384 objects"), "{e}");
        assert!(Topology::from_synthetic("numa:1024 pu:16").unwrap_err().0.contains("\"numa:1024\""));
        assert!(start.elapsed().as_millis() < 100, "refused in {:?}", start.elapsed());
        // the largest machines allowed still build, and quickly: 1024 nodes, 16384 CPUs, and
        // an 8-socket machine with sub-NUMA clustering
        for (desc, nodes, cpus) in [
            ("package:8 numa:128 core:2 pu:1", 1024, 2048),
            ("package:32 numa:8 core:16 pu:4", 256, 16384),
            ("package:8 numa:3 core:60 pu:2", 24, 2880),
        ] {
            let start = std::time::Instant::now();
            let t = Topology::from_synthetic(desc).unwrap();
            assert_eq!((t.nodes().len(), t.cpu_count()), (nodes, cpus), "{desc}");
            assert!(start.elapsed().as_secs() < 5, "{desc} built in {:?}", start.elapsed());
        }
    }

    #[test]
    fn xml_files_are_bounded_and_broken_ones_named() {
        let root = tree("xml", &[("broken.xml", "<topology><object type=\"Machine\"")]);
        let e = Topology::from_spec(root.join("broken.xml").to_str().unwrap()).unwrap_err();
        assert!(e.0.contains("broken.xml"), "{e}");
        let big = root.join("big.xml");
        fs::File::create(&big).unwrap().set_len(MAX_XML_BYTES + 1).unwrap();
        let e = Topology::from_xml(&big).unwrap_err();
        assert!(e.0.contains(&format!("is {} bytes; at most 16 MiB", MAX_XML_BYTES + 1)), "{e}");
        let e = Topology::from_xml(&root.join("absent.xml")).unwrap_err();
        assert!(e.0.contains("cannot read hwloc XML") && e.0.contains("absent.xml"), "{e}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn absurd_kernel_lists_are_refused_not_expanded() {
        assert_eq!(parse_cpu_list("0-4294967295"), None);
        assert_eq!(parse_cpu_list("70000"), None);
        assert_eq!(parse_cpu_list("0-65535").map(|v| v.len()), Some(65536));
    }

    #[test]
    fn cgroup_limits_cap_the_headroom() {
        // v2: limit minus usage, plus unmapped page cache; "max" is no limit
        assert_eq!(cgroup_headroom_from("1000\n", "600\n", "anon 500\nfile_mapped 30\ninactive_file 50\nactive_file 50\n"), Some(470));
        assert_eq!(cgroup_headroom_from("max\n", "600\n", ""), None);
        assert_eq!(cgroup_headroom_from("500\n", "600\n", ""), Some(0));
        // v1: the hierarchical figure first; the unlimited value is no limit
        assert_eq!(cgroup_headroom_from("1000", "900", "inactive_file 10\ntotal_inactive_file 300\ntotal_mapped_file 100\n"), Some(300));
        assert_eq!(cgroup_headroom_from("9223372036854771712", "900", ""), None);
        assert_eq!(cgroup_headroom_from("garbage", "900", ""), None);

        let root = tree(
            "cgroup",
            &[
                ("proc_cgroup", "0::/user.slice/app.scope\n"),
                ("fs/user.slice/memory.max", "10000\n"),
                ("fs/user.slice/memory.current", "2000\n"),
                ("fs/user.slice/app.scope/memory.max", "max\n"),
                ("fs/user.slice/app.scope/memory.current", "1500\n"),
                ("fs/user.slice/app.scope/memory.stat", "inactive_file 100\n"),
                ("v1_cgroup", "12:pids:/\n4:memory:/docker/abc\n0::/\n"),
                ("v1/memory/memory.limit_in_bytes", "4096\n"),
                ("v1/memory/memory.usage_in_bytes", "1024\n"),
            ],
        );
        let v2 = MemorySources { proc_cgroup: root.join("proc_cgroup"), cgroup_fs: root.join("fs"), ..MemorySources::host() };
        // the parent's limit applies to the child that has none
        assert_eq!(v2.cgroup_headroom(), Some(8000));
        let dirs = cgroup_memory_dirs(&fs::read_to_string(root.join("proc_cgroup")).unwrap(), &root.join("fs"));
        assert_eq!(dirs.len(), 3);
        assert!(dirs[0].0.ends_with("user.slice/app.scope") && dirs[0].1);
        // v1 inside a container: the reported path is not visible, the container's own root is
        let v1 = MemorySources { proc_cgroup: root.join("v1_cgroup"), cgroup_fs: root.join("v1"), ..MemorySources::host() };
        assert_eq!(v1.cgroup_headroom(), Some(3072));
        let none = MemorySources { proc_cgroup: root.join("absent"), ..MemorySources::host() };
        assert_eq!(none.cgroup_headroom(), None);
        fs::remove_dir_all(root).unwrap();
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
