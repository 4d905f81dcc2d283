//! # Chaos soak of the whole node
//!
//! `chaos_soak` runs the real binaries on the simulated GPU node for `HAMI_SOAK_SECONDS` (default 60;
//! `cargo xtask soak --minutes N` sets it): `hami-agent run` (eBPF, device plugin, registration),
//! `hami-scheduler serve` (extender and webhook over HTTPS), the test kubelet, a real Prometheus
//! scraping the agent, and the in-memory API server. Pods arrive continuously (shapes drawn at random:
//! 512 to 2048 MiB, 0 to 50 % cores), each admitted by the webhook, placed through `/filter` and
//! `/bind`, allocated through the device plugin and run as a tenant container (the response's mounts
//! in a private mount namespace, in the pod's cgroup) that allocates most of its memory, launches
//! kernels for a few seconds and exits; the pod is then deleted, as the kubelet and the garbage
//! collector would.
//!
//! Every few seconds one fault, in turn: the agent killed with SIGKILL and restarted; the scheduler
//! killed with SIGKILL and restarted; the test kubelet restarted (the device plugin must register
//! again); Prometheus restarted; the API server answering the next pod patches with 409 Conflict; the
//! API server dropping every watch (410 Expired, relist).
//!
//! Invariants, checked every 250 ms, not only at the end:
//! - **no overcommit**: per GPU, the decisions stored in the API for bound pods never exceed its
//!   memory or its slots;
//! - **attribution**: for every running tenant, the agent's per-container device memory equals the
//!   simulated driver's ground truth; a difference may last at most [`ATTRIBUTION_GRACE`] (a few agent
//!   intervals: allocations, exits and agent restarts take one interval to show);
//! - **chargeback**: every container's byte-seconds and SM-seconds never go backwards, across agent
//!   restarts included;
//! - **no pod pending forever**: a pod not placed within [`PENDING_LIMIT`] while some GPU had room for
//!   it (per the decisions in the API) is a violation;
//! - **flat memory**: the RSS of the agent and of the scheduler, sampled every 2 s, stays within
//!   [`RSS_GROWTH`] of its level at a third of the run (reported per component).
//!
//! The run writes `target/soak/summary.json` (pods, faults of each kind, violations, RSS) and prints
//! it; it fails on any violation. Root only (eBPF, FUSE, cgroups), and it needs `prometheus`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::kubelet::{TestKubelet, allocate, mounts, try_preferred};
use common::scheduler::{Scheduler, admitted_with};
use common::{Env, Stopped, Tenant};
use hami_agent::deviceplugin::proto::device_plugin_client::DevicePluginClient;
use hami_agent::snapshot::Snapshot;
use hami_api::PodDevices;
use hami_api::annotations::{DEVICES_ALLOCATED, VGPU_NODE};
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Pod;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tonic::transport::Channel;

const NODE: &str = "soak-node";
const KEY: &[u8] = b"soak-decision-key";
const GPUS: u32 = 2;
const SPLIT: u32 = 4;
const GPU_MIB: u64 = 4096;
const MIB: u64 = 1 << 20;
const NAMESPACE: &str = "soak";
/// At most this many pods alive at once (created and not yet finished).
const IN_FLIGHT: usize = 8;
/// How long the agent's view may differ from the driver's.
const ATTRIBUTION_GRACE: Duration = Duration::from_millis(1500);
/// How long a pod may wait for a placement while a GPU has room for it.
const PENDING_LIMIT: Duration = Duration::from_secs(30);
/// Allowed RSS growth over a component's level at a third of the run (fraction), plus 32 MiB.
const RSS_GROWTH: f64 = 0.5;
/// Seconds between faults.
const FAULT_EVERY: Duration = Duration::from_secs(4);

/// The faults, injected in this order, round after round.
const FAULTS: [&str; 6] = [
    "agent_kill",
    "scheduler_kill",
    "kubelet_restart",
    "prometheus_restart",
    "api_conflicts",
    "api_watch_drop",
];

enum Phase {
    /// Admitted and stored; waiting for filter and bind.
    Created,
    /// Bound; waiting for Allocate.
    Bound,
    /// Its tenant runs.
    Running(Tenant),
}

struct SoakPod {
    name: String,
    uid: String,
    mib: u64,
    lifetime_ms: u64,
    cgroup: PathBuf,
    created: Instant,
    /// Since when a GPU has had room for it while it waited (reset when it had none).
    room_since: Option<Instant>,
    phase: Phase,
}

#[derive(Debug, Default, serde::Serialize)]
struct Violations {
    overcommit: u64,
    attribution: u64,
    chargeback: u64,
    pending: u64,
    rss: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    seconds: u64,
    pods_created: u64,
    pods_bound: u64,
    pods_completed: u64,
    tenant_failures: u64,
    faults: BTreeMap<String, u64>,
    violations: Violations,
    /// Longest time the agent's view was seen to differ from the driver's, milliseconds (the harness
    /// looks every 250 ms plus the time its own calls take; see `loop_max_ms`).
    attribution_max_lag_ms: u64,
    /// Longest pass of the harness's loop without a fault, milliseconds.
    loop_max_ms: u64,
    /// Size of the agent's saved attribution state at a third of the run and at the end, bytes.
    state_bytes: (u64, u64),
    /// Per component: RSS at a third of the run and the largest RSS after it, KiB.
    rss_kib: BTreeMap<String, (u64, u64)>,
    details: Vec<String>,
}

/// The VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn snapshot(port: u16) -> Option<Snapshot> {
    common::http_get(port, "/snapshot").and_then(|b| serde_json::from_str(&b).ok())
}

/// Per GPU UUID: (slots, MiB) that the decisions stored in the API hold for bound pods.
fn committed(api: &FakeApiServer) -> BTreeMap<String, (u32, u64)> {
    let mut out: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    for p in api.pods() {
        let bound = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE);
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let (Some(alloc), Some(_)) = (ann.get(DEVICES_ALLOCATED), ann.get(VGPU_NODE)) else {
            continue;
        };
        if !bound {
            continue;
        }
        for c in PodDevices::decode(alloc).expect("stored decisions decode").0 {
            for d in c.0 {
                let e = out.entry(d.uuid).or_default();
                *e = (e.0 + 1, e.1 + d.memory_mib);
            }
        }
    }
    out
}

/// A pod as a user writes it.
fn user_pod(name: &str, mib: u64, cores: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"containers": [{
            "name": "main",
            "image": "registry.example/train:1",
            "resources": {"limits": {
                "nvidia.com/gpu": "1",
                "nvidia.com/gpumem": mib.to_string(),
                "nvidia.com/gpucores": cores.to_string(),
            }},
        }]},
    })
}

/// The whole node under test.
struct Rig {
    env: Env,
    api: FakeApiServer,
    kubeconfig: PathBuf,
    key_file: PathBuf,
    plugin_dir: PathBuf,
    host_vgpu: PathBuf,
    agent: Option<Stopped>,
    agent_port: u16,
    scheduler: Option<Scheduler>,
    scheduler_port: u16,
    kubelet: TestKubelet,
    plugin: Option<DevicePluginClient<Channel>>,
    prometheus: Option<Stopped>,
    replica_ids: Vec<String>,
}

impl Rig {
    fn start_agent(&mut self) {
        self.agent = Some(common::launch_agent_on(
            &self.env,
            Path::new(env!("CARGO_BIN_EXE_hami-agent")),
            &[("KUBECONFIG", self.kubeconfig.as_path())],
            Duration::from_secs(60),
            self.agent_port,
        ));
    }

    async fn start_scheduler(&mut self) {
        let s = Scheduler::start_on(
            &self.env.dir,
            &self.key_file,
            &self.kubeconfig,
            self.scheduler_port,
            &json!({}),
        );
        s.wait_ready().await;
        self.scheduler = Some(s);
    }

    fn start_prometheus(&mut self) {
        self.prometheus =
            Some(common::start_prometheus_jobs(&self.env, &[("hami-agent", self.agent_port)], None).0);
    }

    /// The plugin client, connecting after the next registration when there is none.
    async fn plugin(&mut self) -> &mut DevicePluginClient<Channel> {
        if self.plugin.is_none() {
            self.plugin = Some(self.kubelet.connect().await.1);
        }
        self.plugin.as_mut().expect("connected")
    }

    fn sigkill(p: &mut Stopped) {
        let _ = p.0.kill();
        let _ = p.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    let Some(mut env) = Env::new("soak", GPUS, GPU_MIB) else {
        return;
    };
    if !common::prometheus_or_skip("chaos_soak") {
        return;
    }
    let seconds: u64 = std::env::var("HAMI_SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("HAMI_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(42);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let truth = env.node.ground_truth();
    let api = FakeApiServer::start().await.expect("fake API server");
    let common::KubeNode {
        kubeconfig,
        key_file,
        host_vgpu,
        plugin_dir,
    } = common::kube_node(&mut env, &api, NODE, KEY, SPLIT);
    let replica_ids: Vec<String> = truth
        .gpus
        .iter()
        .flat_map(|g| (0..SPLIT).map(move |n| format!("{}-{n}", g.uuid)))
        .collect();
    let kubelet = TestKubelet::start(&plugin_dir);
    let mut rig = Rig {
        env,
        api,
        kubeconfig,
        key_file,
        plugin_dir,
        host_vgpu,
        agent: None,
        agent_port: common::free_port(),
        scheduler: None,
        scheduler_port: common::free_port(),
        kubelet,
        plugin: None,
        prometheus: None,
        replica_ids,
    };
    rig.start_agent();
    rig.start_scheduler().await;
    rig.start_prometheus();
    let preload = std::fs::read_to_string(rig.host_vgpu.join("ld.so.preload")).unwrap();

    let mut summary = Summary {
        seconds,
        ..Summary::default()
    };
    let mut pods: Vec<SoakPod> = Vec::new();
    let mut next_pod = 0u64;
    let mut mismatch_since: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut charged: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let mut rss: BTreeMap<&str, Vec<(Instant, u64)>> = BTreeMap::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut next_fault = start + FAULT_EVERY;
    let mut fault_index = 0usize;
    let mut next_rss = start;

    let state_file = rig.env.cfg.paths.state_dir.join(hami_agent::service::STATE_FILE);
    let mut state_at_third = None;
    while Instant::now() < deadline {
        let pass = Instant::now();
        let mut faulted = false;
        // ---- arrivals ----
        let alive = pods.len();
        if alive < IN_FLIGHT
            && rng.random_bool(0.5)
            && let Some(s) = &rig.scheduler
        {
            let mib = [512, 1024, 2048][rng.random_range(0..3)];
            let cores = [0, 25, 50][rng.random_range(0..3)];
            let name = format!("p{next_pod}");
            let pod = user_pod(&name, mib, cores);
            if let Some(response) = s.review(&pod).await {
                assert_eq!(response["allowed"], true, "{response}");
                let mut admitted = admitted_with(&pod, &response);
                let uid = format!("50a50a50-0000-4000-8000-{next_pod:012x}");
                admitted["metadata"]["uid"] = json!(uid);
                let stored: Pod = serde_json::from_value(admitted).unwrap();
                rig.api.insert_pod(stored);
                let cid = format!("{:064x}", 0x50a0_0000_u64 + next_pod);
                pods.push(SoakPod {
                    cgroup: rig.env.pod_container(&uid, &cid),
                    name,
                    uid,
                    mib,
                    lifetime_ms: rng.random_range(2000..6000),
                    created: Instant::now(),
                    room_since: None,
                    phase: Phase::Created,
                });
                next_pod += 1;
                summary.pods_created += 1;
            }
        }

        // ---- placement: filter and bind, as kube-scheduler calls them ----
        for p in pods.iter_mut().filter(|p| matches!(p.phase, Phase::Created)) {
            let Some(s) = &rig.scheduler else { break };
            let Some(stored) = rig.api.pod(NAMESPACE, &p.name) else {
                continue;
            };
            let args = json!({"Pod": stored, "Nodes": null, "NodeNames": [NODE]});
            let Some((200, body)) = s.request("/filter", Some(&args)).await else {
                continue;
            };
            let f: Value = serde_json::from_slice(&body).unwrap_or_default();
            if f["NodeNames"] != json!([NODE]) {
                continue;
            }
            let bind = json!({"PodName": p.name, "PodNamespace": NAMESPACE, "PodUID": p.uid, "Node": NODE});
            if let Some((200, body)) = s.request("/bind", Some(&bind)).await {
                let b: Value = serde_json::from_slice(&body).unwrap_or_default();
                if b["Error"] == "" {
                    p.phase = Phase::Bound;
                    summary.pods_bound += 1;
                }
            }
        }

        // ---- the kubelet: Allocate, then the container ----
        let bound: Vec<usize> = pods
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.phase, Phase::Bound))
            .map(|(i, _)| i)
            .collect();
        for i in bound {
            if rig.agent.is_none() {
                break;
            }
            let ids = rig.replica_ids.clone();
            let plugin = rig.plugin().await;
            let chosen = match try_preferred(plugin, &ids, &[], 1).await {
                Ok(c) if c.len() == 1 => c,
                Ok(_) => continue,
                Err(_) => {
                    rig.plugin = None;
                    break;
                }
            };
            let plugin = rig.plugin().await;
            let Ok(r) = allocate(plugin, &chosen).await else {
                continue;
            };
            let mut container_env: Vec<(String, String)> = r.envs.clone().into_iter().collect();
            container_env.push(("LD_PRELOAD".into(), preload.trim().to_owned()));
            let envs: Vec<(&str, &str)> = container_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let container_mounts: Vec<(String, String, bool)> = mounts(&r)
                .into_iter()
                .filter(|(c, _, _)| c != "/etc/ld.so.preload")
                .collect();
            let p = &mut pods[i];
            let bytes = (p.mib * 3 / 4 * MIB).to_string();
            let lifetime = p.lifetime_ms.to_string();
            let tenant = rig.env.spawn_container(
                &p.cgroup,
                &container_mounts,
                &[
                    "--device",
                    "0",
                    "--alloc",
                    &bytes,
                    "--launch-for-ms",
                    &lifetime,
                    "--grid",
                    "32",
                ],
                &envs,
            );
            p.phase = Phase::Running(tenant);
        }

        // ---- completions: the pod is deleted once its container ended ----
        let mut i = 0;
        while i < pods.len() {
            let done = match &mut pods[i].phase {
                Phase::Running(t) => t.try_status(),
                _ => None,
            };
            match done {
                Some(status) => {
                    let p = pods.remove(i);
                    if status.success() {
                        summary.pods_completed += 1;
                    } else {
                        summary.tenant_failures += 1;
                        if let Phase::Running(t) = p.phase {
                            let (_, err) = t.outcome();
                            summary
                                .details
                                .push(format!("tenant of {} failed: {err}", p.name));
                        }
                    }
                    rig.api.delete_pod(NAMESPACE, &p.name);
                    let _ = std::fs::remove_dir(&p.cgroup);
                }
                None => i += 1,
            }
        }

        // ---- invariants ----
        let books = committed(&rig.api);
        for (uuid, (slots, mib)) in &books {
            if *slots > SPLIT || *mib > GPU_MIB {
                summary.violations.overcommit += 1;
                summary
                    .details
                    .push(format!("overcommit on {uuid}: {slots} slots, {mib} MiB"));
            }
        }
        let now = Instant::now();
        for p in pods.iter_mut().filter(|p| matches!(p.phase, Phase::Created)) {
            let room = truth.gpus.iter().any(|g| {
                let (slots, mib) = books.get(&g.uuid).copied().unwrap_or_default();
                slots < SPLIT && mib + p.mib <= GPU_MIB
            });
            p.room_since = if room { p.room_since.or(Some(now)) } else { None };
            if p.room_since.is_some_and(|t| now - t > PENDING_LIMIT) {
                summary.violations.pending += 1;
                summary
                    .details
                    .push(format!("{} pending {:?} with room", p.name, now - p.created));
                p.room_since = None;
            }
        }
        if rig.agent.is_some()
            && let Some(snap) = snapshot(rig.agent_port)
        {
            let truth_now = rig.env.node.ground_truth();
            for p in &pods {
                let Phase::Running(t) = &p.phase else { continue };
                let id = common::cgroup_id(&p.cgroup);
                let want: u64 = (0..GPUS).map(|g| truth_now.bytes(t.pid, g)).sum();
                let seen: u64 = snap
                    .containers
                    .iter()
                    .filter(|c| c.cgroup_id == id)
                    .flat_map(|c| &c.gpus)
                    .map(|g| g.memory_bytes)
                    .sum();
                if want == seen {
                    if let Some(since) = mismatch_since.remove(&id) {
                        let lag = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
                        summary.attribution_max_lag_ms = summary.attribution_max_lag_ms.max(lag);
                    }
                } else {
                    let since = *mismatch_since.entry(id).or_insert(now);
                    if now - since > ATTRIBUTION_GRACE {
                        summary.violations.attribution += 1;
                        summary.details.push(format!(
                            "{}: agent {seen} B, driver {want} B for {:?}",
                            p.name,
                            now - since
                        ));
                        mismatch_since.insert(id, now);
                    }
                }
            }
            for c in &snap.containers {
                let bs: f64 = c.gpus.iter().map(|g| g.memory_byte_seconds).sum();
                let sm: f64 = c.gpus.iter().map(|g| g.sm_seconds).sum();
                if let Some((pbs, psm)) = charged.get(&c.cgroup_id)
                    && (bs + 1e-6 < *pbs || sm + 1e-9 < *psm)
                {
                    summary.violations.chargeback += 1;
                    summary.details.push(format!(
                        "cgroup {}: byte-seconds {pbs} -> {bs}, SM-seconds {psm} -> {sm}",
                        c.cgroup_id
                    ));
                }
                charged.insert(c.cgroup_id, (bs, sm));
            }
        }
        if now >= next_rss {
            next_rss = now + Duration::from_secs(2);
            if state_at_third.is_none() && now >= start + Duration::from_secs(seconds / 3) {
                state_at_third = std::fs::metadata(&state_file).ok().map(|m| m.len());
            }
            if let Some(a) = &rig.agent
                && let Some(kib) = rss_kib(a.0.id())
            {
                rss.entry("agent").or_default().push((now, kib));
            }
            if let Some(s) = &rig.scheduler
                && let Some(kib) = rss_kib(s.process.0.id())
            {
                rss.entry("scheduler").or_default().push((now, kib));
            }
        }

        // ---- faults ----
        if now >= next_fault {
            let fault = FAULTS[fault_index % FAULTS.len()];
            fault_index += 1;
            faulted = true;
            // The harness is busy with the fault for a while: differences it could not watch are not
            // held against the agent.
            mismatch_since.clear();
            *summary.faults.entry(fault.to_owned()).or_default() += 1;
            match fault {
                "agent_kill" => {
                    if let Some(mut a) = rig.agent.take() {
                        Rig::sigkill(&mut a);
                    }
                    rig.plugin = None;
                    rig.start_agent();
                }
                "scheduler_kill" => {
                    if let Some(mut s) = rig.scheduler.take() {
                        Rig::sigkill(&mut s.process);
                    }
                    rig.start_scheduler().await;
                }
                "kubelet_restart" => {
                    rig.kubelet.stop().await;
                    rig.kubelet = TestKubelet::start(&rig.plugin_dir);
                    rig.plugin = None;
                }
                "prometheus_restart" => {
                    drop(rig.prometheus.take());
                    rig.start_prometheus();
                }
                "api_conflicts" => rig.api.fail_next("PATCH", "/pods/", 409, 3),
                _ => rig.api.compact_history(),
            }
            next_fault = Instant::now() + FAULT_EVERY;
        }
        if !faulted {
            let ms = u64::try_from(pass.elapsed().as_millis()).unwrap_or(u64::MAX);
            summary.loop_max_ms = summary.loop_max_ms.max(ms);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    summary.state_bytes = (
        state_at_third.unwrap_or(0),
        std::fs::metadata(&state_file).map_or(0, |m| m.len()),
    );

    // ---- the end: let the tenants finish, then stop everything ----
    for p in pods.drain(..) {
        if let Phase::Running(t) = p.phase {
            t.finish();
        }
    }
    let third = start + Duration::from_secs(seconds / 3);
    for (component, samples) in &rss {
        let base = samples.iter().find(|(t, _)| *t >= third).map_or(0, |(_, k)| *k);
        let peak = samples
            .iter()
            .filter(|(t, _)| *t >= third)
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0);
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "KiB"
        )]
        let allowed = (base as f64 * (1.0 + RSS_GROWTH)) as u64 + 32 * 1024;
        if base > 0 && peak > allowed {
            summary.violations.rss += 1;
        }
        summary.rss_kib.insert((*component).to_owned(), (base, peak));
    }
    drop(rig.prometheus.take());
    drop(rig.scheduler.take());
    drop(rig.agent.take());
    rig.kubelet.stop().await;

    let text = serde_json::to_string_pretty(&summary).unwrap();
    let out = common::target_dir().join("soak");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("summary.json"), &text).unwrap();
    println!("{text}");
    let v = &summary.violations;
    assert_eq!(
        (v.overcommit, v.attribution, v.chargeback, v.pending, v.rss),
        (0, 0, 0, 0, 0),
        "violations: {text}"
    );
    assert_eq!(summary.tenant_failures, 0, "{text}");
    assert!(summary.pods_completed > 0, "{text}");
    if seconds >= 6 * FAULT_EVERY.as_secs() {
        assert!(
            FAULTS.iter().all(|f| summary.faults.contains_key(*f)),
            "every fault kind: {text}"
        );
    }
}
