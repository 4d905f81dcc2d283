//! The fragmentation-aware policy over the observed workload (HTTP, no API server) and namespace quota
//! at filter and bind (against the fake API server): `fgd` places a pod where it leaves less
//! fragmentation than `binpack`; the model is rebuilt periodically from what the extender saw; two pods
//! racing at a quota boundary bind one; quota counts a pod's effective request (C02).

mod common;

use std::collections::BTreeMap;

use common::{
    args_names, best, bind_args, clock, ctr, eventually, extender, gpu_ctr, gpu_pod, gpus, held, node,
    offline_extender, pod_with, post,
};
use hami_api::annotations::{BIND_PHASE, DEVICES_TO_ALLOCATE};
use hami_fake_apiserver::FakeApiServer;
use hami_policy::{GpuUsage, ModelSource, NamespaceQuota, node_frag};
use hami_scheduler::{
    config::PolicyChoice,
    state::{Settings, WorkloadSettings},
};
use k8s_openapi::api::core::v1::Pod;

/// Two one-GPU nodes (10,000 MiB): `a` holds a 40 % pod, `b` a 30 % pod; the workload then asks
/// mostly for 50 % GPUs. A 20 % pod: binpack takes the fuller `a`, leaving 40 % there that no 50 % pod
/// can use; FGD takes `b`, where 50 % stays free. FGD's model comes from what the extender observed,
/// rebuilt by the periodic task (not per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fgd_leaves_less_fragmentation_than_binpack() {
    let nodes = [node("a", &gpus("a", 1, 10_000)), node("b", &gpus("b", 1, 10_000))];
    let fgd_settings = Settings {
        policy: PolicyChoice::Fgd { consolidate: false },
        workload: WorkloadSettings {
            refresh_secs: 1,
            min_weight: 4.0,
            default: hami_policy::DefaultModel::Uniform,
            ..WorkloadSettings::default()
        },
        ..Settings::default()
    };
    let fgd = offline_extender(fgd_settings, &nodes).await;
    let binpack = offline_extender(Settings::default(), &nodes).await;
    for ext in [&fgd, &binpack] {
        let mut st = ext.app.write_state();
        assert!(st.apply_pod(&held("ha", "a", "GPU-a-0", 4000, 40)).is_empty());
        assert!(st.apply_pod(&held("hb", "b", "GPU-b-0", 3000, 30)).is_empty());
    }
    assert_eq!(
        fgd.app.read_state().workload_model().1,
        ModelSource::Default,
        "nothing observed yet"
    );
    // The workload asks for half GPUs; each pod counts once however often it is filtered.
    for i in 0..5 {
        let p = gpu_pod(&format!("half{i}"), 1, 5000, 50);
        for _ in 0..3 {
            post(fgd.addr, "/filter", &args_names(&p, &["a", "b"])).await;
        }
    }
    eventually("the periodic rebuild uses the observed workload", || {
        fgd.app.read_state().workload_model().1 == ModelSource::Observed
    })
    .await;
    let model = fgd.app.read_state().workload_model().0.clone();
    // Held 40 % and 30 % (weight 1 each) and five 50 % observations (barely decayed).
    assert_eq!(model.shapes.len(), 3, "{model:?}");
    assert!((model.shapes[0].1 - 5.0 / 7.0).abs() < 0.01, "{model:?}");

    let pod = gpu_pod("small", 1, 2000, 20);
    let args = args_names(&pod, &["a", "b"]);
    let by_fgd = best(&post(fgd.addr, "/prioritize", &args).await);
    let by_binpack = best(&post(binpack.addr, "/prioritize", &args).await);
    assert_eq!((by_fgd.as_str(), by_binpack.as_str()), ("b", "a"));

    // Fragmentation of the cluster under the model after each choice.
    let st = fgd.app.read_state();
    let frag_after = |target: &str| -> f64 {
        ["a", "b"]
            .iter()
            .map(|n| {
                let state = st.node(n).expect("node");
                let mut gpus = state.gpus.clone();
                if *n == target {
                    gpus[0].add(GpuUsage {
                        slots: 1,
                        memory_mib: 2000,
                        cores: 20,
                    });
                }
                node_frag(&state.inventory, &gpus, state.free_cpu_milli(), &model)
            })
            .sum()
    };
    let (f, b) = (frag_after(&by_fgd), frag_after(&by_binpack));
    assert!(f + 0.1 < b, "fgd leaves {f:.3} GPUs of fragment, binpack {b:.3}");
}

fn quota_settings(limit_mib: u64) -> Settings {
    let mut quotas = BTreeMap::new();
    quotas.insert(
        "default".to_owned(),
        NamespaceQuota {
            memory_mib: Some(limit_mib),
            cores: None,
        },
    );
    Settings {
        quotas,
        ..Settings::default()
    }
}

/// Quota 10,000 MiB in `default`, one 32,000 MiB GPU: two 6,000 MiB pods both pass the filter (each
/// alone fits), their binds race, exactly one binds; the other is refused with `QuotaExceeded`, and
/// the filter then says why (resolvable). A pod over the quota alone is unresolvable. A pod whose
/// GPU init container and app container each take 4,000 MiB is charged 4,000 (C02) and fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_race_binds_exactly_one() {
    let fake = FakeApiServer::start().await.expect("fake");
    fake.insert_node(node("n", &gpus("n", 1, 32_000)));
    let p1 = fake.insert_pod(gpu_pod("p1", 1, 6000, 10));
    let p2 = fake.insert_pod(gpu_pod("p2", 1, 6000, 10));
    let (clock, _) = clock();
    let ext = extender(fake.client(), quota_settings(10_000), clock).await;
    for p in [&p1, &p2] {
        let f = post(ext.addr, "/filter", &args_names(p, &["n"])).await;
        assert_eq!(f["NodeNames"], serde_json::json!(["n"]), "{f}");
    }
    let (b1, b2) = (bind_args(&p1, "n"), bind_args(&p2, "n"));
    let (r1, r2) = tokio::join!(post(ext.addr, "/bind", &b1), post(ext.addr, "/bind", &b2));
    let errors: Vec<String> = [&r1, &r2]
        .iter()
        .map(|r| r["Error"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(
        errors.iter().filter(|e| e.is_empty()).count(),
        1,
        "exactly one binds: {errors:?}"
    );
    let refused = errors.iter().find(|e| !e.is_empty()).expect("one refused");
    assert!(refused.contains("QuotaExceeded"), "{refused}");
    let bound: Vec<Pod> = fake
        .pods()
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .collect();
    assert_eq!(bound.len(), 1);
    let loser = if errors[0].is_empty() { &p2 } else { &p1 };
    let f = post(ext.addr, "/filter", &args_names(loser, &["n"])).await;
    let why = f["FailedNodes"]["n"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("QuotaExceeded") && why.contains("12000 nvidia.com/gpumem") && why.contains("10000"),
        "{f}"
    );
    let huge = fake.insert_pod(gpu_pod("huge", 1, 11_000, 10));
    let f = post(ext.addr, "/filter", &args_names(&huge, &["n"])).await;
    assert!(
        f["FailedAndUnresolvableNodes"]["n"]
            .as_str()
            .is_some_and(|w| w.starts_with("QuotaExceeded")),
        "{f}"
    );
    // The device plugin's Allocate for the bound pod (ends the pending-allocation hold).
    let mut winner = bound[0].clone();
    let ann = winner.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(DEVICES_TO_ALLOCATE.to_owned(), ";".to_owned());
    ann.insert(BIND_PHASE.to_owned(), "success".to_owned());
    fake.insert_pod(winner);
    eventually("allocated", || {
        ext.app
            .read_state()
            .pod(if errors[0].is_empty() { "uid-p1" } else { "uid-p2" })
            .is_some_and(|r| r.bind_phase.as_deref() == Some("success"))
    })
    .await;
    // C02: init 4,000 then app 4,000 on the GPU: peak 4,000, within the 4,000 left.
    let staged = fake.insert_pod(pod_with(
        "staged",
        vec![gpu_ctr("init", 1, 4000, 0)],
        vec![gpu_ctr("app", 1, 4000, 10), ctr("side", &[])],
    ));
    let v = post(ext.addr, "/bind", &bind_args(&staged, "n")).await;
    assert_eq!(v["Error"], "", "{v}");
    eventually("echoed", || {
        ext.app.read_state().quota_used("default").memory_mib == 10_000
    })
    .await;
}
