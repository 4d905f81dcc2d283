//! What the kernel telemetry costs, measured against a baseline in the same run (root only):
//!
//! 1. Added latency per syscall, per non-NVIDIA ioctl, per RM ioctl on the simulated node's control
//!    device, and per hooked libcuda call (`cuLaunchKernel`, early-return path, so the uprobe dominates),
//!    with the programs detached, attached, and detached again. Reported as ns/op and ratio.
//! 2. The agent's CPU and RSS while a tenant drives a target of 10,000 device-memory allocations (and
//!    as many frees) per second through the simulated node, against the same agent idle.
//!
//! `cargo bench -p hami-agent --bench overhead` (or `cargo xtask bench agent`). Results are printed and
//! written to `target/bench/agent-overhead.json`.
#![allow(
    unsafe_code,
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub,
    reason = "a benchmark harness: FFI calls through dlopen'ed symbols, and it may panic on setup failure"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::ffi::{CString, c_int, c_uint, c_void};
use std::time::{Duration, Instant};

use hami_agent::config::SyscallHook;
use hami_agent::loader::Probes;
use hami_fake_gpu::client::{AllocVia, RmClient};

const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per call of `f` over [`ROUNDS`] rounds of `n` calls.
fn ns_per_op(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    median(rounds)
}

type LaunchFn = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> c_int;

struct Case {
    name: &'static str,
    ops: u32,
}

const CASES: [Case; 4] = [
    Case {
        name: "getpid syscall (every syscall passes sys_enter/sys_exit)",
        ops: 200_000,
    },
    Case {
        name: "ioctl on /dev/null (not an NVIDIA file)",
        ops: 100_000,
    },
    Case {
        name: "RM ioctl on the simulated nvidiactl (alloc+free / 2)",
        ops: 1_000,
    },
    Case {
        name: "cuLaunchKernel (uprobe on entry)",
        ops: 100_000,
    },
];

fn measure_all(devnull: &std::fs::File, rm: &RmClient, device: u32, launch: LaunchFn) -> Vec<f64> {
    use std::os::fd::AsRawFd as _;
    let fd = devnull.as_raw_fd();
    vec![
        ns_per_op(CASES[0].ops, || {
            // SAFETY: getpid has no arguments.
            unsafe { libc::syscall(libc::SYS_getpid) };
        }),
        ns_per_op(CASES[1].ops, || {
            let mut t = [0u8; 64];
            // SAFETY: TCGETS writes at most sizeof(struct termios) (60) bytes into a 64-byte buffer.
            unsafe { libc::ioctl(fd, libc::TCGETS, t.as_mut_ptr()) };
        }),
        ns_per_op(CASES[2].ops, || {
            let h = rm.alloc_vidmem(device, 1 << 20, AllocVia::Nvos21).unwrap();
            rm.free(device, h).unwrap();
        }) / 2.0,
        ns_per_op(CASES[3].ops, || {
            // SAFETY: a null function handle makes the fake driver return INVALID_HANDLE at once.
            unsafe {
                launch(
                    std::ptr::null_mut(),
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }),
    ]
}

fn proc_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(env) = common::Env::new("bench", 1, 81_559) else {
        println!("skipped: the overhead benchmark needs root (eBPF, FUSE, cgroups)");
        return;
    };
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let rm = RmClient::open(env.node.dir()).unwrap();
    let device = rm.alloc_device(0).unwrap();
    let lib = CString::new(env.cfg.libcuda[0].to_string_lossy().as_bytes()).unwrap();
    // SAFETY: dlopen/dlsym of the fake driver built with this workspace; the symbol has the CUDA
    // signature declared by `LaunchFn`.
    let launch: LaunchFn = unsafe {
        let h = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW);
        assert!(!h.is_null(), "dlopen fake libcuda");
        let sym = libc::dlsym(h, c"cuLaunchKernel".as_ptr());
        assert!(!sym.is_null());
        std::mem::transmute::<*mut c_void, LaunchFn>(sym)
    };

    println!("hami agent overhead benchmark (median of {ROUNDS} rounds)");
    let mut rows = Vec::new();
    for hook in [SyscallHook::Raw, SyscallHook::Tracepoint] {
        let mut cfg = env.cfg.clone();
        cfg.syscall_hook = hook;
        let before = measure_all(&devnull, &rm, device, launch);
        let probes = Probes::open(&cfg).unwrap();
        let attached = measure_all(&devnull, &rm, device, launch);
        drop(probes);
        hami_agent::loader::detach(&cfg.paths.bpffs).unwrap();
        let after = measure_all(&devnull, &rm, device, launch);
        println!("\nioctl hook: {hook:?}");
        println!(
            "{:<58} {:>10} {:>10} {:>10} {:>8} {:>9}",
            "operation (ns per op)", "detached", "attached", "detached", "ratio", "added ns"
        );
        for (i, c) in CASES.iter().enumerate() {
            let base = (before[i] + after[i]) / 2.0;
            let ratio = attached[i] / base;
            println!(
                "{:<58} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>9.0}",
                c.name,
                before[i],
                attached[i],
                after[i],
                ratio,
                attached[i] - base
            );
            rows.push(serde_json::json!({
                "hook": format!("{hook:?}"), "operation": c.name, "detached_before_ns": before[i],
                "attached_ns": attached[i], "detached_after_ns": after[i], "ratio": ratio,
                "added_ns": attached[i] - base,
            }));
        }
    }

    // The agent binary under load.
    let (agent, _port) = common::start_agent(&env, std::path::Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    let pid = agent.0.id();
    let window = Duration::from_secs(10);
    // Idle baseline.
    let c0 = proc_cpu_ns(pid);
    std::thread::sleep(window);
    let idle_cpu = (proc_cpu_ns(pid) - c0) as f64 / window.as_nanos() as f64 * 100.0;
    let idle_rss = proc_status_kib(pid, "VmRSS:");
    // Paced load: 10 allocations + 10 frees per millisecond, from two tenant threads (each with its
    // own RM client), since one FUSE round trip takes longer than 100 µs.
    let target_per_s = 10_000u64;
    let threads = 2u64;
    let c0 = proc_cpu_ns(pid);
    let start = Instant::now();
    let dir = env.node.dir().to_path_buf();
    let done: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let dir = dir.clone();
                scope.spawn(move || {
                    let rm = RmClient::open(&dir).unwrap();
                    let device = rm.alloc_device(0).unwrap();
                    let mut done = 0u64;
                    while start.elapsed() < window {
                        let due = start.elapsed().as_micros() as u64 * target_per_s / threads / 1_000_000;
                        while done < due && start.elapsed() < window {
                            let h = rm.alloc_vidmem(device, 1 << 20, AllocVia::Nvos21).unwrap();
                            rm.free(device, h).unwrap();
                            done += 1;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let elapsed = start.elapsed();
    let load_cpu = (proc_cpu_ns(pid) - c0) as f64 / elapsed.as_nanos() as f64 * 100.0;
    let rate = done as f64 / elapsed.as_secs_f64();
    // Let the agent drain, then read what it attributed.
    std::thread::sleep(Duration::from_millis(500));
    let load_rss = proc_status_kib(pid, "VmRSS:");
    let hwm = proc_status_kib(pid, "VmHWM:");
    drop(agent);
    println!(
        "agent idle: {idle_cpu:.2} % of one CPU, RSS {idle_rss} KiB; under {rate:.0} allocations/s (+ as many frees): {load_cpu:.2} % of one CPU, RSS {load_rss} KiB (peak {hwm} KiB); CPU ratio {:.1}",
        load_cpu / idle_cpu.max(0.01)
    );
    let out = serde_json::json!({
        "latency": rows,
        "agent": {
            "idle_cpu_percent": idle_cpu, "idle_rss_kib": idle_rss,
            "target_allocations_per_s": target_per_s, "achieved_allocations_per_s": rate,
            "load_cpu_percent": load_cpu, "load_rss_kib": load_rss, "peak_rss_kib": hwm,
        }
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("agent-overhead.json"),
        serde_json::to_vec_pretty(&out).unwrap(),
    );
}
