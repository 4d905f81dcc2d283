//! The replay method on small, hand-checkable inputs and on the embedded trace.

use std::sync::Arc;

use hami_policy::{ClusterNorm, NodeState, WorkloadModel, build_policy};
use hami_sim::{
    load_nodes, load_trace,
    replay::{PAPER_INFLATION, pod_sequence, run},
    trace::{read_nodes, read_pods},
};

const NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\nn0,32000,65536,2,T4\nn1,32000,65536,1,T4\n";
const PODS: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
p0,1000,1024,1,500,\np1,1000,1024,1,500,\np2,1000,1024,1,700,\np3,1000,1024,1,1000,\np4,1000,1024,0,0,\n";

/// The sequence is the shuffled rows (each exactly once) followed by uniform clones until the demand
/// first reaches the target; it depends on the seed only.
#[test]
fn sequence_is_a_permutation_then_clones_up_to_the_target() {
    let pods = read_pods("pods.csv", PODS).unwrap();
    let capacity = 3 * 1000;
    let target = 3900; // 130 % of 3 GPUs
    for seed in 42..52 {
        let seq = pod_sequence(&pods, capacity, PAPER_INFLATION, seed);
        let mut head: Vec<usize> = seq[..pods.len()].to_vec();
        head.sort_unstable();
        assert_eq!(head, (0..pods.len()).collect::<Vec<_>>());
        let total: u64 = seq.iter().map(|&i| pods[i].gpu_milli_total).sum();
        let last = pods[*seq.last().unwrap()].gpu_milli_total;
        assert!(
            total >= target && total - last < target,
            "seed {seed}: total {total}"
        );
        assert_eq!(seq, pod_sequence(&pods, capacity, PAPER_INFLATION, seed));
    }
    assert_ne!(
        pod_sequence(&pods, capacity, 1.3, 42),
        pod_sequence(&pods, capacity, 1.3, 43)
    );
}

/// A trace already above the target has random pods removed until it is within it.
#[test]
fn sequence_above_the_target_is_trimmed() {
    let pods = read_pods("pods.csv", PODS).unwrap();
    let seq = pod_sequence(&pods, 1000, 1.3, 42);
    let total: u64 = seq.iter().map(|&i| pods[i].gpu_milli_total).sum();
    assert!(total <= 1300, "{total}");
    assert!(seq.len() < pods.len());
}

/// On a 3-GPU cluster, best fit places 500+500 on one GPU, 700 and 1000 on the others; the curve's
/// unallocated % equals 100 − placed demand / capacity at every arrived percent.
#[test]
fn curve_tracks_placed_demand() {
    let nodes = read_nodes("nodes.csv", NODES).unwrap();
    let pods = read_pods("pods.csv", PODS).unwrap();
    let seq: Vec<usize> = (0..pods.len()).collect();
    let states: Vec<NodeState> = nodes
        .nodes
        .iter()
        .map(|n| NodeState::new(Arc::clone(n)))
        .collect();
    let model = Arc::new(WorkloadModel::from_pods(pods.iter().map(|p| &p.request), 0.95));
    let policy = build_policy("bestfit", Arc::clone(&model), ClusterNorm::of(&states)).unwrap();
    let mut count = 0;
    let curve = run(&nodes, &pods, &seq, policy.as_ref(), &model, 1, || count += 1);
    assert_eq!(count, pods.len());
    assert_eq!(curve.placed, pods.len());
    // Arrived after each pod: 16.7 %, 33.3 %, 56.7 %, 90 %, 90 %: allocation equals arrival throughout.
    for (pct, v) in curve.unallocated_pct.iter().enumerate() {
        if let Some(u) = v {
            assert!((u - (100.0 - pct as f64)).abs() < 1.0, "at {pct} %: {u}");
        }
    }
    assert!((curve.unallocated_pct[90].unwrap() - 10.0).abs() < 1e-9);
}

/// The embedded trace loads: 1213 GPU nodes with 6212 GPUs and 8152 pods, as published.
#[test]
fn embedded_trace_matches_the_published_shape() {
    let nodes = load_nodes(None).unwrap();
    assert_eq!(nodes.nodes.len(), 1213);
    assert_eq!(nodes.gpu_count(), 6212);
    let pods = load_trace("default", None).unwrap();
    assert_eq!(pods.len(), 8152);
    let demand: u64 = pods.iter().map(|p| p.gpu_milli_total).sum();
    // 6086.8 GPUs of demand, 98.0 % of capacity (reference/alibaba-gpu-trace.md §1.3).
    assert_eq!(demand, 6_086_800);
    let model = WorkloadModel::from_pods(pods.iter().map(|p| &p.request), 0.95);
    // 35 of the 91 shapes cover 95 % of pods in the FGD artifact (memory is not part of a shape).
    assert_eq!(model.shapes.len(), 35);
}

/// Unknown trace names fail with a message naming the file looked for.
#[test]
fn unknown_trace_is_a_clear_error() {
    let e = load_trace("nosuchtrace", Some(std::path::Path::new("/nonexistent")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("openb_pod_list_nosuchtrace.csv"), "{e}");
}
