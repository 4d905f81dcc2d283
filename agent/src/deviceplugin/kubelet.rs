//! The plugin's unix socket, registration with the kubelet, and re-registration after a kubelet
//! restart.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

use crate::deviceplugin::DevicePluginConfig;
use crate::deviceplugin::devices::Gpu;
use crate::deviceplugin::metrics::PluginMetrics;
use crate::deviceplugin::pods::PodCache;
use crate::deviceplugin::proto::{
    self, device_plugin_server::DevicePluginServer, registration_client::RegistrationClient,
};
use crate::deviceplugin::response::HostLayout;
use crate::deviceplugin::server::{self, Context, Service};
use crate::error::{AgentError, Result};

/// How long one Register call may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a replaced server may take to close its connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Everything the plugin is configured with.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// This node's name (`AgentConfig::effective_node_name`).
    pub node: String,
    /// The `device_plugin` block.
    pub config: DevicePluginConfig,
    /// Host paths of Allocate responses.
    pub host: HostLayout,
}

impl PluginSettings {
    /// The settings of the agent configuration `cfg`.
    #[must_use]
    pub fn from_agent(cfg: &crate::config::AgentConfig) -> Self {
        let dp = cfg.device_plugin.clone();
        Self {
            node: cfg.effective_node_name(),
            host: HostLayout {
                libvgpu: dp.libvgpu_host_path.clone(),
                ld_so_preload: dp.ld_so_preload_host_path.clone(),
                regions_dir: cfg.paths.regions_dir.clone(),
                host_regions_dir: dp
                    .host_regions_dir
                    .clone()
                    .unwrap_or_else(|| cfg.paths.regions_dir.clone()),
                dev_dir: dp.host_dev_dir.clone(),
            },
            config: dp,
        }
    }
}

/// A running device plugin. Dropping it stops serving (the socket file is removed by [`stop`](Self::stop)).
pub struct DevicePlugin {
    ctx: Arc<Context>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl Drop for DevicePlugin {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// A gRPC channel over the unix socket `path` (the URI is a placeholder tonic requires).
///
/// # Errors
/// The endpoint cannot be built (never for the fixed placeholder URI).
pub async fn unix_channel(path: &Path) -> Result<Channel> {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| AgentError::plugin("gRPC endpoint", e))?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| AgentError::plugin(format!("connecting to {shown}"), e))
}

/// The identity of a file: inode and change time (a socket deleted and created again may get the
/// same inode number back).
fn inode(p: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

impl DevicePlugin {
    /// Starts the plugin: watches this node's pods through `client`, serves the plugin socket and
    /// registers with the kubelet (retrying every `watch_interval_ms` until the kubelet answers, and
    /// again after every kubelet restart). `inventory` carries the GPUs and every change of their
    /// health. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// Invalid settings (`split_count` 0, empty names), the plugin directory missing, metrics.
    pub fn start(
        settings: PluginSettings,
        inventory: watch::Receiver<Vec<Gpu>>,
        client: kube::Client,
    ) -> Result<Self> {
        let cfg = &settings.config;
        let invalid = |m: &str| AgentError::Config {
            path: "device_plugin".into(),
            message: m.to_owned(),
        };
        if cfg.split_count == 0 {
            return Err(invalid("split_count must be at least 1"));
        }
        if cfg.resource_name.is_empty() || settings.node.is_empty() {
            return Err(invalid("resource_name and the node name must not be empty"));
        }
        if cfg.socket_name.is_empty()
            || cfg.socket_name.contains('/')
            || cfg.socket_name == proto::KUBELET_SOCKET
        {
            return Err(invalid(
                "socket_name must be a plain file name other than kubelet.sock",
            ));
        }
        if !cfg.plugin_dir.is_dir() {
            return Err(AgentError::io(
                &cfg.plugin_dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "device plugin directory missing"),
            ));
        }
        let metrics = PluginMetrics::new()?;
        let pods = PodCache::start(client, &settings.node);
        let ctx = Arc::new(Context::new(
            settings.node.clone(),
            cfg.split_count,
            cfg.decision_key_file.clone(),
            settings.host.clone(),
            Duration::from_millis(cfg.cache_wait_ms),
            cfg.consistent_allocate,
            inventory,
            pods,
            metrics,
            cfg.on_region_error,
        ));
        let (stop, stop_rx) = watch::channel(false);
        let socket = cfg.plugin_dir.join(&cfg.socket_name);
        let task = tokio::spawn(supervise(ctx.clone(), settings, stop_rx));
        Ok(Self {
            ctx,
            stop,
            task,
            socket,
        })
    }

    /// The GPU inventory with health and NUMA as the plugin advertises it (every change is sent).
    #[must_use]
    pub fn inventory(&self) -> watch::Receiver<Vec<Gpu>> {
        self.ctx.inventory.clone()
    }

    /// The plugin's counters.
    #[must_use]
    pub fn metrics(&self) -> &PluginMetrics {
        &self.ctx.metrics
    }

    /// The plugin's socket path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving, ends the ListAndWatch streams and removes the socket file.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

/// Serves and registers, again and again, until `stop`.
async fn supervise(ctx: Arc<Context>, settings: PluginSettings, mut stop: watch::Receiver<bool>) {
    let cfg = &settings.config;
    let socket = cfg.plugin_dir.join(&cfg.socket_name);
    let kubelet = cfg.plugin_dir.join(proto::KUBELET_SOCKET);
    let tick = Duration::from_millis(cfg.watch_interval_ms.max(1));
    loop {
        if *stop.borrow() {
            return;
        }
        let (gen_stop, gen_rx) = watch::channel(false);
        let served = serve(&socket, ctx.clone(), gen_rx.clone());
        let (server, ours) = match served {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "device plugin: cannot serve its socket; retrying");
                let _ = tokio::time::timeout(tick, stop.wait_for(|s| *s)).await;
                continue;
            }
        };
        let mut registered: Option<Option<(u64, i64, i64)>> = None;
        let restart = loop {
            if registered.is_none() {
                match register(&kubelet, &cfg.socket_name, &cfg.resource_name).await {
                    Ok(()) => {
                        ctx.metrics.registrations.inc();
                        tracing::info!(resource = %cfg.resource_name, socket = %socket.display(), "device plugin: registered with the kubelet");
                        registered = Some(inode(&kubelet));
                    }
                    Err(e) => tracing::warn!(error = %e, "device plugin: registration failed; retrying"),
                }
            }
            if tokio::time::timeout(tick, stop.wait_for(|s| *s)).await.is_ok() {
                break false;
            }
            if inode(&socket) != Some(ours) {
                tracing::info!("device plugin: socket removed (kubelet restart?); serving again");
                break true;
            }
            if let Some(k) = registered
                && inode(&kubelet) != k
            {
                tracing::info!(
                    "device plugin: kubelet socket recreated (kubelet restart); registering again"
                );
                break true;
            }
        };
        let _ = gen_stop.send(true);
        // Graceful shutdown waits for the clients to hang up; a stale kubelet connection must not
        // hold the next registration back.
        let abort = server.abort_handle();
        if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
            abort.abort();
        }
        if !restart {
            if inode(&socket) == Some(ours) {
                let _ = std::fs::remove_file(&socket);
            }
            return;
        }
    }
}

/// Binds the plugin socket (replacing a stale file) and serves it. Returns the server task and the
/// socket's identity.
fn serve(
    socket: &Path,
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, (u64, i64, i64))> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(socket, e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| AgentError::io(socket, e))?;
    let ino = inode(socket).ok_or_else(|| {
        AgentError::io(
            socket,
            std::io::Error::new(std::io::ErrorKind::NotFound, "socket vanished"),
        )
    })?;
    let service = DevicePluginServer::new(Service::new(ctx, stop.clone()));
    let mut shutdown = stop;
    let task = tokio::spawn(async move {
        let r = Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "device plugin: server ended");
        }
    });
    Ok((task, ino))
}

/// `Registration.Register` on the kubelet socket.
///
/// # Errors
/// The kubelet cannot be reached or refuses.
pub async fn register(kubelet: &Path, endpoint: &str, resource_name: &str) -> Result<()> {
    let what = || format!("registering with {}", kubelet.display());
    let call = async {
        let channel = unix_channel(kubelet).await?;
        RegistrationClient::new(channel)
            .register(proto::RegisterRequest {
                version: proto::VERSION.to_owned(),
                endpoint: endpoint.to_owned(),
                resource_name: resource_name.to_owned(),
                options: Some(server::options()),
            })
            .await
            .map_err(|e| AgentError::plugin(what(), e.message()))?;
        Ok(())
    };
    tokio::time::timeout(REGISTER_TIMEOUT, call)
        .await
        .map_err(|_| AgentError::plugin(what(), "timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_name_host_paths_while_the_agent_works_in_its_own_view() {
        let mut cfg = crate::config::AgentConfig::default();
        cfg.paths.dev_dir = "/host/dev".into();
        cfg.paths.regions_dir = "/usr/local/vgpu/containers".into();
        let s = PluginSettings::from_agent(&cfg);
        // Device files: the kubelet needs the host's /dev, not the agent's /host/dev view.
        assert_eq!(s.host.dev_dir, std::path::Path::new("/dev"));
        // Regions: same path on both sides unless configured otherwise.
        assert_eq!(s.host.regions_dir, s.host.host_regions_dir);
        cfg.device_plugin.host_regions_dir = Some("/var/lib/hami/regions".into());
        let s = PluginSettings::from_agent(&cfg);
        assert_eq!(
            s.host.regions_dir,
            std::path::Path::new("/usr/local/vgpu/containers")
        );
        assert_eq!(
            s.host.host_regions_dir,
            std::path::Path::new("/var/lib/hami/regions")
        );
    }
}
