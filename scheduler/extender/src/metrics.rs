//! Prometheus metrics of the extender (`GET /metrics`).
//!
//! Own metrics, `hami_scheduler_*`: request counts by verb and result, latency histograms by verb, bind
//! conflicts, nodes by condition, annotation errors. HAMi's scheduler allocation view
//! (`reference/hami.md` §6.1, names and labels as HAMi v2.9+): `hami_gpu_memory_limit_bytes`,
//! `hami_gpu_core_limit_ratio`, `hami_gpu_memory_allocated_bytes`, `hami_gpu_core_allocated_ratio`,
//! `hami_gpu_shared_count` per GPU, and `hami_vgpu_memory_allocated_bytes`,
//! `hami_vgpu_core_allocated_ratio` per pod container and device. Ratios are fractions of one GPU
//! (cores 100 % = 1.0). The allocation view is recomputed from the state on every scrape.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::state::SchedulerState;

/// Bytes per MiB.
const MIB: f64 = 1_048_576.0;

/// The extender's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `hami_scheduler_requests_total{verb, result}`.
    pub requests: IntCounterVec,
    /// `hami_scheduler_request_duration_seconds{verb}`.
    pub latency: HistogramVec,
    /// `hami_scheduler_bind_conflicts_total`: binds refused because the capacity was taken meanwhile
    /// (ledger re-check) or the pod patch hit a 409.
    pub bind_conflicts: IntCounter,
    /// `hami_scheduler_annotation_errors_total{object}`: malformed annotations seen on nodes or pods.
    pub annotation_errors: IntCounterVec,
    nodes: IntGaugeVec,
    gpu_memory_limit: GaugeVec,
    gpu_core_limit: GaugeVec,
    gpu_memory_allocated: GaugeVec,
    gpu_core_allocated: GaugeVec,
    gpu_shared: GaugeVec,
    vgpu_memory: GaugeVec,
    vgpu_core: GaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // The definitions below are constant and valid; registration into a fresh registry cannot clash.
    r.unwrap_or_else(|e| unreachable!("static metric definition rejected: {e}"))
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
        let gpu_labels = ["node", "device_uuid", "device_index", "device_type"];
        let gpu_alloc_labels = [
            "node",
            "device_uuid",
            "device_index",
            "device_type",
            "device_cores",
        ];
        let vgpu_labels = ["namespace", "node", "pod", "container_index", "device_uuid"];
        let gauge =
            |name: &str, help: &str, labels: &[&str]| must(GaugeVec::new(Opts::new(name, help), labels));
        let m = Self {
            requests: must(IntCounterVec::new(
                Opts::new(
                    "hami_scheduler_requests_total",
                    "Extender requests by verb (filter, prioritize, bind) and result (ok, error, bad_request).",
                ),
                &["verb", "result"],
            )),
            latency: must(HistogramVec::new(
                HistogramOpts::new(
                    "hami_scheduler_request_duration_seconds",
                    "Extender request handling time by verb, seconds.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["verb"],
            )),
            bind_conflicts: must(IntCounter::new(
                "hami_scheduler_bind_conflicts_total",
                "Binds refused because capacity was taken meanwhile or the pod changed (409).",
            )),
            annotation_errors: must(IntCounterVec::new(
                Opts::new(
                    "hami_scheduler_annotation_errors_total",
                    "Malformed HAMi annotations seen, by object kind (node, pod).",
                ),
                &["object"],
            )),
            nodes: must(IntGaugeVec::new(
                Opts::new(
                    "hami_scheduler_nodes",
                    "Nodes by condition: ready, stale (heartbeat missing or old), invalid (malformed annotation), no_inventory.",
                ),
                &["condition"],
            )),
            gpu_memory_limit: gauge(
                "hami_gpu_memory_limit_bytes",
                "Schedulable device memory of a GPU, bytes.",
                &gpu_labels,
            ),
            gpu_core_limit: gauge(
                "hami_gpu_core_limit_ratio",
                "Schedulable compute of a GPU, fraction of one GPU.",
                &gpu_labels,
            ),
            gpu_memory_allocated: gauge(
                "hami_gpu_memory_allocated_bytes",
                "Device memory allocated to pods on a GPU, bytes.",
                &gpu_alloc_labels,
            ),
            gpu_core_allocated: gauge(
                "hami_gpu_core_allocated_ratio",
                "Compute allocated to pods on a GPU, fraction of one GPU.",
                &gpu_alloc_labels,
            ),
            gpu_shared: gauge(
                "hami_gpu_shared_count",
                "Containers sharing a GPU.",
                &gpu_alloc_labels,
            ),
            vgpu_memory: gauge(
                "hami_vgpu_memory_allocated_bytes",
                "Device memory allocated to one container on one GPU, bytes.",
                &vgpu_labels,
            ),
            vgpu_core: gauge(
                "hami_vgpu_core_allocated_ratio",
                "Compute allocated to one container on one GPU, fraction of one GPU.",
                &vgpu_labels,
            ),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.latency.clone()),
            Box::new(m.bind_conflicts.clone()),
            Box::new(m.annotation_errors.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.gpu_memory_limit.clone()),
            Box::new(m.gpu_core_limit.clone()),
            Box::new(m.gpu_memory_allocated.clone()),
            Box::new(m.gpu_core_allocated.clone()),
            Box::new(m.gpu_shared.clone()),
            Box::new(m.vgpu_memory.clone()),
            Box::new(m.vgpu_core.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }

    /// The registry every metric of the binary is registered in (the webhook adds its own to it).
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Recomputes the state-derived gauges and renders the text exposition format.
    #[must_use]
    pub fn render(&self, state: &SchedulerState, now: u64) -> String {
        let counts = state.node_counts(now);
        for (cond, n) in [
            ("ready", counts.ready),
            ("stale", counts.stale),
            ("invalid", counts.invalid),
            ("no_inventory", counts.no_inventory),
        ] {
            self.nodes
                .with_label_values(&[cond])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for g in [
            &self.gpu_memory_limit,
            &self.gpu_core_limit,
            &self.gpu_memory_allocated,
            &self.gpu_core_allocated,
            &self.gpu_shared,
            &self.vgpu_memory,
            &self.vgpu_core,
        ] {
            g.reset();
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
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
