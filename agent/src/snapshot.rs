//! The immutable per-interval snapshot the agent exports (as JSON at `/snapshot` and as Prometheus
//! metrics at `/metrics`), built by a pure function from attribution rows and identities.

use std::collections::BTreeMap;

use hami_ebpf_common::GPU_UNKNOWN;
use serde::{Deserialize, Serialize};

use crate::attribution::{MemoryKind, UsageRow};
use crate::cgroup::Identity;

/// A GPU of the node, from discovery (NVML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML index (the RM `deviceId` the programs see).
    pub index: u32,
    /// UUID (`GPU-…`).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
}

/// Device-memory usage of one container on one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// GPU index; `None` when the allocation's device object was never seen.
    pub gpu: Option<u32>,
    /// GPU UUID when discovery knows the index.
    pub uuid: Option<String>,
    /// Device memory held now, bytes.
    pub memory_bytes: u64,
    /// Peak of `memory_bytes`, bytes.
    pub memory_peak_bytes: u64,
    /// Cumulative ∫ memory dt, byte-seconds (never decreases).
    pub memory_byte_seconds: f64,
    /// Successful allocations.
    pub allocations: u64,
    /// Explicit frees.
    pub frees: u64,
    /// Objects released at process exit or with their parent.
    pub released: u64,
    /// Allocations refused by the driver.
    pub failed_allocations: u64,
    /// Cumulative SM time on this GPU from NVML per-process utilisation, SM-seconds (never decreases).
    pub sm_seconds: f64,
    /// Processes killed by the kernel hard limit.
    pub hard_limit_kills: u64,
}

/// Managed (`cuMemAllocManaged`) memory of one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagedMemory {
    /// Managed bytes reserved now.
    pub bytes: u64,
    /// Peak, bytes.
    pub peak_bytes: u64,
    /// Cumulative byte-seconds.
    pub byte_seconds: f64,
    /// Successful managed allocations.
    pub allocations: u64,
}

/// One container (one cgroup) in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Container {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 mount, when still resolvable.
    pub cgroup_path: Option<String>,
    /// Pod and container from the path.
    pub identity: Identity,
    /// The cgroup is gone: only cumulative counters are still reported, until retention ends.
    pub terminated: bool,
    /// Device memory per GPU.
    pub gpus: Vec<GpuMemory>,
    /// Managed memory, when any was allocated.
    pub managed: Option<ManagedMemory>,
    /// libcuda calls seen by the uprobes, by symbol.
    pub cuda_calls: BTreeMap<String, u64>,
}

/// Agent self-observation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Events applied.
    pub events: u64,
    /// Live device-memory objects tracked.
    pub live_objects: u64,
    /// Ioctl payloads that could not be decoded (ignored).
    pub malformed_ioctls: u64,
    /// Events lost because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Objects not recorded because the kernel map was full.
    pub alloc_map_full: u64,
    /// Ioctls on NVIDIA files seen.
    pub ioctls: u64,
    /// Frees of objects that were not tracked.
    pub unmatched_frees: u64,
    /// Objects fixed up by reconciliation with the kernel table.
    pub reconciled: u64,
    /// Processes killed by the kernel hard limit (program counter).
    pub hard_limit_kills: u64,
    /// How the kernel hard limit is enforced: `kill` or `lsm` (`None`: off).
    #[serde(default)]
    pub hard_limit_mechanism: Option<String>,
    /// Configured libcuda files that do not exist or are not ELF objects (no uprobes on them).
    #[serde(default)]
    pub libcuda_missing: u64,
    /// Probed symbols that a configured libcuda does not export (summed over libraries).
    #[serde(default)]
    pub uprobe_symbols_missing: u64,
}

/// The snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Node name.
    pub node: String,
    /// CLOCK_MONOTONIC time of the snapshot, ns.
    pub taken_at_ns: u64,
    /// GPUs from discovery.
    pub gpus: Vec<GpuInfo>,
    /// Containers with any usage, ordered by cgroup id.
    pub containers: Vec<Container>,
    /// Agent statistics.
    pub agent: AgentStats,
}

/// Per-cgroup facts gathered by the I/O layer.
#[derive(Debug, Clone, Default)]
pub struct CgroupFacts {
    /// Path, when resolvable.
    pub path: Option<String>,
    /// Identity from the path.
    pub identity: Identity,
    /// Whether the cgroup no longer exists.
    pub terminated: bool,
}

/// Builds a snapshot. `calls` is cgroup → symbol → count; `facts` per cgroup (missing → unknown).
#[must_use]
pub fn build(
    node: &str,
    taken_at_ns: u64,
    gpus: &[GpuInfo],
    rows: &[UsageRow],
    calls: &BTreeMap<u64, BTreeMap<String, u64>>,
    facts: &BTreeMap<u64, CgroupFacts>,
    agent: AgentStats,
) -> Snapshot {
    let mut containers: BTreeMap<u64, Container> = BTreeMap::new();
    let blank = |cg: u64| {
        let f = facts.get(&cg).cloned().unwrap_or_default();
        Container {
            cgroup_id: cg,
            cgroup_path: f.path,
            identity: f.identity,
            terminated: f.terminated,
            gpus: Vec::new(),
            managed: None,
            cuda_calls: BTreeMap::new(),
        }
    };
    for r in rows {
        let c = containers
            .entry(r.key.cgroup_id)
            .or_insert_with(|| blank(r.key.cgroup_id));
        match r.key.kind {
            MemoryKind::Device => {
                let gpu = (r.key.gpu != GPU_UNKNOWN).then_some(r.key.gpu);
                c.gpus.push(GpuMemory {
                    gpu,
                    uuid: gpu
                        .and_then(|g| gpus.iter().find(|i| i.index == g))
                        .map(|i| i.uuid.clone()),
                    memory_bytes: r.usage.bytes,
                    memory_peak_bytes: r.usage.peak_bytes,
                    memory_byte_seconds: r.byte_seconds,
                    allocations: r.usage.allocations,
                    frees: r.usage.frees,
                    released: r.usage.released,
                    failed_allocations: r.usage.failed_allocations,
                    #[allow(clippy::cast_precision_loss, reason = "exact below 2^53 µs (285 years)")]
                    sm_seconds: r.usage.sm_us as f64 / 1e6,
                    hard_limit_kills: r.usage.hard_limit_kills,
                });
            }
            MemoryKind::Managed => {
                c.managed = Some(ManagedMemory {
                    bytes: r.usage.bytes,
                    peak_bytes: r.usage.peak_bytes,
                    byte_seconds: r.byte_seconds,
                    allocations: r.usage.allocations,
                });
            }
        }
    }
    for (cg, per_call) in calls {
        let c = containers.entry(*cg).or_insert_with(|| blank(*cg));
        c.cuda_calls.clone_from(per_call);
    }
    Snapshot {
        node: node.to_owned(),
        taken_at_ns,
        gpus: gpus.to_vec(),
        containers: containers.into_values().collect(),
        agent,
    }
}
