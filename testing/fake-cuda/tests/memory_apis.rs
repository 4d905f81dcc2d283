//! Each CUDA driver API allocation family of the fake `libcuda.so.1`, driven by the workload program as a
//! real process against a simulated node, compared with the node's ground truth (privileged: a FUSE
//! mount). Skips with a printed reason without root or `/dev/fuse`; fails instead when
//! `HAMI_REQUIRE_PRIVILEGED=1`.

mod common;

use std::collections::BTreeSet;

use common::{Workload, eventually, hex, lib_dir};
use hami_fake_gpu::model::{AllocPath, MIB, ManagedAllocation};
use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode, GroundTruth};

fn node(gpus: u32, memory_mib: u64) -> FakeNode {
    FakeNode::start_temp(DeviceModel::uniform(gpus, memory_mib)).expect("mounting the fake node")
}

/// `(gpu, bytes)` of every live RM vidmem allocation of `pid`, sorted.
fn rm_allocs(t: &GroundTruth, pid: u32) -> Vec<(u32, u64)> {
    let mut v: Vec<_> = t
        .allocations
        .iter()
        .filter(|a| a.pid == pid)
        .map(|a| (a.gpu, a.bytes))
        .collect();
    v.sort_unstable();
    v
}

fn managed_of(t: &GroundTruth, pid: u32) -> BTreeSet<(u32, u64, u64)> {
    t.managed
        .iter()
        .filter(|m| m.pid == pid)
        .map(|m| (m.gpu, m.bytes, m.address))
        .collect()
}

#[test]
fn managed_memory_is_listed_apart_and_never_in_rm_bytes() {
    if !privileged_or_skip("managed_memory_is_listed_apart_and_never_in_rm_bytes") {
        return;
    }
    let node = node(1, 64);
    let lib = lib_dir("managed");
    // 128 MiB of managed memory on a 64 MiB GPU: managed memory oversubscribes, RM memory cannot.
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos21",
        &[
            "--alloc",
            "1048576",
            "--managed",
            "4194304",
            "--managed",
            "134217728",
            "--free",
            "--hold",
        ],
    );
    let pid = w.pid();
    assert_eq!(w.words("pid"), vec![pid.to_string()]);
    let managed: Vec<u64> = w.words("managed").iter().map(|p| hex(p)).collect();
    assert_eq!(managed.len(), 2);
    let meminfo = w.words("meminfo");
    assert_eq!(
        meminfo[1],
        (63 * MIB).to_string(),
        "cuMemGetInfo: only the cuMemAlloc is used"
    );

    let t = node.ground_truth();
    assert_eq!(
        rm_allocs(&t, pid),
        vec![(0, MIB)],
        "no RM object for managed memory"
    );
    assert_eq!(t.gpus[0].used_bytes, MIB);
    assert_eq!(
        managed_of(&t, pid),
        BTreeSet::from([(0, 4 * MIB, managed[0]), (0, 128 * MIB, managed[1])])
    );
    assert_eq!(t.managed_bytes(pid, 0), 132 * MIB);
    assert_eq!(t.gpus[0].managed_bytes, 132 * MIB);

    // cuMemFree_v2 of the managed pointers removes them while the process lives on.
    w.send();
    assert!(w.line("freed").is_some());
    let t = node.ground_truth();
    assert!(t.managed.is_empty(), "{:?}", t.managed);
    assert_eq!(t.gpus[0].used_bytes, 0);
    assert_eq!(t.gpus[0].managed_bytes, 0);
    assert!(w.finish().status.success());

    // Exiting without cuMemFree: the managed range goes with the process.
    let mut w = Workload::spawn(&node, &lib.0, "nvos21", &["--managed", "2097152", "--hold"]);
    let pid = w.pid();
    let p = hex(&w.words("managed")[0]);
    assert!(w.line("meminfo").is_some());
    assert_eq!(
        node.ground_truth().managed,
        vec![ManagedAllocation {
            pid,
            gpu: 0,
            bytes: 2 * MIB,
            address: p
        }]
    );
    assert!(rm_allocs(&node.ground_truth(), pid).is_empty());
    assert!(w.finish().status.success());
    eventually("the exited workload's managed range is gone", || {
        node.ground_truth().managed.is_empty()
    });
}

#[test]
fn pitched_allocation_is_one_rm_object_of_pitch_times_height() {
    if !privileged_or_skip("pitched_allocation_is_one_rm_object_of_pitch_times_height") {
        return;
    }
    let node = node(1, 64);
    let lib = lib_dir("pitch");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos64",
        &["--pitch", "1000x3", "--free", "--hold"],
    );
    let pid = w.pid();
    let words = w.words("pitch");
    assert_eq!(words[1..], ["pitch", "1024", "bytes", "3072"], "{words:?}");
    assert!(w.line("meminfo").is_some());
    let t = node.ground_truth();
    assert_eq!(rm_allocs(&t, pid), vec![(0, 3072)], "rows padded to 512 bytes");
    assert_eq!(t.gpus[0].used_bytes, 3072);
    w.send();
    assert!(w.line("freed").is_some());
    assert!(
        node.ground_truth().allocations.is_empty(),
        "cuMemFree_v2 freed it"
    );
    assert!(w.finish().status.success());

    // A width already on the alignment is not padded.
    let mut w = Workload::spawn(&node, &lib.0, "nvos21", &["--pitch", "512x4", "--hold"]);
    let pid = w.pid();
    assert_eq!(w.words("pitch")[1..], ["pitch", "512", "bytes", "2048"]);
    assert!(w.line("meminfo").is_some());
    assert_eq!(rm_allocs(&node.ground_truth(), pid), vec![(0, 2048)]);
    assert!(w.finish().status.success());
}

#[test]
fn vmm_memory_is_created_then_freed_at_the_last_unmap_after_release() {
    if !privileged_or_skip("vmm_memory_is_created_then_freed_at_the_last_unmap_after_release") {
        return;
    }
    let node = node(2, 64);
    let lib = lib_dir("vmm");
    // 3000000 bytes round up to the 2 MiB granularity: 4 MiB.
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos21",
        &[
            "--device", "1", "--vmm", "3000000", "--vmm", "2097152", "--free", "--hold",
        ],
    );
    let pid = w.pid();
    let a = w.words("vmm");
    let b = w.words("vmm");
    assert_eq!((a[4].as_str(), b[4].as_str()), ("4194304", "2097152"));
    assert_ne!(a[0], b[0], "two reservations");
    assert!(w.line("meminfo").is_some());
    // The handles were released right after mapping; the mapped memory stays.
    let t = node.ground_truth();
    assert_eq!(rm_allocs(&t, pid), vec![(1, 2 * MIB), (1, 4 * MIB)]);
    assert!(t.allocations.iter().all(|a| a.path == AllocPath::RmAlloc));
    assert_eq!(t.gpus[0].used_bytes, 0);
    w.send();
    assert!(w.line("freed").is_some());
    assert!(
        node.ground_truth().allocations.is_empty(),
        "cuMemUnmap of released memory freed its RM object"
    );
    assert!(w.finish().status.success());

    // More than the GPU has: cuMemCreate fails with CUDA_ERROR_OUT_OF_MEMORY and nothing is charged.
    let w = Workload::spawn(&node, &lib.0, "vid-heap", &["--vmm", "134217728"]);
    let out = w.finish();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuMemCreate failed: CUresult 2"), "{err}");
    assert!(node.ground_truth().allocations.is_empty());
}

#[test]
fn async_allocations_are_one_rm_object_each_until_cu_mem_free_async() {
    if !privileged_or_skip("async_allocations_are_one_rm_object_each_until_cu_mem_free_async") {
        return;
    }
    let node = node(1, 64);
    let lib = lib_dir("async");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "vid-heap",
        &["--async", "2097152", "--async", "1048576", "--free", "--hold"],
    );
    let pid = w.pid();
    assert_eq!(w.words("async").len(), 2);
    assert!(w.line("meminfo").is_some());
    let t = node.ground_truth();
    assert_eq!(rm_allocs(&t, pid), vec![(0, MIB), (0, 2 * MIB)]);
    assert!(t.allocations.iter().all(|a| a.path == AllocPath::VidHeap));
    w.send();
    assert!(w.line("freed").is_some());
    assert!(node.ground_truth().allocations.is_empty());
    assert!(w.finish().status.success());
}

#[test]
fn a_forked_childs_allocation_is_the_childs_and_goes_when_it_exits() {
    if !privileged_or_skip("a_forked_childs_allocation_is_the_childs_and_goes_when_it_exits") {
        return;
    }
    let node = node(2, 64);
    let lib = lib_dir("fork");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos21",
        &[
            "--device",
            "1",
            "--alloc",
            "1048576",
            "--fork-alloc",
            "3145728",
            "--hold",
        ],
    );
    let parent = w.pid();
    let words = w.words("child");
    assert_eq!(words[1..], ["allocated", "3145728"], "{words:?}");
    let child: u32 = words[0].parse().unwrap();
    assert_ne!(child, parent);
    let t = node.ground_truth();
    assert_eq!(rm_allocs(&t, child), vec![(1, 3 * MIB)], "charged to the child");
    assert_eq!(rm_allocs(&t, parent), vec![(1, MIB)]);
    assert!(
        t.clients.values().any(|p| *p == child),
        "the child has its own RM client"
    );
    // The child exits without freeing; closing its nvidiactl frees its memory, not the parent's.
    w.send();
    assert_eq!(
        w.words("child"),
        vec![child.to_string(), "exited".to_owned(), "0".to_owned()]
    );
    eventually("the exited child's allocation is freed", || {
        rm_allocs(&node.ground_truth(), child).is_empty()
    });
    let t = node.ground_truth();
    assert!(t.clients.values().all(|p| *p != child));
    assert_eq!(rm_allocs(&t, parent), vec![(1, MIB)], "the parent's is untouched");
    assert_eq!(t.gpus[1].used_bytes, MIB);
    assert!(w.finish().status.success());
    eventually("the parent's memory is freed at its exit", || {
        node.ground_truth().gpus[1].used_bytes == 0
    });
}

#[test]
fn xfer_wrapped_raw_allocations_count_and_a_failed_one_does_not() {
    if !privileged_or_skip("xfer_wrapped_raw_allocations_count_and_a_failed_one_does_not") {
        return;
    }
    let node = node(2, 64);
    let lib = lib_dir("xfer");
    for (via, path) in [
        ("nvos21", AllocPath::RmAlloc),
        ("nvos64", AllocPath::RmAlloc),
        ("vid-heap", AllocPath::VidHeap),
    ] {
        let mut w = Workload::spawn(
            &node,
            &lib.0,
            "nvos21",
            &[
                "--raw-device",
                "1",
                "--raw-via",
                via,
                "--xfer",
                "--raw-alloc",
                "8388608",
                "--raw-alloc",
                "4194304",
                "--raw-fail",
                "134217728",
                "--raw-free",
                "--hold",
            ],
        );
        let pid = w.pid();
        let handles: BTreeSet<u32> = w
            .words("raw-allocated")
            .iter()
            .map(|h| u32::try_from(hex(h)).unwrap())
            .collect();
        assert_eq!(handles.len(), 2, "{via}");
        assert_eq!(
            w.words("raw-failed"),
            vec!["0x51".to_owned()],
            "{via}: NV_ERR_NO_MEMORY"
        );
        assert!(w.line("meminfo").is_some());
        let t = node.ground_truth();
        assert_eq!(
            rm_allocs(&t, pid),
            vec![(1, 4 * MIB), (1, 8 * MIB)],
            "{via}: the failed allocation is not counted"
        );
        let mine: Vec<_> = t.allocations.iter().filter(|a| a.pid == pid).collect();
        assert!(mine.iter().all(|a| a.path == path), "{via}");
        assert_eq!(
            mine.iter().map(|a| a.handle).collect::<BTreeSet<_>>(),
            handles,
            "{via}"
        );
        assert_eq!(t.gpus[1].used_bytes, 12 * MIB, "{via}");
        // RM_FREE, XFER-wrapped too, while the process lives on.
        w.send();
        assert!(w.line("freed").is_some());
        assert!(
            rm_allocs(&node.ground_truth(), pid).is_empty(),
            "{via}: freed by RM_FREE"
        );
        let out = w.finish();
        assert!(
            out.status.success(),
            "{via}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn allocations_on_two_gpus_are_attributed_per_gpu() {
    if !privileged_or_skip("allocations_on_two_gpus_are_attributed_per_gpu") {
        return;
    }
    let node = node(2, 64);
    let lib = lib_dir("two-gpus");
    let mut w = Workload::spawn(
        &node,
        &lib.0,
        "nvos64",
        &[
            "--device",
            "1",
            "--alloc",
            "2097152",
            "--vmm",
            "2097152",
            "--managed",
            "1048576",
            "--async",
            "1048576",
            "--raw-device",
            "0",
            "--raw-alloc",
            "3145728",
            "--hold",
        ],
    );
    let pid = w.pid();
    assert!(w.line("meminfo").is_some());
    let t = node.ground_truth();
    assert_eq!(
        rm_allocs(&t, pid),
        vec![(0, 3 * MIB), (1, MIB), (1, 2 * MIB), (1, 2 * MIB)]
    );
    assert_eq!(t.bytes(pid, 0), 3 * MIB);
    assert_eq!(t.bytes(pid, 1), 5 * MIB);
    assert_eq!((t.gpus[0].used_bytes, t.gpus[1].used_bytes), (3 * MIB, 5 * MIB));
    assert_eq!((t.managed_bytes(pid, 0), t.managed_bytes(pid, 1)), (0, MIB));
    // libcuda's client and the raw one.
    assert_eq!(t.clients.values().filter(|p| **p == pid).count(), 2);
    assert!(w.finish().status.success());
    eventually("everything the exited workload held is gone", || {
        let t = node.ground_truth();
        t.allocations.is_empty() && t.managed.is_empty() && t.clients.is_empty()
    });
}
