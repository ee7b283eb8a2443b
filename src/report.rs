//! What numa-moe tells the user about placement: the load report (what went where), the
//! result of the page check, and the wording of extents and bindings in messages.

use std::sync::Arc;

use crate::buffer::PlacedTensor;
use crate::config::Runtime;
use crate::memory::PageReport;
use crate::placement::{self, Binding, TensorPlan};
use crate::topology::format_gib;

pub fn short_name(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

pub fn describe_binding(b: &Binding) -> String {
    match b {
        Binding::Node(n) => format!("node {n}"),
        Binding::Interleave(ns) => format!("nodes {} (interleaved)", crate::topology::render_cpu_list(ns)),
    }
}

/// "expert 3, row 17" for a byte offset into a tensor.
pub fn describe_extent(plan: &TensorPlan, offset: u64) -> String {
    let eb = plan.tensor.expert_bytes().max(1);
    let e = offset / eb;
    let row = (offset % eb) / plan.tensor.row_bytes.max(1);
    format!("expert {e}, row {row}")
}

/// ", in CPU_REPACK's layouts (q4_K in 8-row groups)" where the tensors hold repacked layouts.
fn repacked_note(placed: &[Arc<PlacedTensor>]) -> String {
    let mut kinds: Vec<(String, u64)> = Vec::new();
    for p in placed.iter().filter(|p| p.plan.tensor.row_group > 1) {
        let k = (p.plan.tensor.type_name.clone(), p.plan.tensor.row_group);
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        return String::new();
    }
    let list: Vec<String> = kinds.iter().map(|(t, g)| format!("{t} in {g}-row groups")).collect();
    format!(", repacked for CPU_REPACK's kernels ({})", list.join(", "))
}

/// The load report of one buffer's placed tensors: totals, each node's share, and every
/// tensor not placed as planned.
pub fn placement(rt: &Runtime, placed: &[Arc<PlacedTensor>]) -> Vec<String> {
    if placed.is_empty() {
        return Vec::new();
    }
    let s = rt.settings();
    let (matrices, experts): (Vec<_>, Vec<_>) = placed.iter().partition(|p| p.is_dense());
    let total: u64 = experts.iter().map(|p| p.plan.tensor.bytes()).sum();
    let mut what = format!("{} expert tensors ({})", experts.len(), format_gib(total));
    if !matrices.is_empty() {
        let mut by: std::collections::BTreeMap<crate::weights::Category, u64> = Default::default();
        for p in &matrices {
            *by.entry(p.category).or_default() += p.plan.tensor.bytes();
        }
        let sum: u64 = by.values().sum();
        let parts: Vec<String> = by.iter().map(|(c, b)| format!("{c} {}", format_gib(*b))).collect();
        what += &format!(" and {} weight matrices ({}: {})", matrices.len(), format_gib(sum), parts.join(", "));
    }
    let mut lines = vec![format!(
        "numa-moe: {what} placed by map \"{}\" ({}){}{}",
        s.map.render(),
        s.map_origin,
        rt.unbound_reason().map(|r| format!(" ({r})")).unwrap_or_default(),
        repacked_note(placed)
    )];
    let loads = placement::node_loads(&rt.topology, &placed.iter().map(|p| p.plan.clone()).collect::<Vec<_>>());
    let mut parts = Vec::new();
    for l in loads.iter().filter(|l| l.bytes > 0) {
        let example = placed
            .iter()
            .filter(|p| !p.is_dense())
            .chain(placed.iter().filter(|p| p.is_dense()))
            .find(|p| p.plan.pieces().iter().any(|x| x.node == l.node));
        let share =
            example.map(|p| format!(", {}: {}", short_name(&p.plan.tensor.name), p.plan.describe_share(l.node))).unwrap_or_default();
        parts.push(format!("node {}: {} ({} tensors{share})", l.node, format_gib(l.bytes), l.tensors));
    }
    lines.push(format!("numa-moe: {}", parts.join(" | ")));
    for p in placed {
        if let Some(d) = p.degraded.lock().as_ref() {
            lines.push(format!("numa-moe: {} not placed as planned: {d}", p.plan.tensor.name));
        }
    }
    lines
}

/// The line that reports the load-time page check (`stride`: every stride-th page seen).
pub fn page_check(r: &PageReport, stride: usize) -> (bool, String) {
    let scale = stride as u64 * crate::sys::page_size() as u64;
    let nodes: Vec<String> = r.per_node.iter().map(|(n, c)| format!("node {n} {}", format_gib(c * scale))).collect();
    let sample = if stride > 1 { format!(" (every {stride}th page)") } else { String::new() };
    if r.misplaced == 0 {
        (
            true,
            format!(
                "numa-moe: verified {} resident pages{sample} of expert memory ({}): none off its planned node",
                r.resident(),
                nodes.join(", ")
            ),
        )
    } else {
        let (at, want, got) = r.first_misplaced.clone().unwrap_or_default();
        (
            false,
            format!(
                "numa-moe: warning: {} of {} expert pages{sample} are off their planned node ({}); the first is {at}: planned node {want}, found on node {got}",
                r.misplaced,
                r.resident(),
                nodes.join(", ")
            ),
        )
    }
}
