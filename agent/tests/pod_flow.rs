//! # How a pod flows
//!
//! `one_pod_from_admission_to_its_limit_and_release` (this file) follows one pod through the whole
//! stack on real binaries (`DESIGN.md` §1, `reference/hami.md` §1.3–§1.5):
//!
//! 1. **Node.** The simulated GPU node (FUSE control device, fake `libcuda.so.1` and
//!    `libnvidia-ml.so.1`) has 2 GPUs of 2048 MiB. `hami-agent install-interceptor` puts
//!    `libvgpu.so` and `ld.so.preload` in the host directory (the chart's init container), then the
//!    real `hami-agent run` starts with its eBPF programs, the device plugin (plugin and regions
//!    directories in a scratch directory) and node registration, against `hami-fake-apiserver`
//!    (`KUBECONFIG`). It registers with the test kubelet (`Registration` on `kubelet.sock`) and writes
//!    the Node's register and usage annotations.
//! 2. **Admission.** The real `hami-scheduler serve` runs with the same decision key, its webhook on,
//!    over HTTPS with a self-signed certificate. The test posts the AdmissionReview the API server
//!    would send for `nvidia.com/gpu: 1, gpumem: 1024, gpucores: 30`, applies the returned JSON patch
//!    and stores the pod in the fake API (choosing the uid the API would assign, so that the test's
//!    pod cgroup carries it).
//! 3. **Scheduling.** Once the extender sees the agent's annotations, the test calls `/filter`,
//!    `/prioritize` and `/bind` as kube-scheduler does (`ExtenderArgs` with `NodeNames`), and checks
//!    the Binding and the signed decision stored on the pod.
//! 4. **Kubelet.** Over the plugin's socket: ListAndWatch (every replica healthy),
//!    GetPreferredAllocation and Allocate with the advertised IDs; the response carries the limits
//!    (`1024m`, SM 30), the container's region directory, the trusted limits file (read-only, naming
//!    the GPU), the library and the device specs, and the pod's bind phase becomes `success`.
//! 5. **Container.** The tenant (`hami-cuda-workload`) starts in the pod's cgroup with the response's
//!    env, and its mounts bind-mounted in a private mount namespace. It allocates 600 MiB (granted;
//!    `cuMemGetInfo` reports the 1024 MiB limit as total), and a second process of the same container
//!    asks for 600 MiB more: `CUDA_ERROR_OUT_OF_MEMORY` from `libvgpu.so`, nothing reaches the driver.
//! 6. **Telemetry.** The agent attributes exactly the fake driver's 600 MiB to that container (pod
//!    UID, container ID, GPU) in `/snapshot`, and the next usage heartbeat on the Node shows them on
//!    that GPU.
//! 7. **Release.** A second pod that needs both GPUs almost whole does not fit; once the first pod is
//!    deleted from the API, the extender releases its slot and the second pod fits.
//!
//! Protocol-level stand-ins (no real control plane runs here, `reference/kubernetes-testing.md`):
//! the API server (`hami-fake-apiserver`), the kubelet (this test, over the real gRPC sockets), the
//! API server's webhook call and kube-scheduler's extender calls (this test, with their wire
//! formats), and the container runtime: the tenant's mounts are bind mounts in a private mount
//! namespace (`/usr/local` a tmpfs), `/etc/ld.so.preload` is emulated by `LD_PRELOAD` set to its
//! content, and the device specs are checked but the tenant reaches the simulated device through the
//! node's directory (`HAMI_FAKE_GPU_DIR`); `NVIDIA_VISIBLE_DEVICES` from the response makes the
//! allocated GPU the container's CUDA device 0, as the NVIDIA runtime does.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Env;
use common::kubelet::{TestKubelet, allocate, devices, health, mounts, next, preferred};
use common::scheduler::Scheduler;
use hami_agent::deviceplugin::proto;
use hami_agent::snapshot::Snapshot;
use hami_api::PodDevices;
use hami_api::annotations::{
    BIND_PHASE, DECISION_SIGNATURE, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, NODE_NVIDIA_REGISTER,
    NODE_NVIDIA_USAGE, NodeUsage, VGPU_NODE, verify_decision,
};
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const NODE: &str = "gpu-node-1";
const KEY: &[u8] = b"pod-flow-decision-key";
const SPLIT: u32 = 4;
const GPU_MIB: u64 = 2048;
const MIB: u64 = 1 << 20;
const NAMESPACE: &str = "ml";

/// Polls `f` every 50 ms until it returns `Some` (20 s at most).
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Pods and the node as the API holds them.

/// A pod as a user writes it: one container `main` limited to these HAMi resources.
fn user_pod(name: &str, limits: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "containers": [{
                "name": "main",
                "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                "resources": {"limits": limits.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<BTreeMap<_, _>>()},
            }],
        },
    })
}

/// Stores an admitted pod with the uid the API server would give it.
fn create(api: &FakeApiServer, mut pod: Value, uid: &str) -> Pod {
    pod["metadata"]["uid"] = json!(uid);
    api.insert_pod(serde_json::from_value(pod).expect("an admitted pod decodes"))
}

fn annotations(api: &FakeApiServer, name: &str) -> BTreeMap<String, String> {
    api.pod(NAMESPACE, name)
        .and_then(|p| p.metadata.annotations)
        .unwrap_or_default()
}

fn node_annotation(api: &FakeApiServer, key: &str) -> Option<String> {
    api.node(NODE)?.metadata.annotations?.get(key).cloned()
}

fn usage(api: &FakeApiServer) -> Option<NodeUsage> {
    node_annotation(api, NODE_NVIDIA_USAGE).map(|v| NodeUsage::decode(&v).expect("usage annotation decodes"))
}

/// `ExtenderArgs` as kube-scheduler sends them with `nodeCacheCapable: true`.
fn extender_args(pod: &Pod) -> Value {
    json!({"Pod": pod, "Nodes": null, "NodeNames": [NODE]})
}

/// The agent's `/snapshot`.
fn snapshot(port: u16) -> Option<Snapshot> {
    common::http_get(port, "/snapshot").map(|b| serde_json::from_str(&b).expect("snapshot JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_from_admission_to_its_limit_and_release() {
    let Some(mut env) = Env::new("pod-flow", 2, GPU_MIB) else {
        return;
    };
    let truth = env.node.ground_truth();
    let api = FakeApiServer::start().await.expect("fake API server");

    // 1. The node: interceptor installed on the host, then the agent with plugin and registration.
    let common::KubeNode {
        kubeconfig,
        key_file,
        host_vgpu,
        plugin_dir,
    } = common::kube_node(&mut env, &api, NODE, KEY, SPLIT);
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_hami-agent"));
    let mut kubelet = TestKubelet::start(&plugin_dir);
    let regions_dir = env.cfg.paths.regions_dir.clone();
    let (_agent, agent_port) =
        common::start_agent_with_env(&env, agent_bin, &[("KUBECONFIG", kubeconfig.as_path())]);

    // 2. Admission through the scheduler's webhook, over HTTPS.
    let scheduler = Scheduler::start(&env.dir, &key_file, &kubeconfig);
    scheduler.wait_ready().await;
    let asked = [
        ("nvidia.com/gpu", "1"),
        ("nvidia.com/gpumem", "1024"),
        ("nvidia.com/gpucores", "30"),
    ];
    let admitted = scheduler.admit(&user_pod("train", &asked)).await;
    assert_eq!(admitted["spec"]["schedulerName"], "hami-scheduler");
    for (res, v) in asked {
        let r = &admitted["spec"]["containers"][0]["resources"];
        assert_eq!(
            (&r["limits"][res], &r["requests"][res]),
            (&json!(v), &json!(v)),
            "{r}"
        );
    }
    let (uid, container_id) = common::ids(1);
    let pod = create(&api, admitted, &uid);

    // 3. Scheduling, once the extender sees the agent's register and usage annotations.
    wait_for("the agent's register and usage annotations", || {
        node_annotation(&api, NODE_NVIDIA_REGISTER).and(node_annotation(&api, NODE_NVIDIA_USAGE))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let f = scheduler.post("/filter", &extender_args(&pod)).await;
        if f["NodeNames"] == json!([NODE]) {
            assert_eq!(f["Error"].as_str().unwrap_or_default(), "", "{f}");
            break;
        }
        assert!(Instant::now() < deadline, "the node never passed the filter: {f}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = scheduler.post("/prioritize", &extender_args(&pod)).await;
    let hosts = p.as_array().expect("HostPriorityList");
    assert_eq!(hosts.len(), 1, "{p}");
    assert_eq!(hosts[0]["Host"], NODE);
    assert!((0..=10).contains(&hosts[0]["Score"].as_i64().unwrap()), "{p}");
    let b = scheduler
        .post(
            "/bind",
            &json!({"PodName": "train", "PodNamespace": NAMESPACE, "PodUID": uid, "Node": NODE}),
        )
        .await;
    assert_eq!(b, json!({"Error": ""}));
    let stored = api.pod(NAMESPACE, "train").unwrap();
    assert_eq!(
        stored.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(NODE)
    );
    let bindings: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path_and_query.contains("/pods/train/binding"))
        .filter_map(|r| r.body_json())
        .collect();
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0]["target"]["name"], NODE);
    let ann = annotations(&api, "train");
    let decision = ann[DEVICES_ALLOCATED].clone();
    assert!(verify_decision(
        KEY,
        &uid,
        NODE,
        &decision,
        &ann[DECISION_SIGNATURE]
    ));
    assert_eq!(ann[DEVICES_TO_ALLOCATE], decision);
    assert_eq!(ann[BIND_PHASE], "allocating");
    assert_eq!(ann[VGPU_NODE], NODE);
    let devices_of_pod = PodDevices::decode(&decision).unwrap();
    assert_eq!(devices_of_pod.0.len(), 1);
    let [d] = devices_of_pod.0[0].0.as_slice() else {
        panic!("one device: {decision}")
    };
    assert_eq!((d.memory_mib, d.cores), (1024, 30));
    let gpu = truth
        .gpus
        .iter()
        .find(|g| g.uuid == d.uuid)
        .unwrap_or_else(|| panic!("{decision} names a GPU of the node"));
    let (index, other) = (gpu.index, 1 - gpu.index);

    // 4. The kubelet: registration, ListAndWatch, GetPreferredAllocation, Allocate.
    let (reg, mut plugin) = kubelet.connect().await;
    assert_eq!(
        (reg.version.as_str(), reg.resource_name.as_str()),
        ("v1beta1", "nvidia.com/gpu")
    );
    let mut stream = plugin.list_and_watch(proto::Empty {}).await.unwrap().into_inner();
    let advertised = health(&next(&mut stream).await);
    let expected: Vec<(String, String)> = truth
        .gpus
        .iter()
        .flat_map(|g| (0..SPLIT).map(move |n| (format!("{}-{n}", g.uuid), "Healthy".to_owned())))
        .collect();
    assert_eq!(advertised, expected);
    let ids: Vec<String> = advertised.into_iter().map(|(id, _)| id).collect();
    let chosen = preferred(&mut plugin, &ids, &[], 1).await;
    assert_eq!(chosen.len(), 1);
    assert!(chosen[0].starts_with(&gpu.uuid), "{chosen:?} on {}", gpu.uuid);
    let r = allocate(&mut plugin, &chosen).await.expect("Allocate");
    let envs = &r.envs;
    assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], gpu.uuid);
    assert_eq!(envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1024m");
    assert_eq!(envs["CUDA_DEVICE_SM_LIMIT"], "30");
    assert!(!envs.contains_key("CUDA_DEVICE_MEMORY_LIMIT_1"), "{envs:?}");
    let region = regions_dir.join(format!("{uid}_main"));
    let mounted = mounts(&r);
    assert_eq!(
        mounted[0],
        (
            "/usr/local/vgpu".to_owned(),
            region.to_string_lossy().into_owned(),
            false
        )
    );
    assert!(region.is_dir());
    let lib = host_vgpu.join("libvgpu.so").to_string_lossy().into_owned();
    assert!(
        mounted.contains(&("/usr/local/vgpu/libvgpu.so".to_owned(), lib, true)),
        "{mounted:?}"
    );
    // The trusted limits file the device plugin wrote beside the region directory (read-only; the
    // interceptor takes the limits from it, not from the tenant's environment).
    let limits_host = format!("{}.limits", region.display());
    assert!(
        mounted.contains(&("/usr/local/vgpu/limits".to_owned(), limits_host.clone(), true)),
        "{mounted:?}"
    );
    let limits = std::fs::read_to_string(&limits_host).expect("the trusted limits file");
    assert!(limits.contains(&gpu.uuid), "{limits}");
    let preload_host = host_vgpu.join("ld.so.preload");
    assert!(
        mounted.contains(&(
            "/etc/ld.so.preload".to_owned(),
            preload_host.to_string_lossy().into_owned(),
            true
        )),
        "{mounted:?}"
    );
    let dev = |n: &str| {
        (
            format!("/dev/{n}"),
            env.node.dir().join(n).to_string_lossy().into_owned(),
            "rw".to_owned(),
        )
    };
    assert_eq!(
        devices(&r),
        [
            dev("nvidiactl"),
            dev("nvidia-uvm"),
            dev(&format!("nvidia{index}"))
        ]
    );
    let ann = annotations(&api, "train");
    assert_eq!(ann[BIND_PHASE], "success");
    assert_eq!(ann[DEVICES_TO_ALLOCATE], ";");
    assert_eq!(ann[DEVICES_ALLOCATED], decision, "the durable record stays");

    // 5. The container: the response's env and mounts; /etc/ld.so.preload's content as LD_PRELOAD.
    let preload = std::fs::read_to_string(&preload_host).unwrap();
    let mut container_env: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    container_env.push(("LD_PRELOAD", preload.trim()));
    let container_mounts: Vec<(String, String, bool)> = mounted
        .iter()
        .filter(|(c, _, _)| c != "/etc/ld.so.preload")
        .cloned()
        .collect();
    let cg = env.container(1);
    let six = (600 * MIB).to_string();
    let mut first = env.spawn_container(
        &cg,
        &container_mounts,
        &["--device", "0", "--alloc", &six, "--hold"],
        &container_env,
    );
    assert_eq!(
        first.words("meminfo"),
        [
            "free".to_owned(),
            (424 * MIB).to_string(),
            "total".to_owned(),
            (1024 * MIB).to_string()
        ],
        "the limit is the container's total"
    );
    let held = env.node.ground_truth();
    assert_eq!(held.bytes(first.pid, index), 600 * MIB);
    assert_eq!(held.gpus[index as usize].used_bytes, 600 * MIB);
    assert_eq!(held.gpus[other as usize].used_bytes, 0);
    let second = env.spawn_container(
        &cg,
        &container_mounts,
        &["--device", "0", "--alloc", &six],
        &container_env,
    );
    let (ok, stderr) = second.outcome();
    assert!(
        !ok && stderr.contains("cuMemAlloc_v2 failed: CUresult 2"),
        "CUDA_ERROR_OUT_OF_MEMORY past 1024 MiB: {stderr}"
    );
    assert_eq!(
        env.node.ground_truth().gpus[index as usize].used_bytes,
        600 * MIB,
        "nothing of the refused allocation reached the driver"
    );

    // 6. Telemetry: the agent's attribution and the Node's usage heartbeat, against the driver's truth.
    let id = common::cgroup_id(&cg);
    let attributed = wait_for("the agent's attribution of 600 MiB", || {
        let s = snapshot(agent_port)?;
        let c = s.containers.into_iter().find(|c| c.cgroup_id == id)?;
        let on_gpu: u64 = c
            .gpus
            .iter()
            .filter(|g| g.gpu == Some(index))
            .map(|g| g.memory_bytes)
            .sum();
        (on_gpu == 600 * MIB).then_some(c)
    })
    .await;
    assert_eq!(attributed.identity.pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(
        attributed.identity.container_id.as_deref(),
        Some(container_id.as_str())
    );
    assert!(
        attributed
            .gpus
            .iter()
            .all(|g| g.gpu == Some(index) && g.uuid.as_deref() == Some(gpu.uuid.as_str())),
        "{attributed:?}"
    );
    assert_eq!(env.node.ground_truth().gpus[index as usize].used_bytes, 600 * MIB);
    let heartbeat = wait_for("a usage heartbeat with the tenant's memory", || {
        usage(&api).filter(|u| u.gpus.iter().any(|g| g.uuid == gpu.uuid && g.used_mib == 600))
    })
    .await;
    for g in &heartbeat.gpus {
        let want = if g.uuid == gpu.uuid { 600 } else { 0 };
        assert_eq!(g.used_mib, want, "{heartbeat:?}");
    }

    // 7. Release: a pod that needs both GPUs almost whole does not fit beside the first one; it does
    // once the first is gone from the API (its container ended first, as the kubelet would end it).
    let big = [
        ("nvidia.com/gpu", "2"),
        ("nvidia.com/gpumem", "1536"),
        ("nvidia.com/gpucores", "30"),
    ];
    let admitted = scheduler.admit(&user_pod("big", &big)).await;
    let big_pod = create(&api, admitted, &common::ids(2).0);
    let f = scheduler.post("/filter", &extender_args(&big_pod)).await;
    assert_eq!(
        f["NodeNames"].as_array().map_or(0, Vec::len),
        0,
        "the first pod's slot is held: {f}"
    );
    let reasons = format!("{} {}", f["FailedNodes"], f["FailedAndUnresolvableNodes"]);
    assert!(reasons.contains(NODE), "{f}");
    first.send();
    let _ = first.status();
    api.delete_pod(NAMESPACE, "train");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let f = scheduler.post("/filter", &extender_args(&big_pod)).await;
        if f["NodeNames"] == json!([NODE]) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never released: {f}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
