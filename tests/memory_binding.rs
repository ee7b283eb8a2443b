//! Memory policy and affinity on this machine (real syscalls; run single-threaded, since
//! they change process state). Multi-node behaviour is proven in the QEMU guests.

use numa_moe::memory::{page_report, Region, Strictness};
use numa_moe::placement::Binding;
use numa_moe::sys::{self, SysErrorKind};
use numa_moe::topology::Topology;

fn first_memory_node() -> u32 {
    let t = Topology::from_host().unwrap();
    t.nodes().iter().find(|n| n.has_memory() && n.mem_allowed).unwrap().id
}

#[test]
fn bound_pages_land_on_their_node_whoever_touches_them() {
    let node = first_memory_node();
    let len = 64 << 20;
    let r = Region::new(len, 4096).unwrap();
    r.bind(0..len, &Binding::Node(node), Strictness::Bind).unwrap();
    // touch from another thread: placement must not depend on first touch
    let addr = r.as_ptr() as usize;
    std::thread::spawn(move || {
        // SAFETY (test): the region outlives the thread, which is joined below.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0x5A, len) }
    })
    .join()
    .unwrap();
    let rep = page_report(r.as_ptr() as usize, len, |_| Some(node)).unwrap();
    assert_eq!(rep.resident(), (len / 4096) as u64, "{rep:?}");
    assert_eq!(rep.misplaced, 0);
    assert_eq!(rep.per_node.get(&node).copied(), Some((len / 4096) as u64));
    // get_mempolicy agrees with move_pages, and reports the bind policy
    assert_eq!(sys::node_of_addr(r.as_ptr()).unwrap(), node);
    let (mode, nodes) = sys::policy_of_addr(r.as_ptr()).unwrap();
    assert_eq!(mode, libc::MPOL_BIND);
    assert_eq!(nodes.nodes(), vec![node]);
}

#[test]
fn untouched_pages_are_absent_and_bind_needs_no_touch() {
    let r = Region::new(1 << 20, 4096).unwrap();
    r.bind(0..1 << 20, &Binding::Node(first_memory_node()), Strictness::Bind).unwrap();
    let rep = page_report(r.as_ptr() as usize, 1 << 20, |_| None).unwrap();
    assert_eq!(rep.resident(), 0);
    assert_eq!(rep.absent, 256);
}

#[test]
fn binding_to_a_node_that_does_not_exist_is_einval() {
    let r = Region::new(1 << 20, 4096).unwrap();
    let e = r.bind(0..1 << 20, &Binding::Node(63), Strictness::Bind).unwrap_err();
    assert_eq!(e.kind, SysErrorKind::InvalidArgument);
    assert_eq!(e.errno, libc::EINVAL);
    assert_eq!(e.to_string(), "mbind failed: Invalid argument (errno 22)");
    // and the memory is still usable with the default policy
    r.fill(0, 1 << 20, 3);
    let mut b = [0u8; 1];
    r.read(4095, &mut b);
    assert_eq!(b[0], 3);
}

#[test]
fn interleave_and_preferred_are_accepted() {
    let node = first_memory_node();
    let r = Region::new(8 << 20, 4096).unwrap();
    r.bind(0..4 << 20, &Binding::Interleave(vec![node]), Strictness::Bind).unwrap();
    r.bind(4 << 20..8 << 20, &Binding::Node(node), Strictness::Preferred).unwrap();
    r.fill(0, 8 << 20, 1);
    let rep = page_report(r.as_ptr() as usize, 8 << 20, |_| Some(node)).unwrap();
    assert_eq!(rep.misplaced, 0);
    assert_eq!(sys::policy_of_addr(r.as_ptr()).unwrap().0, libc::MPOL_INTERLEAVE);
    assert_eq!(sys::policy_of_addr(r.as_ptr().wrapping_add(4 << 20)).unwrap().0, libc::MPOL_PREFERRED);
}

#[test]
fn page_rule_a_page_belongs_to_the_extent_holding_its_first_byte() {
    // binding an unaligned range binds only pages whose first byte is inside it
    let r = Region::new(4 * 4096, 4096).unwrap();
    r.bind(100..2 * 4096 + 100, &Binding::Node(first_memory_node()), Strictness::Bind).unwrap();
    assert_eq!(sys::policy_of_addr(r.as_ptr()).unwrap().0, libc::MPOL_DEFAULT);
    assert_eq!(sys::policy_of_addr(r.as_ptr().wrapping_add(4096)).unwrap().0, libc::MPOL_BIND);
    assert_eq!(sys::policy_of_addr(r.as_ptr().wrapping_add(2 * 4096)).unwrap().0, libc::MPOL_BIND);
    assert_eq!(sys::policy_of_addr(r.as_ptr().wrapping_add(3 * 4096)).unwrap().0, libc::MPOL_DEFAULT);
}

#[test]
fn affinity_can_be_narrowed_and_restored_and_getcpu_follows() {
    let t = Topology::from_host().unwrap();
    let before = sys::thread_affinity().unwrap();
    let cpu = before[before.len() - 1];
    sys::set_thread_affinity(&[cpu]).unwrap();
    assert_eq!(sys::thread_affinity().unwrap(), vec![cpu]);
    let (now, node) = sys::getcpu().unwrap();
    assert_eq!(now, cpu);
    assert_eq!(t.node_of_cpu(cpu), Some(node));
    sys::set_thread_affinity(&before).unwrap();
    assert_eq!(sys::thread_affinity().unwrap(), before);
}

#[test]
fn mems_allowed_lists_a_memory_node() {
    assert!(sys::mems_allowed().unwrap().contains(first_memory_node()));
}

#[test]
fn sampled_reports_look_at_every_nth_page() {
    let node = first_memory_node();
    let r = Region::new(16 << 20, 4096).unwrap();
    r.bind(0..16 << 20, &Binding::Node(node), Strictness::Bind).unwrap();
    r.fill(0, 16 << 20, 1);
    let all = numa_moe::memory::page_report_sampled(r.as_ptr() as usize, 16 << 20, 1, |_| Some(node)).unwrap();
    let some = numa_moe::memory::page_report_sampled(r.as_ptr() as usize, 16 << 20, 7, |_| Some(node)).unwrap();
    assert_eq!(all.resident(), 4096);
    assert_eq!(some.resident(), 4096_u64.div_ceil(7));
    assert_eq!(some.misplaced, 0);
    // a planned node the pages are not on is seen in the sample too
    let wrong = numa_moe::memory::page_report_sampled(r.as_ptr() as usize, 16 << 20, 7, |_| Some(node + 1)).unwrap();
    assert_eq!(wrong.misplaced, some.resident());
}

#[test]
fn mems_allowed_from_proc_status_agrees_with_the_kernel() {
    // topology reads mems_allowed from /proc/self/status so that a refused get_mempolicy
    // (a container's seccomp profile) loses nothing: both must say the same
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(numa_moe::topology::parse_mems_allowed(&status), Some(sys::mems_allowed().unwrap().nodes()));
}

#[test]
fn the_budget_sources_read_this_host() {
    let node = first_memory_node();
    let sources = numa_moe::topology::MemorySources::host();
    let before = sources.node_free(node).expect("the host reports free memory per node");
    let total = Topology::from_host().unwrap().node(node).unwrap().total_bytes;
    assert!(before > 0 && before <= total, "{before} free of {total}");
    // bound and touched pages are what the budget counts as already placed (no longer free,
    // so not to be counted twice). (Free memory itself moves with every other process here.)
    let len = 64 << 20;
    let r = Region::new(len, 4096).unwrap();
    r.bind(0..len, &Binding::Node(node), Strictness::Bind).unwrap();
    r.fill(0, len, 1);
    let placed = sources.placed_resident();
    assert!(placed.get(&node).copied().unwrap_or(0) >= len as u64, "{placed:?}");
}
