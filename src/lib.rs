//! numa-moe: NUMA placement of Mixture-of-Experts weights for llama.cpp/ggml.
//!
//! Layers, each knowing only those below it:
//! - [`sys`]: raw syscalls (mbind, get_mempolicy, move_pages, affinity, getcpu)
//! - [`topology`]: what the machine is (hwlocality + sysfs)
//! - [`expert_map`]: the `--numa-expert-map` language
//! - [`placement`]: pure planning of bytes, compute pieces and workers
//! - [`memory`]: NUMA-placed allocations and verification of where pages are
//! - [`config`]: what the user asked for, process-wide
//! - [`error`]: the one error type, with the C ABI's stable codes
//! - [`ggml`]: bindgen views of the pinned ggml structs; the only file that dereferences them
//! - [`buffer`]: the ggml buffer type's memory: budget, binding, replicas
//! - [`compute`]: node-bound kernels on ggml-cpu's threads (the routed mul_mat_id), the
//!   work-buffer protocol and the worker layout
//! - [`gguf`]: the tensor table of a model file, for `numa-moe plan`
//! - [`shapes`]: built-in tensor tables of published models (`numa-moe plan --shape`)
//! - [`footprint`]: the bytes a decoded token reads, by category and node, under a placement
//! - [`weights`]: what a weight tensor is for (routed experts, attention, ...), by name
//! - [`ffi`]: the C ABI

pub mod buffer;
pub mod compute;
pub mod config;
pub mod error;
pub mod expert_map;
pub mod ffi;
pub mod footprint;
pub mod ggml;
pub mod gguf;
pub mod json;
pub mod log;
pub mod memory;
pub mod placement;
pub mod report;
pub mod routing;
pub mod shapes;
pub mod sys;
pub mod topology;
pub mod weights;

pub use ffi::NumaMoeResult;
