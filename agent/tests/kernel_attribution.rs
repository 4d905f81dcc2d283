//! The real eBPF programs in the real kernel, attributing device memory of real processes in their own
//! cgroups on the simulated GPU node; every number is compared with the node's ground truth (what the
//! fake driver really allocated, per process). Run as root (`HAMI_REQUIRE_PRIVILEGED=1` in CI).

mod common;

use common::{Env, attributed, container, eventually, settle};
use hami_fake_gpu::GroundTruth;

/// Device bytes the ground truth holds for the processes `pids` on `gpu`.
fn truth(t: &GroundTruth, pids: &[u32], gpu: u32) -> u64 {
    pids.iter().map(|p| t.bytes(*p, gpu)).sum()
}

const MIB: u64 = 1 << 20;

#[test]
fn several_processes_and_containers_on_two_gpus_match_ground_truth() {
    let Some(env) = Env::new("two-gpus", 2, 256) else {
        return;
    };
    let mut agent = env.agent();
    let a = env.container(1);
    let b = env.container(2);
    // Container A: a cuMemAlloc tenant on GPU 0 (RM_ALLOC/NVOS21) and a raw tenant on GPU 1 through
    // the legacy heap path wrapped in XFER.
    let mut a1 = env.spawn(&a, &["--alloc", "1048576", "--alloc", "3145728", "--hold"], &[]);
    let mut a2 = env.spawn(
        &a,
        &[
            "--raw-alloc",
            "2097152",
            "--raw-device",
            "1",
            "--raw-via",
            "vid-heap",
            "--xfer",
            "--hold",
        ],
        &[],
    );
    // Container B: NVOS64 on GPU 1, plus an allocation the driver refuses.
    let mut b1 = env.spawn(
        &b,
        &[
            "--device",
            "1",
            "--alloc",
            "5242880",
            "--raw-fail",
            "1099511627776",
            "--raw-device",
            "1",
            "--hold",
        ],
        &[("HAMI_FAKE_CUDA_ALLOC", "nvos64")],
    );
    a1.words("meminfo");
    a2.words("raw-allocated");
    b1.words("raw-failed");
    let t = env.node.ground_truth();
    let s = settle(&mut agent);
    for (cg, pids) in [(&a, vec![a1.pid, a2.pid]), (&b, vec![b1.pid])] {
        for gpu in 0..2 {
            assert_eq!(
                attributed(&s, cg, gpu),
                truth(&t, &pids, gpu),
                "{} gpu {gpu}",
                cg.display()
            );
        }
    }
    assert_eq!(attributed(&s, &a, 0), 4 * MIB);
    assert_eq!(attributed(&s, &a, 1), 2 * MIB);
    assert_eq!(attributed(&s, &b, 1), 5 * MIB);
    let cb = container(&s, &b);
    let failed: u64 = cb.gpus.iter().map(|g| g.failed_allocations).sum();
    assert_eq!(failed, 1, "the refused allocation is counted, not charged");
    // Identity from the kubelet-style path.
    let (uid, cid) = common::ids(1);
    let ca = container(&s, &a);
    assert_eq!(ca.identity.pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(ca.identity.container_id.as_deref(), Some(cid.as_str()));
    assert_eq!(
        ca.gpus.iter().find(|g| g.gpu == Some(0)).map(|g| g.allocations),
        Some(2)
    );

    // A1 exits without freeing: the driver frees at close, the agent releases at exit.
    let a1_pid = a1.pid;
    a1.finish();
    eventually("the node freed a1's memory", || {
        env.node.ground_truth().bytes(a1_pid, 0) == 0
    });
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &a, 0), 0);
    assert_eq!(attributed(&s, &a, 1), 2 * MIB, "a2 is untouched");
    let g0 = container(&s, &a)
        .gpus
        .iter()
        .find(|g| g.gpu == Some(0))
        .cloned()
        .unwrap();
    assert_eq!((g0.released, g0.frees, g0.memory_peak_bytes), (2, 0, 4 * MIB));
    assert!(g0.memory_byte_seconds > 0.0);
    a2.finish();
    b1.finish();
    let s = settle(&mut agent);
    for gpu in 0..2 {
        assert_eq!(attributed(&s, &a, gpu) + attributed(&s, &b, gpu), 0);
    }
    assert_eq!(s.agent.live_objects, 0);
    assert_eq!(s.agent.malformed_ioctls, 0);
}

#[test]
fn explicit_frees_fork_and_exit_without_free() {
    let Some(env) = Env::new("fork", 1, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(3);
    // The parent allocates 1 MiB (kept) and 2 MiB (freed at the end); the forked child allocates
    // 4 MiB with its own RM client and exits without freeing.
    let mut w = env.spawn(
        &c,
        &[
            "--alloc",
            "1048576",
            "--raw-alloc",
            "2097152",
            "--raw-free",
            "--fork-alloc",
            "4194304",
            "--hold",
        ],
        &[],
    );
    let child: u32 = w.words("child ")[0].parse().unwrap();
    // The child holds too (it shares stdin); one line lets it exit, then the parent goes on.
    w.send();
    w.words("meminfo");
    eventually("the child's memory is freed by its exit", || {
        env.node.ground_truth().bytes(child, 0) == 0
    });
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), env.node.ground_truth().bytes(w.pid, 0));
    assert_eq!(attributed(&s, &c, 0), 3 * MIB);
    let g = container(&s, &c).gpus[0].clone();
    assert_eq!((g.allocations, g.released), (3, 1), "{g:?}");
    assert_eq!(g.memory_peak_bytes, 7 * MIB);
    // Release the hold: the raw 2 MiB is freed with RM_FREE.
    w.send();
    w.words("freed");
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), env.node.ground_truth().bytes(w.pid, 0));
    assert_eq!(attributed(&s, &c, 0), MIB);
    assert_eq!(container(&s, &c).gpus[0].frees, 1);
    w.finish();
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 0);
}

#[test]
fn managed_memory_and_launches_through_the_uprobes() {
    let Some(env) = Env::new("managed", 1, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(4);
    let mut w = env.spawn(
        &c,
        &[
            "--managed",
            "65536",
            "--managed",
            "131072",
            "--alloc",
            "1048576",
            "--vmm",
            "2097152",
            "--async",
            "1048576",
            "--launch",
            "5",
            "--free",
            "--hold",
        ],
        &[],
    );
    w.words("launched");
    let t = env.node.ground_truth();
    let truth_managed: u64 = t.managed.iter().filter(|m| m.pid == w.pid).map(|m| m.bytes).sum();
    assert_eq!(truth_managed, 196_608);
    let s = settle(&mut agent);
    let k = container(&s, &c);
    assert_eq!(k.managed.as_ref().map(|m| m.bytes), Some(truth_managed));
    // cuMemAlloc, the VMM physical allocation and the async allocation are RM objects; managed memory
    // is not.
    assert_eq!(
        attributed(&s, &c, 0),
        t.bytes(w.pid, 0),
        "managed memory is not device memory"
    );
    assert_eq!(attributed(&s, &c, 0), 4 * MIB);
    for (call, n) in [
        ("cuLaunchKernel", 5),
        ("cuMemAllocManaged", 2),
        ("cuMemAlloc_v2", 1),
        ("cuMemCreate", 1),
        ("cuMemAllocAsync", 1),
    ] {
        assert_eq!(k.cuda_calls.get(call), Some(&n), "{call}: {:?}", k.cuda_calls);
    }
    w.send();
    w.words("freed");
    let s = settle(&mut agent);
    let k = container(&s, &c);
    assert_eq!(k.managed.as_ref().map(|m| m.bytes), Some(0));
    assert_eq!(attributed(&s, &c, 0), env.node.ground_truth().bytes(w.pid, 0));
    assert_eq!(attributed(&s, &c, 0), 0);
    assert_eq!(k.cuda_calls.get("cuMemRelease"), Some(&1));
    assert_eq!(k.cuda_calls.get("cuMemFreeAsync"), Some(&1));
    w.finish();
}

#[test]
fn agent_restart_continues_counters_without_loss_or_double_counting() {
    let Some(env) = Env::new("restart", 1, 256) else {
        return;
    };
    let c = env.container(5);
    let mut agent = env.agent();
    let mut w1 = env.spawn(&c, &["--alloc", "1048576", "--alloc", "2097152", "--hold"], &[]);
    w1.words("meminfo");
    let before = settle(&mut agent);
    assert_eq!(attributed(&before, &c, 0), 3 * MIB);
    // Graceful stop (what SIGTERM does): drain, save, drop. The programs stay attached.
    agent.pump(0);
    agent.save_state().unwrap();
    drop(agent);
    // While no agent runs: w1 exits without freeing, w2 allocates and keeps 4 MiB.
    let w1_pid = w1.pid;
    w1.finish();
    eventually("w1's memory is freed", || {
        env.node.ground_truth().bytes(w1_pid, 0) == 0
    });
    let mut w2 = env.spawn(&c, &["--alloc", "4194304", "--hold"], &[]);
    w2.words("meminfo");
    // A new agent adopts the pinned programs and reads the events queued meanwhile.
    let mut agent = env.agent();
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), env.node.ground_truth().bytes(w2.pid, 0));
    assert_eq!(attributed(&s, &c, 0), 4 * MIB);
    let g = container(&s, &c).gpus[0].clone();
    assert_eq!(g.allocations, 3, "two before the restart, one during; none twice");
    assert_eq!(g.released, 2);
    assert_eq!(g.memory_peak_bytes, 4 * MIB);
    assert!(g.memory_byte_seconds >= before.containers[0].gpus[0].memory_byte_seconds);
    assert_eq!(
        s.agent.reconciled, 0,
        "nothing was lost, so nothing needed repair"
    );
    w2.finish();
}

#[test]
fn finished_containers_lose_gauges_then_counters_after_export() {
    // Peer case C15: (1) a finished container's series do not stay with their last values; (2) a
    // restarted container (a new container in the same pod) gets live series again; (3) everything of
    // the finished one goes once its final counters were exported.
    let Some(env) = Env::new("retention", 1, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container_in(6, 6);
    let (_, cid) = common::ids(6);
    let id = common::cgroup_id(&c);
    let gauge = |text: &str, cid: &str| {
        text.lines()
            .any(|l| l.starts_with("hami_container_device_memory_bytes{") && l.contains(cid))
    };
    let counter = |text: &str, cid: &str| {
        text.lines()
            .any(|l| l.starts_with("hami_container_device_memory_byte_seconds_total{") && l.contains(cid))
    };
    let mut w = env.spawn(&c, &["--alloc", "1048576", "--hold"], &[]);
    w.words("meminfo");
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), MIB);
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(gauge(&text, &cid) && counter(&text, &cid), "{text}");
    // The container exits and its cgroup is removed.
    w.finish();
    std::thread::sleep(std::time::Duration::from_millis(100));
    std::fs::remove_dir(&c).expect("removing the finished container's cgroup");
    settle(&mut agent);
    agent.housekeeping().unwrap();
    // The restarted container: same pod, new container ID.
    let c2 = env.container_in(6, 12);
    let (_, cid2) = common::ids(12);
    let mut w2 = env.spawn(&c2, &["--alloc", "2097152", "--hold"], &[]);
    w2.words("meminfo");
    settle(&mut agent);
    let s = agent.snapshot(true);
    let k = s
        .containers
        .iter()
        .find(|k| k.cgroup_id == id)
        .expect("still exported once");
    assert!(k.terminated);
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(
        !gauge(&text, &cid),
        "no stale gauge for the finished container: {text}"
    );
    assert!(
        counter(&text, &cid),
        "its final chargeback counter is exported once"
    );
    assert!(
        gauge(&text, &cid2),
        "the restarted container's series resume: {text}"
    );
    // Exported once and retention (0 s here) over: gone at the next housekeeping.
    agent.housekeeping().unwrap();
    let s = agent.snapshot(true);
    assert!(s.containers.iter().all(|k| k.cgroup_id != id), "{s:#?}");
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(!counter(&text, &cid) && gauge(&text, &cid2), "{text}");
    w2.finish();
}

#[test]
fn classic_ioctl_tracepoints_attribute_like_the_raw_hook() {
    use hami_agent::config::SyscallHook;
    let Some(mut env) = Env::new("tracepoint", 2, 256) else {
        return;
    };
    // The agent mounts tracefs at /sys/kernel/tracing when it is missing (left mounted: it is the
    // standard location, and other agents may use it).
    env.cfg.syscall_hook = SyscallHook::Tracepoint;
    let mut agent = env.agent();
    assert_eq!(agent.syscall_hook(), SyscallHook::Tracepoint);
    let c = env.container(8);
    let mut w = env.spawn(
        &c,
        &[
            "--alloc",
            "1048576",
            "--raw-alloc",
            "2097152",
            "--raw-device",
            "1",
            "--raw-via",
            "vid-heap",
            "--xfer",
            "--hold",
        ],
        &[],
    );
    w.words("meminfo");
    let t = env.node.ground_truth();
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), t.bytes(w.pid, 0));
    assert_eq!(attributed(&s, &c, 1), t.bytes(w.pid, 1));
    assert_eq!((attributed(&s, &c, 0), attributed(&s, &c, 1)), (MIB, 2 * MIB));
    w.finish();
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0) + attributed(&s, &c, 1), 0);
}

#[test]
fn a_wrong_driver_generation_counts_malformed_payloads_and_charges_nothing() {
    // The agent is told the driver is 530 (40-byte NVOS64) while the simulated driver speaks 595
    // (48-byte NVOS64): every allocation payload has an unexpected size for the configured layout.
    let Some(mut env) = Env::new("wrong-abi", 1, 256) else {
        return;
    };
    env.cfg.driver_version = Some("530.41.03".into());
    let mut agent = env.agent();
    let c = env.container(11);
    let mut w = env.spawn(
        &c,
        &["--alloc", "1048576", "--alloc", "1048576", "--hold"],
        &[("HAMI_FAKE_CUDA_ALLOC", "nvos64")],
    );
    w.words("meminfo");
    assert_eq!(
        env.node.ground_truth().bytes(w.pid, 0),
        2 * MIB,
        "the driver did allocate"
    );
    let s = settle(&mut agent);
    assert_eq!(
        attributed(&s, &c, 0),
        0,
        "nothing is charged from a payload of unknown layout"
    );
    // The NV01_DEVICE_0 allocation and both vidmem allocations use NVOS64.
    assert_eq!(s.agent.malformed_ioctls, 3, "{:?}", s.agent);
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(
        text.contains("hami_agent_malformed_ioctls_total{node=\"test-node\"} 3"),
        "{text}"
    );
    w.finish();
}

#[test]
fn the_kernel_view_in_the_region_holds_processes_that_bypass_the_interceptor() {
    // The container's limit is 1 GiB. A tenant maps the region through libvgpu.so; another process of
    // the same container allocates 800 MiB with raw RM ioctls, which no hook sees. Once the agent has
    // written the kernel's view into the region, a 300 MiB cuMemAlloc through the interceptor is refused.
    let Some(env) = Env::new("region", 1, 4096) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(13);
    let regions = env.dir.join("regions/pod13_main");
    std::fs::create_dir_all(&regions).unwrap();
    let region = regions.join("vgpu.cache");
    let vgpu = common::libvgpu();
    let preload = [
        ("LD_PRELOAD", vgpu.to_str().unwrap()),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", region.to_str().unwrap()),
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g"),
    ];
    let mut a = env.spawn(&c, &["--alloc", "1048576", "--hold"], &preload);
    a.words("meminfo");
    let mut raw = env.spawn(&c, &["--raw-alloc", "838860800", "--hold"], &[]);
    raw.words("raw-allocated");
    let three = (300 * MIB).to_string();
    // Before the agent publishes, the interceptor only knows its own 1 MiB: 300 MiB fits.
    let mut b = env.spawn(&c, &["--alloc", &three, "--free"], &preload);
    b.words("freed");
    b.finish();
    settle(&mut agent);
    assert_eq!(
        agent.publish_regions(),
        1,
        "one region, tied to the container by its cgroup id"
    );
    let mut b = env.spawn(&c, &["--alloc", &three, "--hold"], &preload);
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.words("meminfo")));
    assert!(
        refused.is_err(),
        "the 300 MiB allocation must fail against the kernel's 801 MiB"
    );
    b.finish();
    raw.finish();
    a.finish();
}

#[test]
fn hard_limit_kills_a_process_that_bypasses_the_interceptor() {
    // The container's region says 1 GiB. A tenant holds 600 MiB; another process of the container,
    // using raw RM ioctls (no interceptor), allocates 600 MiB more: the kernel kills it (SIGKILL from the
    // eBPF program), the kill is counted, and its memory is released; the first tenant is untouched.
    let Some(mut env) = Env::new("hard-limit", 1, 4096) else {
        return;
    };
    env.cfg.hard_limit = true;
    let mut agent = env.agent();
    let c = env.container(14);
    let dir = env.dir.join("regions/pod14_main");
    let _map = make_region(&dir, &[1 << 30], &c);
    assert_eq!(agent.publish_regions(), 1);

    let a = second_raw_600_mib_is_killed(&env, &mut agent, &c, "killed by the hard limit");
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 600 * MIB);
    let kills: u64 = container(&s, &c).gpus.iter().map(|g| g.hard_limit_kills).sum();
    assert_eq!((kills, s.agent.hard_limit_kills), (1, 1));
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("hami_container_hard_limit_kills_total{") && l.ends_with(" 1")),
        "{text}"
    );
    a.finish();
}

/// Two processes of container `c` allocate 600 MiB each with raw RM ioctls (no interceptor), the
/// second once the agent has seen the first: the kernel kills the second (`killed`: why it must be) and
/// its memory is released, while the first keeps its 600 MiB. The first, still holding.
fn second_raw_600_mib_is_killed(
    env: &Env,
    agent: &mut hami_agent::service::Agent,
    c: &std::path::Path,
    killed: &str,
) -> common::Tenant {
    use std::os::unix::process::ExitStatusExt as _;
    let six = (600 * MIB).to_string();
    let mut a = env.spawn(c, &["--raw-alloc", &six, "--hold"], &[]);
    a.words("raw-allocated");
    settle(agent);
    let mut b = env.spawn(c, &["--raw-alloc", &six, "--hold"], &[]);
    let b_pid = b.pid;
    let status = b.status();
    assert_eq!(status.signal(), Some(9), "{killed}: {status:?}");
    eventually("the killed process's memory is released", || {
        env.node.ground_truth().bytes(b_pid, 0) == 0
    });
    assert_eq!(env.node.ground_truth().bytes(a.pid, 0), 600 * MIB);
    a
}

/// Creates a region file in `dir` as the first tenant process would (header limits `header`, bytes per
/// device) for the container `cg`; the mapping is returned so the test can read what the agent writes.
fn make_region(dir: &std::path::Path, header: &[u64], cg: &std::path::Path) -> memmap2::MmapMut {
    std::fs::create_dir_all(dir).expect("region dir");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("vgpu.cache"))
        .expect("region file");
    f.set_len(hami_api::region::REGION_SIZE as u64)
        .expect("sizing the region");
    #[allow(unsafe_code, reason = "mapping the region file as a tenant would")]
    // SAFETY: a shared mapping of a REGION_SIZE file; Region is made of integer atomics.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(hami_api::region::REGION_SIZE)
            .map_mut(&f)
    }
    .expect("mmap");
    let r = region(&map);
    r.init(header, &vec![0; header.len()]);
    r.set_cgroup_id(common::cgroup_id(cg));
    map
}

fn region(map: &memmap2::MmapMut) -> &hami_api::region::Region {
    #[allow(unsafe_code, reason = "viewing the mapping as the region")]
    // SAFETY: page-aligned, REGION_SIZE long, any bytes are a valid Region; the reference lives no
    // longer than the mapping.
    unsafe {
        &*map.as_ptr().cast::<hami_api::region::Region>()
    }
}

/// Writes the trusted limits file of the region directory `dir` (`<dir>.limits`, mode 0444) as the
/// device plugin does: (UUID, bytes) per container device, low priority.
fn write_trusted(dir: &std::path::Path, devices: &[(&str, u64)]) {
    write_trusted_with_priority(dir, devices, hami_api::region::PRIORITY_LOW);
}

/// [`write_trusted`] with the container's task priority.
fn write_trusted_with_priority(dir: &std::path::Path, devices: &[(&str, u64)], priority: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let t = hami_api::region::TrustedLimits {
        version: hami_api::region::LIMITS_VERSION,
        devices: devices
            .iter()
            .map(|(uuid, bytes)| hami_api::region::DeviceLimit {
                uuid: (*uuid).to_owned(),
                memory_bytes: *bytes,
                sm_percent: 0,
            })
            .collect(),
        on_region_error: hami_api::region::RegionFailure::Closed,
        priority,
    };
    let path = hami_agent::regions::trusted_limits_path(&dir.join("vgpu.cache")).expect("a parent");
    std::fs::write(&path, t.to_json()).expect("limits file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
}

#[test]
fn hard_limit_holds_the_trusted_limit_when_the_tenant_rewrites_its_region_header() {
    // The device plugin's trusted file says 1 GiB; the tenant has written 100 GiB into its region
    // header. The kernel hard limit follows the file: 600 MiB + 600 MiB of raw allocations kill the
    // second process. The agent falls back from BPF LSM (refused on these kernels) to the kill, and
    // says so.
    let Some(mut env) = Env::new("trusted-hard-limit", 1, 4096) else {
        return;
    };
    env.cfg.hard_limit = true;
    let mut agent = env.agent();
    assert_eq!(
        agent.hard_limit_mechanism(),
        Some(hami_agent::loader::HardLimitMechanism::Kill),
        "BPF LSM is refused here, so the kill is the mechanism"
    );
    let c = env.container(15);
    let dir = env.dir.join("regions/pod15_main");
    let map = make_region(&dir, &[100 << 30], &c);
    let uuid = env.node.ground_truth().gpus[0].uuid.clone();
    write_trusted(&dir, &[(&uuid, 1 << 30)]);
    assert_eq!(agent.publish_regions(), 1);
    assert_eq!(region(&map).limit(0), 100 << 30, "the header says 100 GiB");

    let a = second_raw_600_mib_is_killed(&env, &mut agent, &c, "killed at the trusted 1 GiB");
    let s = settle(&mut agent);
    assert_eq!(s.agent.hard_limit_kills, 1);
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(
        text.contains("hami_agent_hard_limit_mechanism{mechanism=\"kill\",node=\"test-node\"} 1")
            && text.contains("hami_agent_hard_limit_mechanism{mechanism=\"lsm\",node=\"test-node\"} 0"),
        "{text}"
    );
    a.finish();
}

#[test]
fn a_two_gpu_container_maps_to_its_gpus_by_uuid_in_the_agent() {
    // Three GPUs; the container holds GPU 2 (1 GiB) and GPU 0 (2 GiB), in that order. The agent binary
    // (fake NVML for the UUIDs) maps container device 0 to GPU 2 and device 1 to GPU 0: the kernel's
    // view lands in the right region slots, and the hard limit kills at 1 GiB on GPU 2 while 1.5 GiB
    // on GPU 0 is fine.
    use std::os::unix::process::ExitStatusExt as _;
    let Some(mut env) = Env::new("multi-gpu-hard-limit", 3, 4096) else {
        return;
    };
    env.cfg.hard_limit = true;
    env.cfg.nvml_lib = Some(common::fake_nvml());
    let c = env.container(16);
    let dir = env.dir.join("regions/pod16_main");
    let map = make_region(&dir, &[100 << 30, 100 << 30], &c);
    let t = env.node.ground_truth();
    write_trusted(&dir, &[(&t.gpus[2].uuid, 1 << 30), (&t.gpus[0].uuid, 2 << 30)]);
    let (_agent, _port) = common::start_agent(&env, std::path::Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    let r = region(&map);
    eventually("the agent published into the region", || {
        r.header
            .kernel_updated_ns
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
    });
    let mut g0 = env.spawn(
        &c,
        &[
            "--raw-alloc",
            &(1536 * MIB).to_string(),
            "--raw-device",
            "0",
            "--hold",
        ],
        &[],
    );
    g0.words("raw-allocated");
    let mut g2 = env.spawn(
        &c,
        &[
            "--raw-alloc",
            &(600 * MIB).to_string(),
            "--raw-device",
            "2",
            "--hold",
        ],
        &[],
    );
    g2.words("raw-allocated");
    let kernel = |dev: usize| r.header.kernel_used_bytes[dev].load(std::sync::atomic::Ordering::Acquire);
    eventually("the kernel's view is in the right slots", || {
        kernel(0) == 600 * MIB && kernel(1) == 1536 * MIB
    });
    let mut over = env.spawn(
        &c,
        &[
            "--raw-alloc",
            &(600 * MIB).to_string(),
            "--raw-device",
            "2",
            "--hold",
        ],
        &[],
    );
    let status = over.status();
    assert_eq!(status.signal(), Some(9), "GPU 2 is limited to 1 GiB: {status:?}");
    let t = env.node.ground_truth();
    assert_eq!(
        (t.bytes(g0.pid, 0), t.bytes(g2.pid, 2)),
        (1536 * MIB, 600 * MIB),
        "the others are untouched"
    );
    g0.finish();
    g2.finish();
}

/// SM utilisation (percent) of `pid` on GPU 0 over `window`, from the node's ground truth.
fn utilisation(env: &Env, pid: u32, window: std::time::Duration) -> f64 {
    let sm = || {
        env.node.ground_truth().gpus[0]
            .sm_seconds_by_pid
            .get(&pid)
            .copied()
            .unwrap_or(0.0)
    };
    let (t0, s0) = (std::time::Instant::now(), sm());
    std::thread::sleep(window);
    100.0 * (sm() - s0) / t0.elapsed().as_secs_f64()
}

#[test]
fn a_high_priority_container_suspends_a_low_priority_one_on_its_gpu() {
    // Two containers share GPU 0: `batch` (nvidia.com/priority 1, HAMi's default) and `urgent`
    // (priority 0), each with its region and trusted limits file. The agent binary measures each
    // container's SM use (fake NVML) and, while `urgent` is active, marks `batch` suspended in its
    // region; batch's launches then wait (ground truth: it gets no SM time), and resume when urgent
    // ends.
    let Some(mut env) = Env::new("priority", 1, 4096) else {
        return;
    };
    env.cfg.nvml_lib = Some(common::fake_nvml());
    let uuid = env.node.ground_truth().gpus[0].uuid.clone();
    let (batch, urgent) = (env.container(20), env.container(21));
    let (batch_dir, urgent_dir) = (
        env.dir.join("regions/pod20_main"),
        env.dir.join("regions/pod21_main"),
    );
    let batch_map = make_region(&batch_dir, &[2 << 30], &batch);
    let _urgent_map = make_region(&urgent_dir, &[2 << 30], &urgent);
    write_trusted_with_priority(&batch_dir, &[(&uuid, 2 << 30)], hami_api::region::PRIORITY_LOW);
    write_trusted_with_priority(&urgent_dir, &[(&uuid, 2 << 30)], hami_api::region::PRIORITY_HIGH);
    let (_agent, _port) = common::start_agent(&env, std::path::Path::new(env!("CARGO_BIN_EXE_hami-agent")));
    let vgpu = common::libvgpu();
    let tenant_env = |dir: &std::path::Path| -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), vgpu.to_string_lossy().into_owned()),
            (
                "CUDA_DEVICE_MEMORY_SHARED_CACHE".into(),
                dir.join("vgpu.cache").to_string_lossy().into_owned(),
            ),
            ("HAMI_FAKE_CUDA_KERNEL_US".into(), "5000".into()),
        ]
    };
    let b_env = tenant_env(&batch_dir);
    let b_env: Vec<(&str, &str)> = b_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let u_env = tenant_env(&urgent_dir);
    let u_env: Vec<(&str, &str)> = u_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = env.spawn(&batch, &["--launch-for-ms", "7000", "--grid", "132"], &b_env);
    let alone = utilisation(&env, b.pid, std::time::Duration::from_millis(1000));
    assert!(alone > 50.0, "batch alone {alone:.1} %");
    let u = env.spawn(&urgent, &["--launch-for-ms", "2500", "--grid", "132"], &u_env);
    let r = region(&batch_map);
    eventually("batch suspended", || r.suspended(0) && r.any_suspended());
    let (held, busy) = {
        let t0 = env.node.ground_truth().gpus[0].sm_seconds_by_pid.clone();
        let start = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let t1 = env.node.ground_truth().gpus[0].sm_seconds_by_pid.clone();
        let secs = start.elapsed().as_secs_f64();
        let d = |pid: u32| {
            100.0 * (t1.get(&pid).copied().unwrap_or(0.0) - t0.get(&pid).copied().unwrap_or(0.0)) / secs
        };
        (d(b.pid), d(u.pid))
    };
    assert!(
        held < 5.0 && busy > 50.0,
        "batch {held:.1} %, urgent {busy:.1} % while urgent runs"
    );
    u.finish();
    eventually("batch resumed", || !r.suspended(0));
    let after = utilisation(&env, b.pid, std::time::Duration::from_millis(1000));
    assert!(after > 50.0, "batch after urgent {after:.1} %");
    b.finish();
}

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path) -> Self {
        std::fs::create_dir_all(at).expect("tmpfs mount point");
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0755,size=1m"),
        )
        .expect("mounting a tmpfs");
        Self(at.to_path_buf())
    }
    /// A character-device node `name` of `major:minor` in this tmpfs, as a container runtime makes one.
    fn mknod(&self, name: &str, major: u64, minor: u64) -> std::path::PathBuf {
        let p = self.0.join(name);
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )
        .expect("mknod");
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn rdev_every_node_of_the_control_device_is_traced_whatever_its_filesystem_and_inode() {
    // A container runtime without bind mounts makes its own /dev/nvidiactl with mknod: another
    // filesystem and inode, the same device number. There is no NVIDIA driver (and no CUSE) here, so a
    // real character device stands in for the control device: /dev/null (1:3), whose ioctls fail
    // harmlessly with ENOTTY. The host's node is a mknod'd 1:3 in a private tmpfs, registered as the
    // agent's `nvidiactl`; RM-shaped ioctls through a second node in another tmpfs (as in a container)
    // and through /dev/null itself (devtmpfs) must be recognised as the control device by the kernel
    // programs, and ioctls on another device or a regular file must not.
    use std::os::unix::fs::MetadataExt as _;
    let Some(mut env) = Env::new("rdev", 1, 256) else {
        return;
    };
    let host = Tmpfs::mount(&env.dir.join("host-dev"));
    let host_ctl = host.mknod("nvidiactl", 1, 3);
    env.cfg.paths.dev_dir = host.0.clone();
    let mut agent = env.agent();
    let ctr = Tmpfs::mount(&env.dir.join("ctr-dev"));
    let ctr_ctl = ctr.mknod("nvidiactl", 1, 3);
    let other_device = ctr.mknod("zero", 1, 5);
    let plain = env.dir.join("plain-file");
    std::fs::write(&plain, b"").unwrap();
    let null = std::path::PathBuf::from("/dev/null");
    let ids: Vec<(u64, u64)> = [&host_ctl, &ctr_ctl, &null]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
            (m.dev(), m.ino())
        })
        .collect();
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0].0 != ids[1].0,
        "three nodes on different filesystems: {ids:?}"
    );

    // NV_ESC_RM_ALLOC with a 48-byte NVOS64 (_IOWR('F', 0x2B, 48)) and the same escape wrapped in
    // NV_ESC_IOCTL_XFER_CMD (_IOWR('F', 0xD3, 16), bare escape number inside).
    const RM_ALLOC: u32 = 0xC030_462B;
    const XFER: u32 = 0xC010_46D3;
    let ioctl_errno = |path: &std::path::Path, cmd: u32, arg: &mut [u8]| -> i32 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let r = hami_fake_gpu::client::ioctl(&f, cmd, arg);
        r.unwrap_err().raw_os_error().unwrap()
    };
    let mut nvos64 = [0u8; 48];
    nvos64[12..16].copy_from_slice(&0x40u32.to_le_bytes());
    let mut xfer = [0u8; 16];
    xfer[0..4].copy_from_slice(&0x2Bu32.to_le_bytes());
    xfer[4..8].copy_from_slice(&48u32.to_le_bytes());
    xfer[8..16].copy_from_slice(&(nvos64.as_ptr() as u64).to_le_bytes());
    let before = settle(&mut agent).agent.ioctls;
    assert_eq!(before, 0);
    for path in [&host_ctl, &ctr_ctl, &null] {
        assert_eq!(ioctl_errno(path, RM_ALLOC, &mut nvos64), libc::ENOTTY);
    }
    assert_eq!(ioctl_errno(&ctr_ctl, XFER, &mut xfer), libc::ENOTTY);
    // Another device (1:5) and a regular file are not the control device.
    assert_eq!(ioctl_errno(&other_device, RM_ALLOC, &mut nvos64), libc::ENOTTY);
    assert_eq!(ioctl_errno(&plain, RM_ALLOC, &mut nvos64), libc::ENOTTY);
    let s = settle(&mut agent);
    assert_eq!(
        s.agent.ioctls, 4,
        "three nodes of 1:3 plus the wrapped call, nothing else"
    );
    // The calls failed in the kernel (ENOTTY): nothing is charged and nothing is malformed.
    assert_eq!((s.agent.live_objects, s.agent.malformed_ioctls), (0, 0));
    drop(agent);
    drop(ctr);
    drop(host);
}

#[test]
fn legacy_heap_size_range_and_tiled_surfaces_are_charged_from_their_own_offsets() {
    // NVOS32 ALLOC_SIZE_RANGE keeps its size at 80 (88 is its alignment: 2 MiB here) and
    // ALLOC_TILED_PITCH_HEIGHT has the driver compute pitch × height; both create device memory.
    let Some(env) = Env::new("heap-paths", 1, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(16);
    let mut range = env.spawn(
        &c,
        &[
            "--raw-alloc",
            "5242880",
            "--raw-via",
            "vid-heap-range",
            "--xfer",
            "--hold",
        ],
        &[],
    );
    let mut tiled = env.spawn(
        &c,
        &["--raw-alloc", "3145728", "--raw-via", "vid-heap-tiled", "--hold"],
        &[],
    );
    range.words("raw-allocated");
    tiled.words("raw-allocated");
    let t = env.node.ground_truth();
    assert_eq!((t.bytes(range.pid, 0), t.bytes(tiled.pid, 0)), (5 * MIB, 3 * MIB));
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 8 * MIB);
    assert_eq!(s.agent.malformed_ioctls, 0);
    range.finish();
    tiled.finish();
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 0);
}

#[test]
fn subtree_free_of_a_device_releases_memory_parented_to_its_subdevice() {
    // Memory under an NV20_SUBDEVICE_0; the process then frees the NV01_DEVICE_0 (not the memory) and
    // keeps running: the driver frees the whole subtree, and so must the attribution, at once, not at
    // the process's exit.
    let Some(env) = Env::new("subtree", 1, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(17);
    let mut w = env.spawn(
        &c,
        &[
            "--raw-alloc",
            "2097152",
            "--raw-alloc",
            "1048576",
            "--raw-under-subdevice",
            "--raw-free-device",
            "--hold",
        ],
        &[],
    );
    w.words("raw-allocated");
    assert_eq!(env.node.ground_truth().bytes(w.pid, 0), 3 * MIB);
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 3 * MIB);
    w.send();
    w.words("raw-freed-device");
    assert_eq!(
        env.node.ground_truth().bytes(w.pid, 0),
        0,
        "the node freed the subtree"
    );
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), 0);
    let g = container(&s, &c)
        .gpus
        .iter()
        .find(|g| g.gpu == Some(0))
        .cloned()
        .unwrap();
    assert_eq!((g.released, g.frees, g.allocations), (2, 0, 2));
    assert_eq!(s.agent.live_objects, 0);
    assert!(w.try_status().is_none(), "still running: not the exit path");
    w.finish();
}

#[test]
fn uprobes_count_the_ptsz_twins_and_report_missing_libraries() {
    // Code built with `--default-stream per-thread` calls cuLaunchKernel_ptsz & co.: each twin is
    // counted under its own name, and the base entry points see nothing. A configured libcuda that does
    // not exist is reported (metric), not silently skipped.
    let Some(mut env) = Env::new("ptsz", 1, 256) else {
        return;
    };
    env.cfg.libcuda.push(env.dir.join("no-such-lib/libcuda.so.1"));
    let mut agent = env.agent();
    let c = env.container(18);
    let mut w = env.spawn(
        &c,
        &[
            "--ptsz", "--async", "1048576", "--pool", "2097152", "--launch", "7", "--free", "--hold",
        ],
        &[],
    );
    w.words("launched");
    let s = settle(&mut agent);
    assert_eq!(attributed(&s, &c, 0), env.node.ground_truth().bytes(w.pid, 0));
    assert_eq!(attributed(&s, &c, 0), 3 * MIB);
    let k = container(&s, &c);
    for (call, n) in [
        ("cuLaunchKernel_ptsz", 7),
        ("cuMemAllocAsync_ptsz", 1),
        ("cuMemAllocFromPoolAsync_ptsz", 1),
    ] {
        assert_eq!(k.cuda_calls.get(call), Some(&n), "{call}: {:?}", k.cuda_calls);
    }
    for base in ["cuLaunchKernel", "cuMemAllocAsync", "cuMemAllocFromPoolAsync"] {
        assert_eq!(k.cuda_calls.get(base), None, "{base}: {:?}", k.cuda_calls);
    }
    assert_eq!((s.agent.libcuda_missing, s.agent.uprobe_symbols_missing), (1, 0));
    let text = hami_agent::metrics::render(&s).unwrap();
    assert!(
        text.contains("hami_agent_libcuda_missing{node=\"test-node\"} 1"),
        "{text}"
    );
    w.send();
    w.words("freed");
    let s = settle(&mut agent);
    assert_eq!(container(&s, &c).cuda_calls.get("cuMemFreeAsync_ptsz"), Some(&2));
    assert_eq!(attributed(&s, &c, 0), 0);
    w.finish();
}

#[test]
fn a_device_allocated_without_params_is_device_instance_0() {
    // NV01_DEVICE_0's parameters are optional; without them RM takes device instance 0. Memory under
    // such a device is charged to GPU 0, not left on an unknown GPU or counted as malformed.
    let Some(env) = Env::new("device-no-params", 2, 256) else {
        return;
    };
    let mut agent = env.agent();
    let c = env.container(19);
    let mut w = env.spawn(
        &c,
        &[
            "--raw-alloc",
            "1048576",
            "--raw-device-without-params",
            "--raw-under-subdevice",
            "--hold",
        ],
        &[],
    );
    w.words("raw-allocated");
    let t = env.node.ground_truth();
    assert_eq!((t.bytes(w.pid, 0), t.bytes(w.pid, 1)), (MIB, 0));
    let s = settle(&mut agent);
    assert_eq!((attributed(&s, &c, 0), attributed(&s, &c, 1)), (MIB, 0));
    let unknown: u64 = container(&s, &c)
        .gpus
        .iter()
        .filter(|g| g.gpu.is_none())
        .map(|g| g.memory_bytes)
        .sum();
    assert_eq!(unknown, 0, "nothing on an unknown GPU");
    assert_eq!(s.agent.malformed_ioctls, 0);
    w.finish();
}
