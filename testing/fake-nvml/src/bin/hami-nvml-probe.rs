//! Test-support program for the fake NVML's integration tests (never installed): each subcommand runs in
//! its own process so that it can set `HAMI_FAKE_GPU_DIR` and open the library without touching the test
//! process's environment.
//!
//! - `hami-nvml-probe probe LIB`: what `nvml-wrapper` reports about every simulated GPU;
//! - `hami-nvml-probe events LIB`: XID / lost-GPU events;
//! - `hami-nvml-probe tenant DIR`: holds 3 MiB of device memory on GPU 1 until stdin closes.
//!
//! Failures panic with a message (this is a test harness), so the calling test sees a non-zero exit.

#![allow(
    clippy::unwrap_used,
    reason = "a test-support program: a failed call must abort it loudly"
)]

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;

use hami_fake_gpu::client::{AllocVia, RmClient};
use hami_fake_gpu::model::MIB;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match (args.first().and_then(|a| a.to_str()), args.get(1)) {
        (Some("probe"), Some(lib)) => probe(lib),
        (Some("events"), Some(lib)) => events(lib),
        (Some("tenant"), Some(dir)) => tenant(dir),
        _ => panic!("usage: hami-nvml-probe probe LIB | events LIB | tenant DIR"),
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
