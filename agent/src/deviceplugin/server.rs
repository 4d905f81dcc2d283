//! The `DevicePlugin` gRPC service (tonic): ListAndWatch from the inventory channel, Allocate and
//! GetPreferredAllocation from the pod cache (design in the [module docs](super)).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use hami_api::annotations::{BIND_PHASE, BIND_PHASE_FAILED, BIND_PHASE_SUCCESS, DEVICES_TO_ALLOCATE};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::deviceplugin::decision::{self, Choice, PendingPod, PodRef};
use crate::deviceplugin::devices::{self, Gpu, ReplicaRequest};
use crate::deviceplugin::metrics::PluginMetrics;
use crate::deviceplugin::pods::{Patched, PodCache};
use crate::deviceplugin::proto::{self, device_plugin_server::DevicePlugin as DevicePluginService};
use crate::deviceplugin::response::{self, HostLayout};
use crate::error::{AgentError, Result};

/// Longest wait between two reads of the cache while Allocate waits for a decision to show up (it
/// also wakes on every watch event).
const CACHE_POLL: Duration = Duration::from_millis(100);

/// Conflicting patches (the pod changed under us) retried before giving up.
const PATCH_ATTEMPTS: usize = 5;

/// What the service needs to decide.
pub struct Context {
    /// This node's name.
    pub node: String,
    /// Replicas per GPU.
    pub split_count: u32,
    /// The HMAC key file of decision signatures.
    pub key_file: PathBuf,
    /// Host paths of the response.
    pub host: HostLayout,
    /// How long Allocate waits for the cache before listing once.
    pub cache_wait: Duration,
    /// Allocate decides on a fresh (consistent) list of the node's pods instead of the cache.
    pub consistent: bool,
    /// The GPUs and their health.
    pub inventory: watch::Receiver<Vec<Gpu>>,
    /// This node's pods.
    pub pods: PodCache,
    /// Counters.
    pub metrics: PluginMetrics,
    /// The interceptor's failure policy written into every trusted limits file.
    pub on_region_error: hami_api::region::RegionFailure,
    /// Replica IDs handed to init containers → their pod's UID (the kubelet reuses them for the
    /// pod's next containers).
    reused_by: Mutex<HashMap<String, String>>,
    /// Pods already marked failed for a refused decision.
    failed: Mutex<BTreeSet<String>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Context {
    /// A context.
    #[must_use]
    #[allow(clippy::too_many_arguments, reason = "a plain constructor")]
    pub fn new(
        node: String,
        split_count: u32,
        key_file: PathBuf,
        host: HostLayout,
        cache_wait: Duration,
        consistent: bool,
        inventory: watch::Receiver<Vec<Gpu>>,
        pods: PodCache,
        metrics: PluginMetrics,
        on_region_error: hami_api::region::RegionFailure,
    ) -> Self {
        Self {
            node,
            split_count,
            key_file,
            host,
            cache_wait,
            consistent,
            inventory,
            pods,
            metrics,
            on_region_error,
            reused_by: Mutex::new(HashMap::new()),
            failed: Mutex::new(BTreeSet::new()),
        }
    }

    fn key(&self) -> Result<Vec<u8>> {
        let key = std::fs::read(&self.key_file).map_err(|e| AgentError::io(&self.key_file, e))?;
        // A mounted Secret file may end with a newline the scheduler's copy does not have.
        let trimmed = key.trim_ascii_end().len();
        Ok(key[..trimmed].to_vec())
    }

    fn pending(&self, pods: &[Arc<Pod>], key: &[u8]) -> Vec<PendingPod> {
        pods.iter()
            .filter_map(|p| decision::pending_pod(p, &self.node, key))
            .filter_map(|r| {
                r.map_err(|e| tracing::warn!(error = %e, "device plugin: pending pod skipped"))
                    .ok()
            })
            .collect()
    }

    /// Marks refused pods `bind-phase: failed` (once each).
    async fn fail_refused(&self, refused: &[PodRef]) {
        for p in refused {
            if !locked(&self.failed).insert(p.uid.clone()) {
                continue;
            }
            self.metrics.refused.inc();
            tracing::warn!(pod = %p, "device plugin: decision refused (signature does not verify); bind-phase failed");
            let ann = BTreeMap::from([(BIND_PHASE.to_owned(), BIND_PHASE_FAILED.to_owned())]);
            if let Err(e) = self
                .pods
                .patch_annotations(&p.namespace, &p.name, None, &ann)
                .await
            {
                tracing::warn!(pod = %p, error = %e, "device plugin: marking a refused pod failed");
            }
        }
    }

    /// Allocates one container: finds its decision, prepares its region directory, marks it allocated.
    ///
    /// # Errors
    /// See [`decision::choose`]; API server and file errors.
    pub async fn allocate_container(&self, ids: &[String]) -> Result<proto::ContainerAllocateResponse> {
        let gpus = self.inventory.borrow().clone();
        let req = ReplicaRequest::resolve(ids, &gpus, self.split_count)?;
        let key = self.key()?;
        let deadline = Instant::now() + self.cache_wait;
        let mut listed: Option<Vec<Arc<Pod>>> = if self.consistent {
            Some(self.pods.list().await?)
        } else {
            let _ = self.pods.wait_ready(self.cache_wait).await;
            None
        };
        let mut conflicts = 0;
        loop {
            let changed = self.pods.changed();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let pods = listed.clone().unwrap_or_else(|| self.pods.pods());
            let pending = self.pending(&pods, &key);
            let reused = locked(&self.reused_by).clone();
            let d = decision::choose(&pending, &req, &reused, &self.node);
            let choice = match d.result {
                Ok(c) => c,
                Err(AgentError::DecisionNotFound { .. } | AgentError::DecisionRefused { .. })
                    if listed.is_none() =>
                {
                    let now = Instant::now();
                    if now < deadline {
                        let _ = tokio::time::timeout((deadline - now).min(CACHE_POLL), changed).await;
                    } else {
                        listed = Some(self.pods.list().await?);
                    }
                    continue;
                }
                Err(e) => {
                    self.fail_refused(&d.refused).await;
                    return Err(e);
                }
            };
            self.fail_refused(&d.refused).await;
            if let Some(zero) = choice.devices.0.iter().find(|d| d.memory_mib == 0) {
                // No scheduler of ours writes a 0-MiB share (the webhook and the extender refuse the
                // request); HAMi-core would read the 0 limit as "no limit" (peer case C29).
                return Err(AgentError::plugin(
                    format!("allocating pod {} container {}", choice.pod, choice.container),
                    format!(
                        "the decision gives GPU {} 0 MiB of device memory: refused, a GPU share needs memory",
                        zero.uuid
                    ),
                ));
            }
            let region = response::region_dir(&self.host.regions_dir, &choice.pod.uid, &choice.container)?;
            let host_region =
                response::region_dir(&self.host.host_regions_dir, &choice.pod.uid, &choice.container)?;
            let minors: HashMap<String, u32> = gpus.iter().map(|g| (g.uuid.clone(), g.minor)).collect();
            let resp = response::container_response(
                &choice.devices,
                choice.priority,
                &minors,
                &host_region,
                &self.host,
            )?;
            ensure_region_dir(&region)?;
            write_limits(
                &response::limits_path(&region),
                &response::trusted_limits(&choice.devices, self.on_region_error, choice.priority),
            )?;
            match self.mark_allocated(&choice).await? {
                Patched::Applied(pod) => {
                    self.pods.remember(&choice.resource_version, *pod);
                    if choice.init {
                        let mut r = locked(&self.reused_by);
                        r.retain(|_, uid| *uid != choice.pod.uid || !choice.remaining.has_devices());
                        if choice.remaining.has_devices() {
                            r.extend(req.ids.iter().map(|id| (id.clone(), choice.pod.uid.clone())));
                        }
                    } else if !choice.remaining.has_devices() {
                        locked(&self.reused_by).retain(|_, uid| *uid != choice.pod.uid);
                    }
                    tracing::info!(
                        pod = %choice.pod, container = %choice.container, devices = %req.ids_text(),
                        region = %region.display(), "device plugin: allocated"
                    );
                    return Ok(resp);
                }
                Patched::Conflict => {
                    conflicts += 1;
                    if conflicts >= PATCH_ATTEMPTS {
                        return Err(AgentError::plugin(
                            format!("marking pod {} allocated", choice.pod),
                            format!("{conflicts} conflicting updates in a row"),
                        ));
                    }
                    let fresh = self.pods.get(&choice.pod.namespace, &choice.pod.name).await?;
                    self.pods.remember(&choice.resource_version, fresh.clone());
                    if let Some(l) = listed.as_mut() {
                        for p in l.iter_mut() {
                            if p.metadata.uid == fresh.metadata.uid {
                                *p = Arc::new(fresh.clone());
                            }
                        }
                    }
                }
            }
        }
    }

    async fn mark_allocated(&self, c: &Choice) -> Result<Patched> {
        let mut ann = BTreeMap::from([(
            DEVICES_TO_ALLOCATE.to_owned(),
            c.remaining
                .encode()
                .map_err(|e| AgentError::plugin(format!("encoding {DEVICES_TO_ALLOCATE}"), e))?,
        )]);
        if !c.remaining.has_devices() {
            ann.insert(BIND_PHASE.to_owned(), BIND_PHASE_SUCCESS.to_owned());
        }
        self.pods
            .patch_annotations(&c.pod.namespace, &c.pod.name, Some(&c.resource_version), &ann)
            .await
    }

    /// The preferred IDs for one container request (from a fresh list with `consistent`, else from
    /// the cache; a list that fails falls back to the cache).
    pub async fn preferred(&self, r: &proto::ContainerPreferredAllocationRequest) -> Vec<String> {
        let gpus = self.inventory.borrow().clone();
        let pods = if self.consistent {
            match self.pods.list().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "device plugin: preference from the cache");
                    self.pods.pods()
                }
            }
        } else {
            self.pods.pods()
        };
        let pending = match self.key() {
            Ok(key) => self.pending(&pods, &key),
            Err(e) => {
                tracing::warn!(error = %e, "device plugin: no decision key; no preference from decisions");
                Vec::new()
            }
        };
        let size = usize::try_from(r.allocation_size).unwrap_or(0);
        decision::preferred(
            &pending,
            &r.available_device_i_ds,
            &r.must_include_device_i_ds,
            size,
            |id| {
                devices::gpu_of(id, &gpus, self.split_count)
                    .ok()
                    .map(|g| g.uuid.clone())
            },
        )
    }
}

/// Creates the region directory (0777, so any user in the container can create the region file) when
/// missing. An existing directory is left as it is: a running container may have it mounted.
fn ensure_region_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| AgentError::io(parent, e))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| AgentError::io(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(AgentError::io(dir, e)),
    }
}

/// Writes a container's trusted limits file: a fresh file (mode 0444) in the same directory renamed
/// over `path`, so a reader sees the old or the new limits, never a mix, and whatever was at `path`
/// (even a symbolic link) is replaced rather than written through.
fn write_limits(path: &std::path::Path, limits: &hami_api::region::TrustedLimits) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = path.with_extension(format!("limits.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(limits.to_json().as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AgentError::io(path, e)
    })
}

/// The label of an Allocate outcome in `hami_device_plugin_allocations_total`.
fn result_label(r: &Result<proto::ContainerAllocateResponse>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(AgentError::DecisionNotFound { .. }) => "not_found",
        Err(AgentError::AmbiguousDecision { .. }) => "ambiguous",
        Err(AgentError::DecisionRefused { .. }) => "refused",
        Err(_) => "error",
    }
}

/// The gRPC status of an error (the kubelet shows the message on the pod).
fn status(e: &AgentError) -> Status {
    match e {
        AgentError::UnknownDevice { .. } | AgentError::RepeatedGpu { .. } => {
            Status::invalid_argument(e.to_string())
        }
        AgentError::DecisionNotFound { .. } => Status::not_found(e.to_string()),
        AgentError::AmbiguousDecision { .. } => Status::unavailable(e.to_string()),
        AgentError::DecisionRefused { .. } => Status::permission_denied(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The service of one plugin socket. Its ListAndWatch streams end when `stop` turns true.
pub struct Service {
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
}

impl Service {
    /// A service over `ctx` whose streams end when `stop` turns true.
    #[must_use]
    pub fn new(ctx: Arc<Context>, stop: watch::Receiver<bool>) -> Self {
        Self { ctx, stop }
    }
}

type DeviceStream =
    Pin<Box<dyn Stream<Item = std::result::Result<proto::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePluginService for Service {
    async fn get_device_plugin_options(
        &self,
        _: Request<proto::Empty>,
    ) -> std::result::Result<Response<proto::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<proto::Empty>,
    ) -> std::result::Result<Response<Self::ListAndWatchStream>, Status> {
        let split = self.ctx.split_count;
        let updates = futures::stream::unfold(
            (self.ctx.inventory.clone(), true),
            move |(mut rx, first)| async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let msg = devices::advertised(&rx.borrow_and_update(), split);
                tracing::debug!(devices = msg.devices.len(), "device plugin: ListAndWatch update");
                Some((Ok(msg), (rx, false)))
            },
        );
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        Ok(Response::new(Box::pin(updates.take_until(stopped))))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<proto::PreferredAllocationRequest>,
    ) -> std::result::Result<Response<proto::PreferredAllocationResponse>, Status> {
        let req = req.into_inner();
        let mut container_responses = Vec::new();
        for r in &req.container_requests {
            let ids = self.ctx.preferred(r).await;
            tracing::info!(size = r.allocation_size, preferred = ?ids, "device plugin: GetPreferredAllocation");
            container_responses.push(proto::ContainerPreferredAllocationResponse { device_i_ds: ids });
        }
        Ok(Response::new(proto::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<proto::AllocateRequest>,
    ) -> std::result::Result<Response<proto::AllocateResponse>, Status> {
        let start = Instant::now();
        let mut container_responses = Vec::new();
        for c in req.into_inner().container_requests {
            let span = tracing::info_span!("allocate", devices = %c.devices_ids.join(","));
            let r = self.ctx.allocate_container(&c.devices_ids).instrument(span).await;
            self.ctx
                .metrics
                .allocations
                .with_label_values(&[result_label(&r)])
                .inc();
            match r {
                Ok(resp) => container_responses.push(resp),
                Err(e) => {
                    tracing::warn!(error = %e, "device plugin: Allocate failed");
                    self.ctx
                        .metrics
                        .allocate_seconds
                        .observe(start.elapsed().as_secs_f64());
                    return Err(status(&e));
                }
            }
        }
        self.ctx
            .metrics
            .allocate_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(Response::new(proto::AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        req: Request<proto::PreStartContainerRequest>,
    ) -> std::result::Result<Response<proto::PreStartContainerResponse>, Status> {
        tracing::info!(devices = ?req.get_ref().devices_ids, "device plugin: PreStartContainer");
        Ok(Response::new(proto::PreStartContainerResponse {}))
    }
}

/// The options this plugin registers and answers with.
#[must_use]
pub fn options() -> proto::DevicePluginOptions {
    proto::DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: true,
    }
}
