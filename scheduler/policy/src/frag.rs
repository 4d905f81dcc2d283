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
        let mut counts: HashMap<TaskShape, u64> = HashMap::new();
        let mut order: Vec<TaskShape> = Vec::new();
        let mut total = 0u64;
        for pod in pods {
            let shape = TaskShape::of_pod(pod);
            let e = counts.entry(shape.clone()).or_insert(0);
            if *e == 0 {
                order.push(shape);
            }
            *e += 1;
            total += 1;
        }
        if total == 0 {
            return Self::default();
        }
        // Most popular first; first-seen order breaks ties so the model is deterministic.
        let mut ranked: Vec<(usize, TaskShape, u64)> = order
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let c = counts[&s];
                (i, s, c)
            })
            .collect();
        ranked.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let mut kept = Vec::new();
        let mut covered = 0u64;
        for (_, shape, c) in ranked {
            let done = covered as f64 >= coverage * total as f64;
            if done && !kept.is_empty() {
                break;
            }
            covered += c;
            kept.push((shape, c));
        }
        let alpha: f64 = std::env::var("ALPHA")
            .ok()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        let w: Vec<(TaskShape, f64)> = kept
            .into_iter()
            .map(|(s, c)| {
                let d = s
                    .gpu
                    .as_ref()
                    .map_or(0.0, |g| f64::from(g.count) * f64::from(g.cores) / 100.0);
                let wt = if alpha == 0.0 {
                    c as f64
                } else {
                    c as f64 * d.max(0.05).powf(alpha)
                };
                (s, wt)
            })
            .collect();
        let tot: f64 = w.iter().map(|x| x.1).sum();
        let shapes = w.into_iter().map(|(s, c)| (s, c / tot)).collect();
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
