//! Namespace GPU quota, as HAMi enforces it (`reference/hami.md` §3.3): a `ResourceQuota` with
//! `limits.nvidia.com/gpumem` (MiB) and/or `limits.nvidia.com/gpucores` (percent of SMs) caps what the
//! scheduler's own accounting commits to a namespace. Memory is counted per allocated device (a
//! percentage is resolved against the GPU it lands on), and a pod is charged its effective demand: the
//! peak over its life cycle, so init containers are not added to the app containers (peer bug C02, HAMi
//! #3052: adding a GPU-less init container must not change the verdict).

use std::fmt;

use hami_api::PodRequest;

use crate::state::NodePlacement;

/// A namespace's GPU limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceQuota {
    /// `limits.nvidia.com/gpumem`, MiB.
    pub memory_mib: Option<u64>,
    /// `limits.nvidia.com/gpucores`, percent of SMs summed over GPUs.
    pub cores: Option<u64>,
}

/// GPU memory and compute committed to (or demanded by) a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Device memory, MiB, summed over GPUs.
    pub memory_mib: u64,
    /// Compute, percent of SMs, summed over GPUs.
    pub cores: u64,
}

impl QuotaUsage {
    /// What a placement charges: the per-GPU peak commitment of [`NodePlacement::charge`], summed.
    #[must_use]
    pub fn of_placement(pod: &PodRequest, placement: &NodePlacement, gpu_count: usize) -> Self {
        placement
            .charge(pod, gpu_count)
            .iter()
            .fold(Self::default(), |acc, c| Self {
                memory_mib: acc.memory_mib.saturating_add(c.memory_mib),
                cores: acc.cores.saturating_add(u64::from(c.cores)),
            })
    }
}

/// A placement that would take a namespace past its quota (HAMi's `ResourceQuotaNotFit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// The resource over its limit: `nvidia.com/gpumem` or `nvidia.com/gpucores`.
    pub resource: &'static str,
    /// What the pod asks for.
    pub requested: u64,
    /// What the namespace already holds.
    pub used: u64,
    /// The limit.
    pub limit: u64,
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ResourceQuotaNotFit: {} requested {} with {} used exceeds the limit {}",
            self.resource, self.requested, self.used, self.limit
        )
    }
}

/// Whether `demand` fits the namespace's `quota` on top of `used`.
///
/// # Errors
/// The first resource that would exceed its limit.
pub fn check_quota(
    quota: &NamespaceQuota,
    used: QuotaUsage,
    demand: QuotaUsage,
) -> Result<(), QuotaExceeded> {
    let check = |resource, limit: Option<u64>, used: u64, requested: u64| match limit {
        Some(limit) if used.saturating_add(requested) > limit => Err(QuotaExceeded {
            resource,
            requested,
            used,
            limit,
        }),
        _ => Ok(()),
    };
    check(
        hami_api::resources::GPU_MEMORY,
        quota.memory_mib,
        used.memory_mib,
        demand.memory_mib,
    )?;
    check(
        hami_api::resources::GPU_CORES,
        quota.cores,
        used.cores,
        demand.cores,
    )
}
