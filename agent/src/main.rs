//! `hami-agent`: the node agent.
//!
//! * `hami-agent run [--config FILE] [--listen ADDR]`: load/adopt the eBPF programs, attribute, serve
//!   `/metrics`, `/snapshot` and `/healthz`. SIGTERM/SIGINT save the state and exit; the programs stay
//!   attached (pinned) so the next agent misses nothing.
//! * `hami-agent detach [--config FILE]`: remove the pinned programs and maps (uninstall).
//! * `hami-agent metrics-doc`: print the metrics reference (Markdown).
//! * `hami-agent check-config FILE`: parse a configuration strictly and print it with its defaults.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Parser, Subcommand};
use hami_agent::config::AgentConfig;
use hami_agent::service::Agent;
use hami_agent::{loader, metrics, registration};

#[derive(Parser)]
#[command(about = "hami node agent: eBPF attribution of GPU memory and compute per container")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// JSON configuration file (defaults apply to absent fields).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the HTTP listen address.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Remove the pinned programs, links and maps.
    Detach {
        /// JSON configuration file (for `paths.bpffs`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the metrics reference.
    MetricsDoc,
    /// Install the interceptor on the host for the device plugin's mounts: copy the library to
    /// `<dir>/libvgpu.so` and write `<dir>/ld.so.preload` (each only when it differs).
    InstallInterceptor {
        /// The library to install (in the agent image).
        #[arg(long, default_value = "/usr/lib/hami/libvgpu.so")]
        library: PathBuf,
        /// Host directory (as mounted into this container).
        #[arg(long, default_value = "/usr/local/vgpu")]
        dir: PathBuf,
        /// The library's path inside GPU containers, written to ld.so.preload.
        #[arg(long, default_value = "/usr/local/vgpu/libvgpu.so")]
        container_library: String,
    },
    /// Parse a configuration file strictly (unknown fields are errors) and print it with defaults.
    CheckConfig {
        /// JSON configuration file.
        file: PathBuf,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<AgentConfig> {
    Ok(match path {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    })
}

type Shared = Arc<Mutex<Agent>>;

fn lock(a: &Shared) -> MutexGuard<'_, Agent> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The device plugin's metrics, when it runs.
type PluginMetrics = Option<hami_agent::deviceplugin::metrics::PluginMetrics>;

async fn metrics_handler(
    axum::extract::State(a): axum::extract::State<Shared>,
    axum::Extension(plugin): axum::Extension<PluginMetrics>,
    axum::Extension(reg): axum::Extension<Option<registration::RegistrationMetrics>>,
) -> impl IntoResponse {
    let snap = lock(&a).snapshot(true);
    let text = metrics::render(&snap).and_then(|mut t| {
        if let Some(p) = &plugin {
            t.push_str(&p.render()?);
        }
        if let Some(r) = &reg {
            t.push_str(&r.render()?);
        }
        Ok(t)
    });
    match text {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn snapshot_handler(axum::extract::State(a): axum::extract::State<Shared>) -> impl IntoResponse {
    axum::Json(lock(&a).snapshot(false))
}

fn run(config: Option<&PathBuf>, listen: Option<String>) -> Result<()> {
    let mut cfg = load_config(config)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let interval = Duration::from_millis(cfg.interval_ms);
    let addr = cfg.listen.clone();
    let plugin_cfg = cfg.device_plugin.enabled.then(|| cfg.clone());
    let reg_cfg = cfg.registration.clone();
    let node_name = cfg.effective_node_name();
    let agent: Shared = Arc::new(Mutex::new(Agent::start(cfg)?));
    let reg_metrics = if reg_cfg.enabled {
        Some(registration::RegistrationMetrics::new()?)
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));

    let pump = {
        let agent = agent.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("hami-events".into())
            .spawn(move || -> Result<()> {
                let fd = lock(&agent).event_fd();
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    #[allow(unsafe_code, reason = "poll(2) on the ring buffer's fd")]
                    // SAFETY: one valid pollfd, count 1.
                    let _ = unsafe { libc::poll(&raw mut pfd, 1, 100) };
                    let mut a = lock(&agent);
                    a.pump(0);
                    if last.elapsed() >= interval {
                        last = Instant::now();
                        a.housekeeping()?;
                    }
                }
                Ok(())
            })?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        // The kubelet device plugin runs beside the telemetry when enabled.
        let plugin = match &plugin_cfg {
            Some(c) => Some(
                hami_agent::deviceplugin::health::start_for_agent(c)
                    .await
                    .context("starting the device plugin")?,
            ),
            None => None,
        };
        // Node registration publishes from the agent's snapshots and the plugin's GPU health on this
        // runtime; nothing is cleared when the runtime ends.
        if let Some(m) = &reg_metrics {
            let agent = agent.clone();
            let health = plugin.as_ref().map(hami_agent::deviceplugin::DevicePlugin::inventory);
            tokio::spawn(registration::run(reg_cfg, node_name, m.clone(), health, move || {
                lock(&agent).snapshot(false)
            }));
        }
        let plugin_metrics: PluginMetrics = plugin.as_ref().map(|p| p.metrics().clone());
        let app = axum::Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/snapshot", get(snapshot_handler))
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::Extension(plugin_metrics))
            .layer(axum::Extension(reg_metrics.clone()))
            .with_state(agent.clone());
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /snapshot, /healthz");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
        };
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server");
        if let Some(p) = plugin {
            p.stop().await;
        }
        served
    });
    stop.store(true, Ordering::Relaxed);
    let pumped = pump
        .join()
        .map_err(|_| anyhow::anyhow!("event thread panicked"))?;
    let mut a = lock(&agent);
    a.pump(0);
    a.save_state()?;
    tracing::info!("state saved; programs stay attached");
    served?;
    pumped
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAMI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run { config, listen } => run(config.as_ref(), listen),
        Cmd::Detach { config } => {
            load_config(config.as_ref()).and_then(|c| loader::detach(&c.paths.bpffs).map_err(Into::into))
        }
        Cmd::CheckConfig { file } => AgentConfig::load(&file)
            .map_err(anyhow::Error::from)
            .and_then(|c| {
                println!("{}", serde_json::to_string_pretty(&c)?);
                Ok(())
            }),
        Cmd::InstallInterceptor {
            library,
            dir,
            container_library,
        } => hami_agent::deviceplugin::install::install_interceptor(&library, &dir, &container_library)
            .map(|done| println!("installed: library {}, preload {}", done.library, done.preload))
            .map_err(Into::into),
        Cmd::MetricsDoc => {
            print!("{}", metrics::reference_markdown());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hami-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
