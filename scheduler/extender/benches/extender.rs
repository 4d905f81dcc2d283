//! Filter + prioritize latency at 1,000 and 5,000 nodes (synthetic 8 × A100-80GB nodes, a third of
//! their GPUs partly allocated), through the handler functions and through HTTP on loopback.
//! Reports p50/p99 per call pair and the HTTP/handler ratio; nothing is asserted.
//!
//! `cargo bench -p hami-scheduler --bench extender`

#![allow(missing_docs, clippy::unwrap_used)]

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use hami_api::{
    GpuDevice,
    annotations::{GpuUsageSample, NodeUsage},
    encode_node_register,
};
use hami_scheduler::{
    http::{App, filter_args, prioritize_args, router},
    state::Settings,
    wire::ExtenderArgs,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::{
    api::core::v1::{Container, Node, NodeStatus, Pod, PodSpec, ResourceRequirements},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

const NOW: u64 = 1_800_000_000;

fn node(i: usize) -> Node {
    let name = format!("node-{i:05}");
    let gpus: Vec<GpuDevice> = (0..8)
        .map(|g| GpuDevice::new(format!("GPU-{i}-{g}"), g, "NVIDIA-NVIDIA A100-SXM4-80GB", 81_920))
        .collect();
    let usage = NodeUsage {
        version: 1,
        heartbeat: NOW,
        gpus: gpus
            .iter()
            .map(|g| GpuUsageSample {
                uuid: g.uuid.clone(),
                used_mib: 0,
                peak_mib: 0,
                sm_percent: Some(0),
            })
            .collect(),
    };
    let ann: BTreeMap<String, String> = [
        (
            "hami.io/node-nvidia-register".to_owned(),
            encode_node_register(&gpus).unwrap(),
        ),
        ("hami.io/node-nvidia-usage".to_owned(), usage.encode().unwrap()),
    ]
    .into_iter()
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name),
            annotations: Some(ann),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            allocatable: Some(
                [("cpu", "128"), ("memory", "1Ti")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn pod(name: &str, mem: u64, cores: u32, ann: &[(&str, String)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            annotations: Some(ann.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "c".into(),
                resources: Some(ResourceRequirements {
                    limits: Some(
                        [
                            ("nvidia.com/gpu", "1".to_owned()),
                            ("nvidia.com/gpumem", mem.to_string()),
                            ("nvidia.com/gpucores", cores.to_string()),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), Quantity(v)))
                        .collect(),
                    ),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn app(n: usize) -> Arc<App> {
    let app = Arc::new(App::new(
        Settings::default(),
        None,
        b"k".to_vec(),
        Arc::new(|| NOW),
    ));
    let mut st = app.write_state();
    for i in 0..n {
        st.apply_node(&node(i));
        if i % 3 == 0 {
            let alloc = format!("GPU-{i}-0,NVIDIA,20000,30:;");
            let p = pod(
                &format!("held-{i}"),
                20_000,
                30,
                &[
                    ("hami.io/vgpu-node", format!("node-{i:05}")),
                    ("hami.io/vgpu-devices-allocated", alloc),
                    ("hami.io/bind-phase", "success".into()),
                ],
            );
            st.apply_pod(&p);
        }
    }
    drop(st);
    app
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn post(addr: std::net::SocketAddr, path: &str, body: Vec<u8>) -> Vec<u8> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "x")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap().to_bytes().to_vec()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("| nodes | path | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    for n in [1000usize, 5000] {
        let app = app(n);
        let names: Vec<String> = (0..n).map(|i| format!("node-{i:05}")).collect();
        let args = ExtenderArgs {
            pod: pod("p", 4000, 20, &[]),
            nodes: None,
            node_names: Some(names),
        };
        let iters = if n >= 5000 { 40 } else { 100 };
        let mut handler = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            let f = filter_args(&app, &args);
            let p = prioritize_args(&app, &args).unwrap();
            handler.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(f.node_names.as_ref().map(Vec::len), Some(n));
            assert_eq!(p.len(), n);
        }
        handler.sort_by(f64::total_cmp);
        let body = serde_json::to_vec(&args).unwrap();
        let mut over_http = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let r = router(Arc::clone(&app));
            tokio::spawn(async move { axum::serve(listener, r).await });
            let mut out = Vec::new();
            for _ in 0..iters {
                let t = Instant::now();
                let f = post(addr, "/filter", body.clone()).await;
                let p = post(addr, "/prioritize", body.clone()).await;
                out.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(!f.is_empty() && !p.is_empty());
            }
            out
        });
        over_http.sort_by(f64::total_cmp);
        println!(
            "| {n} | handlers (filter+prioritize) | {:.2} | {:.2} |",
            pct(&handler, 0.5),
            pct(&handler, 0.99)
        );
        println!(
            "| {n} | HTTP loopback (filter+prioritize) | {:.2} | {:.2} |",
            pct(&over_http, 0.5),
            pct(&over_http, 0.99)
        );
        println!(
            "| {n} | HTTP / handlers (p50 ratio) | {:.2}× | |",
            pct(&over_http, 0.5) / pct(&handler, 0.5)
        );
    }
}
