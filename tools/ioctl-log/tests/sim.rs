//! The logger preloaded into the CUDA workload on the simulated node (privileged: a FUSE mount): every
//! RM call on the node's files is recorded with its bytes, and what the records say was allocated is
//! what the node's ground truth holds.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// target/<profile>, from this test binary's path (target/<profile>/deps/sim-…).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

fn build() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "hami-fake-cuda", "-p", "hami-ioctl-log"]);
    if target_dir().ends_with("release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().is_ok_and(|s| s.success()), "cargo build failed");
}

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

#[test]
fn rm_calls_are_logged_with_their_bytes_and_match_the_ground_truth() {
    if !privileged_or_skip("rm_calls_are_logged_with_their_bytes_and_match_the_ground_truth") {
        return;
    }
    build();
    let t = target_dir();
    let node = FakeNode::start_temp(DeviceModel::uniform(1, 1024)).expect("simulated node");
    let dir = std::env::temp_dir().join(format!("hami-ioctl-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::copy(t.join("libcuda.so"), dir.join("libcuda.so.1")).expect("fake libcuda");
    let log = dir.join("ioctls.jsonl");
    let mut child = Command::new(t.join("hami-cuda-workload"))
        .args([
            "--alloc",
            "1048576",
            "--raw-alloc",
            "2097152",
            "--raw-via",
            "vid-heap",
            "--xfer",
            "--raw-fail",
            "1099511627776",
            "--hold",
        ])
        .env("HAMI_FAKE_GPU_DIR", node.dir())
        .env("HAMI_FAKE_CUDA_ALLOC", "nvos64")
        .env("LD_LIBRARY_PATH", &dir)
        .env("LD_PRELOAD", t.join("libhami_ioctl_log.so"))
        .env("HAMI_IOCTL_LOG", &log)
        .env("HAMI_IOCTL_LOG_MATCH", node.dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("workload");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("stdout") > 0,
            "workload ended early"
        );
        if line.starts_with("meminfo") {
            break;
        }
    }
    let truth = node.ground_truth().bytes(pid, 0);
    assert_eq!(truth, 3 * MIB);
    let records: Vec<Value> = std::fs::read_to_string(&log)
        .expect("log written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let node_dir = node.dir().to_string_lossy().into_owned();
    assert!(
        records
            .iter()
            .all(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&node_dir))),
        "only the node's files"
    );
    // cuMemAlloc_v2 of 1 MiB: NV_ESC_RM_ALLOC, 48-byte NVOS64, class 0x40, status 0 at 40, and
    // NV_MEMORY_ALLOCATION_PARAMS.size (offset 64) in the parameters read back.
    let mut logged = 0;
    for r in &records {
        let ok = r["ret"] == 0;
        if r["nr"] == 0x2B && r["size"] == 48 && ok {
            let after = bytes(r["after"].as_str().expect("after"));
            if u32_at(&after, 12) == 0x40 && u32_at(&after, 40) == 0 {
                let params = bytes(r["params_after"].as_str().expect("params"));
                logged += u64_at(&params, 64);
            }
        }
        // The raw allocations: XFER-wrapped NV_ESC_RM_VID_HEAP_CONTROL (bare escape number inside).
        if r["nr"] == 0xD3 && ok && r["xfer"]["cmd"] == 0x4A {
            let inner = bytes(r["xfer"]["after"].as_str().expect("inner"));
            if u32_at(&inner, 8) == 2 && u32_at(&inner, 20) == 0 {
                logged += u64_at(&inner, 88);
            }
        }
    }
    assert_eq!(
        logged, truth,
        "the log accounts for every byte the node allocated"
    );
    let refused = records.iter().any(|r| {
        r["nr"] == 0xD3
            && r["xfer"]["cmd"] == 0x4A
            && r["xfer"]["after"]
                .as_str()
                .is_some_and(|h| u32_at(&bytes(h), 20) != 0)
    });
    assert!(refused, "the refused allocation is logged with its status");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("release");
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
