//! The FGD paper's replay method (`reference/alibaba-gpu-trace.md` §2), run through hami's placement core:
//!
//! 1. the pod rows, shuffled with the seed;
//! 2. inflation: clones drawn uniformly with replacement from the rows are appended until the total GPU
//!    demand reaches `inflation` × the cluster's GPU capacity (130 % in the paper);
//!    a trace already above it has random pods removed instead;
//! 3. each pod gets one placement attempt (bind or drop, no retry, no departures);
//! 4. after each pod: arrived % (demand of all pods so far, failed ones included, over capacity),
//!    allocated %, and the cluster's fragmentation (FGD measure, % of capacity);
//! 5. per integer arrived percent 0..=[`MAX_ARRIVED_PCT`], the mean over the pods that fall in it.

use hami_policy::{Policy, ScoreCache, WorkloadModel, node_frag};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::trace::{NodeList, TracePod};

/// Highest arrived-workload percent reported.
pub const MAX_ARRIVED_PCT: usize = 130;

/// The paper's inflation target: 130 % of GPU capacity.
pub const PAPER_INFLATION: f64 = 1.3;

/// The paper's workload-model coverage: the most popular shapes covering 95 % of pods.
pub const PAPER_SHAPE_COVERAGE: f64 = 0.95;

/// One run's curve: per integer arrived percent, the mean unallocated GPU % and fragmentation % of the
/// pods in that bin (`None` when no pod fell in it).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Index = arrived percent; value = mean unallocated GPU %, 100 − allocation %.
    pub unallocated_pct: Vec<Option<f64>>,
    /// Index = arrived percent; value = mean fragmentation, % of cluster GPU capacity.
    pub frag_pct: Vec<Option<f64>>,
    /// Pods submitted.
    pub pods: usize,
    /// Pods placed.
    pub placed: usize,
}

/// The pod sequence for one seed: shuffled rows, then inflation clones (or removals).
#[must_use]
pub fn pod_sequence(pods: &[TracePod], capacity_milli: u64, inflation: f64, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seq: Vec<usize> = (0..pods.len()).collect();
    seq.shuffle(&mut rng);
    let target = (capacity_milli as f64 * inflation).floor() as u64;
    let mut total: u64 = seq.iter().map(|&i| pods[i].gpu_milli_total).sum();
    if total > target {
        // Remove random pods until the demand is within the target.
        while total > target && !seq.is_empty() {
            let k = rng.random_range(0..seq.len());
            total -= pods[seq[k]].gpu_milli_total;
            seq.remove(k);
        }
    } else if pods.iter().any(|p| p.gpu_milli_total > 0) {
        // Clones until the demand reaches the target; the last one may overshoot it slightly, so the
        // curve reaches the target percent.
        while total < target {
            let k = rng.random_range(0..pods.len());
            total += pods[k].gpu_milli_total;
            seq.push(k);
        }
    }
    seq
}

/// Replays `seq` with `policy` on an idle cluster built from `nodes`. `tie_seed` seeds the node order
/// (ties go to the first node in it) and any randomness of the policy. `on_pod` is called after every pod (for progress).
pub fn run(
    nodes: &NodeList,
    pods: &[TracePod],
    seq: &[usize],
    policy: &dyn Policy,
    model: &WorkloadModel,
    tie_seed: u64,
    mut on_pod: impl FnMut(),
) -> Curve {
    let mut rng = ChaCha8Rng::seed_from_u64(tie_seed);
    let mut cluster = nodes.shuffled_cluster(&mut rng);
    let capacity = (nodes.gpu_count() * 1000) as f64;
    let mut cache = ScoreCache::new();
    let mut node_frags: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|n| node_frag(&n.inventory, &n.gpus, n.free_cpu_milli(), model))
        .collect();
    let mut frag_total: f64 = node_frags.iter().sum();
    let bins = MAX_ARRIVED_PCT + 1;
    let (mut un_sum, mut fr_sum, mut count) = (vec![0.0; bins], vec![0.0; bins], vec![0u32; bins]);
    let (mut arrived, mut allocated, mut placed) = (0u64, 0u64, 0usize);
    for &i in seq {
        let pod = &pods[i];
        arrived += pod.gpu_milli_total;
        if let Some(decision) =
            cluster.decide(policy, &pod.request, &mut rng, Some((&mut cache, pod.shape_key)))
            && cluster.commit(&pod.request, &decision).is_ok()
        {
            allocated += pod.gpu_milli_total;
            placed += 1;
            let n = &cluster.nodes[decision.node];
            let f = node_frag(&n.inventory, &n.gpus, n.free_cpu_milli(), model);
            frag_total += f - node_frags[decision.node];
            node_frags[decision.node] = f;
        }
        let arrived_pct = 100.0 * arrived as f64 / capacity;
        let bin = arrived_pct.floor() as usize;
        if bin < bins {
            un_sum[bin] += 100.0 - 100.0 * allocated as f64 / capacity;
            fr_sum[bin] += 100.0 * frag_total / (capacity / 1000.0);
            count[bin] += 1;
        }
        on_pod();
    }
    let mean = |sum: &[f64]| -> Vec<Option<f64>> {
        sum.iter()
            .zip(&count)
            .map(|(s, &c)| (c > 0).then(|| s / f64::from(c)))
            .collect()
    };
    Curve {
        unallocated_pct: mean(&un_sum),
        frag_pct: mean(&fr_sum),
        pods: seq.len(),
        placed,
    }
}
