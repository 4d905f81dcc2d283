//! Peer cases of kind (a) from `shared/cases/peer-bugs.md`, at the extender's HTTP level against the
//! fake API server (the bind writes the decision that is then checked): C01 multi-container pods,
//! C02 init containers, C04 concurrent overcommit (memory and cores), C05 unhealthy GPUs, C06 distinct
//! physical GPUs, C21 one slot per container, C22 policy annotations (trimmed, unknown ones refused).
//! (C03 is in `apiserver.rs` and `state.rs`; C25, C28, C29 and C30 in `reliability.rs`.)

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::{
    args_names, best, bind, bind_args, clock, extender, filter, gpu_ctr, gpu_pod, gpus, node, pod_with, post,
};
use hami_api::{PodDevices, annotations::DEVICES_ALLOCATED};
use hami_fake_apiserver::FakeApiServer;
use hami_scheduler::{config::PolicyChoice, server::Running, state::Settings};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

async fn setup(
    nodes: &[k8s_openapi::api::core::v1::Node],
    settings: Settings,
) -> (Arc<FakeApiServer>, Running) {
    let fake = Arc::new(FakeApiServer::start().await.expect("fake"));
    for n in nodes {
        fake.insert_node(n.clone());
    }
    let (clock, _) = clock();
    let ext = extender(fake.client(), settings, clock).await;
    (fake, ext)
}

fn spread() -> Settings {
    Settings {
        policy: PolicyChoice::Hami {
            node: hami_api::NodePolicy::Binpack,
            gpu: hami_api::GpuPolicy::Spread,
        },
        ..Settings::default()
    }
}

fn decision(fake: &FakeApiServer, name: &str) -> PodDevices {
    let p = fake.pod("default", name).expect("pod");
    let ann = p.metadata.annotations.expect("annotations");
    PodDevices::decode(&ann[DEVICES_ALLOCATED]).expect("decodes")
}

/// C01: two containers (10 GiB and 1 GiB) on two idle 10 GiB GPUs under spread get different GPUs, and
/// no GPU is over capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c01_multi_container_pod_uses_usage_by_gpu_identity() {
    let (fake, ext) = setup(&[node("n", &gpus("n", 2, 10_240))], spread()).await;
    let pod = fake.insert_pod(pod_with(
        "p",
        vec![],
        vec![gpu_ctr("c1", 1, 10_240, 0), gpu_ctr("c2", 1, 1024, 0)],
    ));
    assert_eq!(
        filter(&ext, &pod, &["n"]).await["NodeNames"],
        serde_json::json!(["n"])
    );
    assert_eq!(bind(&ext, &pod, "n").await, "");
    let d = decision(&fake, "p");
    assert_ne!(d.0[0].0[0].uuid, d.0[1].0[0].uuid);
    let mut per_gpu: BTreeMap<String, u64> = BTreeMap::new();
    for c in &d.0 {
        for dev in &c.0 {
            *per_gpu.entry(dev.uuid.clone()).or_default() += dev.memory_mib;
        }
    }
    let mut mems: Vec<u64> = per_gpu.into_values().collect();
    mems.sort_unstable();
    assert_eq!(mems, [1024, 10_240]);
}

/// C02: pods whose three init containers each need 1 GPU + 10 GiB fit on a 2 × 16 GiB node (init
/// containers run one at a time), and a second such pod too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c02_init_containers_take_the_peak() {
    let (fake, ext) = setup(
        &[
            node("n1", &gpus("n1", 2, 16_384)),
            node("n2", &gpus("n2", 3, 16_384)),
        ],
        spread(),
    )
    .await;
    let mk = |name: &str| {
        pod_with(
            name,
            vec![
                gpu_ctr("i1", 1, 10_240, 0),
                gpu_ctr("i2", 1, 10_240, 0),
                gpu_ctr("i3", 1, 10_240, 0),
            ],
            vec![common::ctr("app", &[])],
        )
    };
    for name in ["a", "b"] {
        let pod = fake.insert_pod(mk(name));
        let f = filter(&ext, &pod, &["n1", "n2"]).await;
        let fits = f["NodeNames"].as_array().expect("names").clone();
        assert!(!fits.is_empty(), "{f}");
        let node = fits[0].as_str().expect("name").to_owned();
        assert_eq!(bind(&ext, &pod, &node).await, "", "{name}");
        // Four segments: three init containers with one GPU each, the app container empty.
        let d = decision(&fake, name);
        assert_eq!(d.0.len(), 4);
        assert!(d.0[3].is_empty());
    }
}

/// C04: (1) three pods of 12 GiB racing for the one free 24 GiB GPU: exactly two bind; (2) three pods
/// of 50 cores on one GPU: at most two, never over 100 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c04_concurrent_binds_never_overcommit() {
    let (fake, ext) = setup(&[node("n", &gpus("n", 1, 24_576))], Settings::default()).await;
    let pods: Vec<Pod> = (0..3)
        .map(|i| fake.insert_pod(gpu_pod(&format!("m{i}"), 1, 12_288, 10)))
        .collect();
    // All three pass filter on the same state, as kube-scheduler's parallel cycles would see it.
    for p in &pods {
        assert_eq!(
            filter(&ext, p, &["n"]).await["NodeNames"],
            serde_json::json!(["n"])
        );
    }
    let addr = ext.addr;
    let results: Vec<String> = futures::future::join_all(pods.iter().map(|p| {
        let body = bind_args(p, "n");
        async move {
            post(addr, "/bind", &body).await["Error"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        }
    }))
    .await;
    let ok = results.iter().filter(|e| e.is_empty()).count();
    assert_eq!(ok, 2, "{results:?}");
    let refused = results.iter().find(|e| !e.is_empty()).expect("one refused");
    assert!(refused.contains("CardInsufficientMemory"), "{refused}");
    let truth = common::ground_truth(&fake.pods());
    assert_eq!(truth["GPU-n-0"].1, 24_576);

    let (fake, ext) = setup(&[node("c", &gpus("c", 1, 16_000))], Settings::default()).await;
    let mut bound = 0;
    for i in 0..3 {
        let p = fake.insert_pod(gpu_pod(&format!("c{i}"), 1, 100, 50));
        if bind(&ext, &p, "c").await.is_empty() {
            bound += 1;
        }
        // The device plugin's Allocate is not simulated: identical decisions never conflict.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(bound, 2);
    assert_eq!(common::ground_truth(&fake.pods())["GPU-c-0"].2, 100);
}

/// C05: "1/1 CardNotHealth" for a node whose only GPU is unhealthy; with a healthy GPU beside it, the
/// healthy one is chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c05_unhealthy_gpus_are_never_chosen() {
    let mut sick = gpus("s", 1, 16_000);
    sick[0].healthy = false;
    let mut mixed = gpus("m", 2, 16_000);
    mixed[0].healthy = false;
    let (fake, ext) = setup(&[node("s", &sick), node("m", &mixed)], Settings::default()).await;
    let pod = fake.insert_pod(common::gpu_share_pod("p", 10, 20));
    let f = filter(&ext, &pod, &["s", "m"]).await;
    assert_eq!(f["FailedAndUnresolvableNodes"]["s"], "1/1 CardNotHealth");
    assert_eq!(f["NodeNames"], serde_json::json!(["m"]));
    assert_eq!(bind(&ext, &pod, "m").await, "");
    let d = decision(&fake, "p");
    assert_eq!(d.0[0].0[0].uuid, "GPU-m-1");
    assert_eq!(
        d.0[0].0[0].memory_mib, 1600,
        "10 % of 16000, multiplied first (C09)"
    );
}

/// C06: `nvidia.com/gpu: 2` gets two distinct physical GPUs; when only one GPU has free slots the pod
/// is unschedulable there rather than given two shares of one GPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c06_two_gpus_are_two_physical_gpus() {
    let mut gs = gpus("n", 2, 16_000);
    for g in &mut gs {
        g.split_count = 4;
    }
    let (fake, ext) = setup(&[node("n", &gs)], Settings::default()).await;
    let pod = fake.insert_pod(gpu_pod("p", 2, 1000, 10));
    assert_eq!(bind(&ext, &pod, "n").await, "");
    let d = decision(&fake, "p");
    assert_eq!(d.0[0].0.len(), 2);
    assert_ne!(d.0[0].0[0].uuid, d.0[0].0[1].uuid);
    // Fill GPU 1's remaining three slots with one-GPU pods pinned to it.
    for i in 0..3 {
        let p = fake.insert_pod(common::annotated(
            gpu_pod(&format!("f{i}"), 1, 100, 1),
            &[("nvidia.com/use-gpuuuid", "GPU-n-1")],
        ));
        assert_eq!(bind(&ext, &p, "n").await, "", "f{i}");
        // Let the device plugin's Allocate "finish" so the next decision is not held up.
        let mut stored = fake.pod("default", &format!("f{i}")).expect("pod");
        let ann = stored.metadata.annotations.as_mut().expect("ann");
        ann.insert("hami.io/bind-phase".into(), "success".into());
        ann.insert("hami.io/vgpu-devices-to-allocate".into(), ";".into());
        fake.insert_pod(stored);
        common::eventually("allocated", || {
            ext.app
                .read_state()
                .pod(&format!("uid-f{i}"))
                .is_some_and(|r| r.bind_phase.as_deref() == Some("success"))
        })
        .await;
    }
    let q = fake.insert_pod(gpu_pod("q", 2, 1000, 10));
    let f = filter(&ext, &q, &["n"]).await;
    assert!(
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| r.contains("CardTimeSlicingExhausted")),
        "{f}"
    );
}

/// C22: cluster default binpack, nodes `empty` and `half` (half loaded). A pod annotated
/// `hami.io/node-scheduler-policy: " spread "` is read trimmed and goes to the empty node; a pod that
/// bypassed admission with `"spraed"` or `"binpak"` is refused with the valid values listed (never
/// silently placed by the opposite policy), and nothing is written to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c22_policy_annotations_are_trimmed_and_unknown_ones_refused() {
    let (fake, ext) = setup(
        &[
            node("empty", &gpus("empty", 1, 16_384)),
            node("half", &gpus("half", 1, 16_384)),
        ],
        Settings::default(),
    )
    .await;
    fake.insert_pod(common::held("load", "half", "GPU-half-0", 8192, 50));
    common::eventually("the load is seen", || ext.app.read_state().allocations() == 1).await;
    let binpack = fake.insert_pod(gpu_pod("plain", 1, 1024, 10));
    assert_eq!(
        best(&prioritize(&ext, &binpack, &["empty", "half"]).await),
        "half",
        "the cluster default packs"
    );
    let spread = fake.insert_pod(common::annotated(
        gpu_pod("spread", 1, 1024, 10),
        &[("hami.io/node-scheduler-policy", " spread ")],
    ));
    assert_eq!(
        best(&prioritize(&ext, &spread, &["empty", "half"]).await),
        "empty"
    );
    for (key, value, valid) in [
        (
            "hami.io/node-scheduler-policy",
            "spraed",
            "\"binpack\" or \"spread\"",
        ),
        ("hami.io/gpu-scheduler-policy", "binpak", "\"topology-aware\""),
    ] {
        let name = format!("bad-{value}");
        let pod = fake.insert_pod(common::annotated(gpu_pod(&name, 1, 1024, 10), &[(key, value)]));
        let f = filter(&ext, &pod, &["empty", "half"]).await;
        let e = f["Error"].as_str().unwrap_or_default();
        assert!(e.contains(value) && e.contains(valid), "{f}");
        assert!(bind(&ext, &pod, "empty").await.contains(valid));
        assert!(
            fake.pod("default", &name)
                .and_then(|p| p.metadata.annotations)
                .is_none_or(|a| !a.contains_key(DEVICES_ALLOCATED)),
            "nothing written"
        );
    }
}

async fn prioritize(ext: &Running, pod: &Pod, nodes: &[&str]) -> Value {
    post(ext.addr, "/prioritize", &args_names(pod, nodes)).await
}

/// C21 as the extender rebuilds it from the API: GPU-A (`deviceSplitCount` 2) runs pod P1 whose two
/// app containers each hold 1000 MiB of it; the extender counts two slots (not one per pod), so P2
/// (1 GPU, 1000 MiB) is refused with slots exhausted, and memory is the plain sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c21_two_app_containers_on_one_gpu_take_two_slots() {
    let mut g = gpus("n", 1, 24_576);
    g[0].split_count = 2;
    let (fake, ext) = setup(&[node("n", &g)], spread()).await;
    let mut p1 = common::annotated(
        pod_with(
            "p1",
            vec![],
            vec![gpu_ctr("a", 1, 1000, 0), gpu_ctr("b", 1, 1000, 0)],
        ),
        &[
            (hami_api::annotations::VGPU_NODE, "n"),
            (
                DEVICES_ALLOCATED,
                "GPU-n-0,NVIDIA,1000,0:;GPU-n-0,NVIDIA,1000,0:;",
            ),
            (hami_api::annotations::BIND_PHASE, "success"),
        ],
    );
    p1.spec.as_mut().expect("spec").node_name = Some("n".into());
    fake.insert_pod(p1);
    common::eventually("P1 accounted", || ext.app.read_state().allocations() == 1).await;
    assert_eq!(ext.app.read_state().gpu_usage()["GPU-n-0"], (2, 2000, 0));
    let p2 = fake.insert_pod(gpu_pod("p2", 1, 1000, 0));
    let f = filter(&ext, &p2, &["n"]).await;
    assert!(
        f["FailedNodes"]["n"]
            .as_str()
            .is_some_and(|r| r.contains("CardTimeSlicingExhausted")),
        "{f}"
    );
}
