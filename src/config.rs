//! What the user asked for, process-wide: the expert map, what to do when binding fails,
//! pinning, huge pages, verification. Read from the environment once, changed through the
//! C ABI (llama.cpp's `--numa-expert-map`), and shared by every buffer and op.
//!
//! | variable               | values                       | default                          |
//! |------------------------|------------------------------|----------------------------------|
//! | NUMA_MOE_EXPERT_MAP    | a map (docs/EXPERT_MAP.md)   | `auto` (rows on >1 node, off on 1) |
//! | NUMA_MOE_ON_ERROR      | `strict`, `fallback`         | `fallback`                       |
//! | NUMA_MOE_PIN           | `auto`, `off`                | `auto`                           |
//! | NUMA_MOE_THP           | `1`, `0`                     | `0`                              |
//! | NUMA_MOE_VERIFY        | `1`, `0`                     | `1`                              |
//! | NUMA_MOE_TOPOLOGY      | `host`, synthetic, XML path  | `host`                           |
//! | NUMA_MOE_FORCE_BIND    | `1`, `0`                     | `0` (tests: bind on a described machine) |
//! | NUMA_MOE_ROUTING_PROFILE | a routing profile (docs/ROUTING.md) | none (a bare `balanced` is `block`) |

use crate::error::{Error, ErrorCode};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::expert_map::{Body, ExpertMap, MapError, Policy};
use crate::memory::KernelSupport;
use crate::routing::RoutingProfile;
use crate::topology::{MemorySources, Topology};

pub const MAP_ENV: &str = "NUMA_MOE_EXPERT_MAP";

/// The routing profile of a bare `balanced` (one without `:FILE`).
pub const ROUTING_PROFILE_ENV: &str = "NUMA_MOE_ROUTING_PROFILE";

/// The warning given once when a `balanced` rule has no profile to follow.
const BALANCED_FALLBACK: &str = "balanced-fallback";

/// What happens when memory cannot be bound as planned (mbind refused, node short of memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop the load with a message naming the tensor, node and size.
    Strict,
    /// Warn once and continue with the kernel's default placement for that tensor.
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMode {
    /// Pin worker threads to their node's CPUs unless llama.cpp's own --numa pins them.
    Auto,
    /// Never change affinity; assign work by the node each thread runs on.
    Off,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub map: ExpertMap,
    /// Where the map came from, for reports ("default", "NUMA_MOE_EXPERT_MAP", "--numa-expert-map").
    pub map_origin: String,
    pub on_error: OnError,
    pub pin: PinMode,
    pub huge_pages: bool,
    pub verify: bool,
    /// Bind memory even when the topology is synthetic or XML (tests of binding failures:
    /// the kernel then refuses nodes the description has and the host lacks).
    pub force_bind: bool,
}

/// Process-wide state: the machine, the settings, and what all live buffers have reserved.
///
/// When topology detection fails, `topology` is a one-node stand-in
/// ([`Topology::undetected`]): `off` and `auto` (then off) work, every other map is refused
/// with the detection error, and nothing is bound.
pub struct Runtime {
    pub topology: Topology,
    settings: RwLock<Settings>,
    /// Where free memory is read whenever the budget is checked.
    memory: MemorySources,
    /// Whether the kernel lets this process bind and query pages, found out on first need.
    kernel: OnceLock<KernelSupport>,
    /// Bytes planned per node by live buffers (the memory budget).
    reserved: Mutex<BTreeMap<u32, u64>>,
    /// Warnings already printed, so each is printed once.
    warned: Mutex<Vec<String>>,
    /// Map errors found while llama.cpp probes tensors; the next allocation fails with them.
    pending_error: Mutex<Option<Error>>,
}

static RUNTIME: OnceLock<Result<Runtime, Error>> = OnceLock::new();

fn env_choice<T: Copy>(name: &str, choices: &[(&str, T)], default: T) -> Result<T, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) if v.trim().is_empty() => Ok(default),
        Ok(v) => choices.iter().find(|(k, _)| *k == v.trim()).map(|(_, t)| *t).ok_or_else(|| {
            format!("{name}={v} is not understood (use one of: {})", choices.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "))
        }),
    }
}

impl Runtime {
    fn from_env() -> Result<Runtime, Error> {
        let topology = Topology::detect().unwrap_or_else(|e| {
            let t = Topology::undetected(&e.to_string());
            crate::log::warn(&format!(
                "numa-moe: warning: cannot read the machine's topology ({e}); experts stay on llama.cpp's own path \
                 (--numa-expert-map off and auto work, other maps are refused)"
            ));
            t
        });
        // A bad setting must stop the model load with its message, not disable numa-moe
        // quietly: it becomes the pending error that fails the first expert allocation.
        let mut problems = Vec::new();
        let mut map_problem = false;
        let mut fallback = None;
        let (map, map_origin) = match std::env::var(MAP_ENV) {
            Ok(text) if !text.trim().is_empty() => match parse_map(&topology, &text) {
                Ok((map, note)) => {
                    fallback = note;
                    (map, MAP_ENV.to_string())
                }
                Err(e) => {
                    map_problem = true;
                    problems.push(format!("{MAP_ENV}: {e}"));
                    (ExpertMap::policy(Policy::Off), MAP_ENV.to_string())
                }
            },
            _ => (ExpertMap::policy(Policy::Auto), "default".to_string()),
        };
        fn choice<T>(r: Result<T, String>, default: T, problems: &mut Vec<String>) -> T {
            r.unwrap_or_else(|e| {
                problems.push(e);
                default
            })
        }
        let on_error = choice(
            env_choice("NUMA_MOE_ON_ERROR", &[("strict", OnError::Strict), ("fallback", OnError::Fallback)], OnError::Fallback),
            OnError::Fallback,
            &mut problems,
        );
        let pin = choice(
            env_choice("NUMA_MOE_PIN", &[("auto", PinMode::Auto), ("off", PinMode::Off)], PinMode::Auto),
            PinMode::Auto,
            &mut problems,
        );
        let huge_pages = choice(env_choice("NUMA_MOE_THP", &[("1", true), ("0", false)], false), false, &mut problems);
        let verify = choice(env_choice("NUMA_MOE_VERIFY", &[("1", true), ("0", false)], true), true, &mut problems);
        let force_bind = choice(env_choice("NUMA_MOE_FORCE_BIND", &[("1", true), ("0", false)], false), false, &mut problems);
        let settings = Settings { map, map_origin, on_error, pin, huge_pages, verify, force_bind };
        let rt = Runtime::new(topology, settings, MemorySources::host());
        if let Some(note) = fallback {
            crate::log::warn_once(&rt, BALANCED_FALLBACK, &note);
        }
        if !problems.is_empty() {
            let code = if map_problem { ErrorCode::InvalidMap } else { ErrorCode::InvalidArgument };
            rt.set_pending_error(Error::new(code, problems.join("; ")));
        }
        Ok(rt)
    }

    /// A runtime for `topology` with `settings`, reading free memory from `memory`.
    pub fn new(topology: Topology, settings: Settings, memory: MemorySources) -> Runtime {
        Runtime {
            topology,
            settings: RwLock::new(settings),
            memory,
            kernel: OnceLock::new(),
            reserved: Mutex::new(BTreeMap::new()),
            warned: Mutex::new(Vec::new()),
            pending_error: Mutex::new(None),
        }
    }

    /// The error that will fail the next expert allocation, if any.
    pub fn pending_error(&self) -> Option<Error> {
        self.pending_error.lock().clone()
    }

    /// The settings in force. `verify` is false where the kernel refuses to say where pages
    /// are (move_pages EPERM/ENOSYS): placement is then bound but not verified, which is said
    /// once, when it first matters.
    pub fn settings(&self) -> Settings {
        let mut s = self.settings.read().clone();
        // (where binding is refused too, that is what the user hears about, once)
        if s.verify && self.active(&s) && self.binds_with(&s) && self.kernel().bind.is_ok() {
            if let Err(e) = &self.kernel().page_query {
                if e.is_unavailable() {
                    crate::log::warn_once(
                        self,
                        "kernel-page-query",
                        &format!("numa-moe: warning: cannot check where expert pages are ({e}); placement is bound but not verified"),
                    );
                    s.verify = false;
                }
            }
        }
        s
    }

    /// Replaces the map after checking it against this machine and loading the routing
    /// profiles it names (a bare `balanced` takes NUMA_MOE_ROUTING_PROFILE's).
    pub fn set_map(&self, text: &str, origin: &str) -> Result<(), MapError> {
        self.set_map_with_profile(text, origin, &profile_env())
    }

    /// [`Runtime::set_map`] with the value NUMA_MOE_ROUTING_PROFILE would have.
    fn set_map_with_profile(&self, text: &str, origin: &str, env_profile: &Option<String>) -> Result<(), MapError> {
        let (map, fallback) = check_map(&self.topology, ExpertMap::parse(text)?, env_profile)?;
        if let Some(note) = fallback {
            crate::log::warn_once(self, BALANCED_FALLBACK, &note);
        }
        let mut s = self.settings.write();
        s.map = map;
        s.map_origin = origin.to_string();
        *self.pending_error.lock() = None;
        Ok(())
    }

    /// The pinning choice, read without copying the settings (every op asks).
    pub fn pin(&self) -> PinMode {
        self.settings.read().pin
    }

    /// Whether buffers bind their memory (the host, or a described machine when forced).
    ///
    /// Not where the kernel refuses memory policies altogether (mbind EPERM under a container's
    /// seccomp profile, ENOSYS without NUMA): with the fallback policy that is said once and
    /// placement is the kernel's default; with strict, buffers still try, so the load stops
    /// with the first tensor's name and the kernel's error.
    pub fn binds(&self) -> bool {
        let s = self.settings.read().clone();
        self.binds_with(&s)
    }

    fn binds_with(&self, s: &Settings) -> bool {
        if !(self.topology.is_host() || s.force_bind) {
            return false;
        }
        if s.on_error == OnError::Strict || !self.active(s) {
            return true;
        }
        match &self.kernel().bind {
            Err(e) if e.is_unavailable() => {
                crate::log::warn_once(self, "kernel-bind", &format!("numa-moe: warning: {}", unbound_note(e)));
                false
            }
            _ => true,
        }
    }

    /// Why placed memory is not bound, for the load report (`None`: it is bound).
    pub fn unbound_reason(&self) -> Option<String> {
        let s = self.settings.read().clone();
        if !(self.topology.is_host() || s.force_bind) {
            return Some("on a described topology: planned, not bound".into());
        }
        match &self.kernel().bind {
            Err(e) if e.is_unavailable() && s.on_error == OnError::Fallback => Some(unbound_note(e)),
            _ => None,
        }
    }

    fn kernel(&self) -> &KernelSupport {
        self.kernel.get_or_init(KernelSupport::probe)
    }

    pub fn set_on_error(&self, on_error: OnError) {
        self.settings.write().on_error = on_error;
    }

    /// Whether the map places anything at all on this machine (false: stock behaviour).
    pub fn placement_active(&self) -> bool {
        self.active(&self.settings.read())
    }

    fn active(&self, s: &Settings) -> bool {
        let one_node = self.topology.compute_nodes().len() <= 1;
        let experts = !s.map.rules.iter().all(|r| match &r.body {
            crate::expert_map::Body::Policy { policy: Policy::Off, .. } => true,
            crate::expert_map::Body::Policy { policy: Policy::Auto, .. } => one_node,
            _ => false,
        });
        let dense = match s.map.resolve_dense() {
            crate::expert_map::Resolved::Off => false,
            crate::expert_map::Resolved::Policy { policy: Policy::Auto, .. } => !one_node,
            _ => true,
        };
        experts || dense
    }

    /// Reserves `bytes` on `node` against its budget. On the host the budget is read now:
    /// the node's free memory ([`crate::topology::node_free_from_meminfo`]), and over all nodes
    /// what the process's cgroup still allows (memory.max minus memory.current). Both count
    /// only what live buffers reserved and have not allocated yet (pages already allocated
    /// are no longer free). Err: what is short, and which limit.
    pub fn reserve(&self, node: u32, bytes: u64) -> Result<(), Shortfall> {
        let mut r = self.reserved.lock();
        if self.topology.is_host() {
            let node_free = self.memory.node_free(node).or_else(|| self.topology.node(node).map(|n| n.budget_bytes())).unwrap_or(0);
            let cgroup = self.memory.cgroup_headroom();
            let check = |resident: &BTreeMap<u32, u64>| {
                let pending = |n: u32| r.get(&n).copied().unwrap_or(0).saturating_sub(resident.get(&n).copied().unwrap_or(0));
                let need = pending(node).saturating_add(bytes);
                let others: u64 = r.keys().filter(|&&n| n != node).map(|&n| pending(n)).sum();
                let by_cgroup = cgroup.map(|c| c.saturating_sub(others)).filter(|&c| c < node_free);
                let have = by_cgroup.unwrap_or(node_free);
                if need > have {
                    Err(Shortfall { need, have, cgroup: by_cgroup.is_some() })
                } else {
                    Ok(())
                }
            };
            // Nothing resident is assumed first (cheap); only a refusal looks at what is.
            check(&BTreeMap::new()).or_else(|_| check(&self.memory.placed_resident()))?;
        }
        *r.entry(node).or_default() += bytes;
        Ok(())
    }

    /// Counts `bytes` on `node` without checking the budget (fallback placement).
    pub fn reserve_unchecked(&self, node: u32, bytes: u64) {
        *self.reserved.lock().entry(node).or_default() += bytes;
    }

    pub fn release(&self, node: u32, bytes: u64) {
        let mut r = self.reserved.lock();
        if let Some(cur) = r.get_mut(&node) {
            *cur = cur.saturating_sub(bytes);
        }
    }

    /// True the first time `key` is seen: for warnings printed once.
    pub fn first_time(&self, key: &str) -> bool {
        let mut w = self.warned.lock();
        if w.iter().any(|k| k == key) {
            false
        } else {
            w.push(key.to_string());
            true
        }
    }

    pub fn set_pending_error(&self, msg: Error) {
        let mut p = self.pending_error.lock();
        if p.is_none() {
            *p = Some(msg);
        }
    }

    pub fn take_pending_error(&self) -> Option<Error> {
        self.pending_error.lock().take()
    }
}

/// NUMA_MOE_ROUTING_PROFILE, if set and not blank.
fn profile_env() -> Option<String> {
    std::env::var(ROUTING_PROFILE_ENV).ok().filter(|v| !v.trim().is_empty())
}

/// Loads the routing profile of every `balanced` rule into the map: the rule's own
/// (`balanced:FILE`), else `env_profile` (NUMA_MOE_ROUTING_PROFILE's value). A file named
/// twice is read once. A profile that cannot be read or is not one is an error naming the
/// file (and where the map names it); one recorded on a model with another expert count is
/// refused later, per tensor ([`ExpertMap::resolve`]), where the count is known.
///
/// `Ok(Some(note))`: some `balanced` rule has no profile and places as `block`; `note` is
/// the warning to give once.
pub fn load_profiles(map: &mut ExpertMap, env_profile: &Option<String>) -> Result<Option<String>, MapError> {
    let text = map.text.clone();
    let mut loaded: Vec<(String, Arc<RoutingProfile>)> = Vec::new();
    let mut fallback = None;
    for rule in &mut map.rules {
        let Body::Balanced { balanced: b, .. } = &mut rule.body else { continue };
        let (path, span) = match (&b.path, env_profile) {
            (Some((p, span)), _) => (p.clone(), Some(span.clone())),
            (None, Some(p)) => (p.trim().to_string(), None),
            (None, None) => {
                fallback = Some(format!(
                    "numa-moe: warning: the expert map asks for \"balanced\" without a routing profile \
                     (give balanced:FILE, or {ROUTING_PROFILE_ENV}=FILE); placing whole experts as \"block\" instead"
                ));
                continue;
            }
        };
        let profile = match loaded.iter().find(|(p, _)| *p == path) {
            Some((_, profile)) => profile.clone(),
            None => {
                let profile = RoutingProfile::load(std::path::Path::new(&path)).map_err(|e| {
                    let message = if span.is_some() { e.message } else { format!("{ROUTING_PROFILE_ENV}: {}", e.message) };
                    MapError { text: text.clone(), span: span.clone(), message }
                })?;
                let profile = Arc::new(profile);
                loaded.push((path.clone(), profile.clone()));
                profile
            }
        };
        b.profile = Some(profile);
        b.origin = path;
    }
    Ok(fallback)
}

/// Parses `text` and checks it as setting the map would: against the machine, with the
/// routing profiles of its `balanced` rules loaded (NUMA_MOE_ROUTING_PROFILE's for a bare
/// one). `Ok((map, Some(note)))`: a bare `balanced` has no profile and places as `block`.
/// The tool and `numa_moe_map_check` use it, so they accept exactly what a load accepts.
pub fn parse_map(topology: &Topology, text: &str) -> Result<(ExpertMap, Option<String>), MapError> {
    check_map(topology, ExpertMap::parse(text)?, &profile_env())
}

/// Checks a map against the machine and loads its routing profiles ([`load_profiles`], whose
/// fallback note comes back); without a topology only `off` and `auto` pass.
fn check_map(topology: &Topology, map: ExpertMap, env_profile: &Option<String>) -> Result<(ExpertMap, Option<String>), MapError> {
    if let Some(reason) = topology.detection_error() {
        let placeless =
            map.rules.iter().all(|r| matches!(&r.body, crate::expert_map::Body::Policy { policy: Policy::Off | Policy::Auto, .. }))
                && map.dense.as_ref().is_none_or(|d| matches!(d.policy, Policy::Off | Policy::Auto));
        if !placeless {
            return Err(MapError {
                text: map.text.clone(),
                span: None,
                message: format!("the machine's topology could not be read ({reason}); only \"off\" and \"auto\" work"),
            });
        }
    }
    map.check_nodes(topology)?;
    let mut map = map;
    let fallback = load_profiles(&mut map, env_profile)?;
    Ok((map, fallback))
}

/// What the user is told when the kernel refuses memory policies.
fn unbound_note(e: &crate::sys::SysError) -> String {
    format!("cannot bind expert memory ({e}); placement is the kernel's default, not bound and not verified")
}

/// Why a node cannot take what a plan puts there: `need` bytes still to allocate there
/// against `have`, the node's free memory or, when tighter (`cgroup`), what the process's
/// cgroup still allows over all nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    pub need: u64,
    pub have: u64,
    pub cgroup: bool,
}

/// The process runtime, created from the environment on first use.
pub fn runtime() -> Result<&'static Runtime, Error> {
    RUNTIME.get_or_init(Runtime::from_env).as_ref().map_err(|e| e.clone())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;
    use crate::sys::SysError;
    use crate::topology::{NumaNode, Source};

    fn settings(map: &str) -> Settings {
        Settings {
            map: ExpertMap::parse(map).unwrap(),
            map_origin: "test".into(),
            on_error: OnError::Fallback,
            pin: PinMode::Auto,
            huge_pages: false,
            verify: true,
            force_bind: false,
        }
    }

    /// A host of `n` nodes whose free memory, cgroup and numa_maps come from a directory tree.
    fn host(name: &str, n: u32, map: &str) -> (Runtime, PathBuf) {
        let root = std::env::temp_dir().join(format!("numa-moe-config-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let nodes: Vec<NumaNode> = Topology::uniform(n, 2, 1).nodes().to_vec();
        let topo = Topology::from_parts(nodes, None, Source::Host).unwrap();
        let memory = MemorySources {
            nodes: root.join("node"),
            proc_cgroup: root.join("cgroup"),
            cgroup_fs: root.join("cgroupfs"),
            numa_maps: root.join("numa_maps"),
        };
        for i in 0..n {
            set_free_kib(&root, i, 1000);
        }
        (Runtime::new(topo, settings(map), memory), root)
    }

    fn set_free_kib(root: &std::path::Path, node: u32, kib: u64) {
        let dir = root.join(format!("node/node{node}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("meminfo"),
            format!("Node {node} MemTotal: 1048576 kB\nNode {node} MemFree: {kib} kB\nNode {node} Inactive(file): 0 kB\n"),
        )
        .unwrap();
    }

    #[test]
    fn the_budget_reads_free_memory_when_it_checks() {
        let (rt, root) = host("fresh", 1, "rows");
        assert_eq!(rt.reserve(0, 500 << 10), Ok(()));
        assert_eq!(rt.reserve(0, 600 << 10), Err(Shortfall { need: 1100 << 10, have: 1000 << 10, cgroup: false }));
        // memory freed by others since the topology was read counts
        set_free_kib(&root, 0, 2000);
        assert_eq!(rt.reserve(0, 600 << 10), Ok(()));
        // and memory taken by others since then is missing
        set_free_kib(&root, 0, 1000);
        assert_eq!(rt.reserve(0, 1), Err(Shortfall { need: (1100 << 10) + 1, have: 1000 << 10, cgroup: false }));
        rt.release(0, 1100 << 10);
        assert_eq!(rt.reserve(0, 1000 << 10), Ok(()));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_cgroup_limit_caps_all_nodes_together() {
        let (rt, root) = host("cgroup", 2, "rows");
        fs::write(root.join("cgroup"), "0::/job\n").unwrap();
        fs::create_dir_all(root.join("cgroupfs/job")).unwrap();
        fs::write(root.join("cgroupfs/job/memory.max"), format!("{}\n", 1600 << 10)).unwrap();
        fs::write(root.join("cgroupfs/job/memory.current"), format!("{}\n", 100 << 10)).unwrap();
        assert_eq!(rt.reserve(0, 800 << 10), Ok(()));
        // node 1 has 1000 KiB free, but the cgroup allows 1500 KiB of which node 0 took 800
        assert_eq!(rt.reserve(1, 800 << 10), Err(Shortfall { need: 800 << 10, have: 700 << 10, cgroup: true }));
        assert_eq!(rt.reserve(1, 700 << 10), Ok(()));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn memory_already_placed_is_not_counted_twice() {
        let (rt, root) = host("resident", 1, "rows");
        assert_eq!(rt.reserve(0, 800 << 10), Ok(()));
        // the first model is loaded: its 800 KiB are now allocated, bound to node 0
        set_free_kib(&root, 0, 200);
        fs::write(root.join("numa_maps"), "7f0000000000 bind:0 anon=200 dirty=200 N0=200 kernelpagesize_kB=4\n").unwrap();
        assert_eq!(rt.reserve(0, 150 << 10), Ok(()));
        assert_eq!(rt.reserve(0, 100 << 10), Err(Shortfall { need: 250 << 10, have: 200 << 10, cgroup: false }));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn without_a_topology_off_and_auto_work_and_other_maps_say_why() {
        let topo = Topology::undetected("cannot read hwloc XML /t/broken.xml: bad XML");
        let rt = Runtime::new(topo, settings("auto"), MemorySources::host());
        assert!(!rt.placement_active() && !rt.binds());
        assert_eq!(rt.set_map("off", "test"), Ok(()));
        assert_eq!(rt.set_map("auto", "test"), Ok(()));
        assert!(!rt.placement_active());
        for map in ["rows", "0-3:0,*:0", "mirror", "off;blk.1-2=rows"] {
            let e = rt.set_map(map, "test").unwrap_err().to_string();
            assert!(e.contains("topology could not be read (cannot read hwloc XML /t/broken.xml: bad XML)"), "{map}: {e}");
        }
        assert_eq!(rt.settings().map.render(), "auto");
    }

    #[test]
    fn a_kernel_refusing_policies_unbinds_once_in_fallback_and_not_in_strict() {
        let (rt, root) = host("refused", 2, "rows");
        let eperm = SysError::from_errno("mbind", libc::EPERM);
        rt.kernel.set(KernelSupport { bind: Err(eperm), page_query: Err(SysError::from_errno("move_pages", libc::EPERM)) }).unwrap();
        assert!(!rt.binds());
        assert!(!rt.first_time("kernel-bind"), "the warning was given");
        assert!(rt.unbound_reason().unwrap().contains("mbind failed: Operation not permitted (errno 1)"));
        assert!(rt.settings().verify, "nothing bound, so nothing to verify and no second warning");
        assert!(rt.first_time("kernel-page-query"));
        rt.set_on_error(OnError::Strict);
        assert!(rt.binds(), "strict: the first tensor's bind fails and stops the load with its name");
        assert_eq!(rt.unbound_reason(), None);
        assert!(rt.settings().verify, "still one warning in all: verification is not turned off with its own");
        // nothing placed, nothing said
        let (quiet, root2) = host("refused-off", 2, "off");
        quiet.kernel.set(KernelSupport { bind: Err(eperm), page_query: Ok(()) }).unwrap();
        assert!(quiet.binds() && quiet.first_time("kernel-bind"));
        fs::remove_dir_all(root).unwrap();
        fs::remove_dir_all(root2).unwrap();
    }

    fn write_profile(name: &str, n_expert: u32) -> PathBuf {
        use crate::routing::{LayerRouting, ModelSignature, SCHEMA};
        let path = std::env::temp_dir().join(format!("numa-moe-config-{name}-{}.json", std::process::id()));
        let layers = vec![LayerRouting { layer: 0, tokens: (0..n_expert as u64).collect(), recent: vec![] }];
        let p = RoutingProfile {
            schema: SCHEMA,
            model: ModelSignature { n_expert, expert_layers: vec![0] },
            map: "rows".into(),
            layers,
            nodes: vec![],
        };
        p.save(&path).unwrap();
        path
    }

    fn loaded(rt: &Runtime) -> Vec<Option<Arc<RoutingProfile>>> {
        rt.settings()
            .map
            .rules
            .iter()
            .filter_map(|r| match &r.body {
                Body::Balanced { balanced, .. } => Some(balanced.profile.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn balanced_loads_its_profile_when_the_map_is_set() {
        let (rt, root) = host("balanced", 2, "rows");
        let file = write_profile("balanced", 8);
        let f = file.display().to_string();
        // the file named in the map, read once for two rules; a bare rule takes the variable's
        let map = format!("blk.0=balanced:{f};blk.1=balanced:{f}@1;balanced");
        rt.set_map_with_profile(&map, "test", &Some(f.clone())).unwrap();
        let got = loaded(&rt);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|p| p.as_ref().is_some_and(|p| p.model.n_expert == 8)));
        assert!(Arc::ptr_eq(got[0].as_ref().unwrap(), got[1].as_ref().unwrap()));
        assert!(rt.first_time(BALANCED_FALLBACK), "a profile for every rule: no fallback warning");
        // a profile of another model stops the tensor's load, naming the file and the tensor
        let t = "blk.0.ffn_up_exps.weight";
        let err = rt.settings().map.resolve(Some(0), 16, t).unwrap_err().to_string();
        assert!(
            err.contains(&format!("routing profile {f} was recorded on a model with 8 experts; this one has 16 (checking {t})")),
            "{err}"
        );
        assert!(err.contains(&format!("(at characters 16-{}: \"{f}\")", 15 + f.len())), "{err}");
        assert!(rt.settings().map.check_experts(16).is_err() && rt.settings().map.check_experts(8).is_ok());
        fs::remove_file(file).unwrap();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn unreadable_profiles_are_map_errors_naming_the_file() {
        let (rt, root) = host("badprofile", 2, "rows");
        let err = rt.set_map_with_profile("balanced:/nonexistent/p.json@0", "test", &None).unwrap_err().to_string();
        assert!(
            err.contains("cannot read routing profile /nonexistent/p.json: No such file or directory")
                && err.ends_with("(at characters 10-28: \"/nonexistent/p.json\")"),
            "{err}"
        );
        let junk = std::env::temp_dir().join(format!("numa-moe-config-junk-{}.json", std::process::id()));
        fs::write(&junk, "{\"numa_moe_routing\": 1}").unwrap();
        let j = junk.display().to_string();
        let err = rt.set_map_with_profile("rows;blk.2=balanced", "test", &Some(j.clone())).unwrap_err().to_string();
        assert!(err.contains(&format!("{ROUTING_PROFILE_ENV}: routing profile {j}: not a numa-moe routing file")), "{err}");
        // nothing changed
        assert_eq!(rt.settings().map.render(), "rows");
        fs::remove_file(junk).unwrap();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bare_balanced_without_a_profile_is_block_with_one_warning() {
        let (rt, root) = host("fallback", 2, "rows");
        let mut map = ExpertMap::parse("blk.0-3=balanced;rows").unwrap();
        let note = load_profiles(&mut map, &None).unwrap().unwrap();
        assert!(note.contains("without a routing profile") && note.contains("as \"block\" instead"), "{note}");
        assert!(rt.first_time(BALANCED_FALLBACK));
        let (rt, root2) = host("fallback2", 2, "rows");
        rt.set_map_with_profile("balanced", "test", &None).unwrap();
        assert!(!rt.first_time(BALANCED_FALLBACK), "warned when the map was set");
        assert_eq!(loaded(&rt), vec![None]);
        fs::remove_dir_all(root).unwrap();
        fs::remove_dir_all(root2).unwrap();
    }

    #[test]
    fn a_kernel_refusing_page_queries_turns_verification_off_once() {
        let (rt, root) = host("noquery", 2, "rows");
        rt.kernel.set(KernelSupport { bind: Ok(()), page_query: Err(SysError::from_errno("move_pages", libc::ENOSYS)) }).unwrap();
        assert!(rt.binds());
        assert!(!rt.settings().verify);
        assert!(!rt.first_time("kernel-page-query"), "the warning was given");
        assert_eq!(rt.unbound_reason(), None);
        fs::remove_dir_all(root).unwrap();
    }
}
