//! `nvml-wrapper` pointed at the fake `libnvidia-ml.so.1` discovers the simulated GPUs (privileged: a
//! FUSE mount). Skips with a printed reason without root or `/dev/fuse`; fails instead when
//! `HAMI_REQUIRE_PRIVILEGED=1`.
//!
//! The NVML reader runs in a child process (`hami-nvml-probe probe`), because the fake library finds the
//! node through `HAMI_FAKE_GPU_DIR` and the environment of a running test process must not be changed.
//! The child prints what NVML reports, one fact per line; another child (`hami-nvml-probe tenant`)
//! allocates device memory through the node's real RM ioctls and holds it; the parent compares what NVML
//! reports with the node's ground truth.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use common::{HELPER, lib_dir};

use hami_fake_gpu::model::MIB;
use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};

/// Runs `hami-nvml-probe probe` in a child process and returns its `nvml …` lines.
fn probe(lib: &Path, node_dir: Option<&Path>) -> Vec<String> {
    let mut cmd = Command::new(HELPER);
    cmd.arg("probe").arg(lib).env_remove("HAMI_FAKE_GPU_DIR");
    if let Some(d) = node_dir {
        cmd.env("HAMI_FAKE_GPU_DIR", d);
    }
    let out = cmd.output().expect("running the NVML probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "probe failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("nvml "))
        .map(str::to_owned)
        .collect()
}

/// A tenant process (`hami-nvml-probe tenant`) holding device memory on the node.
struct Tenant {
    child: Child,
    /// Kept open (and drained at the end) so the child's harness never writes into a closed pipe.
    out: BufReader<ChildStdout>,
}

impl Tenant {
    fn spawn(node_dir: &Path) -> Self {
        let mut child = Command::new(HELPER)
            .arg("tenant")
            .arg(node_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the tenant");
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).expect("reading the tenant's stdout");
            assert!(n > 0, "the tenant exited before allocating");
            if line.trim() == "tenant allocated" {
                break;
            }
        }
        Self { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin and waits for it to exit.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.out
            .read_to_string(&mut rest)
            .expect("draining the tenant's stdout");
        let status = self.child.wait().expect("waiting for the tenant");
        assert!(status.success(), "tenant failed: {status}");
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key → value` for the probe's `gpu <i> <key> <value>` lines of GPU `i`.
fn gpu_facts(lines: &[String], i: u32) -> BTreeMap<String, String> {
    let prefix = format!("gpu {i} ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter(|l| !l.starts_with("proc "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The probe's `gpu <i> proc <pid> <bytes>` lines of GPU `i`.
fn gpu_procs(lines: &[String], i: u32) -> BTreeMap<u32, u64> {
    let prefix = format!("gpu {i} proc ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|l| {
            let (pid, bytes) = l.split_once(' ').expect("pid and bytes");
            (pid.parse().expect("pid"), bytes.parse().expect("bytes"))
        })
        .collect()
}

#[test]
fn nvml_wrapper_discovers_the_simulated_gpus_and_their_processes() {
    if !privileged_or_skip("nvml_wrapper_discovers_the_simulated_gpus_and_their_processes") {
        return;
    }
    let uniform = DeviceModel::uniform(2, 1024);
    let mut devices: Vec<_> = (0..2).map(|i| uniform.device(i).unwrap().clone()).collect();
    // GPU 0 reports no NUMA node, GPU 1 sits on node 1.
    devices[0].numa = None;
    devices[1].numa = Some(1);
    let node = FakeNode::start_temp(DeviceModel::new(devices.clone())).unwrap();
    let lib = lib_dir("discovery");

    // Idle node: every GPU as the model describes it, nothing used, no processes.
    let lines = probe(&lib.lib(), Some(node.dir()));
    assert!(lines.contains(&"init ok".to_owned()), "{lines:?}");
    assert!(lines.contains(&"driver 595.45.04".to_owned()), "{lines:?}");
    assert!(lines.contains(&"cuda 12080".to_owned()), "{lines:?}");
    assert!(lines.contains(&"count 2".to_owned()), "{lines:?}");
    assert!(lines.contains(&"unknown-uuid true".to_owned()), "{lines:?}");
    for d in &devices {
        let f = gpu_facts(&lines, d.index);
        assert_eq!(f["index"], d.index.to_string());
        assert_eq!(f["by-uuid-index"], d.index.to_string());
        assert_eq!(f["uuid"], d.uuid);
        assert_eq!(f["name"], d.model);
        assert_eq!(f["total"], (d.memory_mib * MIB).to_string());
        assert_eq!(f["used"], "0");
        assert_eq!(f["free"], (d.memory_mib * MIB).to_string());
        assert_eq!(f["pci"], format!("00000000:{:02X}:00.0", 0x18 + 8 * d.index));
        let numa = d.numa.map_or("not-supported".to_owned(), |n| n.to_string());
        assert_eq!(f["numa"], numa, "gpu {}: nvmlDeviceGetNumaNodeId", d.index);
        assert_eq!(f["util"], "0");
        assert!(gpu_procs(&lines, d.index).is_empty());
    }

    // A tenant process allocates 3 MiB on GPU 1 through the node's real RM ioctls (as libcuda does).
    let tenant = Tenant::spawn(node.dir());
    let pid = tenant.pid();
    let truth = node.ground_truth();
    assert_eq!(truth.bytes(pid, 1), 3 * MIB);

    // Another process's NVML sees exactly the ground truth.
    let lines = probe(&lib.lib(), Some(node.dir()));
    for g in &truth.gpus {
        let f = gpu_facts(&lines, g.index);
        assert_eq!(f["used"], g.used_bytes.to_string(), "gpu {}", g.index);
        assert_eq!(f["free"], (g.total_bytes - g.used_bytes).to_string());
        assert_eq!(
            gpu_procs(&lines, g.index),
            truth.bytes_per_pid(g.index),
            "gpu {}",
            g.index
        );
    }
    assert_eq!(gpu_procs(&lines, 1), BTreeMap::from([(pid, 3 * MIB)]));
    // The unversioned call (nvmlProcessInfo_v1_t) answers the same.
    let v1: BTreeMap<u32, u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("gpu 1 proc-v1 "))
        .map(|l| {
            let (p, b) = l.split_once(' ').expect("pid and bytes");
            (p.parse().expect("pid"), b.parse().expect("bytes"))
        })
        .collect();
    assert_eq!(v1, BTreeMap::from([(pid, 3 * MIB)]));
    assert!(gpu_procs(&lines, 0).is_empty());

    // The tenant exits without freeing: the driver frees on close; NVML follows.
    tenant.finish();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.ground_truth().gpus[1].used_bytes != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed client's memory was not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let lines = probe(&lib.lib(), Some(node.dir()));
    assert_eq!(gpu_facts(&lines, 1)["used"], "0");
    assert!(gpu_procs(&lines, 1).is_empty());
}

#[test]
fn init_without_a_node_is_driver_not_loaded() {
    // No FUSE needed: the library refuses to initialise without HAMI_FAKE_GPU_DIR.
    let lib = lib_dir("no-node");
    let lines = probe(&lib.lib(), None);
    assert_eq!(lines, ["init driver-not-loaded"]);
}

#[test]
fn nvml_events_report_injected_xids_and_a_lost_gpu() {
    if !privileged_or_skip("nvml_events_report_injected_xids_and_a_lost_gpu") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(2, 1024)).unwrap();
    // An XID from before registration is not delivered.
    std::fs::write(node.dir().join("hami-control"), "xid 0 13\n").unwrap();
    let lib = lib_dir("events");
    let mut child = Command::new(HELPER)
        .arg("events")
        .arg(lib.lib())
        .env("HAMI_FAKE_GPU_DIR", node.dir())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the events probe");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the events probe exited early"
        );
        if line.trim() == "nvml events registered" {
            break;
        }
    }
    std::fs::write(node.dir().join("hami-control"), "xid 1 48\n").unwrap();
    std::fs::write(node.dir().join("hami-control"), "lost 0\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "events probe failed:\n{rest}");
    let mut events: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("nvml event "))
        .collect();
    events.sort_unstable();
    assert_eq!(events, ["0 79", "1 48"], "{rest}");
}
