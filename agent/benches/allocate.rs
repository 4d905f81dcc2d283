//! Pods per second through the device plugin's Allocate for N pods bound to one node, with a
//! HAMi-style node lock and without one (this plugin), in the same run on the same plugin.
//!
//! * Scheduler (emulated): binds pods to the node by creating them with `spec.nodeName` and the
//!   signed decision annotations through the fake API server. With the lock it first takes
//!   `hami.io/mutex.lock` on the node (merge patch with `resourceVersion` precondition, retried every
//!   `HAMI_BENCH_LOCK_POLL_MS` while held), as HAMi's Bind does.
//! * Kubelet (emulated): sees each bound pod `HAMI_BENCH_KUBELET_DELAY_MS` after its bind (watch
//!   propagation), then, one pod at a time as the kubelet admits them, calls GetPreferredAllocation
//!   and Allocate over the plugin's unix socket. With the lock it then releases it (HAMi's plugin does
//!   that at the end of Allocate).
//!
//! `cargo bench -p hami-agent --bench allocate` (`HAMI_BENCH_PODS`, default 200). Prints pods/s for
//! both and the ratio.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hami_agent::deviceplugin::devices::Gpu;
use hami_agent::deviceplugin::kubelet::unix_channel;
use hami_agent::deviceplugin::proto::{self, device_plugin_client::DevicePluginClient};
use hami_agent::deviceplugin::response::HostLayout;
use hami_agent::deviceplugin::{DevicePlugin, DevicePluginConfig, PluginSettings};
use hami_api::annotations::{self as ann, sign_decision};
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

const NODE: &str = "bench-node";
const KEY: &[u8] = b"bench-key";
const GPUS: u32 = 4;
const SPLIT: u32 = 100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uuid(g: u32) -> String {
    format!("GPU-bench-{g:04}")
}

/// Pod `i` of run `run`, created unbound (before the clock starts).
fn new_pod(run: &str, i: u32) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{run}-{i}"), "namespace": "bench"},
        "spec": {"containers": [{"name": "main", "image": "cuda"}]}
    }))
    .unwrap()
}

/// The scheduler's bind of pod `i` (UID `uid`): 1 GPU (`i % GPUS`), the same entry for every pod on
/// a GPU, signed; then the Binding.
async fn bind(pods: &Api<Pod>, name: &str, uid: &str, i: u32) {
    let value = format!("{},NVIDIA,1000,25:;", uuid(i % GPUS));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {
        ann::VGPU_NODE: NODE,
        ann::VGPU_TIME: now,
        ann::DEVICES_TO_ALLOCATE: value,
        ann::DEVICES_ALLOCATED: value,
        ann::BIND_PHASE: "allocating",
        ann::BIND_TIME: now,
        ann::DECISION_SIGNATURE: sign_decision(KEY, uid, NODE, &value),
    }}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let binding = serde_json::json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name}, "target": {"kind": "Node", "name": NODE}});
    let _: serde_json::Value = pods
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await
        .unwrap();
}

/// Takes the node lock (HAMi's Bind): waits while it is held.
async fn lock(nodes: &Api<Node>, owner: &str, poll: Duration) {
    loop {
        let node = nodes.get(NODE).await.unwrap();
        let held = node
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ann::NODE_LOCK));
        if !held {
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": node.metadata.resource_version,
                "annotations": {ann::NODE_LOCK: owner}}});
            if nodes
                .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                return;
            }
        }
        tokio::time::sleep(poll).await;
    }
}

async fn unlock(nodes: &Api<Node>) {
    let patch = serde_json::json!({"metadata": {"annotations": {ann::NODE_LOCK: null}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// One run: N pods through bind and Allocate. Returns (seconds, failed Allocates).
async fn run(
    api: &FakeApiServer,
    client: &mut DevicePluginClient<tonic::transport::Channel>,
    name: &str,
    pods: u32,
    with_lock: bool,
) -> (f64, u32) {
    let kube = api.client();
    let pod_api: Api<Pod> = Api::namespaced(kube.clone(), "bench");
    let nodes: Api<Node> = Api::all(kube);
    let delay = Duration::from_millis(env_u64("HAMI_BENCH_KUBELET_DELAY_MS", 10));
    let poll = Duration::from_millis(env_u64("HAMI_BENCH_LOCK_POLL_MS", 5));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut created = Vec::new();
    for i in 0..pods {
        let p = pod_api
            .create(&PostParams::default(), &new_pod(name, i))
            .await
            .unwrap();
        created.push((p.metadata.name.unwrap(), p.metadata.uid.unwrap()));
    }
    let start = Instant::now();
    let scheduler = {
        let pod_api = pod_api.clone();
        let nodes = nodes.clone();
        tokio::spawn(async move {
            for (i, (pod, uid)) in (0..pods).zip(created) {
                if with_lock {
                    lock(&nodes, &format!("bench,{pod}"), poll).await;
                }
                bind(&pod_api, &pod, &uid, i).await;
                tx.send(Instant::now()).unwrap();
            }
        })
    };
    let mut used: BTreeSet<String> = BTreeSet::new();
    let all: Vec<String> = (0..GPUS)
        .flat_map(|g| (0..SPLIT).map(move |n| format!("{}-{n}", uuid(g))))
        .collect();
    let mut failed = 0;
    for _ in 0..pods {
        let bound_at = rx.recv().await.unwrap();
        tokio::time::sleep_until((bound_at + delay).into()).await;
        let available: Vec<String> = all.iter().filter(|i| !used.contains(*i)).cloned().collect();
        let pref = client
            .get_preferred_allocation(proto::PreferredAllocationRequest {
                container_requests: vec![proto::ContainerPreferredAllocationRequest {
                    available_device_i_ds: available,
                    must_include_device_i_ds: Vec::new(),
                    allocation_size: 1,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        let ids = pref.container_responses[0].device_i_ds.clone();
        used.extend(ids.iter().cloned());
        let r = client
            .allocate(proto::AllocateRequest {
                container_requests: vec![proto::ContainerAllocateRequest { devices_ids: ids }],
            })
            .await;
        if let Err(e) = r {
            if failed == 0 {
                eprintln!("{name}: first failed Allocate: {}", e.message());
            }
            failed += 1;
        }
        if with_lock {
            unlock(&nodes).await;
        }
    }
    scheduler.await.unwrap();
    (start.elapsed().as_secs_f64(), failed)
}

fn main() {
    let pods = u32::try_from(env_u64("HAMI_BENCH_PODS", 200)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("hami-bench-allocate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plugin_dir = dir.join("device-plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        std::fs::write(dir.join("key"), KEY).unwrap();
        let api = FakeApiServer::start().await.unwrap();
        api.insert_node(serde_json::from_value(serde_json::json!({"metadata": {"name": NODE}})).unwrap());
        let config = DevicePluginConfig {
            enabled: true,
            plugin_dir: plugin_dir.clone(),
            split_count: SPLIT,
            decision_key_file: dir.join("key"),
            watch_interval_ms: 1000,
            ..DevicePluginConfig::default()
        };
        let settings = PluginSettings {
            node: NODE.into(),
            host: HostLayout {
                libvgpu: dir.join("libvgpu.so"),
                ld_so_preload: None,
                regions_dir: dir.join("regions"),
                host_regions_dir: dir.join("regions"),
                dev_dir: "/dev".into(),
            },
            config: config.clone(),
        };
        let gpus = (0..GPUS)
            .map(|g| Gpu {
                uuid: uuid(g),
                minor: g,
                numa: None,
                healthy: true,
            })
            .collect();
        let (_inventory, rx) = tokio::sync::watch::channel(gpus);
        let plugin = DevicePlugin::start(settings, rx, api.client()).unwrap();
        let socket = plugin.socket().to_path_buf();
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut client = DevicePluginClient::new(unix_channel(&socket).await.unwrap());
        // Warm-up (connections, caches).
        let _ = run(&api, &mut client, "warm", 5, false).await;
        let (locked_s, locked_failed) = run(&api, &mut client, "lock", pods, true).await;
        let (free_s, free_failed) = run(&api, &mut client, "free", pods, false).await;
        let locked_rate = f64::from(pods) / locked_s;
        let free_rate = f64::from(pods) / free_s;
        println!(
            "allocate: {pods} pods bound concurrently to one node (kubelet delay {} ms, lock poll {} ms)",
            env_u64("HAMI_BENCH_KUBELET_DELAY_MS", 10),
            env_u64("HAMI_BENCH_LOCK_POLL_MS", 5)
        );
        println!(
            "  HAMi-style node lock : {locked_rate:8.1} pods/s ({locked_s:.3} s, {locked_failed} failed)"
        );
        println!("  no lock (this plugin): {free_rate:8.1} pods/s ({free_s:.3} s, {free_failed} failed)");
        println!("  ratio no-lock / lock : {:.2}x", free_rate / locked_rate);
        plugin.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
