//! Node registration: publishes the node's GPU inventory (`hami.io/node-nvidia-register`) and the
//! measured-usage summary with a heartbeat (`hami.io/node-nvidia-usage`) as annotations of the
//! agent's own Node.
//!
//! # What is written, and when
//!
//! Every `heartbeat_secs` (HAMi's device plugin: 30 s, `reference/hami.md` §1.2) one JSON merge patch
//! (`application/merge-patch+json`, field manager `hami-agent`) on `nodes/<node>` sets:
//!
//! * `hami.io/node-nvidia-usage`: [`NodeUsage`] with `heartbeat` = Unix seconds now and, per GPU, the
//!   device memory the kernel attributed to containers (sum over running containers, rounded up to MiB),
//!   its largest value since the previous successful publication (sampled every second), and the SM
//!   utilisation over that window (per-container SM-seconds from NVML process samples, summed per GPU,
//!   divided by the window; `null` on the first publication, which has no window). Always written: it
//!   is the heartbeat.
//! * `hami.io/node-nvidia-register`: [`encode_node_register`] of the agent's GPU inventory (HAMi's JSON
//!   plus our extension), with `count` = `device_split_count`, `devmem` = physical MiB ×
//!   `device_memory_scaling`, `devcore` = 100 × `device_core_scaling`, `type` = `NVIDIA-<model>`. Like
//!   HAMi (`plugin/register.go`), written only when its JSON differs from what the node carries: the
//!   first publication writes it, later ones only after the inventory changed or when the node the API
//!   server returned carries another value (someone removed or overwrote it).
//!
//! A failed patch (API error, node missing, no client yet) is logged, counted in
//! `hami_agent_registration_failures_total`, and retried after `retry_secs` (HAMi: 5 s); the peaks keep
//! accumulating until a publication succeeds. Publication starts with the agent; on shutdown nothing is
//! cleared (the scheduler ages the heartbeat out).
//!
//! # Configuration (`registration` block of the agent config)
//!
//! ```json
//! "registration": {
//!   "enabled": false,
//!   "heartbeat_secs": 30,          // usage + heartbeat period (register too, when changed)
//!   "retry_secs": 5,               // after a failed patch
//!   "device_split_count": 10,      // HAMi deviceSplitCount: slots per GPU (`count`)
//!   "device_memory_scaling": 1.0,  // HAMi deviceMemoryScaling: devmem = MiB × this
//!   "device_core_scaling": 1.0,    // HAMi deviceCoreScaling: devcore = 100 × this
//!   "kubeconfig": null             // kubeconfig file; null: $KUBECONFIG, else in-cluster
//! }
//! ```
//!
//! Layers: [`RegistrationConfig`], [`register_devices`], [`register_value`], [`UsageTracker`] and
//! [`patch_body`] are pure; [`run`] is the I/O (kube client, patch loop, clock).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hami_api::annotations::usage::USAGE_VERSION;
use hami_api::annotations::{
    GpuUsageSample, NODE_NVIDIA_REGISTER, NODE_NVIDIA_USAGE, NodeUsage, encode_node_register,
    registered_type_name,
};
use hami_api::device::{DeviceMode, GpuDevice};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::deviceplugin::devices::Gpu;
use crate::error::{AgentError, Result};
use crate::snapshot::{GpuInfo, Snapshot};

/// Field manager of the agent's patches.
pub const FIELD_MANAGER: &str = "hami-agent";

/// How often the usage is sampled between publications (for the peak), at most.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

const MIB: u64 = 1 << 20;

/// Node registration settings (`registration` block of the agent config; module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Publish the node annotations.
    pub enabled: bool,
    /// Publication period, seconds (at least 1).
    pub heartbeat_secs: u64,
    /// Delay before retrying a failed publication, seconds (at least 1).
    pub retry_secs: u64,
    /// HAMi `deviceSplitCount`: the most containers sharing one GPU (registered `count`), at least 1.
    pub device_split_count: u32,
    /// HAMi `deviceMemoryScaling`: registered memory = physical MiB × this (finite, > 0).
    pub device_memory_scaling: f64,
    /// HAMi `deviceCoreScaling`: registered cores = 100 × this (finite, > 0).
    pub device_core_scaling: f64,
    /// Kubeconfig file for the API server; `None`: `$KUBECONFIG`, else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            heartbeat_secs: 30,
            retry_secs: 5,
            device_split_count: hami_api::device::DEFAULT_SPLIT_COUNT,
            device_memory_scaling: 1.0,
            device_core_scaling: 1.0,
            kubeconfig: None,
        }
    }
}

// Floats compare by their bits (`total_cmp`), so equality is reflexive and `Eq` holds.
impl PartialEq for RegistrationConfig {
    fn eq(&self, other: &Self) -> bool {
        self.enabled == other.enabled
            && self.heartbeat_secs == other.heartbeat_secs
            && self.retry_secs == other.retry_secs
            && self.device_split_count == other.device_split_count
            && self
                .device_memory_scaling
                .total_cmp(&other.device_memory_scaling)
                .is_eq()
            && self
                .device_core_scaling
                .total_cmp(&other.device_core_scaling)
                .is_eq()
            && self.kubeconfig == other.kubeconfig
    }
}

impl Eq for RegistrationConfig {}

impl RegistrationConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the field: a zero period, split count, or a scaling factor that is not finite
    /// and positive.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.heartbeat_secs == 0 {
            return Err("registration.heartbeat_secs must be at least 1".into());
        }
        if self.retry_secs == 0 {
            return Err("registration.retry_secs must be at least 1".into());
        }
        if self.device_split_count == 0 {
            return Err("registration.device_split_count must be at least 1".into());
        }
        for (name, v) in [
            ("device_memory_scaling", self.device_memory_scaling),
            ("device_core_scaling", self.device_core_scaling),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!(
                    "registration.{name} must be finite and positive, got {v}"
                ));
            }
        }
        Ok(())
    }
}

/// The register records of the agent's GPUs: uuid and index from discovery, `model` =
/// [`registered_type_name`] of the NVML name, physical memory in whole MiB (floor, as HAMi's
/// `Total/1024/1024`), split count and scaling factors from `cfg`, mode `hami-core`; health and NUMA
/// node from the device plugin's view `health` (matched by UUID: a GPU the plugin reports unhealthy is
/// published unhealthy, so the extender stops placing shares on it, peer case C24; healthy and NUMA
/// unknown when the plugin does not know the GPU or is off). The SM count and NVLink peers are not
/// known to the agent's discovery and stay unknown (0, none). Ordered by index.
#[must_use]
pub fn register_devices(gpus: &[GpuInfo], cfg: &RegistrationConfig, health: &[Gpu]) -> Vec<GpuDevice> {
    let mut out: Vec<GpuDevice> = gpus
        .iter()
        .map(|g| {
            let seen = health.iter().find(|h| h.uuid.eq_ignore_ascii_case(&g.uuid));
            (g, seen)
        })
        .map(|(g, seen)| GpuDevice {
            split_count: cfg.device_split_count,
            memory_scaling: cfg.device_memory_scaling,
            core_scaling: cfg.device_core_scaling,
            mode: DeviceMode::HamiCore,
            healthy: seen.is_none_or(|h| h.healthy),
            numa: seen.and_then(|h| h.numa).and_then(|n| u32::try_from(n).ok()),
            ..GpuDevice::new(
                g.uuid.clone(),
                g.index,
                registered_type_name(&g.name),
                g.memory_total_bytes / MIB,
            )
        })
        .collect();
    out.sort_by_key(|g| g.index);
    out
}

/// The `hami.io/node-nvidia-register` value for the agent's GPUs ([`register_devices`]).
///
/// # Errors
/// [`AgentError::Registration`] when the inventory cannot be encoded (e.g. a UUID with a separator).
pub fn register_value(gpus: &[GpuInfo], cfg: &RegistrationConfig, health: &[Gpu]) -> Result<String> {
    encode_node_register(&register_devices(gpus, cfg, health))
        .map_err(|e| AgentError::registration("encoding the inventory", e))
}

/// The merge-patch body setting the usage annotation and, when given, the register annotation.
#[must_use]
pub fn patch_body(register: Option<&str>, usage: &str) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(r) = register {
        annotations.insert(NODE_NVIDIA_REGISTER.to_owned(), json!(r));
    }
    annotations.insert(NODE_NVIDIA_USAGE.to_owned(), json!(usage));
    json!({"metadata": {"annotations": annotations}})
}

/// Per-GPU device memory of running containers in a snapshot, bytes (allocations whose GPU is unknown
/// are not counted: they cannot be charged to a device).
fn used_bytes(snapshot: &Snapshot) -> BTreeMap<u32, u64> {
    let mut used: BTreeMap<u32, u64> = snapshot.gpus.iter().map(|g| (g.index, 0)).collect();
    for c in snapshot.containers.iter().filter(|c| !c.terminated) {
        for g in &c.gpus {
            if let Some(i) = g.gpu {
                *used.entry(i).or_default() += g.memory_bytes;
            }
        }
    }
    used
}

/// Cumulative SM-seconds per (cgroup id, GPU index) in a snapshot.
fn sm_seconds(snapshot: &Snapshot) -> BTreeMap<(u64, u32), f64> {
    let mut out = BTreeMap::new();
    for c in &snapshot.containers {
        for g in &c.gpus {
            if let Some(i) = g.gpu {
                *out.entry((c.cgroup_id, i)).or_insert(0.0) += g.sm_seconds;
            }
        }
    }
    out
}

/// One observation of the SM counters: CLOCK_MONOTONIC ns and SM-seconds per (cgroup, GPU).
#[derive(Debug, Clone, Default)]
struct SmPoint {
    at_ns: u64,
    seconds: BTreeMap<(u64, u32), f64>,
}

/// Builds [`NodeUsage`] summaries from successive agent snapshots: the current used memory per GPU, its
/// peak since the last publication, and the SM utilisation over the window since the last
/// publication. Pure: the caller supplies snapshots and the heartbeat time.
#[derive(Debug, Clone, Default)]
pub struct UsageTracker {
    /// GPU index → (UUID, used bytes now, peak bytes since the last publication).
    gpus: BTreeMap<u32, (String, u64, u64)>,
    /// SM counters at the start of the window (the last publication, or the first observation).
    window_start: Option<SmPoint>,
    /// SM counters at the latest observation.
    latest: Option<SmPoint>,
}

impl UsageTracker {
    /// A tracker with no observations.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one snapshot into account. GPUs no longer in the snapshot are dropped.
    pub fn observe(&mut self, snapshot: &Snapshot) {
        let used = used_bytes(snapshot);
        let mut gpus = BTreeMap::new();
        for g in &snapshot.gpus {
            let now = used.get(&g.index).copied().unwrap_or(0);
            let peak = self
                .gpus
                .get(&g.index)
                .filter(|(uuid, _, _)| *uuid == g.uuid)
                .map_or(now, |(_, _, p)| (*p).max(now));
            gpus.insert(g.index, (g.uuid.clone(), now, peak));
        }
        self.gpus = gpus;
        let point = SmPoint {
            at_ns: snapshot.taken_at_ns,
            seconds: sm_seconds(snapshot),
        };
        if self.window_start.is_none() {
            self.window_start = Some(point.clone());
        }
        self.latest = Some(point);
    }

    /// The summary to publish with `heartbeat` (Unix seconds). Used and peak memory are rounded up to
    /// MiB; `sm_percent` is `None` before a window of at least one second exists, and otherwise the
    /// SM-seconds gained on the GPU over the window divided by its length, in percent, capped at 100
    /// (a container's counter that went backwards, e.g. a forgotten container, counts as no gain).
    #[must_use]
    pub fn summary(&self, heartbeat: u64) -> NodeUsage {
        let window = match (&self.window_start, &self.latest) {
            (Some(start), Some(end)) if end.at_ns.saturating_sub(start.at_ns) >= 1_000_000_000 => {
                Some((start, end, (end.at_ns - start.at_ns) as f64 / 1e9))
            }
            _ => None,
        };
        let gpus = self
            .gpus
            .iter()
            .map(|(&index, (uuid, used, peak))| {
                let sm_percent = window.map(|(start, end, secs)| {
                    let gained: f64 = end
                        .seconds
                        .iter()
                        .filter(|((_, gpu), _)| *gpu == index)
                        .map(|(key, now)| (now - start.seconds.get(key).copied().unwrap_or(0.0)).max(0.0))
                        .sum();
                    let percent = (gained / secs * 100.0).round().clamp(0.0, 100.0);
                    percent as u32
                });
                GpuUsageSample {
                    uuid: uuid.clone(),
                    used_mib: used.div_ceil(MIB),
                    peak_mib: (*peak).max(*used).div_ceil(MIB),
                    sm_percent,
                }
            })
            .collect();
        NodeUsage {
            version: USAGE_VERSION,
            heartbeat,
            gpus,
        }
    }

    /// Marks the summary as published: peaks restart from the current values and the SM window from
    /// the latest observation.
    pub fn published(&mut self) {
        for (_, used, peak) in self.gpus.values_mut() {
            *peak = *used;
        }
        self.window_start = self.latest.clone();
    }
}

/// Every registration metric. Part of the metrics reference.
pub const METRICS: &[hami_api::metrics::MetricDef] = &[
    hami_api::metrics::MetricDef::counter(
        "hami_agent_registration_failures_total",
        &[],
        "1",
        "Failed publications of the node annotations (API error, node missing, no API client); each is retried after `registration.retry_secs`.",
    ),
    hami_api::metrics::MetricDef::counter(
        "hami_agent_registration_register_writes_total",
        &[],
        "1",
        "Publications that wrote `hami.io/node-nvidia-register` (the inventory changed, or the node carried another value).",
    ),
    hami_api::metrics::MetricDef::gauge(
        "hami_agent_registration_heartbeat_timestamp_seconds",
        &[],
        "seconds (Unix time)",
        "Unix time of the last successful publication of `hami.io/node-nvidia-usage` (the heartbeat).",
    ),
];

fn metrics_err(e: prometheus::Error) -> AgentError {
    AgentError::Metrics(e.to_string())
}

/// The registration metrics (a registry of their own, appended to the agent's `/metrics`; clones share
/// the values).
#[derive(Clone)]
pub struct RegistrationMetrics {
    registry: Registry,
    /// `hami_agent_registration_failures_total`.
    pub failures: IntCounter,
    /// `hami_agent_registration_register_writes_total`.
    pub register_writes: IntCounter,
    /// `hami_agent_registration_heartbeat_timestamp_seconds`.
    pub heartbeat: IntGauge,
}

impl RegistrationMetrics {
    /// Creates and registers the metrics.
    ///
    /// # Errors
    /// A metric cannot be created (a programming error, reported rather than panicking).
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let failures =
            IntCounter::with_opts(Opts::new(METRICS[0].name, METRICS[0].help)).map_err(metrics_err)?;
        let register_writes =
            IntCounter::with_opts(Opts::new(METRICS[1].name, METRICS[1].help)).map_err(metrics_err)?;
        let heartbeat =
            IntGauge::with_opts(Opts::new(METRICS[2].name, METRICS[2].help)).map_err(metrics_err)?;
        registry
            .register(Box::new(failures.clone()))
            .map_err(metrics_err)?;
        registry
            .register(Box::new(register_writes.clone()))
            .map_err(metrics_err)?;
        registry
            .register(Box::new(heartbeat.clone()))
            .map_err(metrics_err)?;
        Ok(Self {
            registry,
            failures,
            register_writes,
            heartbeat,
        })
    }

    /// The metrics in the Prometheus text format.
    ///
    /// # Errors
    /// Encoding fails.
    pub fn render(&self) -> Result<String> {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &self.registry.gather(), &mut buf)
            .map_err(metrics_err)?;
        String::from_utf8(buf).map_err(|e| AgentError::Metrics(e.to_string()))
    }
}

// ---- I/O ----

/// A kube client from `kubeconfig`, else from the environment (`$KUBECONFIG`, else in-cluster).
async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::registration(format!("reading kubeconfig {}", path.display()), e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::registration(format!("kubeconfig {}", path.display()), e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::registration("kube config (KUBECONFIG or in-cluster)", e))?,
    };
    kube::Client::try_from(config).map_err(|e| AgentError::registration("kube client", e))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The publication loop state.
struct Publisher {
    cfg: RegistrationConfig,
    node: String,
    client: Option<kube::Client>,
    tracker: UsageTracker,
    /// The register value the node is known to carry (after a successful patch).
    written_register: Option<String>,
    metrics: RegistrationMetrics,
}

impl Publisher {
    /// One publication attempt from the latest snapshot and the device plugin's health view.
    async fn publish(&mut self, snapshot: &Snapshot, health: &[Gpu]) -> Result<()> {
        let register = register_value(&snapshot.gpus, &self.cfg, health)?;
        let heartbeat = unix_now();
        let usage = self
            .tracker
            .summary(heartbeat)
            .encode()
            .map_err(|e| AgentError::registration("encoding the usage", e))?;
        if self.client.is_none() {
            self.client = Some(client(self.cfg.kubeconfig.as_deref()).await?);
        }
        let Some(client) = self.client.clone() else {
            return Err(AgentError::registration("kube client", "not created"));
        };
        let write_register = self.written_register.as_deref() != Some(register.as_str());
        let body = patch_body(write_register.then_some(register.as_str()), &usage);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let nodes: kube::Api<Node> = kube::Api::all(client);
        let node = nodes
            .patch(&self.node, &params, &Patch::Merge(&body))
            .await
            .map_err(|e| AgentError::registration(format!("patching node {}", self.node), e))?;
        self.tracker.published();
        self.metrics
            .heartbeat
            .set(i64::try_from(heartbeat).unwrap_or(i64::MAX));
        if write_register {
            self.metrics.register_writes.inc();
        }
        // What the node carries now: if someone else changed the register annotation, the next
        // publication writes ours again.
        let carried = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NODE_NVIDIA_REGISTER))
            .cloned();
        self.written_register = carried.filter(|c| *c == register);
        tracing::debug!(node = %self.node, heartbeat, register = write_register, "published node annotations");
        Ok(())
    }
}

/// Publishes the node annotations of `node` forever (module docs): samples `snapshot()` every
/// [`SAMPLE_INTERVAL`] (or every heartbeat, when shorter), publishes at start and then every
/// `heartbeat_secs`, and retries after `retry_secs` when a publication fails. `health` is the device
/// plugin's GPU view (health and NUMA, `None` when the plugin is off): a change of it is published at
/// once. Never returns; abort the task to stop it (nothing is cleared).
pub async fn run(
    cfg: RegistrationConfig,
    node: String,
    metrics: RegistrationMetrics,
    mut health: Option<tokio::sync::watch::Receiver<Vec<Gpu>>>,
    mut snapshot: impl FnMut() -> Snapshot + Send,
) {
    let heartbeat = Duration::from_secs(cfg.heartbeat_secs.max(1));
    let retry = Duration::from_secs(cfg.retry_secs.max(1));
    let sample = SAMPLE_INTERVAL.min(heartbeat);
    let mut publisher = Publisher {
        cfg,
        node,
        client: None,
        tracker: UsageTracker::new(),
        written_register: None,
        metrics,
    };
    let mut next_publish = tokio::time::Instant::now();
    loop {
        let snap = snapshot();
        publisher.tracker.observe(&snap);
        let now = tokio::time::Instant::now();
        if now >= next_publish {
            let gpus = health
                .as_mut()
                .map(|h| h.borrow_and_update().clone())
                .unwrap_or_default();
            match publisher.publish(&snap, &gpus).await {
                Ok(()) => next_publish = now + heartbeat,
                Err(e) => {
                    publisher.metrics.failures.inc();
                    tracing::warn!(error = %e, retry_secs = retry.as_secs(), "node registration failed");
                    next_publish = now + retry;
                }
            }
        }
        let wake = (tokio::time::Instant::now() + sample).min(next_publish);
        let changed = async {
            match health.as_mut() {
                Some(h) => {
                    if h.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = changed => next_publish = tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use hami_api::annotations::decode_node_register;

    use super::*;
    use crate::cgroup::Identity;
    use crate::snapshot::{AgentStats, Container, GpuMemory};

    fn gpu(index: u32, uuid: &str, mib: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H200".into(),
            memory_total_bytes: mib * MIB + 123,
        }
    }

    fn memory(gpu: u32, bytes: u64, sm_seconds: f64) -> GpuMemory {
        GpuMemory {
            gpu: Some(gpu),
            uuid: None,
            memory_bytes: bytes,
            memory_peak_bytes: bytes,
            memory_byte_seconds: 0.0,
            allocations: 1,
            frees: 0,
            released: 0,
            failed_allocations: 0,
            sm_seconds,
            hard_limit_kills: 0,
        }
    }

    fn container(cgroup_id: u64, terminated: bool, gpus: Vec<GpuMemory>) -> Container {
        Container {
            cgroup_id,
            cgroup_path: None,
            identity: Identity::default(),
            terminated,
            gpus,
            managed: None,
            cuda_calls: BTreeMap::new(),
        }
    }

    fn snapshot(at_s: f64, containers: Vec<Container>) -> Snapshot {
        Snapshot {
            node: "n1".into(),
            taken_at_ns: (at_s * 1e9) as u64,
            gpus: vec![gpu(1, "GPU-b", 2048), gpu(0, "GPU-a", 1024)],
            containers,
            agent: AgentStats::default(),
        }
    }

    #[test]
    fn register_value_decodes_to_the_inventory_with_the_configured_knobs() {
        let cfg = RegistrationConfig {
            device_split_count: 4,
            device_memory_scaling: 1.5,
            device_core_scaling: 2.0,
            ..RegistrationConfig::default()
        };
        let value = register_value(&snapshot(0.0, vec![]).gpus, &cfg, &[]).unwrap();
        let decoded = decode_node_register(&value).unwrap();
        assert_eq!(decoded, register_devices(&snapshot(0.0, vec![]).gpus, &cfg, &[]));
        let uuids: Vec<_> = decoded.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-a", "GPU-b"]);
        // Floor of the bytes in MiB; HAMi's derived fields on the wire.
        assert_eq!(decoded[0].memory_mib, 1024);
        assert_eq!(decoded[0].model, "NVIDIA-NVIDIA H200");
        assert_eq!(decoded[1].split_count, 4);
        let wire: Value = serde_json::from_str(&value).unwrap();
        assert_eq!(wire[1]["devmem"], 3072);
        assert_eq!(wire[1]["devcore"], 200);
        assert_eq!(wire[1]["count"], 4);
        assert_eq!(wire[1]["index"], 1);
        assert_eq!(wire[0].get("index"), None, "HAMi omits index 0");
        assert_eq!(wire[0]["health"], true);
        assert_eq!(wire[0]["mode"], "hami-core");

        let bad = vec![GpuInfo {
            uuid: "GPU-a,b".into(),
            ..gpu(0, "x", 1)
        }];
        assert!(register_value(&bad, &cfg, &[]).is_err());
    }

    /// C24: the device plugin's health view reaches the register annotation: GPU-b lost → published
    /// unhealthy (every replica of it is Unhealthy on the kubelet side too), with its NUMA node; a GPU
    /// the plugin does not know stays healthy with NUMA unknown.
    #[test]
    fn c24_health_and_numa_come_from_the_device_plugin() {
        let cfg = RegistrationConfig::default();
        let gpus = snapshot(0.0, vec![]).gpus;
        let view = |b_healthy| {
            vec![Gpu {
                uuid: "gpu-B".into(),
                minor: 1,
                numa: Some(1),
                healthy: b_healthy,
            }]
        };
        let decoded = decode_node_register(&register_value(&gpus, &cfg, &view(false)).unwrap()).unwrap();
        let health: Vec<(bool, Option<u32>)> = decoded.iter().map(|g| (g.healthy, g.numa)).collect();
        assert_eq!(health, [(true, None), (false, Some(1))]);
        let decoded = decode_node_register(&register_value(&gpus, &cfg, &view(true)).unwrap()).unwrap();
        assert!(decoded.iter().all(|g| g.healthy));
    }

    #[test]
    fn usage_tracks_used_peak_and_sm_window() {
        let mut t = UsageTracker::new();
        // t=0: container 7 holds 100 MiB + 1 byte on GPU 0 with 0.5 SM-s so far; a terminated
        // container's memory is not counted.
        t.observe(&snapshot(
            0.0,
            vec![
                container(7, false, vec![memory(0, 100 * MIB + 1, 0.5)]),
                container(8, true, vec![memory(0, 50 * MIB, 0.0)]),
            ],
        ));
        let first = t.summary(1000);
        assert_eq!(first.heartbeat, 1000);
        assert_eq!(first.gpus.len(), 2);
        assert_eq!(first.gpus[0].uuid, "GPU-a");
        assert_eq!(first.gpus[0].used_mib, 101, "rounded up");
        assert_eq!(first.gpus[0].sm_percent, None, "no window yet");
        assert_eq!(first.gpus[1].used_mib, 0);
        NodeUsage::decode(&first.encode().unwrap()).unwrap();
        t.published();
        // t=1: 300 MiB (peak), t=2: 200 MiB; SM-seconds 0.5 → 1.1 over 2 s = 30 %; GPU 1 gains 4 s
        // over 2 s (two containers) → capped at 100.
        t.observe(&snapshot(
            1.0,
            vec![container(7, false, vec![memory(0, 300 * MIB, 0.8)])],
        ));
        t.observe(&snapshot(
            2.0,
            vec![
                container(7, false, vec![memory(0, 200 * MIB, 1.1), memory(1, MIB, 2.0)]),
                container(9, false, vec![memory(1, 0, 2.0)]),
            ],
        ));
        let second = t.summary(1002);
        assert_eq!(
            second.gpus[0],
            GpuUsageSample {
                uuid: "GPU-a".into(),
                used_mib: 200,
                peak_mib: 300,
                sm_percent: Some(30),
            }
        );
        assert_eq!(second.gpus[1].sm_percent, Some(100));
        // Not published (failure): the peak survives into the next summary.
        t.observe(&snapshot(
            3.0,
            vec![container(7, false, vec![memory(0, 10 * MIB, 1.1)])],
        ));
        assert_eq!(t.summary(1003).gpus[0].peak_mib, 300);
        t.published();
        t.observe(&snapshot(
            4.0,
            vec![container(7, false, vec![memory(0, 20 * MIB, 1.0)])],
        ));
        let third = t.summary(1004);
        assert_eq!(third.gpus[0].peak_mib, 20, "peak restarted at the publication");
        assert_eq!(
            third.gpus[0].sm_percent,
            Some(0),
            "a counter going back is no gain"
        );
    }

    #[test]
    fn patch_body_shapes() {
        assert_eq!(
            patch_body(Some("[]"), "{}"),
            json!({"metadata": {"annotations": {NODE_NVIDIA_REGISTER: "[]", NODE_NVIDIA_USAGE: "{}"}}})
        );
        assert_eq!(
            patch_body(None, "{}"),
            json!({"metadata": {"annotations": {NODE_NVIDIA_USAGE: "{}"}}})
        );
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: RegistrationConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RegistrationConfig::default());
        assert_eq!(
            (c.heartbeat_secs, c.retry_secs, c.device_split_count),
            (30, 5, 10)
        );
        assert!(c.validate().is_ok());
        for bad in [
            r#"{"heartbeat_secs":0}"#,
            r#"{"retry_secs":0}"#,
            r#"{"device_split_count":0}"#,
            r#"{"device_memory_scaling":0}"#,
            r#"{"device_core_scaling":-1}"#,
        ] {
            let c: RegistrationConfig = serde_json::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<RegistrationConfig>(r#"{"heartbeat":1}"#).is_err());
    }

    #[test]
    fn metrics_render() {
        let m = RegistrationMetrics::new().unwrap();
        m.failures.inc();
        let text = m.render().unwrap();
        assert_eq!(
            hami_api::metrics::check_exposition(METRICS, &text, true),
            Vec::<String>::new(),
            "{text}"
        );
        assert!(
            text.contains("hami_agent_registration_failures_total 1"),
            "{text}"
        );
    }
}
