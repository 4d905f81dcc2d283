//! A real Prometheus (Debian package `prometheus`) scrapes the real agent binary while a tenant holds
//! device memory on the simulated node, and PromQL returns the tenant's bytes from the ground truth.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Env, encode, http_get};

#[test]
fn prometheus_scrapes_the_agent_and_promql_returns_ground_truth() {
    let Some(env) = Env::new("prometheus", 1, 256) else {
        return;
    };
    if !common::prometheus_or_skip("prometheus") {
        return;
    }
    let (_agent, agent_port) = common::start_agent(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    let c = env.container(7);
    let (_, cid) = common::ids(7);
    let mut w = env.spawn(&c, &["--alloc", "3145728", "--launch", "2", "--hold"], &[]);
    w.words("launched");
    let truth = env.node.ground_truth().bytes(w.pid, 0);
    assert_eq!(truth, 3 << 20);

    // The JSON snapshot over HTTP.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = http_get(agent_port, "/snapshot").unwrap_or_default();
        if snap.contains(&cid) && snap.contains("\"memory_bytes\":3145728") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot never showed the tenant: {snap}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (_prom, prom_port) = common::start_prometheus(&env, agent_port, None);
    let query = format!(
        "/api/v1/query?query={}",
        encode(&format!(
            "sum(hami_container_device_memory_bytes{{container_id=\"{cid}\"}})"
        ))
    );
    let launches = format!(
        "/api/v1/query?query={}",
        encode(&format!(
            "sum(hami_container_cuda_calls_total{{container_id=\"{cid}\",call=\"cuLaunchKernel\"}})"
        ))
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = http_get(prom_port, &query).unwrap_or_default();
        let l = http_get(prom_port, &launches).unwrap_or_default();
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
