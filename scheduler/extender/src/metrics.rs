//! Prometheus metrics of `hami-scheduler serve` (`GET /metrics`), listed with names, types, labels,
//! units and help in [`METRICS`] (the metrics reference, `docs/metrics.md`, is generated from it by
//! `hami-scheduler metrics-doc`).
//!
//! - The extender's own, `hami_scheduler_*`: requests by verb and result, latency histograms by verb,
//!   filter results (a node fits or none does), bind conflicts, nodes by condition, each node's last
//!   heartbeat as the extender read it, pods allocated and pending, annotation errors.
//! - HAMi's allocation view (`reference/hami.md` §6.1, names and labels as HAMi v2.9+):
//!   `hami_gpu_memory_limit_bytes`, `hami_gpu_core_limit_ratio`, `hami_gpu_memory_allocated_bytes`,
//!   `hami_gpu_core_allocated_ratio`, `hami_gpu_shared_count` per GPU, and
//!   `hami_vgpu_memory_allocated_bytes`, `hami_vgpu_core_allocated_ratio` per pod container and device
//!   (with `namespace` and `pod`). Ratios are fractions of one GPU (cores 100 % = 1.0).
//! - Ours beside it: `hami_pod_info` (namespace, pod, pod UID and node of every pod holding GPUs: the
//!   join key between the scheduler's allocation view and the agents' per-pod series, which carry only
//!   `pod_uid`), and fragmentation ([`fragmentation`]).
//! - The webhook's (registered by [`crate::webhook`] in the same registry): `hami_webhook_*`.
//!
//! The state-derived gauges are recomputed from the state on every scrape.
//!
//! **Fragmentation** is FGD's measure (`hami_policy::frag`, Weng et al., ATC '23): a node's
//! fragmentation `F_n(M)` is the expected free GPU share that a request drawn from the workload model
//! `M` cannot use, in GPUs: for each task shape, the free shares of the GPUs that cannot take it (all of
//! the node's free share when fewer GPUs than the shape needs can take it), weighted by the shape's
//! popularity. A GPU's free share is the smaller of its free compute and free memory fractions (zero
//! when unhealthy or out of slots). The model is built from the GPU requests of the pods the extender
//! holds (GPU-only shapes, `hami_policy::gpu_shape`, the most popular covering 95 %); while it holds
//! none, the Alibaba `default` trace's GPU shapes stand in (`hami_policy::DefaultModel`).

use hami_api::metrics::{MetricDef, help_of};
use hami_policy::{
    DefaultModel, GpuUsage, ModelSource, WorkloadHistory, WorkloadModel, build_model, gpu_shape,
};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::state::SchedulerState;

/// Bytes per MiB.
const MIB: f64 = 1_048_576.0;

/// Labels of HAMi's per-GPU limit gauges.
const GPU: &[&str] = &["node", "device_uuid", "device_index", "device_type"];
/// Labels of HAMi's per-GPU allocation gauges.
const GPU_ALLOC: &[&str] = &[
    "node",
    "device_uuid",
    "device_index",
    "device_type",
    "device_cores",
];
/// Labels of HAMi's per-container allocation gauges.
const VGPU: &[&str] = &["namespace", "node", "pod", "container_index", "device_uuid"];

/// Every metric `hami-scheduler serve` exports (the webhook's only when `webhook.enabled`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        "hami_scheduler_requests_total",
        &["verb", "result"],
        "1",
        "Extender requests by verb (filter, prioritize, bind) and result (ok, error, not_synced: refused while the node or pod view is incomplete, bad_request).",
    ),
    MetricDef::histogram(
        "hami_scheduler_request_duration_seconds",
        &["verb"],
        "seconds",
        "Extender request handling time by verb, seconds.",
    ),
    MetricDef::counter(
        "hami_scheduler_filter_results_total",
        &["result"],
        "1",
        "Answered filter requests by result: fit (at least one candidate node can take the pod), no_fit (none can: the pod stays pending).",
    ),
    MetricDef::counter(
        "hami_scheduler_bind_conflicts_total",
        &[],
        "1",
        "Binds refused because capacity was taken meanwhile or the pod changed (409).",
    ),
    MetricDef::counter(
        "hami_scheduler_annotation_errors_total",
        &["object"],
        "1",
        "Malformed HAMi annotations seen, by object kind (node, pod).",
    ),
    MetricDef::gauge(
        "hami_scheduler_nodes",
        &["condition"],
        "1",
        "Nodes by condition: ready, stale (heartbeat missing, old, or stamped in the future), invalid (malformed annotation), no_inventory, blocked (a live pod on it has an undecodable allocation: no new placements).",
    ),
    MetricDef::gauge(
        "hami_scheduler_node_heartbeat_timestamp_seconds",
        &["node"],
        "seconds (Unix time)",
        "Unix time of the node's last usage heartbeat (hami.io/node-nvidia-usage) as the extender read it; nodes without a valid heartbeat have no series.",
    ),
    MetricDef::gauge(
        "hami_scheduler_pods",
        &["state"],
        "1",
        "Pods holding GPUs in the extender's ledger (state allocated, pending ones included), pods bound but not yet allocated by the device plugin within the pending timeout (state pending), and live pods whose allocation annotation cannot be decoded (state undecodable; their nodes take no new placements).",
    ),
    MetricDef::gauge(
        "hami_gpu_memory_limit_bytes",
        GPU,
        "bytes",
        "Schedulable device memory of a GPU, bytes.",
    ),
    MetricDef::gauge(
        "hami_gpu_core_limit_ratio",
        GPU,
        "ratio (1 = one GPU)",
        "Schedulable compute of a GPU, fraction of one GPU.",
    ),
    MetricDef::gauge(
        "hami_gpu_memory_allocated_bytes",
        GPU_ALLOC,
        "bytes",
        "Device memory allocated to pods on a GPU, bytes.",
    ),
    MetricDef::gauge(
        "hami_gpu_core_allocated_ratio",
        GPU_ALLOC,
        "ratio (1 = one GPU)",
        "Compute allocated to pods on a GPU, fraction of one GPU.",
    ),
    MetricDef::gauge(
        "hami_gpu_shared_count",
        GPU_ALLOC,
        "1",
        "Containers sharing a GPU.",
    ),
    MetricDef::gauge(
        "hami_vgpu_memory_allocated_bytes",
        VGPU,
        "bytes",
        "Device memory allocated to one container on one GPU, bytes.",
    ),
    MetricDef::gauge(
        "hami_vgpu_core_allocated_ratio",
        VGPU,
        "ratio (1 = one GPU)",
        "Compute allocated to one container on one GPU, fraction of one GPU.",
    ),
    MetricDef::gauge(
        "hami_pod_info",
        &["namespace", "pod", "pod_uid", "node"],
        "1 (info)",
        "1 for every pod holding GPUs: its namespace, name, UID and node (joins the agents' pod_uid series to namespaces).",
    ),
    MetricDef::gauge(
        "hami_node_gpu_unallocated_gpus",
        &["node"],
        "GPUs",
        "Unallocated GPU capacity of the node: the sum over its GPUs of the smaller of the free compute and free memory fractions (0 for an unhealthy GPU or one out of slots).",
    ),
    MetricDef::gauge(
        "hami_node_gpu_fragmented_gpus",
        &["node"],
        "GPUs",
        "FGD fragmentation of the node: the expected unallocated GPU capacity that a request drawn from the workload model (the held pods' GPU shapes) cannot use.",
    ),
    MetricDef::gauge(
        "hami_cluster_gpu_fragmentation_ratio",
        &[],
        "ratio",
        "FGD fragmentation of the cluster as a fraction of its GPUs: the nodes' hami_node_gpu_fragmented_gpus summed, over the number of GPUs (the simulator's frag_pct / 100).",
    ),
    MetricDef::counter(
        "hami_webhook_requests_total",
        &["operation", "result"],
        "1",
        "Admission requests answered by the mutating webhook, by operation (CREATE, UPDATE, DELETE, CONNECT, unknown) and result (allowed: unchanged, mutated, denied, error: not an AdmissionReview v1).",
    ),
    MetricDef::histogram(
        "hami_webhook_request_duration_seconds",
        &["operation"],
        "seconds",
        "Time to decide one admission request, seconds, by operation.",
    ),
];

/// The scheduler's part of the metrics reference (Markdown).
#[must_use]
pub fn reference_markdown() -> String {
    let (own, webhook): (Vec<MetricDef>, Vec<MetricDef>) =
        METRICS.iter().partition(|d| !d.name.starts_with("hami_webhook_"));
    let mut out = hami_api::metrics::reference_section(
        "hami-scheduler: extender",
        "`hami-scheduler serve`, `GET /metrics` on the extender's address (and on `metricsListen` when \
         set). Generated from `hami_scheduler::metrics::METRICS`. Fragmentation follows FGD (Weng et al., \
         ATC '23) over a workload model of the held pods' GPU requests (the Alibaba default trace's shapes \
         while none is held); see `scheduler/extender/src/metrics.rs`.",
        &own,
    );
    out.push_str(&hami_api::metrics::reference_section(
        "hami-scheduler: webhook",
        "In the same registry when `webhook.enabled`. Generated from `hami_scheduler::metrics::METRICS`.",
        &webhook,
    ));
    out
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // The definitions below are constant and valid; registration into a fresh registry cannot clash.
    r.unwrap_or_else(|e| unreachable!("static metric definition rejected: {e}"))
}

fn opts(name: &str) -> Opts {
    Opts::new(name, help_of(METRICS, name))
}

/// A node's fragmentation numbers, in GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFragmentation {
    /// Node.
    pub node: String,
    /// GPUs on it.
    pub gpus: usize,
    /// Σ free share.
    pub unallocated: f64,
    /// FGD `F_n(M)`.
    pub fragmented: f64,
}

/// The workload model the fragmentation metrics use: the held pods' GPU shapes, the most popular
/// covering 95 %, or the Alibaba default trace's GPU shapes while no pod is held (module docs).
#[must_use]
pub fn workload_model(state: &SchedulerState) -> (WorkloadModel, ModelSource) {
    let fallback = DefaultModel::AlibabaDefault.model();
    build_model(
        state.held_requests().filter_map(gpu_shape),
        &WorkloadHistory::new(1.0, 1, 1),
        hami_policy::workload::DEFAULT_COVERAGE,
        1.0,
        &fallback,
    )
}

/// Per present node with GPUs: unallocated capacity and FGD fragmentation under `model` (module docs).
#[must_use]
pub fn fragmentation(state: &SchedulerState, model: &WorkloadModel) -> Vec<NodeFragmentation> {
    state
        .present_nodes()
        .filter(|n| !n.inventory.gpus.is_empty())
        .map(|n| {
            let unallocated = n
                .inventory
                .gpus
                .iter()
                .zip(&n.gpus)
                .map(|(g, u): (_, &GpuUsage)| hami_policy::fit::free_share(g, *u))
                .sum();
            NodeFragmentation {
                node: n.name().to_owned(),
                gpus: n.inventory.gpus.len(),
                unallocated,
                // Shapes are GPU-only: host CPU is kube-scheduler's business.
                fragmented: hami_policy::node_frag(&n.inventory, &n.gpus, u64::MAX, model),
            }
        })
        .collect()
}

/// The extender's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `hami_scheduler_requests_total{verb, result}`.
    pub requests: IntCounterVec,
    /// `hami_scheduler_request_duration_seconds{verb}`.
    pub latency: HistogramVec,
    /// `hami_scheduler_filter_results_total{result}`.
    pub filter_results: IntCounterVec,
    /// `hami_scheduler_bind_conflicts_total`: binds refused because the capacity was taken meanwhile
    /// (ledger re-check) or the pod patch hit a 409.
    pub bind_conflicts: IntCounter,
    /// `hami_scheduler_annotation_errors_total{object}`: malformed annotations seen on nodes or pods.
    pub annotation_errors: IntCounterVec,
    nodes: IntGaugeVec,
    heartbeat: IntGaugeVec,
    pods: IntGaugeVec,
    gpu_memory_limit: GaugeVec,
    gpu_core_limit: GaugeVec,
    gpu_memory_allocated: GaugeVec,
    gpu_core_allocated: GaugeVec,
    gpu_shared: GaugeVec,
    vgpu_memory: GaugeVec,
    vgpu_core: GaugeVec,
    pod_info: IntGaugeVec,
    unallocated: GaugeVec,
    fragmented: GaugeVec,
    cluster_fragmentation: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = |name: &str| -> &'static [&'static str] {
            METRICS.iter().find(|d| d.name == name).map_or(&[], |d| d.labels)
        };
        let gauge = |name: &str| must(GaugeVec::new(opts(name), labels(name)));
        let int_gauge = |name: &str| must(IntGaugeVec::new(opts(name), labels(name)));
        let counter = |name: &str| must(IntCounterVec::new(opts(name), labels(name)));
        let m = Self {
            requests: counter("hami_scheduler_requests_total"),
            latency: must(HistogramVec::new(
                HistogramOpts::from(opts("hami_scheduler_request_duration_seconds")).buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                labels("hami_scheduler_request_duration_seconds"),
            )),
            filter_results: counter("hami_scheduler_filter_results_total"),
            bind_conflicts: must(IntCounter::with_opts(opts("hami_scheduler_bind_conflicts_total"))),
            annotation_errors: counter("hami_scheduler_annotation_errors_total"),
            nodes: int_gauge("hami_scheduler_nodes"),
            heartbeat: int_gauge("hami_scheduler_node_heartbeat_timestamp_seconds"),
            pods: int_gauge("hami_scheduler_pods"),
            gpu_memory_limit: gauge("hami_gpu_memory_limit_bytes"),
            gpu_core_limit: gauge("hami_gpu_core_limit_ratio"),
            gpu_memory_allocated: gauge("hami_gpu_memory_allocated_bytes"),
            gpu_core_allocated: gauge("hami_gpu_core_allocated_ratio"),
            gpu_shared: gauge("hami_gpu_shared_count"),
            vgpu_memory: gauge("hami_vgpu_memory_allocated_bytes"),
            vgpu_core: gauge("hami_vgpu_core_allocated_ratio"),
            pod_info: int_gauge("hami_pod_info"),
            unallocated: gauge("hami_node_gpu_unallocated_gpus"),
            fragmented: gauge("hami_node_gpu_fragmented_gpus"),
            cluster_fragmentation: must(Gauge::with_opts(opts("hami_cluster_gpu_fragmentation_ratio"))),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.latency.clone()),
            Box::new(m.filter_results.clone()),
            Box::new(m.bind_conflicts.clone()),
            Box::new(m.annotation_errors.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.heartbeat.clone()),
            Box::new(m.pods.clone()),
            Box::new(m.gpu_memory_limit.clone()),
            Box::new(m.gpu_core_limit.clone()),
            Box::new(m.gpu_memory_allocated.clone()),
            Box::new(m.gpu_core_allocated.clone()),
            Box::new(m.gpu_shared.clone()),
            Box::new(m.vgpu_memory.clone()),
            Box::new(m.vgpu_core.clone()),
            Box::new(m.pod_info.clone()),
            Box::new(m.unallocated.clone()),
            Box::new(m.fragmented.clone()),
            Box::new(m.cluster_fragmentation.clone()),
        ] {
            must(m.registry.register(c));
        }
        // Series that dashboards and alerts should see before the first event (a counter whose first
        // sample already holds its first increments shows no rate() for them).
        for verb in ["filter", "prioritize", "bind"] {
            for result in ["ok", "error", "not_synced", "bad_request"] {
                m.requests.with_label_values(&[verb, result]);
            }
            m.latency.with_label_values(&[verb]);
        }
        for r in ["fit", "no_fit"] {
            m.filter_results.with_label_values(&[r]);
        }
        for o in ["node", "pod"] {
            m.annotation_errors.with_label_values(&[o]);
        }
        m
    }

    /// The registry every metric of the binary is registered in (the webhook adds its own to it).
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts an answered filter: `fit` when at least one of the candidates remains, else `no_fit`.
    /// Requests answered with an error are counted by `hami_scheduler_requests_total` only.
    pub fn observe_filter(&self, out: &crate::wire::ExtenderFilterResult) {
        if !out.error.is_empty() {
            return;
        }
        let fits =
            out.node_names.as_ref().map_or(0, Vec::len) + out.nodes.as_ref().map_or(0, |l| l.items.len());
        let result = if fits > 0 { "fit" } else { "no_fit" };
        self.filter_results.with_label_values(&[result]).inc();
    }

    /// Recomputes the state-derived gauges and renders the text exposition format.
    #[must_use]
    pub fn render(&self, state: &SchedulerState, now: u64) -> String {
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let counts = state.node_counts(now);
        for (cond, n) in [
            ("ready", counts.ready),
            ("stale", counts.stale),
            ("invalid", counts.invalid),
            ("no_inventory", counts.no_inventory),
            ("blocked", counts.blocked),
        ] {
            self.nodes.with_label_values(&[cond]).set(to_i64(n));
        }
        self.heartbeat.reset();
        self.pod_info.reset();
        for g in [
            &self.gpu_memory_limit,
            &self.gpu_core_limit,
            &self.gpu_memory_allocated,
            &self.gpu_core_allocated,
            &self.gpu_shared,
            &self.vgpu_memory,
            &self.vgpu_core,
            &self.unallocated,
            &self.fragmented,
        ] {
            g.reset();
        }
        for n in state.present_nodes() {
            if let Some(crate::state::AnnotationState::Valid(hb)) =
                state.node_info(n.name()).map(|i| &i.usage)
            {
                self.heartbeat.with_label_values(&[n.name()]).set(to_i64(*hb));
            }
        }
        let timeout = state.settings().pending_timeout_secs;
        let pending = state
            .pod_records()
            .filter(|(_, r)| r.pending(now, timeout))
            .count();
        self.pods
            .with_label_values(&["allocated"])
            .set(to_i64(state.allocations() as u64));
        self.pods
            .with_label_values(&["pending"])
            .set(to_i64(pending as u64));
        self.pods
            .with_label_values(&["undecodable"])
            .set(to_i64(state.undecodable().count() as u64));
        for (uid, r) in state.pod_records() {
            if r.devices.has_devices() {
                self.pod_info
                    .with_label_values(&[r.namespace.as_str(), r.name.as_str(), uid, r.node.as_str()])
                    .set(1);
            }
        }
        for v in state.gpu_views() {
            let index = v.index.to_string();
            let base = [v.node.as_str(), v.uuid.as_str(), index.as_str(), v.model.as_str()];
            self.gpu_memory_limit
                .with_label_values(&base)
                .set(v.memory_limit_mib as f64 * MIB);
            self.gpu_core_limit
                .with_label_values(&base)
                .set(f64::from(v.core_limit) / 100.0);
            let cores = v.core_limit.to_string();
            let alloc = [base[0], base[1], base[2], base[3], cores.as_str()];
            self.gpu_memory_allocated
                .with_label_values(&alloc)
                .set(v.memory_allocated_mib as f64 * MIB);
            self.gpu_core_allocated
                .with_label_values(&alloc)
                .set(f64::from(v.cores_allocated) / 100.0);
            self.gpu_shared.with_label_values(&alloc).set(f64::from(v.shared));
        }
        for v in state.vgpu_views() {
            let ci = v.container_index.to_string();
            let labels = [
                v.namespace.as_str(),
                v.node.as_str(),
                v.pod.as_str(),
                ci.as_str(),
                v.uuid.as_str(),
            ];
            self.vgpu_memory
                .with_label_values(&labels)
                .set(v.memory_mib as f64 * MIB);
            self.vgpu_core
                .with_label_values(&labels)
                .set(f64::from(v.cores) / 100.0);
        }
        let (model, _) = workload_model(state);
        let frag = fragmentation(state, &model);
        let (mut total_frag, mut gpus) = (0.0, 0usize);
        for f in &frag {
            self.unallocated
                .with_label_values(&[f.node.as_str()])
                .set(f.unallocated);
            self.fragmented
                .with_label_values(&[f.node.as_str()])
                .set(f.fragmented);
            total_frag += f.fragmented;
            gpus += f.gpus;
        }
        self.cluster_fragmentation
            .set(if gpus == 0 { 0.0 } else { total_frag / gpus as f64 });
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_well_formed_and_the_reference_names_each_metric_once() {
        assert_eq!(hami_api::metrics::check_defs(METRICS), Vec::<String>::new());
        let doc = reference_markdown();
        for d in METRICS {
            assert_eq!(doc.matches(&format!("| `{}` |", d.name)).count(), 1, "{}", d.name);
        }
    }

    #[test]
    fn an_empty_state_exposes_listed_families_only() {
        let m = Metrics::new();
        let st = SchedulerState::new(crate::state::Settings::default());
        let text = m.render(&st, 0);
        assert_eq!(
            hami_api::metrics::check_exposition(METRICS, &text, false),
            Vec::<String>::new(),
            "{text}"
        );
        assert!(
            text.contains("hami_cluster_gpu_fragmentation_ratio 0\n"),
            "{text}"
        );
        assert!(
            text.contains("hami_scheduler_pods{state=\"allocated\"} 0"),
            "{text}"
        );
    }
}
