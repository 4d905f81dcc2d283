//! Builders and an HTTP client shared by the extender tests: GPU nodes with the agent's annotations,
//! pods asking for HAMi resources, an extender on loopback, and ground truth read from pod annotations.

#![allow(dead_code, unreachable_pub)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hami_api::{
    GpuDevice, PodDevices,
    annotations::{
        DEVICES_ALLOCATED, GpuUsageSample, NODE_NVIDIA_REGISTER, NODE_NVIDIA_USAGE, NodeUsage, VGPU_NODE,
    },
    encode_node_register,
};
use hami_scheduler::{
    http::Clock,
    server::{Running, ServeOptions, start},
    state::Settings,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::{
    api::core::v1::{Container, Node, NodeStatus, Pod, PodSpec, ResourceRequirements},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use serde_json::Value;
use tokio::net::TcpListener;

/// The tests' "now", Unix seconds.
pub const NOW: u64 = 1_800_000_000;

/// The decision key the tests sign with.
pub const KEY: &[u8] = b"test-decision-key";

/// A settable clock starting at [`NOW`].
pub fn clock() -> (Clock, Arc<AtomicU64>) {
    let t = Arc::new(AtomicU64::new(NOW));
    let c = Arc::clone(&t);
    (Arc::new(move || c.load(Ordering::SeqCst)), t)
}

/// `n` healthy GPUs `GPU-<node>-<i>` of `mib` MiB each, split 10.
pub fn gpus(node: &str, n: u32, mib: u64) -> Vec<GpuDevice> {
    (0..n)
        .map(|i| GpuDevice::new(format!("GPU-{node}-{i}"), i, "NVIDIA-NVIDIA A100-SXM4-80GB", mib))
        .collect()
}

/// A Node with the agent's register annotation for `gpus`, a fresh usage heartbeat (no measured use)
/// at [`NOW`] − 10 s, and 64 CPUs / 256 GiB allocatable.
pub fn node(name: &str, gpus: &[GpuDevice]) -> Node {
    node_with_usage(name, gpus, Some(NOW - 10), &[])
}

/// A Node like [`node`] with the given heartbeat (none: no usage annotation) and measured use per GPU
/// (`(used MiB, SM %)`, by position).
pub fn node_with_usage(name: &str, gpus: &[GpuDevice], heartbeat: Option<u64>, used: &[(u64, u32)]) -> Node {
    let mut ann = BTreeMap::new();
    ann.insert(
        NODE_NVIDIA_REGISTER.to_owned(),
        encode_node_register(gpus).expect("encodable inventory"),
    );
    if let Some(hb) = heartbeat {
        let usage = NodeUsage {
            version: 1,
            heartbeat: hb,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let (mib, sm) = used.get(i).copied().unwrap_or((0, 0));
                    GpuUsageSample {
                        uuid: g.uuid.clone(),
                        used_mib: mib,
                        peak_mib: mib,
                        sm_percent: Some(sm),
                    }
                })
                .collect(),
        };
        ann.insert(
            NODE_NVIDIA_USAGE.to_owned(),
            usage.encode().expect("encodable usage"),
        );
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(ann),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            allocatable: Some(
                [("cpu", "64"), ("memory", "256Gi")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// A container limited to these resources (`[("nvidia.com/gpu","1"), …]`).
pub fn ctr(name: &str, limits: &[(&str, &str)]) -> Container {
    Container {
        name: name.to_owned(),
        image: Some("busybox".into()),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then(|| {
                limits
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect()
            }),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    }
}

/// A container asking `count` GPUs with `mib` MiB and `cores` % each.
pub fn gpu_ctr(name: &str, count: u32, mib: u64, cores: u32) -> Container {
    ctr(
        name,
        &[
            ("nvidia.com/gpu", &count.to_string()),
            ("nvidia.com/gpumem", &mib.to_string()),
            ("nvidia.com/gpucores", &cores.to_string()),
        ],
    )
}

/// A pending pod in `default` with these init and app containers, uid `uid-<name>`.
pub fn pod_with(name: &str, init: Vec<Container>, app: Vec<Container>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            scheduler_name: Some("hami-scheduler".into()),
            init_containers: (!init.is_empty()).then_some(init),
            containers: app,
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// `pod` with exactly these annotations.
pub fn annotated(mut pod: Pod, pairs: &[(&str, &str)]) -> Pod {
    pod.metadata.annotations = Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    pod
}

/// A pod with one app container asking one GPU by share: `mem_percent` % of its memory and `cores` %
/// of its cores.
pub fn gpu_share_pod(name: &str, mem_percent: u32, cores: u32) -> Pod {
    pod_with(
        name,
        vec![],
        vec![ctr(
            "c",
            &[
                ("nvidia.com/gpu", "1"),
                ("nvidia.com/gpumem-percentage", &mem_percent.to_string()),
                ("nvidia.com/gpucores", &cores.to_string()),
            ],
        )],
    )
}

/// A pod with one app container asking `count` GPUs with `mib` MiB and `cores` % each.
pub fn gpu_pod(name: &str, count: u32, mib: u64, cores: u32) -> Pod {
    pod_with(name, vec![], vec![gpu_ctr("main", count, mib, cores)])
}

/// A pod in `namespace` bound to `node`, holding `mib` MiB and `cores` % of GPU `uuid` (decision
/// annotation as the extender writes it, bind phase `success`).
pub fn held_in(namespace: &str, name: &str, node: &str, uuid: &str, mib: u64, cores: u32) -> Pod {
    let mut p = annotated(
        gpu_pod(name, 1, mib, cores),
        &[
            (VGPU_NODE, node),
            (DEVICES_ALLOCATED, &format!("{uuid},NVIDIA,{mib},{cores}:;")),
            (hami_api::annotations::BIND_PHASE, "success"),
        ],
    );
    p.metadata.namespace = Some(namespace.to_owned());
    p.spec.as_mut().expect("spec").node_name = Some(node.to_owned());
    p
}

/// [`held_in`] the `default` namespace.
pub fn held(name: &str, node: &str, uuid: &str, mib: u64, cores: u32) -> Pod {
    held_in("default", name, node, uuid, mib, cores)
}

/// An extender on a free loopback port, signing with [`KEY`], default serve options; not waiting
/// for its reflectors.
pub async fn start_on_loopback(settings: Settings, client: Option<kube::Client>, clock: Clock) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start(
        settings,
        client,
        KEY.to_vec(),
        clock,
        listener,
        ServeOptions::default(),
    )
    .await
    .expect("start")
}

/// An extender without an API client (filter and prioritize only), state filled with `nodes`.
pub async fn offline_extender(settings: Settings, nodes: &[Node]) -> Running {
    let (clock, _) = clock();
    let running = start_on_loopback(settings, None, clock).await;
    {
        let mut st = running.app.write_state();
        for n in nodes {
            assert!(st.apply_node(n).is_empty());
        }
    }
    running
}

/// An extender against a (fake) API server, ready (reflectors synced).
pub async fn extender(client: kube::Client, settings: Settings, clock: Clock) -> Running {
    let running = start_on_loopback(settings, Some(client), clock).await;
    assert!(
        running.wait_ready(Duration::from_secs(10)).await,
        "reflectors synced"
    );
    running
}

/// POSTs `body` to `http://addr{path}` (or GETs when `body` is `None`); returns status and body.
pub async fn http(addr: std::net::SocketAddr, path: &str, body: Option<Vec<u8>>) -> (u16, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = match body {
        Some(b) => http::Request::post(path)
            .header("host", "extender")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(b))),
        None => http::Request::get(path)
            .header("host", "extender")
            .body(Full::new(Bytes::new())),
    }
    .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, bytes.to_vec())
}

/// POSTs JSON and decodes the JSON reply; panics unless the status is 200.
pub async fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Value {
    let (status, bytes) = http(addr, path, Some(serde_json::to_vec(body).expect("json"))).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).expect("JSON reply")
}

/// `/filter` of `pod` over the node names `nodes` (the `ExtenderFilterResult`).
pub async fn filter(ext: &Running, pod: &Pod, nodes: &[&str]) -> Value {
    post(ext.addr, "/filter", &args_names(pod, nodes)).await
}

/// `/bind` of `pod` to `node`; its `Error` field (empty on success).
pub async fn bind(ext: &Running, pod: &Pod, node: &str) -> String {
    post(ext.addr, "/bind", &bind_args(pod, node)).await["Error"]
        .as_str()
        .expect("Error field")
        .to_owned()
}

/// The host with the highest score in a `HostPriorityList`.
pub fn best(priorities: &Value) -> String {
    priorities
        .as_array()
        .and_then(|a| a.iter().max_by_key(|h| h["Score"].as_i64()))
        .and_then(|h| h["Host"].as_str())
        .expect("a host")
        .to_owned()
}

/// `ExtenderArgs` with node names (nodeCacheCapable true).
pub fn args_names(pod: &Pod, nodes: &[&str]) -> Value {
    serde_json::json!({"Pod": pod, "Nodes": null, "NodeNames": nodes})
}

/// `ExtenderBindingArgs`.
pub fn bind_args(pod: &Pod, node: &str) -> Value {
    serde_json::json!({
        "PodName": pod.metadata.name,
        "PodNamespace": pod.metadata.namespace,
        "PodUID": pod.metadata.uid,
        "Node": node,
    })
}

/// Ground truth from pod annotations: per GPU UUID (slots, MiB, cores) over pods that are bound
/// (`spec.nodeName`) and carry `hami.io/vgpu-devices-allocated`. Per pod and GPU the charge is the
/// larger of the biggest init container and the sum of the app containers, per dimension, as
/// Kubernetes runs them (init containers one at a time, then the apps together; the tests use no
/// sidecars). Also checks that no container got one GPU twice.
pub fn ground_truth(pods: &[Pod]) -> BTreeMap<String, (u32, u64, u32)> {
    let mut out: BTreeMap<String, (u32, u64, u32)> = BTreeMap::new();
    for p in pods {
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let bound = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let (Some(alloc), Some(node)) = (ann.get(DEVICES_ALLOCATED), ann.get(VGPU_NODE)) else {
            continue;
        };
        assert_eq!(
            bound,
            Some(node.as_str()),
            "a pod with a decision is bound to its node"
        );
        let inits = p
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .map_or(0, Vec::len);
        let devices = PodDevices::decode(alloc).expect("valid annotation");
        let mut init_peak: BTreeMap<String, (u32, u64, u32)> = BTreeMap::new();
        let mut apps: BTreeMap<String, (u32, u64, u32)> = BTreeMap::new();
        for (i, c) in devices.0.iter().enumerate() {
            let mut seen = std::collections::BTreeSet::new();
            for d in &c.0 {
                assert!(seen.insert(&d.uuid), "one container got GPU {} twice", d.uuid);
                if i < inits {
                    let e = init_peak.entry(d.uuid.clone()).or_default();
                    *e = (e.0.max(1), e.1.max(d.memory_mib), e.2.max(d.cores));
                } else {
                    let e = apps.entry(d.uuid.clone()).or_default();
                    *e = (e.0 + 1, e.1 + d.memory_mib, e.2 + d.cores);
                }
            }
        }
        for (uuid, a) in apps {
            let i = init_peak.remove(&uuid).unwrap_or_default();
            let e = out.entry(uuid).or_default();
            *e = (e.0 + a.0.max(i.0), e.1 + a.1.max(i.1), e.2 + a.2.max(i.2));
        }
        for (uuid, i) in init_peak {
            let e = out.entry(uuid).or_default();
            *e = (e.0 + i.0, e.1 + i.1, e.2 + i.2);
        }
    }
    out
}

/// The GPUs with any allocation (drops idle ones), for comparing books with [`ground_truth`].
pub fn busy(usage: BTreeMap<String, (u32, u64, u32)>) -> BTreeMap<String, (u32, u64, u32)> {
    usage.into_iter().filter(|(_, u)| *u != (0, 0, 0)).collect()
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
