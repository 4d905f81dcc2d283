//! Node registration end to end: the agent binary on the simulated GPU node (fake NVML for discovery,
//! the eBPF programs for attribution) publishes its inventory and usage on its Node in the fake API
//! server (`hami-fake-apiserver`), pointed at it through `registration.kubeconfig`. Ground truth is the
//! simulated node (UUIDs, memory, what the fake driver really allocated) and the server's request log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Env;
use hami_agent::registration::RegistrationConfig;
use hami_api::annotations::{
    NODE_NVIDIA_REGISTER, NODE_NVIDIA_USAGE, NodeUsage, decode_node_register, registered_type_name,
};
use hami_fake_apiserver::{FakeApiServer, RecordedRequest};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const NODE: &str = "test-node";
const MIB: u64 = 1 << 20;

fn start_api() -> FakeApiServer {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(FakeApiServer::start())
        .expect("starting the fake API server")
}

fn node() -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(NODE.to_owned()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

fn annotation(api: &FakeApiServer, key: &str) -> Option<String> {
    api.node(NODE)?.metadata.annotations?.get(key).cloned()
}

fn usage(api: &FakeApiServer) -> Option<NodeUsage> {
    annotation(api, NODE_NVIDIA_USAGE).map(|v| NodeUsage::decode(&v).expect("usage annotation decodes"))
}

/// Polls `f` every 50 ms until it returns `Some` (20 s at most).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn node_patches(api: &FakeApiServer) -> Vec<RecordedRequest> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path_and_query.starts_with(&format!("/api/v1/nodes/{NODE}?")))
        .collect()
}

fn writes_register(r: &RecordedRequest) -> bool {
    r.body_json()
        .is_some_and(|b| b["metadata"]["annotations"].get(NODE_NVIDIA_REGISTER).is_some())
}

/// The environment with fake NVML and registration on, every second, against `api`.
fn registering_env(test: &str, api: &FakeApiServer, registration: RegistrationConfig) -> Option<Env> {
    let mut env = Env::new(test, 2, 256)?;
    env.cfg.nvml_lib = Some(common::fake_nvml());
    let kubeconfig = env.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("writing the kubeconfig");
    env.cfg.node_name = NODE.to_owned();
    env.cfg.registration = RegistrationConfig {
        enabled: true,
        heartbeat_secs: 1,
        retry_secs: 1,
        kubeconfig: Some(kubeconfig),
        ..registration
    };
    Some(env)
}

#[test]
fn publishes_inventory_and_usage_heartbeat_and_skips_an_unchanged_register() {
    let api = start_api();
    api.insert_node(node());
    let knobs = RegistrationConfig {
        device_split_count: 4,
        device_memory_scaling: 2.0,
        device_core_scaling: 1.5,
        ..RegistrationConfig::default()
    };
    let Some(env) = registering_env("registration", &api, knobs) else {
        return;
    };
    let (_agent, port) = common::start_agent(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    let truth = env.node.ground_truth();

    // The register annotation decodes back to exactly the simulated GPUs with the configured knobs.
    let register = wait_for("the register annotation", || {
        annotation(&api, NODE_NVIDIA_REGISTER)
    });
    let gpus = decode_node_register(&register).unwrap();
    assert_eq!(gpus.len(), truth.gpus.len());
    for (g, t) in gpus.iter().zip(&truth.gpus) {
        assert_eq!((g.uuid.as_str(), g.index), (t.uuid.as_str(), t.index));
        assert_eq!(g.memory_mib, t.total_bytes / MIB);
        assert_eq!(g.memory_mib, 256);
        assert_eq!(g.split_count, 4);
        assert_eq!(g.schedulable_memory_mib(), 512);
        assert_eq!(g.schedulable_cores(), 150);
        assert!(g.healthy);
        assert_eq!(g.model, registered_type_name(&t.model));
    }

    // The usage heartbeat is fresh and advances.
    let first = wait_for("the usage annotation", || usage(&api));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(first.age_s(now) <= 2, "heartbeat {} at {now}", first.heartbeat);
    let uuids: Vec<_> = first.gpus.iter().map(|g| g.uuid.clone()).collect();
    let truth_uuids: Vec<_> = truth.gpus.iter().map(|g| g.uuid.clone()).collect();
    assert_eq!(uuids, truth_uuids);
    wait_for("a later heartbeat", || {
        usage(&api).filter(|u| u.heartbeat > first.heartbeat)
    });

    // A tenant's allocation (64 MiB on GPU 1, what the fake driver really holds) shows in usedMiB.
    let cg = env.container(1);
    let mut tenant = env.spawn(&cg, &["--device", "1", "--alloc", "67108864", "--hold"], &[]);
    tenant.words("allocated");
    let held = env.node.ground_truth().gpus[1].used_bytes;
    assert_eq!(held, 64 * MIB);
    let with_tenant = wait_for("usage with the tenant", || {
        usage(&api).filter(|u| u.gpus[1].used_mib == held / MIB)
    });
    assert_eq!(with_tenant.gpus[0].used_mib, 0);
    assert!(with_tenant.gpus[1].peak_mib >= with_tenant.gpus[1].used_mib);

    // Wire details; the register annotation went out once although several heartbeats did.
    let patches = node_patches(&api);
    assert!(patches.len() >= 3, "{} patches", patches.len());
    for p in &patches {
        assert_eq!(p.content_type.as_deref(), Some("application/merge-patch+json"));
        assert!(
            p.path_and_query.contains("fieldManager=hami-agent"),
            "{}",
            p.path_and_query
        );
    }
    assert_eq!(patches.iter().filter(|p| writes_register(p)).count(), 1);
    assert!(!writes_register(patches.last().unwrap()));

    // Someone removes the register annotation: the agent puts it back (the node it got back from a
    // heartbeat no longer carries it).
    let mut node = api.node(NODE).unwrap();
    node.metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(NODE_NVIDIA_REGISTER);
    api.insert_node(node);
    let restored = wait_for("the register annotation again", || {
        annotation(&api, NODE_NVIDIA_REGISTER)
    });
    assert_eq!(restored, register);
    assert_eq!(
        node_patches(&api).iter().filter(|p| writes_register(p)).count(),
        2
    );

    let metrics = common::http_get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("hami_agent_registration_failures_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hami_agent_registration_register_writes_total 2"),
        "{metrics}"
    );
    tenant.finish();
}

#[test]
fn failed_publications_are_retried() {
    let api = start_api();
    // The first patch gets a 500; the node does not exist yet, so the second gets a 404.
    api.fail_next("PATCH", &format!("/api/v1/nodes/{NODE}"), 500, 1);
    let Some(env) = registering_env("registration-retry", &api, RegistrationConfig::default()) else {
        return;
    };
    let (_agent, port) = common::start_agent(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    wait_for("two failed patches", || {
        (node_patches(&api).len() >= 2).then_some(())
    });
    assert!(annotation(&api, NODE_NVIDIA_USAGE).is_none());
    api.insert_node(node());
    let usage = wait_for("the usage annotation", || usage(&api));
    assert_eq!(usage.gpus.len(), 2);
    let register = annotation(&api, NODE_NVIDIA_REGISTER).expect("register written with the first success");
    assert_eq!(decode_node_register(&register).unwrap().len(), 2);
    let patches = node_patches(&api);
    // Every attempt carried the register annotation until one succeeded.
    assert!(patches.len() >= 3);
    assert!(patches[..3].iter().all(writes_register));
    let failures = common::http_get(port, "/metrics")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("hami_agent_registration_failures_total ")
                .map(str::to_owned)
        })
        .unwrap();
    let failures: u64 = failures.parse().unwrap();
    assert!(failures >= 2, "{failures} failures");
}
