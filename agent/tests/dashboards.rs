//! The Grafana dashboards (`grafana/dashboards/*.json`) against the agent and the scheduler.
//!
//! - Without privileges: every metric a panel or variable names is one some binary exports (a row of
//!   the generated metrics reference `docs/metrics.md`, which CI keeps equal to the binaries' lists:
//!   agent telemetry, device plugin, registration, scheduler extender and webhook), every exported
//!   metric is on some dashboard (or in [`NOT_ON_DASHBOARDS`] with the reason), and every dashboard
//!   takes its datasource from the `DS_PROMETHEUS` variable.
//! - On the simulated GPU node (root): the real agent binary (fake NVML, so SM-seconds exist; node
//!   registration and the device plugin on) attributes two containers' tenants; `hami-scheduler serve`
//!   (extender and webhook over HTTPS, metrics on plain HTTP) runs against `hami-fake-apiserver` with the
//!   node the agent registers, a stale and an invalid node; a test kubelet registers the device plugin.
//!   Pods go through the webhook (mutated, allowed, denied), `/filter` and `/bind` (two placed and
//!   allocated by the plugin, one left pending, one bind conflict, one filter without a fit), a forged
//!   decision is refused by the plugin, a registration write fails once. A real Prometheus (Debian
//!   `prometheus`) scrapes the agent and the scheduler every second, and every PromQL query of every
//!   panel and variable, with Grafana's variables replaced by concrete values, returns at least one
//!   series through Prometheus's HTTP API (and a non-zero value, except for the agent's loss counters,
//!   which must stay at zero). Every `hami_*` family the two binaries expose has a row in the metrics
//!   reference.
//! - `plot_scenario` (ignored): a longer scenario whose Prometheus data `cargo xtask plots` renders.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Env, Stopped, Tenant, encode, http_get};
use hami_agent::deviceplugin::DevicePluginConfig;
use hami_agent::deviceplugin::kubelet::unix_channel;
use hami_agent::deviceplugin::proto::{
    self, device_plugin_client::DevicePluginClient, registration_server::Registration,
    registration_server::RegistrationServer,
};
use hami_agent::registration::RegistrationConfig;
use hami_api::GpuDevice;
use hami_api::annotations::{
    BIND_PHASE, BIND_TIME, DECISION_SIGNATURE, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, NODE_NVIDIA_REGISTER,
    VGPU_NODE, VGPU_TIME, sign_decision,
};
use hami_api::encode_node_register;
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

/// The datasource every panel and target must use (the dashboards' datasource variable).
const DS_UID: &str = "${DS_PROMETHEUS}";

/// Grafana's built-in variables the dashboards may use.
const BUILTINS: &[&str] = &["__range", "__rate_interval"];

/// Counters that stay at zero here (a healthy agent; hard-limit mode off): their queries must return a
/// series, not a non-zero value.
const MAY_BE_ZERO: &[&str] = &[
    "hami_container_hard_limit_kills_total",
    "hami_agent_malformed_ioctls_total",
    "hami_agent_ringbuf_dropped_total",
    "hami_agent_alloc_map_full_total",
    "hami_agent_unmatched_frees_total",
    // Every configured libcuda exists here and exports every probed symbol.
    "hami_agent_libcuda_missing",
    "hami_agent_uprobe_symbols_missing",
    // Hard-limit mode is off here: both mechanisms report 0.
    "hami_agent_hard_limit_mechanism",
];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards")
}

/// Every dashboard: (file name, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let dir = dashboards_dir();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).expect("dashboard file");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((
                p.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                v,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 5,
        "expected the five dashboards in {}",
        dir.display()
    );
    out
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// One PromQL query of a panel, as Grafana runs it.
struct PanelQuery {
    what: String,
    expr: String,
    /// An instant query (stat, table, bar gauge) rather than a range query (time series).
    instant: bool,
}

fn panel_queries(file: &str, d: &Value) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_owned();
            out.push(PanelQuery {
                what: format!(
                    "{file} / {} / {}",
                    p["title"].as_str().unwrap_or("?"),
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr,
                instant: t["instant"].as_bool().unwrap_or(false),
            });
        }
    }
    out
}

/// The query variables: (name, metric selector, label) of each `label_values(selector, label)`.
fn variable_queries(file: &str, d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?").to_owned();
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default();
        assert_eq!(
            v["definition"].as_str(),
            Some(q),
            "{file}: variable {name}: definition and query differ"
        );
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{file}: variable {name}: not label_values(...): {q}"));
        let (sel, label) = inner
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("{file}: variable {name}: label_values without a label: {q}"));
        out.push((name, sel.trim().to_owned(), label.trim().to_owned()));
    }
    out
}

/// The `hami_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("hami_") {
        let start = i + off;
        let preceded = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start + "hami_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        if !preceded {
            // A histogram is queried through its `_bucket` series; the metric lists name the histogram.
            let name = &expr[start..end];
            out.push(name.strip_suffix("_bucket").unwrap_or(name).to_owned());
        }
        i = end;
    }
    out
}

/// Every PromQL expression of a dashboard (panels and variables).
fn all_exprs(file: &str, d: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = panel_queries(file, d)
        .into_iter()
        .map(|q| (q.what, q.expr))
        .collect();
    for (name, sel, _) in variable_queries(file, d) {
        out.push((format!("{file} / variable {name}"), sel));
    }
    out
}

/// Every metric of every binary: the rows of the generated metrics reference (`docs/metrics.md`, equal
/// to the binaries' metric lists; `cargo xtask ci` checks it is current).
fn exported() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_owned))
        .collect();
    for m in hami_agent::metrics::METRICS {
        assert!(
            names.contains(m.name),
            "{} is not in docs/metrics.md: run cargo xtask metrics-doc",
            m.name
        );
    }
    assert!(
        names.contains("hami_scheduler_requests_total") && names.contains("hami_webhook_requests_total"),
        "docs/metrics.md lacks the scheduler's metrics"
    );
    names
}

/// Exported metrics deliberately on no dashboard: (name, why). Empty: every metric has a panel.
const NOT_ON_DASHBOARDS: &[(&str, &str)] = &[];

#[test]
fn every_metric_a_dashboard_names_is_exported() {
    let known = exported();
    let mut unknown = Vec::new();
    for (file, d) in dashboards() {
        for (what, expr) in all_exprs(&file, &d) {
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{what}: no hami_ metric in `{expr}`");
            unknown.extend(
                names
                    .into_iter()
                    .filter(|n| !known.contains(n.as_str()))
                    .map(|n| format!("{what}: {n}")),
            );
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics in no binary's list (docs/metrics.md):\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_exported_metric_is_on_a_dashboard() {
    let used: BTreeSet<String> = dashboards()
        .iter()
        .flat_map(|(f, d)| all_exprs(f, d))
        .flat_map(|(_, e)| metric_names(&e))
        .collect();
    let excluded: BTreeSet<&str> = NOT_ON_DASHBOARDS.iter().map(|(n, _)| *n).collect();
    let missing: Vec<String> = exported()
        .into_iter()
        .filter(|m| !used.contains(m) && !excluded.contains(m.as_str()))
        .collect();
    assert!(missing.is_empty(), "exported but on no dashboard: {missing:?}");
    for (name, why) in NOT_ON_DASHBOARDS {
        assert!(
            !why.is_empty() && !used.contains(*name),
            "{name}: excluded without reason or on a dashboard"
        );
    }
}

#[test]
fn dashboards_take_their_datasource_from_a_variable_and_are_well_formed() {
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(
            !uid.is_empty() && uids.insert(uid.to_owned()),
            "{file}: uid `{uid}`"
        );
        assert!(
            d["title"].as_str().is_some_and(|t| t.starts_with("HAMi / ")),
            "{file}: title"
        );
        let vars = d["templating"]["list"].as_array().expect("templating list");
        let ds = vars
            .iter()
            .find(|v| v["name"] == "DS_PROMETHEUS")
            .unwrap_or_else(|| panic!("{file}: no DS_PROMETHEUS variable"));
        assert_eq!(ds["type"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        let names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert_eq!(v["datasource"]["uid"], DS_UID, "{file}: variable {}", v["name"]);
        }
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: no id"));
            assert!(ids.insert(id), "{file}: panel id {id} twice");
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
            assert!(
                x + w <= 24 && g["h"].as_u64().is_some_and(|h| h > 0),
                "{file}: {title}: gridPos {g}"
            );
            let targets = p["targets"].as_array();
            if p["type"] == "text" || p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], DS_UID, "{file}: {title}: datasource");
            assert_eq!(
                p["datasource"]["type"], "prometheus",
                "{file}: {title}: datasource"
            );
            let targets = targets.unwrap_or_else(|| panic!("{file}: {title}: no targets"));
            assert!(!targets.is_empty(), "{file}: {title}: no targets");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], DS_UID,
                    "{file}: {title}: target datasource"
                );
                assert!(
                    refs.insert(t["refId"].as_str().unwrap_or_default()),
                    "{file}: {title}: refId"
                );
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{file}: {title}: empty expr");
                let instant = t["instant"].as_bool().unwrap_or(false);
                assert_eq!(
                    instant,
                    p["type"] != "timeseries",
                    "{file}: {title}: time series run range queries, the others instant ones"
                );
                // Every `$variable` is one of the dashboard's or a Grafana built-in.
                for v in expr.split('$').skip(1) {
                    let v = v.trim_start_matches('{');
                    let name: String = v
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        names.contains(name.as_str()) || BUILTINS.contains(&name.as_str()),
                        "{file}: {title}: unknown variable ${name} in `{expr}`"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The simulated node, the agent binary and a real Prometheus.

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The agent binary (and with a control plane, the scheduler) and Prometheus on a simulated node.
/// Fields drop in order: Prometheus, the agent, the control plane, then the node.
struct Stack {
    _prom: Stopped,
    prom_port: u16,
    _agent: Stopped,
    agent_port: u16,
    cp: Option<ControlPlane>,
    env: Env,
    /// When Prometheus first had a sample of every target (unix seconds).
    first_scrape: f64,
}

impl Stack {
    /// `None` when the test is skipped (no privileges, or no Prometheus and privileges not required).
    /// With `control_plane`, the agent registers its node and serves the device plugin, and Prometheus
    /// also scrapes `hami-scheduler serve` ([`ControlPlane`]).
    fn start(
        test: &str,
        gpus: u32,
        memory_mib: u64,
        tsdb: Option<&Path>,
        control_plane: bool,
    ) -> Option<Self> {
        let mut env = Env::new(test, gpus, memory_mib)?;
        if !common::prometheus_or_skip(test) {
            return None;
        }
        env.cfg.nvml_lib = Some(common::fake_nvml());
        let (cp, vars) = if control_plane {
            let (cp, vars) = ControlPlane::start(&mut env);
            (Some(cp), vars)
        } else {
            (None, Vec::new())
        };
        let (agent, agent_port) =
            common::start_agent_with_env(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")), &vars);
        let mut targets = vec![("hami-agent", agent_port)];
        if let Some(cp) = &cp {
            targets.push(("hami-scheduler", cp.metrics_port));
        }
        let (prom, prom_port) = common::start_prometheus_jobs(&env, &targets, tsdb);
        Some(Self {
            _prom: prom,
            prom_port,
            _agent: agent,
            agent_port,
            cp,
            env,
            first_scrape: now_s(),
        })
    }

    /// A Prometheus API call; panics on a non-success answer.
    fn api(&self, path: &str) -> Value {
        let body = http_get(self.prom_port, path).unwrap_or_else(|| panic!("prometheus: GET {path} failed"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v
    }

    fn instant(&self, expr: &str) -> Vec<Value> {
        let v = self.api(&format!(
            "/api/v1/query?query={}&time={:.3}",
            encode(expr),
            now_s()
        ));
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    fn range(&self, expr: &str, start: f64, end: f64) -> Vec<Value> {
        let v = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            encode(expr)
        ));
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------------
// The control plane beside the agent: the fake API server, `hami-scheduler serve` and a test kubelet.

/// The node the agent registers (the environment's node name).
const NODE: &str = "test-node";
/// The decision key shared by the scheduler and the device plugin.
const KEY: &[u8] = b"dashboards-decision-key";

/// A tool the control plane needs (`openssl` for the webhook's certificate, `curl` for HTTPS calls).
fn tool(name: &str, version_arg: &str) {
    assert!(
        Command::new(name)
            .arg(version_arg)
            .output()
            .is_ok_and(|o| o.status.success()),
        "{name} is needed (apt-get install {name})"
    );
}

/// The kubelet's registration service: forwards each request.
struct Registrations(tokio::sync::mpsc::UnboundedSender<proto::RegisterRequest>);

#[tonic::async_trait]
impl Registration for Registrations {
    async fn register(
        &self,
        r: tonic::Request<proto::RegisterRequest>,
    ) -> Result<tonic::Response<proto::Empty>, tonic::Status> {
        let _ = self.0.send(r.into_inner());
        Ok(tonic::Response::new(proto::Empty {}))
    }
}

/// The fake API server, the scheduler (HTTPS extender and webhook, plain-HTTP metrics) and a test
/// kubelet serving `Registration` on `<plugin dir>/kubelet.sock`.
struct ControlPlane {
    rt: tokio::runtime::Runtime,
    api: FakeApiServer,
    _scheduler: Stopped,
    https_port: u16,
    metrics_port: u16,
    plugin_dir: PathBuf,
    registered: tokio::sync::mpsc::UnboundedReceiver<proto::RegisterRequest>,
    dir: PathBuf,
}

impl ControlPlane {
    /// Starts everything but the agent, and points `env`'s agent configuration at it (registration and
    /// the device plugin on, `KUBECONFIG` for the agent process in `agent_env`).
    fn start(env: &mut Env) -> (Self, Vec<(&'static str, PathBuf)>) {
        tool("openssl", "version");
        tool("curl", "--version");
        let dir = env.dir.join("control-plane");
        let plugin_dir = dir.join("device-plugins");
        std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let api = rt.block_on(FakeApiServer::start()).expect("the fake API server");
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let key_file = dir.join("decision-key");
        std::fs::write(&key_file, KEY).expect("decision key");
        // The node the agent registers; a node registered without a heartbeat (stale) and one with a
        // malformed register annotation (invalid).
        let node = |name: &str, register: Option<String>| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": register.map(|r| json!({NODE_NVIDIA_REGISTER: r})).unwrap_or(json!({}))},
                "status": {"allocatable": {"cpu": "64", "memory": "256Gi"}}
            }))
            .expect("node")
        };
        api.insert_node(node(NODE, None));
        let stale = encode_node_register(&[GpuDevice::new("GPU-stale-0", 0, "NVIDIA-Tesla T4", 16_000)])
            .expect("register annotation");
        api.insert_node(node("stale-node", Some(stale)));
        api.insert_node(node("invalid-node", Some("not a register annotation".into())));

        let (tx, registered) = tokio::sync::mpsc::unbounded_channel();
        let sock = plugin_dir.join("kubelet.sock");
        let listener = rt
            .block_on(async { tokio::net::UnixListener::bind(&sock) })
            .expect("kubelet.sock");
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(Registrations(tx)))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        });

        env.cfg.node_name = NODE.into();
        env.cfg.registration = RegistrationConfig {
            enabled: true,
            heartbeat_secs: 1,
            retry_secs: 1,
            kubeconfig: Some(kubeconfig.clone()),
            ..RegistrationConfig::default()
        };
        env.cfg.device_plugin = DevicePluginConfig {
            enabled: true,
            plugin_dir: plugin_dir.clone(),
            socket_name: "hami-dashboards.sock".into(),
            split_count: env.cfg.registration.device_split_count,
            libvgpu_host_path: dir.join("libvgpu.so"),
            ld_so_preload_host_path: None,
            decision_key_file: key_file.clone(),
            watch_interval_ms: 200,
            health_interval_ms: 500,
            host_dev_dir: env.cfg.paths.dev_dir.clone(),
            ..DevicePluginConfig::default()
        };

        // The scheduler: HTTPS (the webhook needs it) with a self-signed certificate, metrics apart.
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl req failed");
        let (https_port, metrics_port) = (common::free_port(), common::free_port());
        let config = dir.join("scheduler.json");
        std::fs::write(
            &config,
            json!({
                "listen": format!("127.0.0.1:{https_port}"),
                "metricsListen": format!("127.0.0.1:{metrics_port}"),
                "decisionKeyFile": key_file,
                "webhook": {"enabled": true},
            })
            .to_string(),
        )
        .expect("scheduler config");
        let log = std::fs::File::create(dir.join("scheduler.log")).expect("scheduler log");
        let scheduler = Stopped(
            Command::new(common::scheduler_binary())
                .args(["serve", "--config"])
                .arg(&config)
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .env("KUBECONFIG", &kubeconfig)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting hami-scheduler"),
        );
        let cp = Self {
            rt,
            api,
            _scheduler: scheduler,
            https_port,
            metrics_port,
            plugin_dir,
            registered,
            dir,
        };
        cp.wait("the scheduler's metrics", || {
            http_get(metrics_port, "/metrics").is_some()
        });
        (cp, vec![("KUBECONFIG", kubeconfig)])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("scheduler.log")).unwrap_or_default()
    }

    /// Polls `cond` every 100 ms (30 s at most).
    fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; scheduler log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POSTs JSON to the scheduler over HTTPS (`curl`, self-signed certificate); the JSON answer.
    fn post(&self, path: &str, body: &Value) -> Value {
        let mut child = Command::new("curl")
            .args([
                "-sk",
                "--fail-with-body",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ])
            .arg(format!("https://127.0.0.1:{}{path}", self.https_port))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("curl stdin");
            stdin.write_all(body.to_string().as_bytes()).expect("curl stdin");
        }
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "POST {path}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }

    /// Filter and bind `pod` onto the node, as kube-scheduler drives an extender.
    fn schedule(&self, pod: &Value) -> Value {
        let f = self.post(
            "/filter",
            &json!({"Pod": pod, "Nodes": null, "NodeNames": [NODE]}),
        );
        assert_eq!(f["NodeNames"], json!([NODE]), "filter: {f}");
        self.bind(pod)
    }

    fn bind(&self, pod: &Value) -> Value {
        self.post(
            "/bind",
            &json!({
                "PodName": pod["metadata"]["name"], "PodNamespace": pod["metadata"]["namespace"],
                "PodUID": pod["metadata"]["uid"], "Node": NODE,
            }),
        )
    }

    fn annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.api
            .pod(namespace, name)?
            .metadata
            .annotations?
            .get(key)
            .cloned()
    }

    /// The kubelet: waits for the plugin's registration, connects, and reads the advertised device IDs.
    fn connect(&mut self) -> (DevicePluginClient<tonic::transport::Channel>, Vec<String>) {
        let dir = self.plugin_dir.clone();
        let registered = &mut self.registered;
        self.rt.block_on(async move {
            let r = tokio::time::timeout(Duration::from_secs(60), registered.recv())
                .await
                .expect("the device plugin registers")
                .expect("registration channel");
            let ch = unix_channel(&dir.join(&r.endpoint)).await.expect("plugin socket");
            let mut c = DevicePluginClient::new(ch);
            let mut stream = c
                .list_and_watch(proto::Empty {})
                .await
                .expect("ListAndWatch")
                .into_inner();
            let first = stream
                .message()
                .await
                .expect("ListAndWatch")
                .expect("a device list");
            (c, first.devices.into_iter().map(|d| d.id).collect())
        })
    }

    /// Allocate for one container with one device on GPU `uuid`, as the kubelet calls it.
    fn allocate(
        &self,
        c: &mut DevicePluginClient<tonic::transport::Channel>,
        ids: &[String],
        uuid: &str,
    ) -> Result<(), String> {
        let id = ids
            .iter()
            .find(|i| i.starts_with(uuid))
            .unwrap_or_else(|| panic!("no device id on {uuid}: {ids:?}"));
        let req = proto::AllocateRequest {
            container_requests: vec![proto::ContainerAllocateRequest {
                devices_ids: vec![id.clone()],
            }],
        };
        self.rt
            .block_on(c.allocate(req))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A pod of one container asking one GPU with `mib` MiB and `cores` %, pending, for our scheduler.
fn gpu_pod(namespace: &str, name: &str, uid: &str, mib: u64, cores: u32) -> Value {
    let limits = json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": mib.to_string(), "nvidia.com/gpucores": cores.to_string()});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"schedulerName": "hami-scheduler", "containers": [
            {"name": "main", "image": "cuda", "resources": {"limits": limits, "requests": limits}}
        ]},
        "status": {"phase": "Pending"}
    })
}

/// The control-plane scenario, once Prometheus scrapes the scheduler (so counters have a baseline).
fn drive_control_plane(cp: &mut ControlPlane) {
    // The agent registered the node and the scheduler reads it as ready.
    cp.wait("the scheduler to see the registered node ready", || {
        cp.metrics()
            .contains("hami_scheduler_nodes{condition=\"ready\"} 1")
    });
    // Webhook: a GPU pod is mutated, a CPU pod allowed unchanged, a privileged GPU pod denied.
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scheduler/extender/tests/fixtures/admission");
    for (file, allowed, patched) in [
        ("gpu-pod.json", true, true),
        ("cpu-pod.json", true, false),
        ("c16-privileged-sidecar.json", false, false),
    ] {
        let review: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(file)).expect("fixture"))
                .expect("fixture JSON");
        let r = cp.post("/webhook", &review);
        assert_eq!(r["response"]["allowed"], allowed, "{file}: {r}");
        assert_eq!(r["response"].get("patch").is_some(), patched, "{file}: {r}");
    }
    // Two pods (the tenants' pods: their UIDs are the agent's pod_uid labels), 60 % of a GPU each:
    // one per GPU. The device plugin allocates both.
    let (uid_a, uid_b) = (common::ids(1).0, common::ids(2).0);
    let pods = [
        gpu_pod("team-a", "train", &uid_a, 2458, 60),
        gpu_pod("team-b", "infer", &uid_b, 2458, 60),
    ];
    let (mut client, ids) = cp.connect();
    for p in &pods {
        cp.api.insert_pod(serde_json::from_value(p.clone()).expect("pod"));
        let r = cp.schedule(p);
        assert!(r["Error"].as_str().unwrap_or_default().is_empty(), "bind: {r}");
        let (ns, name) = (
            p["metadata"]["namespace"].as_str().unwrap_or_default(),
            p["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let decision = cp.annotation(ns, name, DEVICES_ALLOCATED).expect("a decision");
        let uuid = decision.split(',').next().unwrap_or_default().to_owned();
        cp.allocate(&mut client, &ids, &uuid)
            .unwrap_or_else(|e| panic!("Allocate for {name}: {e}"));
        cp.wait("bind-phase success", || {
            cp.annotation(ns, name, BIND_PHASE).as_deref() == Some("success")
        });
    }
    // A forged decision (not signed with the scheduler's key) is refused by the plugin (C18).
    let train_gpu = cp
        .annotation("team-a", "train", DEVICES_ALLOCATED)
        .expect("decision")
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    let value = format!("{train_gpu},NVIDIA,500,5:;");
    let now = now_s() as u64;
    let mut forged = gpu_pod("team-a", "forged", "uid-forged", 500, 5);
    forged["spec"]["nodeName"] = json!(NODE);
    forged["metadata"]["annotations"] = json!({
        VGPU_NODE: NODE, VGPU_TIME: now.to_string(), BIND_TIME: now.to_string(), BIND_PHASE: "allocating",
        DEVICES_ALLOCATED: value, DEVICES_TO_ALLOCATE: value,
        DECISION_SIGNATURE: sign_decision(b"not-the-key", "uid-forged", NODE, &value),
    });
    cp.api.insert_pod(serde_json::from_value(forged).expect("pod"));
    assert!(
        cp.allocate(&mut client, &ids, &train_gpu).is_err(),
        "a forged decision was allocated"
    );
    cp.wait("the forged pod marked failed", || {
        cp.annotation("team-a", "forged", BIND_PHASE).as_deref() == Some("failed")
    });
    // A bind the node cannot take any more (both GPUs 60 % allocated): a conflict.
    let late = gpu_pod("team-b", "late", "uid-late", 2458, 60);
    cp.api
        .insert_pod(serde_json::from_value(late.clone()).expect("pod"));
    let r = cp.bind(&late);
    assert!(
        !r["Error"].as_str().unwrap_or_default().is_empty(),
        "bind should conflict: {r}"
    );
    // A pod no GPU can take: the filter finds no node.
    let f = cp.post("/filter", &json!({"Pod": gpu_pod("team-b", "huge", "uid-huge", 100_000, 10), "Nodes": null, "NodeNames": [NODE]}));
    assert_eq!(f["NodeNames"], json!([]), "{f}");
    // A small pod bound but never started: pending in the scheduler.
    let small = gpu_pod("team-a", "notebook", "uid-notebook", 400, 10);
    cp.api
        .insert_pod(serde_json::from_value(small.clone()).expect("pod"));
    let r = cp.schedule(&small);
    assert!(r["Error"].as_str().unwrap_or_default().is_empty(), "bind: {r}");
    // One failed registration write (the agent retries it).
    cp.api
        .fail_next("PATCH", &format!("/api/v1/nodes/{NODE}"), 500, 1);
}

/// The largest sample of an instant (`value`) or range (`values`) result.
fn max_value(series: &[Value]) -> f64 {
    let parse = |p: &Value| p[1].as_str().and_then(|s| s.parse::<f64>().ok());
    series
        .iter()
        .flat_map(|s| {
            let mut v: Vec<f64> = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(parse)
                .collect();
            v.extend(parse(&s["value"]));
            v
        })
        .filter(|v| !v.is_nan())
        .fold(f64::NEG_INFINITY, f64::max)
}

fn kill(t: Tenant) {
    let _ = Command::new("kill").args(["-KILL", &t.pid.to_string()]).status();
    t.finish();
}

fn ok(t: Tenant, what: &str) {
    let (ok, err) = t.outcome();
    assert!(ok, "{what} failed: {err}");
}

const MIB: u64 = 1 << 20;

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus() {
    let Some(mut stack) = Stack::start("dashboards", 2, 4096, None, true) else {
        return;
    };
    let env = &stack.env;
    let (ca, cb) = (env.container(1), env.container(2));
    let (pod_a, cid_a) = common::ids(1);
    let (_, cid_b) = common::ids(2);
    // 20 ms kernels: the fake NVML's cost grows with the launches it keeps, so shorter ones slow the
    // agent's /metrics down past the 1 s scrape interval within seconds.
    let kernel = [("HAMI_FAKE_CUDA_KERNEL_US", "20000")];
    let s = |v: u64| v.to_string();
    // Container A on GPU 0: device and managed memory and a steady full-GPU compute load.
    let mut a = env.spawn(
        &ca,
        &[
            "--device",
            "0",
            "--alloc",
            &s(256 * MIB),
            "--alloc",
            &s(64 * MIB),
            "--managed",
            &s(32 * MIB),
            "--launch-for-ms",
            "60000",
            "--grid",
            "132",
            "--hold",
        ],
        &kernel,
    );
    // Container B (another pod) on GPU 1: a quarter-GPU load.
    let mut b = env.spawn(
        &cb,
        &[
            "--device",
            "1",
            "--alloc",
            &s(512 * MIB),
            "--managed",
            &s(16 * MIB),
            "--launch-for-ms",
            "60000",
            "--grid",
            "33",
            "--hold",
        ],
        &kernel,
    );
    a.words("meminfo");
    b.words("meminfo");
    // Once Prometheus has scraped A's series (a counter's first sample is its baseline), short-lived
    // processes in A: an allocation the driver refuses (the OOM-denial panels), one that frees what it
    // allocated and one that exits holding memory (released at exit): the churn panels.
    std::thread::sleep(Duration::from_millis(2500));
    ok(
        env.spawn(&ca, &["--raw-fail", &s(1 << 40)], &[]),
        "refused tenant",
    );
    ok(
        env.spawn(&ca, &["--alloc", &s(MIB), "--free"], &[]),
        "freeing tenant",
    );
    ok(env.spawn(&ca, &["--alloc", &s(MIB)], &[]), "exiting tenant");
    // The scheduler, webhook, device plugin and registration series (module docs).
    drive_control_plane(stack.cp.as_mut().expect("control plane"));

    let vars = |range_s: u64| {
        [
            ("$__rate_interval", "4s".to_owned()),
            ("$__range", format!("{range_s}s")),
            ("$node", env.cfg.node_name.clone()),
            ("$gpu", "0".to_owned()),
            ("$pod_uid", pod_a.clone()),
            ("$container_id", cid_a.clone()),
        ]
    };
    let substitute = |expr: &str, range_s: u64| {
        let mut e = expr.to_owned();
        for (k, v) in vars(range_s) {
            e = e.replace(&format!("${{{}}}", &k[1..]), &v).replace(k, &v);
        }
        assert!(!e.contains('$'), "unsubstituted variable in `{e}`");
        e
    };
    let dashboards = dashboards();
    // Counters need a few scrapes after the tenants started before rate() and increase() see them;
    // everything is retried until it holds (a failure reports what still does not).
    let deadline = Instant::now() + Duration::from_secs(20);
    std::thread::sleep(Duration::from_secs(3));
    let queries = loop {
        let mut failures = Vec::new();
        let end = now_s();
        let range_s = (end - stack.first_scrape).ceil() as u64 + 1;
        let mut queries = 0;
        for (file, d) in &dashboards {
            for q in panel_queries(file, d) {
                queries += 1;
                let expr = substitute(&q.expr, range_s);
                let series = if q.instant {
                    stack.instant(&expr)
                } else {
                    stack.range(&expr, stack.first_scrape, end)
                };
                let may_be_zero = MAY_BE_ZERO.iter().any(|m| expr.contains(m));
                if series.is_empty() {
                    failures.push(format!("{}: no series for `{expr}`", q.what));
                } else if !may_be_zero && max_value(&series) <= 0.0 {
                    failures.push(format!("{}: only zeros for `{expr}`", q.what));
                }
            }
            // Variables: label_values(selector, label) lists the value the panels were given.
            for (name, sel, label) in variable_queries(file, d) {
                queries += 1;
                let expr = substitute(&format!("count by ({label}) ({sel})"), range_s);
                let values: BTreeSet<String> = stack
                    .instant(&expr)
                    .iter()
                    .filter_map(|s| s["metric"][&label].as_str().map(str::to_owned))
                    .collect();
                let want = vars(range_s)
                    .into_iter()
                    .find(|(k, _)| k[1..] == name)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| panic!("no test value for ${name}"));
                if !values.contains(&want) {
                    failures.push(format!(
                        "{file}: variable {name}: {values:?} lacks {want} (`{expr}`)"
                    ));
                }
            }
        }
        if failures.is_empty() {
            break queries;
        }
        if Instant::now() >= deadline {
            // What the scrapes looked like (a slow or failing /metrics leaves gauges stale).
            let up = stack.range("up", stack.first_scrape, end);
            let took = stack.range("scrape_duration_seconds", stack.first_scrape, end);
            panic!(
                "dashboard queries without data:\n{}\nup: {up:?}\nscrape_duration_seconds: {took:?}",
                failures.join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("{queries} dashboard queries returned data");
    // What both binaries expose is what their lists say: every agent metric (telemetry, device plugin,
    // registration) with its labels, type and help, and every scheduler family a row of the reference.
    let agent_defs: Vec<hami_api::metrics::MetricDef> = hami_agent::metrics::METRICS
        .iter()
        .chain(hami_agent::deviceplugin::metrics::METRICS)
        .chain(hami_agent::registration::METRICS)
        .copied()
        .collect();
    let agent_text = http_get(stack.agent_port, "/metrics").expect("agent /metrics");
    let problems = hami_api::metrics::check_exposition(&agent_defs, &agent_text, true);
    assert!(
        problems.is_empty(),
        "agent exposition vs its lists: {problems:#?}"
    );
    let documented = exported();
    let scheduler_text = stack.cp.as_ref().expect("control plane").metrics();
    let families: Vec<&str> = scheduler_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .filter(|n| n.starts_with("hami_"))
        .collect();
    assert!(families.len() >= 20, "{scheduler_text}");
    for f in families {
        assert!(
            documented.contains(f),
            "the scheduler exposes {f}, which docs/metrics.md lacks"
        );
    }
    // The second container is on the dashboards too (the cluster view sees both GPUs busy).
    let busy = stack.instant("sum by (container_id) (rate(hami_container_sm_seconds_total[4s]))");
    for cid in [&cid_a, &cid_b] {
        assert!(
            busy.iter().any(|s| s["metric"]["container_id"] == cid.as_str()),
            "no SM series for {cid}: {busy:?}"
        );
    }
    kill(a);
    kill(b);
    drop(stack);
}

// ---------------------------------------------------------------------------------------------------
// The scenario `cargo xtask plots` renders.

/// Waits until `t` seconds after `t0`.
fn at(t0: Instant, t: u64) {
    let when = t0 + Duration::from_secs(t);
    if let Some(d) = when.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Three pods on two simulated 80 GiB GPUs for about a minute, scraped by Prometheus into
/// `$HAMI_PLOTS_DIR/tsdb`; `$HAMI_PLOTS_DIR/window.json` gets the time window and the containers'
/// names. Run by `cargo xtask plots` (root), which then renders the series from that data.
#[test]
#[ignore = "run by `cargo xtask plots`"]
fn plot_scenario() {
    let Some(dir) = std::env::var_os("HAMI_PLOTS_DIR").map(PathBuf::from) else {
        eprintln!("skipped plot_scenario: set HAMI_PLOTS_DIR (cargo xtask plots does)");
        return;
    };
    std::fs::create_dir_all(&dir).expect("plots dir");
    let Some(stack) = Stack::start("plots", 2, 80 * 1024, Some(&dir.join("tsdb")), false) else {
        return;
    };
    let env = &stack.env;
    let start = stack.first_scrape;
    let t0 = Instant::now();
    let gib = |g: u64| (g << 30).to_string();
    // 100 ms kernels: few launches, so the simulated node's cost stays flat over the minute.
    let kernel = [("HAMI_FAKE_CUDA_KERNEL_US", "100000")];
    let (train, infer, batch) = (env.container(1), env.container(2), env.container(3));
    // t = 2 s: "train" (GPU 0) holds 24 GiB and 2 GiB managed, 75 % of the SMs for 40 s.
    at(t0, 2);
    let mut a = env.spawn(
        &train,
        &[
            "--device",
            "0",
            "--alloc",
            &gib(24),
            "--managed",
            &gib(2),
            "--launch-for-ms",
            "40000",
            "--grid",
            "99",
            "--hold",
        ],
        &kernel,
    );
    a.words("meminfo");
    let a_pid = a.pid;
    // t = 12 s: "infer" (GPU 1) holds 8 GiB, 50 % of the SMs for 45 s.
    at(t0, 12);
    let mut b = env.spawn(
        &infer,
        &[
            "--device",
            "1",
            "--alloc",
            &gib(8),
            "--launch-for-ms",
            "45000",
            "--grid",
            "66",
            "--hold",
        ],
        &kernel,
    );
    b.words("meminfo");
    let b_pid = b.pid;
    // t = 22 s: "batch" shares GPU 0 with "train": 12 GiB, 25 % of the SMs for 25 s.
    at(t0, 22);
    let mut c = env.spawn(
        &batch,
        &[
            "--device",
            "0",
            "--alloc",
            &gib(12),
            "--launch-for-ms",
            "25000",
            "--grid",
            "33",
            "--hold",
        ],
        &kernel,
    );
    c.words("meminfo");
    let c_pid = c.pid;
    // t = 32 s: a second process of "infer" adds 8 GiB (no compute).
    at(t0, 32);
    let mut b2 = env.spawn(&infer, &["--device", "1", "--alloc", &gib(8), "--hold"], &[]);
    b2.words("meminfo");
    // "train" and "batch" finish their kernels by t = 47 s and exit at t = 52 s; "infer" at 64 s.
    a.words("launched-for");
    c.words("launched-for");
    at(t0, 52);
    a.finish();
    c.finish();
    b.words("launched-for");
    at(t0, 64);
    b.finish();
    b2.finish();
    at(t0, 68);
    let end = now_s();
    // What the chargeback plot shows matches the node's ground truth: each container's SM-seconds
    // (the counter's last value in Prometheus) against the model's per-process SM time.
    let truth = env.node.ground_truth();
    let charged = stack.range(
        "sum by (container_id) (hami_container_sm_seconds_total)",
        start,
        end,
    );
    for (n, gpu, pid) in [(1, 0, a_pid), (2, 1, b_pid), (3, 0, c_pid)] {
        let want = truth.gpus[gpu]
            .sm_seconds_by_pid
            .get(&pid)
            .copied()
            .unwrap_or(0.0);
        let cid = common::ids(n).1;
        let got = max_value(
            &charged
                .iter()
                .filter(|s| s["metric"]["container_id"] == cid.as_str())
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert!(
            want > 1.0 && (got - want).abs() <= 0.05 * want,
            "container {n}: {got} SM-s charged, ground truth {want}"
        );
    }
    // The data is complete: the rate of every container's SM-seconds was seen.
    let seen = stack.range("hami_container_sm_seconds_total", start, end);
    assert!(seen.len() >= 3, "SM series: {seen:?}");
    let names: BTreeMap<String, String> = [(1, "train"), (2, "infer"), (3, "batch")]
        .into_iter()
        .map(|(n, name)| (common::ids(n).1, name.to_owned()))
        .collect();
    let window = serde_json::json!({ "start": start, "end": end, "names": names });
    std::fs::write(dir.join("window.json"), window.to_string()).expect("window.json");
    drop(stack);
    eprintln!("plot data in {}", dir.display());
}
