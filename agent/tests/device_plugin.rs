//! The kubelet device plugin against a test kubelet (a tonic `Registration` server on `kubelet.sock`
//! in a temporary directory, and a `DevicePlugin` client over the plugin's own socket) and the fake API
//! server holding the scheduler's decisions (`reference/kubernetes-testing.md` §4).
//!
//! The plugin runs in-process ([`DevicePlugin::start`]) with an inventory channel the tests drive,
//! except in `the_agent_binary_serves_the_plugin_and_follows_gpu_health_c05`, where it runs inside the
//! real `hami-agent run` on the simulated GPU node (fake NVML for inventory and health, failures
//! injected through the node's control file; privileged, skipped with a reason without root).

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kubelet::{TestKubelet, allocate, devices, mounts, next, preferred};
use hami_agent::deviceplugin::devices::Gpu;
use hami_agent::deviceplugin::proto::{self, device_plugin_client::DevicePluginClient};
use hami_agent::deviceplugin::response::HostLayout;
use hami_agent::deviceplugin::{DevicePlugin, DevicePluginConfig, PluginSettings};
use hami_api::annotations::{self as ann, sign_decision};
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tonic::transport::Channel;

const NODE: &str = "node-1";
const KEY: &[u8] = b"decision-key";
const SPLIT: u32 = 4;
const GPU_A: &str = "GPU-aaaaaaaa-1111-2222-3333-444444444444";
const GPU_B: &str = "GPU-bbbbbbbb-1111-2222-3333-444444444444";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One test's plugin, kubelet and API server.
struct Rig {
    api: FakeApiServer,
    kubelet: TestKubelet,
    inventory: watch::Sender<Vec<Gpu>>,
    plugin: DevicePlugin,
    plugin_dir: PathBuf,
    regions_dir: PathBuf,
    dev_dir: PathBuf,
    config: DevicePluginConfig,
    _scratch: Scratch,
}

fn gpus() -> Vec<Gpu> {
    vec![
        Gpu {
            uuid: GPU_A.into(),
            minor: 0,
            numa: Some(0),
            healthy: true,
        },
        Gpu {
            uuid: GPU_B.into(),
            minor: 1,
            numa: Some(1),
            healthy: true,
        },
    ]
}

impl Rig {
    async fn new(test: &str) -> Self {
        Self::with(test, gpus(), SPLIT).await
    }

    /// A rig advertising `gpus`, `split` replicas each.
    async fn with(test: &str, gpus: Vec<Gpu>, split: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("hami-dp-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plugin_dir = dir.join("device-plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        let key_file = dir.join("key");
        // A mounted Secret may end with a newline.
        std::fs::write(&key_file, [KEY, b"\n"].concat()).unwrap();
        let config = DevicePluginConfig {
            enabled: true,
            plugin_dir: plugin_dir.clone(),
            socket_name: "hami-test.sock".into(),
            resource_name: "nvidia.com/gpu".into(),
            split_count: split,
            libvgpu_host_path: dir.join("lib/libvgpu.so"),
            ld_so_preload_host_path: Some(dir.join("lib/ld.so.preload")),
            decision_key_file: key_file,
            watch_interval_ms: 50,
            health_interval_ms: 50,
            cache_wait_ms: 300,
            consistent_allocate: true,
            host_dev_dir: dir.join("dev"),
            host_regions_dir: None,
            on_region_error: hami_api::region::RegionFailure::Closed,
        };
        let regions_dir = dir.join("regions");
        let dev_dir = dir.join("dev");
        let settings = PluginSettings {
            node: NODE.into(),
            config: config.clone(),
            host: HostLayout {
                libvgpu: config.libvgpu_host_path.clone(),
                ld_so_preload: config.ld_so_preload_host_path.clone(),
                regions_dir: regions_dir.clone(),
                host_regions_dir: regions_dir.clone(),
                dev_dir: dev_dir.clone(),
            },
        };
        let api = FakeApiServer::start().await.unwrap();
        let kubelet = TestKubelet::start(&plugin_dir);
        let (inventory, rx) = watch::channel(gpus);
        let plugin = DevicePlugin::start(settings, rx, api.client()).unwrap();
        Self {
            api,
            kubelet,
            inventory,
            plugin,
            plugin_dir,
            regions_dir,
            dev_dir,
            config,
            _scratch: Scratch(dir),
        }
    }

    /// Waits for the registration and connects to the plugin socket it names.
    async fn connect(&mut self) -> (proto::RegisterRequest, DevicePluginClient<Channel>) {
        self.kubelet.connect().await
    }
}

/// A pod bound to `NODE` with these init and app containers and annotations.
fn pod(name: &str, init: &[&str], app: &[&str], annotations: &[(&str, String)]) -> Pod {
    let ctr = |n: &&str| serde_json::json!({"name": n, "image": "cuda"});
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name, "namespace": "ml", "uid": format!("uid-{name}"),
            "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<BTreeMap<_, _>>(),
        },
        "spec": {
            "nodeName": NODE, "schedulerName": "hami-scheduler",
            "initContainers": init.iter().map(ctr).collect::<Vec<_>>(),
            "containers": app.iter().map(ctr).collect::<Vec<_>>(),
        }
    }))
    .unwrap()
}

/// The annotations the scheduler writes at bind, signed with `key` for `uid`.
fn decision(value: &str, bind_time: u64, key: &[u8], uid: &str) -> Vec<(&'static str, String)> {
    vec![
        (ann::VGPU_NODE, NODE.into()),
        (ann::VGPU_TIME, bind_time.to_string()),
        (ann::DEVICES_TO_ALLOCATE, value.into()),
        (ann::DEVICES_ALLOCATED, value.into()),
        (ann::BIND_PHASE, "allocating".into()),
        (ann::BIND_TIME, bind_time.to_string()),
        (ann::DECISION_SIGNATURE, sign_decision(key, uid, NODE, value)),
    ]
}

/// A single-container pod with a signed decision.
fn signed_pod(name: &str, value: &str, bind_time: u64) -> Pod {
    pod(
        name,
        &[],
        &["main"],
        &decision(value, bind_time, KEY, &format!("uid-{name}")),
    )
}

fn annotation(api: &FakeApiServer, name: &str, key: &str) -> Option<String> {
    api.pod("ml", name)
        .and_then(|p| p.metadata.annotations)
        .and_then(|a| a.get(key).cloned())
}

fn all_ids() -> Vec<String> {
    [GPU_A, GPU_B]
        .iter()
        .flat_map(|u| (0..SPLIT).map(move |n| format!("{u}-{n}")))
        .collect()
}

fn id(uuid: &str, n: u32) -> String {
    format!("{uuid}-{n}")
}

fn env(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The registration the plugin sends the kubelet: v1beta1, socket `hami-test.sock`, `nvidia.com/gpu`,
/// PreStartContainer and GetPreferredAllocation on.
fn registration() -> proto::RegisterRequest {
    proto::RegisterRequest {
        version: "v1beta1".into(),
        endpoint: "hami-test.sock".into(),
        resource_name: "nvidia.com/gpu".into(),
        options: Some(proto::DevicePluginOptions {
            pre_start_required: true,
            get_preferred_allocation_available: true,
        }),
    }
}

#[tokio::test]
async fn registers_and_advertises_replicas_with_health_and_numa() {
    let mut rig = Rig::new("register").await;
    let (reg, mut c) = rig.connect().await;
    assert_eq!(reg, registration());
    assert_eq!(rig.plugin.socket(), rig.plugin_dir.join("hami-test.sock"));
    let opts = c
        .get_device_plugin_options(proto::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.pre_start_required && opts.get_preferred_allocation_available);

    let mut stream = c.list_and_watch(proto::Empty {}).await.unwrap().into_inner();
    let health = |m: &proto::ListAndWatchResponse| -> Vec<(String, String, Vec<i64>)> {
        m.devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    d.health.clone(),
                    d.topology
                        .iter()
                        .flat_map(|t| t.nodes.iter().map(|n| n.id))
                        .collect(),
                )
            })
            .collect()
    };
    let expect = |b_health: &str| -> Vec<(String, String, Vec<i64>)> {
        all_ids()
            .into_iter()
            .map(|i| {
                let on_b = i.starts_with(GPU_B);
                (
                    i,
                    if on_b { b_health } else { "Healthy" }.to_owned(),
                    vec![i64::from(on_b)],
                )
            })
            .collect()
    };
    assert_eq!(health(&next(&mut stream).await), expect("Healthy"));

    // C05: GPU B fails and comes back; both changes are pushed, no restart.
    rig.inventory.send_modify(|g| g[1].healthy = false);
    assert_eq!(health(&next(&mut stream).await), expect("Unhealthy"));
    rig.inventory.send_modify(|g| g[1].healthy = true);
    assert_eq!(health(&next(&mut stream).await), expect("Healthy"));

    let pre = c
        .pre_start_container(proto::PreStartContainerRequest {
            devices_ids: vec![id(GPU_A, 0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pre, proto::PreStartContainerResponse {});
    assert_eq!(rig.plugin.metrics().registrations.get(), 1);
}

#[tokio::test]
async fn allocates_a_multi_container_pod_in_kubelet_order() {
    let mut rig = Rig::new("multi").await;
    let (_, mut c) = rig.connect().await;
    // Init container: 1000 MiB, 10 % of A. App `train`: A and B. App `sidecar`: no GPU.
    let value = format!("{GPU_A},NVIDIA,1000,10:;{GPU_A},NVIDIA,2000,30:{GPU_B},NVIDIA,3000,0:;;");
    rig.api.insert_pod(pod(
        "job",
        &["warmup"],
        &["train", "sidecar"],
        &decision(&value, 100, KEY, "uid-job"),
    ));

    // The kubelet: the init container first (preference, then Allocate).
    let init_ids = preferred(&mut c, &all_ids(), &[], 1).await;
    assert_eq!(init_ids.len(), 1);
    assert!(init_ids[0].starts_with(GPU_A), "{init_ids:?}");
    let init = allocate(&mut c, &init_ids).await.unwrap();
    let lib = rig.config.libvgpu_host_path.to_string_lossy().into_owned();
    let preload = rig
        .config
        .ld_so_preload_host_path
        .as_ref()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let dev = |n: &str| {
        (
            format!("/dev/{n}"),
            rig.dev_dir.join(n).to_string_lossy().into_owned(),
            "rw".to_owned(),
        )
    };
    let region = |ctr: &str| rig.regions_dir.join(format!("uid-job_{ctr}"));
    assert_eq!(
        init.envs,
        env(&[
            ("NVIDIA_VISIBLE_DEVICES", GPU_A),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "1000m"),
            ("CUDA_DEVICE_SM_LIMIT", "10"),
            ("CUDA_TASK_PRIORITY", "1"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/usr/local/vgpu/vgpu.cache"),
        ])
    );
    assert_eq!(
        mounts(&init),
        [
            (
                "/usr/local/vgpu".to_owned(),
                region("warmup").to_string_lossy().into_owned(),
                false
            ),
            (
                "/usr/local/vgpu/limits".to_owned(),
                format!("{}.limits", region("warmup").display()),
                true
            ),
            ("/usr/local/vgpu/libvgpu.so".to_owned(), lib.clone(), true),
            ("/etc/ld.so.preload".to_owned(), preload.clone(), true),
        ]
    );
    assert_eq!(
        devices(&init),
        [dev("nvidiactl"), dev("nvidia-uvm"), dev("nvidia0")]
    );
    // The trusted limits file the interceptor and the kernel hard limit read: the decision's limits,
    // read-only, beside the tenant-writable region directory.
    let limits_file = format!("{}.limits", region("warmup").display());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&limits_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o444);
    let limits = hami_api::region::TrustedLimits::parse(&std::fs::read(&limits_file).unwrap()).unwrap();
    let d = &limits.devices;
    assert_eq!(
        (d.len(), d[0].uuid.as_str(), d[0].memory_bytes, d[0].sm_percent),
        (1, GPU_A, 1000 << 20, 10)
    );
    assert_eq!(limits.on_region_error, hami_api::region::RegionFailure::Closed);
    assert_eq!(
        annotation(&rig.api, "job", ann::DEVICES_TO_ALLOCATE).as_deref(),
        Some(format!(";{GPU_A},NVIDIA,2000,30:{GPU_B},NVIDIA,3000,0:;;").as_str())
    );
    assert_eq!(
        annotation(&rig.api, "job", ann::BIND_PHASE).as_deref(),
        Some("allocating")
    );

    // App `train`: the kubelet reuses the init container's device and asks for one more.
    let train_ids = preferred(&mut c, &all_ids(), &init_ids, 2).await;
    assert_eq!(train_ids[0], init_ids[0]);
    assert!(train_ids[1].starts_with(GPU_B), "{train_ids:?}");
    let train = allocate(&mut c, &train_ids).await.unwrap();
    assert_eq!(
        train.envs,
        env(&[
            ("NVIDIA_VISIBLE_DEVICES", &format!("{GPU_A},{GPU_B}")),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "2000m"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "3000m"),
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("CUDA_TASK_PRIORITY", "1"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/usr/local/vgpu/vgpu.cache"),
        ])
    );
    assert_eq!(
        mounts(&train)[0],
        (
            "/usr/local/vgpu".to_owned(),
            region("train").to_string_lossy().into_owned(),
            false
        )
    );
    assert_eq!(
        devices(&train),
        [
            dev("nvidiactl"),
            dev("nvidia-uvm"),
            dev("nvidia0"),
            dev("nvidia1")
        ]
    );
    // Every entry handed out: emptied, and the bind succeeded. `sidecar` never reached Allocate.
    assert_eq!(
        annotation(&rig.api, "job", ann::DEVICES_TO_ALLOCATE).as_deref(),
        Some(";;;")
    );
    assert_eq!(
        annotation(&rig.api, "job", ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(
        annotation(&rig.api, "job", ann::DEVICES_ALLOCATED).as_deref(),
        Some(value.as_str()),
        "the durable record is untouched"
    );
    assert!(region("warmup").is_dir() && region("train").is_dir());
    assert!(!region("sidecar").exists());
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(region("train")).unwrap().permissions().mode() & 0o777,
        0o777
    );
    // The patches carried the resourceVersion precondition.
    let patches: Vec<serde_json::Value> = rig
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .filter_map(|r| r.body_json())
        .collect();
    assert_eq!(patches.len(), 2);
    assert!(
        patches
            .iter()
            .all(|p| p["metadata"]["resourceVersion"].is_string()),
        "{patches:?}"
    );
    // Nothing is left to allocate for this pod.
    let e = allocate(&mut c, &[id(GPU_A, 3)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(rig.plugin.metrics().allocations("ok"), 2);
    assert_eq!(rig.plugin.metrics().allocations("not_found"), 1);
}

/// C20: eight GPUs advertised as ten replicas each; a container's decision names all eight. The
/// preferred allocation is one replica of each decided GPU, and Allocate then serves exactly those
/// eight (env, limits, device files). A kubelet that picks 4 replicas of GPU 0, 2 of GPU 1 and one
/// each of GPUs 2 and 3 (8 IDs on 4 physical GPUs) gets a clear refusal, never a
/// container with 4 GPUs, and the decision stays pending.
#[tokio::test]
async fn c20_a_multi_gpu_container_gets_exactly_the_decided_gpus() {
    let uuids: Vec<String> = (0..8)
        .map(|i| format!("GPU-c20c20c2-0000-0000-0000-00000000000{i}"))
        .collect();
    let gs: Vec<Gpu> = uuids
        .iter()
        .zip(0u32..)
        .map(|(u, minor)| Gpu {
            uuid: u.clone(),
            minor,
            numa: Some(i64::from(minor / 4)),
            healthy: true,
        })
        .collect();
    let mut rig = Rig::with("c20", gs, 10).await;
    let (_, mut c) = rig.connect().await;
    let value: String = uuids
        .iter()
        .map(|u| format!("{u},NVIDIA,1000,10:"))
        .collect::<String>()
        + ";";
    rig.api.insert_pod(signed_pod("tp8", &value, 100));
    let all: Vec<String> = uuids
        .iter()
        .flat_map(|u| (0..10).map(move |n| id(u, n)))
        .collect();

    let collapsed = [
        id(&uuids[0], 0),
        id(&uuids[0], 1),
        id(&uuids[0], 2),
        id(&uuids[0], 3),
        id(&uuids[1], 0),
        id(&uuids[1], 1),
        id(&uuids[2], 0),
        id(&uuids[3], 0),
    ];
    let e = allocate(&mut c, &collapsed).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("8 replica IDs on only 4 physical GPU(s)"),
        "{}",
        e.message()
    );
    assert_eq!(
        annotation(&rig.api, "tp8", ann::BIND_PHASE).as_deref(),
        Some("allocating"),
        "the decision is still pending"
    );

    let ids = preferred(&mut c, &all, &[], 8).await;
    let mut got: Vec<String> = ids
        .iter()
        .map(|i| i.rsplit_once('-').unwrap().0.to_owned())
        .collect();
    got.sort();
    assert_eq!(got, uuids, "one replica of each decided GPU: {ids:?}");
    let r = allocate(&mut c, &ids).await.unwrap();
    let mut visible: Vec<&str> = r.envs["NVIDIA_VISIBLE_DEVICES"].split(',').collect();
    visible.sort_unstable();
    assert_eq!(visible, uuids.iter().map(String::as_str).collect::<Vec<_>>());
    for i in 0..8 {
        assert_eq!(r.envs[&format!("CUDA_DEVICE_MEMORY_LIMIT_{i}")], "1000m");
    }
    let mut nodes: Vec<String> = devices(&r).into_iter().map(|(c, _, _)| c).collect();
    nodes.sort();
    let mut want: Vec<String> = (0..8).map(|m| format!("/dev/nvidia{m}")).collect();
    want.extend(["/dev/nvidia-uvm".to_owned(), "/dev/nvidiactl".to_owned()]);
    want.sort();
    assert_eq!(nodes, want);
    let limits = std::fs::read(rig.regions_dir.join("uid-tp8_main.limits")).unwrap();
    let limits = hami_api::region::TrustedLimits::parse(&limits).unwrap();
    assert_eq!(limits.devices.len(), 8);
    assert_eq!(
        annotation(&rig.api, "tp8", ann::BIND_PHASE).as_deref(),
        Some("success")
    );
}

/// `nvidia.com/priority` reaches the container as HAMi's `CUDA_TASK_PRIORITY` and, for the agent's
/// priority rule, the trusted limits file; a container without it is low priority (1, HAMi's default).
#[tokio::test]
async fn task_priority_reaches_the_env_and_the_trusted_limits() {
    let mut rig = Rig::new("priority").await;
    let (_, mut c) = rig.connect().await;
    let mut p = signed_pod("urgent", &format!("{GPU_A},NVIDIA,1000,30:;"), 100);
    p.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({"limits": {
            "nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000", "nvidia.com/priority": "0"
        }}))
        .unwrap(),
    );
    rig.api.insert_pod(p);
    rig.api
        .insert_pod(signed_pod("batch", &format!("{GPU_B},NVIDIA,1000,30:;"), 100));
    for (pod, gpu, want) in [("urgent", GPU_A, 0), ("batch", GPU_B, 1)] {
        let r = allocate(&mut c, &[id(gpu, 0)]).await.unwrap();
        assert_eq!(r.envs["CUDA_TASK_PRIORITY"], want.to_string(), "{pod}");
        let file = rig.regions_dir.join(format!("uid-{pod}_main.limits"));
        let t = hami_api::region::TrustedLimits::parse(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(t.priority, want, "{pod}");
    }
}

/// C29 at the last line of defence: a signed decision that gives a GPU 0 MiB (no scheduler of ours
/// writes one) is refused by Allocate, naming the GPU; no limits file or region is written.
#[tokio::test]
async fn c29_a_zero_mib_decision_is_refused_by_allocate() {
    let mut rig = Rig::new("c29").await;
    let (_, mut c) = rig.connect().await;
    rig.api
        .insert_pod(signed_pod("zero", &format!("{GPU_A},NVIDIA,0,10:;"), 100));
    let e = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap_err();
    assert!(
        e.message().contains("0 MiB") && e.message().contains(GPU_A),
        "{e:?}"
    );
    assert!(!rig.regions_dir.join("uid-zero_main.limits").exists());
    assert!(!rig.regions_dir.join("uid-zero_main").exists());
}

#[tokio::test]
async fn c19_allocate_for_b_gets_bs_decision_and_leaves_as_region_alone() {
    let mut rig = Rig::new("c19").await;
    let (_, mut c) = rig.connect().await;
    // A was bound first (GPU A), B later (GPU B); both pending.
    rig.api
        .insert_pod(signed_pod("a", &format!("{GPU_A},NVIDIA,1000,10:;"), 100));
    rig.api
        .insert_pod(signed_pod("b", &format!("{GPU_B},NVIDIA,2000,20:;"), 200));
    // A's region directory already holds a running container's region file.
    let a_dir = rig.regions_dir.join("uid-a_main");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::write(a_dir.join("vgpu.cache"), b"A's region").unwrap();

    let pref = preferred(&mut c, &all_ids()[SPLIT as usize..], &[], 1).await;
    assert!(pref[0].starts_with(GPU_B), "{pref:?}");
    let r = allocate(&mut c, &[id(GPU_B, 2)]).await.unwrap();
    assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], GPU_B);
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "2000m");
    assert_eq!(
        r.mounts[0].host_path,
        rig.regions_dir.join("uid-b_main").to_string_lossy()
    );
    assert_eq!(
        annotation(&rig.api, "b", ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(
        annotation(&rig.api, "a", ann::BIND_PHASE).as_deref(),
        Some("allocating"),
        "A is untouched"
    );
    assert_eq!(std::fs::read(a_dir.join("vgpu.cache")).unwrap(), b"A's region");

    // A's own Allocate then gets A's decision, and its existing directory is kept as it is.
    let r = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap();
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    assert_eq!(r.mounts[0].host_path, a_dir.to_string_lossy());
    assert_eq!(std::fs::read(a_dir.join("vgpu.cache")).unwrap(), b"A's region");
}

#[tokio::test]
async fn different_pending_decisions_on_one_gpu_are_ambiguous_and_retryable() {
    let mut rig = Rig::new("ambiguous").await;
    let (_, mut c) = rig.connect().await;
    rig.api
        .insert_pod(signed_pod("a", &format!("{GPU_A},NVIDIA,1000,10:;"), 100));
    rig.api
        .insert_pod(signed_pod("b", &format!("{GPU_A},NVIDIA,4000,50:;"), 200));
    let e = allocate(&mut c, &[id(GPU_A, 1)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("ml/a") && e.message().contains("ml/b") && e.message().contains("retry"),
        "{}",
        e.message()
    );
    for p in ["a", "b"] {
        assert_eq!(
            annotation(&rig.api, p, ann::BIND_PHASE).as_deref(),
            Some("allocating")
        );
    }
    assert!(!rig.regions_dir.join("uid-a_main").exists());
    assert_eq!(rig.plugin.metrics().allocations("ambiguous"), 1);
    // Once B is gone, the retry is unambiguous.
    rig.api.delete_pod("ml", "b");
    let mut r = allocate(&mut c, &[id(GPU_A, 1)]).await;
    for _ in 0..50 {
        if r.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = allocate(&mut c, &[id(GPU_A, 1)]).await;
    }
    assert_eq!(r.unwrap().envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
}

#[tokio::test]
async fn identical_pending_decisions_are_handed_out_one_each() {
    let mut rig = Rig::new("identical").await;
    let (_, mut c) = rig.connect().await;
    let v = format!("{GPU_A},NVIDIA,1000,10:;");
    rig.api.insert_pod(signed_pod("late", &v, 300));
    rig.api.insert_pod(signed_pod("early", &v, 100));
    let first = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap();
    let second = allocate(&mut c, &[id(GPU_A, 1)]).await.unwrap();
    assert_eq!(first.envs, second.envs);
    assert_eq!(
        first.mounts[0].host_path,
        rig.regions_dir.join("uid-early_main").to_string_lossy(),
        "the one bound first"
    );
    assert_eq!(
        second.mounts[0].host_path,
        rig.regions_dir.join("uid-late_main").to_string_lossy()
    );
    for p in ["early", "late"] {
        assert_eq!(
            annotation(&rig.api, p, ann::BIND_PHASE).as_deref(),
            Some("success")
        );
    }
}

#[tokio::test]
async fn c18_forged_decisions_are_refused() {
    let mut rig = Rig::new("c18").await;
    let (_, mut c) = rig.connect().await;
    let v = format!("{GPU_A},NVIDIA,20000,100:;");
    // Unsigned (a pod of another scheduler with hand-written annotations).
    let mut unsigned = decision(&v, 100, KEY, "uid-unsigned");
    unsigned.retain(|(k, _)| *k != ann::DECISION_SIGNATURE);
    rig.api.insert_pod(pod("unsigned", &[], &["main"], &unsigned));
    // Signed with another key.
    rig.api.insert_pod(pod(
        "wrongkey",
        &[],
        &["main"],
        &decision(&v, 100, b"guess", "uid-wrongkey"),
    ));
    // A valid signature copied from another pod.
    rig.api.insert_pod(pod(
        "copied",
        &[],
        &["main"],
        &decision(&v, 100, KEY, "uid-victim"),
    ));

    // Every forged pod matching the request is refused (and marked failed) on the first call.
    let e = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    for forged in ["ml/unsigned", "ml/wrongkey", "ml/copied"] {
        assert!(e.message().contains(forged), "{}", e.message());
    }
    // Marked failed, they are no longer candidates at all.
    let e = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    for forged in ["unsigned", "wrongkey", "copied"] {
        assert_eq!(
            annotation(&rig.api, forged, ann::BIND_PHASE).as_deref(),
            Some("failed"),
            "{forged}"
        );
        assert_eq!(
            annotation(&rig.api, forged, ann::DEVICES_TO_ALLOCATE).as_deref(),
            Some(v.as_str()),
            "{forged}: nothing handed out"
        );
    }
    assert_eq!(rig.plugin.metrics().refused.get(), 3);
    assert!(!rig.regions_dir.exists(), "no region directory for a forged pod");
    // A legitimate pod on the same GPU is still served.
    rig.api
        .insert_pod(signed_pod("legit", &format!("{GPU_A},NVIDIA,1000,10:;"), 500));
    let r = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap();
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
}

#[tokio::test]
async fn a_conflicting_update_is_reread_and_retried() {
    let mut rig = Rig::new("conflict").await;
    let (_, mut c) = rig.connect().await;
    rig.api
        .insert_pod(signed_pod("a", &format!("{GPU_A},NVIDIA,1000,10:;"), 100));
    rig.api.fail_next("PATCH", "/pods/a", 409, 2);
    let r = allocate(&mut c, &[id(GPU_A, 0)]).await.unwrap();
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    assert_eq!(
        annotation(&rig.api, "a", ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    let methods: Vec<String> = rig
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("/pods/a"))
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["PATCH", "GET", "PATCH", "GET", "PATCH"]);
}

#[tokio::test]
async fn kubelet_restart_re_registers_and_serves_again() {
    let mut rig = Rig::new("restart").await;
    let (first, _) = rig.connect().await;
    // The kubelet goes down; on start it removes the plugin sockets and recreates kubelet.sock.
    rig.kubelet.stop().await;
    let _ = std::fs::remove_file(rig.plugin_dir.join("kubelet.sock"));
    let _ = std::fs::remove_file(rig.plugin_dir.join(&first.endpoint));
    rig.kubelet = TestKubelet::start(&rig.plugin_dir);
    let (second, mut c) = rig.connect().await;
    assert_eq!(second, first);
    let mut stream = c.list_and_watch(proto::Empty {}).await.unwrap().into_inner();
    let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.devices.len(), 2 * SPLIT as usize);
    assert_eq!(rig.plugin.metrics().registrations.get(), 2);

    // A kubelet that only recreates its socket (ours left in place) is registered with again too.
    rig.kubelet.stop().await;
    let _ = std::fs::remove_file(rig.plugin_dir.join("kubelet.sock"));
    rig.kubelet = TestKubelet::start(&rig.plugin_dir);
    let (third, _) = rig.connect().await;
    assert_eq!(third, first);
    assert_eq!(rig.plugin.metrics().registrations.get(), 3);

    // Stopping the plugin ends the old stream and removes its socket.
    let sock = rig.plugin.socket().to_path_buf();
    assert!(sock.exists());
    let Rig { plugin, _scratch, .. } = rig;
    plugin.stop().await;
    assert!(!sock.exists());
}

/// Writes one command (`lost <gpu>`, `recover <gpu>`) to the simulated node's control file.
fn node_control(node: &hami_fake_gpu::FakeNode, line: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(node.dir().join(hami_fake_gpu::fs::CONTROL_FILE))
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// The health of each GPU in the node's `hami.io/node-nvidia-register` annotation, by index.
fn registered_health(api: &FakeApiServer) -> Option<Vec<bool>> {
    let node = api.node(NODE)?;
    let value = node.metadata.annotations?.get(ann::NODE_NVIDIA_REGISTER)?.clone();
    let gpus = hami_api::decode_node_register(&value).ok()?;
    Some(gpus.iter().map(|g| g.healthy).collect())
}

/// Waits (20 ms polls, at most 10 s) until the registered health is `want`.
async fn wait_registered(api: &FakeApiServer, want: &[bool]) {
    for _ in 0..500 {
        if registered_health(api).as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("registered health {:?}, want {want:?}", registered_health(api));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_serves_the_plugin_and_follows_gpu_health_c05_c24() {
    let Some(mut env) = common::Env::new("dp-binary", 2, 1024) else {
        return;
    };
    let api = FakeApiServer::start().await.unwrap();
    api.insert_node(serde_json::from_value(serde_json::json!({"metadata": {"name": NODE}})).unwrap());
    let kubeconfig = env.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let key_file = env.dir.join("decision-key");
    std::fs::write(&key_file, [KEY, b"\n"].concat()).unwrap();
    let plugin_dir = env.dir.join("device-plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let mut kubelet = TestKubelet::start(&plugin_dir);
    env.cfg.node_name = NODE.to_owned();
    env.cfg.nvml_lib = Some(common::fake_nvml());
    env.cfg.device_plugin = DevicePluginConfig {
        enabled: true,
        plugin_dir: plugin_dir.clone(),
        socket_name: "hami-test.sock".into(),
        split_count: SPLIT,
        libvgpu_host_path: env.dir.join("host/libvgpu.so"),
        ld_so_preload_host_path: None,
        decision_key_file: key_file,
        watch_interval_ms: 100,
        health_interval_ms: 100,
        host_dev_dir: env.node.dir().to_path_buf(),
        ..DevicePluginConfig::default()
    };
    env.cfg.registration = hami_agent::registration::RegistrationConfig {
        enabled: true,
        heartbeat_secs: 60,
        device_split_count: SPLIT,
        ..Default::default()
    };
    let (_agent, port) = common::start_agent_with_env(
        &env,
        Path::new(env!("CARGO_BIN_EXE_hami-agent")),
        &[("KUBECONFIG", kubeconfig.as_path())],
    );
    let truth = env.node.ground_truth();
    let uuids: Vec<String> = truth.gpus.iter().map(|g| g.uuid.clone()).collect();

    let (reg, mut c) = kubelet.connect().await;
    assert_eq!(reg, registration());
    let mut stream = c.list_and_watch(proto::Empty {}).await.unwrap().into_inner();
    let expect = |gpu1: &str| -> Vec<(String, String)> {
        uuids
            .iter()
            .enumerate()
            .flat_map(|(i, u)| {
                (0..SPLIT).map(move |n| (id(u, n), if i == 1 { gpu1 } else { "Healthy" }.to_owned()))
            })
            .collect()
    };
    assert_eq!(
        common::kubelet::health(&next(&mut stream).await),
        expect("Healthy")
    );

    // One Allocate for a pod the scheduler placed on GPU 1 (decision signed with the shared key).
    let value = format!("{},NVIDIA,512,20:;", uuids[1]);
    bound_pod(&api, "job", &value);
    let chosen = preferred(
        &mut c,
        &expect("Healthy").into_iter().map(|(i, _)| i).collect::<Vec<_>>(),
        &[],
        1,
    )
    .await;
    assert!(chosen[0].starts_with(&uuids[1]), "{chosen:?}");
    let r = allocate(&mut c, &chosen).await.unwrap();
    assert_eq!(
        r.envs,
        env_map(&[
            ("NVIDIA_VISIBLE_DEVICES", &uuids[1]),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "512m"),
            ("CUDA_DEVICE_SM_LIMIT", "20"),
            ("CUDA_TASK_PRIORITY", "1"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/usr/local/vgpu/vgpu.cache"),
        ])
    );
    let dev = |n: &str| {
        (
            format!("/dev/{n}"),
            env.node.dir().join(n).to_string_lossy().into_owned(),
            "rw".to_owned(),
        )
    };
    assert_eq!(devices(&r), [dev("nvidiactl"), dev("nvidia-uvm"), dev("nvidia1")]);
    assert_eq!(
        mounts(&r)[0],
        (
            "/usr/local/vgpu".to_owned(),
            env.cfg
                .paths
                .regions_dir
                .join("uid-job_main")
                .to_string_lossy()
                .into_owned(),
            false
        )
    );
    assert_eq!(
        annotation(&api, "job", ann::BIND_PHASE).as_deref(),
        Some("success")
    );

    // C05: GPU 1 falls off the bus (NVML answers GPU_IS_LOST) and comes back; the open stream gets both
    // changes, with no restart of the agent or of the stream. C24: every replica of GPU 1 changes
    // together, and the node's published inventory follows at once (well before the 60 s heartbeat),
    // so the extender stops and resumes placing shares there.
    wait_registered(&api, &[true, true]).await;
    node_control(&env.node, "lost 1");
    assert!(env.node.ground_truth().gpus[1].lost);
    assert_eq!(
        common::kubelet::health(&next(&mut stream).await),
        expect("Unhealthy")
    );
    wait_registered(&api, &[true, false]).await;
    node_control(&env.node, "recover 1");
    assert_eq!(
        common::kubelet::health(&next(&mut stream).await),
        expect("Healthy")
    );
    wait_registered(&api, &[true, true]).await;
    let metrics = common::http_get(port, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "hami_device_plugin_registrations_total 1"),
        "one registration in the agent's metrics:\n{metrics}"
    );
}

/// Stores a pod bound to `NODE` with a signed single-container decision `value`, as the scheduler
/// leaves it after bind.
fn bound_pod(api: &FakeApiServer, name: &str, value: &str) {
    api.insert_pod(pod(
        name,
        &[],
        &["main"],
        &decision(value, 100, KEY, &format!("uid-{name}")),
    ));
}

/// [`env`], for tests whose `env` is the simulated node's environment.
fn env_map(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    env(pairs)
}
