//! A test kubelet for the device plugin (`reference/kubernetes-testing.md` §4): a tonic `Registration`
//! server on `<plugin dir>/kubelet.sock` that records every `Register`, and the kubelet's side of the
//! `DevicePlugin` API (a client over the socket the registration names), with the calls the kubelet
//! makes in the order it makes them. Shared by `tests/device_plugin.rs` (in-process plugin and the
//! agent binary) and `tests/pod_flow.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hami_agent::deviceplugin::kubelet::unix_channel;
use hami_agent::deviceplugin::proto::{
    self, device_plugin_client::DevicePluginClient, registration_server::Registration,
    registration_server::RegistrationServer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

/// How long the test kubelet waits for a registration or a ListAndWatch message (the agent binary
/// loads its eBPF programs before it serves, which takes a few seconds on a busy machine).
const WAIT: Duration = Duration::from_secs(30);

/// The registration service: forwards every request to the test.
struct Service {
    tx: mpsc::UnboundedSender<proto::RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for Service {
    async fn register(
        &self,
        r: tonic::Request<proto::RegisterRequest>,
    ) -> Result<tonic::Response<proto::Empty>, tonic::Status> {
        let _ = self.tx.send(r.into_inner());
        Ok(tonic::Response::new(proto::Empty {}))
    }
}

/// A running test kubelet serving `Registration` on `<dir>/kubelet.sock`.
pub(crate) struct TestKubelet {
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    registered: mpsc::UnboundedReceiver<proto::RegisterRequest>,
}

impl TestKubelet {
    /// Binds `<dir>/kubelet.sock` (replacing a stale one) and serves. Call inside a tokio runtime.
    pub(crate) fn start(dir: &Path) -> Self {
        let sock = dir.join("kubelet.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).expect("binding kubelet.sock");
        let (tx, registered) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(Service { tx }))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            dir: dir.to_path_buf(),
            stop: Some(stop),
            task,
            registered,
        }
    }

    /// The next `Register` call.
    pub(crate) async fn next_registration(&mut self) -> proto::RegisterRequest {
        tokio::time::timeout(WAIT, self.registered.recv())
            .await
            .expect("a registration in time")
            .expect("registration channel open")
    }

    /// Waits for the next registration and connects to the plugin socket it names (relative to the
    /// plugin directory, as the kubelet resolves `endpoint`).
    pub(crate) async fn connect(&mut self) -> (proto::RegisterRequest, DevicePluginClient<Channel>) {
        let r = self.next_registration().await;
        let ch = unix_channel(&self.dir.join(&r.endpoint))
            .await
            .expect("connecting to the plugin socket");
        (r, DevicePluginClient::new(ch))
    }

    /// Stops serving (as a kubelet going down does).
    pub(crate) async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The next ListAndWatch message.
pub(crate) async fn next(
    s: &mut tonic::Streaming<proto::ListAndWatchResponse>,
) -> proto::ListAndWatchResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a ListAndWatch message in time")
        .expect("ListAndWatch stream healthy")
        .expect("ListAndWatch stream open")
}

/// (ID, health) of every advertised device, in order.
pub(crate) fn health(m: &proto::ListAndWatchResponse) -> Vec<(String, String)> {
    m.devices
        .iter()
        .map(|d| (d.id.clone(), d.health.clone()))
        .collect()
}

/// One container's `Allocate`, as the kubelet sends it.
pub(crate) async fn allocate(
    c: &mut DevicePluginClient<Channel>,
    ids: &[String],
) -> Result<proto::ContainerAllocateResponse, tonic::Status> {
    let r = c
        .allocate(proto::AllocateRequest {
            container_requests: vec![proto::ContainerAllocateRequest {
                devices_ids: ids.to_vec(),
            }],
        })
        .await?
        .into_inner();
    assert_eq!(r.container_responses.len(), 1);
    Ok(r.container_responses
        .into_iter()
        .next()
        .expect("one container response"))
}

/// One container's `GetPreferredAllocation`: the IDs the plugin prefers.
pub(crate) async fn preferred(
    c: &mut DevicePluginClient<Channel>,
    available: &[String],
    must: &[String],
    size: i32,
) -> Vec<String> {
    try_preferred(c, available, must, size)
        .await
        .expect("GetPreferredAllocation")
}

/// [`preferred`], with the plugin's error (a plugin that is restarting answers none).
pub(crate) async fn try_preferred(
    c: &mut DevicePluginClient<Channel>,
    available: &[String],
    must: &[String],
    size: i32,
) -> Result<Vec<String>, tonic::Status> {
    let r = c
        .get_preferred_allocation(proto::PreferredAllocationRequest {
            container_requests: vec![proto::ContainerPreferredAllocationRequest {
                available_device_i_ds: available.to_vec(),
                must_include_device_i_ds: must.to_vec(),
                allocation_size: size,
            }],
        })
        .await?
        .into_inner();
    Ok(r.container_responses
        .first()
        .map(|c| c.device_i_ds.clone())
        .unwrap_or_default())
}

/// (container path, host path, read-only) of the mounts.
pub(crate) fn mounts(r: &proto::ContainerAllocateResponse) -> Vec<(String, String, bool)> {
    r.mounts
        .iter()
        .map(|m| (m.container_path.clone(), m.host_path.clone(), m.read_only))
        .collect()
}

/// (container path, host path, permissions) of the device specs.
pub(crate) fn devices(r: &proto::ContainerAllocateResponse) -> Vec<(String, String, String)> {
    r.devices
        .iter()
        .map(|d| {
            (
                d.container_path.clone(),
                d.host_path.clone(),
                d.permissions.clone(),
            )
        })
        .collect()
}
