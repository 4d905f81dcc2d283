//! `libvgpu.so` preloaded into real tenant processes on the simulated GPU node: limits shared by every
//! process of a container, every allocation API counted, `cuGetProcAddress`-resolved calls hooked,
//! the limit reported as the total, and nothing leaked on a refusal (ground truth from the node).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use hami_fake_gpu::node::privileged_or_skip;
use hami_fake_gpu::{DeviceModel, FakeNode};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn find(t: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| t.join(n)).find(|p| p.exists())
}

/// (workload, fake libcuda, libvgpu). They are (re)built once per test run: `cargo test` builds a
/// cdylib only as a by-product, so a copy left from an earlier build could otherwise be stale.
fn artifacts() -> (PathBuf, PathBuf, PathBuf) {
    static BUILT: std::sync::OnceLock<(PathBuf, PathBuf, PathBuf)> = std::sync::OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> (PathBuf, PathBuf, PathBuf) {
    let t = target_dir();
    let all = |t: &Path| {
        Some((
            find(t, &["hami-cuda-workload"])?,
            find(t, &["deps/libcuda.so", "libcuda.so"])?,
            find(t, &["libvgpu.so", "deps/libvgpu.so"])?,
        ))
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "hami-fake-cuda",
        "-p",
        "hami-fake-nvml",
        "-p",
        "hami-interceptor",
    ]);
    if t.ends_with("release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().is_ok_and(|s| s.success()),
        "building the test doubles failed"
    );
    all(&t).expect("workload, libcuda.so and libvgpu.so after building")
}

struct Env {
    node: FakeNode,
    dir: PathBuf,
    workload: PathBuf,
    libvgpu: PathBuf,
    /// Declared last: fields drop in order, so the directory goes after the node is unmounted.
    _scratch: Scratch,
}

/// Removes a directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Env {
    fn new(test: &str, memory_mib: u64) -> Option<Self> {
        Self::with_gpus(test, 1, memory_mib)
    }

    /// A node of `gpus` GPUs of `memory_mib` each.
    fn with_gpus(test: &str, gpus: u32, memory_mib: u64) -> Option<Self> {
        if !privileged_or_skip(test) {
            return None;
        }
        let (workload, libcuda, libvgpu) = artifacts();
        let dir = std::env::temp_dir().join(format!("hami-vgpu-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("lib")).expect("scratch dir");
        std::fs::copy(&libcuda, dir.join("lib/libcuda.so.1")).expect("copying the fake libcuda");
        let node = FakeNode::start(&dir.join("node"), DeviceModel::uniform(gpus, memory_mib)).expect("node");
        Some(Self {
            node,
            _scratch: Scratch(dir.clone()),
            dir,
            workload,
            libvgpu,
        })
    }

    fn region(&self) -> PathBuf {
        self.dir.join("container.cache")
    }

    /// `program` on the simulated node (its fake libcuda on the library path), with libvgpu.so
    /// preloaded when `preload`, and `region` as `CUDA_DEVICE_MEMORY_SHARED_CACHE` when given.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>, preload: bool, region: Option<&Path>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("HAMI_FAKE_GPU_DIR", self.node.dir())
            .env("LD_LIBRARY_PATH", self.dir.join("lib"))
            .env("RUST_BACKTRACE", "0");
        if preload {
            cmd.env("LD_PRELOAD", &self.libvgpu);
        }
        if let Some(r) = region {
            cmd.env("CUDA_DEVICE_MEMORY_SHARED_CACHE", r);
        }
        cmd
    }

    /// A tenant with the library preloaded and the container's variables plus `env`.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)], preload: bool) -> Child {
        let region = self.region();
        let mut cmd = self.command(&self.workload, preload, preload.then_some(region.as_path()));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.envs(env.iter().copied());
        cmd.spawn().expect("spawning the tenant")
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let child = self.spawn(args, env, true);
        child.wait_with_output().expect("tenant output")
    }
}

/// Reads the tenant's stdout up to the line starting with `prefix`.
fn line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().expect("stdout");
    let mut r = BufReader::new(out);
    let mut l = String::new();
    loop {
        l.clear();
        assert!(r.read_line(&mut l).expect("stdout") > 0, "no `{prefix}` line");
        if l.starts_with(prefix) {
            return l.trim_end().to_owned();
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn oom(o: &Output, call: &str) -> bool {
    !o.status.success() && String::from_utf8_lossy(&o.stderr).contains(&format!("{call} failed: CUresult 2"))
}

const LIMIT_1G: (&str, &str) = ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g");

#[test]
fn two_processes_of_one_container_share_the_limit_c13() {
    let Some(env) = Env::new("c13", 4096) else { return };
    let six = (600 * MIB).to_string();
    let mut a = env.spawn(&["--alloc", &six, "--hold"], &[LIMIT_1G], true);
    let info = line(&mut a, "meminfo");
    // cuMemGetInfo_v2 reports the limit as total, and what the container holds as used.
    assert_eq!(info, format!("meminfo free {} total {}", GIB - 600 * MIB, GIB));
    let b = env.run(&["--alloc", &six], &[LIMIT_1G]);
    assert!(oom(&b, "cuMemAlloc_v2"), "{}", text(&b));
    // Nothing reached the driver for B; A's 600 MiB is all the node holds.
    let t = env.node.ground_truth();
    assert_eq!(t.gpus[0].used_bytes, 600 * MIB);
    // A exits without freeing: its reservation is reclaimed and B's allocation now fits.
    drop(a.stdin.take());
    let _ = a.wait();
    let b = env.run(&["--alloc", &six, "--free"], &[LIMIT_1G]);
    assert!(b.status.success(), "{}", text(&b));
}

/// A process killed with SIGKILL (no exit handler runs) holds nothing in the region once the next
/// process of the container starts: its reservation is reclaimed when that process attaches, before
/// any allocation is refused.
#[test]
fn a_killed_process_is_reclaimed_when_the_next_one_starts() {
    let Some(env) = Env::new("sigkill", 4096) else {
        return;
    };
    let mut a = env.spawn(
        &["--alloc", &(600 * MIB).to_string(), "--hold"],
        &[LIMIT_1G],
        true,
    );
    line(&mut a, "meminfo");
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let b = env.run(&["--alloc", &MIB.to_string()], &[LIMIT_1G]);
    assert!(b.status.success(), "{}", text(&b));
    assert!(
        String::from_utf8_lossy(&b.stdout).contains(&format!("meminfo free {} total {GIB}", GIB - MIB)),
        "only B's 1 MiB is charged: {}",
        text(&b)
    );
}

#[test]
fn every_allocation_api_counts_against_the_limit() {
    let Some(env) = Env::new("apis", 4096) else { return };
    // 1 MiB + a 1024 x 1024 pitched block + 256 MiB managed + 512 MiB VMM = 770 MiB; the 256 MiB async
    // allocation then exceeds 1 GiB.
    let o = env.run(
        &[
            "--alloc",
            "1048576",
            "--pitch",
            "1024x1024",
            "--managed",
            &(256 * MIB).to_string(),
            "--vmm",
            &(512 * MIB).to_string(),
            "--async",
            &(256 * MIB).to_string(),
        ],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuMemAllocAsync"), "{}", text(&o));
    // Under the limit, the same sequence succeeds and frees everything.
    let o = env.run(
        &[
            "--alloc",
            "1048576",
            "--pitch",
            "1024x1024",
            "--managed",
            &(256 * MIB).to_string(),
            "--vmm",
            &(512 * MIB).to_string(),
            "--async",
            &(128 * MIB).to_string(),
            "--free",
        ],
        &[LIMIT_1G],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn get_proc_address_resolved_allocations_are_hooked() {
    let Some(env) = Env::new("procaddr", 4096) else {
        return;
    };
    let o = env.run(
        &["--proc-address", "--alloc", &(2 * GIB).to_string()],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
    let o = env.run(
        &["--proc-address", "--alloc", &(512 * MIB).to_string(), "--free"],
        &[LIMIT_1G],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_later_process_cannot_raise_the_limit_with_its_environment() {
    let Some(env) = Env::new("escape-env", 4096) else {
        return;
    };
    let mut a = env.spawn(&["--alloc", "1048576", "--hold"], &[LIMIT_1G], true);
    line(&mut a, "meminfo");
    let o = env.run(
        &["--alloc", &(2 * GIB).to_string()],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "3g")],
    );
    assert!(oom(&o, "cuMemAlloc_v2"), "the region's 1 GiB holds: {}", text(&o));
    drop(a.stdin.take());
    let _ = a.wait();
}

/// C27, limits from the environment only (no trusted file): process S (library preloaded, no limit
/// variable, like an SSH session) starts first and neither creates nor seeds the container's region;
/// its allocations wait for limits (refused). P then starts with `CUDA_DEVICE_MEMORY_LIMIT_0=1024m`
/// and creates the region, mode 0666 despite a umask of 077; P's 2 GiB fails with out-of-memory, S is
/// held to 1024 MiB, and a process asking for a looser limit gets the stricter one.
#[test]
fn c27_a_process_without_limits_never_seeds_an_unlimited_region() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(env) = Env::new("c27", 4096) else { return };
    let region = env.region();
    let s = env.run(&["--alloc", &MIB.to_string()], &[]);
    assert!(oom(&s, "cuMemAlloc_v2"), "S waits for limits: {}", text(&s));
    assert!(!region.exists(), "S created no region");
    // P creates the region under a umask that would make it private.
    let o = env
        .command("sh", true, Some(&region))
        .args(["-c", "umask 077; exec \"$0\" --alloc 2147483648"])
        .arg(&env.workload)
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "1024m")
        .output()
        .expect("tenant");
    assert!(oom(&o, "cuMemAlloc_v2"), "P is held to 1 GiB: {}", text(&o));
    let mode = std::fs::metadata(&region)
        .expect("P created the region")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "every user of the container can map it");
    // S again: 512 MiB fits, 2 GiB does not.
    let s = env.run(&["--alloc", &(512 * MIB).to_string(), "--free"], &[]);
    assert!(s.status.success(), "{}", text(&s));
    let s = env.run(&["--alloc", &(2 * GIB).to_string()], &[]);
    assert!(oom(&s, "cuMemAlloc_v2"), "S is held to 1 GiB: {}", text(&s));
    // A looser limit in the environment does not raise the region's; a stricter one holds.
    let o = env.run(
        &["--alloc", &(1536 * MIB).to_string()],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "2g")],
    );
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
    let o = env.run(
        &["--alloc", &(600 * MIB).to_string()],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "512m")],
    );
    assert!(
        oom(&o, "cuMemAlloc_v2"),
        "the stricter 512 MiB holds: {}",
        text(&o)
    );
    let s = env.run(&["--alloc", &(600 * MIB).to_string()], &[]);
    assert!(oom(&s, "cuMemAlloc_v2"), "and for later processes: {}", text(&s));
    assert_eq!(env.node.ground_truth().gpus[0].used_bytes, 0);
}

#[test]
fn bad_limits_fail_closed_and_no_configuration_passes_through() {
    let Some(env) = Env::new("policy", 4096) else {
        return;
    };
    // `4GB` is not a HAMi limit: refused, never read as unlimited or as 4 bytes.
    let o = env.run(&["--alloc", "1048576"], &[("CUDA_DEVICE_MEMORY_LIMIT_0", "4GB")]);
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
    // Without any vGPU variable the library only forwards.
    let mut c = env.spawn(&["--alloc", &(2 * GIB).to_string(), "--free"], &[], false);
    let _ = c.stdin.take();
    let mut cmd_out = String::new();
    let _ = std::io::Read::read_to_string(c.stdout.as_mut().expect("stdout"), &mut cmd_out);
    assert!(c.wait().expect("wait").success(), "{cmd_out}");
    let o = env
        .command(&env.workload, true, None)
        .args(["--alloc", &(2 * GIB).to_string(), "--free"])
        .output()
        .expect("tenant");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("total {}", 4096 * MIB)));
    let _ = std::io::stdout().flush();
}

#[test]
fn nvml_memory_queries_report_the_limit() {
    let Some(env) = Env::new("nvml", 4096) else { return };
    let t = target_dir();
    let nvml = find(&t, &["deps/libnvidia_ml.so", "libnvidia_ml.so"]).expect("fake NVML built");
    let probe = find(&t, &["hami-nvml-probe"]).expect("hami-nvml-probe built");
    let lib = env.dir.join("lib/libnvidia-ml.so.1");
    std::fs::copy(&nvml, &lib).expect("copying the fake NVML");
    // A tenant holds 100 MiB through CUDA, so "used" is the container's, not the card's.
    let mut a = env.spawn(
        &["--alloc", &(100 * MIB).to_string(), "--hold"],
        &[LIMIT_1G],
        true,
    );
    line(&mut a, "meminfo");
    let o = env
        .command(&probe, true, Some(&env.region()))
        .arg("probe")
        .arg(&lib)
        .output()
        .expect("probe");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.contains(&format!("nvml gpu 0 total {GIB}")), "{out}");
    assert!(out.contains(&format!("nvml gpu 0 used {}", 100 * MIB)), "{out}");
    assert!(
        out.contains(&format!("nvml gpu 0 free {}", GIB - 100 * MIB)),
        "{out}"
    );
    drop(a.stdin.take());
    let _ = a.wait();
}

/// Creates the container's region as the device plugin will: limits written, and `kernel_used` as the
/// agent would write it from the kernel's attribution.
fn prepare_region(path: &Path, limit: u64, kernel_used: u64) {
    let _map = map_region(path, limit, 0, kernel_used);
}

/// Creates and maps a region with `limit` bytes and `sm` percent on device 0; the mapping is returned
/// so the test can go on writing into it as the agent does.
fn map_region(path: &Path, limit: u64, sm: u32, kernel_used: u64) -> memmap2::MmapMut {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("region file");
    f.set_len(hami_api::region::REGION_SIZE as u64)
        .expect("sizing the region");
    #[allow(
        unsafe_code,
        reason = "mapping the shared region file, as the interceptor does"
    )]
    // SAFETY: a shared mapping of a file of REGION_SIZE bytes; Region is made of integer atomics.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(hami_api::region::REGION_SIZE)
            .map_mut(&f)
    }
    .expect("mmap");
    #[allow(unsafe_code, reason = "viewing the mapping as the region")]
    // SAFETY: page-aligned, REGION_SIZE long, any bytes are a valid Region; the mapping outlives `r`.
    let r = unsafe { &*map.as_ptr().cast::<hami_api::region::Region>() };
    r.init(&[limit], &[sm]);
    r.set_kernel_used(0, kernel_used, 1);
    map
}

#[test]
fn meminfo_never_fails_or_wraps_when_usage_exceeds_the_limit_c10() {
    let Some(env) = Env::new("c10", 4096) else { return };
    // (a) A limit above the physical memory reports the physical total.
    let o = env.run(
        &["--alloc", "1048576", "--free"],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "8g")],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.contains(&format!("device 0 total {}", 4096 * MIB)), "{out}");
    assert!(out.contains(&format!("total {}", 4096 * MIB)), "{out}");
    // (b) The kernel saw 500 MiB (context memory, raw ioctls) against a 400 MiB limit: the query still
    // succeeds, free is 0 and total is the limit; a new allocation is refused.
    let region = env.dir.join("c10.cache");
    prepare_region(&region, 400 * MIB, 500 * MIB);
    let run = |args: &[&str]| {
        env.command(&env.workload, true, Some(&region))
            .args(args)
            .output()
            .expect("tenant")
    };
    let o = run(&[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out.contains(&format!("meminfo free 0 total {}", 400 * MIB)),
        "{out}"
    );
    let o = run(&["--alloc", "1048576"]);
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
}

/// SM utilisation (percent) of `pid` on GPU 0 between two ground-truth readings `window` apart, while
/// the tenant keeps launching.
fn measured_utilisation(
    env: &Env,
    pid: u32,
    settle: std::time::Duration,
    window: std::time::Duration,
) -> f64 {
    std::thread::sleep(settle);
    let [u] = utilisations(env, &[(0, pid)], window);
    u
}

/// SM utilisation (percent) of each (GPU, pid) between two ground-truth readings `window` apart.
fn utilisations<const N: usize>(env: &Env, of: &[(usize, u32); N], window: std::time::Duration) -> [f64; N] {
    let sm = || {
        let t = env.node.ground_truth();
        of.map(|(gpu, pid)| t.gpus[gpu].sm_seconds_by_pid.get(&pid).copied().unwrap_or(0.0))
    };
    let (t0, s0) = (std::time::Instant::now(), sm());
    std::thread::sleep(window);
    let (t1, s1) = (std::time::Instant::now(), sm());
    let secs = (t1 - t0).as_secs_f64();
    std::array::from_fn(|i| 100.0 * (s1[i] - s0[i]) / secs)
}

#[test]
fn the_ptsz_twins_are_held_to_the_memory_and_sm_limits() {
    // Code built with `--default-stream per-thread` calls cuMemAllocAsync_ptsz,
    // cuMemAllocFromPoolAsync_ptsz and cuLaunchKernel_ptsz: the same limits apply.
    let Some(env) = Env::new("ptsz", 4096) else {
        return;
    };
    let o = env.run(
        &[
            "--ptsz",
            "--async",
            &(768 * MIB).to_string(),
            "--async",
            &(512 * MIB).to_string(),
        ],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuMemAllocAsync"), "{}", text(&o));
    let o = env.run(
        &[
            "--ptsz",
            "--pool",
            &(768 * MIB).to_string(),
            "--pool",
            &(512 * MIB).to_string(),
        ],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuMemAllocFromPoolAsync"), "{}", text(&o));
    let t = target_dir();
    let nvml = find(&t, &["deps/libnvidia_ml.so", "libnvidia_ml.so"]).expect("fake NVML built");
    std::fs::copy(&nvml, env.dir.join("lib/libnvidia-ml.so.1")).expect("copying the fake NVML");
    let load = ["--ptsz", "--launch-for-ms", "3500", "--grid", "132"];
    let kernel = ("HAMI_FAKE_CUDA_KERNEL_US", "5000");
    let limited = env.spawn(&load, &[kernel, LIMIT_1G, ("CUDA_DEVICE_SM_LIMIT", "30")], true);
    let pid = limited.id();
    let u = measured_utilisation(
        &env,
        pid,
        std::time::Duration::from_millis(1500),
        std::time::Duration::from_millis(1500),
    );
    let out = limited.wait_with_output().expect("tenant");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        (u - 30.0).abs() <= 5.0,
        "utilisation {u:.1} % with a 30 % SM limit, launching with cuLaunchKernel_ptsz"
    );
}

#[test]
fn the_sm_limit_holds_utilisation_near_the_target() {
    let Some(env) = Env::new("sm-limit", 4096) else {
        return;
    };
    let t = target_dir();
    let nvml = find(&t, &["deps/libnvidia_ml.so", "libnvidia_ml.so"]).expect("fake NVML built");
    std::fs::copy(&nvml, env.dir.join("lib/libnvidia-ml.so.1")).expect("copying the fake NVML");
    let load = ["--launch-for-ms", "3500", "--grid", "132"];
    let kernel = ("HAMI_FAKE_CUDA_KERNEL_US", "5000");
    // Unlimited, the steady load keeps the GPU busy.
    let mut free_run = env.spawn(&load, &[kernel], false);
    let pid = free_run.id();
    let u = measured_utilisation(
        &env,
        pid,
        std::time::Duration::from_millis(1000),
        std::time::Duration::from_millis(1500),
    );
    let _ = free_run.wait();
    assert!(u > 80.0, "unthrottled utilisation {u:.1} %");
    // With gpucores 30, the controller brings it to 30 ± 5 after converging.
    let limited = env.spawn(&load, &[kernel, LIMIT_1G, ("CUDA_DEVICE_SM_LIMIT", "30")], true);
    let pid = limited.id();
    let u = measured_utilisation(
        &env,
        pid,
        std::time::Duration::from_millis(1500),
        std::time::Duration::from_millis(1500),
    );
    let out = limited.wait_with_output().expect("tenant");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        (u - 30.0).abs() <= 5.0,
        "utilisation {u:.1} % with a 30 % SM limit"
    );
}

#[test]
fn pool_and_array_allocations_count_c11() {
    let Some(env) = Env::new("pools", 4096) else {
        return;
    };
    // C11: 768 MiB then 512 MiB from an explicit pool against 1 GiB: the second is refused.
    let o = env.run(
        &[
            "--pool",
            &(768 * MIB).to_string(),
            "--pool",
            &(512 * MIB).to_string(),
        ],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuMemAllocFromPoolAsync"), "{}", text(&o));
    // Within the limit both succeed and cuMemFreeAsync returns CUDA_SUCCESS for them.
    let o = env.run(
        &[
            "--pool",
            &(768 * MIB).to_string(),
            "--pool",
            &(128 * MIB).to_string(),
            "--free",
        ],
        &[LIMIT_1G],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Arrays are device memory too: 1000 MiB + a 4096 x 4096 float4 array (256 MiB) exceed 1 GiB.
    let o = env.run(
        &["--alloc", &(1000 * MIB).to_string(), "--array", "4096x4096"],
        &[LIMIT_1G],
    );
    assert!(oom(&o, "cuArrayCreate_v2"), "{}", text(&o));
    let o = env.run(
        &[
            "--alloc",
            &(512 * MIB).to_string(),
            "--array",
            "4096x4096",
            "--free",
        ],
        &[LIMIT_1G],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        env.node.ground_truth().gpus[0].used_bytes,
        0,
        "everything was freed"
    );
}

#[test]
fn threads_allocating_concurrently_never_exceed_the_limit() {
    let Some(env) = Env::new("threads", 4096) else {
        return;
    };
    // Eight threads, 100 alloc/free cycles each, then each holds 3 MiB blocks until refused: exactly 33
    // blocks (99 MiB) fit in 100 MiB, whatever the interleaving.
    let mut w = env.spawn(
        &[
            "--threads",
            "8",
            "--thread-bytes",
            &(3 * MIB).to_string(),
            "--hold",
        ],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "100m")],
        true,
    );
    let held = line(&mut w, "threads held");
    assert_eq!(held, format!("threads held {}", 99 * MIB));
    assert_eq!(
        env.node.ground_truth().gpus[0].used_bytes,
        99 * MIB,
        "the driver holds what was reserved"
    );
    drop(w.stdin.take());
    let _ = w.wait();
}

#[test]
fn fork_and_exec_keep_the_limit() {
    let Some(env) = Env::new("fork-exec", 4096) else {
        return;
    };
    // A tenant holds 600 MiB; a shell (fork + exec) started with the container's environment runs a
    // second tenant, which still shares the 1 GiB limit.
    let six = (600 * MIB).to_string();
    let mut a = env.spawn(&["--alloc", &six, "--hold"], &[LIMIT_1G], true);
    line(&mut a, "meminfo");
    let o = env
        .command("sh", true, Some(&env.region()))
        .arg("-c")
        .arg("\"$0\" --alloc \"$1\"; exit $?")
        .arg(&env.workload)
        .arg(&six)
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "1g")
        .output()
        .expect("sh");
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
    drop(a.stdin.take());
    let _ = a.wait();
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    #[allow(unsafe_code, reason = "clock_gettime with a valid out-pointer")]
    // SAFETY: a valid out-pointer.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts)
    };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[test]
fn the_sm_limiter_follows_the_agents_utilisation_without_nvml() {
    // No NVML in the container (the library is not on its path): the limiter must use what the agent
    // writes into the region. This test plays the agent: every 250 ms it writes the tenant's measured
    // utilisation (from the node's ground truth) with a fresh timestamp.
    let Some(env) = Env::new("sm-agent", 4096) else {
        return;
    };
    let region = env.dir.join("sm.cache");
    let map = map_region(&region, GIB, 30, 0);
    #[allow(unsafe_code, reason = "viewing the test's own mapping as the region")]
    // SAFETY: page-aligned, REGION_SIZE long, integer atomics only; `map` outlives the reference.
    let r = unsafe { &*map.as_ptr().cast::<hami_api::region::Region>() };
    let mut cmd = env.command(&env.workload, true, Some(&region));
    cmd.args(["--launch-for-ms", "4000", "--grid", "132"])
        .env("HAMI_FAKE_CUDA_KERNEL_US", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("tenant");
    let pid = child.id();
    let sm = || {
        env.node.ground_truth().gpus[0]
            .sm_seconds_by_pid
            .get(&pid)
            .copied()
            .unwrap_or(0.0)
    };
    let start = std::time::Instant::now();
    let (mut last_t, mut last_s) = (std::time::Instant::now(), sm());
    let mut window = Vec::new();
    while start.elapsed() < std::time::Duration::from_millis(3800) {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let (t, s) = (std::time::Instant::now(), sm());
        let u = 100.0 * (s - last_s) / (t - last_t).as_secs_f64();
        (last_t, last_s) = (t, s);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0..=100")]
        r.header.kernel_sm_percent[0].store(
            u.round().clamp(0.0, 100.0) as u32,
            std::sync::atomic::Ordering::Release,
        );
        r.header
            .kernel_updated_ns
            .store(monotonic_ns(), std::sync::atomic::Ordering::Release);
        if start.elapsed() > std::time::Duration::from_millis(2300) {
            window.push(u);
        }
    }
    let out = child.wait_with_output().expect("tenant");
    assert!(out.status.success(), "{}", text(&out));
    let mean = window.iter().sum::<f64>() / window.len().max(1) as f64;
    assert!(
        (mean - 30.0).abs() <= 5.0,
        "utilisation {mean:.1} % (windows {window:?}) with a 30 % limit fed by the agent"
    );
}

#[test]
fn the_trusted_region_wins_over_the_tenants_environment() {
    // The device plugin's region (1 GiB) is mounted at /usr/local/vgpu; the tenant points
    // CUDA_DEVICE_MEMORY_SHARED_CACHE at a file of its own with a 100 GiB limit. The tenant runs in a
    // private mount namespace where /usr/local is a tmpfs holding that mount (the host is not touched).
    let Some(env) = Env::new("trusted", 4096) else {
        return;
    };
    let trusted = env.dir.join("trusted");
    std::fs::create_dir_all(&trusted).unwrap();
    prepare_region(&trusted.join("vgpu.cache"), GIB, 0);
    let evil = env.dir.join("evil.cache");
    let script = format!(
        "mount -t tmpfs none /usr/local && mkdir /usr/local/vgpu && mount --bind '{}' /usr/local/vgpu && exec \"$0\" --alloc {}",
        trusted.display(),
        2 * GIB
    );
    let o = env
        .command("unshare", true, Some(&evil))
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .arg(&env.workload)
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "100g")
        .output()
        .expect("unshare");
    assert!(
        oom(&o, "cuMemAlloc_v2"),
        "the trusted 1 GiB limit holds: {}",
        text(&o)
    );
    assert!(!evil.exists(), "the tenant's own region was never created");
}

/// Writes a trusted limits file as the device plugin does at Allocate (mode 0444): `devices` are
/// (UUID, bytes) in container order, without SM limits.
fn write_trusted(path: &Path, devices: &[(&str, u64)], policy: hami_api::region::RegionFailure) {
    let with_sm: Vec<(&str, u64, u32)> = devices.iter().map(|&(u, b)| (u, b, 0)).collect();
    write_trusted_sm(path, &with_sm, policy);
}

/// [`write_trusted`] with an SM limit per device: (UUID, bytes, percent).
fn write_trusted_sm(path: &Path, devices: &[(&str, u64, u32)], policy: hami_api::region::RegionFailure) {
    use std::os::unix::fs::PermissionsExt as _;
    let t = hami_api::region::TrustedLimits {
        version: hami_api::region::LIMITS_VERSION,
        devices: devices
            .iter()
            .map(|(uuid, bytes, sm)| hami_api::region::DeviceLimit {
                uuid: (*uuid).to_owned(),
                memory_bytes: *bytes,
                sm_percent: *sm,
            })
            .collect(),
        on_region_error: policy,
        priority: hami_api::region::PRIORITY_LOW,
    };
    std::fs::write(path, t.to_json()).expect("limits file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).expect("chmod 0444");
}

/// `script` (sh; the workload is `$0`) with the library preloaded, as a container sees the device
/// plugin's mounts: in a private mount namespace, `/usr/local` is a tmpfs holding `/usr/local/vgpu` =
/// `region_dir` (read-write bind; `None`: no region directory, and `/usr/local` is read-only, so no
/// region can be created) and `/usr/local/vgpu/limits` = `limits` (read-only bind). The host's
/// mounts are not touched. The environment also points `CUDA_DEVICE_MEMORY_SHARED_CACHE` at a file of
/// the tenant's (`evil.cache`), which must never be used.
fn in_container(env: &Env, region_dir: Option<&Path>, limits: &Path, script: &str) -> Command {
    let setup = format!(
        "set -e; mount -t tmpfs none /usr/local; mkdir /usr/local/vgpu; {bind} touch /usr/local/vgpu/limits; \
         mount --bind '{limits}' /usr/local/vgpu/limits; mount -o remount,bind,ro /usr/local/vgpu/limits; {ro} set +e; ",
        bind = region_dir.map_or(String::new(), |d| format!(
            "mount --bind '{}' /usr/local/vgpu;",
            d.display()
        )),
        limits = limits.display(),
        ro = if region_dir.is_none() {
            "mount -o remount,ro /usr/local;"
        } else {
            ""
        },
    );
    let mut cmd = env.command("unshare", true, Some(&env.dir.join("evil.cache")));
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup}{script}"))
        .arg(&env.workload);
    cmd
}

fn gpu_uuid(env: &Env, gpu: usize) -> String {
    env.node.ground_truth().gpus[gpu].uuid.clone()
}

#[test]
fn a_tenant_that_rewrites_the_region_header_still_gets_oom_at_the_trusted_limit() {
    // The container's trusted limit is 1 GiB. Its region exists, and the tenant (root in its container)
    // has rewritten the header's limit to 100 GiB and asks for 100 GiB in its environment. It cannot
    // change or remove the read-only limits file, and its allocations stop at 1 GiB.
    let Some(env) = Env::new("header-scribble", 4096) else {
        return;
    };
    let regions = env.dir.join("regions");
    let dir = regions.join("pod_main");
    std::fs::create_dir_all(&dir).unwrap();
    let map = map_region(&dir.join("vgpu.cache"), 100 * GIB, 0, 0);
    let limits = regions.join("pod_main.limits");
    write_trusted(
        &limits,
        &[(&gpu_uuid(&env, 0), GIB)],
        hami_api::region::RegionFailure::Closed,
    );
    let o = in_container(
        &env,
        Some(&dir),
        &limits,
        "if echo '{}' > /usr/local/vgpu/limits 2>/dev/null; then echo limits-written; fi; \
         if rm -f /usr/local/vgpu/limits 2>/dev/null; then echo limits-removed; fi; \
         \"$0\" --alloc 536870912 --free || exit 3; exec \"$0\" --alloc 2147483648",
    )
    .env("CUDA_DEVICE_MEMORY_LIMIT_0", "100g")
    .env("HAMI_VGPU_LOG", "1")
    .output()
    .expect("tenant");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        !out.contains("limits-written") && !out.contains("limits-removed"),
        "{}",
        text(&o)
    );
    assert!(out.contains("freed"), "512 MiB fits in 1 GiB: {}", text(&o));
    assert!(oom(&o, "cuMemAlloc_v2"), "the trusted 1 GiB holds: {}", text(&o));
    assert!(err.contains("the file wins"), "the disagreement is logged: {err}");
    assert!(
        out.contains(&format!("device 0 total {GIB}")),
        "the trusted limit is the total: {out}"
    );
    assert!(
        !env.dir.join("evil.cache").exists(),
        "the environment's region is never used"
    );
    #[allow(unsafe_code, reason = "viewing the test's own mapping as the region")]
    // SAFETY: page-aligned, REGION_SIZE long, integer atomics only; `map` outlives the reference.
    let r = unsafe { &*map.as_ptr().cast::<hami_api::region::Region>() };
    assert_eq!(r.used(0), 0, "the shared region was used, and returned to 0");
    assert_eq!(env.node.ground_truth().gpus[0].used_bytes, 0);
}

/// C29: a trusted limit of 0 bytes holds the container to nothing: every allocation is refused
/// before the driver, and the device reports 0 bytes total; it is never read as "unlimited".
#[test]
fn c29_a_zero_trusted_limit_refuses_every_allocation() {
    let Some(env) = Env::new("c29-zero", 4096) else {
        return;
    };
    let regions = env.dir.join("regions");
    let dir = regions.join("pod_main");
    std::fs::create_dir_all(&dir).unwrap();
    let limits = regions.join("pod_main.limits");
    write_trusted(
        &limits,
        &[(&gpu_uuid(&env, 0), 0)],
        hami_api::region::RegionFailure::Closed,
    );
    let o = in_container(
        &env,
        Some(&dir),
        &limits,
        "\"$0\" --alloc 1048576; echo \"small=$?\"; exec \"$0\" --alloc 1",
    )
    .output()
    .expect("tenant");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("small=1"), "{}", text(&o));
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
    assert!(
        out.contains("device 0 total 0"),
        "the limit is the total: {}",
        text(&o)
    );
    assert_eq!(
        env.node.ground_truth().gpus[0].used_bytes,
        0,
        "nothing reached the driver"
    );
}

#[test]
fn without_a_usable_region_the_operators_policy_fails_closed_or_open() {
    use hami_api::region::RegionFailure;
    let Some(env) = Env::new("fail-policy", 4096) else {
        return;
    };
    let script =
        "\"$0\" --alloc 1048576 --free; echo \"small=$?\"; \"$0\" --alloc 2147483648; echo \"big=$?\"";
    for policy in [RegionFailure::Closed, RegionFailure::Open] {
        let limits = env.dir.join(format!("{policy:?}.limits"));
        write_trusted(&limits, &[(&gpu_uuid(&env, 0), GIB)], policy);
        let o = in_container(&env, None, &limits, script)
            .output()
            .expect("tenant");
        let out = String::from_utf8_lossy(&o.stdout);
        let refusals = String::from_utf8_lossy(&o.stderr)
            .matches("cuMemAlloc_v2 failed: CUresult 2")
            .count();
        match policy {
            // Closed: even 1 MiB is refused, without reaching the driver.
            RegionFailure::Closed => {
                assert!(out.contains("small=1") && out.contains("big=1"), "{}", text(&o));
                assert_eq!(refusals, 2, "{}", text(&o));
            }
            // Open: the process runs, and still holds itself to the trusted 1 GiB.
            RegionFailure::Open => {
                assert!(out.contains("freed") && out.contains("small=0"), "{}", text(&o));
                assert!(out.contains("big=1"), "{}", text(&o));
                assert_eq!(refusals, 1, "{}", text(&o));
            }
        }
        assert_eq!(env.node.ground_truth().gpus[0].used_bytes, 0);
    }
    // A trusted limits file that cannot be read fails closed whatever it would have said.
    let bad = env.dir.join("bad.limits");
    std::fs::write(
        &bad,
        "{\"version\":1,\"devices\":[],\"on_region_error\":\"sometimes\"}",
    )
    .unwrap();
    let dir = env.dir.join("bad-region");
    std::fs::create_dir_all(&dir).unwrap();
    let o = in_container(&env, Some(&dir), &bad, "exec \"$0\" --alloc 1048576")
        .output()
        .expect("tenant");
    assert!(oom(&o, "cuMemAlloc_v2"), "{}", text(&o));
}

/// C23: a two-GPU container (two tensor-parallel ranks, one per GPU, both launching steadily) with
/// SM limits of 30 % on GPU 0 and 60 % on GPU 1: each GPU's utilisation converges to its own limit
/// (the single-GPU tolerance, ±5), measured from the node's ground truth, whatever the other GPU does.
#[test]
fn c23_each_gpu_of_a_container_is_throttled_to_its_own_limit() {
    let Some(env) = Env::with_gpus("c23", 2, 4096) else {
        return;
    };
    let t = target_dir();
    let nvml = find(&t, &["deps/libnvidia_ml.so", "libnvidia_ml.so"]).expect("fake NVML built");
    std::fs::copy(&nvml, env.dir.join("lib/libnvidia-ml.so.1")).expect("copying the fake NVML");
    let regions = env.dir.join("regions");
    let dir = regions.join("pod_main");
    std::fs::create_dir_all(&dir).unwrap();
    let limits = regions.join("pod_main.limits");
    write_trusted_sm(
        &limits,
        &[(&gpu_uuid(&env, 0), GIB, 30), (&gpu_uuid(&env, 1), GIB, 60)],
        hami_api::region::RegionFailure::Closed,
    );
    let rank = |dev: &str| {
        in_container(
            &env,
            Some(&dir),
            &limits,
            &format!("exec \"$0\" --device {dev} --launch-for-ms 4500 --grid 132"),
        )
        .env("HAMI_FAKE_CUDA_KERNEL_US", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rank")
    };
    let (r0, r1) = (rank("0"), rank("1"));
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let [u0, u1] = utilisations(
        &env,
        &[(0, r0.id()), (1, r1.id())],
        std::time::Duration::from_millis(2000),
    );
    let (o0, o1) = (
        r0.wait_with_output().expect("rank 0"),
        r1.wait_with_output().expect("rank 1"),
    );
    assert!(
        o0.status.success() && o1.status.success(),
        "{}\n{}",
        text(&o0),
        text(&o1)
    );
    assert!(
        (u0 - 30.0).abs() <= 5.0 && (u1 - 60.0).abs() <= 5.0,
        "GPU 0 {u0:.1} % (limit 30), GPU 1 {u1:.1} % (limit 60)"
    );
}

#[test]
fn a_two_gpu_container_gets_each_limit_on_its_own_gpu_by_uuid() {
    // The node has three GPUs; the container holds GPU 2 (1 GiB) and GPU 0 (2 GiB), in that order (the
    // device plugin's `NVIDIA_VISIBLE_DEVICES` order). CUDA numbers GPUs in its own order, so the
    // interceptor finds each device's limit by UUID: ordinal 0 (GPU 0) gets 2 GiB, ordinal 2 (GPU 2)
    // 1 GiB, and GPU 1 is not the container's.
    let Some(env) = Env::with_gpus("multi-gpu", 3, 4096) else {
        return;
    };
    let regions = env.dir.join("regions");
    let dir = regions.join("pod_main");
    std::fs::create_dir_all(&dir).unwrap();
    let limits = regions.join("pod_main.limits");
    let (g0, g2) = (gpu_uuid(&env, 0), gpu_uuid(&env, 2));
    write_trusted(
        &limits,
        &[(&g2, GIB), (&g0, 2 * GIB)],
        hami_api::region::RegionFailure::Closed,
    );
    let o = in_container(
        &env,
        Some(&dir),
        &limits,
        "\"$0\" --device 0 --alloc 1610612736 --free; echo \"gpu0=$?\"; \
         \"$0\" --device 2 --alloc 1610612736; echo \"gpu2-big=$?\"; \
         \"$0\" --device 2 --alloc 536870912 --free; echo \"gpu2=$?\"; \
         \"$0\" --device 1 --alloc 1048576; echo \"gpu1=$?\"",
    )
    .output()
    .expect("tenant");
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["gpu0=0", "gpu2-big=1", "gpu2=0", "gpu1=1"] {
        assert!(out.contains(want), "{want}: {}", text(&o));
    }
    assert!(
        out.contains(&format!(
            "meminfo free {} total {}",
            2 * GIB - 1536 * MIB,
            2 * GIB
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("meminfo free {} total {GIB}", GIB - 512 * MIB)),
        "{out}"
    );
    // Two tenants hold memory on each GPU: the shared region counts GPU 2 as container device 0 and
    // GPU 0 as device 1, as the node does.
    let hold = |dev: &str, bytes: u64| {
        let mut c = in_container(
            &env,
            Some(&dir),
            &limits,
            &format!("exec \"$0\" --device {dev} --alloc {bytes} --hold"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tenant");
        line(&mut c, "meminfo");
        c
    };
    let mut a = hold("0", GIB);
    let mut b = hold("2", 256 * MIB);
    let f = std::fs::File::open(dir.join("vgpu.cache")).expect("the region the tenants made");
    #[allow(unsafe_code, reason = "mapping the region read-only, as a monitor would")]
    // SAFETY: a shared read-only mapping of a REGION_SIZE file; Region is made of integer atomics.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(hami_api::region::REGION_SIZE)
            .map(&f)
    }
    .expect("mmap");
    #[allow(unsafe_code, reason = "viewing the mapping as the region")]
    // SAFETY: page-aligned, REGION_SIZE long, any bytes are a valid Region; `map` outlives `r`.
    let r = unsafe { &*map.as_ptr().cast::<hami_api::region::Region>() };
    assert_eq!((r.used(0), r.used(1)), (256 * MIB, GIB));
    assert_eq!(
        (r.limit(0), r.limit(1)),
        (GIB, 2 * GIB),
        "the header mirrors the trusted file"
    );
    let t = env.node.ground_truth();
    assert_eq!(
        (t.gpus[0].used_bytes, t.gpus[1].used_bytes, t.gpus[2].used_bytes),
        (GIB, 0, 256 * MIB)
    );
    // NVML, which numbers GPUs by host index here, reports each GPU's own limit.
    let tdir = target_dir();
    let nvml = find(&tdir, &["deps/libnvidia_ml.so", "libnvidia_ml.so"]).expect("fake NVML built");
    let probe = find(&tdir, &["hami-nvml-probe"]).expect("hami-nvml-probe built");
    let lib = env.dir.join("lib/libnvidia-ml.so.1");
    std::fs::copy(&nvml, &lib).expect("copying the fake NVML");
    let o = in_container(&env, Some(&dir), &limits, "exec \"$1\" probe \"$2\"")
        .arg(&probe)
        .arg(&lib)
        .output()
        .expect("probe");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.contains(&format!("nvml gpu 0 total {}", 2 * GIB)), "{out}");
    assert!(out.contains(&format!("nvml gpu 0 used {GIB}")), "{out}");
    assert!(
        out.contains(&format!("nvml gpu 1 total {}", 4096 * MIB)),
        "not the container's: {out}"
    );
    assert!(out.contains(&format!("nvml gpu 2 total {GIB}")), "{out}");
    assert!(out.contains(&format!("nvml gpu 2 used {}", 256 * MIB)), "{out}");
    drop(a.stdin.take());
    drop(b.stdin.take());
    let _ = (a.wait(), b.wait());
}

#[test]
fn host_located_vmm_allocations_are_not_charged_and_device_ones_are_c12() {
    let Some(env) = Env::new("c12", 4096) else { return };
    let limit = ("CUDA_DEVICE_MEMORY_LIMIT_0", "100m");
    // 512 MiB of host memory and 64 MiB of device memory through cuMemCreate: only the 64 MiB count.
    let mut a = env.spawn(
        &[
            "--vmm-host",
            &(512 * MIB).to_string(),
            "--vmm",
            &(64 * MIB).to_string(),
            "--hold",
        ],
        &[limit],
        true,
    );
    let info = line(&mut a, "meminfo");
    assert_eq!(info, format!("meminfo free {} total {}", 36 * MIB, 100 * MIB));
    assert_eq!(env.node.ground_truth().gpus[0].used_bytes, 64 * MIB);
    // A second 64 MiB on the device exceeds 100 MiB; more host memory does not.
    let o = env.run(&["--vmm", &(64 * MIB).to_string()], &[limit]);
    assert!(oom(&o, "cuMemCreate"), "{}", text(&o));
    let o = env.run(&["--vmm-host", &(256 * MIB).to_string(), "--free"], &[limit]);
    assert!(o.status.success(), "{}", text(&o));
    drop(a.stdin.take());
    let _ = a.wait();
    // The driver frees at the release of the exited process's control file, which FUSE delivers
    // asynchronously after the exit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env.node.ground_truth().gpus[0].used_bytes != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(env.node.ground_truth().gpus[0].used_bytes, 0);
}

#[test]
fn a_tenant_that_clears_ld_preload_is_still_intercepted_through_ld_so_preload() {
    // The device plugin mounts /etc/ld.so.preload naming the library; a tenant that unsets LD_PRELOAD
    // is still intercepted. In a private mount namespace, /etc is an overlay whose upper layer holds
    // the preload file (the host's /etc is not touched).
    let Some(env) = Env::new("ld-so-preload", 4096) else {
        return;
    };
    let host_had = Path::new("/etc/ld.so.preload").exists();
    let (upper, work) = (env.dir.join("etc-upper"), env.dir.join("etc-work"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let run = |preload_file: bool| {
        let write = if preload_file {
            format!("echo '{}' > /etc/ld.so.preload; ", env.libvgpu.display())
        } else {
            String::new()
        };
        let script = format!(
            "set -e; mount -t overlay overlay -o lowerdir=/etc,upperdir='{}',workdir='{}' /etc; {write}\
             unset LD_PRELOAD; exec \"$0\" --alloc {}",
            upper.display(),
            work.display(),
            2 * GIB
        );
        env.command("unshare", false, Some(&env.region()))
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .arg(&env.workload)
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "1g")
            .output()
            .expect("tenant")
    };
    let o = run(false);
    assert!(
        o.status.success(),
        "without the library 2 GiB fit on the 4 GiB GPU: {}",
        text(&o)
    );
    let _ = std::fs::remove_file(upper.join("ld.so.preload"));
    let o = run(true);
    assert!(
        oom(&o, "cuMemAlloc_v2"),
        "the preload file loads the library: {}",
        text(&o)
    );
    assert_eq!(
        Path::new("/etc/ld.so.preload").exists(),
        host_had,
        "the host's /etc is untouched"
    );
}
