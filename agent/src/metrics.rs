//! Prometheus exposition of a [`Snapshot`] (`prometheus` crate, text format 0.0.4).
//!
//! Names follow `hami_<level>_<what>_<unit>`. Container series carry `node`, `pod_uid`,
//! `container_id` and `cgroup` (the cgroup path; the only identity of a process outside Kubernetes);
//! per-GPU series add `gpu` (index) and `uuid`. A terminated container keeps only its cumulative
//! counters (`*_total`) until its retention ends; its gauges disappear at once, so a finished pod
//! never shows stale memory (peer case C15).

use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use hami_api::metrics::{MetricDef, help_of, reference_section};

use crate::error::{AgentError, Result};
use crate::snapshot::Snapshot;

/// Labels of per-container series.
const CONTAINER: &[&str] = &["node", "pod_uid", "container_id", "cgroup"];
/// Labels of per-container, per-GPU series.
const CONTAINER_GPU: &[&str] = &["node", "pod_uid", "container_id", "cgroup", "gpu", "uuid"];
/// Labels of the per-container CUDA call counter.
const CALL: &[&str] = &["node", "pod_uid", "container_id", "cgroup", "call"];

/// Every metric the agent's telemetry exports. The metrics reference is generated from it.
pub const METRICS: &[MetricDef] = &[
    MetricDef::gauge(
        "hami_container_device_memory_bytes",
        CONTAINER_GPU,
        "bytes",
        "Device memory held by the container on the GPU now, bytes (RM objects seen by the ioctl programs).",
    ),
    MetricDef::gauge(
        "hami_container_device_memory_peak_bytes",
        CONTAINER_GPU,
        "bytes",
        "Highest device memory the container held on the GPU, bytes.",
    ),
    MetricDef::counter(
        "hami_container_device_memory_byte_seconds_total",
        CONTAINER_GPU,
        "byte-seconds",
        "Chargeback: integral of the container's device memory on the GPU over time, byte-seconds.",
    ),
    MetricDef::counter(
        "hami_container_device_memory_allocations_total",
        CONTAINER_GPU,
        "1",
        "Device-memory objects the container created on the GPU.",
    ),
    MetricDef::counter(
        "hami_container_device_memory_frees_total",
        CONTAINER_GPU,
        "1",
        "Device-memory objects the container freed explicitly.",
    ),
    MetricDef::counter(
        "hami_container_device_memory_released_total",
        CONTAINER_GPU,
        "1",
        "Device-memory objects released because their process exited or their parent object was freed.",
    ),
    MetricDef::counter(
        "hami_container_device_memory_failed_allocations_total",
        CONTAINER_GPU,
        "1",
        "Device-memory allocations the driver refused (non-zero RM status).",
    ),
    MetricDef::counter(
        "hami_container_sm_seconds_total",
        CONTAINER_GPU,
        "SM-seconds",
        "Chargeback: SM time of the container on the GPU, SM-seconds (NVML per-process utilisation joined on host pid; 1 = all SMs busy for one second).",
    ),
    MetricDef::counter(
        "hami_container_hard_limit_kills_total",
        CONTAINER_GPU,
        "1",
        "Processes of the container killed by the kernel hard limit (an allocation took the container past its limit).",
    ),
    MetricDef::gauge(
        "hami_container_managed_memory_bytes",
        CONTAINER,
        "bytes",
        "Managed (cuMemAllocManaged) memory reserved by the container now, bytes (seen by the libcuda uprobes).",
    ),
    MetricDef::counter(
        "hami_container_managed_memory_byte_seconds_total",
        CONTAINER,
        "byte-seconds",
        "Chargeback: integral of the container's managed memory over time, byte-seconds.",
    ),
    MetricDef::counter(
        "hami_container_cuda_calls_total",
        CALL,
        "1",
        "Calls of hooked libcuda entry points by the container (label `call`: cuLaunchKernel, cuGraphLaunch, cuMemAlloc_v2, ...).",
    ),
    MetricDef::gauge(
        "hami_gpu_memory_total_bytes",
        &["node", "gpu", "uuid", "model"],
        "bytes",
        "Total device memory of the GPU, bytes (discovery).",
    ),
    MetricDef::gauge(
        "hami_gpu_device_memory_used_bytes",
        &["node", "gpu", "uuid"],
        "bytes",
        "Device memory attributed to containers on the GPU now, bytes (sum over containers).",
    ),
    MetricDef::counter(
        "hami_agent_events_total",
        &["node"],
        "1",
        "Kernel events the agent applied.",
    ),
    MetricDef::gauge(
        "hami_agent_live_objects",
        &["node"],
        "1",
        "Device-memory objects the agent tracks.",
    ),
    MetricDef::gauge(
        "hami_agent_libcuda_missing",
        &["node"],
        "1",
        "Configured libcuda files that do not exist or are not ELF objects: calls through them are not seen by the uprobes.",
    ),
    MetricDef::gauge(
        "hami_agent_uprobe_symbols_missing",
        &["node"],
        "1",
        "Probed libcuda symbols (e.g. the _ptsz twins) that a configured libcuda does not export, summed over libraries.",
    ),
    MetricDef::counter(
        "hami_agent_ioctls_total",
        &["node"],
        "1",
        "Ioctls on NVIDIA device files with an allocation, free, heap-control or XFER escape number, seen by the programs.",
    ),
    MetricDef::counter(
        "hami_agent_malformed_ioctls_total",
        &["node"],
        "1",
        "Ioctl payloads that could not be decoded and were ignored (wrong size, unreadable memory).",
    ),
    MetricDef::counter(
        "hami_agent_ringbuf_dropped_total",
        &["node"],
        "1",
        "Events lost because the ring buffer was full (reconciliation repairs live memory).",
    ),
    MetricDef::counter(
        "hami_agent_alloc_map_full_total",
        &["node"],
        "1",
        "Objects not recorded because the kernel's object map was full.",
    ),
    MetricDef::gauge(
        "hami_agent_hard_limit_mechanism",
        &["node", "mechanism"],
        "1",
        "How the kernel hard limit is enforced: 1 for the active mechanism (`kill`: SIGKILL from the ioctl tracepoint; `lsm`: BPF LSM file_ioctl refuses with ENOMEM, where the kernel allows it), 0 for the other; both 0 when the hard limit is off.",
    ),
    MetricDef::counter(
        "hami_agent_unmatched_frees_total",
        &["node"],
        "1",
        "Frees of objects that were not tracked (allocated before tracing began).",
    ),
];

fn help(name: &str) -> &'static str {
    help_of(METRICS, name)
}

fn err(e: prometheus::Error) -> AgentError {
    AgentError::Metrics(e.to_string())
}

/// Renders the snapshot in the Prometheus text format.
///
/// # Errors
/// A metric cannot be registered or encoded (a programming error, reported rather than panicking).
pub fn render(s: &Snapshot) -> Result<String> {
    let reg = Registry::new();
    let ctr = ["node", "pod_uid", "container_id", "cgroup"];
    let gpu_labels = ["node", "pod_uid", "container_id", "cgroup", "gpu", "uuid"];
    let gauge = |name: &str, labels: &[&str]| -> Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help(name)), labels).map_err(err)?;
        reg.register(Box::new(g.clone())).map_err(err)?;
        Ok(g)
    };
    let counter = |name: &str, labels: &[&str]| -> Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help(name)), labels).map_err(err)?;
        reg.register(Box::new(c.clone())).map_err(err)?;
        Ok(c)
    };
    let fcounter = |name: &str, labels: &[&str]| -> Result<GaugeVec> {
        // A float counter: GaugeVec carries the value; the TYPE line is fixed below.
        let c = GaugeVec::new(Opts::new(name, help(name)), labels).map_err(err)?;
        reg.register(Box::new(c.clone())).map_err(err)?;
        Ok(c)
    };
    let mem = gauge("hami_container_device_memory_bytes", &gpu_labels)?;
    let peak = gauge("hami_container_device_memory_peak_bytes", &gpu_labels)?;
    let bsec = fcounter("hami_container_device_memory_byte_seconds_total", &gpu_labels)?;
    let allocs = counter("hami_container_device_memory_allocations_total", &gpu_labels)?;
    let frees = counter("hami_container_device_memory_frees_total", &gpu_labels)?;
    let released = counter("hami_container_device_memory_released_total", &gpu_labels)?;
    let failed = counter(
        "hami_container_device_memory_failed_allocations_total",
        &gpu_labels,
    )?;
    let sm = fcounter("hami_container_sm_seconds_total", &gpu_labels)?;
    let kills = counter("hami_container_hard_limit_kills_total", &gpu_labels)?;
    let managed = gauge("hami_container_managed_memory_bytes", &ctr)?;
    let managed_bsec = fcounter("hami_container_managed_memory_byte_seconds_total", &ctr)?;
    let mut call_labels = ctr.to_vec();
    call_labels.push("call");
    let calls = counter("hami_container_cuda_calls_total", &call_labels)?;
    let gpu_total = gauge("hami_gpu_memory_total_bytes", &["node", "gpu", "uuid", "model"])?;
    let gpu_used = gauge("hami_gpu_device_memory_used_bytes", &["node", "gpu", "uuid"])?;

    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut used_per_gpu: std::collections::BTreeMap<u32, u64> = Default::default();
    for c in &s.containers {
        let pod = c.identity.pod_uid.as_deref().unwrap_or("");
        let cid = c.identity.container_id.as_deref().unwrap_or("");
        let cg = c
            .cgroup_path
            .clone()
            .unwrap_or_else(|| format!("id:{}", c.cgroup_id));
        let base = [s.node.as_str(), pod, cid, cg.as_str()];
        for g in &c.gpus {
            let gpu = g.gpu.map(|i| i.to_string()).unwrap_or_default();
            let uuid = g.uuid.clone().unwrap_or_default();
            let l = [base[0], base[1], base[2], base[3], gpu.as_str(), uuid.as_str()];
            if !c.terminated {
                mem.with_label_values(&l).set(to_i64(g.memory_bytes));
                peak.with_label_values(&l).set(to_i64(g.memory_peak_bytes));
                if let Some(i) = g.gpu {
                    *used_per_gpu.entry(i).or_default() += g.memory_bytes;
                }
            }
            bsec.with_label_values(&l).set(g.memory_byte_seconds);
            allocs.with_label_values(&l).inc_by(g.allocations);
            frees.with_label_values(&l).inc_by(g.frees);
            released.with_label_values(&l).inc_by(g.released);
            failed.with_label_values(&l).inc_by(g.failed_allocations);
            sm.with_label_values(&l).set(g.sm_seconds);
            kills.with_label_values(&l).inc_by(g.hard_limit_kills);
        }
        if let Some(m) = &c.managed {
            if !c.terminated {
                managed.with_label_values(&base).set(to_i64(m.bytes));
            }
            managed_bsec.with_label_values(&base).set(m.byte_seconds);
        }
        for (call, n) in &c.cuda_calls {
            let l = [base[0], base[1], base[2], base[3], call.as_str()];
            calls.with_label_values(&l).inc_by(*n);
        }
    }
    for g in &s.gpus {
        let idx = g.index.to_string();
        gpu_total
            .with_label_values(&[s.node.as_str(), idx.as_str(), g.uuid.as_str(), g.name.as_str()])
            .set(to_i64(g.memory_total_bytes));
        gpu_used
            .with_label_values(&[s.node.as_str(), idx.as_str(), g.uuid.as_str()])
            .set(to_i64(used_per_gpu.get(&g.index).copied().unwrap_or(0)));
    }
    let a = &s.agent;
    let plain = |name: &str, v: u64| -> Result<()> {
        let c = IntCounterVec::new(Opts::new(name, help(name)), &["node"]).map_err(err)?;
        reg.register(Box::new(c.clone())).map_err(err)?;
        c.with_label_values(&[s.node.as_str()]).inc_by(v);
        Ok(())
    };
    plain("hami_agent_events_total", a.events)?;
    plain("hami_agent_ioctls_total", a.ioctls)?;
    plain("hami_agent_malformed_ioctls_total", a.malformed_ioctls)?;
    plain("hami_agent_ringbuf_dropped_total", a.ringbuf_full)?;
    plain("hami_agent_alloc_map_full_total", a.alloc_map_full)?;
    plain("hami_agent_unmatched_frees_total", a.unmatched_frees)?;
    gauge("hami_agent_live_objects", &["node"])?
        .with_label_values(&[s.node.as_str()])
        .set(to_i64(a.live_objects));
    gauge("hami_agent_libcuda_missing", &["node"])?
        .with_label_values(&[s.node.as_str()])
        .set(to_i64(a.libcuda_missing));
    gauge("hami_agent_uprobe_symbols_missing", &["node"])?
        .with_label_values(&[s.node.as_str()])
        .set(to_i64(a.uprobe_symbols_missing));
    let mechanism = gauge("hami_agent_hard_limit_mechanism", &["node", "mechanism"])?;
    for m in ["kill", "lsm"] {
        mechanism
            .with_label_values(&[s.node.as_str(), m])
            .set(i64::from(a.hard_limit_mechanism.as_deref() == Some(m)));
    }

    let mut buf = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut buf).map_err(err)?;
    let text = String::from_utf8(buf).map_err(|e| AgentError::Metrics(e.to_string()))?;
    // Float counters were registered as gauges (the crate has no settable float counter).
    Ok(text
        .replace(
            "# TYPE hami_container_device_memory_byte_seconds_total gauge",
            "# TYPE hami_container_device_memory_byte_seconds_total counter",
        )
        .replace(
            "# TYPE hami_container_managed_memory_byte_seconds_total gauge",
            "# TYPE hami_container_managed_memory_byte_seconds_total counter",
        )
        .replace(
            "# TYPE hami_container_sm_seconds_total gauge",
            "# TYPE hami_container_sm_seconds_total counter",
        ))
}

/// The agent's part of the metrics reference (Markdown sections, generated from [`METRICS`],
/// [`crate::deviceplugin::metrics::METRICS`] and [`crate::registration::METRICS`]).
#[must_use]
pub fn reference_markdown() -> String {
    let mut out = reference_section(
        "hami-agent: kernel telemetry",
        "`hami-agent run` on every GPU node, `GET /metrics` (`listen`, default port 9394). Generated from \
         `hami_agent::metrics::METRICS`.",
        METRICS,
    );
    out.push_str(&reference_section(
        "hami-agent: device plugin",
        "Appended to the agent's `/metrics` when `device_plugin.enabled`. Generated from \
         `hami_agent::deviceplugin::metrics::METRICS`.",
        crate::deviceplugin::metrics::METRICS,
    ));
    out.push_str(&reference_section(
        "hami-agent: node registration",
        "Appended to the agent's `/metrics` when `registration.enabled`. Generated from \
         `hami_agent::registration::METRICS`.",
        crate::registration::METRICS,
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cgroup::Identity;
    use crate::snapshot::{AgentStats, Container, GpuInfo, GpuMemory};

    fn snap(terminated: bool) -> Snapshot {
        Snapshot {
            node: "n1".into(),
            taken_at_ns: 1,
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-0".into(),
                name: "H200".into(),
                memory_total_bytes: 1 << 30,
            }],
            containers: vec![Container {
                cgroup_id: 5,
                cgroup_path: Some("/kubepods/pod1/c1".into()),
                identity: Identity {
                    pod_uid: Some("u1".into()),
                    container_id: Some("c1".into()),
                    ..Identity::default()
                },
                terminated,
                gpus: vec![GpuMemory {
                    gpu: Some(0),
                    uuid: Some("GPU-0".into()),
                    memory_bytes: 4096,
                    memory_peak_bytes: 8192,
                    memory_byte_seconds: 12.5,
                    allocations: 3,
                    frees: 1,
                    released: 0,
                    failed_allocations: 1,
                    sm_seconds: 0.5,
                    hard_limit_kills: 0,
                }],
                managed: None,
                cuda_calls: BTreeMap::from([("cuLaunchKernel".to_owned(), 7)]),
            }],
            agent: AgentStats::default(),
        }
    }

    #[test]
    fn live_container_series() {
        let t = render(&snap(false)).unwrap();
        assert!(t.contains(r#"hami_container_device_memory_bytes{cgroup="/kubepods/pod1/c1",container_id="c1",gpu="0",node="n1",pod_uid="u1",uuid="GPU-0"} 4096"#), "{t}");
        assert!(t.contains("# TYPE hami_container_device_memory_byte_seconds_total counter"));
        assert!(t.contains(r#"call="cuLaunchKernel""#));
        assert!(
            t.contains(r#"hami_gpu_device_memory_used_bytes{gpu="0",node="n1",uuid="GPU-0"} 4096"#),
            "{t}"
        );
    }

    #[test]
    fn terminated_container_keeps_only_counters() {
        let t = render(&snap(true)).unwrap();
        assert!(!t.contains("hami_container_device_memory_bytes{"), "{t}");
        assert!(!t.contains("hami_container_device_memory_peak_bytes{"));
        assert!(t.contains("hami_container_device_memory_byte_seconds_total{"));
        assert!(
            t.contains(r#"hami_gpu_device_memory_used_bytes{gpu="0",node="n1",uuid="GPU-0"} 0"#),
            "{t}"
        );
    }

    #[test]
    fn every_metric_is_documented_and_named_by_convention() {
        let all: Vec<MetricDef> = METRICS
            .iter()
            .chain(crate::deviceplugin::metrics::METRICS)
            .chain(crate::registration::METRICS)
            .copied()
            .collect();
        assert_eq!(hami_api::metrics::check_defs(&all), Vec::<String>::new());
        let doc = reference_markdown();
        for d in &all {
            assert_eq!(doc.matches(&format!("| `{}` |", d.name)).count(), 1, "{}", d.name);
        }
    }

    #[test]
    fn exposition_matches_the_list() {
        let mut s = snap(false);
        s.containers[0].managed = Some(crate::snapshot::ManagedMemory {
            bytes: 1 << 20,
            peak_bytes: 1 << 20,
            byte_seconds: 3.0,
            allocations: 1,
        });
        let t = render(&s).unwrap();
        assert_eq!(
            hami_api::metrics::check_exposition(METRICS, &t, true),
            Vec::<String>::new(),
            "{t}"
        );
    }
}
