//! Privileged tests of the simulated node through the real kernel: a FUSE mount, real processes doing
//! raw RM ioctls on it. They skip (with a printed reason) without root or `/dev/fuse`, and fail instead
//! when `HAMI_REQUIRE_PRIVILEGED=1`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use hami_fake_gpu::Error;
use hami_fake_gpu::abi::{self, RmAlloc, RmAllocVariant, RmFree, Xfer, class, status};
use hami_fake_gpu::client::{AllocVia, RmClient, ioctl};
use hami_fake_gpu::fs::{CONTROL_FILE, read_ground_truth};
use hami_fake_gpu::model::{AllocPath, MIB};
use hami_fake_gpu::node::{is_mounted, privileged_or_skip};
use hami_fake_gpu::{DeviceModel, FakeNode};

fn node(gpus: u32, memory_mib: u64) -> FakeNode {
    FakeNode::start_temp(DeviceModel::uniform(gpus, memory_mib)).expect("mounting the fake node")
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening a device file")
}

/// FUSE sends RELEASE asynchronously after the last close, so "freed on close" is observed by polling.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn me() -> u32 {
    std::process::id()
}

#[test]
fn alloc_and_free_round_trip_through_the_kernel_on_every_path() {
    if !privileged_or_skip("alloc_and_free_round_trip_through_the_kernel_on_every_path") {
        return;
    }
    let node = node(2, 1024);
    let c = RmClient::open(node.dir()).unwrap();
    assert_eq!(
        c.client, 0xC1D0_0001,
        "client handles start at RS_CLIENT_HANDLE_BASE"
    );
    let dev = c.alloc_device(1).unwrap();
    let h21 = c.alloc_vidmem(dev, 3 * MIB, AllocVia::Nvos21).unwrap();
    let h64 = c.alloc_vidmem(dev, 5 * MIB, AllocVia::Nvos64).unwrap();
    let hheap = c.alloc_vidmem(dev, 7 * MIB, AllocVia::VidHeap).unwrap();
    assert!(
        [dev, h21, h64, hheap]
            .iter()
            .all(|h| h & 0xFFF0_0000 == 0xCAF0_0000)
    );

    let t = node.ground_truth();
    assert_eq!(t.bytes(me(), 1), 15 * MIB);
    assert_eq!(t.bytes(me(), 0), 0);
    assert_eq!(t.gpus[1].used_bytes, 15 * MIB);
    let heap = t.allocations.iter().find(|a| a.handle == hheap).unwrap();
    assert_eq!(
        (heap.path, heap.bytes, heap.client),
        (AllocPath::VidHeap, 7 * MIB, c.client)
    );
    // Another process reads the same truth from the file.
    assert_eq!(read_ground_truth(node.dir()).unwrap(), t);

    c.free(dev, h21).unwrap();
    assert_eq!(node.ground_truth().bytes(me(), 1), 12 * MIB);
    // Freeing the device frees its memory too.
    c.free(c.client, dev).unwrap();
    assert_eq!(node.ground_truth().gpus[1].used_bytes, 0);
    assert_eq!(
        c.free(c.client, h64).unwrap_err().status(),
        Some(status::NV_ERR_OBJECT_NOT_FOUND)
    );
    drop(c);
    eventually("closing nvidiactl frees the client", || {
        node.ground_truth().clients.is_empty()
    });
    node.stop().unwrap();
}

#[test]
fn the_kernel_round_trips_the_real_struct_bytes() {
    if !privileged_or_skip("the_kernel_round_trips_the_real_struct_bytes") {
        return;
    }
    let node = node(1, 1024);
    let c = RmClient::open(node.dir()).unwrap();
    let dev = c.alloc_device(0).unwrap();
    let mut params = abi::vidmem_alloc_params(c.client, 2 * MIB);
    let a = RmAlloc {
        h_root: c.client,
        h_parent: dev,
        h_new: 0x1234_5678,
        h_class: class::NV01_MEMORY_LOCAL_USER,
        p_alloc_parms: params.as_mut_ptr() as u64,
        params_size: 128,
        flags: 0,
    };
    let mut b = RmAllocVariant::Nvos64.encode(&a);
    let sent = b.clone();
    ioctl(c.file(), 0xC030_462B, &mut b).unwrap();
    // Only status changed; the client-chosen handle was kept.
    assert_eq!(&b[..40], &sent[..40]);
    assert_eq!(abi::get_u32(&b, 40), Some(status::NV_OK));
    // RM wrote the limit back into the caller's NV_MEMORY_ALLOCATION_PARAMS.
    assert_eq!(abi::get_u64(&params, abi::mem_params::LIMIT), Some(2 * MIB - 1));
    assert_eq!(node.ground_truth().allocations[0].handle, 0x1234_5678);

    // The same free, wrapped in NV_ESC_IOCTL_XFER_CMD.
    let mut inner = RmFree {
        h_root: c.client,
        h_parent: dev,
        h_old: 0x1234_5678,
    }
    .encode();
    let mut x = Xfer {
        cmd: u32::from(abi::NV_ESC_RM_FREE),
        size: 16,
        ptr: inner.as_mut_ptr() as u64,
    }
    .encode();
    ioctl(c.file(), 0xC010_46D3, &mut x).unwrap();
    assert_eq!(abi::get_u32(&inner, 12), Some(status::NV_OK));
    assert_eq!(node.ground_truth().gpus[0].used_bytes, 0);
}

#[test]
fn bad_input_gets_the_drivers_errors_and_the_device_survives() {
    if !privileged_or_skip("bad_input_gets_the_drivers_errors_and_the_device_survives") {
        return;
    }
    let node = node(1, 64);
    let c = RmClient::open(node.dir()).unwrap();
    let dev = c.alloc_device(0).unwrap();
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();

    // Pre-535 40-byte NVOS64: wrong size for this driver.
    assert_eq!(
        errno(ioctl(
            c.file(),
            abi::nv_iowr(abi::NV_ESC_RM_ALLOC, 40),
            &mut [0; 40]
        )),
        Some(libc::EINVAL)
    );
    // Truncated NVOS00 (12 of 16 bytes).
    assert_eq!(
        errno(ioctl(
            c.file(),
            abi::nv_iowr(abi::NV_ESC_RM_FREE, 12),
            &mut [0; 12]
        )),
        Some(libc::EINVAL)
    );
    // Unknown escape.
    assert_eq!(
        errno(ioctl(c.file(), abi::nv_iowr(0x7E, 8), &mut [0; 8])),
        Some(libc::EINVAL)
    );
    // A control-device escape on a per-GPU file.
    let gpu0 = open_rw(&node.dir().join("nvidia0"));
    let mut free = RmFree {
        h_root: c.client,
        h_parent: dev,
        h_old: dev,
    }
    .encode();
    assert_eq!(
        errno(ioctl(&gpu0, abi::nv_iowr(abi::NV_ESC_RM_FREE, 16), &mut free)),
        Some(libc::EINVAL)
    );
    // REGISTER_FD belongs on the per-GPU file.
    ioctl(&gpu0, abi::nv_iowr(abi::NV_ESC_REGISTER_FD, 4), &mut [3, 0, 0, 0]).unwrap();
    // XFER over 16 KiB, and XFER to an unmapped pointer.
    let mut x = Xfer {
        cmd: u32::from(abi::NV_ESC_RM_FREE),
        size: 20_000,
        ptr: 0,
    }
    .encode();
    assert_eq!(errno(ioctl(c.file(), 0xC010_46D3, &mut x)), Some(libc::EINVAL));
    let mut x = Xfer {
        cmd: u32::from(abi::NV_ESC_RM_FREE),
        size: 16,
        ptr: 0x10,
    }
    .encode();
    assert_eq!(errno(ioctl(c.file(), 0xC010_46D3, &mut x)), Some(libc::EFAULT));

    // RM-level failures: syscall 0, status in the struct.
    let st = |r: Result<u32, Error>| r.unwrap_err().status();
    assert_eq!(
        st(c.alloc_vidmem(dev, 65 * MIB, AllocVia::Nvos21)),
        Some(status::NV_ERR_NO_MEMORY)
    );
    assert_eq!(
        st(c.alloc_vidmem(dev, 65 * MIB, AllocVia::VidHeap)),
        Some(status::NV_ERR_NO_MEMORY)
    );
    assert_eq!(st(c.alloc_device(9)), Some(status::NV_ERR_INVALID_ARGUMENT));
    let mut bad = RmAllocVariant::Nvos21.encode(&RmAlloc {
        h_root: c.client,
        h_parent: dev,
        h_new: 0,
        h_class: class::NV01_MEMORY_LOCAL_USER,
        p_alloc_parms: 0x10,
        params_size: 128,
        flags: 0,
    });
    ioctl(c.file(), 0xC020_462B, &mut bad).unwrap();
    assert_eq!(abi::get_u32(&bad, 28), Some(status::NV_ERR_INVALID_POINTER));
    assert_eq!(
        c.free(dev, 0xDEAD).unwrap_err().status(),
        Some(status::NV_ERR_OBJECT_NOT_FOUND)
    );

    // Nothing was charged, and the device still works.
    assert!(node.ground_truth().allocations.is_empty());
    c.alloc_vidmem(dev, 64 * MIB, AllocVia::Nvos21).unwrap();
    assert_eq!(node.ground_truth().gpus[0].used_bytes, 64 * MIB);
}

#[test]
fn failure_injection_through_the_control_file() {
    if !privileged_or_skip("failure_injection_through_the_control_file") {
        return;
    }
    let node = node(2, 1024);
    let mut ctl = OpenOptions::new()
        .write(true)
        .open(node.dir().join(CONTROL_FILE))
        .unwrap();
    ctl.write_all(b"xid 1 79\nlost 1\n").unwrap();
    assert!(ctl.write_all(b"explode 1\n").is_err());
    let c = RmClient::open(node.dir()).unwrap();
    let dev = c.alloc_device(1).unwrap();
    assert_eq!(
        c.alloc_vidmem(dev, MIB, AllocVia::Nvos64).unwrap_err().status(),
        Some(status::NV_ERR_GPU_IS_LOST)
    );
    let t = read_ground_truth(node.dir()).unwrap();
    assert!(t.gpus[1].lost && !t.gpus[0].lost);
    assert_eq!(t.gpus[1].xids, vec![79]);
    ctl.write_all(b"recover 1\n").unwrap();
    c.alloc_vidmem(dev, MIB, AllocVia::Nvos64).unwrap();
}

#[test]
fn managed_ranges_through_the_control_file_are_apart_from_rm_memory() {
    if !privileged_or_skip("managed_ranges_through_the_control_file_are_apart_from_rm_memory") {
        return;
    }
    let node = node(2, 64);
    let c = RmClient::open(node.dir()).unwrap();
    let dev = c.alloc_device(1).unwrap();
    c.alloc_vidmem(dev, 8 * MIB, AllocVia::Nvos21).unwrap();
    let mut ctl = OpenOptions::new()
        .write(true)
        .open(node.dir().join(CONTROL_FILE))
        .unwrap();
    // More than the GPU has: managed memory oversubscribes.
    ctl.write_all(b"managed 1 134217728 0x7f0000200000\nmanaged 1 4096 4096\n")
        .unwrap();
    let t = read_ground_truth(node.dir()).unwrap();
    assert_eq!(t.bytes(me(), 1), 8 * MIB, "managed is not in the RM bytes");
    assert_eq!(t.gpus[1].used_bytes, 8 * MIB);
    assert_eq!(t.managed_bytes(me(), 1), 128 * MIB + 4096);
    assert_eq!(t.gpus[1].managed_bytes, 128 * MIB + 4096);
    assert_eq!(t.gpus[0].managed_bytes, 0);
    assert!(
        t.managed
            .iter()
            .any(|m| m.address == 0x7f00_0020_0000 && m.bytes == 128 * MIB && m.gpu == 1 && m.pid == me())
    );
    // Bad lines are refused and change nothing.
    for bad in [
        "managed 7 4096 0x1\n",
        "managed 1 0 0x1\n",
        "managed 1 4096 4096\n",
        "managed 1 4096\n",
        "managed-free 0x1234\n",
        "managed 1 x 0x1\n",
    ] {
        assert!(ctl.write_all(bad.as_bytes()).is_err(), "{bad}");
    }
    ctl.write_all(b"managed-free 4096\n").unwrap();
    assert_eq!(node.ground_truth().managed_bytes(me(), 1), 128 * MIB);
    // Closing the file forgets what was registered through it (the UVM fd going at exit).
    drop(ctl);
    eventually("closing hami-control forgets its managed ranges", || {
        node.ground_truth().managed.is_empty()
    });
    assert_eq!(node.ground_truth().bytes(me(), 1), 8 * MIB);
}

#[test]
fn xfer_wrapped_client_calls_are_counted_like_direct_ones() {
    if !privileged_or_skip("xfer_wrapped_client_calls_are_counted_like_direct_ones") {
        return;
    }
    let node = node(2, 64);
    let mut c = RmClient::open(node.dir()).unwrap();
    c.set_xfer(true);
    assert!(c.xfer());
    let dev = c.alloc_device(0).unwrap();
    let h21 = c.alloc_vidmem(dev, 2 * MIB, AllocVia::Nvos21).unwrap();
    let h64 = c.alloc_vidmem(dev, 3 * MIB, AllocVia::Nvos64).unwrap();
    let hheap = c.alloc_vidmem(dev, 4 * MIB, AllocVia::VidHeap).unwrap();
    assert_eq!(
        c.alloc_vidmem(dev, 64 * MIB, AllocVia::Nvos64)
            .unwrap_err()
            .status(),
        Some(status::NV_ERR_NO_MEMORY)
    );
    assert_eq!(c.mem_info(dev).unwrap(), (64 * MIB, 55 * MIB));
    let t = node.ground_truth();
    assert_eq!(t.bytes(me(), 0), 9 * MIB);
    assert_eq!(t.allocations.len(), 3);
    c.free(dev, h21).unwrap();
    c.free(dev, hheap).unwrap();
    assert_eq!(node.ground_truth().bytes(me(), 0), 3 * MIB);
    c.set_xfer(false);
    c.free(dev, h64).unwrap();
    assert!(node.ground_truth().allocations.is_empty());
}

/// A tenant process (`hami-fake-node alloc`) holding its allocations until its stdin closes.
struct Tenant {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Tenant {
    fn spawn(dir: &Path, gpu: u32, bytes: u64, count: u32, via: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hami-fake-node"))
            .arg("alloc")
            .arg(dir)
            .args([
                "--gpu",
                &gpu.to_string(),
                "--bytes",
                &bytes.to_string(),
                "--count",
                &count.to_string(),
            ])
            .args(["--via", via])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning hami-fake-node alloc");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, out }
    }

    /// Waits for the "allocated" line; `None` if the tenant exited instead.
    fn allocated(&mut self) -> Option<String> {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .expect("reading the tenant's stdout");
        line.starts_with("allocated").then_some(line)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn finish(mut self) -> std::process::Output {
        drop(self.child.stdin.take());
        self.child.wait_with_output().expect("waiting for the tenant")
    }
}

#[test]
fn concurrent_processes_see_one_consistent_device() {
    if !privileged_or_skip("concurrent_processes_see_one_consistent_device") {
        return;
    }
    let node = node(2, 100);
    let mut a = Tenant::spawn(node.dir(), 0, 10 * MIB, 4, "nvos21");
    let mut b = Tenant::spawn(node.dir(), 0, 20 * MIB, 2, "vid-heap");
    assert!(a.allocated().is_some());
    assert!(b.allocated().is_some());
    let t = read_ground_truth(node.dir()).unwrap();
    assert_eq!(t.bytes(a.pid(), 0), 40 * MIB);
    assert_eq!(t.bytes(b.pid(), 0), 40 * MIB);
    assert_eq!(t.gpus[0].used_bytes, 80 * MIB);
    assert_eq!(t.clients.len(), 2);

    // A third process does not fit in what the other two left.
    let mut c = Tenant::spawn(node.dir(), 0, 30 * MIB, 1, "nvos64");
    assert_eq!(c.allocated(), None);
    let out = c.finish();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0x51"),
        "NV_ERR_NO_MEMORY reported"
    );

    // Exiting without freeing releases everything (the control file's release frees the clients).
    assert!(a.finish().status.success());
    assert!(b.finish().status.success());
    eventually("the exited tenants' clients are freed", || {
        let t = read_ground_truth(node.dir()).unwrap();
        t.allocations.is_empty() && t.clients.is_empty() && t.gpus[0].used_bytes == 0
    });
}

#[test]
fn teardown_leaves_no_mount_and_no_process() {
    if !privileged_or_skip("teardown_leaves_no_mount_and_no_process") {
        return;
    }
    // The RAII guard, by stop() and by drop.
    let n = node(1, 16);
    let dir = n.dir().to_path_buf();
    assert!(is_mounted(&dir));
    n.stop().unwrap();
    assert!(!is_mounted(&dir) && !dir.exists());
    let n = node(1, 16);
    let dir = n.dir().to_path_buf();
    drop(n);
    assert!(!is_mounted(&dir) && !dir.exists());

    // A tenant still holding nvidiactl open does not block teardown: the mount leaves at once.
    let n = node(1, 16);
    let dir = n.dir().to_path_buf();
    let mut t = Tenant::spawn(&dir, 0, MIB, 1, "nvos21");
    assert!(t.allocated().is_some());
    n.stop().unwrap();
    assert!(!is_mounted(&dir) && !dir.exists());
    assert!(t.finish().status.success());

    // The CLI: serve until SIGTERM, then unmount and exit 0.
    let dir = std::env::temp_dir().join(format!("hami-fake-node-cli-{}", me()));
    let mut serve = Command::new(env!("CARGO_BIN_EXE_hami-fake-node"))
        .args(["serve", "--gpus", "1", "--memory-mib", "16", "--mount"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "{line}");
    assert!(is_mounted(&dir));
    let c = RmClient::open(&dir).unwrap();
    c.alloc_vidmem(c.alloc_device(0).unwrap(), MIB, AllocVia::Nvos21)
        .unwrap();
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success());
    assert!(!is_mounted(&dir) && !dir.exists());
}
