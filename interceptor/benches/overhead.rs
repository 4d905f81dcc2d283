//! What `libvgpu.so` adds to CUDA calls, against the same tenant without it, in one run (root: the
//! simulated GPU node is a FUSE mount). Three configurations, interleaved three times, medians:
//! no preload (baseline), preloaded without vGPU variables (pass-through), and preloaded with a 1 GiB
//! limit (enforcing). Calls: `cuCtxGetDevice` (a hooked pass-through, no driver round trip),
//! `cuLaunchKernel` with a null function (not hooked: resolved straight to the driver), and a 1 MiB
//! `cuMemAlloc_v2` + `cuMemFree_v2` pair (hooked, reserves in the shared region; dominated by the
//! simulated driver's FUSE round trips).
//!
//! `cargo bench -p hami-interceptor --bench overhead` (or `cargo xtask bench interceptor`); results are
//! printed and written to `target/bench/interceptor-overhead.json`.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    reason = "a benchmark harness that may panic on setup failure"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !privileged_or_skip("interceptor overhead benchmark") {
        return;
    }
    let t = target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "hami-fake-cuda", "-p", "hami-interceptor"]);
    if t.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success());
    let workload = t.join("hami-cuda-workload");
    let libcuda = [t.join("libcuda.so"), t.join("deps/libcuda.so")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap();
    let libvgpu = [t.join("libvgpu.so"), t.join("deps/libvgpu.so")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("hami-vgpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::copy(&libcuda, dir.join("lib/libcuda.so.1")).unwrap();
    let node = FakeNode::start(&dir.join("node"), DeviceModel::uniform(1, 81_559)).unwrap();

    let configs = ["baseline", "pass-through", "enforcing"];
    let mut samples: BTreeMap<(&str, String), Vec<f64>> = BTreeMap::new();
    for round in 0..3 {
        for config in configs {
            let region = dir.join(format!("region-{round}"));
            let mut cmd = Command::new(&workload);
            cmd.args(["--bench", "200000"])
                .env("HAMI_FAKE_GPU_DIR", node.dir())
                .env("LD_LIBRARY_PATH", dir.join("lib"));
            if config != "baseline" {
                cmd.env("LD_PRELOAD", &libvgpu);
            }
            if config == "enforcing" {
                cmd.env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &region)
                    .env("CUDA_DEVICE_MEMORY_LIMIT_0", "1g");
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                if let ["bench", what, ns] = f[..] {
                    samples
                        .entry((config, what.to_owned()))
                        .or_default()
                        .push(ns.parse().unwrap());
                }
            }
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("libvgpu.so overhead (ns per call, median of 3 processes x 5 rounds)");
    println!(
        "{:<16} {:>10} {:>13} {:>10} {:>8} {:>9}",
        "call", "baseline", "pass-through", "enforcing", "ratio", "added ns"
    );
    let mut rows = Vec::new();
    for what in ["ctx-get-device", "launch-null", "alloc-free"] {
        let get = |c: &str| samples.get(&(c, what.to_owned())).map(median).unwrap_or(f64::NAN);
        let (b, p, e) = (get("baseline"), get("pass-through"), get("enforcing"));
        println!(
            "{what:<16} {b:>10.1} {p:>13.1} {e:>10.1} {:>8.2} {:>9.1}",
            e / b,
            e - b
        );
        rows.push(serde_json::json!({"call": what, "baseline_ns": b, "pass_through_ns": p, "enforcing_ns": e, "ratio": e / b, "added_ns": e - b}));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("interceptor-overhead.json"),
        serde_json::to_vec_pretty(&rows).unwrap(),
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
