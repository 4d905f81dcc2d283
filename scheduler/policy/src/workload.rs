//! The workload model a live scheduler gives FGD ([`crate::frag`]): which task shapes to expect.
//!
//! The trace simulator knows the whole trace in advance; a scheduler does not. It learns the
//! distribution from what it sees: the GPU requests of the pods it currently holds, plus a decayed
//! history of the requests it was recently asked to place ([`WorkloadHistory`]), and falls back to a
//! default model ([`DefaultModel`]) until it has seen enough ([`build_model`]). Everything here is
//! pure and deterministic: the same observations in the same order give the same model, no clock is
//! read (the history decays per observation, not per second).
//!
//! Shapes are GPU-only ([`gpu_shape`]): host CPU is zero, because the extender leaves host resources
//! to kube-scheduler (which sees every pod, not only GPU pods), and UUID selectors are dropped (they
//! name one pod's GPUs, not a kind of demand). GPU-type selectors stay: they are part of the demand.

use std::collections::{HashSet, VecDeque};

use hami_api::{DeviceRequest, MemoryRequest, PodRequest};

use crate::frag::{TaskShape, WorkloadModel};

/// The FGD paper's coverage: keep the most popular shapes covering 95 % of the weight.
pub const DEFAULT_COVERAGE: f64 = 0.95;

/// The GPU pods of the embedded Alibaba `default` trace (`data/alibaba-gpu-v2023/openb_pod_list_default.csv`,
/// 8152 pods of which 7064 ask for GPUs) by shape: `(GPUs, percent of each GPU, pods)`. The trace's
/// `gpu_milli` is the share of one GPU's compute and memory, so a shape asks `percent` % of both. The
/// CPU-only pods are left out (the extender never places them). `hami-sim`'s tests check this table
/// against the trace file.
pub const ALIBABA_DEFAULT_SHAPES: &[(u32, u32, u32)] = &[
    (1, 100, 3911),
    (1, 81, 1078),
    (1, 47, 750),
    (1, 32, 328),
    (1, 65, 253),
    (1, 23, 140),
    (1, 46, 128),
    (1, 59, 75),
    (1, 16, 74),
    (1, 55, 72),
    (1, 22, 62),
    (1, 37, 47),
    (8, 100, 44),
    (1, 11, 24),
    (1, 48, 19),
    (2, 100, 16),
    (4, 100, 15),
    (1, 5, 7),
    (1, 33, 7),
    (1, 35, 6),
    (1, 27, 4),
    (1, 44, 2),
    (1, 29, 1),
    (1, 14, 1),
];

/// The model to use until enough pods were observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultModel {
    /// The GPU shapes of the Alibaba `default` trace ([`ALIBABA_DEFAULT_SHAPES`]), cut at
    /// [`DEFAULT_COVERAGE`].
    #[default]
    AlibabaDefault,
    /// One GPU at 10 %, 20 %, …, 100 % (compute and memory), equally likely.
    Uniform,
}

impl DefaultModel {
    /// The model.
    #[must_use]
    pub fn model(self) -> WorkloadModel {
        let shape = |count: u32, pct: u32| TaskShape {
            cpu_milli: 0,
            gpu: Some(DeviceRequest::new(count, MemoryRequest::Percent(pct), pct)),
        };
        match self {
            Self::AlibabaDefault => WorkloadModel::from_weighted(
                ALIBABA_DEFAULT_SHAPES
                    .iter()
                    .map(|&(count, pct, pods)| (shape(count, pct), f64::from(pods))),
                DEFAULT_COVERAGE,
            ),
            Self::Uniform => WorkloadModel::from_weighted((1..=10).map(|k| (shape(1, k * 10), 1.0)), 1.0),
        }
    }
}

/// A pod's shape for the live workload model: its first GPU container's request without UUID
/// selectors, host CPU zero (module docs); `None` for a pod without GPUs.
#[must_use]
pub fn gpu_shape(pod: &PodRequest) -> Option<TaskShape> {
    let mut req = pod.containers.iter().find_map(|c| c.gpu.clone())?;
    req.selector.use_uuids.clear();
    req.selector.nouse_uuids.clear();
    Some(TaskShape {
        cpu_milli: 0,
        gpu: Some(req),
    })
}

/// A bounded, decayed history of the shapes asked for, one observation per pod UID.
///
/// Every new observation multiplies the existing weights by `0.5^(1/half_life)` and adds 1 to its
/// shape, so a shape last asked `half_life` observations ago counts half. At most `max_shapes` shapes
/// are kept (the lightest goes, the least recently seen first among equals) and at most `max_uids`
/// UIDs are remembered (oldest first), so memory is bounded whatever the cluster does.
#[derive(Debug, Clone)]
pub struct WorkloadHistory {
    alpha: f64,
    max_shapes: usize,
    max_uids: usize,
    /// Shape, weight, sequence number of its last observation.
    shapes: Vec<(TaskShape, f64, u64)>,
    seq: u64,
    uids: VecDeque<String>,
    seen: HashSet<String>,
}

impl WorkloadHistory {
    /// An empty history; `half_life` in observations (values below 1 count as 1), `max_shapes` and
    /// `max_uids` at least 1.
    #[must_use]
    pub fn new(half_life: f64, max_shapes: usize, max_uids: usize) -> Self {
        let half_life = if half_life.is_finite() {
            half_life.max(1.0)
        } else {
            1.0
        };
        Self {
            alpha: 0.5f64.powf(1.0 / half_life),
            max_shapes: max_shapes.max(1),
            max_uids: max_uids.max(1),
            shapes: Vec::new(),
            seq: 0,
            uids: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Records that pod `uid` asks for `shape`. Returns `false` (and changes nothing) when this UID
    /// was already observed and is still remembered: retries of the same pod count once.
    pub fn observe(&mut self, uid: &str, shape: TaskShape) -> bool {
        if self.seen.contains(uid) {
            return false;
        }
        if self.uids.len() >= self.max_uids
            && let Some(old) = self.uids.pop_front()
        {
            self.seen.remove(&old);
        }
        self.uids.push_back(uid.to_owned());
        self.seen.insert(uid.to_owned());
        self.seq += 1;
        for s in &mut self.shapes {
            s.1 *= self.alpha;
        }
        match self.shapes.iter_mut().find(|s| s.0 == shape) {
            Some(s) => {
                s.1 += 1.0;
                s.2 = self.seq;
            }
            None => {
                if self.shapes.len() >= self.max_shapes
                    && let Some(i) = self
                        .shapes
                        .iter()
                        .enumerate()
                        .min_by(|a, b| a.1.1.total_cmp(&b.1.1).then(a.1.2.cmp(&b.1.2)))
                        .map(|(i, _)| i)
                {
                    self.shapes.remove(i);
                }
                self.shapes.push((shape, 1.0, self.seq));
            }
        }
        true
    }

    /// Shapes with their decayed weights, in first-kept order.
    pub fn weights(&self) -> impl Iterator<Item = (&TaskShape, f64)> {
        self.shapes.iter().map(|(s, w, _)| (s, *w))
    }

    /// Sum of the decayed weights.
    #[must_use]
    pub fn total_weight(&self) -> f64 {
        self.shapes.iter().map(|s| s.1).sum()
    }

    /// Observations so far (UIDs counted once while remembered).
    #[must_use]
    pub fn observations(&self) -> u64 {
        self.seq
    }
}

/// Where a built model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// From held pods and history.
    Observed,
    /// Not enough seen yet: the default model.
    Default,
}

/// The live workload model: each held pod's shape with weight 1 plus the history's decayed weights,
/// cut at `coverage` ([`WorkloadModel::from_weighted`]). When that weight is below `min_weight` (not
/// enough seen yet), or nothing has a GPU shape, it is `fallback` instead.
#[must_use]
pub fn build_model(
    held: impl IntoIterator<Item = TaskShape>,
    history: &WorkloadHistory,
    coverage: f64,
    min_weight: f64,
    fallback: &WorkloadModel,
) -> (WorkloadModel, ModelSource) {
    let mut weights: Vec<(TaskShape, f64)> = held.into_iter().map(|s| (s, 1.0)).collect();
    weights.extend(history.weights().map(|(s, w)| (s.clone(), w)));
    let total: f64 = weights.iter().map(|w| w.1).sum();
    if total < min_weight || total <= 0.0 {
        return (fallback.clone(), ModelSource::Default);
    }
    let model = WorkloadModel::from_weighted(weights, coverage);
    if model.shapes.is_empty() {
        return (fallback.clone(), ModelSource::Default);
    }
    (model, ModelSource::Observed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use hami_api::{ContainerKind, ContainerRequest};

    use super::*;

    fn shape(pct: u32) -> TaskShape {
        TaskShape {
            cpu_milli: 0,
            gpu: Some(DeviceRequest::new(1, MemoryRequest::Percent(pct), pct)),
        }
    }

    fn prob(m: &WorkloadModel, s: &TaskShape) -> f64 {
        m.shapes.iter().find(|(x, _)| x == s).map_or(0.0, |(_, p)| *p)
    }

    /// The default table follows the trace's popularity, sums to the trace's 7064 GPU pods, and the
    /// 95 % cut keeps the heaviest shapes first with probabilities summing to 1.
    #[test]
    fn alibaba_default_model() {
        let pods: u32 = ALIBABA_DEFAULT_SHAPES.iter().map(|s| s.2).sum();
        assert_eq!(pods, 7064);
        let m = DefaultModel::AlibabaDefault.model();
        assert!(m.shapes.len() < ALIBABA_DEFAULT_SHAPES.len() && m.shapes.len() >= 8);
        assert_eq!(m.shapes[0].0, shape(100));
        let sum: f64 = m.shapes.iter().map(|s| s.1).sum();
        assert!((sum - 1.0).abs() < 1e-12);
        assert!(m.shapes.windows(2).all(|w| w[0].1 >= w[1].1));
        let u = DefaultModel::Uniform.model();
        assert_eq!(u.shapes.len(), 10);
        assert!(u.shapes.iter().all(|(_, p)| (p - 0.1).abs() < 1e-12));
    }

    /// A UID counts once; weights halve after `half_life` further observations.
    #[test]
    fn history_decays_and_counts_each_uid_once() {
        let mut h = WorkloadHistory::new(2.0, 8, 100);
        assert!(h.observe("a", shape(50)));
        assert!(!h.observe("a", shape(50)), "a retry of the same pod");
        assert!(h.observe("b", shape(20)));
        assert!(h.observe("c", shape(20)));
        let w: Vec<f64> = h.weights().map(|(_, w)| w).collect();
        // 50 %: 1 decayed twice by 2^-1/2 = 0.5; 20 %: 1 × 2^-1/2 + 1.
        assert!((w[0] - 0.5).abs() < 1e-12, "{w:?}");
        assert!((w[1] - (0.5f64.sqrt() + 1.0)).abs() < 1e-12, "{w:?}");
        assert_eq!(h.observations(), 3);
    }

    /// At most `max_shapes` shapes (the lightest goes) and `max_uids` UIDs (the oldest is forgotten
    /// and may be observed again).
    #[test]
    fn history_is_bounded() {
        let mut h = WorkloadHistory::new(1000.0, 2, 3);
        for (uid, pct) in [("a", 10), ("b", 10), ("c", 20), ("d", 30)] {
            h.observe(uid, shape(pct));
        }
        let kept: Vec<TaskShape> = h.weights().map(|(s, _)| s.clone()).collect();
        assert_eq!(
            kept,
            vec![shape(10), shape(30)],
            "20 % was the lightest when 30 % came"
        );
        assert!(h.observe("a", shape(10)), "a was forgotten (3 UIDs remembered)");
        assert!(!h.observe("d", shape(30)));
    }

    /// Below the minimum weight the fallback is used; above it the held pods and the history make
    /// the model, held pods weighing 1 each.
    #[test]
    fn model_from_held_pods_and_history_with_fallback() {
        let fallback = DefaultModel::Uniform.model();
        let mut h = WorkloadHistory::new(1e9, 8, 100);
        h.observe("a", shape(50));
        let (m, src) = build_model([shape(30)], &h, 1.0, 4.5, &fallback);
        assert_eq!(src, ModelSource::Default);
        assert_eq!(m.shapes.len(), 10);
        for uid in ["b", "c", "d"] {
            h.observe(uid, shape(50));
        }
        let (m, src) = build_model([shape(30)], &h, 1.0, 4.5, &fallback);
        assert_eq!(src, ModelSource::Observed);
        assert!((prob(&m, &shape(50)) - 0.8).abs() < 1e-6, "{m:?}");
        assert!((prob(&m, &shape(30)) - 0.2).abs() < 1e-6, "{m:?}");
        // The coverage cut drops the rare shape.
        let (m, _) = build_model([shape(30)], &h, 0.75, 4.5, &fallback);
        assert_eq!(m.shapes.len(), 1);
        assert_eq!(m.shapes[0].0, shape(50));
    }

    /// Same observations in the same order, same model.
    #[test]
    fn deterministic() {
        let run = || {
            let mut h = WorkloadHistory::new(3.0, 4, 10);
            for i in 0..40u32 {
                h.observe(&format!("u{i}"), shape(10 * (1 + i % 7)));
            }
            build_model([shape(40), shape(40)], &h, 0.9, 1.0, &WorkloadModel::default()).0
        };
        let (a, b) = (run(), run());
        assert_eq!(a.shapes.len(), b.shapes.len());
        for (x, y) in a.shapes.iter().zip(&b.shapes) {
            assert_eq!(x.0, y.0);
            assert!(x.1.to_bits() == y.1.to_bits());
        }
    }

    /// The live shape is the first GPU container's request without UUID selectors and without CPU.
    #[test]
    fn gpu_shape_of_a_pod() {
        let mut req = DeviceRequest::new(2, MemoryRequest::Mib(3000), 30);
        req.selector.use_uuids = vec!["GPU-1".into()];
        req.selector.use_types = vec!["A100".into()];
        let pod = PodRequest {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            containers: vec![
                ContainerRequest {
                    name: "side".into(),
                    kind: ContainerKind::App,
                    cpu_milli: 500,
                    memory_mib: 0,
                    gpu: None,
                },
                ContainerRequest {
                    name: "main".into(),
                    kind: ContainerKind::App,
                    cpu_milli: 4000,
                    memory_mib: 0,
                    gpu: Some(req),
                },
            ],
            node_policy: None,
            gpu_policy: None,
        };
        let s = gpu_shape(&pod).unwrap();
        assert_eq!(s.cpu_milli, 0);
        let g = s.gpu.unwrap();
        assert_eq!((g.count, g.memory, g.cores), (2, MemoryRequest::Mib(3000), 30));
        assert!(g.selector.use_uuids.is_empty());
        assert_eq!(g.selector.use_types, vec!["A100".to_owned()]);
        let mut cpu_only = pod.clone();
        cpu_only.containers.truncate(1);
        assert!(gpu_shape(&cpu_only).is_none());
    }
}
