//! The Grafana dashboards (`grafana/dashboards/*.json`) against the agent.
//!
//! - Without privileges: every metric a panel or variable names is one the agent exports
//!   (`hami_agent::metrics::METRICS`), every exported metric is on some dashboard, and every dashboard
//!   takes its datasource from the `DS_PROMETHEUS` variable.
//! - On the simulated GPU node (root): the real agent binary (with the fake NVML, so SM-seconds exist)
//!   attributes two containers' tenants, a real Prometheus (Debian `prometheus`) scrapes it every
//!   second, and every PromQL query of every panel and variable, with Grafana's variables replaced by
//!   concrete values, returns at least one series through Prometheus's HTTP API (and a non-zero value,
//!   except for the agent's loss counters, which must stay at zero).
//! - `plot_scenario` (ignored): a longer scenario whose Prometheus data `cargo xtask plots` renders.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Env, Stopped, Tenant, encode, http_get};
use serde_json::Value;

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
        out.len() >= 4,
        "expected the four dashboards in {}",
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
            out.push(expr[start..end].to_owned());
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

fn exported() -> BTreeSet<&'static str> {
    hami_agent::metrics::METRICS.iter().map(|d| d.name).collect()
}

#[test]
fn every_metric_a_dashboard_names_is_exported_by_the_agent() {
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
        "metrics not in hami_agent::metrics::METRICS:\n{}",
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
    let missing: Vec<&str> = exported().into_iter().filter(|m| !used.contains(*m)).collect();
    assert!(missing.is_empty(), "exported but on no dashboard: {missing:?}");
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

/// The agent binary and Prometheus on a simulated node. Fields drop in order: Prometheus, the agent,
/// then the node.
struct Stack {
    _prom: Stopped,
    prom_port: u16,
    _agent: Stopped,
    env: Env,
    /// When Prometheus first had a sample of the agent (unix seconds).
    first_scrape: f64,
}

impl Stack {
    /// `None` when the test is skipped (no privileges, or no Prometheus and privileges not required).
    fn start(test: &str, gpus: u32, memory_mib: u64, tsdb: Option<&Path>) -> Option<Self> {
        let mut env = Env::new(test, gpus, memory_mib)?;
        if !common::prometheus_or_skip(test) {
            return None;
        }
        env.cfg.nvml_lib = Some(common::fake_nvml());
        let (agent, agent_port) = common::start_agent(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")));
        let (prom, prom_port) = common::start_prometheus(&env, agent_port, tsdb);
        Some(Self {
            _prom: prom,
            prom_port,
            _agent: agent,
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
    let Some(stack) = Stack::start("dashboards", 2, 4096, None) else {
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
    let Some(stack) = Stack::start("plots", 2, 80 * 1024, Some(&dir.join("tsdb"))) else {
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
