//! `hami-sim`: replays the Alibaba GPU-sharing trace (`cluster-trace-gpu-v2023`) through hami's placement
//! core ([`hami_policy`]) with the FGD paper's method, and reports unallocated GPU % against arrived
//! workload per policy. The policies are exactly the ones the scheduler extender runs.
//!
//! The default trace and node list are embedded (see `data/alibaba-gpu-v2023/PROVENANCE.md`); other traces
//! are read from a data folder or a path.

pub mod error;
pub mod replay;
pub mod report;
pub mod trace;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use hami_policy::{ClusterNorm, POLICY_NAMES, WorkloadModel, build_policy_in};

pub use crate::error::{Error, Result};
use crate::{
    replay::{PAPER_SHAPE_COVERAGE, pod_sequence, run},
    report::RunResult,
    trace::{NodeList, TracePod, read_file, read_nodes, read_pods},
};

/// The embedded node list: the trace's 1213 GPU nodes.
pub const EMBEDDED_NODES: &str = include_str!("../../../data/alibaba-gpu-v2023/openb_node_list_gpu_node.csv");
/// The embedded default pod list (8152 pods).
pub const EMBEDDED_DEFAULT_PODS: &str =
    include_str!("../../../data/alibaba-gpu-v2023/openb_pod_list_default.csv");

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Trace names (`default`, `gpushare40`, …) or paths to pod-list CSVs.
    pub traces: Vec<String>,
    /// Policy names (see [`POLICY_NAMES`]).
    pub policies: Vec<String>,
    /// Seeds (the paper uses 42..=51).
    pub seeds: Vec<u64>,
    /// Node list CSV; `None` for the embedded one.
    pub nodes: Option<PathBuf>,
    /// Folder holding `openb_pod_list_<name>.csv`; `None` to search the usual places.
    pub data: Option<PathBuf>,
    /// Inflation target as a fraction of GPU capacity (1.3 in the paper).
    pub inflation: f64,
    /// Worker threads.
    pub threads: usize,
}

/// Expands `all` and validates policy names.
///
/// # Errors
/// [`Error::Policy`] for an unknown name.
pub fn expand_policies(list: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in list {
        if p == "all" {
            out.extend(POLICY_NAMES.iter().map(|s| (*s).to_owned()));
        } else if POLICY_NAMES.contains(&p.as_str()) {
            out.push(p.clone());
        } else {
            return Err(hami_policy::Error::UnknownPolicy {
                name: p.clone(),
                known: format!("all,{}", POLICY_NAMES.join(",")),
            }
            .into());
        }
    }
    out.dedup();
    Ok(out)
}

/// Folders searched for `openb_pod_list_<name>.csv` when `--data` is not given: `$HAMI_TRACE_DATA`, the
/// repository's `data/alibaba-gpu-v2023`, and the shared data folder beside the repository.
#[must_use]
pub fn data_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(d) = explicit {
        return vec![d.to_path_buf()];
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HAMI_TRACE_DATA") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(root.join("data/alibaba-gpu-v2023"));
    dirs.push(root.join("../shared/data/alibaba-gpu-v2023/csv"));
    dirs.push(PathBuf::from("../shared/data/alibaba-gpu-v2023/csv"));
    dirs
}

/// Loads one trace's pods: a path, a name found in the data folders, or the embedded `default` (used when
/// no data folder holds a `default` file).
///
/// # Errors
/// [`Error::UnknownTrace`] or the loader's errors.
pub fn load_trace(name: &str, data: Option<&Path>) -> Result<Vec<TracePod>> {
    let as_path = Path::new(name);
    if name.ends_with(".csv") || name.contains('/') {
        return read_pods(name, &read_file(as_path)?);
    }
    let file = format!("openb_pod_list_{name}.csv");
    let dirs = data_dirs(data);
    for d in &dirs {
        let p = d.join(&file);
        if p.is_file() {
            return read_pods(&p.display().to_string(), &read_file(&p)?);
        }
    }
    if name == "default" {
        return read_pods("embedded openb_pod_list_default.csv", EMBEDDED_DEFAULT_PODS);
    }
    Err(Error::UnknownTrace {
        name: name.to_owned(),
        tried: dirs
            .iter()
            .map(|d| d.join(&file).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Loads the node list: a path or the embedded one.
///
/// # Errors
/// The loader's errors.
pub fn load_nodes(path: Option<&Path>) -> Result<NodeList> {
    match path {
        Some(p) => read_nodes(&p.display().to_string(), &read_file(p)?),
        None => read_nodes("embedded openb_node_list_gpu_node.csv", EMBEDDED_NODES),
    }
}

/// Runs every (trace, policy, seed) on `cfg.threads` threads. `progress(total, done)` is called as pods
/// are placed.
///
/// # Errors
/// Loading errors (before any run starts).
pub fn simulate(cfg: &SimConfig, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Vec<RunResult>> {
    let nodes = load_nodes(cfg.nodes.as_deref())?;
    let policies = expand_policies(&cfg.policies)?;
    let capacity = nodes.gpu_count() * 1000;
    let idle = nodes.idle_states();
    let norm = ClusterNorm::of(&idle);
    struct Job {
        trace: usize,
        policy: String,
        /// Index into `cfg.seeds` (and the trace's sequences).
        seed: usize,
    }
    /// A trace's pods, workload model and one pod sequence per seed (shared by every policy).
    struct Loaded {
        name: String,
        pods: Vec<TracePod>,
        model: Arc<WorkloadModel>,
        seqs: Vec<Vec<usize>>,
    }
    let mut traces: Vec<Loaded> = Vec::new();
    let mut jobs = Vec::new();
    let mut total = 0u64;
    for t in &cfg.traces {
        let pods = load_trace(t, cfg.data.as_deref())?;
        let model = Arc::new(WorkloadModel::from_pods(
            pods.iter().map(|p| &p.request),
            PAPER_SHAPE_COVERAGE,
        ));
        let seqs: Vec<Vec<usize>> = cfg
            .seeds
            .iter()
            .map(|&seed| pod_sequence(&pods, capacity, cfg.inflation, seed))
            .collect();
        for p in &policies {
            for (s, seq) in seqs.iter().enumerate() {
                total += seq.len() as u64;
                jobs.push(Job {
                    trace: traces.len(),
                    policy: p.clone(),
                    seed: s,
                });
            }
        }
        traces.push(Loaded {
            name: t.clone(),
            pods,
            model,
            seqs,
        });
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, RunResult)>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..cfg.threads.max(1) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(k) else { break };
                    let Loaded {
                        name,
                        pods,
                        model,
                        seqs,
                    } = &traces[job.trace];
                    let seed = cfg.seeds[job.seed];
                    let policy = match build_policy_in(&job.policy, Arc::clone(model), norm, &idle) {
                        Ok(p) => p,
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert(e.into());
                            break;
                        }
                    };
                    let mut local = 0u64;
                    let curve = run(
                        &nodes,
                        pods,
                        &seqs[job.seed],
                        policy.as_ref(),
                        model,
                        seed.wrapping_add(0x5eed),
                        || {
                            local += 1;
                            if local.is_multiple_of(512) {
                                let d = done.fetch_add(512, Ordering::Relaxed) + 512;
                                progress(total, d as u64);
                            }
                        },
                    );
                    let d =
                        done.fetch_add((local % 512) as usize, Ordering::Relaxed) + (local % 512) as usize;
                    progress(total, d as u64);
                    let r = RunResult {
                        trace: name.clone(),
                        policy: job.policy.clone(),
                        seed,
                        curve,
                    };
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((k, r));
                }
            });
        }
    });
    if let Some(e) = first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(k, _)| *k);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}
