//! Peer-project failure cases C01-C06, C08, C09, C14, C21, C26 and C29 (placement side), each asserting
//! the case's "Correct outcome" through the public placement API: `Cluster::decide`, `Cluster::commit`,
//! the `Ledger` and `NodePlacement::to_pod_devices`.

mod common;

use std::sync::Arc;

use common::{
    GIB, app, assert_within_capacity, cluster, ctr, decide, gpu, gpus, gpus_of, init, inventory, mib, node,
    pct, place, plain, pod, policy, single,
};
use hami_api::{ContainerKind, PodDevices};
use hami_policy::{
    Cluster, DeviceGrant, Error, GpuUsage, Ledger, NamespaceQuota, NodePlacement, NodeState, POLICY_NAMES,
    QuotaUsage, Reason, check_quota, fit_pod,
};

// ---- C01: multi-container usage keyed by device identity ----

/// C01: two containers (10 GiB and 1 GiB) on two idle 10 GiB GPUs under spread land on different GPUs,
/// and the per-device used memory is exactly {10 GiB, 1 GiB} with nothing over capacity.
#[test]
fn c01_two_containers_get_different_gpus_and_exact_usage() {
    let mut c = cluster(vec![node("node-1", gpus("", 2, 10 * GIB))]);
    let p = pod(
        "p",
        "u1",
        vec![app("c1", mib(1, 10 * GIB, 0)), app("c2", mib(1, GIB, 0))],
    );
    let pol = policy("spread", &c);
    let d = place(&mut c, pol.as_ref(), &p);
    let (g1, g2) = (gpus_of(&d, 0), gpus_of(&d, 1));
    assert_eq!(g1.len(), 1);
    assert_eq!(g2.len(), 1);
    assert_ne!(g1[0], g2[0], "c1 and c2 must not share a GPU");
    let n = &c.nodes[0];
    assert_eq!(n.gpus[g1[0]].memory_mib, 10 * GIB);
    assert_eq!(n.gpus[g2[0]].memory_mib, GIB);
    let mut used: Vec<u64> = n.gpus.iter().map(|u| u.memory_mib).collect();
    used.sort_unstable();
    assert_eq!(used, vec![GIB, 10 * GIB]);
    assert_within_capacity(n);
}

/// C01 for every policy: whatever the GPU order, the two containers never share a 10 GiB GPU.
#[test]
fn c01_holds_for_every_policy() {
    for name in POLICY_NAMES {
        let mut c = cluster(vec![node("node-1", gpus("", 2, 10 * GIB))]);
        let p = pod(
            "p",
            "u1",
            vec![app("c1", mib(1, 10 * GIB, 0)), app("c2", mib(1, GIB, 0))],
        );
        let pol = policy(name, &c);
        let d = place(&mut c, pol.as_ref(), &p);
        assert_ne!(gpus_of(&d, 0), gpus_of(&d, 1), "policy {name}");
        assert_within_capacity(&c.nodes[0]);
    }
}

// ---- C02: init containers are max-pooled, sidecars summed ----

/// A pod with 3 init containers of 1 GPU + `mem` MiB and a GPU-less app container.
fn three_inits(name: &str, uid: &str, mem: u64) -> hami_api::PodRequest {
    pod(
        name,
        uid,
        vec![
            init("init-0", mib(1, mem, 0)),
            init("init-1", mib(1, mem, 0)),
            init("init-2", mib(1, mem, 0)),
            plain("app"),
        ],
    )
}

/// C02 main case: node-1 (2 × 16 GiB) and node-2 (3 × 16 GiB); two pods, each with 3 init containers of
/// 1 GPU + 10 GiB and GPU-less apps. Both pods schedule through `decide` + `Ledger::assume` under every
/// policy, each charging a single 10 GiB share (the largest init container, not the sum).
#[test]
fn c02_init_containers_are_max_pooled_so_both_pods_schedule() {
    for name in POLICY_NAMES {
        let mut c = cluster(vec![
            node("node-1", gpus("a", 2, 16 * GIB)),
            node("node-2", gpus("b", 3, 16 * GIB)),
        ]);
        let pol = policy(name, &c);
        let mut ledger = Ledger::new();
        for (pname, uid) in [("pod-1", "u1"), ("pod-2", "u2")] {
            let p = three_inits(pname, uid, 10 * GIB);
            let d = decide(&c, pol.as_ref(), &p)
                .unwrap_or_else(|| panic!("policy {name}: {pname} must schedule"));
            ledger.assume(&mut c, &p, &d).expect("assume");
        }
        assert_eq!(ledger.len(), 2);
        let total: u64 = c.nodes.iter().flat_map(|n| &n.gpus).map(|u| u.memory_mib).sum();
        assert_eq!(total, 2 * 10 * GIB, "policy {name}: one 10 GiB share per pod");
        for n in &c.nodes {
            assert_within_capacity(n);
        }
    }
}

/// C02 follow-up: 3 init containers of 1 GPU + 7168 MiB on a node with 3 × 16 GiB schedule, charging one
/// 7168 MiB share, not 21504 MiB.
#[test]
fn c02_follow_up_three_inits_of_7168_mib() {
    for name in POLICY_NAMES {
        let mut c = cluster(vec![node("node-1", gpus("", 3, 16 * GIB))]);
        let pol = policy(name, &c);
        let p = three_inits("p", "u1", 7168);
        place(&mut c, pol.as_ref(), &p);
        let total: u64 = c.nodes[0].gpus.iter().map(|u| u.memory_mib).sum();
        assert_eq!(total, 7168, "policy {name}");
    }
}

/// C02: init containers run one at a time, so an init and an app container of 10 GiB each share one
/// 16 GiB GPU; a sidecar (restartable init container) runs beside the app, so the same pair with a
/// sidecar does not fit one 16 GiB GPU and, given two GPUs, is charged on both (10 GiB each).
#[test]
fn c02_sidecar_is_added_to_the_app_sum_not_max_pooled() {
    let with = |kind| {
        pod(
            "p",
            "u1",
            vec![
                ctr("first", kind, Some(mib(1, 10 * GIB, 0))),
                app("app", mib(1, 10 * GIB, 0)),
            ],
        )
    };
    let one_gpu = cluster(vec![node("node-1", gpus("", 1, 16 * GIB))]);
    for name in POLICY_NAMES {
        let pol = policy(name, &one_gpu);
        assert!(
            decide(&one_gpu, pol.as_ref(), &with(ContainerKind::Init)).is_some(),
            "policy {name}: init + app share one GPU"
        );
        assert!(
            decide(&one_gpu, pol.as_ref(), &with(ContainerKind::Sidecar)).is_none(),
            "policy {name}: sidecar + app cannot share one 16 GiB GPU"
        );
        let mut two = cluster(vec![node("node-1", gpus("", 2, 16 * GIB))]);
        let d = place(&mut two, pol.as_ref(), &with(ContainerKind::Sidecar));
        assert_ne!(gpus_of(&d, 0), gpus_of(&d, 1), "policy {name}");
        let used: Vec<u64> = two.nodes[0].gpus.iter().map(|u| u.memory_mib).collect();
        assert_eq!(used, vec![10 * GIB, 10 * GIB], "policy {name}");
    }
}

/// C02: the charge of a hand-made placement with sidecar and app on the same GPU is their sum, while an
/// init container and an app container on one GPU are charged the larger of the two.
#[test]
fn c02_charge_sums_sidecars_and_max_pools_inits() {
    let grant = |mem| DeviceGrant {
        gpu: 0,
        memory_mib: mem,
        cores: 10,
    };
    let placement = NodePlacement {
        containers: vec![vec![grant(3000)], vec![grant(5000)]],
    };
    let mk = |kind| {
        pod(
            "p",
            "u1",
            vec![
                ctr("first", kind, Some(mib(1, 3000, 10))),
                app("app", mib(1, 5000, 10)),
            ],
        )
    };
    let side = placement.charge(&mk(ContainerKind::Sidecar), 1);
    assert_eq!(
        side[0],
        GpuUsage {
            slots: 2,
            memory_mib: 8000,
            cores: 20
        }
    );
    let init = placement.charge(&mk(ContainerKind::Init), 1);
    assert_eq!(
        init[0],
        GpuUsage {
            slots: 1,
            memory_mib: 5000,
            cores: 10
        }
    );
}

/// C02, HAMi #3052 variant: one 40000 MiB GPU, a namespace quota of 24000 MiB gpumem, two app
/// containers each asking 1 GPU + gpumem-percentage 40 (16000 MiB each, 32000 in total). Case A (no init
/// container) and case B (plus a GPU-less init container) are both rejected with `ResourceQuotaNotFit`:
/// the init container must not shift what is counted. With a 32000 MiB quota both are accepted.
#[test]
fn c02_quota_counts_the_effective_request_with_or_without_init_containers() {
    let mut g = gpu("GPU-A", 0, 40_000);
    g.split_count = 10;
    let c = cluster(vec![node("node-1", vec![g])]);
    let apps = vec![app("a", pct(1, 40, 0)), app("b", pct(1, 40, 0))];
    let case_a = pod("a", "ua", apps.clone());
    let mut with_init = vec![plain("setup")];
    with_init[0].kind = ContainerKind::Init;
    with_init.extend(apps);
    let case_b = pod("b", "ub", with_init);
    let tight = NamespaceQuota {
        memory_mib: Some(24_000),
        cores: None,
    };
    let enough = NamespaceQuota {
        memory_mib: Some(32_000),
        cores: None,
    };
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        for p in [&case_a, &case_b] {
            let d = decide(&c, pol.as_ref(), p).expect("fits the GPU");
            let demand = QuotaUsage::of_placement(p, &d.placement, 1);
            assert_eq!(demand.memory_mib, 32_000, "policy {name}, pod {}", p.name);
            let err = check_quota(&tight, QuotaUsage::default(), demand).expect_err("over quota");
            assert_eq!(err.resource, "nvidia.com/gpumem");
            assert!(err.to_string().starts_with("ResourceQuotaNotFit"), "{err}");
            assert!(check_quota(&enough, QuotaUsage::default(), demand).is_ok());
        }
    }
}

/// C17's quota variant at the policy level: an init container asking 1 GPU + 4 GiB is charged its
/// peak, so a 3 GiB gpumem quota rejects the pod while a 4 GiB one admits it.
#[test]
fn c02_init_container_demand_counts_against_quota() {
    let c = cluster(vec![node("node-1", gpus("", 1, 16 * GIB))]);
    let p = pod("p", "u", vec![init("i", mib(1, 4 * GIB, 0)), plain("app")]);
    let pol = policy("binpack", &c);
    let d = decide(&c, pol.as_ref(), &p).expect("fits");
    let demand = QuotaUsage::of_placement(&p, &d.placement, 1);
    assert_eq!(demand.memory_mib, 4 * GIB);
    let q = |mib| NamespaceQuota {
        memory_mib: Some(mib),
        cores: None,
    };
    assert!(check_quota(&q(3 * GIB), QuotaUsage::default(), demand).is_err());
    assert!(check_quota(&q(4 * GIB), QuotaUsage::default(), demand).is_ok());
}

// ---- C03: UID-keyed ledger, idempotent and stale deletes ----

/// C03: pod P (uid u1) holds all 8 GPUs of an 8 × 80 GiB node at 100 % memory; Q (same name, uid u2)
/// cannot schedule. After `forget(u1)` the ledger holds nothing for u1, device use is 0 and Q schedules.
/// A second `forget(u1)` is a no-op, and it does not touch Q (same name, UID u2); forgetting an unknown
/// UID does nothing either.
#[test]
fn c03_forget_releases_the_uid_and_stale_deletes_are_no_ops() {
    let mut c = cluster(vec![node("node-1", gpus("", 8, 80 * GIB))]);
    let pol = policy("binpack", &c);
    let mut ledger = Ledger::new();
    let p = pod("model-server", "u1", vec![app("main", pct(8, 100, 0))]);
    let q = pod("model-server", "u2", vec![app("main", pct(8, 100, 0))]);

    let d = decide(&c, pol.as_ref(), &p).expect("P fits an idle node");
    ledger.assume(&mut c, &p, &d).expect("assume P");
    assert!(c.nodes[0].gpus.iter().all(|u| u.memory_mib == 80 * GIB));
    assert!(
        decide(&c, pol.as_ref(), &q).is_none(),
        "Q must wait while P holds the node"
    );
    let why = c.explain(pol.as_ref(), &q);
    assert_eq!(why.len(), 1);
    assert_eq!(why[0].1.reasons.get(&Reason::InsufficientMemory), Some(&8));

    assert!(ledger.forget(&mut c, "u1"));
    assert!(ledger.get("u1").is_none());
    assert!(ledger.is_empty());
    assert!(
        c.nodes[0].gpus.iter().all(GpuUsage::is_idle),
        "device use is 0 after the delete"
    );

    let d = decide(&c, pol.as_ref(), &q).expect("Q schedules after P's delete");
    ledger.assume(&mut c, &q, &d).expect("assume Q");
    let held = c.nodes[0].gpus.clone();

    assert!(!ledger.forget(&mut c, "u1"), "second delete for u1 is a no-op");
    assert!(!ledger.forget(&mut c, "u3"), "unknown UID is a no-op");
    assert_eq!(c.nodes[0].gpus, held, "stale deletes leave Q's allocation alone");
    let entry = ledger.get("u2").expect("Q is still recorded");
    assert_eq!(entry.pod.name, "model-server");
    assert_eq!(entry.node, 0);
    assert_eq!(ledger.len(), 1);
}

/// C03: a second `assume` for a UID that already holds an allocation is refused with a placement-shape
/// error and changes neither the cluster nor the ledger.
#[test]
fn c03_assume_twice_for_one_uid_is_refused() {
    let mut c = cluster(vec![node("node-1", gpus("", 2, 16 * GIB))]);
    let pol = policy("spread", &c);
    let mut ledger = Ledger::new();
    let p = single("p", mib(1, GIB, 10));
    let d = decide(&c, pol.as_ref(), &p).expect("fits");
    ledger.assume(&mut c, &p, &d).expect("first assume");
    let before = c.nodes[0].gpus.clone();
    let err = ledger
        .assume(&mut c, &p, &d)
        .expect_err("second assume must fail");
    match err {
        Error::PlacementShape { pod, why } => {
            assert_eq!(pod, "p");
            assert_eq!(why, "pod UID already holds an allocation");
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(c.nodes[0].gpus, before);
    assert_eq!(ledger.len(), 1);
}

// ---- C04: no overcommit, even from one snapshot ----

/// A node whose GPU 7 (24 GiB, 10 slots, 100 cores) is free and GPUs 0-6 are full.
fn seven_full_one_free() -> Cluster {
    let mut n = node("node-1", gpus("", 8, 24 * GIB));
    for u in &mut n.gpus[..7] {
        *u = GpuUsage {
            slots: 1,
            memory_mib: 24 * GIB,
            cores: 100,
        };
    }
    cluster(vec![n])
}

/// C04 (1): three pods of 1 slot + 12 GiB decided from the same snapshot (as concurrent filters would)
/// all pick the one free 24 GiB GPU; assumed in turn, exactly two succeed and the third fails with an
/// overcommit error that leaves the node and the ledger unchanged. Holds for every policy.
#[test]
fn c04_concurrent_decisions_never_overcommit_memory() {
    for name in POLICY_NAMES {
        let mut c = seven_full_one_free();
        let pol = policy(name, &c);
        let pods: Vec<_> = (0..3)
            .map(|i| single(&format!("r{i}"), mib(1, 12 * GIB, 0)))
            .collect();
        let decisions: Vec<_> = pods
            .iter()
            .map(|p| decide(&c, pol.as_ref(), p).expect("each fits the snapshot"))
            .collect();
        for d in &decisions {
            assert_eq!(gpus_of(d, 0), vec![7], "policy {name}");
        }
        let mut ledger = Ledger::new();
        ledger.assume(&mut c, &pods[0], &decisions[0]).expect("first");
        ledger.assume(&mut c, &pods[1], &decisions[1]).expect("second");
        let before = c.nodes[0].clone();
        let err = ledger
            .assume(&mut c, &pods[2], &decisions[2])
            .expect_err("third must not overcommit");
        assert!(
            matches!(
                &err,
                Error::Overcommit { gpu, reason: Reason::InsufficientMemory, .. } if gpu == "GPU-7"
            ),
            "policy {name}: {err}"
        );
        assert_eq!(err.reason(), "overcommit");
        assert_eq!(c.nodes[0].gpus, before.gpus, "policy {name}: state unchanged");
        assert_eq!(c.nodes[0].generation, before.generation);
        assert_eq!(ledger.len(), 2);
        assert!(!ledger.contains("uid-r2"));
        assert_eq!(c.nodes[0].gpus[7].memory_mib, 24 * GIB);
        assert!(
            decide(&c, pol.as_ref(), &pods[2]).is_none(),
            "third stays pending"
        );
        assert_within_capacity(&c.nodes[0]);
    }
}

/// C04 (2): one GPU and three pods of 1 slot + 50 cores + 1 GiB: at most two are placed, whether
/// scheduled one after another or decided from one snapshot; committed cores never exceed 100.
#[test]
fn c04_cores_never_exceed_100() {
    for name in POLICY_NAMES {
        let pods: Vec<_> = (0..3)
            .map(|i| single(&format!("r{i}"), mib(1, GIB, 50)))
            .collect();
        // One after another.
        let mut c = cluster(vec![node("node-1", gpus("", 1, 16 * GIB))]);
        let pol = policy(name, &c);
        let mut ledger = Ledger::new();
        let mut placed = 0;
        for p in &pods {
            if let Some(d) = decide(&c, pol.as_ref(), p) {
                ledger.assume(&mut c, p, &d).expect("decided placement commits");
                placed += 1;
            }
        }
        assert_eq!(placed, 2, "policy {name}");
        assert_eq!(c.nodes[0].gpus[0].cores, 100);
        // From one snapshot.
        let mut c = cluster(vec![node("node-1", gpus("", 1, 16 * GIB))]);
        let decisions: Vec<_> = pods
            .iter()
            .map(|p| decide(&c, pol.as_ref(), p).expect("fits the snapshot"))
            .collect();
        let mut ledger = Ledger::new();
        let ok: Vec<bool> = pods
            .iter()
            .zip(&decisions)
            .map(|(p, d)| ledger.assume(&mut c, p, d).is_ok())
            .collect();
        assert_eq!(ok, vec![true, true, false], "policy {name}");
        assert!(c.nodes[0].gpus[0].cores <= 100);
        assert_within_capacity(&c.nodes[0]);
    }
}

/// C04 (3): a GPU whose recorded use (12 GiB) exceeds its 11 GiB total has zero free memory, never a
/// wrapped huge amount: a 1 GiB request is rejected there, and goes to a healthy second GPU if present.
#[test]
fn c04_used_above_total_clamps_free_to_zero() {
    let mut n = node("node-1", vec![gpu("GPU-A", 0, 11 * GIB)]);
    n.gpus[0].memory_mib = 12 * GIB;
    n.gpus[0].slots = 1;
    let c = cluster(vec![n]);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let p = single("p", mib(1, GIB, 0));
        assert!(decide(&c, pol.as_ref(), &p).is_none(), "policy {name}");
        let why = c.explain(pol.as_ref(), &p);
        assert_eq!(
            why[0].1.reasons.get(&Reason::InsufficientMemory),
            Some(&1),
            "policy {name}"
        );
    }
    // Committing by hand is refused as well.
    let mut n = c.nodes[0].clone();
    let p = single("p", mib(1, GIB, 0));
    let placement = NodePlacement {
        containers: vec![vec![DeviceGrant {
            gpu: 0,
            memory_mib: GIB,
            cores: 0,
        }]],
    };
    assert!(matches!(
        n.commit(&p, &placement),
        Err(Error::Overcommit {
            reason: Reason::InsufficientMemory,
            ..
        })
    ));
    // With a second, healthy GPU the request lands there.
    let mut n = node(
        "node-1",
        vec![gpu("GPU-A", 0, 11 * GIB), gpu("GPU-B", 1, 11 * GIB)],
    );
    n.gpus[0].memory_mib = 12 * GIB;
    n.gpus[0].slots = 1;
    let mut c = cluster(vec![n]);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let d = decide(&c, pol.as_ref(), &p).expect("GPU-B fits");
        assert_eq!(gpus_of(&d, 0), vec![1], "policy {name}");
    }
    let pol = policy("binpack", &c);
    place(&mut c, pol.as_ref(), &p);
    assert_eq!(
        c.nodes[0].gpus[0].memory_mib,
        12 * GIB,
        "the stale record is left as is"
    );
}

// ---- C05: health ----

/// C05 (1): a node whose only GPU is unhealthy rejects a 1 GPU, 10 % memory, 20 cores pod with the
/// reason `CardNotHealth` on 1 of 1 devices (displayed exactly as `1/1 CardNotHealth`), under every
/// policy.
#[test]
fn c05_unhealthy_gpu_is_rejected_with_card_not_health() {
    let mut g = gpu("GPU-A", 0, 16 * GIB);
    g.healthy = false;
    let c = cluster(vec![node("node-1", vec![g])]);
    let p = single("p", pct(1, 10, 20));
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        assert!(decide(&c, pol.as_ref(), &p).is_none(), "policy {name}");
        let why = c.explain(pol.as_ref(), &p);
        assert_eq!(why.len(), 1);
        let failure = &why[0].1;
        assert_eq!(failure.devices, 1);
        assert_eq!(
            failure.reasons.get(&Reason::NotHealthy),
            Some(&1),
            "policy {name}"
        );
        // Exactly HAMi's event text: the per-GPU reason explains the shortfall on its own.
        assert_eq!(failure.to_string(), "1/1 CardNotHealth", "policy {name}");
    }
    let failure = fit_pod(&c.nodes[0], &p, hami_policy::GpuOrder::Index).expect_err("unhealthy");
    assert!(failure.has(Reason::NotHealthy));
}

/// C05 (2): with GPU-A unhealthy and GPU-B healthy, GPU-B is chosen, under every policy.
#[test]
fn c05_healthy_gpu_is_chosen_over_unhealthy() {
    let mut a = gpu("GPU-A", 0, 16 * GIB);
    a.healthy = false;
    let b = gpu("GPU-B", 1, 16 * GIB);
    let c = cluster(vec![node("node-1", vec![a, b])]);
    let p = single("p", pct(1, 10, 20));
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let d = decide(&c, pol.as_ref(), &p).expect("GPU-B fits");
        assert_eq!(gpus_of(&d, 0), vec![1], "policy {name}");
    }
}

/// C05 (3): a GPU reported unhealthy is not offered; once the next registration reports it healthy (a
/// new inventory), it is schedulable again with no restart and no other state change.
#[test]
fn c05_gpu_recovers_when_reported_healthy_again() {
    let mut inv = inventory("node-1", vec![gpu("GPU-A", 0, 16 * GIB)]);
    inv.gpus[0].healthy = false;
    let mut c = cluster(vec![NodeState::new(Arc::new(inv.clone()))]);
    let p = single("p", pct(1, 10, 20));
    let pol = policy("spread", &c);
    assert!(decide(&c, pol.as_ref(), &p).is_none());
    inv.gpus[0].healthy = true;
    c.nodes[0].inventory = Arc::new(inv);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let d = decide(&c, pol.as_ref(), &p).expect("GPU-A is back");
        assert_eq!(gpus_of(&d, 0), vec![0], "policy {name}");
    }
    place(&mut c, pol.as_ref(), &p);
    assert_eq!(c.nodes[0].gpus[0].memory_mib, 16 * GIB / 10);
}

// ---- C06: N GPUs are N distinct physical GPUs ----

/// C06: on 2 GPUs × 4 slots, a container asking `nvidia.com/gpu: 2` gets 2 distinct GPUs, under every
/// policy.
#[test]
fn c06_two_gpus_are_two_distinct_physical_gpus() {
    let mut gs = gpus("", 2, 16 * GIB);
    for g in &mut gs {
        g.split_count = 4;
    }
    let c = cluster(vec![node("node-1", gs)]);
    let p = single("p", mib(2, 2 * GIB, 0));
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let mut got = gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1], "policy {name}");
    }
}

/// C06 variant: when only one GPU has free slots, the 2-GPU request is unschedulable rather than given
/// two slots of one GPU; a hand-made placement naming one GPU twice is refused at commit.
#[test]
fn c06_one_gpu_with_free_slots_is_unschedulable() {
    let mut gs = gpus("", 2, 16 * GIB);
    for g in &mut gs {
        g.split_count = 4;
    }
    let mut n = node("node-1", gs);
    n.gpus[1] = GpuUsage {
        slots: 4,
        memory_mib: 4 * GIB,
        cores: 0,
    };
    let c = cluster(vec![n]);
    let p = single("p", mib(2, 2 * GIB, 0));
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        assert!(decide(&c, pol.as_ref(), &p).is_none(), "policy {name}");
        let why = c.explain(pol.as_ref(), &p);
        assert_eq!(
            why[0].1.reasons.get(&Reason::SlotsExhausted),
            Some(&1),
            "policy {name}"
        );
    }
    let twice = NodePlacement {
        containers: vec![vec![
            DeviceGrant {
                gpu: 0,
                memory_mib: 2 * GIB,
                cores: 0,
            };
            2
        ]],
    };
    let mut n = c.nodes[0].clone();
    let before = n.gpus.clone();
    assert!(matches!(n.commit(&p, &twice), Err(Error::PlacementShape { .. })));
    assert_eq!(n.gpus, before);
}

// ---- C08 / C14: positional allocation annotation ----

/// C08: a 5-container pod where only container 1 asks for 1 GPU + 1000 MiB encodes as exactly
/// `;GPU-A,NVIDIA,1000,0:;;;;` (5 segments, one canonical empty form), and decodes back to the same value.
#[test]
fn c08_non_gpu_containers_encode_as_empty_segments() {
    let mut c = cluster(vec![node("node-1", vec![gpu("GPU-A", 0, 16 * GIB)])]);
    let p = pod(
        "p",
        "u1",
        vec![
            plain("c0"),
            app("c1", mib(1, 1000, 0)),
            plain("c2"),
            plain("c3"),
            plain("c4"),
        ],
    );
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let d = decide(&c, pol.as_ref(), &p).expect("fits");
        let devices = d.placement.to_pod_devices(&c.nodes[0].inventory, "NVIDIA");
        let value = devices.encode().expect("encodable");
        assert_eq!(value, ";GPU-A,NVIDIA,1000,0:;;;;", "policy {name}");
        assert_eq!(PodDevices::decode(&value).expect("decodes"), devices);
    }
    let pol = policy("spread", &c);
    place(&mut c, pol.as_ref(), &p);
}

/// C14 (1): a non-GPU init container and app containers A and B (1 GPU + 2500 MiB + 25 cores each) on 2
/// GPUs registered with a model-specific type encode as `;GPU-A,NVIDIA,2500,25:;GPU-B,NVIDIA,2500,25:;`
/// (3 segments, the first empty, vendor word not model); node use is 2 × 2500 MiB.
#[test]
fn c14_init_container_keeps_its_empty_segment() {
    let mut c = cluster(vec![node(
        "node-1",
        vec![gpu("GPU-A", 0, 16 * GIB), gpu("GPU-B", 1, 16 * GIB)],
    )]);
    let p = pod(
        "p",
        "u1",
        vec![
            ctr("setup", ContainerKind::Init, None),
            app("a", mib(1, 2500, 25)),
            app("b", mib(1, 2500, 25)),
        ],
    );
    let pol = policy("spread", &c);
    let d = place(&mut c, pol.as_ref(), &p);
    let devices = d.placement.to_pod_devices(&c.nodes[0].inventory, "NVIDIA");
    let value = devices.encode().expect("encodable");
    assert_eq!(value, ";GPU-A,NVIDIA,2500,25:;GPU-B,NVIDIA,2500,25:;");
    assert_eq!(PodDevices::decode(&value).expect("decodes"), devices);
    assert_eq!(devices.container(1).expect("A").0[0].uuid, "GPU-A");
    assert_eq!(devices.container(2).expect("B").0[0].uuid, "GPU-B");
    let used: u64 = c.nodes[0].gpus.iter().map(|u| u.memory_mib).sum();
    assert_eq!(used, 2 * 2500);
}

/// C14 (2): a non-GPU init container and one GPU container (1 GPU + 4000 MiB): the GPU entry is in
/// segment 1, the GPU container's position.
#[test]
fn c14_single_gpu_container_after_init() {
    let c = cluster(vec![node("node-1", vec![gpu("GPU-A", 0, 16 * GIB)])]);
    let p = pod(
        "p",
        "u1",
        vec![
            ctr("setup", ContainerKind::Init, None),
            app("main", mib(1, 4000, 0)),
        ],
    );
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        let d = decide(&c, pol.as_ref(), &p).expect("fits");
        let value = d
            .placement
            .to_pod_devices(&c.nodes[0].inventory, "NVIDIA")
            .encode()
            .expect("encodable");
        assert_eq!(value, ";GPU-A,NVIDIA,4000,0:;", "policy {name}");
    }
}

// ---- C09: percent memory multiplies first ----

/// C09: on 32768 MiB GPUs, `gpumem-percentage` 20 grants 6553 MiB and 10 grants 3276 MiB per GPU
/// (multiply before dividing), in the placement, the committed use and the annotation.
#[test]
fn c09_percent_memory_is_resolved_multiplying_first() {
    let mut c = cluster(vec![node(
        "node-1",
        vec![gpu("GPU-A", 0, 32 * GIB), gpu("GPU-B", 1, 32 * GIB)],
    )]);
    let pol = policy("binpack", &c);
    // (1) 1 slot, 50 cores, 20 % memory.
    let p1 = single("p1", pct(1, 20, 50));
    let d1 = place(&mut c, pol.as_ref(), &p1);
    assert_eq!(d1.placement.containers[0][0].memory_mib, 6553);
    let g = d1.placement.containers[0][0].gpu;
    assert_eq!(c.nodes[0].gpus[g].memory_mib, 6553);
    let uuid = &c.nodes[0].inventory.gpus[g].uuid;
    assert_eq!(
        d1.placement
            .to_pod_devices(&c.nodes[0].inventory, "NVIDIA")
            .encode()
            .expect("encodable"),
        format!("{uuid},NVIDIA,6553,50:;")
    );
    // (2) 2 GPUs at 10 % memory each.
    let p2 = single("p2", pct(2, 10, 0));
    let d2 = place(&mut c, pol.as_ref(), &p2);
    assert!(d2.placement.containers[0].iter().all(|g| g.memory_mib == 3276));
    assert_eq!(
        d2.placement
            .to_pod_devices(&c.nodes[0].inventory, "NVIDIA")
            .encode()
            .expect("encodable"),
        "GPU-A,NVIDIA,3276,0:GPU-B,NVIDIA,3276,0:;"
    );
    let total: u64 = c.nodes[0].gpus.iter().map(|u| u.memory_mib).sum();
    assert_eq!(total, 6553 + 2 * 3276);
}

// ---- C21: each app container on a GPU is one slot ----

/// C21: GPU-A with `deviceSplitCount: 2`. P1's two app containers (1 GPU, 1000 MiB each) both land on
/// GPU-A and take both slots; P2 (1 GPU, 1000 MiB) is refused for GPU-A with slots exhausted, while
/// memory and cores stay the plain sums.
#[test]
fn c21_two_app_containers_on_one_gpu_take_two_slots() {
    for name in POLICY_NAMES {
        let mut g = gpu("GPU-A", 0, 24 * GIB);
        g.split_count = 2;
        let mut c = cluster(vec![node("node-1", vec![g])]);
        let pol = policy(name, &c);
        let p1 = pod(
            "p1",
            "u1",
            vec![app("a", mib(1, 1000, 10)), app("b", mib(1, 1000, 10))],
        );
        let d = place(&mut c, pol.as_ref(), &p1);
        assert_eq!((gpus_of(&d, 0), gpus_of(&d, 1)), (vec![0], vec![0]), "{name}");
        assert_eq!(
            c.nodes[0].gpus[0],
            GpuUsage {
                slots: 2,
                memory_mib: 2000,
                cores: 20
            },
            "{name}"
        );
        let p2 = single("p2", mib(1, 1000, 0));
        assert!(decide(&c, pol.as_ref(), &p2).is_none(), "{name}");
        let why = c.explain(pol.as_ref(), &p2);
        assert_eq!(
            why[0].1.reasons.get(&Reason::SlotsExhausted),
            Some(&1),
            "{name}: {why:?}"
        );
    }
}

// ---- C26: the policy's score first, topology only breaks ties ----

/// Four GPUs on NUMA [0, 0, 1, 1] where GPUs 1 and 3 hold 8 GiB each and 0 and 2 are idle.
fn c26_cluster() -> Cluster {
    let gs: Vec<_> = [0, 0, 1, 1]
        .into_iter()
        .zip(0u32..)
        .map(|(numa, i)| {
            let mut g = gpu(&format!("GPU-{i}"), i, 16 * GIB);
            g.numa = Some(numa);
            g
        })
        .collect();
    let mut n = node("n", gs);
    for i in [1, 3] {
        n.gpus[i] = GpuUsage {
            slots: 1,
            memory_mib: 8 * GIB,
            cores: 30,
        };
    }
    cluster(vec![n])
}

/// C26: a 2-GPU request without `numa-bind`: spread takes the least loaded GPUs [0, 2] and binpack the
/// most loaded that fit [1, 3], although each pair spans both NUMA nodes; topology decides only
/// between equal scores (all idle: the same-NUMA pair [0, 1]); the topology-aware policy and
/// `numa-bind` keep topology first ([0, 1], then a NUMA-local pair).
#[test]
fn c26_numa_only_breaks_ties_between_equal_scores() {
    use hami_api::GpuPolicy;
    let c = c26_cluster();
    for name in ["binpack", "spread"] {
        let pol = policy(name, &c);
        for (gp, want) in [
            (GpuPolicy::Spread, vec![0, 2]),
            (GpuPolicy::Binpack, vec![1, 3]),
            (GpuPolicy::TopologyAware, vec![0, 1]),
        ] {
            let mut p = single("p", mib(2, GIB, 10));
            p.gpu_policy = Some(gp);
            let mut got = gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0);
            got.sort_unstable();
            assert_eq!(got, want, "node policy {name}, GPU policy {gp:?}");
        }
        // numa-bind: both GPUs on one NUMA node, the policy choosing within.
        for (gp, want) in [(GpuPolicy::Spread, vec![0, 1]), (GpuPolicy::Binpack, vec![0, 1])] {
            let mut req = mib(2, GIB, 10);
            req.numa_bind = true;
            let mut p = single("p", req);
            p.gpu_policy = Some(gp);
            let mut got = gpus_of(&decide(&c, pol.as_ref(), &p).expect("fits"), 0);
            got.sort_unstable();
            assert_eq!(got, want, "{name} {gp:?}: one NUMA node");
        }
    }
    // All idle: equal scores, the same-NUMA pair wins the tie.
    let idle = cluster(vec![node("n", c.nodes[0].inventory.gpus.clone())]);
    for gp in [GpuPolicy::Spread, GpuPolicy::Binpack] {
        let mut p = single("p", mib(2, GIB, 10));
        p.gpu_policy = Some(gp);
        let mut got = gpus_of(
            &decide(&idle, policy("binpack", &idle).as_ref(), &p).expect("fits"),
            0,
        );
        got.sort_unstable();
        assert_eq!(got, vec![0, 1], "{gp:?}");
    }
}

// ---- C29: no share without memory ----

/// C29 in the placement core: a percentage that resolves to 0 MiB on a GPU (1 % of 50 MiB) is never
/// placed there (its limit would be 0), while 2 % (1 MiB) is.
#[test]
fn c29_a_share_that_resolves_to_no_memory_is_not_placed() {
    let c = cluster(vec![node("n", vec![gpu("GPU-tiny", 0, 50)])]);
    for name in POLICY_NAMES {
        let pol = policy(name, &c);
        assert!(
            decide(&c, pol.as_ref(), &single("p", pct(1, 1, 0))).is_none(),
            "{name}"
        );
        let d = decide(&c, pol.as_ref(), &single("p", pct(1, 2, 0))).expect("1 MiB fits");
        assert_eq!(d.placement.containers[0][0].memory_mib, 1, "{name}");
    }
}
