//! The webhook's Prometheus metrics.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::review::{ALLOWED, DENIED, ERROR, MUTATED};
use crate::metrics::METRICS;
use hami_api::metrics::help_of;

/// `hami_webhook_requests_total` and `hami_webhook_request_duration_seconds`.
#[derive(Clone)]
pub(super) struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`; the CREATE and UPDATE series start at 0
    /// so dashboards and alerts see them before the first request.
    pub(super) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "hami_webhook_requests_total",
                help_of(METRICS, "hami_webhook_requests_total"),
            ),
            &["operation", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "hami_webhook_request_duration_seconds",
                help_of(METRICS, "hami_webhook_request_duration_seconds"),
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["operation"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        for op in ["CREATE", "UPDATE"] {
            for result in [ALLOWED, MUTATED, DENIED, ERROR] {
                requests.with_label_values(&[op, result]);
            }
            duration.with_label_values(&[op]);
        }
        Ok(Self { requests, duration })
    }

    /// Counts one answered request and its latency.
    pub(super) fn observe(&self, operation: &str, result: &str, elapsed: Duration) {
        self.requests.with_label_values(&[operation, result]).inc();
        self.duration
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }
}
