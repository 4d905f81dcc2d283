//! HAMi's NVIDIA resource names and the scheduler name.
//!
//! Source: `reference/hami.md` §2.1 (HAMi `charts/hami/values.yaml`, `pkg/scheduler/config/config.go`).
//! The names are configurable in HAMi (device config map, `nvidia.resource*Name`), so code should read
//! them from a [`ResourceNames`] and use the consts only as defaults.

use serde::{Deserialize, Serialize};

/// Count of distinct **physical** GPUs for a container (`nvidia.com/gpu`). On a node, allocatable =
/// GPUs × `deviceSplitCount`.
pub const GPU: &str = "nvidia.com/gpu";

/// Device memory per GPU, MiB (`nvidia.com/gpumem`).
pub const GPU_MEMORY: &str = "nvidia.com/gpumem";

/// Device memory per GPU as a percent (1..=100) of each GPU's schedulable memory
/// (`nvidia.com/gpumem-percentage`); ignored when `nvidia.com/gpumem` is set.
pub const GPU_MEMORY_PERCENTAGE: &str = "nvidia.com/gpumem-percentage";

/// Compute per GPU, percent of its SMs, 0..=100 (`nvidia.com/gpucores`; 100 = exclusive).
pub const GPU_CORES: &str = "nvidia.com/gpucores";

/// Task priority, `0` (high) or `1` (low) (`nvidia.com/priority`); becomes `CUDA_TASK_PRIORITY`.
pub const GPU_PRIORITY: &str = "nvidia.com/priority";

/// The scheduler name pods get from the webhook, and the kube-scheduler profile name (`hami-scheduler`).
pub const SCHEDULER_NAME: &str = "hami-scheduler";

/// The NVIDIA resource names in use. Field names in serialized form are HAMi's device-config keys
/// (`resourceCountName`, …) so a HAMi `nvidia:` config section deserializes directly; missing keys take
/// HAMi's defaults and unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceNames {
    /// Count of physical GPUs (default `nvidia.com/gpu`).
    #[serde(rename = "resourceCountName")]
    pub gpu: String,
    /// Memory per GPU, MiB (default `nvidia.com/gpumem`).
    #[serde(rename = "resourceMemoryName")]
    pub memory: String,
    /// Memory per GPU, percent (default `nvidia.com/gpumem-percentage`).
    #[serde(rename = "resourceMemoryPercentageName")]
    pub memory_percentage: String,
    /// Cores per GPU, percent of SMs (default `nvidia.com/gpucores`).
    #[serde(rename = "resourceCoreName")]
    pub cores: String,
    /// Task priority (default `nvidia.com/priority`).
    #[serde(rename = "resourcePriorityName")]
    pub priority: String,
}

impl Default for ResourceNames {
    /// HAMi's defaults.
    fn default() -> Self {
        Self {
            gpu: GPU.to_owned(),
            memory: GPU_MEMORY.to_owned(),
            memory_percentage: GPU_MEMORY_PERCENTAGE.to_owned(),
            cores: GPU_CORES.to_owned(),
            priority: GPU_PRIORITY.to_owned(),
        }
    }
}

impl ResourceNames {
    /// Whether `name` is one of these resources (a container asking for any of them takes part in
    /// HAMi scheduling).
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        [
            &self.gpu,
            &self.memory,
            &self.memory_percentage,
            &self.cores,
            &self.priority,
        ]
        .into_iter()
        .any(|n| n == name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    #[test]
    fn defaults_and_hami_config_keys() {
        let d = ResourceNames::default();
        assert_eq!(d.gpu, "nvidia.com/gpu");
        assert!(d.contains("nvidia.com/gpumem-percentage"));
        assert!(!d.contains("nvidia.com/gpumemory"));
        let cfg: ResourceNames = serde_json::from_str(
            r#"{"resourceCountName":"hami.io/gpu","resourceMemoryName":"hami.io/gpumem","defaultMemory":0}"#,
        )
        .unwrap();
        assert_eq!(cfg.gpu, "hami.io/gpu");
        assert_eq!(cfg.memory, "hami.io/gpumem");
        assert_eq!(cfg.cores, GPU_CORES);
        let back: ResourceNames = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}
