//! Pod device requests, per container, as the scheduler sees them after the webhook normalised them.
//!
//! Semantics follow HAMi (`reference/hami.md` §2): `nvidia.com/gpu` is a count of **distinct physical**
//! GPUs, memory is MiB per GPU or a percent of each GPU's schedulable memory, cores are percent of SMs per
//! GPU, and `cores == 100` on a 100-core GPU asks for the GPU exclusively.

use serde::{Deserialize, Serialize};

/// Device memory asked for per GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemoryRequest {
    /// A fixed amount, MiB (`nvidia.com/gpumem`).
    Mib(u64),
    /// Percent (1..=100) of each chosen GPU's schedulable memory (`nvidia.com/gpumem-percentage`),
    /// resolved as `floor(total × pct / 100)`, multiplying first (peer bug C09).
    Percent(u32),
}

impl MemoryRequest {
    /// MiB this request takes on a GPU whose schedulable memory is `total_mib`.
    #[must_use]
    pub fn resolve(self, total_mib: u64) -> u64 {
        match self {
            Self::Mib(mib) => mib,
            Self::Percent(pct) => total_mib.saturating_mul(u64::from(pct)) / 100,
        }
    }
}

impl Default for MemoryRequest {
    /// HAMi's default when neither `gpumem` nor `gpumem-percentage` is given: the whole GPU's memory.
    fn default() -> Self {
        Self::Percent(100)
    }
}

/// Which GPUs a request may use: HAMi's `nvidia.com/use-gputype` / `nouse-gputype` (case-insensitive
/// substring of the registered model) and `use-gpuuuid` / `nouse-gpuuuid` (exact UUIDs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceSelector {
    /// If not empty, the GPU model must contain one of these (case-insensitive).
    pub use_types: Vec<String>,
    /// The GPU model must contain none of these (case-insensitive).
    pub nouse_types: Vec<String>,
    /// If not empty, the GPU UUID must be one of these.
    pub use_uuids: Vec<String>,
    /// The GPU UUID must be none of these.
    pub nouse_uuids: Vec<String>,
}

impl DeviceSelector {
    /// Whether a GPU with this model and UUID passes the selector.
    #[must_use]
    pub fn allows(&self, model: &str, uuid: &str) -> bool {
        self.allows_model(model) && self.allows_uuid(uuid)
    }

    /// Whether the model passes `use_types` / `nouse_types` (case-insensitive substring, as HAMi's
    /// `CheckType`). Allocation-free: it runs in the placement loop.
    #[must_use]
    pub fn allows_model(&self, model: &str) -> bool {
        let has = |needle: &String| contains_ignore_ascii_case(model, needle);
        (self.use_types.is_empty() || self.use_types.iter().any(has)) && !self.nouse_types.iter().any(has)
    }

    /// Whether the UUID passes `use_uuids` / `nouse_uuids` (exact match).
    #[must_use]
    pub fn allows_uuid(&self, uuid: &str) -> bool {
        (self.use_uuids.is_empty() || self.use_uuids.iter().any(|u| u == uuid))
            && !self.nouse_uuids.iter().any(|u| u == uuid)
    }

    /// Whether the selector restricts nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.use_types.is_empty()
            && self.nouse_types.is_empty()
            && self.use_uuids.is_empty()
            && self.nouse_uuids.is_empty()
    }
}

/// ASCII case-insensitive substring test without allocating.
fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// The GPU part of one container's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRequest {
    /// Number of distinct physical GPUs (`nvidia.com/gpu`), at least 1.
    pub count: u32,
    /// Memory per GPU.
    pub memory: MemoryRequest,
    /// Compute per GPU, percent of SMs (`nvidia.com/gpucores`); 100 = exclusive, 0 = no compute share.
    pub cores: u32,
    /// Allowed GPUs.
    pub selector: DeviceSelector,
    /// `nvidia.com/numa-bind: "true"`: all GPUs of this container on one NUMA node.
    pub numa_bind: bool,
}

impl DeviceRequest {
    /// `count` GPUs with `memory` and `cores` each, any model, no NUMA binding.
    #[must_use]
    pub fn new(count: u32, memory: MemoryRequest, cores: u32) -> Self {
        Self {
            count,
            memory,
            cores,
            selector: DeviceSelector::default(),
            numa_bind: false,
        }
    }
}

/// How a container takes part in the pod's life, which decides how its demand adds up (Kubernetes
/// "effective request": `max(max(init), sum(app))`, with restartable init containers, i.e. sidecars,
/// running beside everything that starts after them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContainerKind {
    /// An init container: runs to completion, alone, before the next one starts.
    Init,
    /// An init container with `restartPolicy: Always` (a sidecar): keeps running beside later containers.
    Sidecar,
    /// An app container: all of them run together after the init phase.
    App,
}

/// One container's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerRequest {
    /// Container name.
    pub name: String,
    /// Init, sidecar or app.
    pub kind: ContainerKind,
    /// Host CPU, milli-vCPU.
    pub cpu_milli: u64,
    /// Host memory, MiB.
    pub memory_mib: u64,
    /// GPUs, if the container asks for any.
    pub gpu: Option<DeviceRequest>,
}

/// Node-level placement policy (`hami.io/node-scheduler-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodePolicy {
    /// Prefer the most used node.
    #[default]
    Binpack,
    /// Prefer the least used node.
    Spread,
}

/// GPU-level placement policy inside a node (`hami.io/gpu-scheduler-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuPolicy {
    /// Prefer the most used GPU.
    Binpack,
    /// Prefer the least used GPU (HAMi's default).
    #[default]
    Spread,
    /// Multi-GPU requests take the best NVLink-connected set; single GPUs the worst-connected one.
    TopologyAware,
}

/// A pod as the placement policies see it: containers in Kubernetes order (init containers first, in
/// spec order, then app containers), which is also the order of the allocation annotation's segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRequest {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID (the key of every allocation; never the name).
    pub uid: String,
    /// Containers, init first.
    pub containers: Vec<ContainerRequest>,
    /// Per-pod override of the node policy.
    pub node_policy: Option<NodePolicy>,
    /// Per-pod override of the GPU policy.
    pub gpu_policy: Option<GpuPolicy>,
}

impl PodRequest {
    /// Effective host CPU request, milli-vCPU: `max(max over init of (init + sidecars started before),
    /// sum(app) + sum(sidecars))`, as Kubernetes computes it.
    #[must_use]
    pub fn effective_cpu_milli(&self) -> u64 {
        self.effective(|c| c.cpu_milli)
    }

    /// Effective host memory request, MiB (same rule as [`Self::effective_cpu_milli`]).
    #[must_use]
    pub fn effective_memory_mib(&self) -> u64 {
        self.effective(|c| c.memory_mib)
    }

    fn effective(&self, get: impl Fn(&ContainerRequest) -> u64) -> u64 {
        let mut sidecars = 0u64;
        let mut init_peak = 0u64;
        let mut apps = 0u64;
        for c in &self.containers {
            match c.kind {
                ContainerKind::Init => init_peak = init_peak.max(sidecars.saturating_add(get(c))),
                ContainerKind::Sidecar => {
                    sidecars = sidecars.saturating_add(get(c));
                    init_peak = init_peak.max(sidecars);
                }
                ContainerKind::App => apps = apps.saturating_add(get(c)),
            }
        }
        init_peak.max(apps.saturating_add(sidecars))
    }

    /// Index of the pod's only GPU-requesting container, if exactly one container asks for GPUs.
    #[must_use]
    pub fn single_gpu_container(&self) -> Option<usize> {
        let mut gpu = self
            .containers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.gpu.is_some());
        match (gpu.next(), gpu.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    /// Whether any container asks for GPUs.
    #[must_use]
    pub fn wants_gpu(&self) -> bool {
        self.containers.iter().any(|c| c.gpu.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctr(kind: ContainerKind, cpu: u64) -> ContainerRequest {
        ContainerRequest {
            name: format!("{kind:?}{cpu}"),
            kind,
            cpu_milli: cpu,
            memory_mib: 0,
            gpu: None,
        }
    }

    fn pod(containers: Vec<ContainerRequest>) -> PodRequest {
        PodRequest {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            containers,
            node_policy: None,
            gpu_policy: None,
        }
    }

    #[test]
    fn effective_request_is_max_of_init_and_app_sum() {
        use ContainerKind::{App, Init, Sidecar};
        assert_eq!(
            pod(vec![ctr(Init, 500), ctr(Init, 300), ctr(App, 100), ctr(App, 200)]).effective_cpu_milli(),
            500
        );
        assert_eq!(
            pod(vec![ctr(Init, 200), ctr(App, 300), ctr(App, 400)]).effective_cpu_milli(),
            700
        );
        // A sidecar runs beside later init containers and beside the apps.
        assert_eq!(
            pod(vec![ctr(Sidecar, 100), ctr(Init, 500), ctr(App, 300)]).effective_cpu_milli(),
            600
        );
        assert_eq!(
            pod(vec![ctr(Init, 500), ctr(Sidecar, 100), ctr(App, 300)]).effective_cpu_milli(),
            500
        );
    }

    #[test]
    fn percent_memory_multiplies_before_dividing() {
        // Peer bug C09: 32 GiB at 20 % and 10 %.
        assert_eq!(MemoryRequest::Percent(20).resolve(32768), 6553);
        assert_eq!(MemoryRequest::Percent(10).resolve(32768), 3276);
        assert_eq!(MemoryRequest::Mib(1000).resolve(32768), 1000);
    }

    #[test]
    fn selector_matches_type_substring_case_insensitively_and_uuid_exactly() {
        let s = DeviceSelector {
            use_types: vec!["a100".into()],
            ..DeviceSelector::default()
        };
        assert!(s.allows("NVIDIA-NVIDIA A100-SXM4-40GB", "GPU-1"));
        assert!(!s.allows("NVIDIA-Tesla T4", "GPU-1"));
        let s = DeviceSelector {
            nouse_uuids: vec!["GPU-1".into()],
            ..DeviceSelector::default()
        };
        assert!(!s.allows("T4", "GPU-1"));
        assert!(s.allows("T4", "GPU-10"));
    }
}
