//! The mutating admission webhook (AdmissionReview v1, `POST /webhook`, served over HTTPS by
//! [`crate::tls`]).
//!
//! What it does to a pod (HAMi's webhook, `reference/hami.md` §1.3 step 2, with the peer bugs C16, C17,
//! C18 fixed):
//!
//! 1. **Every pod, every scheduler** (C18): the annotations and label only the scheduler and the
//!    device plugin may write ([`SCHEDULER_OWNED_ANNOTATIONS`], [`SCHEDULER_OWNED_LABELS`]) are removed
//!    on CREATE, and on UPDATE by anyone not in [`WebhookConfig::trusted_usernames`] they are put back to
//!    their previous values (so a user cannot forge a decision, nor wipe the scheduler's). This runs
//!    before everything else and also for ignored pods and namespaces, which is why the chart's
//!    `MutatingWebhookConfiguration` must select all pods (no namespace or object selector).
//! 2. Pods labelled `hami.io/webhook: ignore`, pods in [`WebhookConfig::ignored_namespaces`] or in a
//!    namespace the [`ClusterView`] reports as ignored, and pods that name no managed resource in any
//!    init or app container (C17) get nothing more.
//! 3. A pod with managed resources is **denied** (every problem listed, each naming its container and
//!    resource or variable) when: `spec.nodeName` is preset (it would bypass the scheduler); any
//!    container, init or app, is privileged (C16: it sees every GPU of the node); it names a scheduler
//!    other than ours (HAMi lets such pods through unaccounted; here a managed pod must go through our
//!    extender, or its GPUs are invisible to accounting and quota); a resource value is invalid
//!    (negative, fractional, above range, a percentage above 100, request differing from limit, a zero
//!    GPU count next to memory or cores); a managed container sets an environment variable that would
//!    switch enforcement off or change its limits ([`enforcement_env_var`]); or the namespace's GPU
//!    quota would be exceeded by the pod's effective request (the larger of the biggest init container
//!    and the app containers' sum, C02/C17).
//!    The same privileged rule holds for an ephemeral container added later (`kubectl debug`, UPDATE of
//!    `pods/ephemeralcontainers`).
//! 4. Otherwise it is **mutated**: `spec.schedulerName` is set to ours when it is empty,
//!    `default-scheduler` (unless [`WebhookConfig::force_overwrite_default_scheduler`] is off) or already
//!    ours; a container giving only memory, cores or a percentage gets `nvidia.com/gpu: <default count>`;
//!    a whole-GPU request gets `nvidia.com/gpucores: 100` (exclusive, HAMi since v2.7); every managed
//!    resource is written to both requests and limits with the same value (Kubernetes requires
//!    request == limit for extended resources).
//!
//! Escape variables are denied rather than stripped: stripping would change the workload silently
//! (a job that asked for `CUDA_DEVICE_MEMORY_LIMIT_0=40g` and quietly ran with less would fail later
//! and far from the cause), while a denial names the variable at `kubectl apply` time.
//!
//! The JSON patch is the difference between the object as received and as mutated, so it applies to
//! exactly what the API server sent, fields unknown to k8s-openapi included. kube-core serialises the
//! response's `patch` as an array of byte values rather than base64 (`reference/kubernetes-testing.md`
//! §3); Go's decoder accepts both.
//!
//! Metrics (in the registry given to [`WebhookState::new`]): `hami_webhook_requests_total{operation,
//! result}` with `result` one of `allowed` (no change), `mutated`, `denied`, `error` (a body that is not
//! an AdmissionReview v1), and `hami_webhook_request_duration_seconds{operation}`.

mod metrics;
mod pod;
mod review;

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{StatusCode, header},
    routing::post,
};
use hami_api::{ResourceNames, k8s::RequestDefaults};
use hami_policy::{NamespaceQuota, QuotaUsage};
use serde::{Deserialize, Serialize};

use crate::error::Result;

pub use pod::{SCHEDULER_OWNED_ANNOTATIONS, SCHEDULER_OWNED_LABELS, enforcement_env_var};

/// The path the webhook is served on.
pub const WEBHOOK_PATH: &str = "/webhook";

/// Largest request body accepted, bytes: a pod may be up to 1.5 MiB in etcd and an UPDATE review
/// carries it twice.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Webhook settings (`webhook` block of the scheduler config, camelCase keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookConfig {
    /// Serve the webhook.
    pub enabled: bool,
    /// The scheduler managed pods are given (the kube-scheduler profile that calls our extender).
    pub scheduler_name: String,
    /// Rewrite `schedulerName: default-scheduler` to ours (HAMi's `--force-overwrite-default-scheduler`,
    /// default true). Off: such pods keep `default-scheduler`, for clusters whose default profile calls
    /// the extender itself. (The API server defaults an empty name to `default-scheduler` before
    /// admission, so turning this off on an ordinary cluster leaves every GPU pod unaccounted.)
    pub force_overwrite_default_scheduler: bool,
    /// Users (`AdmissionRequest.userInfo.username`, e.g.
    /// `system:serviceaccount:hami-system:hami-scheduler`) allowed to change the scheduler-owned
    /// annotations on UPDATE: the scheduler's and the device plugin's service accounts. Everyone else's
    /// changes to them are reverted. Empty: nobody (the chart must fill it in).
    pub trusted_usernames: Vec<String>,
    /// Namespaces whose pods get only the annotation protection (like a namespace labelled
    /// `hami.io/webhook: ignore`; the webhook cannot see namespace labels itself unless the binary gives
    /// it a [`ClusterView`]).
    pub ignored_namespaces: Vec<String>,
    /// More environment variable names refused on managed containers, besides the built-in ones
    /// ([`enforcement_env_var`]); a trailing `*` matches a prefix (e.g. `LD_PRELOAD`, `MY_HOOK_*`).
    pub extra_denied_env: Vec<String>,
    /// GPU quota per namespace, checked at admission against the pod's effective request. The
    /// namespace's current use comes from the [`ClusterView`] (zero without one: the pod alone must
    /// fit); the extender checks the running total again when it places the pod.
    pub quotas: BTreeMap<String, QuotaLimits>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            scheduler_name: hami_api::resources::SCHEDULER_NAME.to_owned(),
            force_overwrite_default_scheduler: true,
            trusted_usernames: Vec::new(),
            ignored_namespaces: Vec::new(),
            extra_denied_env: Vec::new(),
            quotas: BTreeMap::new(),
        }
    }
}

/// A namespace's GPU limits in configuration form (HAMi's `limits.nvidia.com/gpumem` and
/// `limits.nvidia.com/gpucores` ResourceQuota keys); a missing field is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct QuotaLimits {
    /// Device memory, MiB, summed over the GPUs of the namespace's pods.
    pub gpumem: Option<u64>,
    /// Compute, percent of SMs, summed over GPUs (100 = one whole GPU).
    pub gpucores: Option<u64>,
}

impl From<QuotaLimits> for NamespaceQuota {
    fn from(q: QuotaLimits) -> Self {
        Self {
            memory_mib: q.gpumem,
            cores: q.gpucores,
        }
    }
}

/// What the webhook may ask the rest of the binary about the cluster (the extender's informers know
/// it); every method has a default for a webhook running alone.
pub trait ClusterView: Send + Sync {
    /// Whether the namespace is labelled `hami.io/webhook: ignore`.
    fn namespace_ignored(&self, _namespace: &str) -> bool {
        false
    }

    /// The namespace's GPU quota from its `ResourceQuota`, when [`WebhookConfig::quotas`] has none.
    fn namespace_quota(&self, _namespace: &str) -> Option<NamespaceQuota> {
        None
    }

    /// GPU memory and cores the namespace's placed pods already hold; `None` while the view of the
    /// cluster's pods is incomplete (the extender starting or relisting), when a quota cannot be
    /// checked (peer case C30).
    fn quota_used(&self, _namespace: &str) -> Option<QuotaUsage> {
        Some(QuotaUsage::default())
    }
}

/// A [`ClusterView`] that knows nothing: no namespace is ignored, nothing is used.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClusterView;

impl ClusterView for NoClusterView {}

/// Everything a request needs; cheap to clone (shared parts behind `Arc`).
#[derive(Clone)]
pub struct WebhookState {
    config: Arc<WebhookConfig>,
    names: Arc<ResourceNames>,
    defaults: RequestDefaults,
    view: Arc<dyn ClusterView>,
    metrics: metrics::Metrics,
}

impl std::fmt::Debug for WebhookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState")
            .field("config", &self.config)
            .field("names", &self.names)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl WebhookState {
    /// A webhook with these settings, resource names and request defaults, registering its metrics in
    /// `registry` (the one the binary serves on `/metrics`), with no [`ClusterView`].
    ///
    /// # Errors
    /// [`crate::error::Error::Metrics`] when the metrics are already registered in `registry`.
    pub fn new(
        config: WebhookConfig,
        names: ResourceNames,
        defaults: RequestDefaults,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        Ok(Self {
            config: Arc::new(config),
            names: Arc::new(names),
            defaults,
            view: Arc::new(NoClusterView),
            metrics: metrics::Metrics::new(registry)?,
        })
    }

    /// The same webhook asking `view` about namespaces and quota use.
    #[must_use]
    pub fn with_cluster_view(mut self, view: Arc<dyn ClusterView>) -> Self {
        self.view = view;
        self
    }

    /// The settings in use.
    #[must_use]
    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    /// Answers one request body: HTTP 200 with an AdmissionReview v1 response (allowed, mutated or
    /// denied), or HTTP 400 with a text reason when the body is not an AdmissionReview v1 with a
    /// request uid. Never panics on any input.
    #[must_use]
    pub fn handle(&self, body: &[u8]) -> (StatusCode, Vec<u8>) {
        review::handle(self, body)
    }
}

/// The webhook's routes: `POST /webhook` (any content type; the API server sends
/// `application/json`), bodies up to [`MAX_BODY_BYTES`].
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route(
            WEBHOOK_PATH,
            post(
                |axum::extract::State(state): axum::extract::State<WebhookState>, body: axum::body::Bytes| async move {
                    let (status, body) = state.handle(&body);
                    (status, [(header::CONTENT_TYPE, review::content_type(status))], body)
                },
            ),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
