//! Live state of one node as the placement policies see it: its inventory plus what is committed on it.
//!
//! Usage is kept per GPU (slots, MiB, percent of SMs) and per node (host CPU milli, host MiB). Free
//! capacity is always computed with saturating subtraction, so a device whose recorded use exceeds its
//! capacity (a stale record, a shrunk device) has zero free capacity, never a wrapped huge one (peer
//! bug C04, variant 3).

use std::sync::Arc;

use hami_api::{
    ContainerDevice, ContainerDevices, ContainerKind, GpuDevice, NodeInventory, PodDevices, PodRequest,
};

use crate::{
    error::{Error, Result},
    fit::Reason,
    usage::MeasuredGpu,
};

/// What is committed on one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GpuUsage {
    /// Containers holding a share of the GPU (each takes one of its `split_count` slots).
    pub slots: u32,
    /// Device memory, MiB.
    pub memory_mib: u64,
    /// Compute, percent of SMs.
    pub cores: u32,
}

impl GpuUsage {
    /// Adds `other` to `self`, saturating.
    pub fn add(&mut self, other: GpuUsage) {
        self.slots = self.slots.saturating_add(other.slots);
        self.memory_mib = self.memory_mib.saturating_add(other.memory_mib);
        self.cores = self.cores.saturating_add(other.cores);
    }

    /// Removes `other` from `self`, saturating at zero.
    pub fn sub(&mut self, other: GpuUsage) {
        self.slots = self.slots.saturating_sub(other.slots);
        self.memory_mib = self.memory_mib.saturating_sub(other.memory_mib);
        self.cores = self.cores.saturating_sub(other.cores);
    }

    /// Component-wise maximum.
    #[must_use]
    pub fn max(self, other: GpuUsage) -> GpuUsage {
        GpuUsage {
            slots: self.slots.max(other.slots),
            memory_mib: self.memory_mib.max(other.memory_mib),
            cores: self.cores.max(other.cores),
        }
    }

    /// Whether nothing is committed.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.slots == 0 && self.memory_mib == 0 && self.cores == 0
    }
}

/// One GPU granted to one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceGrant {
    /// Position of the GPU in the node's inventory (`NodeInventory::gpus`).
    pub gpu: usize,
    /// Device memory granted, MiB (percent requests already resolved against this GPU).
    pub memory_mib: u64,
    /// Compute granted, percent of SMs.
    pub cores: u32,
}

/// The GPUs granted on one node to every container of a pod, in the pod's container order (init
/// containers first). A container without GPUs has an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodePlacement {
    /// One entry per container of the pod.
    pub containers: Vec<Vec<DeviceGrant>>,
}

impl NodePlacement {
    /// What the placement commits on each GPU of a node with `gpu_count` GPUs, following Kubernetes'
    /// container life cycle: init containers run one at a time (plus the sidecars started before them),
    /// then app containers run together with all sidecars. Per GPU and per dimension the commitment is
    /// the peak over those phases, so a pod whose init containers need a GPU is not charged their sum
    /// (peer bug C02).
    #[must_use]
    pub fn charge(&self, pod: &PodRequest, gpu_count: usize) -> Vec<GpuUsage> {
        let mut sidecars = vec![GpuUsage::default(); gpu_count];
        let mut peak = vec![GpuUsage::default(); gpu_count];
        let mut apps = vec![GpuUsage::default(); gpu_count];
        for (container, grants) in pod.containers.iter().zip(&self.containers) {
            match container.kind {
                ContainerKind::Init => {
                    for g in grants {
                        if let Some(slot) = peak.get_mut(g.gpu) {
                            let mut phase = sidecars[g.gpu];
                            phase.add(grant_usage(g));
                            *slot = slot.max(phase);
                        }
                    }
                }
                ContainerKind::Sidecar => {
                    for g in grants {
                        if let Some(s) = sidecars.get_mut(g.gpu) {
                            s.add(grant_usage(g));
                            peak[g.gpu] = peak[g.gpu].max(*s);
                        }
                    }
                }
                ContainerKind::App => {
                    for g in grants {
                        if let Some(a) = apps.get_mut(g.gpu) {
                            a.add(grant_usage(g));
                        }
                    }
                }
            }
        }
        for ((p, s), a) in peak.iter_mut().zip(&sidecars).zip(&apps) {
            let mut steady = *s;
            steady.add(*a);
            *p = p.max(steady);
        }
        peak
    }

    /// HAMi's allocation annotation value for this placement on `node`
    /// (`hami.io/vgpu-devices-allocated` / `-to-allocate`, `reference/hami.md` §1.3): one entry per
    /// container in pod order, init containers included, an empty entry for a container without GPUs
    /// (peer bugs C08, C14); each device is `UUID,vendor,memMiB,cores` with `vendor` the vendor's common
    /// word (`NVIDIA`), not the card model. Encode it with [`PodDevices::encode`].
    ///
    /// `node` must be the inventory the placement was made on. A grant naming a GPU that `node` does not
    /// have cannot come from [`crate::fit::fit_pod`] or pass [`NodeState::commit`]; it is left out.
    #[must_use]
    pub fn to_pod_devices(&self, node: &NodeInventory, vendor: &str) -> PodDevices {
        PodDevices(
            self.containers
                .iter()
                .map(|grants| {
                    ContainerDevices(
                        grants
                            .iter()
                            .filter_map(|g| {
                                let gpu = node.gpus.get(g.gpu)?;
                                Some(ContainerDevice::new(
                                    gpu.uuid.clone(),
                                    vendor,
                                    g.memory_mib,
                                    g.cores,
                                ))
                            })
                            .collect(),
                    )
                })
                .collect(),
        )
    }
}

/// Whether `after` (a GPU's total commitment) stays within the GPU's health, slots, memory and cores.
///
/// # Errors
/// The first capacity dimension that is exceeded.
pub fn capacity_check(gpu: &GpuDevice, after: GpuUsage) -> std::result::Result<(), Reason> {
    if !gpu.healthy {
        Err(Reason::NotHealthy)
    } else if after.slots > gpu.split_count {
        Err(Reason::SlotsExhausted)
    } else if after.memory_mib > gpu.schedulable_memory_mib() {
        Err(Reason::InsufficientMemory)
    } else if after.cores > gpu.schedulable_cores() {
        Err(Reason::InsufficientCores)
    } else {
        Ok(())
    }
}

fn grant_usage(g: &DeviceGrant) -> GpuUsage {
    GpuUsage {
        slots: 1,
        memory_mib: g.memory_mib,
        cores: g.cores,
    }
}

/// A node's inventory and everything committed on it.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// The node's devices and host capacity.
    pub inventory: Arc<NodeInventory>,
    /// Committed use per GPU, same order as `inventory.gpus`.
    pub gpus: Vec<GpuUsage>,
    /// Committed host CPU, milli-vCPU.
    pub cpu_milli: u64,
    /// Committed host memory, MiB.
    pub memory_mib: u64,
    /// Bumped on every commit or release; lets callers cache per-node results.
    pub generation: u64,
    /// Measured use per GPU from the agent's telemetry (same order as `inventory.gpus`; `None` for a GPU
    /// without a sample). Empty when the node publishes no usage: only the usage-aware policy reads it.
    pub measured: Vec<Option<MeasuredGpu>>,
}

impl NodeState {
    /// An idle node.
    #[must_use]
    pub fn new(inventory: Arc<NodeInventory>) -> Self {
        let gpus = vec![GpuUsage::default(); inventory.gpus.len()];
        Self {
            inventory,
            gpus,
            cpu_milli: 0,
            memory_mib: 0,
            generation: 0,
            measured: Vec::new(),
        }
    }

    /// Node name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inventory.name
    }

    /// Host CPU still free, milli-vCPU (0 when over-committed).
    #[must_use]
    pub fn free_cpu_milli(&self) -> u64 {
        self.inventory.cpu_milli.saturating_sub(self.cpu_milli)
    }

    /// Host memory still free, MiB (0 when over-committed).
    #[must_use]
    pub fn free_memory_mib(&self) -> u64 {
        self.inventory.memory_mib.saturating_sub(self.memory_mib)
    }

    /// The GPU at `index` in the inventory with its committed use.
    #[must_use]
    pub fn gpu(&self, index: usize) -> Option<(&GpuDevice, GpuUsage)> {
        Some((self.inventory.gpus.get(index)?, *self.gpus.get(index)?))
    }

    /// Commits a pod's placement after checking it again against current use: every container's GPUs
    /// are distinct, every GPU stays within its slots, memory and cores, and the host within CPU and
    /// memory. On error nothing changes.
    ///
    /// # Errors
    /// [`Error::Overcommit`] naming the GPU and the reason, [`Error::HostOvercommit`], or
    /// [`Error::PlacementShape`] when the placement does not match the pod.
    pub fn commit(&mut self, pod: &PodRequest, placement: &NodePlacement) -> Result<()> {
        self.check_shape(pod, placement)?;
        let cpu = pod.effective_cpu_milli();
        let mem = pod.effective_memory_mib();
        if cpu > self.free_cpu_milli() || mem > self.free_memory_mib() {
            return Err(Error::HostOvercommit {
                node: self.inventory.name.clone(),
            });
        }
        let charge = placement.charge(pod, self.gpus.len());
        for (i, c) in charge.iter().enumerate() {
            if c.is_idle() {
                continue;
            }
            let gpu = &self.inventory.gpus[i];
            let mut after = self.gpus[i];
            after.add(*c);
            if let Err(reason) = capacity_check(gpu, after) {
                return Err(Error::Overcommit {
                    node: self.inventory.name.clone(),
                    gpu: gpu.uuid.clone(),
                    reason,
                });
            }
        }
        for (u, c) in self.gpus.iter_mut().zip(&charge) {
            u.add(*c);
        }
        self.cpu_milli = self.cpu_milli.saturating_add(cpu);
        self.memory_mib = self.memory_mib.saturating_add(mem);
        self.generation += 1;
        Ok(())
    }

    /// Records a placement that already exists (rebuilt from the API after a restart, or on a GPU that has
    /// since turned unhealthy) **without** the capacity checks of [`Self::commit`]: what is running is
    /// accounted even when it no longer fits. The placement's shape is still checked.
    ///
    /// # Errors
    /// [`Error::PlacementShape`] when the placement does not match the pod or names a GPU the node lacks.
    pub fn commit_unchecked(&mut self, pod: &PodRequest, placement: &NodePlacement) -> Result<()> {
        self.check_shape(pod, placement)?;
        let charge = placement.charge(pod, self.gpus.len());
        for (u, c) in self.gpus.iter_mut().zip(&charge) {
            u.add(*c);
        }
        self.cpu_milli = self.cpu_milli.saturating_add(pod.effective_cpu_milli());
        self.memory_mib = self.memory_mib.saturating_add(pod.effective_memory_mib());
        self.generation += 1;
        Ok(())
    }

    /// Releases a placement previously committed with [`Self::commit`]; saturates at zero.
    pub fn release(&mut self, pod: &PodRequest, placement: &NodePlacement) {
        let charge = placement.charge(pod, self.gpus.len());
        for (u, c) in self.gpus.iter_mut().zip(&charge) {
            u.sub(*c);
        }
        self.cpu_milli = self.cpu_milli.saturating_sub(pod.effective_cpu_milli());
        self.memory_mib = self.memory_mib.saturating_sub(pod.effective_memory_mib());
        self.generation += 1;
    }

    fn check_shape(&self, pod: &PodRequest, placement: &NodePlacement) -> Result<()> {
        let bad = |why: &'static str| {
            Err(Error::PlacementShape {
                pod: pod.name.clone(),
                why,
            })
        };
        if placement.containers.len() != pod.containers.len() {
            return bad("one grant list per container is required");
        }
        for (c, grants) in pod.containers.iter().zip(&placement.containers) {
            let want = c.gpu.as_ref().map_or(0, |g| g.count as usize);
            if grants.len() != want {
                return bad("a container's grant count differs from its nvidia.com/gpu");
            }
            for (k, g) in grants.iter().enumerate() {
                if g.gpu >= self.gpus.len() {
                    return bad("a grant names a GPU the node does not have");
                }
                if grants[..k].iter().any(|o| o.gpu == g.gpu) {
                    return bad("a container was granted the same physical GPU twice");
                }
            }
        }
        Ok(())
    }
}
