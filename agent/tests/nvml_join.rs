//! The agent binary joins NVML per-process utilisation (the fake NVML over the simulated node) with the
//! kernel's pid → cgroup map: per-container SM-seconds match the node's ground truth, and two
//! containers of one pod on two GPUs get their own series with their own GPU UUIDs (peer case C14).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Env, http_get};

fn sm_seconds(snapshot: &serde_json::Value, container_id: &str, gpu: u64) -> Option<f64> {
    snapshot["containers"]
        .as_array()?
        .iter()
        .find(|c| c["identity"]["container_id"] == container_id)?["gpus"]
        .as_array()?
        .iter()
        .find(|g| g["gpu"] == gpu)?["sm_seconds"]
        .as_f64()
}

#[test]
fn sm_seconds_and_gpu_uuids_per_container_match_ground_truth() {
    let Some(mut env) = Env::new("nvml-join", 2, 256) else {
        return;
    };
    env.cfg.nvml_lib = Some(common::fake_nvml());
    let (_agent, port) = common::start_agent(&env, Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    // One pod, two containers, one GPU each. A: three full-GPU kernels of 0.3 s at once (capped at
    // 100 %: 0.3 SM-s). B: one half-GPU kernel of 0.4 s (0.2 SM-s).
    let a = env.container_in(9, 9);
    let b = env.container_in(9, 10);
    let (_, cid_a) = common::ids(9);
    let (_, cid_b) = common::ids(10);
    let mut wa = env.spawn(
        &a,
        &[
            "--device", "0", "--alloc", "1048576", "--launch", "3", "--grid", "132", "--sync", "--hold",
        ],
        &[("HAMI_FAKE_CUDA_KERNEL_US", "300000")],
    );
    let mut wb = env.spawn(
        &b,
        &[
            "--device", "1", "--alloc", "2097152", "--launch", "1", "--grid", "66", "--sync", "--hold",
        ],
        &[("HAMI_FAKE_CUDA_KERNEL_US", "400000")],
    );
    wa.words("synchronized");
    wb.words("synchronized");
    let truth = env.node.ground_truth();
    let t_a = truth.gpus[0]
        .sm_seconds_by_pid
        .get(&wa.pid)
        .copied()
        .unwrap_or(0.0);
    let t_b = truth.gpus[1]
        .sm_seconds_by_pid
        .get(&wb.pid)
        .copied()
        .unwrap_or(0.0);
    assert!(
        (t_a - 0.3).abs() < 0.02 && (t_b - 0.2).abs() < 0.02,
        "ground truth {t_a} {t_b}"
    );
    let close = |got: f64, want: f64| (got - want).abs() <= 0.01 + 0.02 * want;
    let deadline = Instant::now() + Duration::from_secs(20);
    let snap = loop {
        let snap: serde_json::Value = http_get(port, "/snapshot")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let (ga, gb) = (sm_seconds(&snap, &cid_a, 0), sm_seconds(&snap, &cid_b, 1));
        if ga.is_some_and(|g| close(g, t_a)) && gb.is_some_and(|g| close(g, t_b)) {
            break snap;
        }
        assert!(
            Instant::now() < deadline,
            "SM-seconds never matched the ground truth ({t_a}, {t_b}): {ga:?} {gb:?} in {snap:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Each container's series carries its own GPU's UUID (from discovery through NVML).
    let metrics = http_get(port, "/metrics").expect("metrics");
    for (cid, gpu, bytes) in [(&cid_a, 0usize, 1_048_576u64), (&cid_b, 1, 2_097_152)] {
        let uuid = &truth.gpus[gpu].uuid;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("hami_container_device_memory_bytes{") && l.contains(cid.as_str()))
            .unwrap_or_else(|| panic!("no memory series for {cid}: {metrics}"));
        assert!(line.contains(&format!("uuid=\"{uuid}\"")), "{line}");
        assert!(
            line.contains(&format!("gpu=\"{gpu}\"")) && line.ends_with(&format!(" {bytes}")),
            "{line}"
        );
    }
    assert_eq!(snap["gpus"].as_array().map(Vec::len), Some(2));
    wa.finish();
    wb.finish();
}
