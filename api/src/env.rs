//! Environment variables that carry limits into a container, with HAMi's names so existing images and
//! HAMi-core builds keep working.
//!
//! Source: `reference/hami.md` §1.5 (what HAMi's device plugin `Allocate` sets, HAMi `plugin/server.go`)
//! and §1.3 (what the webhook sets, HAMi `pkg/scheduler/webhook.go`). Values are parsed with
//! [`crate::parse_memory_limit_env`] and [`crate::parse_sm_limit_env`].

/// Prefix of the per-device memory limit. The device plugin sets `CUDA_DEVICE_MEMORY_LIMIT_<i>` =
/// `"<MiB>m"` for the `i`-th device of the container (the CUDA index inside the container); HAMi-core
/// also reads the bare name as the limit for every device. Value: a size, see
/// [`crate::parse_memory_limit_env`]. Use [`memory_limit_var`] for the indexed name.
pub const CUDA_DEVICE_MEMORY_LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";

/// Compute limit, percent of the GPU's SMs (`0..=100`, 0 = no throttling). HAMi sets one value for all
/// the container's devices, taken from the first device's `usedcores`.
pub const CUDA_DEVICE_SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";

/// Path of the container's shared accounting region (HAMi: `/usr/local/vgpu/<random-uuid>.cache`).
pub const CUDA_DEVICE_MEMORY_SHARED_CACHE: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";

/// Task priority from the `nvidia.com/priority` resource: `0` = high, `1` = low (HAMi-core default 1).
pub const CUDA_TASK_PRIORITY: &str = "CUDA_TASK_PRIORITY";

/// Core-limit policy: `default`, `force` or `disable` (HAMi sets it only when not `default`, and to
/// `disable` when the device plugin runs with `--disable-core-limit`).
pub const GPU_CORE_UTILIZATION_POLICY: &str = "GPU_CORE_UTILIZATION_POLICY";

/// When `true` in the container's env, the device plugin does not mount `/etc/ld.so.preload`, so the
/// interceptor is not loaded and no limit is enforced in that container.
pub const CUDA_DISABLE_CONTROL: &str = "CUDA_DISABLE_CONTROL";

/// GPUs visible to the container: comma list of physical GPU UUIDs, or `none` on containers without
/// GPUs (webhook, when `overwriteEnv` is set).
pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";

/// Set to `true` by HAMi when `deviceMemoryScaling > 1`. HAMi-core never reads it (`reference/hami.md`
/// §4.7); listed so the agent can keep the variable for compatibility.
pub const CUDA_OVERSUBSCRIBE: &str = "CUDA_OVERSUBSCRIBE";

/// HAMi-core log level (chart `libCudaLogLevel`, default `1`).
pub const LIBCUDA_LOG_LEVEL: &str = "LIBCUDA_LOG_LEVEL";

/// The name of the memory-limit variable for the container's `i`-th device:
/// `CUDA_DEVICE_MEMORY_LIMIT_<i>` (e.g. `CUDA_DEVICE_MEMORY_LIMIT_0`).
#[must_use]
pub fn memory_limit_var(i: usize) -> String {
    format!("{CUDA_DEVICE_MEMORY_LIMIT}_{i}")
}

/// The value HAMi's device plugin writes into `CUDA_DEVICE_MEMORY_LIMIT_<i>` for a limit of `mib` MiB:
/// `"<mib>m"` (HAMi-core reads `m` as MiB). [`crate::parse_memory_limit_env`] reads it back as bytes.
#[must_use]
pub fn format_memory_limit_mib(mib: u64) -> String {
    format!("{mib}m")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(memory_limit_var(0), "CUDA_DEVICE_MEMORY_LIMIT_0");
        assert_eq!(memory_limit_var(12), "CUDA_DEVICE_MEMORY_LIMIT_12");
        assert_eq!(format_memory_limit_mib(3000), "3000m");
        assert_eq!(
            crate::parse_memory_limit_env(&format_memory_limit_mib(3000)).unwrap(),
            3000 << 20
        );
    }
}
