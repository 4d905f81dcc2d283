//! A real Prometheus (Debian package `prometheus`) scrapes the real agent binary while a tenant holds
//! device memory on the simulated node, and PromQL returns the tenant's bytes from the ground truth.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET over HTTP/1.0; `None` while the server is not up.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| rest.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| rest.to_owned()))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SIGTERM first (the agent saves its state), then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> Option<&'static str> {
    Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some("prometheus")
}

#[test]
fn prometheus_scrapes_the_agent_and_promql_returns_ground_truth() {
    let Some(env) = Env::new("prometheus", 1, 256) else {
        return;
    };
    let Some(prom) = prometheus_binary() else {
        assert!(
            std::env::var_os("HAMI_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
            "prometheus is not installed (apt-get install prometheus; cargo xtask ci does it)"
        );
        eprintln!("skipped: prometheus is not installed");
        return;
    };
    let agent_port = free_port();
    let cfg = env.config_file(&format!("127.0.0.1:{agent_port}"));
    let _agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_hami-agent"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting hami-agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(agent_port, "/healthz").is_none() {
        assert!(Instant::now() < deadline, "the agent did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = env.container(7);
    let (_, cid) = common::ids(7);
    let mut w = env.spawn(&c, &["--alloc", "3145728", "--launch", "2", "--hold"], &[]);
    w.words("launched");
    let truth = env.node.ground_truth().bytes(w.pid, 0);
    assert_eq!(truth, 3 << 20);

    // The JSON snapshot over HTTP.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = get(agent_port, "/snapshot").unwrap_or_default();
        if snap.contains(&cid) && snap.contains("\"memory_bytes\":3145728") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot never showed the tenant: {snap}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let prom_port = free_port();
    let prom_dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hami-agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .unwrap();
    let _prom = Killed(
        Command::new(prom)
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let query = format!(
        "/api/v1/query?query=sum(hami_container_device_memory_bytes%7Bcontainer_id%3D%22{cid}%22%7D)"
    );
    let launches = format!(
        "/api/v1/query?query=sum(hami_container_cuda_calls_total%7Bcontainer_id%3D%22{cid}%22,call%3D%22cuLaunchKernel%22%7D)"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = get(prom_port, &query).unwrap_or_default();
        let l = get(prom_port, &launches).unwrap_or_default();
        if body.contains(&format!("\"{truth}\"")) && l.contains("\"2\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PromQL never returned {truth}: {body} / {l}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    w.finish();
}
