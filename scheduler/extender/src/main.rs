//! `hami-scheduler`: the scheduler extender and mutating webhook binary.
//!
//! - `hami-scheduler serve --config FILE [--device-config FILE] [--listen ADDR] [--metrics-listen ADDR]
//!   [--tls-cert-file PEM --tls-key-file PEM] [--scheduler-name NAME]`: the extender (filter,
//!   prioritize, bind, healthz, readyz, metrics) and, when `webhook.enabled`, the webhook on the same
//!   server (HTTPS when the TLS files are given), plus metrics on a separate port if asked. The API is
//!   reached in-cluster or through `KUBECONFIG`.
//! - `hami-scheduler kube-scheduler-config [--url-prefix URL] [--format yaml|json] …`: prints the
//!   `KubeSchedulerConfiguration` that points kube-scheduler at the extender, validated.
//! - `hami-scheduler metrics-doc`: prints the scheduler's part of the metrics reference (Markdown).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hami_scheduler::{
    config::{DeviceConfig, SchedulerConfig},
    http::system_clock,
    kubeconf::{ExtendersStanza, KubeSchedulerConfiguration, Options},
    server::{ServeOptions, start},
    state::Settings,
};
use tokio::net::TcpListener;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "hami-scheduler",
    version,
    about = "hami scheduler extender and mutating webhook"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the extender (and the webhook when enabled).
    Serve {
        /// Scheduler config file (JSON, or YAML when it ends in .yaml/.yml).
        #[arg(long)]
        config: PathBuf,
        /// HAMi device config (the chart's `devices` values as JSON): resource names and defaults.
        #[arg(long)]
        device_config: Option<PathBuf>,
        /// Extender address (overrides `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Metrics-only address (overrides `metricsListen`).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// The kube-scheduler profile name (the webhook sets it on pods).
        #[arg(long)]
        scheduler_name: Option<String>,
        /// PEM certificate chain: serve HTTPS.
        #[arg(long, requires = "tls_key_file")]
        tls_cert_file: Option<PathBuf>,
        /// PEM private key.
        #[arg(long, requires = "tls_cert_file")]
        tls_key_file: Option<PathBuf>,
    },
    /// Check configuration files strictly (unknown fields, bad values) and exit: the scheduler config,
    /// the HAMi device config, a KubeSchedulerConfiguration and/or an extenders-only stanza (YAML).
    CheckConfig {
        /// Scheduler config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// HAMi device config.
        #[arg(long)]
        device_config: Option<PathBuf>,
        /// KubeSchedulerConfiguration (YAML), checked with kube-scheduler's extender rules.
        #[arg(long)]
        kube_scheduler_config: Option<PathBuf>,
        /// An `extenders:` stanza alone (YAML).
        #[arg(long)]
        extenders: Option<PathBuf>,
    },
    /// Print the scheduler's part of the metrics reference (Markdown, `docs/metrics.md`).
    MetricsDoc,
    /// Print the KubeSchedulerConfiguration for this extender.
    KubeSchedulerConfig {
        /// Extender URL prefix.
        #[arg(long, default_value = "http://127.0.0.1:8443")]
        url_prefix: String,
        /// Profile name.
        #[arg(long, default_value = hami_api::resources::SCHEDULER_NAME)]
        scheduler_name: String,
        /// HAMi device config for the resource names.
        #[arg(long)]
        device_config: Option<PathBuf>,
        /// Extender call timeout.
        #[arg(long, default_value = "30s")]
        http_timeout: String,
        /// Skip verifying the extender's certificate (HTTPS).
        #[arg(long)]
        insecure: bool,
        /// CA file verifying the extender's certificate (HTTPS).
        #[arg(long)]
        ca_file: Option<String>,
        /// Add leader election with the Lease in this namespace.
        #[arg(long)]
        leader_namespace: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "yaml")]
        format: Format,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAMI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::MetricsDoc => {
            print!("{}", hami_scheduler::metrics::reference_markdown());
            Ok(())
        }
        Command::CheckConfig {
            config,
            device_config,
            kube_scheduler_config,
            extenders,
        } => check_config(config, device_config, kube_scheduler_config, extenders),
        Command::KubeSchedulerConfig {
            url_prefix,
            scheduler_name,
            device_config,
            http_timeout,
            insecure,
            ca_file,
            leader_namespace,
            format,
        } => {
            let names = match device_config {
                Some(p) => DeviceConfig::load(&p)?.names,
                None => hami_api::ResourceNames::default(),
            };
            let cfg = KubeSchedulerConfiguration::for_extender(&Options {
                scheduler_name,
                url_prefix,
                names,
                http_timeout,
                insecure,
                ca_file,
                leader_namespace,
            });
            cfg.validate()?;
            let text = match format {
                Format::Yaml => cfg.to_yaml()?,
                Format::Json => cfg.to_json()?,
            };
            println!("{text}");
            Ok(())
        }
        Command::Serve {
            config,
            device_config,
            listen,
            metrics_listen,
            scheduler_name,
            tls_cert_file,
            tls_key_file,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(serve(ServeArgs {
                config,
                device_config,
                listen,
                metrics_listen,
                scheduler_name,
                tls: tls_cert_file.zip(tls_key_file),
            }))
        }
    }
}

/// `check-config`: loads each given file with the binary's real types and validation.
fn check_config(
    config: Option<PathBuf>,
    device_config: Option<PathBuf>,
    kube_scheduler_config: Option<PathBuf>,
    extenders: Option<PathBuf>,
) -> anyhow::Result<()> {
    if config.is_none() && device_config.is_none() && kube_scheduler_config.is_none() && extenders.is_none() {
        bail!("nothing to check: give --config, --device-config, --kube-scheduler-config or --extenders");
    }
    let devices = device_config.as_deref().map(DeviceConfig::load).transpose()?;
    if let Some(path) = &config {
        let cfg = SchedulerConfig::load(path)?;
        Settings::from_config(&cfg, devices.as_ref())
            .with_context(|| format!("{}: invalid settings", path.display()))?;
    }
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    if let Some(path) = &kube_scheduler_config {
        let cfg: KubeSchedulerConfiguration = serde_saphyr::from_str(&read(path)?)
            .with_context(|| format!("{}: not a KubeSchedulerConfiguration", path.display()))?;
        cfg.validate().with_context(|| format!("{}", path.display()))?;
    }
    if let Some(path) = &extenders {
        let stanza: ExtendersStanza = serde_saphyr::from_str(&read(path)?)
            .with_context(|| format!("{}: not an extenders stanza", path.display()))?;
        let cfg = KubeSchedulerConfiguration {
            api_version: hami_scheduler::kubeconf::API_VERSION.to_owned(),
            kind: "KubeSchedulerConfiguration".to_owned(),
            leader_election: None,
            profiles: Vec::new(),
            extenders: stanza.extenders,
        };
        cfg.validate().with_context(|| format!("{}", path.display()))?;
    }
    println!("ok");
    Ok(())
}

struct ServeArgs {
    config: PathBuf,
    device_config: Option<PathBuf>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    scheduler_name: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = SchedulerConfig::load(&a.config)?;
    if let Some(name) = a.scheduler_name {
        cfg.webhook.scheduler_name = name;
    }
    let devices = a.device_config.as_deref().map(DeviceConfig::load).transpose()?;
    let settings = Settings::from_config(&cfg, devices.as_ref())?;
    let Some(key_file) = cfg.decision_key_file.as_ref() else {
        bail!("decisionKeyFile is required: the HMAC key shared with the agents (a mounted Secret)");
    };
    let mut key =
        std::fs::read(key_file).with_context(|| format!("reading decision key {}", key_file.display()))?;
    // A mounted Secret may end with a newline (`kubectl create secret --from-file`); the agents' device
    // plugin reads the key without trailing whitespace, so the scheduler must sign with the same bytes.
    key.truncate(key.trim_ascii_end().len());
    if key.is_empty() {
        bail!("decision key {} is empty", key_file.display());
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let listen = a.listen.unwrap_or_else(|| cfg.listen.clone());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let metrics_listener = match a.metrics_listen.or_else(|| cfg.metrics_listen.clone()) {
        Some(addr) => Some(
            TcpListener::bind(&addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    if cfg.webhook.enabled && a.tls.is_none() {
        bail!(
            "webhook.enabled needs --tls-cert-file and --tls-key-file (the API server calls webhooks over HTTPS)"
        );
    }
    let running = start(
        settings,
        Some(client),
        key,
        system_clock(),
        listener,
        ServeOptions {
            tls: a.tls,
            extra_routes: None,
            webhook: cfg.webhook.enabled.then(|| cfg.webhook.clone()),
            metrics_listener,
        },
    )
    .await?;
    info!(addr = %running.addr, webhook = cfg.webhook.enabled, "serving");
    // Kubernetes stops a pod with SIGTERM; SIGINT for a terminal.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!(grace_secs = cfg.shutdown_grace_secs, "stopping: draining binds");
    running
        .shutdown(std::time::Duration::from_secs(cfg.shutdown_grace_secs))
        .await;
    Ok(())
}
