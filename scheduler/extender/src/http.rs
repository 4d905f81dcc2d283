//! The extender's HTTP server (axum): `POST /filter`, `POST /prioritize`, `POST /bind`,
//! `GET /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! Bodies are limited to 1 MiB (413 beyond, as HAMi's limit). A body that is not the expected wire
//! type gets 400 with `{"Error": "<decoder message>"}`, never a panic. A pod that asks for no managed
//! resource passes the filter untouched. Errors that concern the pod (invalid HAMi resources) or the
//! bind are answered 200 with the wire type's `Error` field, which kube-scheduler reports on the pod.
//! Every request runs in a tracing span named after its verb.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::{List, api::core::v1::Node};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info_span, warn};

use crate::{
    error::Error,
    metrics::Metrics,
    state::{SchedulerState, Settings, pod_key, scale_scores},
    wire::{
        ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, HostPriority,
        HostPriorityList,
    },
};

/// Largest accepted request body, bytes (HAMi's limit).
pub const BODY_LIMIT: usize = 1 << 20;

/// A clock: Unix seconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
#[must_use]
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// Everything the handlers share.
pub struct App {
    state: RwLock<SchedulerState>,
    /// API client (binding needs one; filter and prioritize do not).
    pub client: Option<kube::Client>,
    /// Metrics.
    pub metrics: Metrics,
    /// HMAC key for `hami.io/vgpu-decision-signature`.
    pub decision_key: Vec<u8>,
    /// Binds read the pod from the reflector's copy when it has one (else GET).
    pub bind_from_store: AtomicBool,
    /// Binds that read the pod from the reflector's copy / with a GET (counters, for tests and benches).
    pub bind_reads: [AtomicU64; 2],
    clock: Clock,
    draining: AtomicBool,
    active_binds: AtomicUsize,
    binds_idle: tokio::sync::Notify,
    cancel: tokio::sync::watch::Sender<bool>,
    /// Binds rolled back because the extender stopped before they sent their Binding.
    pub binds_cancelled: AtomicU64,
}

/// Counts a bind as active until dropped (see [`App::bind_started`]).
#[derive(Debug)]
pub struct BindGuard<'a> {
    app: &'a App,
}

impl Drop for BindGuard<'_> {
    fn drop(&mut self) {
        if self.app.active_binds.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.app.binds_idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// An app over an empty state. With an API client the state waits for the reflectors (nothing is
    /// decided until both have listed, `SchedulerState::expect_reflectors`); without one it holds what
    /// the caller feeds it.
    #[must_use]
    pub fn new(
        settings: Settings,
        client: Option<kube::Client>,
        decision_key: Vec<u8>,
        clock: Clock,
    ) -> Self {
        let mut state = SchedulerState::new(settings);
        if client.is_some() {
            state.expect_reflectors();
        }
        Self {
            state: RwLock::new(state),
            client,
            metrics: Metrics::new(),
            decision_key,
            bind_from_store: AtomicBool::new(true),
            bind_reads: [AtomicU64::new(0), AtomicU64::new(0)],
            clock,
            draining: AtomicBool::new(false),
            active_binds: AtomicUsize::new(0),
            binds_idle: tokio::sync::Notify::new(),
            cancel: tokio::sync::watch::channel(false).0,
            binds_cancelled: AtomicU64::new(0),
        }
    }

    /// Registers a bind, or refuses it (`None`) once [`Self::drain`] was called.
    #[must_use]
    pub fn bind_started(&self) -> Option<BindGuard<'_>> {
        self.active_binds.fetch_add(1, Ordering::AcqRel);
        let guard = BindGuard { app: self };
        if self.draining.load(Ordering::Acquire) {
            return None;
        }
        Some(guard)
    }

    /// Binds running now.
    #[must_use]
    pub fn active_binds(&self) -> usize {
        self.active_binds.load(Ordering::Acquire)
    }

    /// Starts shutting down: new binds are refused and `/readyz` answers 503.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Self::drain`] was called.
    #[must_use]
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Tells binds in flight to roll back at their next safe point (before their Binding is sent).
    pub fn cancel_binds(&self) {
        self.cancel.send_replace(true);
    }

    /// A receiver that turns `true` when [`Self::cancel_binds`] is called.
    #[must_use]
    pub fn cancel_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// Waits until no bind runs, at most `timeout`; returns whether none runs.
    pub async fn wait_binds_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.binds_idle.notified();
            if self.active_binds() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active_binds() == 0;
            }
        }
    }

    /// Unix seconds now.
    #[must_use]
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Shared access to the state (a poisoned lock is recovered: the state is only changed through
    /// methods that leave it consistent).
    pub fn read_state(&self) -> RwLockReadGuard<'_, SchedulerState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Exclusive access to the state.
    pub fn write_state(&self) -> RwLockWriteGuard<'_, SchedulerState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the node and pod views are complete (always, without an API client: see [`Self::new`])
    /// and the extender is not shutting down.
    #[must_use]
    pub fn ready(&self) -> bool {
        !self.draining() && self.read_state().synced().complete()
    }
}

/// The webhook sees the extender's allocations: a namespace's quota use is what its pods hold now.
impl crate::webhook::ClusterView for App {
    fn quota_used(&self, namespace: &str) -> Option<hami_policy::QuotaUsage> {
        let st = self.read_state();
        st.synced().pods.then(|| st.quota_used(namespace))
    }
}

/// The extender's routes over `app`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/bind", post(bind))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// A metrics-only router (for a separate metrics port).
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(app)
}

fn bad_request(e: &Error) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "Error": e.to_string() }))).into_response()
}

fn decode<T: DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::BadRequest {
        what,
        message: e.to_string(),
    })
}

/// `body` decoded as the verb's request (`what`); a body that is not one is counted as the verb's
/// `bad_request` (the caller answers 400).
fn decode_request<T: DeserializeOwned>(
    app: &App,
    verb: &str,
    what: &'static str,
    body: &[u8],
    started: Instant,
) -> Result<T, Error> {
    decode(what, body).inspect_err(|_| finish(app, verb, "bad_request", started))
}

fn finish(app: &App, verb: &str, result: &str, started: Instant) {
    app.metrics.requests.with_label_values(&[verb, result]).inc();
    app.metrics
        .latency
        .with_label_values(&[verb])
        .observe(started.elapsed().as_secs_f64());
}

/// The filter verdict for one request, without HTTP (also what the bench drives).
#[must_use]
pub fn filter_args(app: &App, args: &ExtenderArgs) -> ExtenderFilterResult {
    filter_outcome(app, args).0
}

/// The filter verdict, with the error its `Error` field was written from.
fn filter_outcome(app: &App, args: &ExtenderArgs) -> (ExtenderFilterResult, Option<Error>) {
    let (names, objects): (Vec<String>, HashMap<String, &Node>) = match (&args.node_names, &args.nodes) {
        (Some(names), _) => (names.clone(), HashMap::new()),
        (None, Some(list)) => {
            let objects: HashMap<String, &Node> = list
                .items
                .iter()
                .filter_map(|n| n.metadata.name.clone().map(|name| (name, n)))
                .collect();
            let names = list
                .items
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            (names, objects)
        }
        (None, None) => (Vec::new(), HashMap::new()),
    };
    let verdicts = app
        .read_state()
        .evaluate_nodes(&args.pod, &names, &objects, app.now());
    let mut out = ExtenderFilterResult::default();
    let fits: Vec<String> = match verdicts {
        Err(e) => {
            out.error = e.to_string();
            return (out, Some(e));
        }
        Ok(None) => names,
        Ok(Some(v)) => {
            out.failed_nodes = v.failed;
            out.failed_and_unresolvable_nodes = v.unresolvable;
            v.fits.into_iter().map(|(n, _)| n).collect()
        }
    };
    match (&args.node_names, &args.nodes) {
        (Some(_), _) | (None, None) => out.node_names = Some(fits),
        (None, Some(list)) => {
            let keep: std::collections::HashSet<&str> = fits.iter().map(String::as_str).collect();
            out.nodes = Some(List {
                items: list
                    .items
                    .iter()
                    .filter(|n| n.metadata.name.as_deref().is_some_and(|x| keep.contains(x)))
                    .cloned()
                    .collect(),
                metadata: list.metadata.clone(),
            });
        }
    }
    (out, None)
}

/// The `result` label of a request answered with `e`: `not_synced` for a refusal while a view is
/// incomplete (retryable), else `error`.
fn error_result(e: &Error) -> &'static str {
    if matches!(e, Error::NotSynced { .. }) {
        "not_synced"
    } else {
        "error"
    }
}

/// The prioritize scores for one request, without HTTP: feasible nodes 0..=10 by the policy, the rest
/// 0; a pod without GPUs scores 0 everywhere.
///
/// # Errors
/// [`Error::InvalidPod`] for a pod whose HAMi request is invalid.
pub fn prioritize_args(app: &App, args: &ExtenderArgs) -> Result<HostPriorityList, Error> {
    let names: Vec<String> = match (&args.node_names, &args.nodes) {
        (Some(n), _) => n.clone(),
        (None, Some(list)) => list
            .items
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect(),
        (None, None) => Vec::new(),
    };
    let objects: HashMap<String, &Node> = args
        .nodes
        .iter()
        .flat_map(|l| &l.items)
        .filter_map(|n| n.metadata.name.clone().map(|name| (name, n)))
        .collect();
    let verdicts = app
        .read_state()
        .evaluate_nodes(&args.pod, &names, &objects, app.now())?;
    let scores: HashMap<String, i64> = verdicts
        .map(|v| scale_scores(&v.fits).into_iter().collect())
        .unwrap_or_default();
    Ok(names
        .into_iter()
        .map(|host| HostPriority {
            score: scores.get(&host).copied().unwrap_or(0),
            host,
        })
        .collect())
}

async fn filter(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let started = Instant::now();
    let args: ExtenderArgs = match decode_request(&app, "filter", "ExtenderArgs", &body, started) {
        Ok(a) => a,
        Err(e) => return bad_request(&e),
    };
    let span = info_span!("filter", pod = %pod_key(&args.pod));
    let _enter = span.enter();
    let (out, error) = filter_outcome(&app, &args);
    app.metrics.observe_filter(&out);
    let result = error.as_ref().map_or("ok", error_result);
    if !out.error.is_empty() {
        warn!(error = %out.error, "filter");
    }
    finish(&app, "filter", result, started);
    Json(out).into_response()
}

async fn prioritize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let started = Instant::now();
    let args: ExtenderArgs = match decode_request(&app, "prioritize", "ExtenderArgs", &body, started) {
        Ok(a) => a,
        Err(e) => return bad_request(&e),
    };
    let span = info_span!("prioritize", pod = %pod_key(&args.pod));
    let _enter = span.enter();
    match prioritize_args(&app, &args) {
        Ok(list) => {
            finish(&app, "prioritize", "ok", started);
            Json(list).into_response()
        }
        Err(e @ Error::NotSynced { .. }) => {
            // No scores on a partial view; kube-scheduler goes on without this extender's scores.
            finish(&app, "prioritize", "not_synced", started);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "Error": e.to_string() })),
            )
                .into_response()
        }
        Err(e) => {
            // HostPriorityList has no error field: an invalid pod is a client error.
            finish(&app, "prioritize", "error", started);
            bad_request(&e)
        }
    }
}

async fn bind(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let started = Instant::now();
    let args: ExtenderBindingArgs = match decode_request(&app, "bind", "ExtenderBindingArgs", &body, started)
    {
        Ok(a) => a,
        Err(e) => return bad_request(&e),
    };
    let span =
        info_span!("bind", pod = %format!("{}/{}", args.pod_namespace, args.pod_name), node = %args.node);
    let result = crate::apiserver::bind(&app, &args).instrument(span).await;
    let out = match result {
        Ok(()) => {
            finish(&app, "bind", "ok", started);
            ExtenderBindingResult::default()
        }
        Err(e) => {
            // Capacity taken since the filter (the node no longer fits, or a racing bind won the
            // ledger) or the pod changed under the patch (409): the bind conflicts.
            if matches!(e, Error::Placement { .. } | Error::NodeUnfit { .. }) || e.reason() == "api_conflict"
            {
                app.metrics.bind_conflicts.inc();
            }
            warn!(pod = %args.pod_name, node = %args.node, error = %e, "bind failed");
            finish(&app, "bind", error_result(&e), started);
            ExtenderBindingResult { error: e.to_string() }
        }
    };
    Json(out).into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down, or the node or pod view is incomplete (listing)",
        )
            .into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = {
        let st = app.read_state();
        app.metrics.render(&st, app.now())
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
