//! The mutating webhook over real HTTPS on loopback: AdmissionReview v1 fixtures in the exact wire
//! format (`tests/fixtures/admission/`), sent by a hyper client over tokio-rustls that trusts the
//! server's rcgen self-signed certificate; the JSON patch in each response is applied with json-patch
//! and the resulting pod compared whole with the expected one. Peer bugs C02, C16, C17, C18.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests unwrap: a failure is the assertion.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hami_api::{ResourceNames, k8s::RequestDefaults};
use hami_scheduler::{
    tls::{self, ReloadingCert, TlsListener, certgen},
    webhook::{QuotaLimits, WebhookConfig, WebhookState, router},
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use proptest::{prelude::*, strategy::ValueTree as _};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore, crypto::ring},
};

// ---------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "hami-webhook-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client configuration trusting exactly `cert_pem`.
fn client_config(cert_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// POSTs `body` to `https://localhost:<port>/webhook` trusting `tls`; the status and body.
async fn post(
    addr: std::net::SocketAddr,
    tls: Arc<ClientConfig>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post("/webhook")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

/// The webhook's state for `config`, default resource names and request defaults, its metrics in
/// `registry`.
fn webhook_state(config: WebhookConfig, registry: &prometheus::Registry) -> WebhookState {
    WebhookState::new(
        config,
        ResourceNames::default(),
        RequestDefaults::default(),
        registry,
    )
    .unwrap()
}

/// A fresh self-signed certificate for `localhost` written to `cert_path` and `key_path`; the
/// certificate's PEM.
fn write_self_signed(cert_path: &std::path::Path, key_path: &std::path::Path) -> String {
    let (cert, key) = certgen::self_signed(&["localhost".to_owned()]).unwrap();
    std::fs::write(cert_path, &cert).unwrap();
    std::fs::write(key_path, &key).unwrap();
    cert
}

/// The webhook served over HTTPS on 127.0.0.1 with a fresh self-signed certificate for `localhost`.
struct Server {
    addr: std::net::SocketAddr,
    tls: Arc<ClientConfig>,
    registry: prometheus::Registry,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Server {
    async fn start(config: WebhookConfig) -> Self {
        let registry = prometheus::Registry::new();
        let state = webhook_state(config, &registry);
        Self::serve(state, registry).await
    }

    /// Serves `state` (metrics in `registry`).
    async fn serve(state: WebhookState, registry: prometheus::Registry) -> Self {
        let dir = TempDir::new();
        let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
        let cert = write_self_signed(&cert_path, &key_path);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            tls::serve_tls(listener, router(state), cert_path, key_path)
                .await
                .unwrap();
        });
        Self {
            addr,
            tls: client_config(&cert),
            registry,
            task,
            _dir: dir,
        }
    }

    /// POSTs raw bytes.
    async fn post(&self, body: Vec<u8>) -> (u16, Vec<u8>) {
        post(self.addr, Arc::clone(&self.tls), body).await.unwrap()
    }

    /// Sends a review; asserts HTTP 200, AdmissionReview v1 and the request's uid; the `response`.
    async fn admit(&self, review: &Value) -> Value {
        let (status, body) = self.post(serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let reply: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["apiVersion"], "admission.k8s.io/v1", "{reply}");
        assert_eq!(reply["kind"], "AdmissionReview", "{reply}");
        assert!(reply.get("request").is_none(), "{reply}");
        let response = reply["response"].clone();
        assert_eq!(response["uid"], review["request"]["uid"], "{reply}");
        response
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The response's JSON patch (kube-core writes it as an array of byte values; Go accepts that and
/// base64 alike, so only its content is checked), or `None` when there is none.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let patch = response.get("patch")?;
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes: Vec<u8> = match patch {
        Value::Array(items) => items
            .iter()
            .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
            .collect(),
        other => panic!("patch is not a byte array: {other}"),
    };
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// The pod after the response's patch.
fn patched(review: &Value, response: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(p) = patch_of(response) {
        json_patch::patch(&mut pod, &p).unwrap();
    }
    pod
}

/// The response to fixture `name` from a webhook with the default configuration.
async fn admitted_by_default(name: &str) -> Value {
    let server = Server::start(WebhookConfig::default()).await;
    server.admit(&fixture(name)).await
}

/// The denial of fixture `name` by a webhook with the default configuration: its message.
async fn denied_by_default(name: &str) -> String {
    denial(&admitted_by_default(name).await)
}

fn assert_allowed_unchanged(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
}

/// Asserts a denial; its message.
fn denial(response: &Value) -> String {
    assert_eq!(response["allowed"], false, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    assert_eq!(response["status"]["status"], "Failure", "{response}");
    response["status"]["message"].as_str().unwrap().to_owned()
}

/// Sets `pointer` (creating nothing) in a review.
fn set(review: &mut Value, pointer: &str, value: Value) {
    *review.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value;
}

fn resources(limits: Value, requests: Value) -> Value {
    json!({"limits": limits, "requests": requests})
}

const FORGED_ANNOTATIONS: [&str; 7] = [
    "hami.io/vgpu-node",
    "hami.io/vgpu-time",
    "hami.io/bind-time",
    "hami.io/bind-phase",
    "hami.io/vgpu-devices-to-allocate",
    "hami.io/vgpu-devices-allocated",
    "hami.io/vgpu-decision-signature",
];

/// The object with the forged annotations and the `hami.io/vgpu-node` label removed.
fn without_forged(object: &Value) -> Value {
    let mut o = object.clone();
    let ann = o["metadata"]["annotations"].as_object_mut().unwrap();
    for k in FORGED_ANNOTATIONS {
        assert!(ann.remove(k).is_some(), "fixture lacks {k}");
    }
    o["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("hami.io/vgpu-node")
        .unwrap();
    o
}

// ---------------------------------------------------------------------------------------------------
// Mutation
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn gpu_pod_is_mutated_exactly() {
    let server = Server::start(WebhookConfig::default()).await;
    let review = fixture("gpu-pod.json");
    let response = server.admit(&review).await;
    assert_eq!(response["allowed"], true, "{response}");

    let mut want = review["request"]["object"].clone();
    want["spec"]["schedulerName"] = json!("hami-scheduler");
    let c = &mut want["spec"]["containers"];
    // Whole GPU, no cores: exclusive.
    c[0]["resources"] = resources(
        json!({"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1", "nvidia.com/gpucores": "100"}),
        json!({"cpu": "1", "memory": "8Gi", "nvidia.com/gpu": "1", "nvidia.com/gpucores": "100"}),
    );
    // Memory only: the default GPU count.
    c[1]["resources"] = resources(
        json!({"nvidia.com/gpumem": "3000", "nvidia.com/gpu": "1"}),
        json!({"nvidia.com/gpumem": "3000", "nvidia.com/gpu": "1"}),
    );
    // Requests only: written to limits too, with the default count; cores as given.
    let eval =
        json!({"nvidia.com/gpumem-percentage": "25", "nvidia.com/gpucores": "30", "nvidia.com/gpu": "1"});
    c[2]["resources"] = resources(eval.clone(), eval);
    // The CPU sidecar, annotations, labels, everything else: untouched.
    assert_eq!(patched(&review, &response), want);

    // The patch is minimal: one op per changed value, nothing under metadata.
    let ops = serde_json::to_value(patch_of(&response).unwrap()).unwrap();
    let paths: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().all(|p| p.starts_with("/spec/")), "{paths:?}");
    assert!(paths.contains(&"/spec/schedulerName"), "{paths:?}");
    assert!(
        paths.contains(&"/spec/containers/2/resources/limits"),
        "{paths:?}"
    );
    assert_eq!(paths.len(), 7, "{ops}");
}

#[tokio::test]
async fn pod_without_managed_resources_is_allowed_without_patch() {
    assert_allowed_unchanged(&admitted_by_default("cpu-pod.json").await);
}

#[tokio::test]
async fn scheduler_name_rules() {
    let server = Server::start(WebhookConfig::default()).await;
    // Empty: set. Already ours: nothing to do.
    for (name, changed) in [(json!(""), true), (json!("hami-scheduler"), false)] {
        let mut review = fixture("c17-init-gpu.json");
        set(&mut review, "/request/object/spec/schedulerName", name);
        let response = server.admit(&review).await;
        assert_eq!(response["allowed"], true, "{response}");
        assert_eq!(response.get("patch").is_some(), changed, "{response}");
        assert_eq!(
            patched(&review, &response)["spec"]["schedulerName"],
            "hami-scheduler"
        );
    }
    // Another scheduler with GPU resources: denied (its GPUs would be unaccounted).
    let mut review = fixture("c17-init-gpu.json");
    set(
        &mut review,
        "/request/object/spec/schedulerName",
        json!("volcano"),
    );
    let why = denial(&server.admit(&review).await);
    assert!(
        why.contains("\"volcano\"") && why.contains("hami-scheduler"),
        "{why}"
    );
    drop(server);

    // force_overwrite_default_scheduler off: default-scheduler is kept.
    let server = Server::start(WebhookConfig {
        force_overwrite_default_scheduler: false,
        ..WebhookConfig::default()
    })
    .await;
    let review = fixture("c17-init-gpu.json");
    let response = server.admit(&review).await;
    assert_allowed_unchanged(&response);
}

// ---------------------------------------------------------------------------------------------------
// C16: privileged containers
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn c16_privileged_sidecar_with_gpu_container_is_denied_naming_it() {
    let why = denied_by_default("c16-privileged-sidecar.json").await;
    assert!(why.contains("container \"net-tuner\" is privileged"), "{why}");
}

#[tokio::test]
async fn c16_privileged_pod_without_gpu_is_allowed_unchanged() {
    assert_allowed_unchanged(&admitted_by_default("c16-privileged-only.json").await);
}

#[tokio::test]
async fn c16_privileged_init_container_with_gpu_app_is_denied_naming_it() {
    let why = denied_by_default("c16-privileged-init.json").await;
    assert!(why.contains("container \"sysctl\" is privileged"), "{why}");
}

// ---------------------------------------------------------------------------------------------------
// C17 / C02: init containers and quota
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn c17_init_container_only_gpu_pod_is_mutated() {
    let server = Server::start(WebhookConfig::default()).await;
    let review = fixture("c17-init-gpu.json");
    let response = server.admit(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    let mut want = review["request"]["object"].clone();
    want["spec"]["schedulerName"] = json!("hami-scheduler");
    assert_eq!(patched(&review, &response), want);
    let ops = serde_json::to_value(patch_of(&response).unwrap()).unwrap();
    assert_eq!(
        ops,
        json!([{"op": "replace", "path": "/spec/schedulerName", "value": "hami-scheduler"}])
    );

    // A whole GPU in the init container gets the exclusive cores there.
    let mut review = fixture("c17-init-gpu.json");
    let whole = json!({"nvidia.com/gpu": "1"});
    set(
        &mut review,
        "/request/object/spec/initContainers/0/resources",
        resources(whole.clone(), whole),
    );
    let pod = patched(&review, &server.admit(&review).await);
    assert_eq!(
        pod["spec"]["initContainers"][0]["resources"]["limits"]["nvidia.com/gpucores"],
        "100"
    );
    assert_eq!(
        pod["spec"]["initContainers"][0]["resources"]["requests"]["nvidia.com/gpucores"],
        "100"
    );
}

/// A configuration limiting `namespace` to `gpumem` MiB (and `gpucores` %, when given).
fn quota(namespace: &str, gpumem: u64, gpucores: Option<u64>) -> WebhookConfig {
    WebhookConfig {
        quotas: [(
            namespace.to_owned(),
            QuotaLimits {
                gpumem: Some(gpumem),
                gpucores,
            },
        )]
        .into(),
        ..WebhookConfig::default()
    }
}

#[tokio::test]
async fn c17_quota_counts_the_init_container() {
    // The init container asks for 4096 MiB; the namespace may hold 2048.
    let server = Server::start(quota("team-a", 2048, None)).await;
    let why = denial(&server.admit(&fixture("c17-init-gpu.json")).await);
    assert!(
        why.contains("ResourceQuotaNotFit") && why.contains("nvidia.com/gpumem"),
        "{why}"
    );
    assert!(
        why.contains("requested 4096") && why.contains("limit 2048"),
        "{why}"
    );
    // Another namespace has no quota.
    let mut review = fixture("c17-init-gpu.json");
    set(&mut review, "/request/namespace", json!("team-b"));
    assert_eq!(server.admit(&review).await["allowed"], true);
}

/// A container asking for one GPU with `mib` MiB, on both sides.
fn gpu_container(name: &str, mib: u64) -> Value {
    let r = json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": mib.to_string()});
    json!({"name": name, "image": "registry.example/app:1", "resources": {"limits": r, "requests": r}})
}

#[tokio::test]
async fn c02_effective_request_is_the_biggest_init_container_or_the_app_sum() {
    let server = Server::start(quota("team-a", 24000, None)).await;
    // Three init containers of 10240 MiB each run one after another: 10240 is needed, not 30720.
    let mut review = fixture("c17-init-gpu.json");
    set(
        &mut review,
        "/request/object/spec/initContainers",
        json!([
            gpu_container("a", 10240),
            gpu_container("b", 10240),
            gpu_container("c", 10240)
        ]),
    );
    assert_eq!(server.admit(&review).await["allowed"], true);

    // #3052: two app containers of 16000 MiB (32000 together) exceed 24000, with and without a
    // GPU-less init container in front.
    let apps = json!([gpu_container("x", 16000), gpu_container("y", 16000)]);
    let mut review = fixture("c17-init-gpu.json");
    set(&mut review, "/request/object/spec/containers", apps.clone());
    set(
        &mut review,
        "/request/object/spec/initContainers",
        json!([{"name": "prepare", "image": "busybox:1.36"}]),
    );
    let why = denial(&server.admit(&review).await);
    assert!(why.contains("requested 32000"), "{why}");
    review["request"]["object"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("initContainers");
    let why = denial(&server.admit(&review).await);
    assert!(why.contains("requested 32000"), "{why}");
}

/// C22: a misspelled or unknown scheduling policy annotation is denied with the valid values listed;
/// a padded valid one is admitted (and read trimmed by the extender).
#[tokio::test]
async fn c22_unknown_policy_annotations_are_denied_listing_the_valid_values() {
    let server = Server::start(WebhookConfig::default()).await;
    for (key, value, valid) in [
        ("hami.io/gpu-scheduler-policy", "binpak", "\"topology-aware\""),
        ("hami.io/gpu-scheduler-policy", "Spread", "\"spread\""),
        (
            "hami.io/node-scheduler-policy",
            "spraed",
            "\"binpack\" or \"spread\"",
        ),
    ] {
        let mut review = fixture("gpu-pod.json");
        set(
            &mut review,
            "/request/object/metadata/annotations",
            json!({ key: value }),
        );
        let why = denial(&server.admit(&review).await);
        assert!(
            why.contains(key) && why.contains(value) && why.contains(valid),
            "{key}={value}: {why}"
        );
    }
    let mut review = fixture("gpu-pod.json");
    set(
        &mut review,
        "/request/object/metadata/annotations",
        json!({"hami.io/gpu-scheduler-policy": " binpack "}),
    );
    assert_eq!(server.admit(&review).await["allowed"], true);
}

/// C29: a zero memory request beside a GPU count is denied naming the container and the resource,
/// with or without a namespace quota (0 would count as nothing against the quota and the GPU, and
/// become an unlimited device in HAMi-core).
#[tokio::test]
async fn c29_zero_memory_request_is_denied_naming_the_container() {
    for config in [WebhookConfig::default(), quota("ml", 0, None)] {
        let server = Server::start(config).await;
        for (resource, value) in [("nvidia.com/gpumem", "0"), ("nvidia.com/gpumem-percentage", "0")] {
            let mut review = fixture("gpu-pod.json");
            let q = json!({"nvidia.com/gpu": "1", resource: value});
            set(
                &mut review,
                "/request/object/spec/containers/1/resources",
                resources(q.clone(), q),
            );
            let why = denial(&server.admit(&review).await);
            assert!(
                why.contains("container \"infer\"")
                    && why.contains(resource)
                    && why.contains("zero device memory"),
                "{resource}={value}: {why}"
            );
        }
    }
}

/// A cluster view whose pod view is still incomplete (the extender starting or relisting).
struct Unsynced;

impl hami_scheduler::webhook::ClusterView for Unsynced {
    fn quota_used(&self, _namespace: &str) -> Option<hami_policy::QuotaUsage> {
        None
    }
}

/// C30: while the scheduler has not read the cluster's pods, a pod in a namespace with a GPU quota is
/// denied with a reason (its namespace's use is unknown); pods of namespaces without a quota, and pods
/// without GPU resources, are admitted as usual.
#[tokio::test]
async fn c30_quota_checked_pods_are_denied_until_the_pods_are_read() {
    let registry = prometheus::Registry::new();
    let state =
        webhook_state(quota("team-a", 1_000_000, None), &registry).with_cluster_view(Arc::new(Unsynced));
    let server = Server::serve(state, registry).await;
    let mut review = fixture("c17-init-gpu.json");
    set(&mut review, "/request/namespace", json!("team-a"));
    let why = denial(&server.admit(&review).await);
    assert!(
        why.contains("\"team-a\" has a GPU quota") && why.contains("not finished reading"),
        "{why}"
    );
    set(&mut review, "/request/namespace", json!("team-b"));
    assert_eq!(server.admit(&review).await["allowed"], true);
    let mut cpu = fixture("cpu-pod.json");
    set(&mut cpu, "/request/namespace", json!("team-a"));
    assert_allowed_unchanged(&server.admit(&cpu).await);
}

// ---------------------------------------------------------------------------------------------------
// C18: scheduler-owned annotations
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn c18_forged_annotations_are_stripped_from_another_schedulers_pod() {
    let server = Server::start(WebhookConfig::default()).await;
    let review = fixture("c18-other-scheduler.json");
    let response = server.admit(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    let object = &review["request"]["object"];
    assert_eq!(patched(&review, &response), without_forged(object));
    // Only removals, one per forged key.
    let ops = serde_json::to_value(patch_of(&response).unwrap()).unwrap();
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), FORGED_ANNOTATIONS.len() + 1, "{ops:?}");
    assert!(ops.iter().all(|o| o["op"] == "remove"), "{ops:?}");
    assert!(
        ops.iter()
            .any(|o| o["path"] == "/metadata/annotations/hami.io~1vgpu-devices-to-allocate"),
        "{ops:?}"
    );
}

#[tokio::test]
async fn c18_forged_annotations_are_stripped_from_our_pod() {
    let server = Server::start(WebhookConfig::default()).await;
    let review = fixture("c18-ours.json");
    let response = server.admit(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    let mut want = without_forged(&review["request"]["object"]);
    let whole = json!({"nvidia.com/gpu": "1", "nvidia.com/gpucores": "100"});
    want["spec"]["containers"][0]["resources"] = resources(whole.clone(), whole);
    assert_eq!(patched(&review, &response), want);

    // An ignored pod gets nothing but the stripping.
    let mut review = fixture("c18-ours.json");
    set(
        &mut review,
        "/request/object/metadata/labels/app",
        json!("ignored"),
    );
    review["request"]["object"]["metadata"]["labels"]["hami.io/webhook"] = json!("ignore");
    let response = server.admit(&review).await;
    assert_eq!(
        patched(&review, &response),
        without_forged(&review["request"]["object"])
    );
}

#[tokio::test]
async fn c18_attacker_pod_pinned_to_a_node_is_denied() {
    let why = denied_by_default("c18-attacker.json").await;
    assert!(why.contains("spec.nodeName") && why.contains("node-1"), "{why}");
}

#[tokio::test]
async fn c18_untrusted_update_is_reverted_and_the_schedulers_is_kept() {
    let scheduler = "system:serviceaccount:hami-system:hami-scheduler";
    let server = Server::start(WebhookConfig {
        trusted_usernames: vec![scheduler.to_owned()],
        ..WebhookConfig::default()
    })
    .await;
    let review = fixture("c18-update.json");
    let response = server.admit(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    // The decision, signature and label are back; the user's own annotation stays.
    let mut want = review["request"]["oldObject"].clone();
    want["metadata"]["annotations"]["example.com/note"] = json!("edited");
    assert_eq!(patched(&review, &response), want);

    let mut review = fixture("c18-update.json");
    set(&mut review, "/request/userInfo/username", json!(scheduler));
    assert_allowed_unchanged(&server.admit(&review).await);
}

// ---------------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn escape_env_vars_are_denied_naming_the_variable() {
    let server = Server::start(WebhookConfig {
        extra_denied_env: vec!["LD_PRELOAD".to_owned()],
        ..WebhookConfig::default()
    })
    .await;
    for var in [
        "CUDA_DISABLE_CONTROL",
        "CUDA_DEVICE_MEMORY_LIMIT",
        "CUDA_DEVICE_MEMORY_LIMIT_0",
        "CUDA_DEVICE_SM_LIMIT",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE",
        "GPU_CORE_UTILIZATION_POLICY",
        "CUDA_TASK_PRIORITY",
        "NVIDIA_VISIBLE_DEVICES",
        "LD_PRELOAD",
    ] {
        let mut review = fixture("escape-env.json");
        set(
            &mut review,
            "/request/object/spec/containers/0/env/1/name",
            json!(var),
        );
        let why = denial(&server.admit(&review).await);
        assert!(
            why.contains(&format!("environment variable {var} ")),
            "{var}: {why}"
        );
        assert!(why.contains("container \"cuda\""), "{why}");
    }
    // valueFrom is refused by name alike.
    let mut review = fixture("escape-env.json");
    set(
        &mut review,
        "/request/object/spec/containers/0/env/1",
        json!({"name": "CUDA_DEVICE_SM_LIMIT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "sm"}}}),
    );
    denial(&server.admit(&review).await);
    // On a container without GPU resources the variable does nothing: allowed.
    let mut review = fixture("escape-env.json");
    let mut plain = review["request"]["object"]["spec"]["containers"][0].clone();
    plain["name"] = json!("plain");
    plain["resources"] = json!({});
    review["request"]["object"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .pop();
    review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(plain);
    assert_eq!(server.admit(&review).await["allowed"], true);
}

#[tokio::test]
async fn c16_privileged_ephemeral_container_on_a_gpu_pod_is_denied() {
    let server = Server::start(WebhookConfig::default()).await;
    let debug = |privileged: bool| {
        let mut review = fixture("c18-update.json");
        review["request"]["subResource"] = json!("ephemeralcontainers");
        review["request"]["requestSubResource"] = json!("ephemeralcontainers");
        let old = review["request"]["oldObject"].clone();
        let mut new = old.clone();
        new["spec"]["ephemeralContainers"] = json!([{
            "name": "debugger", "image": "busybox:1.36", "targetContainerName": "cuda",
            "securityContext": {"privileged": privileged}
        }]);
        review["request"]["object"] = new;
        review
    };
    let why = denial(&server.admit(&debug(true)).await);
    assert!(
        why.contains("ephemeral container \"debugger\" is privileged"),
        "{why}"
    );
    assert_allowed_unchanged(&server.admit(&debug(false)).await);
}

#[tokio::test]
async fn preset_node_name_is_denied() {
    let why = denied_by_default("node-name-preset.json").await;
    assert!(why.contains("spec.nodeName is preset to \"node-1\""), "{why}");
}

#[tokio::test]
async fn invalid_quantities_are_denied_naming_container_and_resource() {
    let server = Server::start(WebhookConfig::default()).await;
    for (resource, value) in [
        ("nvidia.com/gpu", "-1"),
        ("nvidia.com/gpu", "1500m"),
        ("nvidia.com/gpu", "3000000000"),
        ("nvidia.com/gpumem", "4Gi"),
        ("nvidia.com/gpumem", "1.5"),
        ("nvidia.com/gpumem-percentage", "101"),
        ("nvidia.com/gpumem-percentage", "150"),
        ("nvidia.com/gpucores", "101"),
        ("nvidia.com/priority", "2"),
    ] {
        let mut review = fixture("gpu-pod.json");
        let q = json!({resource: value});
        set(
            &mut review,
            "/request/object/spec/containers/1/resources",
            resources(q.clone(), q),
        );
        let why = denial(&server.admit(&review).await);
        assert!(
            why.contains("container \"infer\"") && why.contains(resource) && why.contains(value),
            "{resource}={value}: {why}"
        );
    }
    // Every problem of the pod is listed, in one message.
    let mut review = fixture("gpu-pod.json");
    set(
        &mut review,
        "/request/object/spec/containers/0/resources",
        resources(json!({"nvidia.com/gpucores": "200"}), json!({})),
    );
    set(
        &mut review,
        "/request/object/spec/containers/1/resources",
        resources(json!({"nvidia.com/gpumem": "-5"}), json!({})),
    );
    let why = denial(&server.admit(&review).await);
    assert!(why.contains("\"trainer\"") && why.contains("\"infer\""), "{why}");
}

// ---------------------------------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_reviews_get_400_or_a_denial() {
    let server = Server::start(WebhookConfig::default()).await;
    let good = serde_json::to_vec(&fixture("gpu-pod.json")).unwrap();

    // No readable uid: 400 with a reason.
    let mut bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("not utf-8", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("array", b"[1,2,3]".to_vec()),
    ];
    for (what, edit) in [
        (
            "wrong apiVersion",
            ("/apiVersion", json!("admission.k8s.io/v1beta1")),
        ),
        ("wrong kind", ("/kind", json!("Pod"))),
        ("missing request", ("/request", Value::Null)),
        ("missing uid", ("/request/uid", Value::Null)),
        ("empty uid", ("/request/uid", json!(""))),
    ] {
        let mut review = fixture("gpu-pod.json");
        set(&mut review, edit.0, edit.1);
        bodies.push((what, serde_json::to_vec(&review).unwrap()));
    }
    for (what, body) in bodies {
        let (status, reason) = server.post(body).await;
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&reason));
        assert!(!reason.is_empty(), "{what}");
    }

    // A readable uid: a denial carrying it.
    for (what, pointer, value) in [
        (
            "object not a pod",
            "/request/object/spec/containers",
            json!("not a list"),
        ),
        ("object a string", "/request/object", json!("pod")),
        ("unknown operation", "/request/operation", json!("PATCH")),
        ("no userInfo", "/request/userInfo", json!(7)),
        ("no object", "/request/object", Value::Null),
    ] {
        let mut review = fixture("gpu-pod.json");
        set(&mut review, pointer, value);
        let why = denial(&server.admit(&review).await);
        assert!(!why.is_empty(), "{what}");
    }

    // Not a pod at all (a misrouted kind): allowed unchanged; DELETE: allowed.
    let mut review = fixture("gpu-pod.json");
    set(
        &mut review,
        "/request/kind",
        json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
    );
    assert_allowed_unchanged(&server.admit(&review).await);
    let mut review = fixture("gpu-pod.json");
    set(&mut review, "/request/operation", json!("DELETE"));
    assert_allowed_unchanged(&server.admit(&review).await);
}

/// A strategy for arbitrary JSON values, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-zA-Z0-9./_ -]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("-1"),
            Just("1"),
            Just("100"),
            Just("1e3"),
            Just("0.5"),
            Just("4Gi")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z./]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Places in a review where a fuzzed value goes.
const FUZZ_POINTERS: &[&str] = &[
    "",
    "/request",
    "/request/uid",
    "/request/operation",
    "/request/kind",
    "/request/userInfo",
    "/request/object",
    "/request/object/metadata",
    "/request/object/metadata/annotations",
    "/request/object/metadata/labels",
    "/request/object/spec",
    "/request/object/spec/schedulerName",
    "/request/object/spec/nodeName",
    "/request/object/spec/initContainers",
    "/request/object/spec/containers",
    "/request/object/spec/containers/0",
    "/request/object/spec/containers/0/resources",
    "/request/object/spec/containers/0/resources/limits",
    "/request/object/spec/containers/1/resources/limits/nvidia.com~1gpumem",
    "/request/object/spec/containers/2/resources/requests/nvidia.com~1gpucores",
    "/request/object/spec/containers/0/env",
    "/request/object/spec/containers/0/securityContext",
    "/request/oldObject",
];

fn fuzz_state() -> WebhookState {
    webhook_state(quota("ml", 1, Some(1)), &prometheus::Registry::new())
}

/// Every reply is a 400 or a 200 AdmissionReview v1 with a response.
fn check_reply(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(status == 200 || status == 400, "status {status}");
    if status == 200 {
        let reply: Value = serde_json::from_slice(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&reply["apiVersion"], "admission.k8s.io/v1");
        prop_assert!(reply["response"]["allowed"].is_boolean());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes never make the webhook fail or panic.
    #[test]
    fn fuzz_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let state = fuzz_state();
        let (status, reply) = state.handle(&body);
        check_reply(status.as_u16(), &reply)?;
    }

    /// Reviews with any part replaced by arbitrary JSON never make the webhook fail or panic.
    #[test]
    fn fuzz_mangled_reviews(index in 0..FUZZ_POINTERS.len(), value in any_json(), update in any::<bool>()) {
        let state = fuzz_state();
        let mut review = fixture(if update { "c18-update.json" } else { "gpu-pod.json" });
        let pointer = FUZZ_POINTERS[index];
        match review.pointer_mut(pointer) {
            Some(slot) => *slot = value,
            None => review = value,
        }
        let (status, reply) = state.handle(&serde_json::to_vec(&review).unwrap());
        check_reply(status.as_u16(), &reply)?;
    }
}

#[tokio::test]
async fn fuzzed_bodies_over_https_never_get_5xx() {
    let server = Server::start(WebhookConfig::default()).await;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let mut bodies = Vec::new();
    let strategy = (0..FUZZ_POINTERS.len(), any_json());
    for _ in 0..24 {
        let (index, value) = strategy.new_tree(&mut runner).unwrap().current();
        let mut review = fixture("gpu-pod.json");
        if let Some(slot) = review.pointer_mut(FUZZ_POINTERS[index]) {
            *slot = value;
        }
        bodies.push(serde_json::to_vec(&review).unwrap());
    }
    for body in bodies {
        let (status, reply) = server.post(body).await;
        assert!(
            status == 200 || status == 400,
            "{status}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Metrics and TLS
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_requests_by_operation_and_result() {
    let server = Server::start(WebhookConfig::default()).await;
    server.admit(&fixture("gpu-pod.json")).await;
    server.admit(&fixture("gpu-pod.json")).await;
    server.admit(&fixture("cpu-pod.json")).await;
    server.admit(&fixture("node-name-preset.json")).await;
    server.admit(&fixture("c18-update.json")).await;
    server.post(b"{".to_vec()).await;

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&server.registry.gather())
        .unwrap();
    for line in [
        "hami_webhook_requests_total{operation=\"CREATE\",result=\"mutated\"} 2",
        "hami_webhook_requests_total{operation=\"CREATE\",result=\"allowed\"} 1",
        "hami_webhook_requests_total{operation=\"CREATE\",result=\"denied\"} 1",
        "hami_webhook_requests_total{operation=\"UPDATE\",result=\"mutated\"} 1",
        "hami_webhook_requests_total{operation=\"unknown\",result=\"error\"} 1",
        "hami_webhook_request_duration_seconds_count{operation=\"CREATE\"} 4",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test]
async fn rotated_certificate_is_served_without_restart() {
    let dir = TempDir::new();
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    let cert_a = write_self_signed(&cert_path, &key_path);
    let cert = Arc::new(ReloadingCert::new(&cert_path, &key_path, Duration::ZERO).unwrap());
    let listener = TlsListener::new(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls::server_config(cert).unwrap(),
    )
    .unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let state = webhook_state(WebhookConfig::default(), &prometheus::Registry::new());
    let task = tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let body = || serde_json::to_vec(&fixture("cpu-pod.json")).unwrap();

    assert_eq!(post(addr, client_config(&cert_a), body()).await.unwrap().0, 200);
    let (cert_b, key_b) = certgen::self_signed(&["localhost".to_owned()]).unwrap();
    std::fs::write(&key_path, &key_b).unwrap();
    std::fs::write(&cert_path, &cert_b).unwrap();
    assert_eq!(post(addr, client_config(&cert_b), body()).await.unwrap().0, 200);
    // The old certificate is no longer presented.
    assert!(post(addr, client_config(&cert_a), body()).await.is_err());
    task.abort();
}

#[tokio::test]
async fn serve_tls_refuses_a_missing_certificate() {
    let dir = TempDir::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = webhook_state(WebhookConfig::default(), &prometheus::Registry::new());
    let e = tls::serve_tls(
        listener,
        router(state),
        dir.0.join("none.crt"),
        dir.0.join("none.key"),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("none.crt"), "{e}");
}
