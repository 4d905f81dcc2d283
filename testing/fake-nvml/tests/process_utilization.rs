//! `nvmlDeviceGetProcessUtilization` of the fake `libnvidia-ml.so.1`, read through `nvml-wrapper`
//! (`Device::process_utilization_stats`) and raw, against a simulated node driven by real launch lines
//! on its `hami-control` file (privileged: a FUSE mount). Skips with a printed reason without root or
//! `/dev/fuse`; fails instead when `HAMI_REQUIRE_PRIVILEGED=1`.
//!
//! The NVML reader is a child process (`hami-nvml-probe util`, for its own `HAMI_FAKE_GPU_DIR`) that
//! takes commands on stdin; it also launches "kernels" of its own, so two processes share a GPU.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{HELPER, lib_dir};
use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};
use nvidia_ml::{
    NVML_ERROR_INSUFFICIENT_SIZE, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NOT_FOUND, NVML_SUCCESS,
};

/// One sample: pid, timestamp (µs of `CLOCK_REALTIME`), SM utilisation (percent).
type Sample = (u32, u64, u32);

/// What `process_utilization_stats` answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Samples(Vec<Sample>),
    NotFound,
}

/// The `hami-nvml-probe util` child.
struct UtilProbe {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl UtilProbe {
    fn spawn(lib: &Path, node_dir: &Path) -> Self {
        let mut child = Command::new(HELPER)
            .arg("util")
            .arg(lib)
            .env("HAMI_FAKE_GPU_DIR", node_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the util probe");
        let stdin = child.stdin.take().expect("piped stdin");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut p = Self { child, stdin, out };
        assert_eq!(p.next_line(), "util ready");
        p
    }

    fn next_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.out.read_line(&mut line).expect("reading the probe");
        assert!(n > 0, "the util probe exited");
        line.trim()
            .strip_prefix("nvml ")
            .unwrap_or(line.trim())
            .to_owned()
    }

    /// Sends one command; its answer lines (without `nvml ` and the final `end`).
    fn cmd(&mut self, line: &str) -> Vec<String> {
        writeln!(self.stdin, "{line}").expect("writing to the probe");
        self.stdin.flush().expect("flushing the probe's stdin");
        let mut lines = Vec::new();
        loop {
            let l = self.next_line();
            if l == "end" {
                return lines;
            }
            lines.push(l);
        }
    }

    fn query(&mut self, gpu: u32, last_seen_us: u64) -> Answer {
        let lines = self.cmd(&format!("query {gpu} {last_seen_us}"));
        if lines == ["util not-found"] {
            return Answer::NotFound;
        }
        let samples = lines
            .iter()
            .map(|l| {
                let w: Vec<&str> = l
                    .strip_prefix("util sample ")
                    .unwrap_or_else(|| panic!("unexpected answer `{l}`"))
                    .split(' ')
                    .collect();
                (
                    w[0].parse().expect("pid"),
                    w[1].parse().expect("timestamp"),
                    w[2].parse().expect("smUtil"),
                )
            })
            .collect();
        Answer::Samples(samples)
    }

    /// `case → (nvmlReturn_t, count)` of the raw calls.
    fn raw(&mut self, gpu: u32, last_seen_us: u64) -> Vec<(String, u32, u32)> {
        self.cmd(&format!("raw {gpu} {last_seen_us}"))
            .iter()
            .map(|l| {
                let w: Vec<&str> = l.split(' ').collect();
                assert_eq!(w[0], "raw", "{l}");
                (
                    w[1].to_owned(),
                    w[2].parse().expect("nvmlReturn_t"),
                    w[3].parse().expect("count"),
                )
            })
            .collect()
    }

    /// Makes the probe launch; its pid.
    fn launch(&mut self, gpu: u32, pct: u32, us: u64) -> u32 {
        let lines = self.cmd(&format!("launch {gpu} {pct} {us}"));
        lines[0]
            .strip_prefix("launched ")
            .expect("launched")
            .parse()
            .expect("pid")
    }
}

impl Drop for UtilProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_us() -> u64 {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(d.as_micros()).expect("µs fit in u64")
}

fn samples(a: Answer) -> Vec<Sample> {
    match a {
        Answer::Samples(s) => s,
        Answer::NotFound => panic!("no samples"),
    }
}

/// `Σ smUtil / 100 × (timeStamp − lastSeen)` of `pid`, seconds, over consecutive windows given as
/// (the lastSeen they were asked with, their samples).
fn integrate(pid: u32, windows: &[(u64, &[Sample])]) -> f64 {
    windows
        .iter()
        .flat_map(|(last_seen, s)| {
            s.iter()
                .filter(move |x| x.0 == pid)
                .map(move |x| f64::from(x.2) / 100.0 * (x.1 - last_seen) as f64 / 1e6)
        })
        .sum()
}

#[test]
fn process_utilization_samples_integrate_to_the_ground_truth_sm_seconds() {
    if !privileged_or_skip("process_utilization_samples_integrate_to_the_ground_truth_sm_seconds") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(2, 1024)).unwrap();
    let lib = lib_dir("util");
    let mut p = UtilProbe::spawn(&lib.lib(), node.dir());

    // Idle node: no SM time since the clock epoch, so NOT_FOUND (raw: also for a null buffer).
    assert_eq!(p.query(0, 0), Answer::NotFound);
    let raw = p.raw(0, 0);
    assert_eq!(raw[0], ("null".to_owned(), NVML_ERROR_NOT_FOUND, 0), "{raw:?}");

    // This process asks for 60 % of GPU 0 for 300 ms and 20 % of GPU 1 for 100 ms; the probe for 70 %
    // of GPU 0 for 200 ms: 130 % together on GPU 0, so both are scaled by 100/130 while they overlap.
    let t0 = now_us();
    let me = std::process::id();
    std::fs::write(
        node.dir().join("hami-control"),
        "launch 0 60 300000\nlaunch 1 20 100000\n",
    )
    .unwrap();
    let other = p.launch(0, 70, 200_000);
    assert_ne!(other, me);

    // Window 1, while both run: one sample per process, all with the same timestamp.
    std::thread::sleep(Duration::from_millis(100));
    let w1 = samples(p.query(0, t0));
    assert_eq!(
        w1.iter().map(|s| s.0).collect::<Vec<_>>(),
        [me.min(other), me.max(other)]
    );
    let ts1 = w1[0].1;
    assert!(w1.iter().all(|s| s.1 == ts1) && ts1 > t0, "{w1:?}");
    assert!(w1.iter().all(|s| s.2 > 0 && s.2 <= 100), "{w1:?}");

    // The C-level contract, on the same lastSeen.
    let raw = p.raw(0, t0);
    let want = [
        ("null", NVML_ERROR_INSUFFICIENT_SIZE, 2),
        ("small", NVML_ERROR_INSUFFICIENT_SIZE, 2),
        ("fit", NVML_SUCCESS, 2),
        ("bad-handle", NVML_ERROR_INVALID_ARGUMENT, 2),
        ("null-count", NVML_ERROR_INVALID_ARGUMENT, 0),
    ]
    .map(|(c, rc, n)| (c.to_owned(), rc, n));
    assert_eq!(raw, want);

    // Window 2, after everything ended.
    std::thread::sleep(Duration::from_millis(400));
    let w2 = samples(p.query(0, ts1));
    let ts2 = w2[0].1;
    assert!(w2.iter().all(|s| s.1 == ts2) && ts2 > ts1, "{w2:?}");
    // Idle since: NOT_FOUND.
    assert_eq!(p.query(0, ts2), Answer::NotFound);

    // The two windows integrate to the ground truth, to within the 1-percent rounding × the window.
    let truth = node.ground_truth();
    let g0 = &truth.gpus[0].sm_seconds_by_pid;
    let span_s = (ts2 - t0) as f64 / 1e6;
    for pid in [me, other] {
        let got = integrate(pid, &[(t0, &w1), (ts1, &w2)]);
        let want = g0[&pid];
        assert!(
            (got - want).abs() <= 0.01 * span_s,
            "pid {pid}: samples give {got} SM-s, ground truth {want} SM-s (window {span_s} s)"
        );
    }
    // And the ground truth is what the launches asked for (loosely: the two launches start a few ms
    // apart): 0.2 s × 60/130 + 0.1 s × 60 % for this process, 0.2 s × 70/130 for the probe.
    assert!((g0[&me] - 0.152).abs() < 0.02, "{g0:?}");
    assert!((g0[&other] - 0.108).abs() < 0.02, "{g0:?}");

    // GPU 1: only this process, unscaled.
    let w = samples(p.query(1, t0));
    assert_eq!(w.len(), 1, "{w:?}");
    let got = integrate(me, &[(t0, &w)]);
    let want = truth.gpus[1].sm_seconds_by_pid[&me];
    assert!((want - 0.02).abs() < 1e-3, "{want}");
    assert!(
        (got - want).abs() <= 0.01 * (w[0].1 - t0) as f64 / 1e6,
        "{got} vs {want}"
    );

    // lastSeen 0: the average since the node's clock epoch.
    let all = samples(p.query(0, 0));
    assert_eq!(all.len(), 2, "{all:?}");
    for (pid, ts, sm) in all {
        let life_s = (ts * 1000 - truth.clock_epoch_unix_ns) as f64 / 1e9;
        let expect = 100.0 * g0[&pid] / life_s;
        assert!(
            (f64::from(sm) - expect).abs() <= 1.0,
            "pid {pid}: {sm} vs {expect}"
        );
    }
}
