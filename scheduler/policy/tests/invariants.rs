//! Property tests of the placement core over random small clusters and random pod sequences, for every
//! policy in `POLICY_NAMES`:
//! (a) no GPU ever exceeds its slots, schedulable memory or schedulable cores, and no host is
//!     over-committed;
//! (b) the same inputs and random seed give identical decisions, with or without a `ScoreCache`;
//! (c) `Cluster::decide` is complete: whenever a brute-force search (written here, independently of
//!     `fit.rs`) finds a feasible placement on some node, a decision is returned, and it is sound: the
//!     chosen node is one the brute force finds feasible, and every grant obeys the device rules;
//! (d) commit followed by release restores the node exactly;
//! and the `Ledger` keeps the cluster equal to the sum of the allocations it holds.

mod common;

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
};

use common::assert_within_capacity;
use hami_api::{
    ContainerKind, ContainerRequest, DeviceRequest, DeviceSelector, GpuDevice, MemoryRequest, NodeInventory,
    PodRequest,
};
use hami_policy::{
    Cluster, ClusterNorm, Decision, GpuUsage, Ledger, NodePlacement, NodeState, POLICY_NAMES, Policy,
    ScoreCache, WorkloadModel, build_policy,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

// ---- generators ----

const MODELS: [&str; 2] = ["NVIDIA-Tesla T4", "NVIDIA-NVIDIA A100-SXM4-40GB"];

fn gpu_strategy() -> impl Strategy<Value = GpuDevice> {
    (
        prop_oneof![
            Just(8 * 1024u64),
            Just(16 * 1024),
            Just(24 * 1024),
            Just(80 * 1024),
            1024u64..=81_920
        ],
        1u32..=4,
        prop::bool::weighted(0.85),
        prop::option::of(0u32..2),
        prop_oneof![3 => Just(1.0f64), 1 => Just(1.5), 1 => Just(2.0)],
        prop_oneof![3 => Just(1.0f64), 1 => Just(2.0)],
        prop::sample::select(&MODELS[..]),
    )
        .prop_map(|(mem, split, healthy, numa, ms, cs, model)| {
            let mut g = GpuDevice::new("", 0, model, mem);
            g.split_count = split;
            g.healthy = healthy;
            g.numa = numa;
            g.memory_scaling = ms;
            g.core_scaling = cs;
            g
        })
}

/// A generated node: GPUs, host CPU (milli), host memory (MiB), NVLink links `(a, b, links)` (indices
/// taken modulo the GPU count).
type NodeSpec = (Vec<GpuDevice>, u64, u64, Vec<(u32, u32, u32)>);

fn node_strategy() -> impl Strategy<Value = NodeSpec> {
    (
        prop::collection::vec(gpu_strategy(), 1..=8),
        2_000u64..=32_000,
        4_096u64..=65_536,
        prop::collection::vec((0u32..8, 0u32..8, 1u32..=6), 0..4),
    )
}

fn cluster_strategy() -> impl Strategy<Value = Cluster> {
    prop::collection::vec(node_strategy(), 1..=4).prop_map(|nodes| {
        Cluster::new(
            nodes
                .into_iter()
                .enumerate()
                .map(|(n, (mut gpus, cpu, mem, links))| {
                    let len = u32::try_from(gpus.len()).expect("at most 8 GPUs");
                    for (i, g) in (0u32..).zip(gpus.iter_mut()) {
                        g.uuid = format!("GPU-n{n}-{i}");
                        g.index = i;
                    }
                    for (a, b, k) in links {
                        let (a, b) = (a % len, b % len);
                        if a != b {
                            gpus[a as usize].nvlink_peers.insert(b, k);
                        }
                    }
                    NodeState::new(Arc::new(NodeInventory {
                        name: format!("node-{n}"),
                        cpu_milli: cpu,
                        memory_mib: mem,
                        gpus,
                    }))
                })
                .collect(),
        )
    })
}

fn selector_strategy() -> impl Strategy<Value = DeviceSelector> {
    prop_oneof![
        6 => Just(DeviceSelector::default()),
        1 => Just(DeviceSelector { use_types: vec!["a100".into()], ..DeviceSelector::default() }),
        1 => Just(DeviceSelector { nouse_types: vec!["T4".into()], ..DeviceSelector::default() }),
        1 => Just(DeviceSelector { nouse_uuids: vec!["GPU-n0-0".into()], ..DeviceSelector::default() }),
        1 => Just(DeviceSelector {
            use_uuids: vec!["GPU-n0-1".into(), "GPU-n1-0".into(), "GPU-n1-1".into()],
            ..DeviceSelector::default()
        }),
    ]
}

fn request_strategy() -> impl Strategy<Value = Option<DeviceRequest>> {
    (
        0u32..=3,
        prop_oneof![
            (256u64..=40_960).prop_map(MemoryRequest::Mib),
            (1u32..=100).prop_map(MemoryRequest::Percent)
        ],
        prop_oneof![2 => Just(0u32), 1 => Just(100), 3 => 1u32..=100],
        selector_strategy(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(count, memory, cores, selector, numa_bind)| {
            (count > 0).then_some(DeviceRequest {
                count,
                memory,
                cores,
                selector,
                numa_bind,
            })
        })
}

fn container_strategy() -> impl Strategy<Value = ContainerRequest> {
    (
        prop_oneof![
            1 => Just(ContainerKind::Init),
            1 => Just(ContainerKind::Sidecar),
            3 => Just(ContainerKind::App)
        ],
        0u64..=4_000,
        0u64..=8_192,
        request_strategy(),
    )
        .prop_map(|(kind, cpu_milli, memory_mib, gpu)| ContainerRequest {
            name: String::new(),
            kind,
            cpu_milli,
            memory_mib,
            gpu,
        })
}

/// A pod in Kubernetes container order: init containers and sidecars (in any interleaving) before the
/// app containers.
fn pod_strategy() -> impl Strategy<Value = Vec<ContainerRequest>> {
    prop::collection::vec(container_strategy(), 1..=3).prop_map(|mut cs| {
        cs.sort_by_key(|c| c.kind == ContainerKind::App);
        for (i, c) in cs.iter_mut().enumerate() {
            c.name = format!("c{i}");
        }
        cs
    })
}

fn pods_strategy() -> impl Strategy<Value = Vec<PodRequest>> {
    prop::collection::vec(pod_strategy(), 1..=10).prop_map(|pods| {
        pods.into_iter()
            .enumerate()
            .map(|(i, containers)| PodRequest {
                namespace: "default".into(),
                name: format!("pod-{i}"),
                uid: format!("u{i}"),
                containers,
                node_policy: None,
                gpu_policy: None,
            })
            .collect()
    })
}

// ---- the brute-force oracle ----

/// HAMi's per-device rules, written independently of `fit.rs`: healthy, allowed by the selector, a free
/// slot, enough free memory and cores (free clamps at zero), an exclusive request only on a GPU nobody
/// holds, and a 0-core request only on a GPU whose compute is not saturated.
fn device_ok(g: &GpuDevice, used: GpuUsage, req: &DeviceRequest) -> bool {
    let total_mem = g.schedulable_memory_mib();
    let total_cores = g.schedulable_cores();
    let mem = req.memory.resolve(total_mem);
    g.healthy
        && req.selector.allows(&g.model, &g.uuid)
        && used.slots < g.split_count
        && mem <= total_mem.saturating_sub(used.memory_mib)
        && req.cores <= total_cores.saturating_sub(used.cores)
        && !(total_cores > 0 && req.cores >= total_cores && used.slots > 0)
        && !(req.cores == 0 && used.cores >= total_cores)
}

/// All k-subsets of `items`.
fn subsets(items: &[usize], k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        for mut rest in subsets(&items[i + 1..], k - 1) {
            rest.insert(0, first);
            out.push(rest);
        }
    }
    out
}

/// Whether some assignment of distinct GPUs per container places `pod` on `node`. Containers run as in
/// Kubernetes: an init container beside the node's use and the sidecars started before it; a sidecar
/// from its start on; an app container beside all sidecars and the other app containers.
fn brute_fits(node: &NodeState, pod: &PodRequest) -> bool {
    if pod.effective_cpu_milli() > node.free_cpu_milli()
        || pod.effective_memory_mib() > node.free_memory_mib()
    {
        return false;
    }
    let n = node.gpus.len();
    brute_rec(
        node,
        pod,
        0,
        &mut vec![GpuUsage::default(); n],
        &mut vec![GpuUsage::default(); n],
    )
}

fn brute_rec(
    node: &NodeState,
    pod: &PodRequest,
    ci: usize,
    sidecars: &mut Vec<GpuUsage>,
    apps: &mut Vec<GpuUsage>,
) -> bool {
    let Some(c) = pod.containers.get(ci) else {
        return true;
    };
    let Some(req) = &c.gpu else {
        return brute_rec(node, pod, ci + 1, sidecars, apps);
    };
    let gpus = &node.inventory.gpus;
    let live = |i: usize| {
        let mut u = node.gpus[i];
        u.add(sidecars[i]);
        if c.kind == ContainerKind::App {
            u.add(apps[i]);
        }
        u
    };
    let fitting: Vec<usize> = (0..gpus.len())
        .filter(|&i| device_ok(&gpus[i], live(i), req))
        .collect();
    let sets: Vec<Vec<usize>> = subsets(&fitting, req.count as usize)
        .into_iter()
        .filter(|s| !req.numa_bind || s.iter().all(|&i| gpus[i].numa == gpus[s[0]].numa))
        .collect();
    if c.kind == ContainerKind::Init {
        // An init container changes nothing for later containers: any feasible set will do.
        return !sets.is_empty() && brute_rec(node, pod, ci + 1, sidecars, apps);
    }
    for set in sets {
        let grants: Vec<(usize, GpuUsage)> = set
            .iter()
            .map(|&i| {
                let u = GpuUsage {
                    slots: 1,
                    memory_mib: req.memory.resolve(gpus[i].schedulable_memory_mib()),
                    cores: req.cores,
                };
                (i, u)
            })
            .collect();
        let target = if c.kind == ContainerKind::Sidecar {
            &mut *sidecars
        } else {
            &mut *apps
        };
        for &(i, u) in &grants {
            target[i].add(u);
        }
        let ok = brute_rec(node, pod, ci + 1, sidecars, apps);
        let target = if c.kind == ContainerKind::Sidecar {
            &mut *sidecars
        } else {
            &mut *apps
        };
        for &(i, u) in &grants {
            target[i].sub(u);
        }
        if ok {
            return true;
        }
    }
    false
}

// ---- checks ----

/// Every grant of `placement` is one of `node`'s GPUs, eligible for its container, with the request's
/// resolved memory and cores; a container's GPUs are distinct, as many as it asks for, and on one NUMA
/// node when bound.
fn check_grants(node: &NodeState, pod: &PodRequest, placement: &NodePlacement) -> Result<(), String> {
    if placement.containers.len() != pod.containers.len() {
        return Err("one grant list per container".into());
    }
    let gpus = &node.inventory.gpus;
    for (c, grants) in pod.containers.iter().zip(&placement.containers) {
        let Some(req) = &c.gpu else {
            if grants.is_empty() {
                continue;
            }
            return Err(format!("{}: grants without a request", c.name));
        };
        if grants.len() != req.count as usize {
            return Err(format!("{}: {} grants for {}", c.name, grants.len(), req.count));
        }
        for (k, g) in grants.iter().enumerate() {
            let dev = gpus.get(g.gpu).ok_or("grant names a missing GPU")?;
            if grants[..k].iter().any(|o| o.gpu == g.gpu) {
                return Err(format!("{}: GPU {} twice", c.name, g.gpu));
            }
            if !dev.healthy || !req.selector.allows(&dev.model, &dev.uuid) {
                return Err(format!("{}: ineligible GPU {}", c.name, dev.uuid));
            }
            if g.memory_mib != req.memory.resolve(dev.schedulable_memory_mib()) || g.cores != req.cores {
                return Err(format!("{}: grant {g:?} differs from the request", c.name));
            }
        }
        if req.numa_bind
            && grants
                .iter()
                .any(|g| gpus[g.gpu].numa != gpus[grants[0].gpu].numa)
        {
            return Err(format!("{}: NUMA-bound GPUs on different NUMA nodes", c.name));
        }
    }
    Ok(())
}

fn build(name: &str, cluster: &Cluster, pods: &[PodRequest]) -> Box<dyn Policy> {
    let model = WorkloadModel::from_pods(pods, 1.0);
    build_policy(name, Arc::new(model), ClusterNorm::of(&cluster.nodes)).expect("known policy")
}

/// A key identifying a pod's requests (not its name or UID), for the score cache.
fn shape_key(pod: &PodRequest) -> u64 {
    let mut h = DefaultHasher::new();
    pod.containers.hash(&mut h);
    pod.node_policy.hash(&mut h);
    pod.gpu_policy.hash(&mut h);
    h.finish()
}

/// One decision, in comparable form (the score by its bits).
type Outcome = Option<(usize, NodePlacement, u64)>;

/// Schedules `pods` in order with policy `name` and seed `seed`, committing each decision; returns the
/// decisions.
fn run(name: &str, cluster: &Cluster, pods: &[PodRequest], seed: u64, cached: bool) -> Vec<Outcome> {
    let mut c = cluster.clone();
    let policy = build(name, &c, pods);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cache = ScoreCache::new();
    let mut out = Vec::new();
    for pod in pods {
        let d = if cached {
            c.decide(policy.as_ref(), pod, &mut rng, Some((&mut cache, shape_key(pod))))
        } else {
            c.decide(policy.as_ref(), pod, &mut rng, None)
        };
        if let Some(d) = &d {
            c.commit(pod, d).expect("a decided placement commits");
        }
        out.push(d.map(|d: Decision| (d.node, d.placement, d.score.to_bits())));
    }
    out
}

/// Whether a node's use (GPUs, host CPU, host memory) equals another's.
fn same_use(a: &NodeState, b: &NodeState) -> bool {
    a.gpus == b.gpus && a.cpu_milli == b.cpu_milli && a.memory_mib == b.memory_mib
}

// ---- properties ----

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// (a), (c), (d) for every policy: each decision is sound and commits; nothing is ever over capacity;
    /// a pod that the brute force can place somewhere is always placed; commit then release restores the
    /// node exactly.
    #[test]
    fn decisions_are_complete_sound_and_never_overcommit(
        cluster in cluster_strategy(),
        pods in pods_strategy(),
        seed in any::<u64>(),
    ) {
        for name in POLICY_NAMES {
            let mut c = cluster.clone();
            let policy = build(name, &c, &pods);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for pod in &pods {
                let feasible: Vec<bool> = c.nodes.iter().map(|n| brute_fits(n, pod)).collect();
                let decision = c.decide(policy.as_ref(), pod, &mut rng, None);
                let Some(d) = decision else {
                    prop_assert!(
                        !feasible.contains(&true),
                        "{name}: {} unplaced though feasible on {:?}; why: {:?}",
                        pod.name, feasible, c.explain(policy.as_ref(), pod)
                    );
                    continue;
                };
                prop_assert!(feasible[d.node], "{name}: {} placed where the oracle finds no fit", pod.name);
                let check = check_grants(&c.nodes[d.node], pod, &d.placement);
                prop_assert!(check.is_ok(), "{name}: {}: {:?}", pod.name, check);
                let before = c.nodes[d.node].clone();
                let committed = c.commit(pod, &d);
                prop_assert!(committed.is_ok(), "{name}: {}: commit failed: {:?}", pod.name, committed);
                for n in &c.nodes {
                    assert_within_capacity(n);
                }
                let mut undone = c.nodes[d.node].clone();
                undone.release(pod, &d.placement);
                prop_assert!(same_use(&undone, &before), "{name}: release did not restore the node");
                prop_assert_eq!(undone.generation, before.generation + 2);
            }
        }
    }

    /// (b) for every policy: two runs with the same cluster, pods and seed decide identically, and the
    /// score cache changes nothing.
    #[test]
    fn decisions_are_deterministic_and_cache_neutral(
        cluster in cluster_strategy(),
        pods in pods_strategy(),
        seed in any::<u64>(),
    ) {
        for name in POLICY_NAMES {
            let first = run(name, &cluster, &pods, seed, false);
            let second = run(name, &cluster, &pods, seed, false);
            prop_assert_eq!(&first, &second, "{} is not deterministic", name);
            let cached = run(name, &cluster, &pods, seed, true);
            prop_assert_eq!(&first, &cached, "{} differs with the score cache", name);
        }
    }

    /// The ledger under random assume/forget interleavings (including repeated and unknown forgets):
    /// every node's use always equals the sum of the allocations the ledger holds on it, and forgetting
    /// everything leaves the cluster idle.
    #[test]
    fn ledger_use_matches_held_allocations(
        cluster in cluster_strategy(),
        pods in pods_strategy(),
        forgets in prop::collection::vec((0usize..12, any::<bool>()), 0..12),
        seed in any::<u64>(),
    ) {
        let mut c = cluster.clone();
        let policy = build("spread", &c, &pods);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut ledger = Ledger::new();
        let mut forgets = forgets.into_iter();
        for pod in &pods {
            if let Some(d) = c.decide(policy.as_ref(), pod, &mut rng, None) {
                ledger.assume(&mut c, pod, &d).expect("a decided placement commits");
                prop_assert!(ledger.assume(&mut c, pod, &d).is_err(), "second assume must fail");
            }
            if let Some((k, now)) = forgets.next() && now {
                let uid = format!("u{k}");
                let held = ledger.contains(&uid);
                prop_assert_eq!(ledger.forget(&mut c, &uid), held);
                prop_assert!(!ledger.forget(&mut c, &uid), "a second forget is a no-op");
            }
            // Rebuild from the ledger alone: it must give the same use.
            let mut rebuilt = cluster.clone();
            for (_, e) in ledger.iter() {
                prop_assert!(rebuilt.nodes[e.node].commit(&e.pod, &e.placement).is_ok());
            }
            for (a, b) in rebuilt.nodes.iter().zip(&c.nodes) {
                prop_assert!(same_use(a, b), "ledger and cluster disagree on {}", a.name());
            }
        }
        let uids: Vec<String> = ledger.iter().map(|(u, _)| u.to_owned()).collect();
        for uid in uids {
            prop_assert!(ledger.forget(&mut c, &uid));
        }
        prop_assert!(ledger.is_empty());
        for n in &c.nodes {
            prop_assert!(n.gpus.iter().all(GpuUsage::is_idle) && n.cpu_milli == 0 && n.memory_mib == 0);
        }
    }
}
