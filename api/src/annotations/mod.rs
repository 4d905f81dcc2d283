//! HAMi's annotation keys and the codecs for their values.
//!
//! Keys are spelled exactly as HAMi v2.10.0 spells them (`reference/hami.md` §1.2, §1.3, §2.4, §3.1;
//! HAMi `pkg/util/types.go`, `pkg/device/devices.go`, `pkg/device/nvidia/device.go`), so existing pod specs
//! and HAMi components keep working. Values are parsed strictly: a malformed value is an
//! [`Error`](crate::Error) naming the key, position and text, never a panic and never a silent zero.
//!
//! - [`node`]: the node inventory (`hami.io/node-nvidia-register`), JSON and legacy text.
//! - [`pod_devices`]: the scheduler's per-container decision (`hami.io/vgpu-devices-allocated` /
//!   `-to-allocate`).
//! - [`pod`]: selection and policy annotations a user puts on a pod.
//! - [`signature`]: the scheduler's HMAC over a pod's decision (`hami.io/vgpu-decision-signature`, ours).
//! - [`usage`]: the agent's measured-usage summary and heartbeat (`hami.io/node-nvidia-usage`, ours).

pub mod node;
pub mod pod;
pub mod pod_devices;
pub mod signature;
pub mod usage;

// ---- Node annotations ----

/// Node inventory written by the device plugin (agent): JSON array of devices since HAMi v2.8, legacy
/// `UUID,count,devmem,devcore,type,numa,health[,index,mode]:` text before. See [`node`].
pub const NODE_NVIDIA_REGISTER: &str = "hami.io/node-nvidia-register";

/// Pairwise GPU link scores written by the device plugin when topology scoring is on:
/// `[{"uuid":"GPU-a","score":{"GPU-b":200}}, …]` (`reference/hami.md` §1.2, §3.4).
pub const NODE_NVIDIA_SCORE: &str = "hami.io/node-nvidia-score";

/// Scheduler/device-plugin handshake: `Requesting_<YYYY-MM-DD HH:MM:SS>` from the scheduler (NVIDIA:
/// no suffix; other vendors `hami.io/node-handshake-<type>`).
pub const NODE_HANDSHAKE: &str = "hami.io/node-handshake";

/// Per-node bind lock: `"<RFC3339 time>,<namespace>,<pod>"` (legacy: a bare RFC3339 time), held from
/// Bind until the device plugin's Allocate finishes; expires after 5 minutes.
pub const NODE_LOCK: &str = "hami.io/mutex.lock";

/// Admin-set comma list of GPU UUIDs excluded from new allocations (parse with
/// [`pod::parse_comma_list`]).
pub const DEVICE_CORDON: &str = "hami.io/device-cordon";

/// Node-level placement policy override on a pod (`binpack` | `spread`); also the name of HAMi's
/// `--node-scheduler-policy` flag. See [`pod::parse_node_policy`].
pub const NODE_SCHEDULER_POLICY: &str = "hami.io/node-scheduler-policy";

/// GPU-level placement policy override on a pod (`binpack` | `spread` | `topology-aware`). See
/// [`pod::parse_gpu_policy`].
pub const GPU_SCHEDULER_POLICY: &str = "hami.io/gpu-scheduler-policy";

/// Device score weights on a pod: `slot=<int>,core=<int>,memory=<int>`. See
/// [`pod::DeviceScoringWeights`].
pub const DEVICE_SCORING_WEIGHTS: &str = "hami.io/device-scoring-weights";

// ---- Pod annotations written by the scheduler and the device plugin ----

/// The node the extender chose (also set as a pod **label** of the same name; the vGPU monitor selects
/// on it).
pub const VGPU_NODE: &str = "hami.io/vgpu-node";

/// Unix time (seconds) of the extender's decision.
pub const VGPU_TIME: &str = "hami.io/vgpu-time";

/// The decision still to be handed out by the device plugin's Allocate; entries are emptied as
/// containers are allocated, down to `;;…`. Value format: [`pod_devices::PodDevices`].
pub const DEVICES_TO_ALLOCATE: &str = "hami.io/vgpu-devices-to-allocate";

/// The durable record of the decision, from which the scheduler rebuilds all device usage after a
/// restart. Value format: [`pod_devices::PodDevices`].
pub const DEVICES_ALLOCATED: &str = "hami.io/vgpu-devices-allocated";

/// Bind progress: [`BIND_PHASE_ALLOCATING`], [`BIND_PHASE_SUCCESS`] or [`BIND_PHASE_FAILED`].
pub const BIND_PHASE: &str = "hami.io/bind-phase";

/// Unix time (seconds) of the bind.
pub const BIND_TIME: &str = "hami.io/bind-time";

/// [`BIND_PHASE`] value while the device plugin has not allocated every container yet.
pub const BIND_PHASE_ALLOCATING: &str = "allocating";

/// [`BIND_PHASE`] value once every container is allocated.
pub const BIND_PHASE_SUCCESS: &str = "success";

/// [`BIND_PHASE`] value after a failed Allocate.
pub const BIND_PHASE_FAILED: &str = "failed";

// ---- Pod annotations written by the user ----

/// Comma list of GPU type substrings the pod may use (case-insensitive substring of the registered
/// `type`, e.g. `A100`).
pub const USE_GPU_TYPE: &str = "nvidia.com/use-gputype";

/// Comma list of GPU type substrings the pod must not use.
pub const NOUSE_GPU_TYPE: &str = "nvidia.com/nouse-gputype";

/// Comma list of exact GPU UUIDs the pod may use.
pub const USE_GPU_UUID: &str = "nvidia.com/use-gpuuuid";

/// Comma list of exact GPU UUIDs the pod must not use.
pub const NOUSE_GPU_UUID: &str = "nvidia.com/nouse-gpuuuid";

/// `"true"`: all GPUs of a container on one NUMA node. See [`pod::parse_numa_bind`].
pub const NUMA_BIND: &str = "nvidia.com/numa-bind";

/// Device mode the pod needs: `hami-core` or `mig`. See [`pod::parse_vgpu_mode`].
pub const VGPU_MODE: &str = "nvidia.com/vgpu-mode";

/// Label (key) that makes the webhook skip a pod or namespace when its value is [`WEBHOOK_IGNORE`].
pub const WEBHOOK_LABEL: &str = "hami.io/webhook";

/// Value of [`WEBHOOK_LABEL`] that makes the webhook skip the object.
pub const WEBHOOK_IGNORE: &str = "ignore";

pub use node::{decode_node_register, encode_node_inventory, encode_node_register, registered_type_name};
pub use pod::{
    DeviceScoringWeights, PodSchedulingAnnotations, device_selector, parse_comma_list, parse_gpu_policy,
    parse_node_policy, parse_numa_bind, parse_vgpu_mode,
};
pub use pod_devices::{ContainerDevice, ContainerDevices, PodDevices};
pub use signature::{DECISION_SIGNATURE, sign_decision, verify_decision};
pub use usage::{GpuUsageSample, NODE_NVIDIA_USAGE, NodeUsage};

/// Why `s` cannot be a device UUID (`no_whitespace`) or vendor type token in HAMi's text formats, if it
/// cannot: empty, a `,` `:` `;` separator, a control character, whitespace (UUIDs) or surrounding
/// whitespace (types).
pub(crate) fn token_problem(s: &str, no_whitespace: bool) -> Option<&'static str> {
    if s.is_empty() {
        Some("empty")
    } else if s.contains([',', ':', ';']) {
        Some("contains a separator ',', ':' or ';'")
    } else if s.chars().any(char::is_control) {
        Some("contains a control character")
    } else if no_whitespace && s.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else if s.trim() != s {
        Some("has leading or trailing whitespace")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hamis_spelling() {
        let keys = [
            (NODE_NVIDIA_REGISTER, "hami.io/node-nvidia-register"),
            (NODE_NVIDIA_SCORE, "hami.io/node-nvidia-score"),
            (NODE_HANDSHAKE, "hami.io/node-handshake"),
            (NODE_LOCK, "hami.io/mutex.lock"),
            (DEVICE_CORDON, "hami.io/device-cordon"),
            (VGPU_NODE, "hami.io/vgpu-node"),
            (VGPU_TIME, "hami.io/vgpu-time"),
            (DEVICES_TO_ALLOCATE, "hami.io/vgpu-devices-to-allocate"),
            (DEVICES_ALLOCATED, "hami.io/vgpu-devices-allocated"),
            (BIND_PHASE, "hami.io/bind-phase"),
            (BIND_TIME, "hami.io/bind-time"),
            (USE_GPU_TYPE, "nvidia.com/use-gputype"),
            (NOUSE_GPU_TYPE, "nvidia.com/nouse-gputype"),
            (USE_GPU_UUID, "nvidia.com/use-gpuuuid"),
            (NOUSE_GPU_UUID, "nvidia.com/nouse-gpuuuid"),
            (NUMA_BIND, "nvidia.com/numa-bind"),
            (VGPU_MODE, "nvidia.com/vgpu-mode"),
            (NODE_SCHEDULER_POLICY, "hami.io/node-scheduler-policy"),
            (GPU_SCHEDULER_POLICY, "hami.io/gpu-scheduler-policy"),
            (DEVICE_SCORING_WEIGHTS, "hami.io/device-scoring-weights"),
        ];
        for (got, want) in keys {
            assert_eq!(got, want);
        }
    }
}
