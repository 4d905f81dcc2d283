//! `hami-bench`: decision time per pod, per policy, on the trace's 1213-node cluster and on a synthetic
//! 5000-node, 8-GPU-per-node cluster.
//!
//! For each policy it replays the paper's pod sequence (seeded shuffle plus inflation to 130 % of GPU
//! capacity, [`pod_sequence`]) on an idle cluster, as the simulator does, and times single
//! [`Cluster::decide`] calls with [`Instant`]:
//! - `nocache`: no score cache, every node scored (what the scheduler extender does per request);
//! - `cache`: with the simulator's [`ScoreCache`] (only nodes changed since the last pod of the same
//!   shape are scored again);
//! - the baseline, `filter`: [`fit_pod`] with [`GpuOrder::Index`] over every node, on the same pod and
//!   the same cluster state.
//!
//! All three run on every timed pod, in alternating order, and the cached decision is the one
//! committed, so the replay is the simulator's. The no-cache decision is checked to be the same.
//! Speed is read as the ratio of a policy's p50 to the filter's p50 measured on the same pods and
//! states; absolute microseconds depend on the machine.
//!
//! `--pods N` times the first N pods of the sequence (every `--stride`-th pod, the others placed
//! untimed with the cache), so a short run covers the low-load start of the replay, where every node
//! is feasible and scoring costs most. `--max-seconds` bounds each (cluster, policy) replay.

use std::{
    fmt::Write as _,
    hint::black_box,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use hami_api::{GpuDevice, NodeInventory};
use hami_policy::{ClusterNorm, GpuOrder, Policy, ScoreCache, WorkloadModel, build_policy, fit_pod};
use hami_sim::{
    expand_policies, load_nodes, load_trace,
    replay::{PAPER_INFLATION, PAPER_SHAPE_COVERAGE, pod_sequence},
    trace::{GPU_MODELS, NodeList, SIM_SPLIT_COUNT, TracePod},
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Which clusters to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// The trace's 1213 GPU nodes.
    Trace,
    /// The synthetic cluster (`--synthetic-nodes` nodes of 8 G2-like GPUs).
    Synthetic,
    /// Both.
    Both,
}

/// Time one placement decision per pod, per policy, against the filter alone.
#[derive(Debug, Parser)]
#[command(name = "hami-bench", version)]
struct Args {
    /// Comma-separated policies, or `all`.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    policies: Vec<String>,
    /// Decisions timed per policy and cluster.
    #[arg(long, default_value_t = 2000)]
    pods: usize,
    /// Stop timing a policy on a cluster after this many seconds (0: no limit), so FGD on the large
    /// cluster (hundreds of ms per uncached decision) cannot make a run take hours; the table's `pods`
    /// column says how many were timed.
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    /// Time every k-th pod of the sequence (the others are placed untimed, with the cache).
    #[arg(long, default_value_t = 1)]
    stride: usize,
    /// Cluster(s) to measure.
    #[arg(long, value_enum, default_value = "both")]
    cluster: Which,
    /// Nodes of the synthetic cluster.
    #[arg(long, default_value_t = 5000)]
    synthetic_nodes: usize,
    /// Seed of the pod sequence (the node order and tie-breaks use seed + 0x5eed, as the simulator).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write the table as CSV here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// GPUs per synthetic node and their model.
const SYNTHETIC_GPUS: u32 = 8;
const SYNTHETIC_MODEL: &str = "G2";
/// Host of a synthetic node: the trace's G2 nodes (96 vCPU, 384 GiB).
const SYNTHETIC_CPU_MILLI: u64 = 96_000;
const SYNTHETIC_MEMORY_MIB: u64 = 393_216;

fn synthetic_nodes(n: usize) -> Result<NodeList> {
    let gpu_mem = GPU_MODELS
        .iter()
        .find(|(m, _)| *m == SYNTHETIC_MODEL)
        .map(|&(_, mib)| mib)
        .context("G2 is a known GPU model")?;
    let nodes = (0..n)
        .map(|i| {
            let name = format!("syn-node-{i:05}");
            let gpus = (0..SYNTHETIC_GPUS)
                .map(|g| {
                    let mut d = GpuDevice::new(format!("{name}-gpu{g}"), g, SYNTHETIC_MODEL, gpu_mem);
                    d.split_count = SIM_SPLIT_COUNT;
                    d
                })
                .collect();
            Arc::new(NodeInventory {
                name,
                cpu_milli: SYNTHETIC_CPU_MILLI,
                memory_mib: SYNTHETIC_MEMORY_MIB,
                gpus,
            })
        })
        .collect();
    Ok(NodeList { nodes })
}

/// Per-decision times of one policy's replay, in microseconds.
#[derive(Debug, Default)]
struct Samples {
    filter: Vec<f64>,
    nocache: Vec<f64>,
    cache: Vec<f64>,
    /// Timed pods whose no-cache and cached decisions differed (should be 0).
    mismatches: usize,
    /// Arrived GPU demand at the last timed pod, % of capacity.
    arrived_pct: f64,
    /// Whether `--max-seconds` stopped the replay before `--pods` pods were timed.
    cut: bool,
    /// Pods placed among those replayed.
    placed: usize,
    replayed: usize,
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One policy's replay; see the module docs.
fn measure(nodes: &NodeList, pods: &[TracePod], seq: &[usize], policy: &dyn Policy, args: &Args) -> Samples {
    let started = Instant::now();
    let budget = (args.max_seconds > 0.0).then(|| Duration::from_secs_f64(args.max_seconds));
    let (limit, stride) = (args.pods, args.stride);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(0x5eed));
    let mut cluster = nodes.shuffled_cluster(&mut rng);
    let capacity = (nodes.gpu_count() * 1000) as f64;
    let mut cache = ScoreCache::new();
    let mut s = Samples::default();
    let mut arrived = 0u64;
    for (step, &i) in seq.iter().enumerate() {
        if s.cache.len() >= limit {
            break;
        }
        if budget.is_some_and(|b| started.elapsed() > b) {
            s.cut = true;
            break;
        }
        let pod = &pods[i];
        arrived += pod.gpu_milli_total;
        s.replayed += 1;
        let decision = if step % stride == 0 {
            let t = Instant::now();
            let feasible = cluster
                .nodes
                .iter()
                .filter(|n| fit_pod(n, &pod.request, GpuOrder::Index).is_ok())
                .count();
            s.filter.push(micros(t.elapsed()));
            black_box(feasible);
            // The no-cache call draws from a copy of the random stream, so both calls see the same one
            // and the replay is exactly the simulator's.
            let mut copy = rng.clone();
            let mut uncached = || {
                let t = Instant::now();
                let d = cluster.decide(policy, &pod.request, &mut copy, None);
                (d, micros(t.elapsed()))
            };
            let mut cached = || {
                let t = Instant::now();
                let d = cluster.decide(policy, &pod.request, &mut rng, Some((&mut cache, pod.shape_key)));
                (d, micros(t.elapsed()))
            };
            // Alternate which runs first, so neither always finds the node data in the CPU caches.
            let ((d0, t0), (d1, t1)) = if s.cache.len() % 2 == 0 {
                let a = uncached();
                (a, cached())
            } else {
                let b = cached();
                (uncached(), b)
            };
            s.nocache.push(t0);
            s.cache.push(t1);
            if d0 != d1 {
                s.mismatches += 1;
            }
            s.arrived_pct = 100.0 * arrived as f64 / capacity;
            d1
        } else {
            cluster.decide(policy, &pod.request, &mut rng, Some((&mut cache, pod.shape_key)))
        };
        if let Some(d) = decision
            && cluster.commit(&pod.request, &d).is_ok()
        {
            s.placed += 1;
        }
    }
    s
}

/// p50, p99 (nearest rank) and mean of `v`.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    (rank(0.5), rank(0.99), v.iter().sum::<f64>() / v.len() as f64)
}

/// One table row.
struct Row {
    cluster: String,
    policy: String,
    mode: &'static str,
    samples: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    filter_p50: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.p50 / self.filter_p50
    }
}

/// Measures every policy on one cluster; prints progress to stderr.
fn bench_cluster(
    label: &str,
    nodes: &NodeList,
    pods: &[TracePod],
    policies: &[String],
    args: &Args,
) -> Result<(String, Vec<Row>)> {
    let norm = ClusterNorm::of(&nodes.idle_states());
    let model = Arc::new(WorkloadModel::from_pods(
        pods.iter().map(|p| &p.request),
        PAPER_SHAPE_COVERAGE,
    ));
    let capacity = nodes.gpu_count() * 1000;
    let seq = pod_sequence(pods, capacity, PAPER_INFLATION, args.seed);
    let mut rows = Vec::new();
    let mut all_filter = Vec::new();
    let mut header = format!(
        "{label}: {} nodes, {} GPUs; seed-{} sequence of {} pods; workload model {} shapes\n",
        nodes.nodes.len(),
        nodes.gpu_count(),
        args.seed,
        seq.len(),
        model.shapes.len()
    );
    for name in policies {
        let policy = build_policy(name, Arc::clone(&model), norm)?;
        let started = Instant::now();
        let s = measure(nodes, pods, &seq, policy.as_ref(), args);
        eprintln!(
            "{label} {name}: {} timed of {} replayed pods ({} placed) in {:.1} s",
            s.cache.len(),
            s.replayed,
            s.placed,
            started.elapsed().as_secs_f64()
        );
        let _ = writeln!(
            header,
            "  {name}: timed {} of the first {} pods (up to {:.1} % arrived), {} placed{}{}",
            s.cache.len(),
            s.replayed,
            s.arrived_pct,
            s.placed,
            if s.cut {
                format!(" (stopped after --max-seconds {})", args.max_seconds)
            } else {
                String::new()
            },
            if s.mismatches > 0 {
                format!("; WARNING: {} cached/no-cache decisions differ", s.mismatches)
            } else {
                String::new()
            }
        );
        let (f50, _, _) = stats(&s.filter);
        for (mode, v) in [("nocache", &s.nocache), ("cache", &s.cache)] {
            let (p50, p99, mean) = stats(v);
            rows.push(Row {
                cluster: label.to_owned(),
                policy: name.clone(),
                mode,
                samples: v.len(),
                p50,
                p99,
                mean,
                filter_p50: f50,
            });
        }
        all_filter.extend(s.filter);
    }
    let (p50, p99, mean) = stats(&all_filter);
    rows.insert(
        0,
        Row {
            cluster: label.to_owned(),
            policy: "filter-only".to_owned(),
            mode: "baseline",
            samples: all_filter.len(),
            p50,
            p99,
            mean,
            filter_p50: p50,
        },
    );
    Ok((header, rows))
}

fn print_table(header: &str, rows: &[Row]) {
    print!("\n{header}");
    println!(
        "{:<12} {:<9} {:>7} {:>11} {:>11} {:>11} {:>10}",
        "policy", "mode", "pods", "p50 µs", "p99 µs", "mean µs", "p50/filter"
    );
    for r in rows {
        println!(
            "{:<12} {:<9} {:>7} {:>11.1} {:>11.1} {:>11.1} {:>10.2}",
            r.policy,
            r.mode,
            r.samples,
            r.p50,
            r.p99,
            r.mean,
            r.ratio()
        );
    }
    println!(
        "(p50/filter: the policy's p50 over the p50 of the filter alone on the same pods and cluster states; \
         the baseline row pools the filter's samples of all replays)"
    );
}

fn write_csv(path: &PathBuf, rows: &[Row]) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record([
        "cluster",
        "policy",
        "mode",
        "pods",
        "p50_us",
        "p99_us",
        "mean_us",
        "filter_p50_us",
        "p50_over_filter",
    ])?;
    for r in rows {
        w.write_record([
            r.cluster.clone(),
            r.policy.clone(),
            r.mode.to_owned(),
            r.samples.to_string(),
            format!("{:.3}", r.p50),
            format!("{:.3}", r.p99),
            format!("{:.3}", r.mean),
            format!("{:.3}", r.filter_p50),
            format!("{:.4}", r.ratio()),
        ])?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.pods > 0, "--pods must be at least 1");
    ensure!(args.stride > 0, "--stride must be at least 1");
    ensure!(
        args.max_seconds.is_finite() && args.max_seconds >= 0.0,
        "--max-seconds must be a number of seconds, 0 for no limit"
    );
    ensure!(args.synthetic_nodes > 0, "--synthetic-nodes must be at least 1");
    let policies = expand_policies(&args.policies)?;
    let pods = load_trace("default", None)?;
    let mut rows = Vec::new();
    if matches!(args.cluster, Which::Trace | Which::Both) {
        let nodes = load_nodes(None)?;
        let (header, r) = bench_cluster("trace", &nodes, &pods, &policies, &args)?;
        print_table(&header, &r);
        rows.extend(r);
    }
    if matches!(args.cluster, Which::Synthetic | Which::Both) {
        let nodes = synthetic_nodes(args.synthetic_nodes)?;
        let label = format!("synthetic-{}x{SYNTHETIC_GPUS}", args.synthetic_nodes);
        let (header, r) = bench_cluster(&label, &nodes, &pods, &policies, &args)?;
        print_table(&header, &r);
        rows.extend(r);
    }
    if let Some(out) = &args.out {
        write_csv(out, &rows)?;
        println!("\nwrote {}", out.display());
    }
    Ok(())
}
