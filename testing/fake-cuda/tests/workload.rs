//! The CUDA workload program against the fake `libcuda.so.1` and the simulated node (privileged: a FUSE
//! mount). Skips with a printed reason without root or `/dev/fuse`; fails instead when
//! `HAMI_REQUIRE_PRIVILEGED=1`.

mod common;

use std::time::{Duration, Instant};

use common::{Workload, eventually, lib_dir};
use hami_fake_gpu::fs::read_ground_truth;
use hami_fake_gpu::model::{AllocPath, MIB};
use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};

#[test]
fn ground_truth_matches_what_the_workload_did_and_exit_frees_it() {
    if !privileged_or_skip("ground_truth_matches_what_the_workload_did_and_exit_frees_it") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(2, 1024)).unwrap();
    let lib = lib_dir("truth");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos21",
        &[
            "--device", "1", "--alloc", "1048576", "--alloc", "3145728", "--hold",
        ],
    );
    assert_eq!(
        w.line("device").unwrap().trim(),
        format!("device 1 total {}", 1024 * MIB)
    );
    let allocated = w.line("allocated").unwrap();
    assert_eq!(allocated.split_whitespace().count(), 3, "{allocated}");
    let meminfo = w.line("meminfo").unwrap();
    assert_eq!(
        meminfo.trim(),
        format!("meminfo free {} total {}", 1020 * MIB, 1024 * MIB)
    );
    let pid = w.child.id();
    let t = read_ground_truth(node.dir()).unwrap();
    assert_eq!(t.bytes(pid, 1), 4 * MIB);
    assert_eq!(t.bytes(pid, 0), 0);
    assert!(t.allocations.iter().all(|a| a.path == AllocPath::RmAlloc));
    // Exit without cuMemFree: the driver frees on close.
    assert!(w.finish().status.success());
    eventually("the exited workload's memory is freed", || {
        node.ground_truth().gpus[1].used_bytes == 0
    });
}

#[test]
fn legacy_heap_path_proc_address_raw_ioctls_and_explicit_free() {
    if !privileged_or_skip("legacy_heap_path_proc_address_raw_ioctls_and_explicit_free") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(1, 1024)).unwrap();
    let lib = lib_dir("heap");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "vid-heap",
        &[
            "--alloc",
            "2097152",
            "--raw-alloc",
            "1048576",
            "--proc-address",
            "--free",
            "--hold",
        ],
    );
    assert!(w.line("allocated").is_some());
    assert!(w.line("raw-allocated").is_some());
    let t = node.ground_truth();
    let pid = w.child.id();
    assert_eq!(
        t.bytes(pid, 0),
        3 * MIB,
        "libcuda and raw allocations are both the process's"
    );
    let heap: Vec<_> = t
        .allocations
        .iter()
        .filter(|a| a.path == AllocPath::VidHeap)
        .collect();
    assert_eq!(heap.len(), 1);
    assert_eq!(heap[0].bytes, 2 * MIB);
    assert_eq!(t.clients.len(), 2, "libcuda's client and the raw one");
    assert!(w.finish().status.success());
    // cuMemFree_v2 freed the libcuda allocation; the exit released the raw one.
    eventually("everything is freed", || {
        node.ground_truth().gpus[0].used_bytes == 0
    });
}

#[test]
fn out_of_memory_is_cuda_error_out_of_memory() {
    if !privileged_or_skip("out_of_memory_is_cuda_error_out_of_memory") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(1, 16)).unwrap();
    let lib = lib_dir("oom");
    let w = Workload::spawn(
        &node,
        &lib.0,
        "nvos64",
        &["--alloc", "8388608", "--alloc", "16777216"],
    );
    let out = w.finish();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuMemAlloc_v2 failed: CUresult 2"), "{err}");
    eventually("the failed workload's memory is freed", || {
        node.ground_truth().gpus[0].used_bytes == 0
    });
}

#[test]
fn launches_drive_the_utilisation_model_and_end_with_the_process() {
    if !privileged_or_skip("launches_drive_the_utilisation_model_and_end_with_the_process") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(1, 1024)).unwrap();
    let lib = lib_dir("launch");
    // Two launches of 66 blocks on 132 SMs: 50 % each, running for 10 minutes.
    let args = ["--alloc", "1048576", "--launch", "2", "--grid", "66", "--hold"];
    let mut w = Workload::spawn_env(
        &node,
        &lib.0,
        "nvos21",
        &args,
        &[("HAMI_FAKE_CUDA_KERNEL_US", "600000000")],
    );
    assert!(w.line("launched 2").is_some());
    let pid = w.child.id();
    let t = node.ground_truth();
    assert_eq!(t.gpus[0].sm_util_by_pid[&pid], 100);
    assert_eq!(t.gpus[0].sm_util_percent, 100);
    assert_eq!(t.gpus[0].launches_by_pid[&pid], 2);
    assert!(w.finish().status.success());
    eventually("the exited process stops occupying SMs", || {
        node.ground_truth().gpus[0].sm_util_percent == 0
    });
    assert_eq!(
        node.ground_truth().gpus[0].launches_by_pid[&pid],
        2,
        "launch counts stay"
    );

    // cuStreamSynchronize waits for the launched work (a lower bound, not a speed check).
    let start = Instant::now();
    let args = ["--launch", "1", "--grid", "1", "--sync"];
    let mut w = Workload::spawn_env(
        &node,
        &lib.0,
        "nvos21",
        &args,
        &[("HAMI_FAKE_CUDA_KERNEL_US", "200000")],
    );
    assert!(w.line("synchronized").is_some());
    assert!(start.elapsed() >= Duration::from_millis(200));
    let out = w.finish();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn nvidia_visible_devices_renumbers_the_gpus_as_in_a_container() {
    if !privileged_or_skip("nvidia_visible_devices_renumbers_the_gpus_as_in_a_container") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(2, 1024)).unwrap();
    let lib = lib_dir("visible");
    let uuid1 = node.ground_truth().gpus[1].uuid.clone();
    // Only host GPU 1 is visible: it is CUDA device 0, and its memory is what the node charges.
    let mut w = Workload::spawn_env(
        &node,
        &lib.0,
        "nvos21",
        &["--device", "0", "--alloc", "1048576", "--hold"],
        &[("NVIDIA_VISIBLE_DEVICES", &uuid1)],
    );
    assert!(w.line("meminfo").is_some());
    let t = node.ground_truth();
    assert_eq!((t.bytes(w.pid(), 0), t.bytes(w.pid(), 1)), (0, MIB));
    assert!(w.finish().status.success());
    // There is no device 1 in that view; an unknown UUID is no device at all.
    for (visible, device) in [(uuid1.as_str(), "1"), ("GPU-none", "0")] {
        let w = Workload::spawn_env(
            &node,
            &lib.0,
            "nvos21",
            &["--device", device, "--alloc", "1048576"],
            &[("NVIDIA_VISIBLE_DEVICES", visible)],
        );
        assert!(!w.finish().status.success(), "{visible} device {device}");
    }
}

#[test]
fn the_runtime_start_up_path_primary_context_and_attributes() {
    // What the CUDA runtime (and so PyTorch) calls first: cuDeviceGetAttribute for the SM count,
    // threads per SM and warp size, then cuDevicePrimaryCtxRetain; memory allocated in that context
    // lands on the device, and releasing the context at the end succeeds.
    if !privileged_or_skip("the_runtime_start_up_path_primary_context_and_attributes") {
        return;
    }
    let node = FakeNode::start_temp(DeviceModel::uniform(2, 1024)).unwrap();
    let lib = lib_dir("primary");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos21",
        &[
            "--device",
            "1",
            "--primary-ctx",
            "--alloc",
            "2097152",
            "--free",
            "--hold",
        ],
    );
    assert_eq!(
        w.line("attributes").unwrap().trim(),
        "attributes sm 132 threads-per-sm 2048 warp 32"
    );
    assert_eq!(w.line("allocated").unwrap().split_whitespace().count(), 2);
    let t = read_ground_truth(node.dir()).unwrap();
    assert_eq!((t.bytes(w.pid(), 1), t.bytes(w.pid(), 0)), (2 * MIB, 0));
    w.send();
    assert!(w.line("freed").is_some());
    w.send();
    assert!(w.line("released primary context").is_some());
    assert!(w.finish().status.success());
}
