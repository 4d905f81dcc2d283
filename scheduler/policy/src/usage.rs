//! Usage-aware placement (ours; HAMi has no equivalent): pack on what the GPUs **really** use, as the
//! agent's kernel telemetry measures it (`hami.io/node-nvidia-usage`, [`hami_api::NodeUsage`]), with a
//! safety margin, on top of the allocation accounting every policy does.
//!
//! Two rules, both pure functions of a node's state ([`NodeState::measured`]) and the pod:
//!
//! 1. **Filter.** A GPU is not used for a container when its measured memory (the larger of `usedMiB`
//!    and `peakMiB`) plus the margin (`margin_percent` of its *physical* memory, multiplied before
//!    dividing) plus the memory this pod would put on it exceeds its physical memory. Such GPUs fail with
//!    [`Reason::MeasuredMemoryPressure`]. This catches what allocations cannot: memory overcommit
//!    (`deviceMemoryScaling > 1`) and tenants whose real use exceeds what the scheduler believes.
//!    The allocation checks of [`fit_pod`] still apply, so allocations are never overcommitted.
//! 2. **Score.** Among the feasible nodes the one with the highest measured utilisation wins (mean over
//!    its sampled GPUs of `max(memory used / physical, SM % / 100)`), the allocation-based HAMi binpack
//!    node score breaks ties; inside the node a one-GPU container goes to the feasible GPU with the
//!    highest measured utilisation (binpack device score breaking ties), other shapes take HAMi's
//!    binpack GPU order.
//!
//! With no usage data on a node ([`NodeState::measured`] empty or all `None`) both rules reduce to
//! HAMi's binpack (node and GPU level), exactly.

use hami_api::{GpuDevice, PodRequest};

use crate::{
    fit::{FitFailure, GpuOrder, Reason, ScoringWeights, device_eligible, device_fit, device_score, fit_pod},
    policies::{Policy, Scored, hami_node_score},
    state::{DeviceGrant, NodeState},
};

/// HAMi-style default safety margin: 10 % of a GPU's physical memory is kept free of measured use.
pub const DEFAULT_MARGIN_PERCENT: u32 = 10;

/// Weight of measured utilisation in the node score: larger than the largest HAMi node score (30), so
/// measured utilisation decides and allocations only break ties.
const MEASURED_WEIGHT: f64 = 100.0;

/// One GPU's measured use (from the agent's usage annotation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MeasuredGpu {
    /// Device memory in use, MiB (kernel-observed, all containers).
    pub used_mib: u64,
    /// Largest use since the previous heartbeat, MiB.
    pub peak_mib: u64,
    /// Measured SM utilisation, percent of the GPU (0..=100), when measured.
    pub sm_percent: Option<u32>,
}

impl MeasuredGpu {
    /// The memory figure the filter uses: the larger of current and peak use, MiB.
    #[must_use]
    pub fn memory_mib(&self) -> u64 {
        self.used_mib.max(self.peak_mib)
    }

    /// Utilisation of `gpu` as a fraction (0.0..=1.0): the larger of memory (against physical memory)
    /// and SM use.
    #[must_use]
    pub fn utilisation(&self, gpu: &GpuDevice) -> f64 {
        let mem = if gpu.memory_mib == 0 {
            0.0
        } else {
            (self.memory_mib() as f64 / gpu.memory_mib as f64).min(1.0)
        };
        let sm = f64::from(self.sm_percent.unwrap_or(0).min(100)) / 100.0;
        mem.max(sm)
    }
}

/// Whether `extra_mib` more device memory fits on `gpu` given its measurement: `measured + margin +
/// extra ≤ physical`, with `margin = physical × margin_percent / 100`. A GPU without a measurement
/// always has room (the allocation checks alone decide).
#[must_use]
pub fn measured_room(
    gpu: &GpuDevice,
    measured: Option<&MeasuredGpu>,
    margin_percent: u32,
    extra_mib: u64,
) -> bool {
    let Some(m) = measured else {
        return true;
    };
    let margin = gpu.memory_mib.saturating_mul(u64::from(margin_percent)) / 100;
    m.memory_mib().saturating_add(margin).saturating_add(extra_mib) <= gpu.memory_mib
}

/// Mean measured utilisation over a node's sampled GPUs (0.0 without samples).
#[must_use]
pub fn node_measured_utilisation(node: &NodeState) -> f64 {
    let (sum, n) = node
        .inventory
        .gpus
        .iter()
        .zip(&node.measured)
        .filter_map(|(g, m)| m.as_ref().map(|m| m.utilisation(g)))
        .fold((0.0, 0u32), |(s, n), u| (s + u, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

/// The usage-aware policy (module docs).
#[derive(Debug, Clone)]
pub struct UsageAwarePolicy {
    margin_percent: u32,
    weights: ScoringWeights,
}

impl Default for UsageAwarePolicy {
    fn default() -> Self {
        Self::new(DEFAULT_MARGIN_PERCENT)
    }
}

impl UsageAwarePolicy {
    /// With a safety margin of `margin_percent` (0..=100) of each GPU's physical memory.
    #[must_use]
    pub fn new(margin_percent: u32) -> Self {
        Self {
            margin_percent: margin_percent.min(100),
            weights: ScoringWeights::default(),
        }
    }

    /// The same policy with these device scoring weights for the binpack GPU order.
    #[must_use]
    pub fn with_weights(mut self, weights: ScoringWeights) -> Self {
        self.weights = weights;
        self
    }

    /// The margin, percent of physical memory.
    #[must_use]
    pub fn margin_percent(&self) -> u32 {
        self.margin_percent
    }

    fn measured<'a>(&self, node: &'a NodeState, gpu: usize) -> Option<&'a MeasuredGpu> {
        node.measured.get(gpu).and_then(Option::as_ref)
    }
}

impl Policy for UsageAwarePolicy {
    fn name(&self) -> &str {
        "usage-aware"
    }

    fn score(&self, node: &NodeState, pod: &PodRequest) -> Result<Scored, FitFailure> {
        let gpus = &node.inventory.gpus;
        // Rule 1: per container, the GPUs its request would push past the measured limit are excluded
        // (through the selector, so the complete search of `fit_pod` still runs).
        let mut filtered = pod.clone();
        let mut pressured = 0u32;
        for c in &mut filtered.containers {
            let Some(req) = c.gpu.as_mut() else { continue };
            for (i, g) in gpus.iter().enumerate() {
                let mem = req.memory.resolve(g.schedulable_memory_mib());
                if req.selector.allows_uuid(&g.uuid)
                    && !measured_room(g, self.measured(node, i), self.margin_percent, mem)
                {
                    req.selector.nouse_uuids.push(g.uuid.clone());
                    pressured += 1;
                }
            }
        }
        let mut placement = match fit_pod(node, &filtered, GpuOrder::Binpack(self.weights)) {
            Ok(p) => p,
            Err(mut failure) => {
                // The excluded GPUs show as UUID mismatches; name them for what they are.
                let mismatched = failure.reasons.remove(&Reason::UuidMismatch).unwrap_or(0);
                let moved = mismatched.min(pressured);
                if mismatched > moved {
                    failure.reasons.insert(Reason::UuidMismatch, mismatched - moved);
                }
                if moved > 0 {
                    failure.reasons.insert(Reason::MeasuredMemoryPressure, moved);
                }
                return Err(failure);
            }
        };
        // Rule 2 inside the node: a lone one-GPU container goes to the busiest feasible GPU.
        if let Some(ci) = pod.single_gpu_container()
            && let Some(req) = filtered.containers[ci].gpu.as_ref()
            && req.count == 1
            && !node.measured.iter().all(Option::is_none)
        {
            let mut best: Option<(f64, f64, usize, u64)> = None;
            for (i, g) in gpus.iter().enumerate() {
                let mem = req.memory.resolve(g.schedulable_memory_mib());
                if device_eligible(g, req).is_err() || device_fit(g, node.gpus[i], mem, req.cores).is_err() {
                    continue;
                }
                let util = self.measured(node, i).map_or(0.0, |m| m.utilisation(g));
                let pack = device_score(g, node.gpus[i], mem, req.cores, self.weights);
                let better = best.as_ref().is_none_or(|&(bu, bp, _, _)| {
                    util > bu + 1e-12 || ((util - bu).abs() <= 1e-12 && pack > bp)
                });
                if better {
                    best = Some((util, pack, i, mem));
                }
            }
            if let Some((_, _, gpu, memory_mib)) = best {
                placement.containers[ci] = vec![DeviceGrant {
                    gpu,
                    memory_mib,
                    cores: req.cores,
                }];
            }
        }
        // Several containers of the pod may share a GPU: check their sum against the measured limit.
        for (i, c) in placement.charge(pod, gpus.len()).iter().enumerate() {
            if !c.is_idle()
                && !measured_room(
                    &gpus[i],
                    self.measured(node, i),
                    self.margin_percent,
                    c.memory_mib,
                )
            {
                let mut failure = FitFailure {
                    devices: u32::try_from(gpus.len()).unwrap_or(u32::MAX),
                    ..FitFailure::default()
                };
                failure.reasons.insert(Reason::MeasuredMemoryPressure, 1);
                return Err(failure);
            }
        }
        let score = MEASURED_WEIGHT * node_measured_utilisation(node) + hami_node_score(node);
        Ok(Scored { score, placement })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use std::sync::Arc;

    use hami_api::{
        ContainerKind, ContainerRequest, DeviceRequest, GpuPolicy, MemoryRequest, NodeInventory, NodePolicy,
    };
    use proptest::prelude::*;
    use rand::SeedableRng;

    use super::*;
    use crate::{Cluster, Ledger, policies::HamiPolicy};

    fn node(name: &str, gpus: u32, mem: u64) -> NodeState {
        NodeState::new(Arc::new(NodeInventory {
            name: name.into(),
            cpu_milli: 64_000,
            memory_mib: 1 << 20,
            gpus: (0..gpus)
                .map(|i| hami_api::GpuDevice::new(format!("{name}-g{i}"), i, "A100", mem))
                .collect(),
        }))
    }

    fn pod(uid: &str, count: u32, mem: u64, cores: u32) -> PodRequest {
        PodRequest {
            namespace: "ns".into(),
            name: uid.into(),
            uid: uid.into(),
            containers: vec![ContainerRequest {
                name: "c".into(),
                kind: ContainerKind::App,
                cpu_milli: 0,
                memory_mib: 0,
                gpu: Some(DeviceRequest::new(count, MemoryRequest::Mib(mem), cores)),
            }],
            node_policy: None,
            gpu_policy: None,
        }
    }

    fn measured(used: u64, sm: u32) -> Option<MeasuredGpu> {
        Some(MeasuredGpu {
            used_mib: used,
            peak_mib: used,
            sm_percent: Some(sm),
        })
    }

    #[test]
    fn margin_multiplies_first_and_is_inclusive() {
        let g = hami_api::GpuDevice::new("g", 0, "A100", 10_000);
        // 10 % of 10000 = 1000: 8000 + 1000 + 1000 = 10000 fits exactly, one MiB more does not.
        assert!(measured_room(&g, measured(8000, 0).as_ref(), 10, 1000));
        assert!(!measured_room(&g, measured(8000, 0).as_ref(), 10, 1001));
        assert!(measured_room(&g, None, 10, 10_000));
        // Peak counts even when current use dropped.
        let m = MeasuredGpu {
            used_mib: 0,
            peak_mib: 9500,
            sm_percent: None,
        };
        assert!(!measured_room(&g, Some(&m), 0, 501));
    }

    #[test]
    fn pressure_filters_with_its_reason() {
        let mut n = node("n", 2, 16_000);
        n.measured = vec![measured(15_000, 10), measured(14_000, 10)];
        let f = UsageAwarePolicy::default()
            .score(&n, &pod("u", 1, 2000, 10))
            .unwrap_err();
        assert_eq!(f.reasons.get(&Reason::MeasuredMemoryPressure), Some(&2), "{f}");
        assert!(!f.has(Reason::UuidMismatch), "{f}");
        assert_eq!(f.to_string(), "2/2 MeasuredMemoryPressure");
        // One GPU with room: it is taken, though allocations alone would allow both.
        n.measured[1] = measured(1000, 10);
        let s = UsageAwarePolicy::default()
            .score(&n, &pod("u", 1, 2000, 10))
            .unwrap();
        assert_eq!(s.placement.containers[0][0].gpu, 1);
    }

    #[test]
    fn prefers_the_busiest_gpu_and_node() {
        let mut a = node("a", 2, 16_000);
        a.measured = vec![measured(1000, 20), measured(6000, 70)];
        let mut b = node("b", 2, 16_000);
        b.measured = vec![measured(1000, 5), measured(1000, 5)];
        let p = UsageAwarePolicy::default();
        let sa = p.score(&a, &pod("u", 1, 1000, 10)).unwrap();
        let sb = p.score(&b, &pod("u", 1, 1000, 10)).unwrap();
        assert_eq!(sa.placement.containers[0][0].gpu, 1);
        assert!(sa.score > sb.score);
    }

    #[test]
    fn without_data_it_is_binpack() {
        let hami = HamiPolicy::new(NodePolicy::Binpack, GpuPolicy::Binpack);
        let usage = UsageAwarePolicy::default();
        let mut n = node("n", 4, 16_000);
        let first = pod("p0", 1, 4000, 25);
        let placement = hami.score(&n, &first).unwrap().placement;
        n.commit(&first, &placement).unwrap();
        for (i, p) in [
            pod("a", 1, 3000, 10),
            pod("b", 2, 2000, 5),
            pod("c", 1, 16_000, 100),
        ]
        .iter()
        .enumerate()
        {
            let h = hami.score(&n, p).unwrap();
            let u = usage.score(&n, p).unwrap();
            assert_eq!(h, u, "pod {i}");
        }
    }

    proptest! {
        /// Whatever the measurements, every decision commits without overcommitting allocations and
        /// respects the measured limit on every GPU it uses.
        #[test]
        fn never_overcommits(
            used in proptest::collection::vec((0u64..20_000, 0u32..=100), 4),
            pods in proptest::collection::vec((1u32..=2, 500u64..9000, 0u32..=60), 1..40),
            margin in 0u32..30,
        ) {
            let mut n = node("n", 4, 16_000);
            n.measured = used.iter().map(|&(u, sm)| measured(u, sm)).collect();
            let mut cluster = Cluster::new(vec![n]);
            let mut ledger = Ledger::new();
            let policy = UsageAwarePolicy::new(margin);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            for (k, &(count, mem, cores)) in pods.iter().enumerate() {
                let p = pod(&format!("u{k}"), count, mem, cores);
                let Some(d) = cluster.decide(&policy, &p, &mut rng, None) else {
                    let f = policy.score(&cluster.nodes[0], &p).unwrap_err();
                    prop_assert!(!f.reasons.is_empty());
                    continue;
                };
                for g in d.placement.containers.iter().flatten() {
                    let gpu = &cluster.nodes[0].inventory.gpus[g.gpu];
                    prop_assert!(measured_room(gpu, cluster.nodes[0].measured[g.gpu].as_ref(), margin, g.memory_mib));
                }
                ledger.assume(&mut cluster, &p, &d).unwrap();
            }
            for (g, u) in cluster.nodes[0].inventory.gpus.iter().zip(&cluster.nodes[0].gpus) {
                prop_assert!(crate::state::capacity_check(g, *u).is_ok() || u.is_idle());
            }
        }
    }
}
