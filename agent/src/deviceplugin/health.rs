//! The GPU inventory and its health from NVML, published on a `watch` channel the plugin streams
//! from.
//!
//! Health is polled: a GPU is `Healthy` while NVML answers for it (`nvmlDeviceGetHandleByUUID` and
//! `nvmlDeviceGetMemoryInfo` succeed) and `Unhealthy` while it does not (e.g. `NVML_ERROR_GPU_IS_LOST`).
//! A GPU that answers again is advertised `Healthy` again at the next poll, with no restart (peer case
//! C05, where HAMi's plugin never recovered a device). XID events are not watched yet.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use crate::deviceplugin::devices::Gpu;
use crate::error::{AgentError, Result};

fn nvml_error(what: &str, e: nvml_wrapper::error::NvmlError) -> AgentError {
    AgentError::plugin(format!("NVML {what}"), e)
}

/// The GPUs NVML reports, healthy or not.
///
/// # Errors
/// NVML cannot count or name the GPUs.
pub fn discover(nvml: &nvml_wrapper::Nvml) -> Result<Vec<Gpu>> {
    let n = nvml.device_count().map_err(|e| nvml_error("device count", e))?;
    let mut out = Vec::new();
    for i in 0..n {
        let d = nvml
            .device_by_index(i)
            .map_err(|e| nvml_error("device handle", e))?;
        out.push(Gpu {
            uuid: d.uuid().map_err(|e| nvml_error("UUID", e))?,
            minor: d.minor_number().map_err(|e| nvml_error("minor number", e))?,
            numa: d.numa_node_id().ok().map(i64::from),
            healthy: d.memory_info().is_ok(),
        });
    }
    Ok(out)
}

/// Whether NVML answers for the GPU `uuid`.
fn answers(nvml: &nvml_wrapper::Nvml, uuid: &str) -> bool {
    nvml.device_by_uuid(uuid).and_then(|d| d.memory_info()).is_ok()
}

/// Discovers the GPUs through NVML (`nvml_lib` overrides the library) and starts a thread that polls
/// their health every `interval`, sending every change. The thread ends when every receiver is gone.
///
/// # Errors
/// NVML cannot be opened or reports no GPU list.
pub fn nvml_inventory(nvml_lib: Option<&Path>, interval: Duration) -> Result<watch::Receiver<Vec<Gpu>>> {
    let nvml = crate::service::open_nvml(nvml_lib)?;
    let gpus = discover(&nvml)?;
    tracing::info!(gpus = gpus.len(), "device plugin: GPUs discovered");
    let (tx, rx) = watch::channel(gpus);
    std::thread::Builder::new()
        .name("hami-dp-health".into())
        .spawn(move || {
            while !tx.is_closed() {
                std::thread::sleep(interval);
                let mut now = tx.borrow().clone();
                let mut changed = false;
                for g in &mut now {
                    let healthy = answers(&nvml, &g.uuid);
                    if healthy != g.healthy {
                        tracing::warn!(uuid = %g.uuid, healthy, "device plugin: GPU health changed");
                        g.healthy = healthy;
                        changed = true;
                    }
                }
                if changed {
                    tx.send_replace(now);
                }
            }
        })
        .map_err(|e| AgentError::plugin("starting the health thread", e))?;
    Ok(rx)
}

/// Starts the device plugin of the agent configuration `cfg`: NVML inventory and health, a kube
/// client from the environment (`KUBECONFIG`, else in-cluster), the plugin. Call inside a tokio
/// runtime.
///
/// # Errors
/// NVML, the kube client configuration, or [`super::DevicePlugin::start`].
pub async fn start_for_agent(cfg: &crate::config::AgentConfig) -> Result<super::DevicePlugin> {
    let dp = &cfg.device_plugin;
    let inventory = nvml_inventory(
        cfg.nvml_lib.as_deref(),
        Duration::from_millis(dp.health_interval_ms.max(1)),
    )?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| AgentError::plugin("kube client (KUBECONFIG or in-cluster)", e))?;
    super::DevicePlugin::start(super::PluginSettings::from_agent(cfg), inventory, client)
}
