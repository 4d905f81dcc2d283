//! The device model shared by the scheduler and the agent: one node's GPUs as the agent registers them.
//!
//! Units: memory in MiB, compute in percent of a GPU's SMs (100 = the whole GPU, as HAMi's `devcore`),
//! host CPU in milli-vCPU. The model mirrors HAMi's `DeviceInfo` (`pkg/device/devices.go`, see
//! `reference/hami.md` §1.2) and adds the fields HAMi keeps elsewhere (SM count, NVLink peers, scaling).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// HAMi's default `deviceSplitCount` in the Helm chart: at most this many containers share one GPU.
pub const DEFAULT_SPLIT_COUNT: u32 = 10;

/// Compute capacity of one unscaled GPU, in percent of its SMs.
pub const FULL_GPU_CORES: u32 = 100;

/// Operating mode of a GPU, as HAMi's register annotation `mode` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceMode {
    /// Shared through the interceptor (HAMi-core style): memory and SM limits per container.
    #[default]
    HamiCore,
    /// Partitioned by NVIDIA MIG.
    Mig,
}

/// One physical GPU on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// NVIDIA UUID, e.g. `GPU-6f0c…`. Unique in the cluster.
    pub uuid: String,
    /// NVML index on its node (0-based).
    pub index: u32,
    /// Model name as registered, e.g. `NVIDIA-NVIDIA A100-SXM4-80GB` or, in the trace, `V100M32`.
    pub model: String,
    /// Physical device memory, MiB.
    pub memory_mib: u64,
    /// Streaming multiprocessors on the device (0 when unknown).
    pub sm_count: u32,
    /// NUMA node of the GPU's PCI device, `None` when the platform reports none.
    pub numa: Option<u32>,
    /// NVLink peers on the same node: peer GPU index → number of NVLink links between the pair.
    pub nvlink_peers: BTreeMap<u32, u32>,
    /// Whether the device plugin reports the device healthy. Unhealthy devices are never chosen.
    pub healthy: bool,
    /// `deviceSplitCount`: the most containers that may share this GPU at once (its slots).
    pub split_count: u32,
    /// `deviceMemoryScaling`: schedulable memory = physical × this (overcommit when > 1).
    pub memory_scaling: f64,
    /// `deviceCoreScaling`: schedulable cores = 100 × this.
    pub core_scaling: f64,
    /// Operating mode.
    pub mode: DeviceMode,
}

impl GpuDevice {
    /// A healthy, unscaled GPU with HAMi's default split count and no topology information.
    #[must_use]
    pub fn new(uuid: impl Into<String>, index: u32, model: impl Into<String>, memory_mib: u64) -> Self {
        Self {
            uuid: uuid.into(),
            index,
            model: model.into(),
            memory_mib,
            sm_count: 0,
            numa: None,
            nvlink_peers: BTreeMap::new(),
            healthy: true,
            split_count: DEFAULT_SPLIT_COUNT,
            memory_scaling: 1.0,
            core_scaling: 1.0,
            mode: DeviceMode::HamiCore,
        }
    }

    /// Memory the scheduler may hand out, MiB: `floor(memory_mib × memory_scaling)` (HAMi's `devmem`).
    #[must_use]
    pub fn schedulable_memory_mib(&self) -> u64 {
        scale(self.memory_mib, self.memory_scaling)
    }

    /// Compute the scheduler may hand out, percent of SMs: `floor(100 × core_scaling)` (HAMi's `devcore`).
    #[must_use]
    pub fn schedulable_cores(&self) -> u32 {
        u32::try_from(scale(u64::from(FULL_GPU_CORES), self.core_scaling)).unwrap_or(u32::MAX)
    }
}

/// `floor(value × factor)`, saturating; a non-finite or negative factor yields 0.
fn scale(value: u64, factor: f64) -> u64 {
    if !factor.is_finite() || factor <= 0.0 {
        return 0;
    }
    // Memory sizes are far below 2^53, so the f64 product is exact enough; `as` saturates.
    (value as f64 * factor).floor() as u64
}

/// One node's schedulable inventory: host CPU and memory (from the Node's allocatable) and its GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// Kubernetes node name.
    pub name: String,
    /// Allocatable host CPU, milli-vCPU.
    pub cpu_milli: u64,
    /// Allocatable host memory, MiB.
    pub memory_mib: u64,
    /// GPUs on the node, in index order.
    pub gpus: Vec<GpuDevice>,
}
