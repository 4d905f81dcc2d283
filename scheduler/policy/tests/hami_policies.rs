//! HAMi's placement behaviour (`shared/reference/hami.md` §2.3, §2.4, §3): GPU- and node-level binpack and
//! spread, pod overrides, exclusive cores, type/UUID selectors, NUMA binding, NVLink and topology-aware
//! choice, memory overcommit and split counts, through `build_policy` and `Cluster::decide`.

mod common;

use common::{
    GIB, app, assert_within_capacity, cluster, decide, gpu, gpus, gpus_of, inventory, mib, node, pct, place,
    pod, policy, single,
};
use hami_api::{DeviceRequest, DeviceSelector, GpuDevice, GpuPolicy, NodePolicy, PodRequest};
use hami_policy::{Cluster, GpuUsage, NodeState, POLICY_NAMES, Reason};

/// The HAMi policies: node and GPU binpack, node and GPU spread.
const HAMI: [&str; 2] = ["binpack", "spread"];

/// A one-container pod asking for `req`, with a GPU policy override.
fn with_gpu_policy(name: &str, req: DeviceRequest, gpu_policy: GpuPolicy) -> PodRequest {
    let mut p = single(name, req);
    p.gpu_policy = Some(gpu_policy);
    p
}

/// The reasons count for `reason` on the only node of `c`.
fn reason_count(c: &Cluster, policy_name: &str, p: &PodRequest, reason: Reason) -> Option<u32> {
    let pol = policy(policy_name, c);
    let why = c.explain(pol.as_ref(), p);
    why.first().and_then(|(_, f)| f.reasons.get(&reason).copied())
}

// ---- binpack / spread ----

/// GPU-level binpack puts a second small pod on the GPU the first one uses; GPU-level spread puts it on
/// the other, idle GPU.
#[test]
fn gpu_binpack_stacks_and_spread_spreads() {
    for (name, same) in [("binpack", true), ("spread", false)] {
        let mut c = cluster(vec![node("node-1", gpus("", 2, 16 * GIB))]);
        let pol = policy(name, &c);
        let first = place(&mut c, pol.as_ref(), &single("p1", mib(1, GIB, 10)));
        let second = place(&mut c, pol.as_ref(), &single("p2", mib(1, GIB, 10)));
        assert_eq!(gpus_of(&first, 0) == gpus_of(&second, 0), same, "policy {name}");
        assert_within_capacity(&c.nodes[0]);
    }
}

/// A node with some use (one GPU holds 8 GiB, 50 cores) and an idle node, in both orders.
fn busy_and_idle(busy_first: bool) -> (Cluster, usize) {
    let mut busy = node("busy", gpus("b", 2, 16 * GIB));
    busy.gpus[0] = GpuUsage {
        slots: 1,
        memory_mib: 8 * GIB,
        cores: 50,
    };
    let idle = node("idle", gpus("i", 2, 16 * GIB));
    if busy_first {
        (cluster(vec![busy, idle]), 0)
    } else {
        (cluster(vec![idle, busy]), 1)
    }
}

/// Node-level binpack picks the fuller node and node-level spread the emptier one, whatever the node
/// order (HAMi's node score on use before placing the pod).
#[test]
fn node_binpack_picks_fuller_and_spread_picks_emptier() {
    for busy_first in [true, false] {
        let (c, busy) = busy_and_idle(busy_first);
        let p = single("p", mib(1, GIB, 10));
        let d = decide(&c, policy("binpack", &c).as_ref(), &p).expect("fits");
        assert_eq!(d.node, busy, "binpack, busy first: {busy_first}");
        let d = decide(&c, policy("spread", &c).as_ref(), &p).expect("fits");
        assert_eq!(d.node, 1 - busy, "spread, busy first: {busy_first}");
    }
}

/// Pod annotations override the cluster policy: `hami.io/node-scheduler-policy: spread` under the
/// binpack policy picks the emptier node, and `hami.io/gpu-scheduler-policy: spread` the idle GPU.
#[test]
fn pod_overrides_beat_the_cluster_policy() {
    let (c, busy) = busy_and_idle(true);
    let binpack = policy("binpack", &c);
    let mut p = single("p", mib(1, GIB, 10));
    p.node_policy = Some(NodePolicy::Spread);
    assert_eq!(decide(&c, binpack.as_ref(), &p).expect("fits").node, 1 - busy);

    // One node: binpack stacks on GPU 0, the GPU override spreads to GPU 1.
    let mut n = node("n", gpus("", 2, 16 * GIB));
    n.gpus[0] = GpuUsage {
        slots: 1,
        memory_mib: GIB,
        cores: 10,
    };
    let c = cluster(vec![n]);
    let binpack = policy("binpack", &c);
    let p = single("p", mib(1, GIB, 10));
    assert_eq!(
        gpus_of(&decide(&c, binpack.as_ref(), &p).expect("fits"), 0),
        vec![0]
    );
    let p = with_gpu_policy("p", mib(1, GIB, 10), GpuPolicy::Spread);
    assert_eq!(
        gpus_of(&decide(&c, binpack.as_ref(), &p).expect("fits"), 0),
        vec![1]
    );
    let spread = policy("spread", &c);
    let p = with_gpu_policy("p", mib(1, GIB, 10), GpuPolicy::Binpack);
    assert_eq!(
        gpus_of(&decide(&c, spread.as_ref(), &p).expect("fits"), 0),
        vec![0]
    );
}

// ---- exclusive ----

/// An exclusive request (cores 100) needs an idle GPU: it is refused on a GPU that holds any container,
/// even one with 0 cores (`ExclusiveDeviceAllocateConflict`), and takes the idle GPU when there is one.
#[test]
fn exclusive_request_needs_an_idle_gpu() {
    let mut n = node("n", gpus("", 1, 16 * GIB));
    n.gpus[0] = GpuUsage {
        slots: 1,
        memory_mib: GIB,
        cores: 0,
    };
    let c = cluster(vec![n]);
    let exclusive = single("x", mib(1, GIB, 100));
    for name in POLICY_NAMES {
        assert!(
            decide(&c, policy(name, &c).as_ref(), &exclusive).is_none(),
            "policy {name}"
        );
        assert_eq!(
            reason_count(&c, name, &exclusive, Reason::ExclusiveConflict),
            Some(1)
        );
    }
    let mut n = node("n", gpus("", 2, 16 * GIB));
    n.gpus[0] = GpuUsage {
        slots: 1,
        memory_mib: GIB,
        cores: 0,
    };
    let c = cluster(vec![n]);
    for name in POLICY_NAMES {
        let d = decide(&c, policy(name, &c).as_ref(), &exclusive).expect("GPU 1 is idle");
        assert_eq!(gpus_of(&d, 0), vec![1], "policy {name}");
    }
}

/// A GPU held exclusively (cores 100) takes nothing else: a 0-core request fails with
/// `CardComputeUnitsExhausted`, a 10-core request with `CardInsufficientCore`.
#[test]
fn exclusive_holder_blocks_every_other_request() {
    let mut c = cluster(vec![node("n", gpus("", 1, 16 * GIB))]);
    let pol = policy("binpack", &c);
    place(&mut c, pol.as_ref(), &single("x", mib(1, GIB, 100)));
    let zero = single("zero", mib(1, GIB, 0));
    let ten = single("ten", mib(1, GIB, 10));
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        assert!(decide(&c, pol.as_ref(), &zero).is_none(), "policy {name}");
        assert!(decide(&c, pol.as_ref(), &ten).is_none(), "policy {name}");
        assert_eq!(reason_count(&c, name, &zero, Reason::ComputeSaturated), Some(1));
        assert_eq!(reason_count(&c, name, &ten, Reason::InsufficientCores), Some(1));
    }
}

// ---- selectors ----

/// A node with a T4 (`GPU-t4`, index 0) and an A100 (`GPU-a100`, index 1).
fn t4_and_a100() -> Cluster {
    let t4 = GpuDevice::new("GPU-t4", 0, "NVIDIA-Tesla T4", 16 * GIB);
    let a100 = GpuDevice::new("GPU-a100", 1, "NVIDIA-NVIDIA A100-SXM4-40GB", 40 * GIB);
    cluster(vec![node("n", vec![t4, a100])])
}

/// A 1 GPU, 1 GiB request restricted by `selector`.
fn selected(selector: DeviceSelector) -> PodRequest {
    let mut req = mib(1, GIB, 10);
    req.selector = selector;
    single("p", req)
}

/// `use-gputype` / `nouse-gputype` match the registered model by case-insensitive substring;
/// `use-gpuuuid` / `nouse-gpuuuid` match UUIDs exactly; a selector no GPU passes leaves the pod
/// unschedulable with `CardTypeMismatch` / `CardUuidMismatch` on every GPU.
#[test]
fn type_and_uuid_selectors() {
    let c = t4_and_a100();
    let s = |f: fn(&mut DeviceSelector)| {
        let mut sel = DeviceSelector::default();
        f(&mut sel);
        selected(sel)
    };
    let cases: [(PodRequest, Option<usize>); 7] = [
        (s(|x| x.use_types = vec!["a100".into()]), Some(1)),
        (s(|x| x.use_types = vec!["tesla".into(), "h100".into()]), Some(0)),
        (s(|x| x.nouse_types = vec!["A100".into()]), Some(0)),
        (s(|x| x.use_uuids = vec!["GPU-a100".into()]), Some(1)),
        (s(|x| x.nouse_uuids = vec!["GPU-t4".into()]), Some(1)),
        (s(|x| x.use_types = vec!["H100".into()]), None),
        (s(|x| x.use_uuids = vec!["gpu-a100".into()]), None),
    ];
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        for (i, (p, want)) in cases.iter().enumerate() {
            let got = decide(&c, pol.as_ref(), p).map(|d| gpus_of(&d, 0)[0]);
            assert_eq!(got, *want, "policy {name}, case {i}");
        }
    }
    assert_eq!(
        reason_count(&c, "spread", &cases[5].0, Reason::TypeMismatch),
        Some(2)
    );
    assert_eq!(
        reason_count(&c, "spread", &cases[6].0, Reason::UuidMismatch),
        Some(2)
    );
}

// ---- NUMA and NVLink ----

/// GPUs with NUMA nodes `numa` (and 16 GiB, 10 slots each).
fn numa_gpus(numa: &[u32]) -> Vec<GpuDevice> {
    numa.iter()
        .zip(0u32..)
        .map(|(&n, i)| {
            let mut g = gpu(&format!("GPU-{i}"), i, 16 * GIB);
            g.numa = Some(n);
            g
        })
        .collect()
}

/// A 2-GPU request, NUMA-bound if `bind`.
fn two_gpus(bind: bool) -> PodRequest {
    let mut req = mib(2, GIB, 10);
    req.numa_bind = bind;
    single("p", req)
}

/// With `nvidia.com/numa-bind`, all GPUs of a container share one NUMA node: with GPUs 1 and 3 full the
/// free GPUs 0 and 2 sit on different NUMA nodes, so the bound request fails with `NumaNotFit` while the
/// unbound one takes {0, 2}; with only GPU 1 full the bound request takes {2, 3}.
#[test]
fn numa_bind_keeps_a_container_on_one_numa_node() {
    let full = |n: &mut NodeState, i: usize| {
        n.gpus[i] = GpuUsage {
            slots: 10,
            memory_mib: GIB,
            cores: 10,
        };
    };
    let mut n = node("n", numa_gpus(&[0, 0, 1, 1]));
    full(&mut n, 1);
    full(&mut n, 3);
    let c = cluster(vec![n]);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        assert!(
            decide(&c, pol.as_ref(), &two_gpus(true)).is_none(),
            "policy {name}"
        );
        assert_eq!(
            reason_count(&c, name, &two_gpus(true), Reason::NumaNotFit),
            Some(1)
        );
        let mut got = gpus_of(&decide(&c, pol.as_ref(), &two_gpus(false)).expect("fits"), 0);
        got.sort_unstable();
        assert_eq!(got, vec![0, 2], "policy {name}");
    }
    let mut n = node("n", numa_gpus(&[0, 0, 1, 1]));
    full(&mut n, 1);
    let c = cluster(vec![n]);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let mut got = gpus_of(&decide(&c, pol.as_ref(), &two_gpus(true)).expect("fits"), 0);
        got.sort_unstable();
        assert_eq!(got, vec![2, 3], "policy {name}");
    }
}

/// Regression: on a 16-GPU node (GPUs 0-7 on NUMA 0, 8-15 on NUMA 1) with GPUs 6, 7, 14 and 15 partly
/// used, a NUMA-bound request for 7 GPUs fits only on NUMA 0 (all of 0-7 still fit). The candidate cap
/// must apply per NUMA group, so every policy places it there.
#[test]
fn numa_bind_finds_the_group_beyond_the_candidate_cap() {
    let numa: Vec<u32> = (0..16).map(|i| if i < 8 { 0 } else { 1 }).collect();
    let mut n = node("n", numa_gpus(&numa));
    for i in [6, 7, 14, 15] {
        n.gpus[i] = GpuUsage {
            slots: 1,
            memory_mib: GIB,
            cores: 10,
        };
    }
    let c = cluster(vec![n]);
    let mut req = mib(7, GIB, 10);
    req.numa_bind = true;
    let pod = single("p", req);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let got = gpus_of(&decide(&c, pol.as_ref(), &pod).expect("fits on NUMA 0"), 0);
        assert_eq!(got.len(), 7, "policy {name}");
        assert!(got.iter().all(|&g| g < 8), "policy {name}: {got:?}");
    }
}

/// Multi-GPU requests prefer an NVLink-connected set on one NUMA node: among GPUs on NUMA [0, 0, 1, 1]
/// with 6 links between 1 and 2 (across NUMA) and 2 links between 2 and 3, the set {2, 3} wins; on one
/// NUMA node, the linked pair {0, 3} beats the index-first pair {0, 1}. Holds for the HAMi policies with
/// every GPU policy.
#[test]
fn multi_gpu_prefers_nvlink_on_one_numa_node() {
    let mut gs = numa_gpus(&[0, 0, 1, 1]);
    gs[1].nvlink_peers.insert(2, 6);
    gs[2].nvlink_peers.insert(1, 6);
    gs[2].nvlink_peers.insert(3, 2);
    gs[3].nvlink_peers.insert(2, 2);
    let cross = cluster(vec![node("n", gs)]);
    let mut gs = numa_gpus(&[0, 0, 0, 0]);
    gs[0].nvlink_peers.insert(3, 4);
    let same = cluster(vec![node("n", gs)]);
    for (c, want) in [(&cross, vec![2, 3]), (&same, vec![0, 3])] {
        for name in HAMI {
            for gp in [
                None,
                Some(GpuPolicy::Binpack),
                Some(GpuPolicy::Spread),
                Some(GpuPolicy::TopologyAware),
            ] {
                let mut p = two_gpus(false);
                p.gpu_policy = gp;
                let mut got = gpus_of(&decide(c, policy(name, c).as_ref(), &p).expect("fits"), 0);
                got.sort_unstable();
                assert_eq!(got, want, "policy {name}, gpu policy {gp:?}");
            }
        }
    }
}

/// A node whose GPUs 0, 1, 2 are fully NVLink-connected (4 links each) and GPU 3 has one link to GPU 0.
fn clique_plus_one() -> Cluster {
    let mut gs = gpus("", 4, 16 * GIB);
    gs[0].nvlink_peers.insert(1, 4);
    gs[0].nvlink_peers.insert(2, 4);
    gs[1].nvlink_peers.insert(2, 4);
    gs[3].nvlink_peers.insert(0, 1);
    cluster(vec![node("n", gs)])
}

/// Topology-aware, one GPU: the worst-connected GPU (3) is taken, keeping the well-connected ones free;
/// plain spread takes GPU 0 (index order on a tie). Several GPUs: the best-connected set {0, 1, 2}.
#[test]
fn topology_aware_single_gpu_takes_the_worst_connected() {
    let c = clique_plus_one();
    for name in HAMI {
        let pol = policy(name, &c);
        let p = with_gpu_policy("p", mib(1, GIB, 10), GpuPolicy::TopologyAware);
        assert_eq!(
            gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0),
            vec![3],
            "{name}"
        );
        let p = with_gpu_policy("p", mib(1, GIB, 10), GpuPolicy::Spread);
        assert_eq!(
            gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0),
            vec![0],
            "{name}"
        );
        let p = with_gpu_policy("p", mib(3, GIB, 10), GpuPolicy::TopologyAware);
        let mut got = gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2], "{name}");
    }
}

// ---- overcommit and split count ----

/// `deviceMemoryScaling` 2.0 makes a 16 GiB GPU schedulable as 32 GiB: two 16 GiB pods fit, a third does
/// not; without scaling the second already fails. Percent requests resolve against the scaled memory.
#[test]
fn memory_scaling_overcommits_device_memory() {
    for (scaling, fit) in [(2.0, 2), (1.0, 1)] {
        let mut g = gpu("GPU-A", 0, 16 * GIB);
        g.memory_scaling = scaling;
        let mut c = cluster(vec![node("n", vec![g])]);
        for name in POLICY_NAMES {
            let mut c = c.clone();
            let pol = policy(name, &c);
            let mut placed = 0;
            for i in 0..3 {
                let p = single(&format!("p{i}"), mib(1, 16 * GIB, 10));
                if let Some(d) = decide(&c, pol.as_ref(), &p) {
                    c.commit(&p, &d).expect("commits");
                    placed += 1;
                }
            }
            assert_eq!(placed, fit, "policy {name}, scaling {scaling}");
            assert_within_capacity(&c.nodes[0]);
        }
        let pol = policy("spread", &c);
        let d = place(&mut c, pol.as_ref(), &single("half", pct(1, 50, 0)));
        assert_eq!(
            d.placement.containers[0][0].memory_mib,
            (16.0 * scaling) as u64 * GIB / 2
        );
    }
}

/// `deviceSplitCount` caps the containers sharing a GPU: with 2 slots, a third small pod is refused
/// with `CardTimeSlicingExhausted`, and one pod whose 3 app containers each need the only GPU fits with
/// 3 slots but not with 2.
#[test]
fn split_count_limits_containers_per_gpu() {
    let mut g = gpu("GPU-A", 0, 16 * GIB);
    g.split_count = 2;
    let base = cluster(vec![node("n", vec![g.clone()])]);
    for name in POLICY_NAMES {
        let mut c = base.clone();
        let pol = policy(name, &c);
        place(&mut c, pol.as_ref(), &single("p0", mib(1, GIB, 10)));
        place(&mut c, pol.as_ref(), &single("p1", mib(1, GIB, 10)));
        let third = single("p2", mib(1, GIB, 10));
        assert!(decide(&c, pol.as_ref(), &third).is_none(), "policy {name}");
        assert_eq!(reason_count(&c, name, &third, Reason::SlotsExhausted), Some(1));
    }
    let three = pod(
        "p",
        "u",
        (0..3).map(|i| app(&format!("c{i}"), mib(1, GIB, 10))).collect(),
    );
    for (split, fits) in [(2, false), (3, true)] {
        g.split_count = split;
        let c = cluster(vec![node("n", vec![g.clone()])]);
        for name in POLICY_NAMES {
            let got = decide(&c, policy(name, &c).as_ref(), &three).is_some();
            assert_eq!(got, fits, "policy {name}, split {split}");
        }
    }
}

/// Host CPU and memory are filtered too: a pod asking more CPU than the node has free fails with
/// `NodeInsufficientCPU` and goes to a node that has it.
#[test]
fn host_cpu_is_filtered() {
    let mut small = inventory("small", gpus("s", 1, 16 * GIB));
    small.cpu_milli = 1000;
    let big = inventory("big", gpus("b", 1, 16 * GIB));
    let mut p = single("p", mib(1, GIB, 10));
    p.containers[0].cpu_milli = 2000;
    let c = cluster(vec![NodeState::new(small.into())]);
    assert!(decide(&c, policy("binpack", &c).as_ref(), &p).is_none());
    assert_eq!(
        reason_count(&c, "binpack", &p, Reason::NodeInsufficientCpu),
        Some(1)
    );
    let c = cluster(vec![
        NodeState::new(c.nodes[0].inventory.clone()),
        NodeState::new(big.into()),
    ]);
    for name in POLICY_NAMES {
        assert_eq!(
            decide(&c, policy(name, &c).as_ref(), &p).expect("big fits").node,
            1,
            "{name}"
        );
    }
}
