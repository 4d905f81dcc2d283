//! Test-support program for the fake NVML's integration tests (never installed): each subcommand runs in
//! its own process so that it can set `HAMI_FAKE_GPU_DIR` and open the library without touching the test
//! process's environment.
//!
//! - `hami-nvml-probe probe LIB`: what `nvml-wrapper` reports about every simulated GPU;
//! - `hami-nvml-probe events LIB`: XID / lost-GPU events;
//! - `hami-nvml-probe tenant DIR`: holds 3 MiB of device memory on GPU 1 until stdin closes;
//! - `hami-nvml-probe util LIB`: answers commands on stdin about per-process utilisation (see
//!   [`util`]).
//!
//! Failures panic with a message (this is a test harness), so the calling test sees a non-zero exit.

#![allow(
    clippy::unwrap_used,
    reason = "a test-support program: a failed call must abort it loudly"
)]
#![allow(
    unsafe_code,
    reason = "`util` and `probe` call NVML functions raw, to check their C-level answers"
)]

use std::ffi::OsStr;
use std::io::{BufRead, Read, Write};
use std::path::Path;

use hami_fake_gpu::client::{AllocVia, RmClient};
use hami_fake_gpu::model::MIB;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings::{NvmlLib, nvmlProcessInfo_v1_t, nvmlProcessUtilizationSample_t};

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match (args.first().and_then(|a| a.to_str()), args.get(1)) {
        (Some("probe"), Some(lib)) => probe(lib),
        (Some("events"), Some(lib)) => events(lib),
        (Some("tenant"), Some(dir)) => tenant(dir),
        (Some("util"), Some(lib)) => util(lib),
        _ => panic!("usage: hami-nvml-probe probe LIB | events LIB | tenant DIR | util LIB"),
    }
}

/// `probe LIB`: opens the fake library with `nvml-wrapper` and prints what it reports, one fact a line.
fn probe(lib: &OsStr) {
    let nvml = match Nvml::builder().lib_path(lib).init() {
        Ok(n) => n,
        Err(NvmlError::DriverNotLoaded) => {
            println!("nvml init driver-not-loaded");
            return;
        }
        Err(e) => panic!("nvml init: {e:?}"),
    };
    println!("nvml init ok");
    // The same library, for the unversioned calls the wrapper does not make.
    // SAFETY: the fake NVML library, whose symbols have the nvml-wrapper-sys signatures.
    let sys_lib = unsafe { NvmlLib::new(lib) }.unwrap();
    println!("nvml driver {}", nvml.sys_driver_version().unwrap());
    println!("nvml cuda {}", nvml.sys_cuda_driver_version().unwrap());
    let count = nvml.device_count().unwrap();
    println!("nvml count {count}");
    for i in 0..count {
        let d = nvml.device_by_index(i).unwrap();
        let uuid = d.uuid().unwrap();
        let by_uuid = nvml.device_by_uuid(uuid.as_str()).unwrap();
        let mem = d.memory_info().unwrap();
        let pci = d.pci_info().unwrap();
        let numa = match d.numa_node_id() {
            Ok(n) => n.to_string(),
            Err(NvmlError::NotSupported) => "not-supported".to_owned(),
            Err(e) => panic!("numa: {e:?}"),
        };
        println!("nvml gpu {i} index {}", d.index().unwrap());
        println!("nvml gpu {i} by-uuid-index {}", by_uuid.index().unwrap());
        println!("nvml gpu {i} uuid {uuid}");
        println!("nvml gpu {i} name {}", d.name().unwrap());
        println!("nvml gpu {i} total {}", mem.total);
        println!("nvml gpu {i} used {}", mem.used);
        println!("nvml gpu {i} free {}", mem.free);
        println!("nvml gpu {i} pci {}", pci.bus_id);
        println!("nvml gpu {i} numa {numa}");
        println!("nvml gpu {i} util {}", d.utilization_rates().unwrap().gpu);
        for p in d.running_compute_processes().unwrap() {
            let bytes = match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => b.to_string(),
                UsedGpuMemory::Unavailable => "unavailable".to_owned(),
            };
            println!("nvml gpu {i} proc {} {bytes}", p.pid);
        }
        // The unversioned nvmlDeviceGetComputeRunningProcesses (nvmlProcessInfo_v1_t entries), which
        // programs built against old headers call.
        // SAFETY: a handle of the live library, used while `nvml` lives.
        let h = unsafe { d.handle() };
        let mut n: u32 = 0;
        // SAFETY: a valid count pointer and no buffer: asks for the count.
        let rc = unsafe { sys_lib.nvmlDeviceGetComputeRunningProcesses(h, &raw mut n, std::ptr::null_mut()) };
        let mut v1 = vec![
            nvmlProcessInfo_v1_t {
                pid: 0,
                usedGpuMemory: 0
            };
            n as usize
        ];
        if n > 0 {
            // SAFETY: `v1` holds `n` entries.
            let rc = unsafe { sys_lib.nvmlDeviceGetComputeRunningProcesses(h, &raw mut n, v1.as_mut_ptr()) };
            assert_eq!(rc, 0, "unversioned running processes");
        } else {
            assert_eq!(rc, 0, "unversioned running processes, none");
        }
        for p in v1.iter().take(n as usize) {
            println!("nvml gpu {i} proc-v1 {} {}", p.pid, p.usedGpuMemory);
        }
    }
    let missing = nvml.device_by_uuid("GPU-00000000-0000-0000-0000-000000000000");
    println!(
        "nvml unknown-uuid {}",
        matches!(missing, Err(NvmlError::NotFound))
    );
    nvml.shutdown().unwrap();
}

/// `events LIB`: registers every GPU for critical XIDs, says so, and prints the next two events
/// (`nvml event <gpu> <xid>`) or `nvml event timeout`.
fn events(lib: &OsStr) {
    let nvml = Nvml::builder().lib_path(lib).init().unwrap();
    let mut set = nvml.create_event_set().unwrap();
    for i in 0..nvml.device_count().unwrap() {
        let d = nvml.device_by_index(i).unwrap();
        let supported = d.supported_event_types().unwrap();
        assert!(supported.contains(EventTypes::CRITICAL_XID_ERROR));
        set = d.register_events(EventTypes::CRITICAL_XID_ERROR, set).unwrap();
    }
    println!("nvml events registered");
    for _ in 0..2 {
        match set.wait(10_000) {
            Ok(ev) => {
                assert!(ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR));
                let xid = match ev.event_data {
                    Some(XidError::Value(v)) => v.to_string(),
                    other => format!("{other:?}"),
                };
                println!("nvml event {} {xid}", ev.device.index().unwrap());
            }
            Err(NvmlError::Timeout) => println!("nvml event timeout"),
            Err(e) => panic!("wait: {e:?}"),
        }
    }
    // An empty set times out.
    assert!(matches!(set.wait(20), Err(NvmlError::Timeout)));
    set.release_events().unwrap();
}

/// `tenant DIR`: allocates 1 MiB (NVOS21) and 2 MiB (legacy heap) on GPU 1 through the node's real
/// RM ioctls, as the fake libcuda does, says so and holds them until stdin closes, then exits without
/// freeing (the driver frees on close).
fn tenant(dir: &OsStr) {
    let rm = RmClient::open(Path::new(&dir)).unwrap();
    let dev = rm.alloc_device(1).unwrap();
    rm.alloc_vidmem(dev, MIB, AllocVia::Nvos21).unwrap();
    rm.alloc_vidmem(dev, 2 * MIB, AllocVia::VidHeap).unwrap();
    println!("tenant allocated");
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
}

/// `util LIB`: opens the library (with `nvml-wrapper`, and raw through `nvml-wrapper-sys`), prints
/// `nvml util ready`, then answers one command per stdin line, each answer ending with `nvml end`:
///
/// - `query <gpu> <last_seen_us>`: `Device::process_utilization_stats(last_seen_us)`, printing
///   `nvml util sample <pid> <timestamp_us> <sm_util>` per sample, or `nvml util not-found`, or
///   `nvml util error <error>`;
/// - `raw <gpu> <last_seen_us>`: the C-level answers of `nvmlDeviceGetProcessUtilization`, as
///   `nvml raw <case> <nvmlReturn_t> <count>`: `null` (null buffer, count 0 in), `small` (a buffer one
///   entry short, or one entry with count 0 in when there are no samples), `fit` (enough room),
///   `bad-handle` (a null device), `null-count` (a null count pointer);
/// - `launch <gpu> <sm_percent> <duration_us>`: writes that launch line to the node's `hami-control`
///   (`$HAMI_FAKE_GPU_DIR`), so it is this process's; prints `nvml launched <pid>`.
fn util(lib: &OsStr) {
    let nvml = Nvml::builder().lib_path(lib).init().unwrap();
    // The same library (dlopen returns the loaded one), called without the wrapper's checks.
    // SAFETY: the fake NVML library, whose symbols have the nvml-wrapper-sys signatures.
    let sys_lib = unsafe { NvmlLib::new(lib) }.unwrap();
    let dir = std::env::var_os("HAMI_FAKE_GPU_DIR").unwrap();
    println!("nvml util ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { words[i].parse().unwrap() };
        match words.first().copied() {
            Some("query") => {
                let d = nvml.device_by_index(u32::try_from(num(1)).unwrap()).unwrap();
                match d.process_utilization_stats(num(2)) {
                    Ok(samples) => {
                        for s in samples {
                            println!("nvml util sample {} {} {}", s.pid, s.timestamp, s.sm_util);
                        }
                    }
                    Err(NvmlError::NotFound) => println!("nvml util not-found"),
                    Err(e) => println!("nvml util error {e:?}"),
                }
            }
            Some("raw") => {
                let d = nvml.device_by_index(u32::try_from(num(1)).unwrap()).unwrap();
                // SAFETY: a handle of the live library, used while `nvml` lives.
                let h = unsafe { d.handle() };
                let last_seen = num(2);
                let call = |buf: *mut nvmlProcessUtilizationSample_t, count: *mut u32, dev| {
                    // SAFETY: `buf` is null or holds `*count` entries; `count` is null or valid.
                    unsafe { sys_lib.nvmlDeviceGetProcessUtilization(dev, buf, count, last_seen) }
                };
                let mut count = 0;
                let rc = call(std::ptr::null_mut(), &raw mut count, h);
                println!("nvml raw null {rc} {count}");
                let needed = count;
                let mut buf = vec![
                    nvmlProcessUtilizationSample_t {
                        pid: 0,
                        timeStamp: 0,
                        smUtil: 0,
                        memUtil: 0,
                        encUtil: 0,
                        decUtil: 0,
                    };
                    needed.max(1) as usize
                ];
                let mut count = needed.saturating_sub(1);
                let rc = call(buf.as_mut_ptr(), &raw mut count, h);
                println!("nvml raw small {rc} {count}");
                let mut count = needed;
                let rc = call(buf.as_mut_ptr(), &raw mut count, h);
                println!("nvml raw fit {rc} {count}");
                let mut count = needed;
                let rc = call(buf.as_mut_ptr(), &raw mut count, std::ptr::null_mut());
                println!("nvml raw bad-handle {rc} {count}");
                let rc = call(buf.as_mut_ptr(), std::ptr::null_mut(), h);
                println!("nvml raw null-count {rc} 0");
            }
            Some("launch") => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(Path::new(&dir).join("hami-control"))
                    .unwrap();
                // One write(2) per line: the node parses each write on its own.
                let line = format!("launch {} {} {}\n", num(1), num(2), num(3));
                f.write_all(line.as_bytes()).unwrap();
                println!("nvml launched {}", std::process::id());
            }
            _ => panic!("unknown command `{line}`"),
        }
        println!("nvml end");
        std::io::stdout().flush().unwrap();
    }
    drop(sys_lib);
    nvml.shutdown().unwrap();
}
