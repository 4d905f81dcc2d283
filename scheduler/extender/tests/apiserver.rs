//! The kube-rs paths against the in-process fake API server (`hami-fake-apiserver`): reflectors build
//! the state, bind writes exactly the annotations + label + Binding, a 409 or a failed Binding is
//! rolled back, deletes and finished pods release (C03), 200 concurrent binds into one node never
//! overcommit (C04), and a restarted extender rebuilds exactly the same allocations.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::{
    KEY, NOW, bind_args, clock, eventually, extender, gpu_ctr, gpu_pod, gpus, ground_truth, node, pod_with,
    post,
};
use hami_api::{
    PodDevices,
    annotations::{
        BIND_PHASE, BIND_TIME, DECISION_SIGNATURE, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, VGPU_NODE,
        VGPU_TIME, verify_decision,
    },
};
use hami_fake_apiserver::FakeApiServer;
use hami_scheduler::state::Settings;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// Stands in for the device plugin: every bound pod still `allocating` gets its containers allocated
/// (`-to-allocate` emptied, `bind-phase: success`), as Allocate would.
fn spawn_fake_device_plugin(fake: Arc<FakeApiServer>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for mut p in fake.pods() {
                let bound = p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some();
                let ann = p.metadata.annotations.get_or_insert_with(BTreeMap::new);
                if bound && ann.get(BIND_PHASE).map(String::as_str) == Some("allocating") {
                    let n = ann
                        .get(DEVICES_TO_ALLOCATE)
                        .and_then(|v| PodDevices::decode(v).ok())
                        .map_or(0, |d| d.0.len());
                    ann.insert(DEVICES_TO_ALLOCATE.into(), ";".repeat(n));
                    ann.insert(BIND_PHASE.into(), "success".into());
                    fake.insert_pod(p);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Schedules one pod the way kube-scheduler drives an extender (filter → prioritize → bind, retrying
/// while a retry can help). `Ok(node)` or `Err(reason)`.
async fn schedule(addr: std::net::SocketAddr, pod: &Pod, nodes: &[&str]) -> Result<String, String> {
    let mut last = String::new();
    for _ in 0..400 {
        let f = post(addr, "/filter", &common::args_names(pod, nodes)).await;
        let fits: Vec<String> = serde_json::from_value(f["NodeNames"].clone()).unwrap_or_default();
        if fits.is_empty() {
            let reasons = format!("{} {}", f["FailedNodes"], f["FailedAndUnresolvableNodes"]);
            if reasons.contains("PendingAllocationConflict") {
                last = reasons;
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            return Err(reasons);
        }
        let names: Vec<&str> = fits.iter().map(String::as_str).collect();
        let p = post(addr, "/prioritize", &common::args_names(pod, &names)).await;
        let best = p
            .as_array()
            .and_then(|a| a.iter().max_by_key(|h| h["Score"].as_i64()))
            .and_then(|h| h["Host"].as_str())
            .map(str::to_owned)
            .ok_or("empty priority list")?;
        let b = post(addr, "/bind", &bind_args(pod, &best)).await;
        match b["Error"].as_str() {
            Some("") => return Ok(best),
            Some(e) => last = e.to_owned(),
            None => return Err(format!("bad bind reply {b}")),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(format!("gave up: {last}"))
}

fn settings() -> Settings {
    Settings::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_build_state_and_follow_updates() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n1", &gpus("n1", 2, 16_000)));
    let mut held = common::annotated(
        gpu_pod("held", 1, 3000, 30),
        &[
            (VGPU_NODE, "n1"),
            (DEVICES_ALLOCATED, "GPU-n1-1,NVIDIA,3000,30:;"),
            (BIND_PHASE, "success"),
        ],
    );
    held.spec.as_mut().expect("spec").node_name = Some("n1".into());
    fake.insert_pod(held);
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings(), clock).await;
    assert_eq!(ext.app.read_state().gpu_usage()["GPU-n1-1"], (1, 3000, 30));
    // A node arriving later, and a health flip, are followed.
    let mut g2 = gpus("n2", 1, 8000);
    g2[0].healthy = false;
    fake.insert_node(node("n2", &g2));
    eventually("n2 seen", || ext.app.read_state().node("n2").is_some()).await;
    let pod = gpu_pod("p", 1, 1000, 10);
    let f = post(ext.addr, "/filter", &common::args_names(&pod, &["n2"])).await;
    assert_eq!(f["FailedAndUnresolvableNodes"]["n2"], "1/1 CardNotHealth");
    g2[0].healthy = true;
    fake.insert_node(node("n2", &g2));
    eventually("n2 healthy", || {
        ext.app
            .read_state()
            .node("n2")
            .is_some_and(|n| n.inventory.gpus[0].healthy)
    })
    .await;
    let f = post(ext.addr, "/filter", &common::args_names(&pod, &["n2"])).await;
    assert_eq!(f["NodeNames"], json!(["n2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_writes_the_decision_label_and_binding() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n1", &gpus("n1", 2, 16_000)));
    let pod = fake.insert_pod(pod_with(
        "p",
        vec![common::ctr("setup", &[])],
        vec![gpu_ctr("a", 1, 2500, 25), gpu_ctr("b", 2, 1000, 10)],
    ));
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings(), clock).await;
    fake.clear_requests();
    let v = post(ext.addr, "/bind", &bind_args(&pod, "n1")).await;
    assert_eq!(v, json!({"Error": ""}));
    let stored = fake.pod("default", "p").expect("pod");
    assert_eq!(
        stored.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("n1")
    );
    let ann = stored.metadata.annotations.clone().expect("annotations");
    let alloc = ann[DEVICES_ALLOCATED].clone();
    // Init container without GPU first (empty segment), then a's one GPU, then b's two distinct GPUs.
    let d = PodDevices::decode(&alloc).expect("decodes");
    assert_eq!(d.0.len(), 3);
    assert!(d.0[0].is_empty());
    assert_eq!(
        (d.0[1].0.len(), d.0[1].0[0].memory_mib, d.0[1].0[0].cores),
        (1, 2500, 25)
    );
    assert_eq!(d.0[2].0.len(), 2);
    assert_ne!(d.0[2].0[0].uuid, d.0[2].0[1].uuid, "C06: distinct physical GPUs");
    assert_eq!(ann[DEVICES_TO_ALLOCATE], alloc);
    assert_eq!(ann[VGPU_NODE], "n1");
    assert_eq!(ann[BIND_PHASE], "allocating");
    assert_eq!(ann[BIND_TIME], NOW.to_string());
    assert_eq!(ann[VGPU_TIME], NOW.to_string());
    assert!(verify_decision(
        KEY,
        "uid-p",
        "n1",
        &alloc,
        &ann[DECISION_SIGNATURE]
    ));
    assert_eq!(
        stored
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VGPU_NODE))
            .map(String::as_str),
        Some("n1")
    );
    // The wire: GET, one merge patch with the preconditions, one Binding.
    let reqs = fake.requests();
    let patches: Vec<_> = reqs.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 1, "{reqs:?}");
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let body = patches[0].body_json().expect("json");
    assert_eq!(body["metadata"]["uid"], "uid-p");
    assert_eq!(
        body["metadata"]["resourceVersion"],
        Value::from(pod.metadata.resource_version.clone().expect("rv"))
    );
    let bindings: Vec<_> = reqs
        .iter()
        .filter(|r| r.method == "POST" && r.path_and_query.contains("/pods/p/binding"))
        .collect();
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].body_json().expect("json")["target"]["name"], "n1");
    eventually("echo", || {
        ext.app.read_state().pod("uid-p").is_some_and(|r| !r.ours_unseen)
    })
    .await;
    assert_eq!(
        common::busy(ext.app.read_state().gpu_usage()),
        ground_truth(&fake.pods())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_failed_bindings_roll_back() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n1", &gpus("n1", 1, 16_000)));
    let pod = fake.insert_pod(gpu_pod("p", 1, 4000, 40));
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings(), clock).await;
    // 409 on the pod patch, both from the reflector's copy and from the GET retry: the assumption is
    // forgotten and the error returned.
    fake.fail_next("PATCH", "/pods/p", 409, 2);
    let v = post(ext.addr, "/bind", &bind_args(&pod, "n1")).await;
    let e = v["Error"].as_str().expect("error");
    assert!(e.contains("patching") && e.contains("409"), "{e}");
    assert!(!ext.app.read_state().holds("uid-p"));
    assert_eq!(ext.app.read_state().gpu_usage()["GPU-n1-0"], (0, 0, 0));
    eventually("bind-phase failed", || {
        fake.pod("default", "p")
            .and_then(|p| p.metadata.annotations)
            .is_some_and(|a| a.get(BIND_PHASE).map(String::as_str) == Some("failed"))
    })
    .await;
    // A failed Binding after the patch: the decision is removed again and an Event says why.
    fake.fail_next("POST", "/pods/p/binding", 500, 1);
    let v = post(ext.addr, "/bind", &bind_args(&pod, "n1")).await;
    assert!(v["Error"].as_str().is_some_and(|e| e.contains("binding")), "{v}");
    assert!(!ext.app.read_state().holds("uid-p"));
    let stored = fake.pod("default", "p").expect("pod");
    let ann = stored.metadata.annotations.unwrap_or_default();
    assert_eq!(ann.get(BIND_PHASE).map(String::as_str), Some("failed"));
    assert!(!ann.contains_key(DEVICES_ALLOCATED), "decision removed: {ann:?}");
    assert!(
        fake.events().iter().any(|e| e["reason"] == "BindingFailed"),
        "{:?}",
        fake.events()
    );
    // The retry succeeds and holds exactly one allocation.
    let v = post(ext.addr, "/bind", &bind_args(&pod, "n1")).await;
    assert_eq!(v["Error"], "");
    eventually("settled", || {
        common::busy(ext.app.read_state().gpu_usage()) == ground_truth(&fake.pods())
            && ext.app.read_state().pod("uid-p").is_some_and(|r| !r.ours_unseen)
    })
    .await;
    assert_eq!(ext.app.read_state().gpu_usage()["GPU-n1-0"], (1, 4000, 40));
    // A bind for a re-created pod (other UID) is refused.
    let mut stale = bind_args(&pod, "n1");
    stale["PodUID"] = json!("uid-old");
    let v = post(ext.addr, "/bind", &stale).await;
    assert!(v["Error"].as_str().is_some_and(|e| e.contains("UID")), "{v}");
}

/// C03 through the API: deleting the pod, or its finishing, releases its slots; a new same-name pod
/// then fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c03_deletion_and_completion_release() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    let gs = gpus("n", 8, 81_920);
    fake.insert_node(node("n", &gs));
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings(), clock).await;
    let dp = spawn_fake_device_plugin(Arc::clone(&fake));
    let big = fake.insert_pod(gpu_pod("p", 8, 81_920, 100));
    assert_eq!(schedule(ext.addr, &big, &["n"]).await, Ok("n".into()));
    let q = fake.insert_pod(gpu_pod("q", 8, 81_920, 100));
    let e = schedule(ext.addr, &q, &["n"]).await.expect_err("full");
    assert!(e.contains("8/8 CardInsufficientMemory"), "{e}");
    fake.delete_pod("default", "p");
    eventually("released", || !ext.app.read_state().holds("uid-p")).await;
    assert!(ext.app.read_state().gpu_usage().values().all(|u| *u == (0, 0, 0)));
    assert_eq!(schedule(ext.addr, &q, &["n"]).await, Ok("n".into()));
    // Completion releases too.
    fake.set_pod_phase("default", "q", "Succeeded");
    eventually("released on Succeeded", || !ext.app.read_state().holds("uid-q")).await;
    // A new pod under the old name (new UID) schedules.
    let mut again = gpu_pod("p", 8, 81_920, 100);
    again.metadata.uid = Some("uid-p2".into());
    let again = fake.insert_pod(again);
    assert_eq!(schedule(ext.addr, &again, &["n"]).await, Ok("n".into()));
    dp.abort();
}

/// C04: 200 pods asking GPU slices race (filter → prioritize → bind, concurrently) for one 4-GPU node.
/// Ground truth from the API's stored pods: no GPU over its slots, memory or cores; every slot used at
/// most once; the rest failed with a reason; the extender's books equal the ground truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c04_race_for_one_node_never_overcommits() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    let gs = gpus("n", 4, 16_000);
    fake.insert_node(node("n", &gs));
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings(), clock).await;
    let dp = spawn_fake_device_plugin(Arc::clone(&fake));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let mem = [1000, 2000, 3000][(i % 3) as usize];
        let cores = [5, 10, 20][((i / 3) % 3) as usize];
        let pod = fake.insert_pod(gpu_pod(&format!("p{i:03}"), 1, mem, cores));
        let addr = ext.addr;
        tasks.push(tokio::spawn(async move { schedule(addr, &pod, &["n"]).await }));
    }
    let mut bound = 0;
    let mut reasons = BTreeMap::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => bound += 1,
            Err(r) => *reasons.entry(r).or_insert(0) += 1,
        }
    }
    let truth = ground_truth(&fake.pods());
    for g in &gs {
        let (slots, mem, cores) = truth.get(&g.uuid).copied().unwrap_or_default();
        assert!(slots <= g.split_count, "{}: {slots} slots", g.uuid);
        assert!(mem <= 16_000, "{}: {mem} MiB", g.uuid);
        assert!(cores <= 100, "{}: {cores} cores", g.uuid);
    }
    let placed: u32 = truth.values().map(|u| u.0).sum();
    assert_eq!(placed, bound, "every bound pod holds exactly one slot");
    eprintln!("race: {bound} of 200 bound; failures {reasons:?}");
    assert!(
        bound >= 24,
        "the node is filled, not starved: {bound} bound; {reasons:?}"
    );
    assert_eq!(bound + reasons.values().sum::<u32>(), 200);
    for r in reasons.keys() {
        assert!(
            r.contains("Card") || r.contains("Exclusive") || r.contains("Insufficient"),
            "a capacity reason: {r}"
        );
    }
    eventually("books equal the ground truth", || {
        common::busy(ext.app.read_state().gpu_usage()) == truth
    })
    .await;
    dp.abort();
}

/// Restart: binds stream in, the extender stops mid-stream, a new one against the same API rebuilds
/// exactly the same per-GPU allocations, and further binds stay correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_the_same_allocations() {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    let nodes = ["a", "b"];
    let all: Vec<_> = nodes.iter().flat_map(|n| gpus(n, 2, 16_000)).collect();
    for n in nodes {
        fake.insert_node(node(n, &gpus(n, 2, 16_000)));
    }
    let dp = spawn_fake_device_plugin(Arc::clone(&fake));
    let shapes = |i: u32| -> Pod {
        let name = format!("r{i:02}");
        match i % 4 {
            0 => gpu_pod(&name, 1, 1500, 10),
            1 => gpu_pod(&name, 2, 1000, 5),
            2 => pod_with(
                &name,
                vec![gpu_ctr("init", 1, 6000, 0)],
                vec![gpu_ctr("app", 1, 2000, 10)],
            ),
            _ => pod_with(
                &name,
                vec![],
                vec![gpu_ctr("x", 1, 1200, 15), gpu_ctr("y", 1, 800, 5)],
            ),
        }
    };
    let (clock1, _) = clock();
    let first = extender(fake.client(), settings(), clock1).await;
    for i in 0..12 {
        let pod = fake.insert_pod(shapes(i));
        schedule(first.addr, &pod, &nodes).await.expect("fits");
    }
    eventually("first extender settled", || {
        common::busy(first.app.read_state().gpu_usage()) == ground_truth(&fake.pods())
    })
    .await;
    let before = first.app.read_state().gpu_usage();
    assert!(before.values().any(|u| u.0 > 0));
    first.stop();
    let (clock2, _) = clock();
    let second = extender(fake.client(), settings(), clock2).await;
    assert_eq!(second.app.read_state().gpu_usage(), before, "rebuilt exactly");
    assert_eq!(second.app.read_state().allocations(), 12);
    for i in 12..40 {
        let pod = fake.insert_pod(shapes(i));
        let _ = schedule(second.addr, &pod, &nodes).await;
    }
    let truth = ground_truth(&fake.pods());
    for g in &all {
        let (slots, mem, cores) = truth.get(&g.uuid).copied().unwrap_or_default();
        assert!(
            slots <= 10 && mem <= 16_000 && cores <= 100,
            "{}: {slots} {mem} {cores}",
            g.uuid
        );
    }
    eventually("second extender settled", || {
        common::busy(second.app.read_state().gpu_usage()) == truth
    })
    .await;
    dp.abort();
}
