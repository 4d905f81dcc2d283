//! Filter: does a pod fit a node, and on which GPUs.
//!
//! The device checks follow HAMi's NVIDIA `Fit` (`reference/hami.md` §3.2, in order: health, type, UUID,
//! slots, memory, cores, exclusivity, saturated compute), with two fixes over the peers:
//! - usage inside one pod is tracked by GPU identity (its inventory position), never by a position in a
//!   sorted list (peer bug C01), and one container's `nvidia.com/gpu: N` always gets N distinct physical
//!   GPUs (C06);
//! - the search is complete: when greedy choice for one container leaves no room for a later one, it
//!   backtracks, so a pod is placed whenever some assignment exists (within a step budget that no
//!   realistic pod reaches).
//!
//! Containers are fitted in pod order against the usage that will be live when they run: an init
//! container against the node plus the sidecars started before it; an app container against the node,
//! all sidecars and the app containers before it (peer bug C02).

use std::{collections::BTreeMap, fmt};

use hami_api::{ContainerKind, DeviceRequest, GpuDevice, GpuPolicy, PodRequest};

use crate::state::{DeviceGrant, GpuUsage, NodePlacement, NodeState};

/// Why a GPU (or a node) cannot take a request. Display strings are HAMi's reason codes where HAMi has
/// one (`pkg/device/common/common.go`), so events read the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The device plugin reports the GPU unhealthy.
    NotHealthy,
    /// The GPU model is excluded by `use-gputype` / `nouse-gputype`.
    TypeMismatch,
    /// The GPU UUID is excluded by `use-gpuuuid` / `nouse-gpuuuid`.
    UuidMismatch,
    /// All `split_count` slots of the GPU are taken.
    SlotsExhausted,
    /// Not enough free device memory.
    InsufficientMemory,
    /// Not enough free compute (percent of SMs).
    InsufficientCores,
    /// An exclusive request (all of the GPU's compute) on a GPU someone uses, or any request on a GPU
    /// held exclusively.
    ExclusiveConflict,
    /// A request for no compute on a GPU whose compute is fully committed.
    ComputeSaturated,
    /// Enough GPUs fit, but not enough of them on one NUMA node (`numa-bind`).
    NumaNotFit,
    /// Fewer fitting GPUs than the container asks for.
    InsufficientDevices,
    /// Not enough free host CPU.
    NodeInsufficientCpu,
    /// Not enough free host memory.
    NodeInsufficientMemory,
    /// The GPU's measured memory use plus the safety margin plus the request would exceed its physical
    /// memory (usage-aware policy, [`crate::usage`]).
    MeasuredMemoryPressure,
}

impl Reason {
    /// HAMi-style reason code.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Self::NotHealthy => "CardNotHealth",
            Self::TypeMismatch => "CardTypeMismatch",
            Self::UuidMismatch => "CardUuidMismatch",
            Self::SlotsExhausted => "CardTimeSlicingExhausted",
            Self::InsufficientMemory => "CardInsufficientMemory",
            Self::InsufficientCores => "CardInsufficientCore",
            Self::ExclusiveConflict => "ExclusiveDeviceAllocateConflict",
            Self::ComputeSaturated => "CardComputeUnitsExhausted",
            Self::NumaNotFit => "NumaNotFit",
            Self::InsufficientDevices => "AllocatedCardsInsufficientRequest",
            Self::NodeInsufficientCpu => "NodeInsufficientCPU",
            Self::NodeInsufficientMemory => "NodeInsufficientMemory",
            Self::MeasuredMemoryPressure => "MeasuredMemoryPressure",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why a pod does not fit a node: per reason, how many of the node's GPUs failed with it, out of
/// `devices`. Displays like HAMi's events, e.g. `1/1 CardNotHealth`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FitFailure {
    /// Reason → number of GPUs (or 1 for node-level reasons).
    pub reasons: BTreeMap<Reason, u32>,
    /// GPUs on the node.
    pub devices: u32,
}

impl FitFailure {
    fn node(reason: Reason) -> Self {
        let mut reasons = BTreeMap::new();
        reasons.insert(reason, 1);
        Self { reasons, devices: 1 }
    }

    /// Whether `reason` is among the failure's reasons.
    #[must_use]
    pub fn has(&self, reason: Reason) -> bool {
        self.reasons.contains_key(&reason)
    }
}

impl fmt::Display for FitFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (reason, n) in &self.reasons {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n}/{} {reason}", self.devices)?;
        }
        Ok(())
    }
}

/// HAMi's device scoring weights (`hami.io/device-scoring-weights`, default `slot=1,core=1,memory=1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringWeights {
    /// Weight of the slot term.
    pub slot: f64,
    /// Weight of the compute term.
    pub core: f64,
    /// Weight of the memory term.
    pub memory: f64,
}

impl Default for ScoringWeights {
    fn default() -> Self {
        Self {
            slot: 1.0,
            core: 1.0,
            memory: 1.0,
        }
    }
}

/// In which order a container's candidate GPUs are tried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuOrder {
    /// HAMi `binpack`: highest device score first (`reference/hami.md` §3.2).
    Binpack(ScoringWeights),
    /// HAMi `spread`: lowest device score first.
    Spread(ScoringWeights),
    /// Least free share first (the trace baselines' "best fit" GPU choice).
    BestFit,
    /// Inventory order (lowest index first).
    Index,
    /// HAMi `topology-aware`: one GPU → the worst-connected candidate (keeps good pairs free);
    /// several → the best-connected set.
    Topology,
}

impl GpuOrder {
    /// The order for a HAMi GPU policy with default weights.
    #[must_use]
    pub fn from_policy(policy: GpuPolicy, weights: ScoringWeights) -> Self {
        match policy {
            GpuPolicy::Binpack => Self::Binpack(weights),
            GpuPolicy::Spread => Self::Spread(weights),
            GpuPolicy::TopologyAware => Self::Topology,
        }
    }
}

/// Static checks of a GPU against a request: health and the type/UUID selector.
///
/// # Errors
/// The reason the GPU is not eligible.
pub fn device_eligible(gpu: &GpuDevice, req: &DeviceRequest) -> Result<(), Reason> {
    if !gpu.healthy {
        return Err(Reason::NotHealthy);
    }
    if !req.selector.allows_model(&gpu.model) {
        return Err(Reason::TypeMismatch);
    }
    if !req.selector.allows_uuid(&gpu.uuid) {
        return Err(Reason::UuidMismatch);
    }
    Ok(())
}

/// Whether a GPU with committed use `used` can take one more container asking `memory_mib` and `cores`.
/// Free capacity saturates at zero (peer bug C04).
///
/// # Errors
/// The first failing check, in HAMi's order.
pub fn device_fit(gpu: &GpuDevice, used: GpuUsage, memory_mib: u64, cores: u32) -> Result<(), Reason> {
    if !gpu.healthy {
        return Err(Reason::NotHealthy);
    }
    if used.slots >= gpu.split_count {
        return Err(Reason::SlotsExhausted);
    }
    if memory_mib > gpu.schedulable_memory_mib().saturating_sub(used.memory_mib) {
        return Err(Reason::InsufficientMemory);
    }
    let total_cores = gpu.schedulable_cores();
    if cores > total_cores.saturating_sub(used.cores) {
        return Err(Reason::InsufficientCores);
    }
    if total_cores > 0 && cores >= total_cores && used.slots > 0 {
        return Err(Reason::ExclusiveConflict);
    }
    if cores == 0 && used.cores >= total_cores {
        return Err(Reason::ComputeSaturated);
    }
    Ok(())
}

/// Free share of a GPU as a fraction of the whole device (0.0..=1.0): the smaller of its free compute
/// and free memory fractions, and 0 when it has no free slot or is unhealthy. This is the "free milli-GPU"
/// of the FGD paper generalised to HAMi's two dimensions.
#[must_use]
pub fn free_share(gpu: &GpuDevice, used: GpuUsage) -> f64 {
    if !gpu.healthy || used.slots >= gpu.split_count {
        return 0.0;
    }
    let total_cores = gpu.schedulable_cores();
    let total_mem = gpu.schedulable_memory_mib();
    if total_cores == 0 || total_mem == 0 {
        return 0.0;
    }
    let c = f64::from(total_cores.saturating_sub(used.cores)) / f64::from(total_cores);
    let m = total_mem.saturating_sub(used.memory_mib) as f64 / total_mem as f64;
    c.min(m)
}

/// HAMi's device score for placing one more container on a GPU (`policy/gpu_policy.go` `ComputeScore`):
/// `10 × (Ws·(1+Used)/Count + Wc·(cores+UsedCores)/TotalCores + Wm·(mem+UsedMem)/TotalMem)`; terms with
/// a zero denominator count 0.
#[must_use]
pub fn device_score(gpu: &GpuDevice, used: GpuUsage, memory_mib: u64, cores: u32, w: ScoringWeights) -> f64 {
    let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
    let mem = ratio(
        (memory_mib + used.memory_mib) as f64,
        gpu.schedulable_memory_mib() as f64,
    );
    10.0 * (w.slot * ratio(f64::from(used.slots + 1), f64::from(gpu.split_count))
        + w.core * ratio(f64::from(cores + used.cores), f64::from(gpu.schedulable_cores()))
        + w.memory * mem)
}

/// Link score between two GPUs of a node, after HAMi's topology table (`reference/hami.md` §3.4):
/// 100 per NVLink link, plus 20 on the same NUMA node (SameCPU) or 10 across (CrossCPU).
#[must_use]
pub fn link_score(a: &GpuDevice, b: &GpuDevice) -> u32 {
    let nvlink = a
        .nvlink_peers
        .get(&b.index)
        .or_else(|| b.nvlink_peers.get(&a.index))
        .copied()
        .unwrap_or(0);
    let pci = if a.numa.is_some() && a.numa == b.numa {
        20
    } else {
        10
    };
    nvlink.saturating_mul(100).saturating_add(pci)
}

/// Upper bound on search steps for one pod on one node; far above what any real pod needs.
const SEARCH_BUDGET: u32 = 20_000;

/// Above this many candidates, multi-GPU topology enumeration only looks at the best ones by order.
const TOPOLOGY_CANDIDATE_CAP: usize = 12;

/// Finds GPUs for every container of `pod` on `node`, trying GPUs in `order`.
///
/// # Errors
/// A [`FitFailure`] with the reasons of the first container that could not be placed, or a node-level
/// reason when host CPU or memory are short.
pub fn fit_pod(node: &NodeState, pod: &PodRequest, order: GpuOrder) -> Result<NodePlacement, FitFailure> {
    if pod.effective_cpu_milli() > node.free_cpu_milli() {
        return Err(FitFailure::node(Reason::NodeInsufficientCpu));
    }
    if pod.effective_memory_mib() > node.free_memory_mib() {
        return Err(FitFailure::node(Reason::NodeInsufficientMemory));
    }
    let n = node.gpus.len();
    let mut search = Search {
        node,
        pod,
        order,
        budget: SEARCH_BUDGET,
        sidecars: vec![GpuUsage::default(); n],
        apps: vec![GpuUsage::default(); n],
        out: Vec::with_capacity(pod.containers.len()),
        failure: None,
    };
    if search.place(0) {
        Ok(NodePlacement {
            containers: search.out,
        })
    } else {
        Err(search.failure.unwrap_or_default())
    }
}

/// The GPUs that can take one container of `req` on `node`, given extra live use `extra` per GPU, with
/// the resolved memory per GPU. Failures are tallied into `failure`.
fn candidates(
    node: &NodeState,
    req: &DeviceRequest,
    extra: &dyn Fn(usize) -> GpuUsage,
    failure: &mut FitFailure,
) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    for (i, gpu) in node.inventory.gpus.iter().enumerate() {
        let mut used = node.gpus[i];
        used.add(extra(i));
        let mem = req.memory.resolve(gpu.schedulable_memory_mib());
        // A share that resolves to no memory (a percentage of a tiny GPU) is never placed: its limit
        // would be 0 (peer case C29).
        let share = if mem == 0 {
            Err(Reason::InsufficientMemory)
        } else {
            device_eligible(gpu, req).and_then(|()| device_fit(gpu, used, mem, req.cores))
        };
        match share {
            Ok(()) => out.push((i, mem)),
            Err(r) => *failure.reasons.entry(r).or_insert(0) += 1,
        }
    }
    out
}

struct Search<'a> {
    node: &'a NodeState,
    pod: &'a PodRequest,
    order: GpuOrder,
    budget: u32,
    sidecars: Vec<GpuUsage>,
    apps: Vec<GpuUsage>,
    out: Vec<Vec<DeviceGrant>>,
    failure: Option<FitFailure>,
}

impl Search<'_> {
    fn place(&mut self, ci: usize) -> bool {
        let Some(container) = self.pod.containers.get(ci) else {
            return true;
        };
        let Some(req) = container.gpu.as_ref() else {
            self.out.push(Vec::new());
            let ok = self.place(ci + 1);
            if !ok {
                self.out.pop();
            }
            return ok;
        };
        let kind = container.kind;
        let live = |i: usize| {
            let mut u = self.sidecars[i];
            if kind == ContainerKind::App {
                u.add(self.apps[i]);
            }
            u
        };
        let n = u32::try_from(self.node.gpus.len()).unwrap_or(u32::MAX);
        let mut failure = FitFailure {
            reasons: BTreeMap::new(),
            devices: n,
        };
        let cands = candidates(self.node, req, &live, &mut failure);
        let count = req.count as usize;
        if cands.len() < count || count == 0 {
            // Per-GPU reasons explain a shortfall; the count reason stands alone only when every GPU
            // fits and there are simply not enough of them.
            if failure.reasons.is_empty() {
                failure.reasons.insert(Reason::InsufficientDevices, n);
            }
            self.failure.get_or_insert(failure);
            return false;
        }
        let live_usage: Vec<GpuUsage> = (0..self.node.gpus.len())
            .map(|i| {
                let mut u = self.node.gpus[i];
                u.add(live(i));
                u
            })
            .collect();
        let sets = self.ordered_sets(req, &cands, &live_usage);
        if sets.is_empty() {
            failure.reasons.insert(Reason::NumaNotFit, 1);
            self.failure.get_or_insert(failure);
            return false;
        }
        for set in sets {
            if self.budget == 0 {
                break;
            }
            self.budget -= 1;
            let grants: Vec<DeviceGrant> = set
                .iter()
                .map(|&(gpu, memory_mib)| DeviceGrant {
                    gpu,
                    memory_mib,
                    cores: req.cores,
                })
                .collect();
            self.apply(kind, &grants, true);
            self.out.push(grants);
            if self.place(ci + 1) {
                return true;
            }
            let grants = self.out.pop().unwrap_or_default();
            self.apply(kind, &grants, false);
        }
        self.failure.get_or_insert(failure);
        false
    }

    fn apply(&mut self, kind: ContainerKind, grants: &[DeviceGrant], add: bool) {
        let target = match kind {
            ContainerKind::Init => return,
            ContainerKind::Sidecar => &mut self.sidecars,
            ContainerKind::App => &mut self.apps,
        };
        for g in grants {
            let u = GpuUsage {
                slots: 1,
                memory_mib: g.memory_mib,
                cores: g.cores,
            };
            if add {
                target[g.gpu].add(u);
            } else {
                target[g.gpu].sub(u);
            }
        }
    }

    /// Candidate sets of `req.count` distinct GPUs, best first.
    fn ordered_sets(
        &self,
        req: &DeviceRequest,
        cands: &[(usize, u64)],
        live: &[GpuUsage],
    ) -> Vec<Vec<(usize, u64)>> {
        let gpus = &self.node.inventory.gpus;
        let mut sorted: Vec<(usize, u64)> = cands.to_vec();
        let key = |&(i, mem): &(usize, u64)| -> f64 {
            match self.order {
                GpuOrder::Binpack(w) => -device_score(&gpus[i], live[i], mem, req.cores, w),
                GpuOrder::Spread(w) => device_score(&gpus[i], live[i], mem, req.cores, w),
                GpuOrder::BestFit => free_share(&gpus[i], live[i]),
                GpuOrder::Index => 0.0,
                GpuOrder::Topology => {
                    let total: u32 = cands
                        .iter()
                        .filter(|&&(j, _)| j != i)
                        .map(|&(j, _)| link_score(&gpus[i], &gpus[j]))
                        .sum();
                    f64::from(total)
                }
            }
        };
        let mut keyed: Vec<(f64, (usize, u64))> = sorted.iter().map(|c| (key(c), *c)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.0.cmp(&b.1.0)));
        // Each GPU's policy key in micro-units, so that sets of equal summed keys compare equal exactly.
        let mut micro = vec![0i64; gpus.len()];
        for &(k, (i, _)) in &keyed {
            if let Some(m) = micro.get_mut(i) {
                *m = (k * 1e6).round() as i64;
            }
        }
        sorted = keyed.into_iter().map(|(_, c)| c).collect();
        let count = req.count as usize;
        if count == 1 {
            return sorted.into_iter().map(|c| vec![c]).collect();
        }
        let topology_known = gpus
            .iter()
            .any(|g| g.numa.is_some() || !g.nvlink_peers.is_empty());
        if !topology_known && !req.numa_bind {
            // No topology to prefer: the policy order alone decides; sets in lexicographic order of it.
            return Combinations::new(sorted.len(), count)
                .take(SEARCH_BUDGET as usize)
                .map(|idx| idx.iter().map(|&k| sorted[k]).collect())
                .collect();
        }
        // Pools to draw sets from: with numa-bind one per NUMA node, else one; each capped to the best
        // candidates by policy order (so the cap never hides a feasible NUMA group).
        let cap = TOPOLOGY_CANDIDATE_CAP.max(count);
        let ranked: Vec<(usize, (usize, u64))> = sorted.iter().copied().enumerate().collect();
        let mut pools: Vec<Vec<(usize, (usize, u64))>> = Vec::new();
        if req.numa_bind {
            let mut numas: Vec<Option<u32>> = ranked.iter().map(|&(_, (i, _))| gpus[i].numa).collect();
            numas.sort_unstable();
            numas.dedup();
            for numa in numas {
                let pool: Vec<_> = ranked
                    .iter()
                    .copied()
                    .filter(|&(_, (i, _))| gpus[i].numa == numa)
                    .take(cap)
                    .collect();
                pools.push(pool);
            }
        } else {
            pools.push(ranked.into_iter().take(cap).collect());
        }
        let mut sets: Vec<RankedSet> = Vec::new();
        for pool in &pools {
            for idx in Combinations::new(pool.len(), count) {
                let set: Vec<(usize, u64)> = idx.iter().map(|&k| pool[k].1).collect();
                let numa = gpus[set[0].0].numa;
                let same_numa = set.iter().all(|&(i, _)| gpus[i].numa == numa);
                let mut links = 0u32;
                for (a, &(i, _)) in set.iter().enumerate() {
                    for &(j, _) in &set[a + 1..] {
                        links = links.saturating_add(link_score(&gpus[i], &gpus[j]));
                    }
                }
                let rank: usize = idx.iter().map(|&k| pool[k].0).sum();
                let score: i64 = set.iter().map(|&(i, _)| micro[i]).sum();
                sets.push(RankedSet {
                    score,
                    same_numa,
                    links,
                    rank,
                    set,
                });
            }
        }
        let topology = |a: &RankedSet, b: &RankedSet| {
            b.same_numa
                .cmp(&a.same_numa)
                .then(b.links.cmp(&a.links))
                .then(a.rank.cmp(&b.rank))
        };
        if matches!(self.order, GpuOrder::Topology) || req.numa_bind {
            // Topology first: the topology-aware policy, and numa-bind (all sets share a NUMA node).
            sets.sort_by(topology);
        } else {
            // The policy's score first; NUMA and NVLink only break ties (peer case C26).
            sets.sort_by(|a, b| a.score.cmp(&b.score).then_with(|| topology(a, b)));
        }
        sets.into_iter().map(|s| s.set).collect()
    }
}

/// A candidate set with its sort keys.
struct RankedSet {
    /// Summed policy keys of its GPUs, micro-units (lower is better).
    score: i64,
    /// All its GPUs on one NUMA node.
    same_numa: bool,
    /// Summed link score of its pairs.
    links: u32,
    /// Summed positions of its GPUs in the policy order.
    rank: usize,
    /// (GPU, MiB) per member.
    set: Vec<(usize, u64)>,
}

/// Lexicographic k-combinations of `0..n`.
struct Combinations {
    idx: Vec<usize>,
    n: usize,
    done: bool,
}

impl Combinations {
    fn new(n: usize, k: usize) -> Self {
        Self {
            idx: (0..k).collect(),
            n,
            done: k > n || k == 0,
        }
    }
}

impl Iterator for Combinations {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.done {
            return None;
        }
        let out = self.idx.clone();
        let k = self.idx.len();
        let mut i = k;
        loop {
            if i == 0 {
                self.done = true;
                break;
            }
            i -= 1;
            if self.idx[i] < self.n - k + i {
                self.idx[i] += 1;
                for j in i + 1..k {
                    self.idx[j] = self.idx[j - 1] + 1;
                }
                break;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_are_lexicographic_and_complete() {
        let all: Vec<Vec<usize>> = Combinations::new(4, 2).collect();
        assert_eq!(
            all,
            vec![
                vec![0, 1],
                vec![0, 2],
                vec![0, 3],
                vec![1, 2],
                vec![1, 3],
                vec![2, 3]
            ]
        );
        assert_eq!(Combinations::new(8, 4).count(), 70);
        assert_eq!(Combinations::new(2, 3).count(), 0);
    }
}
