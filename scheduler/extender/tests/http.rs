//! The extender over real loopback HTTP, with JSON in kube-scheduler's exact wire format
//! (`reference/kubernetes-testing.md` §5; fixtures in `tests/fixtures/extender/`): both
//! `nodeCacheCapable` modes, prioritize scores, bad input (400/413 with a reason, never a panic or a
//! 5xx, also under a proptest fuzz loop), health, readiness and metrics.

mod common;

use std::sync::OnceLock;

use common::{args_names, gpu_pod, gpus, http, node, node_with_usage, offline_extender, post};
use hami_scheduler::{server::Running, state::Settings};
use proptest::prelude::*;
use serde_json::{Value, json};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/extender/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

/// node-1: two 16 GB GPUs, idle; node-2: one 2 GB GPU (too small for 3000 MiB even when idle).
async fn two_nodes() -> Running {
    offline_extender(
        Settings::default(),
        &[
            node("node-1", &gpus("node-1", 2, 16_000)),
            node("node-2", &gpus("node-2", 1, 2000)),
        ],
    )
    .await
}

#[tokio::test]
async fn filter_with_node_names() {
    let ext = two_nodes().await;
    let (status, body) = http(ext.addr, "/filter", Some(fixture("filter-node-names.json"))).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["NodeNames"], json!(["node-1"]), "{text}");
    assert_eq!(v["Nodes"], Value::Null);
    assert_eq!(v["Error"], "");
    assert_eq!(v["FailedNodes"], json!({}));
    assert_eq!(
        v["FailedAndUnresolvableNodes"]["node-2"],
        "1/1 CardInsufficientMemory"
    );
    assert!(
        v["FailedAndUnresolvableNodes"]["node-3"]
            .as_str()
            .is_some_and(|s| s.contains("unknown node")),
        "{text}"
    );
    // Exactly the five keys of ExtenderFilterResult, PascalCase.
    let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "Error",
            "FailedAndUnresolvableNodes",
            "FailedNodes",
            "NodeNames",
            "Nodes"
        ]
    );
}

#[tokio::test]
async fn filter_with_full_nodes_answers_nodes_items() {
    let ext = two_nodes().await;
    let v = post(
        ext.addr,
        "/filter",
        &serde_json::from_slice(&fixture("filter-nodes.json")).expect("fixture json"),
    )
    .await;
    assert_eq!(
        v["NodeNames"],
        Value::Null,
        "nodeCacheCapable false: answer Nodes"
    );
    let items = v["Nodes"]["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "node-1");
    assert!(v["FailedAndUnresolvableNodes"]["node-3"].is_string());
    // A node known only from the request object (Cluster Autoscaler's simulated node) is judged from
    // its own annotations.
    let pod = gpu_pod("p", 1, 3000, 30);
    let sim = node("sim-1", &gpus("sim-1", 1, 24_000));
    let v = post(
        ext.addr,
        "/filter",
        &json!({"Pod": pod, "Nodes": {"metadata": {}, "items": [sim]}, "NodeNames": null}),
    )
    .await;
    assert_eq!(v["Nodes"]["items"][0]["metadata"]["name"], "sim-1", "{v}");
}

#[tokio::test]
async fn prioritize_scores_zero_to_ten() {
    // Binpack nodes: the busier node scores 10, the idle one 0, the unfit one 0.
    let ext = offline_extender(
        Settings::default(),
        &[
            node("idle", &gpus("idle", 1, 16_000)),
            node("busy", &gpus("busy", 1, 16_000)),
            node("small", &gpus("small", 1, 1000)),
        ],
    )
    .await;
    {
        // A pod already running there (Allocate done: bind-phase success).
        let x = common::annotated(
            gpu_pod("x", 1, 4000, 20),
            &[
                ("hami.io/vgpu-node", "busy"),
                ("hami.io/vgpu-devices-allocated", "GPU-busy-0,NVIDIA,4000,20:;"),
                ("hami.io/bind-phase", "success"),
            ],
        );
        assert!(ext.app.write_state().apply_pod(&x).is_empty());
    }
    let pod = gpu_pod("p", 1, 3000, 30);
    let v = post(
        ext.addr,
        "/prioritize",
        &args_names(&pod, &["idle", "busy", "small"]),
    )
    .await;
    assert_eq!(
        v,
        json!([{"Host":"idle","Score":0},{"Host":"busy","Score":10},{"Host":"small","Score":0}])
    );
    // Node objects mode.
    let v = post(
        ext.addr,
        "/prioritize",
        &json!({"Pod": pod, "Nodes": {"metadata": {}, "items": [{"metadata": {"name": "busy"}}]}, "NodeNames": null}),
    )
    .await;
    assert_eq!(v, json!([{"Host":"busy","Score":10}]));
}

#[tokio::test]
async fn pods_without_managed_resources_pass_untouched() {
    let ext = two_nodes().await;
    let pod = common::pod_with("plain", vec![], vec![common::ctr("c", &[("cpu", "500m")])]);
    let v = post(
        ext.addr,
        "/filter",
        &args_names(&pod, &["node-1", "node-2", "nowhere"]),
    )
    .await;
    assert_eq!(v["NodeNames"], json!(["node-1", "node-2", "nowhere"]));
    assert_eq!(v["FailedNodes"], json!({}));
    assert_eq!(v["FailedAndUnresolvableNodes"], json!({}));
}

#[tokio::test]
async fn invalid_pods_get_an_error_field_and_bad_bodies_get_400() {
    let ext = two_nodes().await;
    let pod = common::pod_with(
        "p",
        vec![],
        vec![common::ctr("c", &[("nvidia.com/gpumem", "-1")])],
    );
    let v = post(ext.addr, "/filter", &args_names(&pod, &["node-1"])).await;
    assert!(
        v["Error"]
            .as_str()
            .is_some_and(|e| e.contains("nvidia.com/gpumem")),
        "{v}"
    );
    for (path, body) in [
        ("/filter", b"{".to_vec()),
        ("/filter", b"".to_vec()),
        ("/filter", b"[1,2]".to_vec()),
        (
            "/filter",
            br#"{"Pod":{"metadata":{"name":7}},"NodeNames":[]}"#.to_vec(),
        ),
        ("/prioritize", b"null".to_vec()),
        ("/bind", br#"{"PodName":"p"}"#.to_vec()),
        ("/bind", b"\xff\xfe".to_vec()),
    ] {
        let (status, body) = http(ext.addr, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{path} {:?}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).expect("json error body");
        assert!(
            v["Error"].as_str().is_some_and(|e| e.starts_with("malformed")),
            "{path}: {v}"
        );
    }
    let huge = vec![b' '; (1 << 20) + 10];
    let (status, _) = http(ext.addr, "/filter", Some(huge)).await;
    assert_eq!(status, 413);
    // Bind without an API client: a clear Error, HTTP 200 as the wire type wants.
    let v = post(
        ext.addr,
        "/bind",
        &serde_json::from_slice(&fixture("bind.json")).expect("json"),
    )
    .await;
    assert!(
        v["Error"]
            .as_str()
            .is_some_and(|e| e.contains("no Kubernetes API client")),
        "{v}"
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let ext = offline_extender(
        Settings::default(),
        &[node_with_usage(
            "n",
            &gpus("n", 1, 16_000),
            Some(common::NOW),
            &[],
        )],
    )
    .await;
    {
        let mut st = ext.app.write_state();
        st.prepare_bind(&gpu_pod("x", 1, 4096, 25), "n", common::NOW)
            .expect("fits");
    }
    assert_eq!(http(ext.addr, "/healthz", None).await.0, 200);
    assert_eq!(
        http(ext.addr, "/readyz", None).await.0,
        200,
        "no API client: ready"
    );
    let pod = gpu_pod("p", 1, 1000, 10);
    post(ext.addr, "/filter", &args_names(&pod, &["n"])).await;
    let (status, body) = http(ext.addr, "/metrics", None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    for needle in [
        "hami_scheduler_requests_total{result=\"ok\",verb=\"filter\"} 1",
        "hami_scheduler_request_duration_seconds_count{verb=\"filter\"} 1",
        "hami_scheduler_nodes{condition=\"ready\"} 1",
        "hami_gpu_memory_allocated_bytes{device_cores=\"100\",device_index=\"0\",device_type=\"NVIDIA-NVIDIA A100-SXM4-80GB\",device_uuid=\"GPU-n-0\",node=\"n\"} 4294967296",
        "hami_gpu_core_allocated_ratio{device_cores=\"100\",device_index=\"0\",device_type=\"NVIDIA-NVIDIA A100-SXM4-80GB\",device_uuid=\"GPU-n-0\",node=\"n\"} 0.25",
        "hami_gpu_shared_count{",
        "hami_vgpu_memory_allocated_bytes{container_index=\"0\",device_uuid=\"GPU-n-0\",namespace=\"default\",node=\"n\",pod=\"x\"} 4294967296",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
}

fn fuzz_target() -> &'static (tokio::runtime::Runtime, std::net::SocketAddr) {
    static T: OnceLock<(tokio::runtime::Runtime, std::net::SocketAddr)> = OnceLock::new();
    T.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = rt.block_on(async {
            let ext = two_nodes().await;
            let addr = ext.addr;
            std::mem::forget(ext); // keep serving for the whole test binary
            addr
        });
        (rt, addr)
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-zA-Z0-9/._-]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("Pod".to_owned()),
                    Just("NodeNames".to_owned()),
                    Just("Nodes".to_owned()),
                    Just("PodName".to_owned()),
                    Just("PodUID".to_owned()),
                    Just("Node".to_owned()),
                    Just("metadata".to_owned()),
                    Just("spec".to_owned()),
                    Just("containers".to_owned()),
                    Just("resources".to_owned()),
                    Just("limits".to_owned()),
                    Just("nvidia.com/gpu".to_owned()),
                    Just("nvidia.com/gpumem".to_owned()),
                    Just("name".to_owned()),
                    Just("items".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Arbitrary bytes and arbitrary JSON at every POST verb: never a 5xx, and the server keeps
    /// answering.
    #[test]
    fn fuzz_never_5xx(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        value in json_value(),
        pod_like in json_value(),
        verb in prop_oneof![Just("/filter"), Just("/prioritize"), Just("/bind")],
    ) {
        let (rt, addr) = fuzz_target();
        rt.block_on(async {
            for body in [
                bytes.clone(),
                serde_json::to_vec(&value).expect("json"),
                serde_json::to_vec(&json!({"Pod": pod_like, "NodeNames": ["node-1", "node-2"], "Nodes": null})).expect("json"),
            ] {
                let (status, _) = http(*addr, verb, Some(body)).await;
                prop_assert!(status < 500, "{verb}: {status}");
            }
            let (status, _) = http(*addr, "/healthz", None).await;
            prop_assert_eq!(status, 200);
            Ok(())
        })?;
    }
}
