//! The device plugin's own metrics (a registry of its own, appended to the agent's `/metrics`).

use hami_api::metrics::MetricDef;
use prometheus::{Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::error::{AgentError, Result};

/// Every metric of the device plugin.
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        "hami_device_plugin_allocations_total",
        &["result"],
        "1",
        "Container allocations by the device plugin (label `result`: `ok`, `not_found`, `ambiguous` (retryable), `refused` (decision signature does not verify, peer case C18), `error`).",
    ),
    MetricDef::histogram(
        "hami_device_plugin_allocate_seconds",
        &[],
        "seconds",
        "Time the device plugin took to answer an Allocate call, seconds.",
    ),
    MetricDef::counter(
        "hami_device_plugin_refused_decisions_total",
        &[],
        "1",
        "Pods whose decision the device plugin refused because its signature does not verify (not written by the scheduler for that pod and node; peer case C18); each is marked `hami.io/bind-phase: failed`.",
    ),
    MetricDef::counter(
        "hami_device_plugin_registrations_total",
        &[],
        "1",
        "Successful registrations with the kubelet (one at start and one after every kubelet restart).",
    ),
];

fn err(e: prometheus::Error) -> AgentError {
    AgentError::Metrics(e.to_string())
}

/// The plugin's counters (cheap to clone; clones share the values).
#[derive(Clone)]
pub struct PluginMetrics {
    registry: Registry,
    /// `hami_device_plugin_allocations_total{result}`.
    pub allocations: IntCounterVec,
    /// `hami_device_plugin_allocate_seconds`.
    pub allocate_seconds: Histogram,
    /// `hami_device_plugin_refused_decisions_total`.
    pub refused: IntCounter,
    /// `hami_device_plugin_registrations_total`.
    pub registrations: IntCounter,
}

impl PluginMetrics {
    /// Creates and registers the metrics.
    ///
    /// # Errors
    /// A metric cannot be created (a programming error, reported rather than panicking).
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let help = |n: &str| hami_api::metrics::help_of(METRICS, n);
        let allocations = IntCounterVec::new(Opts::new(METRICS[0].name, help(METRICS[0].name)), &["result"])
            .map_err(err)?;
        let allocate_seconds = Histogram::with_opts(
            HistogramOpts::new(METRICS[1].name, help(METRICS[1].name)).buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .map_err(err)?;
        let refused =
            IntCounter::with_opts(Opts::new(METRICS[2].name, help(METRICS[2].name))).map_err(err)?;
        let registrations =
            IntCounter::with_opts(Opts::new(METRICS[3].name, help(METRICS[3].name))).map_err(err)?;
        // Every result's series exists from the start, so rate() sees the first allocation.
        for result in ["ok", "not_found", "ambiguous", "refused", "error"] {
            allocations.with_label_values(&[result]);
        }
        registry.register(Box::new(allocations.clone())).map_err(err)?;
        registry
            .register(Box::new(allocate_seconds.clone()))
            .map_err(err)?;
        registry.register(Box::new(refused.clone())).map_err(err)?;
        registry.register(Box::new(registrations.clone())).map_err(err)?;
        Ok(Self {
            registry,
            allocations,
            allocate_seconds,
            refused,
            registrations,
        })
    }

    /// The allocation count with `result`.
    #[must_use]
    pub fn allocations(&self, result: &str) -> u64 {
        self.allocations.with_label_values(&[result]).get()
    }

    /// The metrics in the Prometheus text format.
    ///
    /// # Errors
    /// Encoding fails.
    pub fn render(&self) -> Result<String> {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(err)?;
        String::from_utf8(buf).map_err(|e| AgentError::Metrics(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = PluginMetrics::new().unwrap();
        m.allocations.with_label_values(&["ok"]).inc();
        m.registrations.inc();
        m.refused.inc();
        m.allocate_seconds.observe(0.002);
        let t = m.render().unwrap();
        assert_eq!(
            hami_api::metrics::check_exposition(METRICS, &t, true),
            Vec::<String>::new(),
            "{t}"
        );
        assert!(
            t.contains(r#"hami_device_plugin_allocations_total{result="ok"} 1"#),
            "{t}"
        );
        assert_eq!(m.allocations("ok"), 1);
    }
}
