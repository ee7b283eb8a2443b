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

use std::collections::BTreeMap;
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};

use crate::expert_map::{ExpertMap, MapError, Policy};
use crate::topology::Topology;

pub const MAP_ENV: &str = "NUMA_MOE_EXPERT_MAP";

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
pub struct Runtime {
    pub topology: Topology,
    settings: RwLock<Settings>,
    /// Bytes planned per node by live buffers (the memory budget).
    reserved: Mutex<BTreeMap<u32, u64>>,
    /// Warnings already printed, so each is printed once.
    warned: Mutex<Vec<String>>,
    /// Map errors found while llama.cpp probes tensors; the next allocation fails with them.
    pending_error: Mutex<Option<String>>,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

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
    fn from_env() -> Result<Runtime, String> {
        let topology = Topology::detect().map_err(|e| e.to_string())?;
        // A bad setting must stop the model load with its message, not disable numa-moe
        // quietly: it becomes the pending error that fails the first expert allocation.
        let mut problems = Vec::new();
        let (map, map_origin) = match std::env::var(MAP_ENV) {
            Ok(text) if !text.trim().is_empty() => match ExpertMap::parse(&text).and_then(|m| m.check_nodes(&topology).map(|()| m)) {
                Ok(map) => (map, MAP_ENV.to_string()),
                Err(e) => {
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
        Ok(Runtime {
            topology,
            settings: RwLock::new(settings),
            reserved: Mutex::new(BTreeMap::new()),
            warned: Mutex::new(Vec::new()),
            pending_error: Mutex::new(if problems.is_empty() { None } else { Some(problems.join("; ")) }),
        })
    }

    /// The error that will fail the next expert allocation, if any.
    pub fn pending_error(&self) -> Option<String> {
        self.pending_error.lock().clone()
    }

    pub fn settings(&self) -> Settings {
        self.settings.read().clone()
    }

    /// Replaces the map after checking it against this machine.
    pub fn set_map(&self, text: &str, origin: &str) -> Result<(), MapError> {
        let map = ExpertMap::parse(text)?;
        map.check_nodes(&self.topology)?;
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
    pub fn binds(&self) -> bool {
        self.topology.is_host() || self.settings.read().force_bind
    }

    pub fn set_on_error(&self, on_error: OnError) {
        self.settings.write().on_error = on_error;
    }

    /// Whether the map places anything at all on this machine (false: stock behaviour).
    pub fn placement_active(&self) -> bool {
        let s = self.settings.read();
        let one_node = self.topology.compute_nodes().len() <= 1;
        !s.map.rules.iter().all(|r| match &r.body {
            crate::expert_map::Body::Policy { policy: Policy::Off, .. } => true,
            crate::expert_map::Body::Policy { policy: Policy::Auto, .. } => one_node,
            _ => false,
        })
    }

    /// Reserves `bytes` on `node` against its budget; false if that would overfill it.
    pub fn reserve(&self, node: u32, bytes: u64) -> Result<(), (u64, u64)> {
        let budget = self.topology.node(node).map_or(0, |n| n.budget_bytes());
        let mut r = self.reserved.lock();
        let cur = r.entry(node).or_default();
        if *cur + bytes > budget && self.topology.is_host() {
            return Err((*cur + bytes, budget));
        }
        *cur += bytes;
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

    pub fn set_pending_error(&self, msg: String) {
        let mut p = self.pending_error.lock();
        if p.is_none() {
            *p = Some(msg);
        }
    }

    pub fn take_pending_error(&self) -> Option<String> {
        self.pending_error.lock().take()
    }
}

/// The process runtime, created from the environment on first use.
pub fn runtime() -> Result<&'static Runtime, String> {
    RUNTIME.get_or_init(Runtime::from_env).as_ref().map_err(|e| e.clone())
}
