//! GPU fragmentation as defined by FGD (Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing
//! Workloads with Fragmentation Gradient Descent", USENIX ATC '23; definitions as summarised in
//! `reference/alibaba-gpu-trace.md` §4.1), generalised to HAMi's device model.
//!
//! A node's fragmentation *as seen by a task shape m*, `F_n(m)`, in GPUs:
//! - m needs no GPU, or the node cannot host m at all (not enough host CPU, or fewer than `count` of its
//!   GPUs can take m): every free share on the node is fragment;
//! - otherwise: the free shares of the GPUs that cannot take m.
//!
//! "Can take" is exactly the filter's device check ([`crate::fit::device_fit`] and
//! [`crate::fit::device_eligible`]), and a GPU's free share is [`crate::fit::free_share`], the smaller of
//! its free compute and memory fractions. The node's fragmentation is the expectation over a workload
//! model: `F_n(M) = Σ_m p_m · F_n(m)`.

use std::collections::HashMap;

use hami_api::{DeviceRequest, NodeInventory, PodRequest};

use crate::{
    fit::{device_eligible, device_fit, free_share},
    state::GpuUsage,
};

/// A task shape: the host CPU and the GPU request of a single-container pod, the unit FGD's workload
/// model counts (memory is not part of it, as in the paper's artifact).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskShape {
    /// Host CPU, milli-vCPU.
    pub cpu_milli: u64,
    /// GPUs asked for; `None` for a CPU-only task.
    pub gpu: Option<DeviceRequest>,
}

impl TaskShape {
    /// The shape of a pod: its effective CPU and the GPU request of its first GPU container (FGD's
    /// shapes are single-container).
    #[must_use]
    pub fn of_pod(pod: &PodRequest) -> Self {
        Self {
            cpu_milli: pod.effective_cpu_milli(),
            gpu: pod.containers.iter().find_map(|c| c.gpu.clone()),
        }
    }
}

/// The target workload: task shapes with their popularity `p_m` (summing to 1).
#[derive(Debug, Clone, Default)]
pub struct WorkloadModel {
    /// Shapes and probabilities, most popular first.
    pub shapes: Vec<(TaskShape, f64)>,
}

impl WorkloadModel {
    /// Builds the model from observed pods as the FGD artifact does: count shapes, keep the most popular
    /// ones until they cover at least `coverage` (0..=1) of the pods, renormalise.
    #[must_use]
    pub fn from_pods<'a>(pods: impl IntoIterator<Item = &'a PodRequest>, coverage: f64) -> Self {
        Self::from_weighted(pods.into_iter().map(|p| (TaskShape::of_pod(p), 1.0)), coverage)
    }

    /// Builds the model from weighted shape observations (a shape may appear many times; its weights
    /// add up): the heaviest shapes are kept until they cover at least `coverage` (0..=1) of the total
    /// weight, then renormalised. Ties keep first-seen order, so the model is deterministic. Weights
    /// that are not finite and positive are ignored; no weight at all gives the empty model.
    #[must_use]
    pub fn from_weighted(weights: impl IntoIterator<Item = (TaskShape, f64)>, coverage: f64) -> Self {
        let mut index: HashMap<TaskShape, usize> = HashMap::new();
        let mut ranked: Vec<(TaskShape, f64)> = Vec::new();
        let mut total = 0.0;
        for (shape, w) in weights {
            if !(w.is_finite() && w > 0.0) {
                continue;
            }
            total += w;
            match index.get(&shape) {
                Some(&i) => ranked[i].1 += w,
                None => {
                    index.insert(shape.clone(), ranked.len());
                    ranked.push((shape, w));
                }
            }
        }
        if ranked.is_empty() {
            return Self::default();
        }
        // Heaviest first; the sort is stable, so first-seen order breaks ties.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = Vec::new();
        let mut covered = 0.0;
        for (shape, w) in ranked {
            let done = covered >= coverage * total;
            if done && !kept.is_empty() {
                break;
            }
            covered += w;
            kept.push((shape, w));
        }
        let shapes = kept.into_iter().map(|(s, w)| (s, w / covered)).collect();
        Self { shapes }
    }

    /// The total weight of the shapes that ask for more than one GPU.
    #[must_use]
    pub fn multi_gpu_weight(&self) -> f64 {
        self.shapes
            .iter()
            .filter(|(s, _)| s.gpu.as_ref().is_some_and(|r| r.count > 1))
            .map(|(_, p)| p)
            .sum()
    }

    /// The same shapes with each weight divided by the shape's GPU count, `p_m / k_m` (CPU-only and
    /// one-GPU shapes keep theirs); not renormalised, so one-GPU shapes weigh exactly what they weigh in
    /// `self`. `F_n(M)` over this model counts a k-GPU shape's fragment per GPU it asks for rather
    /// than per pod. `fgd-pack` scores with it (see [`crate::policies::FgdPolicy`] for why).
    #[must_use]
    pub fn per_requested_gpu(&self) -> Self {
        let shapes = self
            .shapes
            .iter()
            .map(|(s, p)| {
                let k = s.gpu.as_ref().map_or(1, |r| r.count.max(1));
                (s.clone(), p / f64::from(k))
            })
            .collect();
        Self { shapes }
    }
}

/// `F_n(m)` in GPUs for a node whose GPUs carry `gpus` and whose free host CPU is `free_cpu_milli`.
#[must_use]
pub fn node_frag_for_shape(
    inv: &NodeInventory,
    gpus: &[GpuUsage],
    free_cpu_milli: u64,
    shape: &TaskShape,
) -> f64 {
    let mut all_free = 0.0;
    let mut unusable = 0.0;
    let mut usable_count = 0u32;
    for (gpu, used) in inv.gpus.iter().zip(gpus) {
        let f = free_share(gpu, *used);
        all_free += f;
        let ok = shape.gpu.as_ref().is_some_and(|req| {
            let mem = req.memory.resolve(gpu.schedulable_memory_mib());
            device_eligible(gpu, req).is_ok() && device_fit(gpu, *used, mem, req.cores).is_ok()
        });
        if ok {
            usable_count += 1;
        } else {
            unusable += f;
        }
    }
    match &shape.gpu {
        Some(req) if free_cpu_milli >= shape.cpu_milli && usable_count >= req.count => unusable,
        _ => all_free,
    }
}

/// `F_n(M) = Σ_m p_m · F_n(m)`, in GPUs.
#[must_use]
pub fn node_frag(inv: &NodeInventory, gpus: &[GpuUsage], free_cpu_milli: u64, model: &WorkloadModel) -> f64 {
    model
        .shapes
        .iter()
        .map(|(shape, p)| p * node_frag_for_shape(inv, gpus, free_cpu_milli, shape))
        .sum()
}

/// One GPU's standing for one shape: its free share and whether it can take the shape.
fn gpu_term(gpu: &hami_api::GpuDevice, used: GpuUsage, shape: &TaskShape) -> (f64, bool) {
    let f = free_share(gpu, used);
    let ok = shape.gpu.as_ref().is_some_and(|req| {
        let mem = req.memory.resolve(gpu.schedulable_memory_mib());
        device_eligible(gpu, req).is_ok() && device_fit(gpu, used, mem, req.cores).is_ok()
    });
    (f, ok)
}

/// A node's fragmentation terms, computed once so that the fragmentation after a placement that changes
/// a few GPUs costs O(|M| × changed GPUs) instead of O(|M| × GPUs). Gives exactly [`node_frag`].
#[derive(Debug, Clone)]
pub struct FragBase {
    /// Per shape: (Σ free share, Σ free share of GPUs that cannot take it, GPUs that can take it).
    shapes: Vec<(f64, f64, u32)>,
    /// Per GPU and shape (row-major, GPU-major): free share and whether the GPU can take the shape.
    terms: Vec<(f64, bool)>,
}

impl FragBase {
    /// The terms of a node in state `gpus`.
    #[must_use]
    pub fn new(inv: &NodeInventory, gpus: &[GpuUsage], model: &WorkloadModel) -> Self {
        let m = model.shapes.len();
        let mut shapes = vec![(0.0, 0.0, 0u32); m];
        let mut terms = Vec::with_capacity(m * gpus.len());
        for (gpu, used) in inv.gpus.iter().zip(gpus) {
            for (k, (shape, _)) in model.shapes.iter().enumerate() {
                let (f, ok) = gpu_term(gpu, *used, shape);
                terms.push((f, ok));
                let s = &mut shapes[k];
                s.0 += f;
                if ok {
                    s.2 += 1;
                } else {
                    s.1 += f;
                }
            }
        }
        Self { shapes, terms }
    }

    /// `F_n(M)` with free host CPU `free_cpu_milli` after GPUs `changed` (index, new usage) change.
    #[must_use]
    pub fn frag_after(
        &self,
        inv: &NodeInventory,
        model: &WorkloadModel,
        free_cpu_milli: u64,
        changed: &[(usize, GpuUsage)],
    ) -> f64 {
        let m = model.shapes.len();
        let mut total = 0.0;
        for (k, (shape, p)) in model.shapes.iter().enumerate() {
            let (mut all_free, mut unusable, mut usable) = self.shapes[k];
            for &(i, used) in changed {
                let (f0, ok0) = self.terms[i * m + k];
                all_free -= f0;
                if ok0 {
                    usable -= 1;
                } else {
                    unusable -= f0;
                }
                let (f1, ok1) = gpu_term(&inv.gpus[i], used, shape);
                all_free += f1;
                if ok1 {
                    usable += 1;
                } else {
                    unusable += f1;
                }
            }
            let value = match &shape.gpu {
                Some(req) if free_cpu_milli >= shape.cpu_milli && usable >= req.count => unusable,
                _ => all_free,
            };
            total += p * value;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hami_api::{ContainerKind, ContainerRequest, GpuDevice, MemoryRequest};

    use super::*;

    fn gpu(i: u32) -> GpuDevice {
        let mut g = GpuDevice::new(format!("GPU-{i}"), i, "T4", 16_384);
        g.split_count = 100;
        g
    }

    fn shape(cpu: u64, count: u32, pct: u32) -> TaskShape {
        TaskShape {
            cpu_milli: cpu,
            gpu: (count > 0).then(|| DeviceRequest::new(count, MemoryRequest::Percent(pct), pct)),
        }
    }

    fn used(pct: u32) -> GpuUsage {
        GpuUsage {
            slots: u32::from(pct > 0),
            memory_mib: 16_384 * u64::from(pct) / 100,
            cores: pct,
        }
    }

    fn inv(n: u32) -> NodeInventory {
        NodeInventory {
            name: "n".into(),
            cpu_milli: 8000,
            memory_mib: 1 << 20,
            gpus: (0..n).map(gpu).collect(),
        }
    }

    /// The three cases of the FGD definition, on a 2-GPU node with GPU 0 at 60 % used (0.4 free) and
    /// GPU 1 idle: a 50 % task can use GPU 1 only, so GPU 0's 0.4 is fragment; a 30 % task can use both,
    /// so nothing is; a whole-GPU task sees 0.4; a CPU-only task sees everything (1.4); a task needing
    /// more CPU than is free sees everything; a 2-GPU task cannot be hosted, so it sees everything.
    #[test]
    fn fragment_follows_the_fgd_definition() {
        let inv = inv(2);
        let gpus = [used(60), used(0)];
        let f = |s: &TaskShape, cpu| node_frag_for_shape(&inv, &gpus, cpu, s);
        assert!((f(&shape(1000, 1, 50), 8000) - 0.4).abs() < 1e-9);
        assert!(f(&shape(1000, 1, 30), 8000).abs() < 1e-9);
        assert!((f(&shape(1000, 1, 100), 8000) - 0.4).abs() < 1e-9);
        assert!((f(&shape(1000, 0, 0), 8000) - 1.4).abs() < 1e-9);
        assert!((f(&shape(9000, 1, 30), 8000) - 1.4).abs() < 1e-9);
        assert!((f(&shape(1000, 2, 100), 8000) - 1.4).abs() < 1e-9);
    }

    fn pod(cpu: u64, count: u32, pct: u32) -> PodRequest {
        PodRequest {
            namespace: "ns".into(),
            name: format!("{cpu}-{count}-{pct}"),
            uid: format!("{cpu}-{count}-{pct}"),
            containers: vec![ContainerRequest {
                name: "c".into(),
                kind: ContainerKind::App,
                cpu_milli: cpu,
                memory_mib: 0,
                gpu: (count > 0).then(|| DeviceRequest::new(count, MemoryRequest::Percent(pct), pct)),
            }],
            node_policy: None,
            gpu_policy: None,
        }
    }

    /// The workload model keeps the most popular shapes until they cover the coverage, then
    /// renormalises: 6 × A, 3 × B, 1 × C at 0.9 keeps A and B with 2/3 and 1/3.
    #[test]
    fn workload_model_keeps_popular_shapes_and_renormalises() {
        let mut pods = vec![pod(1000, 1, 50); 6];
        pods.extend(vec![pod(2000, 1, 100); 3]);
        pods.push(pod(500, 0, 0));
        let m = WorkloadModel::from_pods(&pods, 0.9);
        assert_eq!(m.shapes.len(), 2);
        assert_eq!(m.shapes[0].0, shape(1000, 1, 50));
        assert!((m.shapes[0].1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.shapes[1].1 - 1.0 / 3.0).abs() < 1e-12);
        let all = WorkloadModel::from_pods(&pods, 1.0);
        assert_eq!(all.shapes.len(), 3);
    }

    /// `per_requested_gpu` divides a k-GPU shape's weight by k and leaves CPU-only and one-GPU shapes
    /// as they are.
    #[test]
    fn per_requested_gpu_weighs_multi_gpu_shapes_per_gpu() {
        let pods = [
            pod(1000, 1, 50),
            pod(500, 0, 0),
            pod(2000, 2, 100),
            pod(8000, 8, 100),
        ];
        let m = WorkloadModel::from_pods(&pods, 1.0);
        assert!((m.multi_gpu_weight() - 0.5).abs() < 1e-12);
        let w = m.per_requested_gpu();
        let weight = |model: &WorkloadModel, s: &TaskShape| {
            model
                .shapes
                .iter()
                .find(|(t, _)| t == s)
                .map(|(_, p)| *p)
                .unwrap()
        };
        for (s, k) in [
            (shape(1000, 1, 50), 1.0),
            (shape(500, 0, 0), 1.0),
            (shape(2000, 2, 100), 2.0),
            (shape(8000, 8, 100), 8.0),
        ] {
            assert!((weight(&w, &s) - 0.25 / k).abs() < 1e-12, "{s:?}");
        }
        let single = WorkloadModel::from_pods(&pods[..2], 1.0);
        assert!(single.multi_gpu_weight().abs() < 1e-12);
        assert_eq!(single.per_requested_gpu().shapes, single.shapes);
    }

    proptest::proptest! {
        /// `FragBase::frag_after` equals a full recomputation with `node_frag`, for any node state,
        /// change and free CPU.
        #[test]
        fn incremental_fragmentation_equals_full_recomputation(
            uses in proptest::collection::vec(0u32..=100, 1..8),
            change in (0usize..8, 0u32..=100),
            cpu in 0u64..10_000,
            cpu_after in 0u64..10_000,
        ) {
            let n = u32::try_from(uses.len()).unwrap();
            let inv = Arc::new(inv(n));
            let gpus: Vec<GpuUsage> = uses.iter().map(|&p| used(p)).collect();
            let pods = vec![pod(1000, 1, 50), pod(3000, 1, 100), pod(500, 0, 0), pod(2000, 2, 100), pod(100, 1, 20)];
            let model = WorkloadModel::from_pods(&pods, 1.0);
            let base = FragBase::new(&inv, &gpus, &model);
            let before = base.frag_after(&inv, &model, cpu, &[]);
            proptest::prop_assert!((before - node_frag(&inv, &gpus, cpu, &model)).abs() < 1e-9);
            let i = change.0 % gpus.len();
            let mut after = gpus.clone();
            after[i] = used(change.1);
            let inc = base.frag_after(&inv, &model, cpu_after, &[(i, after[i])]);
            proptest::prop_assert!((inc - node_frag(&inv, &after, cpu_after, &model)).abs() < 1e-9);
        }
    }
}
