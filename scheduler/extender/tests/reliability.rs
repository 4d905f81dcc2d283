//! Peer cases C25, C28, C29 and C30 at the extender's HTTP level against the fake API server: a live
//! pod whose allocation cannot be decoded blocks its node (C25), a heartbeat stamped in the future is
//! not trusted (C28), a zero-memory request is refused (C29), and nothing is decided before the node
//! and pod views are complete, also across restarts under load (C30).

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::{
    NOW, args_names, bind, clock, extender, filter, gpu_pod, gpus, held_in, node, node_with_usage, post,
    start_on_loopback,
};
use hami_api::{
    PodDevices,
    annotations::{BIND_PHASE, DEVICES_ALLOCATED, VGPU_NODE},
};
use hami_fake_apiserver::FakeApiServer;
use hami_policy::NamespaceQuota;
use hami_scheduler::{server::Running, state::Settings};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

/// The decision stored on pod `namespace/name`, if any.
fn decision(fake: &FakeApiServer, namespace: &str, name: &str) -> Option<String> {
    fake.pod(namespace, name)?
        .metadata
        .annotations?
        .get(DEVICES_ALLOCATED)
        .cloned()
}

/// Sets annotations of pod `namespace/name` through the API (as the scheduler or an admin would).
async fn annotate(fake: &FakeApiServer, namespace: &str, name: &str, pairs: &[(&str, Option<&str>)]) {
    let api: Api<Pod> = Api::namespaced(fake.client(), namespace);
    let ann: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.map_or(Value::Null, |v| json!(v))))
        .collect();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": ann}})),
    )
    .await
    .expect("patch");
}

/// Polls the extender's filter for `pod` on `n` until `cond` holds on its reply (the reflector applies
/// API changes asynchronously), at most 10 s.
async fn filter_until(ext: &Running, pod: &Pod, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1000 {
        let f = filter(ext, pod, &["n"]).await;
        if cond(&f) {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn fits(f: &Value) -> bool {
    f["NodeNames"] == json!(["n"])
}

fn blocked(f: &Value) -> bool {
    f["FailedNodes"]["n"]
        .as_str()
        .is_some_and(|r| r.starts_with("UndecodableAllocation"))
}

// ---- C25 ----

/// C25: node `n` (one 24 GiB GPU, 10 slots) runs pod P whose allocation annotation cannot be decoded.
/// While P is live the node takes no new placement (a resolvable reason naming P; the metric counts
/// it), with a second bad pod it stays blocked until both are cleared; a valid update restores normal
/// accounting with P's usage counted; P's end (terminal phase) clears the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25_an_undecodable_live_allocation_blocks_its_node() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    fake.insert_node(node("n", &gpus("n", 1, 24_576)));
    let uuid = "GPU-n-0";
    // P is corrupt before the extender starts (the relist case).
    fake.insert_pod(held_in("default", "p", "n", uuid, 8192, 0));
    annotate(
        &fake,
        "default",
        "p",
        &[(DEVICES_ALLOCATED, Some("GPU-n-0,NVIDIA,abc,30:;"))],
    )
    .await;
    let (clock, _) = clock();
    let ext = extender(fake.client(), Settings::default(), clock).await;
    let q = fake.insert_pod(gpu_pod("q", 1, 20_480, 0));

    let f = filter(&ext, &q, &["n"]).await;
    assert!(blocked(&f), "{f}");
    let why = f["FailedNodes"]["n"].as_str().expect("reason");
    assert!(why.contains("default/p"), "{why}");
    assert!(bind(&ext, &q, "n").await.contains("UndecodableAllocation"));
    assert_eq!(decision(&fake, "default", "q"), None);
    let (_, metrics) = common::http(ext.addr, "/metrics", None).await;
    let metrics = String::from_utf8(metrics).expect("utf-8");
    assert!(
        metrics.contains("hami_scheduler_pods{state=\"undecodable\"} 1")
            && metrics.contains("hami_scheduler_nodes{condition=\"blocked\"} 1"),
        "{metrics}"
    );

    // A second bad pod (missing fields): still blocked after P is repaired.
    fake.insert_pod(held_in("default", "r", "n", uuid, 1024, 0));
    annotate(
        &fake,
        "default",
        "r",
        &[(DEVICES_ALLOCATED, Some("GPU-n-0,NVIDIA:;"))],
    )
    .await;
    let f = filter_until(&ext, &q, "R named", |f| {
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| r.contains("default/r"))
    })
    .await;
    assert!(blocked(&f), "{f}");
    annotate(
        &fake,
        "default",
        "p",
        &[(DEVICES_ALLOCATED, Some("GPU-n-0,NVIDIA,8192,0:;"))],
    )
    .await;
    filter_until(&ext, &q, "P no longer named", |f| {
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| !r.contains("default/p") && r.contains("default/r"))
    })
    .await;

    // R ends: the node is open again, with P's 8192 MiB counted (20480 + 8192 > 24576).
    fake.set_pod_phase("default", "r", "Succeeded");
    let f = filter_until(&ext, &q, "the block cleared", |f| !blocked(f)).await;
    assert!(
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| r.contains("CardInsufficientMemory")),
        "P's repaired allocation is counted: {f}"
    );
    assert_eq!(
        ext.app.read_state().gpu_usage()[uuid],
        (1, 8192, 0),
        "exactly P is accounted"
    );
    let small = fake.insert_pod(gpu_pod("small", 1, 10_240, 0));
    assert!(fits(&filter(&ext, &small, &["n"]).await));

    // P goes bad again, then ends: the block comes and goes with it.
    annotate(&fake, "default", "p", &[(DEVICES_ALLOCATED, Some("garbage"))]).await;
    filter_until(&ext, &small, "blocked again", blocked).await;
    fake.delete_pod("default", "p");
    filter_until(&ext, &small, "unblocked by the delete", fits).await;
}

/// C25: a pod of another node or one whose bind failed does not block `n`; only the scheduler's
/// annotation counts, and an undecodable `hami.io/vgpu-devices-allocated` on a pod that names no node
/// blocks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25_only_live_allocations_on_the_node_block_it() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    fake.insert_node(node("n", &gpus("n", 1, 24_576)));
    fake.insert_node(node("m", &gpus("m", 1, 24_576)));
    fake.insert_pod(held_in("default", "elsewhere", "m", "GPU-m-0", 1024, 0));
    annotate(&fake, "default", "elsewhere", &[(DEVICES_ALLOCATED, Some("x"))]).await;
    fake.insert_pod(held_in("default", "failed", "n", "GPU-n-0", 1024, 0));
    let failed: Api<Pod> = Api::namespaced(fake.client(), "default");
    failed
        .patch(
            "failed",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {
                DEVICES_ALLOCATED: "x", BIND_PHASE: "failed"
            }}})),
        )
        .await
        .expect("patch");
    // A pending pod (no node) with a stray allocation annotation and no hami.io/vgpu-node.
    let mut stray = gpu_pod("stray", 1, 1024, 0);
    stray.metadata.annotations = Some([(DEVICES_ALLOCATED.to_owned(), "x".to_owned())].into());
    fake.insert_pod(stray);
    let (clock, _) = clock();
    let ext = extender(fake.client(), Settings::default(), clock).await;
    let q = fake.insert_pod(gpu_pod("q", 1, 1024, 0));
    let f = filter(&ext, &q, &["m"]).await;
    assert!(
        f["FailedNodes"]["m"]
            .as_str()
            .is_some_and(|r| r.contains("default/elsewhere")),
        "{f}"
    );
    // `failed` is bound to n: its failed bind phase does not void it, so it blocks n too.
    let f = filter(&ext, &q, &["n"]).await;
    assert!(blocked(&f), "{f}");
    assert!(
        !f["FailedNodes"]["n"].as_str().unwrap_or("").contains("stray"),
        "{f}"
    );
}

// ---- C28 ----

/// C28: a heartbeat stamped one day ahead makes the node unschedulable with a reason (a skew within
/// the tolerance does not); once the agent writes a sane heartbeat the node is schedulable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c28_a_heartbeat_in_the_future_is_not_trusted() {
    let g = gpus("n", 1, 24_576);
    let day = 86_400;
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    fake.insert_node(node_with_usage("n", &g, Some(NOW + day), &[]));
    fake.insert_node(node_with_usage(
        "skewed",
        &gpus("skewed", 1, 24_576),
        Some(NOW + 20),
        &[],
    ));
    let (clock, t) = clock();
    let ext = extender(fake.client(), Settings::default(), clock).await;
    let q = fake.insert_pod(gpu_pod("q", 1, 1024, 0));
    let f = post(ext.addr, "/filter", &args_names(&q, &["n", "skewed"])).await;
    let why = f["FailedAndUnresolvableNodes"]["n"].as_str().unwrap_or_default();
    assert!(why.contains("in the future"), "{f}");
    assert_eq!(f["NodeNames"], json!(["skewed"]), "{f}");
    // A day later (the agent long dead) it is still refused, as stale now.
    t.store(NOW + 2 * day, std::sync::atomic::Ordering::SeqCst);
    let f = filter(&ext, &q, &["n"]).await;
    assert!(f["FailedAndUnresolvableNodes"]["n"].is_string(), "{f}");
    // The agent comes back with a sane clock.
    t.store(NOW, std::sync::atomic::Ordering::SeqCst);
    fake.insert_node(node_with_usage("n", &g, Some(NOW - 5), &[]));
    filter_until(&ext, &q, "n schedulable", fits).await;
}

// ---- C29 ----

/// C29: `gpumem: 0` and `gpumem-percentage: 0` beside a GPU count are refused by filter and bind,
/// naming the container, under a namespace quota of 0 too; nothing is written to the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c29_zero_memory_requests_are_refused_by_filter_and_bind() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    fake.insert_node(node("n", &gpus("n", 1, 24_576)));
    let settings = Settings {
        quotas: [(
            "default".to_owned(),
            NamespaceQuota {
                memory_mib: Some(0),
                cores: None,
            },
        )]
        .into(),
        ..Settings::default()
    };
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings, clock).await;
    for (i, (resource, value)) in [("nvidia.com/gpumem", "0"), ("nvidia.com/gpumem-percentage", "0")]
        .into_iter()
        .enumerate()
    {
        let name = format!("zero{i}");
        let pod = fake.insert_pod(common::pod_with(
            &name,
            vec![],
            vec![common::ctr("main", &[("nvidia.com/gpu", "1"), (resource, value)])],
        ));
        let f = filter(&ext, &pod, &["n"]).await;
        let e = f["Error"].as_str().expect("error");
        assert!(
            e.contains("\"main\"") && e.contains(resource) && e.contains("zero device memory"),
            "{f}"
        );
        let b = bind(&ext, &pod, "n").await;
        assert!(b.contains("zero device memory"), "{b}");
        assert_eq!(decision(&fake, "default", &name), None);
    }
}

// ---- C30 ----

/// The test's namespaces' quota: 10,000 MiB each.
fn quota_settings() -> Settings {
    let q = NamespaceQuota {
        memory_mib: Some(10_000),
        cores: None,
    };
    Settings {
        quotas: [("team-a".to_owned(), q), ("team-b".to_owned(), q)].into(),
        ..Settings::default()
    }
}

/// A pod asking one GPU with `mib` MiB in `namespace`.
fn pod_in(namespace: &str, name: &str, mib: u64) -> Pod {
    let mut p = gpu_pod(name, 1, mib, 0);
    p.metadata.namespace = Some(namespace.to_owned());
    p.metadata.uid = Some(format!("uid-{namespace}-{name}"));
    p
}

/// C30: the extender restarts while its pod list fails. Pod `held` of team-a holds its whole quota
/// (10,000 MiB) and most of GPU n-0 (16,384 MiB). Until the pod view is complete, filter, prioritize
/// and bind answer a retryable error (`not_synced` in the metrics) and decide nothing; once it is,
/// team-a's 6,000 MiB pod is refused by quota and team-b's 8,000 MiB pod by memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c30_nothing_is_decided_before_the_views_are_complete() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    fake.insert_node(node("n", &gpus("n", 1, 16_384)));
    fake.insert_pod(held_in("team-a", "held", "n", "GPU-n-0", 10_000, 0));
    // The first three lists of all pods fail: the reflector retries with its backoff (0.8 s, 1.6 s,
    // 3.2 s at least), so the pod view stays incomplete for seconds.
    fake.fail_next("GET", "/api/v1/pods", 500, 3);
    let (clock, _) = clock();
    let ext = start_on_loopback(quota_settings(), Some(fake.client()), clock).await;
    let a = fake.insert_pod(pod_in("team-a", "a", 6_000));
    let b = fake.insert_pod(pod_in("team-b", "b", 8_000));
    for p in [&a, &b] {
        let f = filter(&ext, p, &["n"]).await;
        let e = f["Error"].as_str().unwrap_or_default();
        assert!(e.contains("not placed yet") && e.contains("pods"), "{f}");
        let (status, _) = common::http(
            ext.addr,
            "/prioritize",
            Some(serde_json::to_vec(&args_names(p, &["n"])).expect("json")),
        )
        .await;
        assert_eq!(status, 503);
        let e = bind(&ext, p, "n").await;
        assert!(e.contains("not placed yet"), "{e}");
    }
    assert!(!ext.app.ready());
    let (status, _) = common::http(ext.addr, "/readyz", None).await;
    assert_eq!(status, 503);
    let (_, metrics) = common::http(ext.addr, "/metrics", None).await;
    let metrics = String::from_utf8(metrics).expect("utf-8");
    for verb in ["filter", "prioritize", "bind"] {
        assert!(
            metrics.contains(&format!(
                "hami_scheduler_requests_total{{result=\"not_synced\",verb=\"{verb}\"}} 2"
            )),
            "{verb}: {metrics}"
        );
    }
    assert!(
        ext.wait_ready(Duration::from_secs(30)).await,
        "the pod view completes"
    );
    let f = filter(&ext, &a, &["n"]).await;
    assert!(
        f["FailedAndUnresolvableNodes"]["n"]
            .as_str()
            .or(f["FailedNodes"]["n"].as_str())
            .is_some_and(|r| r.contains("QuotaExceeded")),
        "{f}"
    );
    let f = filter(&ext, &b, &["n"]).await;
    assert!(
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| r.contains("CardInsufficientMemory")),
        "{f}"
    );
    for p in [&a, &b] {
        assert!(!bind(&ext, p, "n").await.is_empty());
        assert_eq!(
            decision(
                &fake,
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            None
        );
    }
}

/// Marks a bound pod allocated, as the device plugin does after Allocate.
async fn allocated(fake: &FakeApiServer, p: &Pod) {
    let (ns, name) = (
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default(),
    );
    annotate(fake, ns, name, &[(BIND_PHASE, Some("success"))]).await;
}

/// Per GPU, the MiB the API's bound decisions hold; per namespace, the MiB its pods hold.
fn books(fake: &FakeApiServer) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut gpu: BTreeMap<String, u64> = BTreeMap::new();
    let mut ns: BTreeMap<String, u64> = BTreeMap::new();
    for p in fake.pods() {
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let bound = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let (Some(alloc), Some(node)) = (ann.get(DEVICES_ALLOCATED), ann.get(VGPU_NODE)) else {
            continue;
        };
        assert_eq!(bound.as_ref(), Some(node), "a decision on an unbound pod");
        for c in PodDevices::decode(alloc).expect("valid decision").0 {
            for d in c.0 {
                *gpu.entry(d.uuid).or_default() += d.memory_mib;
                *ns.entry(p.metadata.namespace.clone().unwrap_or_default())
                    .or_default() += d.memory_mib;
            }
        }
    }
    (gpu, ns)
}

/// C30 under load: a stream of pods from two namespaces is placed through filter and bind while the
/// extender is stopped abruptly and restarted five times, each time with its first pod lists failing
/// (so every start has a window with nodes but no pods). Zero GPUs overcommitted and zero quotas
/// overrun in the decisions stored in the API; the restarts did refuse requests as not synced; and the
/// capacity that exists is used. Each bound pod is marked allocated at once, as the device plugin
/// would (so the pending-allocation rule does not hold the nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c30_restarts_under_load_never_overcommit_or_overrun_quota() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    let capacity = 16_384;
    for n in ["n1", "n2"] {
        fake.insert_node(node(n, &gpus(n, 2, capacity)));
    }
    let nodes = ["n1", "n2"];
    let mut pending: Vec<Pod> = Vec::new();
    for i in 0..24 {
        let ns = if i % 2 == 0 { "team-a" } else { "team-b" };
        pending.push(fake.insert_pod(pod_in(ns, &format!("p{i}"), 3_000)));
    }
    let mut not_synced = 0;
    let mut bound = 0;
    for round in 0..5 {
        fake.fail_next("GET", "/api/v1/pods", 500, 1);
        let (clock, _) = clock();
        let ext = start_on_loopback(quota_settings(), Some(fake.client()), clock).await;
        // Work through the pending pods until this round has bound two (or tried everything).
        let mut bound_here = 0;
        for _ in 0..200 {
            let Some(p) = pending.first().cloned() else { break };
            let f = post(ext.addr, "/filter", &args_names(&p, &nodes)).await;
            if f["Error"].as_str().is_some_and(|e| e.contains("not placed yet")) {
                not_synced += 1;
                // Also try binding on the partial view (kube-scheduler could, with a stale filter
                // answer): refused, or placed on the complete view if it finished meanwhile.
                if bind(&ext, &p, "n1").await.is_empty() {
                    bound += 1;
                    bound_here += 1;
                    allocated(&fake, &p).await;
                    pending.remove(0);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let Some(target) = f["NodeNames"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
            else {
                // Fits nowhere (quota or capacity): drop it.
                pending.remove(0);
                continue;
            };
            if bind(&ext, &p, target).await.is_empty() {
                bound += 1;
                bound_here += 1;
                allocated(&fake, &p).await;
            }
            pending.remove(0);
            if bound_here >= 2 && round < 4 {
                break;
            }
        }
        let (gpu, ns) = books(&fake);
        assert!(gpu.values().all(|&m| m <= capacity), "round {round}: {gpu:?}");
        assert!(ns.values().all(|&m| m <= 10_000), "round {round}: {ns:?}");
        ext.stop();
    }
    let (gpu, ns) = books(&fake);
    assert!(
        not_synced >= 5,
        "every start refused on its partial view ({not_synced})"
    );
    // 3 pods of 3,000 MiB per namespace fit its 10,000 MiB quota: 6 in all.
    assert_eq!(bound, 6, "{gpu:?} {ns:?}");
    assert_eq!(
        ns,
        [("team-a".to_owned(), 9_000), ("team-b".to_owned(), 9_000)].into()
    );
}
