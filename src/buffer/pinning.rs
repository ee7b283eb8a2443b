//! Pinning: expert memory registered with a GPU backend as pinned host memory.
//!
//! With a GPU in the process, ggml's scheduler offloads large batches (prefill) to it and
//! copies the weights of the ops it offloads, from wherever they live in host memory: numa-moe's
//! standard-layout buffers are host buffers in ggml's layout, as stock's would be, so this keeps
//! working. A copy from pinned memory runs at the link's speed, from pageable memory through a
//! staging buffer. Where a backend offers `ggml_backend_register_host_buffer` (ggml-cuda at the
//! pin), each placed tensor is registered right after its extents are bound, so the pages the
//! registration faults in land on their planned nodes, and unregistered before the memory is
//! unmapped (the ffi layer makes both calls). Repacked layouts are never copied to a GPU (their
//! buffer is not a host buffer), so they are not registered.
//!
//! This module keeps what was registered and words what the user is told.

use parking_lot::Mutex;

use crate::ggml::HostRegistrar;
use crate::topology::format_gib;

/// One buffer's registrations.
#[derive(Debug, Default)]
pub struct Pinning {
    registrar: HostRegistrar,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// (offset, bytes) of each tensor the backend registered.
    registered: Vec<(usize, usize)>,
    /// Tensors (and their bytes) the backend declined.
    declined: (usize, u64),
}

impl Pinning {
    pub fn new(registrar: HostRegistrar) -> Self {
        Pinning { registrar, state: Mutex::new(State::default()) }
    }

    /// The registrar, where a backend registers host memory.
    pub fn registrar(&self) -> Option<&HostRegistrar> {
        self.registrar.available().then_some(&self.registrar)
    }

    /// Whether the tensor at `offset` is registered.
    pub fn is_registered(&self, offset: usize) -> bool {
        self.state.lock().registered.iter().any(|&(o, _)| o == offset)
    }

    /// Records the backend's answer for the `bytes` at `offset`.
    pub fn record(&self, offset: usize, bytes: usize, registered: bool) {
        let mut s = self.state.lock();
        if registered {
            s.registered.push((offset, bytes));
        } else {
            s.declined.0 += 1;
            s.declined.1 += bytes as u64;
        }
    }

    /// The offsets of every registered tensor, forgotten (the caller unregisters them).
    pub fn take_registered(&self) -> Vec<usize> {
        self.state.lock().registered.drain(..).map(|(o, _)| o).collect()
    }

    /// The load report's line on pinning: `None` where no GPU backend is in the process.
    /// `cuda_switch_off`: ggml-cuda's own switch for registering (GGML_CUDA_REGISTER_HOST) is
    /// not set, which a backend that declined is then told to need.
    pub fn report(&self, cuda_switch_off: bool) -> Option<String> {
        let s = self.state.lock();
        let registered: u64 = s.registered.iter().map(|&(_, b)| b as u64).sum();
        report_line(&self.registrar, s.registered.len(), registered, s.declined, cuda_switch_off)
    }
}

/// The wording of [`Pinning::report`] (pure, for tests).
fn report_line(
    r: &HostRegistrar,
    registered: usize,
    registered_bytes: u64,
    declined: (usize, u64),
    cuda_switch_off: bool,
) -> Option<String> {
    const OFFLOAD: &str = "copies of them to the GPU for the batches it offloads";
    if let Some(backend) = r.backend.as_deref().filter(|_| r.available()) {
        if declined.0 == 0 && registered == 0 {
            return None;
        }
        if declined.0 == 0 {
            return Some(format!(
                "numa-moe: {registered} expert tensors ({}) registered with {backend} as pinned host memory: {OFFLOAD} run at pinned speed",
                format_gib(registered_bytes)
            ));
        }
        let hint = if cuda_switch_off { " (ggml-cuda registers host memory only when GGML_CUDA_REGISTER_HOST is set)" } else { "" };
        return Some(format!(
            "numa-moe: {backend} did not register {} of {} expert tensors ({}) as pinned host memory{hint}: {OFFLOAD} run from pageable memory",
            declined.0,
            declined.0 + registered,
            format_gib(declined.1)
        ));
    }
    r.gpu_without.as_deref().map(|dev| {
        format!(
            "numa-moe: {dev} cannot register expert memory as pinned host memory (its backend offers no ggml_backend_register_host_buffer at this llama.cpp): {OFFLOAD} run from pageable memory"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registrar(backend: Option<&str>, gpu_without: Option<&str>) -> HostRegistrar {
        HostRegistrar::new(backend.map(String::from), gpu_without.map(String::from), None, None)
    }

    extern "C" fn register(_: *mut std::ffi::c_void, _: usize) -> bool {
        true
    }

    extern "C" fn unregister(_: *mut std::ffi::c_void) {}

    fn cuda() -> HostRegistrar {
        HostRegistrar::new(Some("CUDA".into()), None, Some(register), Some(unregister))
    }

    #[test]
    fn no_gpu_says_nothing() {
        assert_eq!(report_line(&registrar(None, None), 0, 0, (0, 0), true), None);
    }

    #[test]
    fn a_gpu_without_registration_is_named() {
        let line = report_line(&registrar(None, Some("Vulkan0")), 0, 0, (0, 0), true).unwrap();
        assert!(line.starts_with("numa-moe: Vulkan0 cannot register expert memory as pinned host memory"), "{line}");
        assert!(line.contains("ggml_backend_register_host_buffer") && line.contains("pageable"), "{line}");
    }

    #[test]
    fn a_backend_name_without_its_functions_is_not_a_registrar() {
        // available() needs both functions: a name alone reports the GPU without one
        let line = report_line(&registrar(Some("CUDA"), Some("Vulkan0")), 0, 0, (0, 0), false).unwrap();
        assert!(line.contains("Vulkan0 cannot"), "{line}");
    }

    #[test]
    fn registered_tensors_are_counted_and_handed_back_for_unregistering() {
        let p = Pinning::new(cuda());
        assert!(p.registrar().is_some());
        p.record(0, 3 << 20, true);
        p.record(4 << 20, 1 << 20, true);
        assert!(p.is_registered(4 << 20) && !p.is_registered(1));
        let line = p.report(true).unwrap();
        assert!(line.starts_with("numa-moe: 2 expert tensors (") && line.contains("registered with CUDA as pinned host memory"), "{line}");
        assert_eq!(p.take_registered(), vec![0, 4 << 20]);
        assert!(p.take_registered().is_empty(), "each registration is handed back once");
    }

    #[test]
    fn a_backend_that_declines_says_so_with_cudas_switch() {
        let p = Pinning::new(cuda());
        p.record(0, 1 << 20, false);
        p.record(1 << 20, 1 << 20, true);
        let line = p.report(true).unwrap();
        assert!(line.contains("CUDA did not register 1 of 2 expert tensors"), "{line}");
        assert!(line.contains("GGML_CUDA_REGISTER_HOST"), "{line}");
        assert!(!p.report(false).unwrap().contains("GGML_CUDA_REGISTER_HOST"));
    }

    #[test]
    fn a_registrar_with_nothing_placed_says_nothing() {
        assert_eq!(Pinning::new(cuda()).report(true), None);
    }
}
