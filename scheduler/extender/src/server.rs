//! Starting and stopping a whole extender: the app, the reflectors (when there is an API client), the
//! HTTP(S) server and an optional metrics-only server. `hami-scheduler serve` and the tests use this.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::Router;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{error, info};

use crate::{
    apiserver,
    config::PolicyChoice,
    error::{Error, Result},
    http::{App, Clock, metrics_router, router},
    state::Settings,
};

/// How to serve.
#[derive(Default)]
pub struct ServeOptions {
    /// HTTPS with this certificate chain and key (PEM files, reloaded when they change); plain HTTP
    /// when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// More routes on the same server.
    pub extra_routes: Option<Router>,
    /// Serve the mutating webhook (`POST /webhook`) on the same server with these settings; it shares
    /// the metrics registry and sees the extender's state as its [`crate::webhook::ClusterView`].
    pub webhook: Option<crate::webhook::WebhookConfig>,
    /// A separate metrics-only listener.
    pub metrics_listener: Option<TcpListener>,
}

/// After `grace`, how long [`Running::shutdown`] still waits for Bindings already sent to be answered.
pub const BINDING_WAIT: Duration = Duration::from_secs(10);

/// What [`Running::shutdown`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Binds running when the shutdown began.
    pub in_flight: usize,
    /// Binds rolled back because they had not sent their Binding in time.
    pub rolled_back: u64,
    /// Binds still running when the tasks were stopped (0 unless a Binding went unanswered).
    pub unfinished: usize,
}

/// A running extender; [`Running::shutdown`], [`Running::stop`] (or drop) ends every task.
#[derive(Debug)]
pub struct Running {
    /// Address of the extender server.
    pub addr: SocketAddr,
    /// The shared app.
    pub app: Arc<App>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until the reflectors have synced, at most `timeout`; returns whether they did.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.app.ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Shuts down gracefully: new binds are refused at once (and `/readyz` answers 503), binds in
    /// flight get `grace` to finish; then the ones that have not sent their Binding roll back (their
    /// pods keep no decision and kube-scheduler retries them), and the extender waits for the rest at
    /// most [`BINDING_WAIT`] more; then every task stops. Never leaves a decision on a pod that did not
    /// get its node, unless a Binding is still unanswered after that wait.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        self.app.drain();
        let in_flight = self.app.active_binds();
        let mut idle = self.app.wait_binds_idle(grace).await;
        if !idle {
            self.app.cancel_binds();
            idle = self.app.wait_binds_idle(BINDING_WAIT).await;
        }
        let report = ShutdownReport {
            in_flight,
            rolled_back: self
                .app
                .binds_cancelled
                .load(std::sync::atomic::Ordering::Relaxed),
            unfinished: if idle { 0 } else { self.app.active_binds() },
        };
        info!(?report, "extender stopped");
        self.stop();
        report
    }

    /// Stops the server and the reflectors at once (binds in flight are abandoned; prefer
    /// [`Self::shutdown`]).
    pub fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts an extender on `listener`.
///
/// # Errors
/// [`Error::Listen`] when the listener has no local address; TLS setup errors when `tls` files are not
/// a usable pair.
pub async fn start(
    settings: Settings,
    client: Option<kube::Client>,
    decision_key: Vec<u8>,
    clock: Clock,
    listener: TcpListener,
    options: ServeOptions,
) -> Result<Running> {
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        what: "reading the listener's address".into(),
        source,
    })?;
    let app = Arc::new(App::new(settings, client.clone(), decision_key, clock));
    let mut tasks = Vec::new();
    if let Some(client) = client {
        tasks.push(tokio::spawn(apiserver::run_node_reflector(
            Arc::clone(&app),
            client.clone(),
        )));
        tasks.push(tokio::spawn(apiserver::run_pod_reflector(
            Arc::clone(&app),
            client,
        )));
    }
    let refresh = {
        let st = app.read_state();
        matches!(st.settings().policy, PolicyChoice::Fgd { .. }).then(|| st.settings().workload.refresh_secs)
    };
    if let Some(secs) = refresh {
        tasks.push(tokio::spawn(refresh_workload_model(
            Arc::clone(&app),
            Duration::from_secs(secs.max(1)),
        )));
    }
    let mut routes = router(Arc::clone(&app));
    if let Some(cfg) = options.webhook {
        let names = app.read_state().settings().names.clone();
        let defaults = app.read_state().settings().defaults;
        let hook = crate::webhook::WebhookState::new(cfg, names, defaults, app.metrics.registry())?
            .with_cluster_view(Arc::clone(&app) as Arc<dyn crate::webhook::ClusterView>);
        routes = routes.merge(crate::webhook::router(hook));
    }
    if let Some(extra) = options.extra_routes {
        routes = routes.merge(extra);
    }
    match options.tls {
        Some((cert, key)) => {
            // Fail now (not in the task) when the pair is unusable.
            crate::tls::load_certified_key(&cert, &key)?;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::tls::serve_tls(listener, routes, cert, key).await {
                    error!(error = %e, "extender HTTPS server stopped");
                }
            }));
        }
        None => tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, routes).await {
                error!(error = %e, "extender HTTP server stopped");
            }
        })),
    }
    if let Some(ml) = options.metrics_listener {
        let m = metrics_router(Arc::clone(&app));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(ml, m).await {
                error!(error = %e, "metrics server stopped");
            }
        }));
    }
    Ok(Running { addr, app, tasks })
}

/// Rebuilds the fragmentation-aware policies' workload model every `period` (the first time one period
/// after the start, when the reflectors have had time to fill the state).
async fn refresh_workload_model(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tick.tick().await;
        let (source, shapes) = {
            let mut st = app.write_state();
            let source = st.refresh_model();
            (source, st.workload_model().0.shapes.len())
        };
        if last != Some(source) {
            info!(?source, shapes, "workload model");
            last = Some(source);
        }
    }
}
