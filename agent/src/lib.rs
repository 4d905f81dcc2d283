//! hami node agent: loads the eBPF programs that trace the NVIDIA driver's ioctls and the CUDA
//! driver library's calls, attributes GPU memory and compute to containers, and exports the result
//! (Prometheus metrics and a JSON snapshot).
//!
//! Layers: [`attribution`], [`cgroup::identify`], [`snapshot`] and [`metrics`] are pure;
//! [`loader`] (aya), [`kernel`] (BTF, device numbers), [`cgroup::CgroupIndex`] and [`service`] are
//! the I/O edges; [`config`] is the one configuration structure.

pub mod attribution;
pub mod cgroup;
pub mod config;
pub mod deviceplugin;
pub mod error;
pub mod kernel;
pub mod loader;
pub mod metrics;
pub mod regions;
pub mod registration;
pub mod service;
pub mod snapshot;

pub use error::{AgentError, Result};
