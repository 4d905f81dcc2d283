//! Placement speed: the time of one [`Cluster::decide`] (no score cache, which is what the scheduler
//! extender does per filter/score request) for every policy in [`POLICY_NAMES`], against a baseline
//! measured in the same run: the filter alone ([`fit_pod`] with [`GpuOrder::Index`] over every node).
//! Read the policies as ratios to that baseline; absolute times depend on the machine.
//!
//! Two clusters, both built here (this crate cannot depend on `hami-sim`):
//! - `trace-1213`: the node mix of the Alibaba trace's 1213 GPU nodes (`openb_node_list_gpu_node.csv`),
//!   counted per (GPUs, model, host CPU, host memory) and copied exactly, 6212 GPUs in all. What
//!   differs from the simulator's cluster: node names and order (a fixed-seed shuffle instead of file
//!   order). GPU memory per model and 100 slots per GPU are the simulator's values (`hami-sim`'s
//!   `GPU_MODELS` and `SIM_SPLIT_COUNT`).
//! - `synthetic-5000x8`: 5000 G2-like nodes, 8 GPUs (32 GiB) each, 96 vCPU and 384 GiB of host memory.
//!
//! Each is pre-filled to about 60 % GPU allocation with a fixed-seed sequence of trace-like pods, each
//! placed on the first node that fits, scanning from a random node (so load is spread, and most nodes
//! are partly used). The pod mix follows the trace's default pod list: 13 % CPU-only, 38 % one
//! fractional GPU (share drawn from 81, 47, 32, 65, 23, 46, 59, 16, 55 % with the trace's weights),
//! 48 % one whole GPU, 1 % 2/4/8 whole GPUs. GPU requests map as the simulator maps them: the share
//! becomes both `cores` and `MemoryRequest::Percent`. Host CPU and memory come from short tables of
//! the trace's most common values per kind, so the workload model has about as many shapes as the
//! trace's (35 shapes cover 95 % of it), which matters for FGD's cost. The workload model is
//! `WorkloadModel::from_pods(prefill pods, 0.95)` and the normalisers `ClusterNorm::of(nodes)`.
//!
//! The benchmarked pods (one per kind): `cpu` (12.5 vCPU, no GPU), `frac` (47 % of a GPU, 11.9 vCPU),
//! `whole` (one GPU, 11.3 vCPU), `multi2` (two whole GPUs, 16.2 vCPU). `decide` does not commit, so
//! every iteration sees the same cluster state.
//!
//! `cargo bench -p hami-policy --bench placement` takes about 3-4 minutes on two cores; add `-- --quick`
//! for a rough run, or a filter such as `-- trace-1213/fgd` for a subset.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use hami_api::{
    ContainerKind, ContainerRequest, DeviceRequest, GpuDevice, MemoryRequest, NodeInventory, PodRequest,
};
use hami_policy::{
    Cluster, ClusterNorm, GpuOrder, NodeState, POLICY_NAMES, WorkloadModel, build_policy, fit_pod,
};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

/// Slots per GPU, as in the simulator: high enough never to bind.
const SPLIT_COUNT: u32 = 100;

/// Target GPU allocation of the pre-fill, fraction of the cluster's GPUs.
const PREFILL_ALLOCATION: f64 = 0.6;

/// Seed of everything random here (node order, pre-fill pods, pre-fill placement, tie-breaks).
const SEED: u64 = 42;

/// The trace's GPU nodes, counted from `openb_node_list_gpu_node.csv`: (nodes, GPUs per node, GPU
/// model, host CPU milli-vCPU, host memory MiB).
const TRACE_NODES: &[(usize, u32, &str, u64, u64)] = &[
    (549, 8, "G2", 96_000, 393_216),
    (387, 2, "T4", 104_000, 524_288),
    (107, 2, "P100", 16_000, 122_880),
    (39, 8, "G3", 128_000, 786_432),
    (28, 4, "V100M16", 32_000, 131_072),
    (22, 2, "P100", 64_000, 262_144),
    (21, 8, "V100M32", 96_000, 786_432),
    (19, 1, "V100M16", 8_000, 32_768),
    (17, 4, "T4", 96_000, 393_216),
    (9, 4, "V100M32", 48_000, 376_832),
    (7, 8, "V100M16", 64_000, 262_144),
    (3, 1, "P100", 8_000, 61_440),
    (2, 2, "P100", 8_000, 61_440),
    (2, 1, "A10", 128_000, 1_048_576),
    (1, 8, "V100M16", 82_000, 344_064),
];

/// Nodes and GPUs of the synthetic large cluster.
const SYNTHETIC_NODES: usize = 5000;
const SYNTHETIC_GPUS: u32 = 8;

/// Fractional GPU shares (percent) with their counts in the trace's default pod list.
const FRACTIONAL_SHARES: &[(u32, u32)] = &[
    (81, 1078),
    (47, 750),
    (32, 328),
    (65, 253),
    (23, 140),
    (46, 128),
    (59, 75),
    (16, 74),
    (55, 72),
];

/// Host (CPU milli, memory MiB) per pod kind, the trace's most common values, with their counts.
const CPU_ONLY_HOST: &[((u64, u64), u32)] = &[
    ((12_500, 57_344), 364),
    ((32_000, 49_152), 284),
    ((8_000, 30_517), 163),
    ((15_400, 51_200), 120),
];
const FRACTIONAL_HOST: &[((u64, u64), u32)] = &[
    ((3_152, 5_600), 1122),
    ((11_908, 47_104), 625),
    ((8_000, 30_517), 486),
];
const WHOLE_HOST: &[((u64, u64), u32)] = &[
    ((11_300, 49_152), 857),
    ((11_400, 48_128), 534),
    ((3_152, 5_600), 470),
    ((18_708, 64_512), 255),
];
/// Multi-GPU pods: (GPUs, CPU milli, memory MiB) with counts.
const MULTI: &[((u32, u64, u64), u32)] = &[
    ((2, 16_200, 66_560), 16),
    ((4, 32_200, 132_096), 15),
    ((8, 64_200, 263_168), 44),
];

/// Device memory the simulator gives each trace GPU model, MiB.
fn gpu_memory_mib(model: &str) -> u64 {
    match model {
        "T4" | "P100" | "V100M16" => 16_384,
        "A10" => 24_576,
        _ => 32_768, // G1, G2, G3 (undisclosed; the simulator's assumption), V100M32
    }
}

fn inventory(name: String, gpus: u32, model: &str, cpu_milli: u64, memory_mib: u64) -> NodeState {
    let gpus = (0..gpus)
        .map(|i| {
            let mut g = GpuDevice::new(format!("{name}-gpu{i}"), i, model, gpu_memory_mib(model));
            g.split_count = SPLIT_COUNT;
            g
        })
        .collect();
    NodeState::new(Arc::new(NodeInventory {
        name,
        cpu_milli,
        memory_mib,
        gpus,
    }))
}

/// The trace's node mix, shuffled with `rng`.
fn trace_nodes(rng: &mut ChaCha8Rng) -> Vec<NodeState> {
    let mut nodes = Vec::new();
    for &(count, gpus, model, cpu, mem) in TRACE_NODES {
        for _ in 0..count {
            let name = format!("trace-{:04}", nodes.len());
            nodes.push(inventory(name, gpus, model, cpu, mem));
        }
    }
    assert_eq!(nodes.len(), 1213, "the trace has 1213 GPU nodes");
    nodes.shuffle(rng);
    nodes
}

fn synthetic_nodes() -> Vec<NodeState> {
    (0..SYNTHETIC_NODES)
        .map(|i| inventory(format!("syn-{i:05}"), SYNTHETIC_GPUS, "G2", 96_000, 393_216))
        .collect()
}

/// A one-container pod shaped like a simulator pod: `gpus` GPUs with `pct` % of compute and memory each.
fn pod(name: String, cpu_milli: u64, memory_mib: u64, gpu: Option<(u32, u32)>) -> PodRequest {
    PodRequest {
        namespace: "bench".to_owned(),
        uid: name.clone(),
        name,
        containers: vec![ContainerRequest {
            name: "main".to_owned(),
            kind: ContainerKind::App,
            cpu_milli,
            memory_mib,
            gpu: gpu.map(|(count, pct)| DeviceRequest::new(count, MemoryRequest::Percent(pct), pct)),
        }],
        node_policy: None,
        gpu_policy: None,
    }
}

fn weighted<T: Copy>(rng: &mut ChaCha8Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for &(v, w) in table {
        if x < w {
            return v;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

/// A trace-like pod and its GPU demand in milli-GPU.
fn trace_like_pod(rng: &mut ChaCha8Rng, i: usize) -> (PodRequest, u64) {
    let name = format!("prefill-{i}");
    let kind: f64 = rng.random();
    if kind < 0.13 {
        let (cpu, mem) = weighted(rng, CPU_ONLY_HOST);
        (pod(name, cpu, mem, None), 0)
    } else if kind < 0.51 {
        let pct = weighted(rng, FRACTIONAL_SHARES);
        let (cpu, mem) = weighted(rng, FRACTIONAL_HOST);
        (pod(name, cpu, mem, Some((1, pct))), u64::from(pct) * 10)
    } else if kind < 0.99 {
        let (cpu, mem) = weighted(rng, WHOLE_HOST);
        (pod(name, cpu, mem, Some((1, 100))), 1000)
    } else {
        let (n, cpu, mem) = weighted(rng, MULTI);
        (pod(name, cpu, mem, Some((n, 100))), u64::from(n) * 1000)
    }
}

/// Fills `nodes` to about [`PREFILL_ALLOCATION`] of their GPUs: each pod goes to the first node that
/// fits, scanning from a random one; pods that fit nowhere are skipped. Returns the placed pods and the
/// allocation reached.
fn prefill(nodes: &mut [NodeState], rng: &mut ChaCha8Rng) -> (Vec<PodRequest>, f64) {
    let capacity: u64 = nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
    let target = (capacity as f64 * PREFILL_ALLOCATION) as u64;
    let (mut allocated, mut placed) = (0u64, Vec::new());
    for i in 0..capacity as usize {
        if allocated >= target {
            break;
        }
        let (pod, demand) = trace_like_pod(rng, i);
        let start = rng.random_range(0..nodes.len());
        for k in 0..nodes.len() {
            let node = &mut nodes[(start + k) % nodes.len()];
            if let Ok(placement) = fit_pod(node, &pod, GpuOrder::Index)
                && node.commit(&pod, &placement).is_ok()
            {
                allocated += demand;
                placed.push(pod);
                break;
            }
        }
    }
    (placed, allocated as f64 / capacity as f64)
}

/// The benchmarked pods, one per kind.
fn representative_pods() -> Vec<(&'static str, PodRequest)> {
    vec![
        ("cpu", pod("bench-cpu".to_owned(), 12_500, 57_344, None)),
        (
            "frac",
            pod("bench-frac".to_owned(), 11_908, 47_104, Some((1, 47))),
        ),
        (
            "whole",
            pod("bench-whole".to_owned(), 11_300, 49_152, Some((1, 100))),
        ),
        (
            "multi2",
            pod("bench-multi2".to_owned(), 16_200, 66_560, Some((2, 100))),
        ),
    ]
}

/// A pre-filled cluster with its workload model and normalisers.
struct Setup {
    name: &'static str,
    cluster: Cluster,
    model: Arc<WorkloadModel>,
    norm: ClusterNorm,
}

fn setup(name: &'static str, mut nodes: Vec<NodeState>, rng: &mut ChaCha8Rng) -> Setup {
    let (pods, allocation) = prefill(&mut nodes, rng);
    let model = Arc::new(WorkloadModel::from_pods(&pods, 0.95));
    let norm = ClusterNorm::of(&nodes);
    let gpus: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    eprintln!(
        "{name}: {} nodes, {gpus} GPUs, pre-filled with {} pods to {:.1} % GPU allocation; workload model {} shapes",
        nodes.len(),
        pods.len(),
        100.0 * allocation,
        model.shapes.len()
    );
    let cluster = Cluster::new(nodes);
    for (kind, pod) in representative_pods() {
        let feasible = cluster
            .nodes
            .iter()
            .filter(|n| fit_pod(n, &pod, GpuOrder::Index).is_ok())
            .count();
        eprintln!("  {kind}: fits {feasible} of {} nodes", cluster.nodes.len());
    }
    Setup {
        name,
        cluster,
        model,
        norm,
    }
}

fn bench_cluster(c: &mut Criterion, s: &Setup) {
    let mut group = c.benchmark_group(format!("decide/{}", s.name));
    // Few, flat samples: the slowest case (FGD on 5000 nodes) takes tens of milliseconds per decision,
    // and 72 benchmarks must finish in a few minutes.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    for (kind, pod) in representative_pods() {
        group.bench_with_input(BenchmarkId::new("filter-only", kind), &pod, |b, pod| {
            b.iter(|| {
                s.cluster
                    .nodes
                    .iter()
                    .filter(|n| fit_pod(n, pod, GpuOrder::Index).is_ok())
                    .count()
            });
        });
        for &name in POLICY_NAMES {
            let policy = build_policy(name, Arc::clone(&s.model), s.norm).expect("a name from POLICY_NAMES");
            let mut rng = ChaCha8Rng::seed_from_u64(SEED);
            group.bench_with_input(BenchmarkId::new(name, kind), &pod, |b, pod| {
                b.iter(|| black_box(s.cluster.decide(policy.as_ref(), pod, &mut rng, None)));
            });
        }
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().nresamples(20_000).configure_from_args();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let trace = setup("trace-1213", trace_nodes(&mut rng), &mut rng);
    bench_cluster(&mut c, &trace);
    drop(trace);
    let synthetic = setup("synthetic-5000x8", synthetic_nodes(), &mut rng);
    bench_cluster(&mut c, &synthetic);
    c.final_summary();
}
