//! `hami-cuda-workload`: a tiny CUDA driver API tenant. It loads `libcuda.so.1` at run time with
//! `dlopen` (as real applications and runtimes do), creates a context, allocates device memory through
//! the driver API's allocation families (and, optionally, with raw RM ioctls that bypass libcuda),
//! prints what it did, optionally waits for a line on stdin, and exits (freeing first only with
//! `--free` / `--raw-free`).
//!
//! Order of work: `cuMemAlloc_v2` (`--alloc`), `cuMemAllocPitch_v2` (`--pitch`), `cuMemAllocManaged`
//! (`--managed`), VMM (`--vmm`), `cuMemAllocAsync` (`--async`), raw RM allocations (`--raw-alloc`,
//! `--raw-fail`), the forked child (`--fork-alloc`), `cuMemGetInfo_v2`, launches, `--hold`, frees.
//!
//! Output lines, in this order (sizes in bytes, pointers and handles in `0x` hex, one line per item
//! unless stated):
//! - `pid <pid>`: always the first line;
//! - `device <index> total <bytes>`;
//! - `allocated <ptr> …`: the `--alloc` pointers (the line is printed even with none);
//! - `pitch <ptr> pitch <pitch> bytes <pitch × height>` (`--pitch`);
//! - `managed <ptr> …` (`--managed`);
//! - `vmm <ptr> handle <handle> bytes <bytes>`: one per `--vmm` (`vmm-host …` per `--vmm-host`); `bytes` is the request rounded up to
//!   the granularity from `cuMemGetAllocationGranularity`;
//! - `async <ptr> …` (`--async`);
//! - `raw-allocated <handle> …` (`--raw-alloc`);
//! - `raw-failed <status>`: the `NV_STATUS` (`0x` hex) of the `--raw-fail` allocation;
//! - `child <pid> allocated <bytes>`: printed by the forked child (`--fork-alloc`);
//! - `child <pid> exited <code>`: printed by the parent once `waitpid` returned;
//! - `meminfo free <bytes> total <bytes>`;
//! - `launched <n>` (`--launch`), `launched-for <n>` (`--launch-for-ms`), `synchronized` (`--sync`);
//! - `bench <what> <ns>` (`--bench N`): ns per call of `cuCtxGetDevice`, `cuLaunchKernel` (null function)
//!   and a 1 MiB `cuMemAlloc_v2` + `cuMemFree_v2` pair;
//! - `freed`: after the frees of `--free` / `--raw-free` (then, with `--hold`, it waits for a second
//!   line on stdin before exiting, so that a test can look at the node between the frees and the exit).
//!
//! `--fork-alloc BYTES`: after the parent's own allocations the (single-threaded) process forks; the
//! child opens its own RM client on `$HAMI_FAKE_GPU_DIR/nvidiactl` (as a freshly started process would),
//! allocates BYTES of vidmem on `--device` through `--raw-via` (XFER-wrapped with `--xfer`), prints its
//! line, waits for a line on stdin with `--hold`, frees with `--free`, and `_exit`s (its open
//! `nvidiactl` closes, which frees whatever it still holds). The parent waits for it before going on.
#![allow(
    unsafe_code,
    reason = "dlopen/dlsym, calls through C function pointers of the CUDA driver API, fork/waitpid"
)]

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Parser;
use hami_fake_gpu::client::{AllocVia, RmClient};

#[derive(Parser)]
#[command(about = "A CUDA driver API workload for the simulated GPU node")]
struct Args {
    /// Library to dlopen.
    #[arg(long, default_value = "libcuda.so.1")]
    lib: String,
    /// Device ordinal.
    #[arg(long, default_value_t = 0)]
    device: c_int,
    /// Allocate this many bytes with cuMemAlloc_v2 (repeatable).
    #[arg(long)]
    alloc: Vec<usize>,
    /// cuMemAllocPitch_v2 of WIDTHxHEIGHT (row width in bytes × rows, element size 4).
    #[arg(long, value_parser = parse_pitch)]
    pitch: Option<(usize, usize)>,
    /// cuMemAllocManaged (CU_MEM_ATTACH_GLOBAL) of this many bytes (repeatable).
    #[arg(long)]
    managed: Vec<usize>,
    /// VMM: cuMemCreate of this many bytes (rounded up to the granularity) on the device, then
    /// cuMemAddressReserve, cuMemMap, cuMemRelease and cuMemSetAccess (repeatable).
    #[arg(long)]
    vmm: Vec<usize>,
    /// As `--vmm`, with the physical memory on the host (`CU_MEM_LOCATION_TYPE_HOST`: pinned host
    /// memory mapped for the device, no device memory; peer case C12) (repeatable).
    #[arg(long)]
    vmm_host: Vec<usize>,
    /// cuMemAllocAsync of this many bytes on the default stream (repeatable).
    #[arg(long = "async")]
    async_alloc: Vec<usize>,
    /// cuMemPoolCreate on the device, then cuMemAllocFromPoolAsync of this many bytes (repeatable;
    /// freed with cuMemFreeAsync by `--free`).
    #[arg(long)]
    pool: Vec<usize>,
    /// cuArrayCreate_v2 of WIDTHxHEIGHT float4 elements (16 bytes each; freed with cuArrayDestroy by
    /// `--free`).
    #[arg(long, value_parser = parse_pitch)]
    array: Option<(usize, usize)>,
    /// Start this many threads that each allocate `--thread-bytes` with cuMemAlloc_v2 and free it 100
    /// times, then hold as many such allocations as they can; prints `threads held <bytes>`.
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Allocation size of `--threads`, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    thread_bytes: usize,
    /// Also allocate this many bytes with raw RM ioctls on `$HAMI_FAKE_GPU_DIR/nvidiactl`, bypassing
    /// libcuda (what an interceptor cannot see; repeatable).
    #[arg(long)]
    raw_alloc: Vec<u64>,
    /// RM path of the raw allocations: nvos21, nvos64 or vid-heap.
    #[arg(long, default_value = "nvos21")]
    raw_via: AllocVia,
    /// GPU index of the raw allocations (default: the `--device` ordinal).
    #[arg(long)]
    raw_device: Option<u32>,
    /// Wrap the raw RM calls in NV_ESC_IOCTL_XFER_CMD.
    #[arg(long)]
    xfer: bool,
    /// Free the raw allocations with RM_FREE before exiting.
    #[arg(long)]
    raw_free: bool,
    /// Allocate the raw allocations' NV01_DEVICE_0 without parameters (device instance 0).
    #[arg(long)]
    raw_device_without_params: bool,
    /// Parent the raw allocations to an NV20_SUBDEVICE_0 under the device, not to the device.
    #[arg(long)]
    raw_under_subdevice: bool,
    /// Instead of freeing the raw allocations one by one, free their NV01_DEVICE_0 with RM_FREE: the
    /// driver frees the whole subtree (subdevice and memory). Prints `raw-freed-device`.
    #[arg(long)]
    raw_free_device: bool,
    /// Attempt a raw allocation of this many bytes that is expected to fail; print its NV_STATUS.
    #[arg(long)]
    raw_fail: Option<u64>,
    /// Fork a child that allocates this many bytes of vidmem with its own RM client.
    #[arg(long)]
    fork_alloc: Option<u64>,
    /// Start as the CUDA runtime does: the device's primary context (cuDevicePrimaryCtxRetain +
    /// cuCtxSetCurrent, released with cuDevicePrimaryCtxRelease_v2 at the end) instead of
    /// cuCtxCreate_v2, after reading the attributes frameworks read at start-up; prints
    /// `attributes sm <n> threads-per-sm <n> warp <n>`.
    #[arg(long)]
    primary_ctx: bool,
    /// Resolve cuMemAlloc through cuGetProcAddress_v2 instead of dlsym.
    #[arg(long)]
    proc_address: bool,
    /// Launch this many kernels with cuLaunchKernel (after allocating).
    #[arg(long, default_value_t = 0)]
    launch: u32,
    /// Thread blocks per launch (gridDimX).
    #[arg(long, default_value_t = 132)]
    grid: c_uint,
    /// Call the per-thread-default-stream twins (`cuLaunchKernel_ptsz`, `cuMemAllocAsync_ptsz`,
    /// `cuMemAllocFromPoolAsync_ptsz`, `cuMemFreeAsync_ptsz`) instead of the base entry points, as
    /// code built with `--default-stream per-thread` does.
    #[arg(long)]
    ptsz: bool,
    /// cuStreamSynchronize after launching.
    #[arg(long)]
    sync: bool,
    /// Launch one kernel (`--grid` blocks) and synchronise, again and again for this many
    /// milliseconds, then print `launched-for <launches>` (a steady compute load for the SM limiter).
    #[arg(long, default_value_t = 0)]
    launch_for_ms: u64,
    /// Time this many calls of each benchmarked entry point (after everything else) and print
    /// `bench <what> <ns per call>`: `cuCtxGetDevice` (no driver round trip), `cuLaunchKernel` with a
    /// null function (returns at once), and `cuMemAlloc_v2` + `cuMemFree_v2` of 1 MiB (n / 100 pairs).
    #[arg(long, default_value_t = 0)]
    bench: u32,
    /// Wait for a line on stdin before freeing/exiting (and again after freeing, if anything was freed).
    #[arg(long)]
    hold: bool,
    /// Free every driver API allocation before exiting (default: exit without freeing).
    #[arg(long)]
    free: bool,
}

fn parse_pitch(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}`: expected WIDTHxHEIGHT"))?;
    let num = |v: &str| v.parse::<usize>().map_err(|e| format!("`{s}`: {e}"));
    Ok((num(w)?, num(h)?))
}

type FnInit = unsafe extern "C" fn(c_uint) -> c_int;
type FnDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type FnTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type FnCtxCreate = unsafe extern "C" fn(*mut *mut c_void, c_uint, c_int) -> c_int;
type FnCtxSet = unsafe extern "C" fn(*mut c_void) -> c_int;
type FnPrimaryRetain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int;
type FnPrimaryRelease = unsafe extern "C" fn(c_int) -> c_int;
type FnDeviceAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type FnMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
type FnMemAllocPitch = unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> c_int;
type FnMemAllocManaged = unsafe extern "C" fn(*mut u64, usize, c_uint) -> c_int;
type FnMemAllocAsync = unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> c_int;
type FnMemFreeAsync = unsafe extern "C" fn(u64, *mut c_void) -> c_int;
type FnMemGetAllocationGranularity = unsafe extern "C" fn(*mut usize, *const AllocationProp, c_int) -> c_int;
type FnMemCreate = unsafe extern "C" fn(*mut u64, usize, *const AllocationProp, u64) -> c_int;
type FnMemRelease = unsafe extern "C" fn(u64) -> c_int;
type FnMemAddressReserve = unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> c_int;
type FnMemAddressFree = unsafe extern "C" fn(u64, usize) -> c_int;
type FnMemMap = unsafe extern "C" fn(u64, usize, usize, u64, u64) -> c_int;
type FnMemUnmap = unsafe extern "C" fn(u64, usize) -> c_int;
type FnMemSetAccess = unsafe extern "C" fn(u64, usize, *const AccessDesc, usize) -> c_int;
type FnMemFree = unsafe extern "C" fn(u64) -> c_int;
type FnMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type FnLaunchKernel = unsafe extern "C" fn(
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
type FnStreamSynchronize = unsafe extern "C" fn(*mut c_void) -> c_int;
type FnGetProcAddress2 =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> c_int;

/// `CUmemAllocationProp` (`cuda.h`, 32 bytes on x86_64).
#[repr(C)]
struct AllocationProp {
    kind: u32,
    requested_handle_types: u32,
    location_type: u32,
    location_id: c_int,
    win32_handle_meta_data: *mut c_void,
    alloc_flags: [u8; 8],
}

/// `CUmemAccessDesc` (`cuda.h`, 12 bytes).
#[repr(C)]
struct AccessDesc {
    location_type: u32,
    location_id: c_int,
    flags: u32,
}

/// `CU_MEM_ALLOCATION_TYPE_PINNED`.
const PINNED: u32 = 1;
/// `CU_MEM_LOCATION_TYPE_DEVICE`.
const LOCATION_DEVICE: u32 = 1;
/// `CU_MEM_LOCATION_TYPE_HOST`.
const LOCATION_HOST: u32 = 2;
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`.
const PROT_READWRITE: u32 = 3;
/// `CU_MEM_ALLOC_GRANULARITY_RECOMMENDED`.
const GRANULARITY_RECOMMENDED: c_int = 1;
/// `CU_MEM_ATTACH_GLOBAL`.
const ATTACH_GLOBAL: c_uint = 1;

struct Lib(*mut c_void);

impl Lib {
    fn open(name: &str) -> Result<Self> {
        let c = CString::new(name)?;
        // SAFETY: a valid NUL-terminated name; the handle is checked for null.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            bail!("dlopen({name}) failed");
        }
        Ok(Self(h))
    }

    fn sym(&self, name: &str) -> Result<*mut c_void> {
        let c = CString::new(name)?;
        // SAFETY: a live handle and a valid NUL-terminated name.
        let p = unsafe { libc::dlsym(self.0, c.as_ptr()) };
        if p.is_null() {
            bail!("{name} not found");
        }
        Ok(p)
    }

    /// The symbol `name` as a function pointer of type `F`.
    ///
    /// # Safety
    /// `F` must be the `unsafe extern "C" fn` type of the CUDA driver API function `name`.
    unsafe fn func<F: Copy>(&self, name: &str) -> Result<F> {
        let p = self.sym(name)?;
        if size_of::<F>() != size_of::<*mut c_void>() {
            bail!("{name}: not a function pointer type");
        }
        // SAFETY: same size (checked), and `F` is the symbol's function type per the contract.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

fn check(what: &str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        bail!("{what} failed: CUresult {rc}")
    }
}

fn hex_list(v: &[u64]) -> String {
    v.iter().map(|p| format!("{p:#x}")).collect::<Vec<_>>().join(" ")
}

/// `name`, or its per-thread-default-stream twin `name_ptsz`.
fn twin(name: &'static str, ptsz: bool) -> &'static str {
    if !ptsz {
        return name;
    }
    match name {
        "cuLaunchKernel" => "cuLaunchKernel_ptsz",
        "cuMemAllocAsync" => "cuMemAllocAsync_ptsz",
        "cuMemAllocFromPoolAsync" => "cuMemAllocFromPoolAsync_ptsz",
        "cuMemFreeAsync" => "cuMemFreeAsync_ptsz",
        other => other,
    }
}

fn node_dir() -> Result<std::ffi::OsString> {
    std::env::var_os("HAMI_FAKE_GPU_DIR").context("raw RM calls need HAMI_FAKE_GPU_DIR")
}

/// An RM client of this process on the node's control device.
fn rm_client(xfer: bool) -> Result<RmClient> {
    let mut c = RmClient::open(Path::new(&node_dir()?)).context("opening nvidiactl")?;
    c.set_xfer(xfer);
    Ok(c)
}

/// Raw RM allocations through the node's control file (not through libcuda).
struct Raw {
    client: RmClient,
    dev: u32,
    /// The parent of the allocations: `dev` or a subdevice under it.
    parent: u32,
    handles: Vec<u32>,
}

fn raw(args: &Args, gpu: u32) -> Result<Option<Raw>> {
    if args.raw_alloc.is_empty() && args.raw_fail.is_none() {
        return Ok(None);
    }
    let client = rm_client(args.xfer)?;
    let dev = if args.raw_device_without_params {
        client.alloc_device_without_params()
    } else {
        client.alloc_device(gpu)
    }
    .context("allocating NV01_DEVICE_0")?;
    let parent = if args.raw_under_subdevice {
        client
            .alloc_subdevice(dev)
            .context("allocating NV20_SUBDEVICE_0")?
    } else {
        dev
    };
    let mut handles = Vec::new();
    for &bytes in &args.raw_alloc {
        handles.push(
            client
                .alloc_vidmem(parent, bytes, args.raw_via)
                .context("raw allocation")?,
        );
    }
    if !handles.is_empty() {
        let list: Vec<String> = handles.iter().map(|h| format!("{h:#x}")).collect();
        println!("raw-allocated {}", list.join(" "));
    }
    if let Some(bytes) = args.raw_fail {
        match client.alloc_vidmem(dev, bytes, args.raw_via) {
            Ok(h) => bail!("raw allocation of {bytes} bytes was expected to fail but got handle {h:#x}"),
            Err(e) => match e.status() {
                Some(s) => println!("raw-failed {s:#x}"),
                None => return Err(e).context("raw allocation expected to fail"),
            },
        }
    }
    Ok(Some(Raw {
        client,
        dev,
        parent,
        handles,
    }))
}

fn threads() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn read_line() -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading stdin")?;
    Ok(())
}

/// The forked child's work: a fresh RM client, one allocation, then exit (freeing first with `--free`).
fn child(args: &Args, gpu: u32, bytes: u64) -> Result<()> {
    let c = rm_client(args.xfer)?;
    let dev = c.alloc_device(gpu).context("child: allocating NV01_DEVICE_0")?;
    let h = c
        .alloc_vidmem(dev, bytes, args.raw_via)
        .context("child: allocating")?;
    println!("child {} allocated {bytes}", std::process::id());
    std::io::stdout().flush()?;
    if args.hold {
        read_line()?;
    }
    if args.free {
        c.free(dev, h).context("child: freeing")?;
    }
    Ok(())
}

/// Forks; the child runs [`child`] and `_exit`s; the parent waits for it and reports its exit code.
fn fork_alloc(args: &Args, gpu: u32, bytes: u64) -> Result<()> {
    // fork() in a multithreaded process would leave the child with locks held by threads that do not
    // exist there; this program never starts a thread, so check that it is really alone.
    match threads() {
        Some(1) => {}
        n => bail!("--fork-alloc needs a single-threaded process, found {n:?} threads"),
    }
    std::io::stdout().flush()?;
    // SAFETY: the process is single-threaded (checked above), so the child may go on using std.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        let code = match child(args, gpu, bytes) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("hami-cuda-workload child: {e:#}");
                1
            }
        };
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child at once, without running the parent's exit handlers or destructors
        // twice; the kernel closes its files.
        unsafe { libc::_exit(code) };
    }
    let mut status: c_int = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    if unsafe { libc::waitpid(pid, &raw mut status, 0) } != pid {
        return Err(std::io::Error::last_os_error()).context("waitpid");
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    println!("child {pid} exited {code}");
    if code != 0 {
        bail!("the forked child failed with {code}");
    }
    Ok(())
}

/// One VMM allocation, mapped: (address, handle, bytes).
fn vmm(lib: &Lib, dev: c_int, request: usize, host: bool) -> Result<(u64, u64, usize)> {
    // SAFETY (transmutes): each type is the C signature of the named CUDA driver API function.
    let (granularity, create, reserve, map, release, set_access) = unsafe {
        (
            lib.func::<FnMemGetAllocationGranularity>("cuMemGetAllocationGranularity")?,
            lib.func::<FnMemCreate>("cuMemCreate")?,
            lib.func::<FnMemAddressReserve>("cuMemAddressReserve")?,
            lib.func::<FnMemMap>("cuMemMap")?,
            lib.func::<FnMemRelease>("cuMemRelease")?,
            lib.func::<FnMemSetAccess>("cuMemSetAccess")?,
        )
    };
    let prop = AllocationProp {
        kind: PINNED,
        requested_handle_types: 0,
        location_type: if host { LOCATION_HOST } else { LOCATION_DEVICE },
        location_id: if host { 0 } else { dev },
        win32_handle_meta_data: std::ptr::null_mut(),
        alloc_flags: [0; 8],
    };
    let mut g = 0usize;
    // SAFETY (all calls): valid pointers to locals, per the CUDA driver API.
    check("cuMemGetAllocationGranularity", unsafe {
        granularity(&raw mut g, &raw const prop, GRANULARITY_RECOMMENDED)
    })?;
    let bytes = request
        .max(1)
        .checked_next_multiple_of(g.max(1))
        .context("--vmm too large")?;
    let mut handle = 0u64;
    check("cuMemCreate", unsafe {
        create(&raw mut handle, bytes, &raw const prop, 0)
    })?;
    let mut ptr = 0u64;
    check("cuMemAddressReserve", unsafe {
        reserve(&raw mut ptr, bytes, 0, 0, 0)
    })?;
    check("cuMemMap", unsafe { map(ptr, bytes, 0, handle, 0) })?;
    // As the CUDA samples do: the handle can go at once; the memory lives until it is unmapped.
    check("cuMemRelease", unsafe { release(handle) })?;
    let desc = AccessDesc {
        location_type: LOCATION_DEVICE,
        location_id: dev,
        flags: PROT_READWRITE,
    };
    check("cuMemSetAccess", unsafe {
        set_access(ptr, bytes, &raw const desc, 1)
    })?;
    Ok((ptr, handle, bytes))
}

#[allow(
    clippy::too_many_lines,
    reason = "one straight-line script of driver API calls, in the documented output order"
)]
/// `--bench`: median of 5 rounds, ns per call.
fn bench(lib: &Lib, n: u32, mem_alloc: FnMemAlloc, mem_free: FnMemFree) -> Result<()> {
    type FnCtxGetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: the CUDA driver API signatures spelled out by the types.
    let get_device = unsafe { lib.func::<FnCtxGetDevice>("cuCtxGetDevice")? };
    let launch = unsafe { lib.func::<FnLaunchKernel>("cuLaunchKernel")? };
    let time = |n: u32, f: &mut dyn FnMut()| {
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_nanos() as f64 / f64::from(n.max(1))
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        rounds[2]
    };
    let mut dev: c_int = 0;
    // SAFETY (all calls): valid out-pointers; a null function makes cuLaunchKernel return at once.
    let ns = time(n, &mut || unsafe {
        get_device(&raw mut dev);
    });
    println!("bench ctx-get-device {ns:.1}");
    let null = std::ptr::null_mut();
    let ns = time(n, &mut || unsafe {
        launch(null, 1, 1, 1, 1, 1, 1, 0, null, null.cast(), null.cast());
    });
    println!("bench launch-null {ns:.1}");
    let ns = time((n / 100).max(1), &mut || unsafe {
        let mut p = 0u64;
        if mem_alloc(&raw mut p, 1 << 20) == 0 {
            mem_free(p);
        }
    });
    println!("bench alloc-free {ns:.1}");
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!("pid {}", std::process::id());
    let lib = Lib::open(&args.lib)?;
    // SAFETY (all `func`s and transmutes): each symbol is the CUDA driver API function of that name,
    // whose C signature the function-pointer type spells out.
    let init = unsafe { lib.func::<FnInit>("cuInit")? };
    let device_get = unsafe { lib.func::<FnDeviceGet>("cuDeviceGet")? };
    let total_mem = unsafe { lib.func::<FnTotalMem>("cuDeviceTotalMem_v2")? };
    let ctx_create = unsafe { lib.func::<FnCtxCreate>("cuCtxCreate_v2")? };
    let mem_free = unsafe { lib.func::<FnMemFree>("cuMemFree_v2")? };
    let get_info = unsafe { lib.func::<FnMemGetInfo>("cuMemGetInfo_v2")? };
    let mem_alloc = if args.proc_address {
        let gpa = unsafe { lib.func::<FnGetProcAddress2>("cuGetProcAddress_v2")? };
        let name = CString::new("cuMemAlloc")?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let mut st: c_int = -1;
        // SAFETY: valid out-pointers and a NUL-terminated name.
        check("cuGetProcAddress_v2", unsafe {
            gpa(name.as_ptr(), &raw mut p, 12080, 0, &raw mut st)
        })?;
        if p.is_null() {
            bail!("cuGetProcAddress_v2 returned no cuMemAlloc");
        }
        unsafe { std::mem::transmute::<*mut c_void, FnMemAlloc>(p) }
    } else {
        unsafe { lib.func::<FnMemAlloc>("cuMemAlloc_v2")? }
    };

    // SAFETY (all calls): valid out-pointers to locals, per the CUDA driver API.
    check("cuInit", unsafe { init(0) })?;
    let mut dev: c_int = 0;
    check("cuDeviceGet", unsafe { device_get(&raw mut dev, args.device) })?;
    let gpu = u32::try_from(dev).context("negative device ordinal")?;
    let mut total = 0usize;
    check("cuDeviceTotalMem_v2", unsafe { total_mem(&raw mut total, dev) })?;
    println!("device {dev} total {total}");
    let mut ctx: *mut c_void = std::ptr::null_mut();
    if args.primary_ctx {
        let attribute = unsafe { lib.func::<FnDeviceAttribute>("cuDeviceGetAttribute")? };
        let attr = |a: c_int| -> Result<c_int> {
            let mut v: c_int = 0;
            check("cuDeviceGetAttribute", unsafe { attribute(&raw mut v, a, dev) })?;
            Ok(v)
        };
        // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, _MAX_THREADS_PER_MULTIPROCESSOR, _WARP_SIZE.
        println!(
            "attributes sm {} threads-per-sm {} warp {}",
            attr(16)?,
            attr(39)?,
            attr(10)?
        );
        let retain = unsafe { lib.func::<FnPrimaryRetain>("cuDevicePrimaryCtxRetain")? };
        let set = unsafe { lib.func::<FnCtxSet>("cuCtxSetCurrent")? };
        check("cuDevicePrimaryCtxRetain", unsafe { retain(&raw mut ctx, dev) })?;
        check("cuCtxSetCurrent", unsafe { set(ctx) })?;
    } else {
        check("cuCtxCreate_v2", unsafe { ctx_create(&raw mut ctx, 0, dev) })?;
    }

    // Everything freed with cuMemFree_v2 at the end (plain, pitched and managed pointers).
    let mut ptrs = Vec::new();
    for &bytes in &args.alloc {
        let mut p = 0u64;
        check("cuMemAlloc_v2", unsafe { mem_alloc(&raw mut p, bytes) })?;
        ptrs.push(p);
    }
    println!("allocated {}", hex_list(&ptrs));
    if let Some((width, height)) = args.pitch {
        let f = unsafe { lib.func::<FnMemAllocPitch>("cuMemAllocPitch_v2")? };
        let (mut p, mut pitch) = (0u64, 0usize);
        check("cuMemAllocPitch_v2", unsafe {
            f(&raw mut p, &raw mut pitch, width, height, 4)
        })?;
        println!(
            "pitch {p:#x} pitch {pitch} bytes {}",
            pitch.saturating_mul(height)
        );
        ptrs.push(p);
    }
    if !args.managed.is_empty() {
        let f = unsafe { lib.func::<FnMemAllocManaged>("cuMemAllocManaged")? };
        let mut managed = Vec::new();
        for &bytes in &args.managed {
            let mut p = 0u64;
            check("cuMemAllocManaged", unsafe {
                f(&raw mut p, bytes, ATTACH_GLOBAL)
            })?;
            managed.push(p);
        }
        println!("managed {}", hex_list(&managed));
        ptrs.extend(managed);
    }
    let mut vmms = Vec::new();
    for (&bytes, host) in args
        .vmm
        .iter()
        .map(|b| (b, false))
        .chain(args.vmm_host.iter().map(|b| (b, true)))
    {
        let (ptr, handle, size) = vmm(&lib, dev, bytes, host)?;
        let what = if host { "vmm-host" } else { "vmm" };
        println!("{what} {ptr:#x} handle {handle:#x} bytes {size}");
        vmms.push((ptr, size));
    }
    let mut asyncs = Vec::new();
    if !args.async_alloc.is_empty() {
        let f = unsafe { lib.func::<FnMemAllocAsync>(twin("cuMemAllocAsync", args.ptsz))? };
        for &bytes in &args.async_alloc {
            let mut p = 0u64;
            check("cuMemAllocAsync", unsafe {
                f(&raw mut p, bytes, std::ptr::null_mut())
            })?;
            asyncs.push(p);
        }
        println!("async {}", hex_list(&asyncs));
    }
    if !args.pool.is_empty() {
        type FnPoolCreate = unsafe extern "C" fn(*mut *mut c_void, *const [u32; 22]) -> c_int;
        type FnAllocFromPool = unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> c_int;
        let create = unsafe { lib.func::<FnPoolCreate>("cuMemPoolCreate")? };
        let alloc = unsafe { lib.func::<FnAllocFromPool>(twin("cuMemAllocFromPoolAsync", args.ptsz))? };
        // CUmemPoolProps: allocType 1 (PINNED), handleTypes 0, location {DEVICE, dev}, then reserved.
        let mut props = [0u32; 22];
        props[0] = 1;
        props[2] = 1;
        props[3] = gpu;
        let mut pool: *mut c_void = std::ptr::null_mut();
        check("cuMemPoolCreate", unsafe {
            create(&raw mut pool, &raw const props)
        })?;
        let mut pooled = Vec::new();
        for &bytes in &args.pool {
            let mut p = 0u64;
            check("cuMemAllocFromPoolAsync", unsafe {
                alloc(&raw mut p, bytes, pool, std::ptr::null_mut())
            })?;
            pooled.push(p);
        }
        println!("pool {}", hex_list(&pooled));
        asyncs.extend(pooled);
    }
    let mut arrays = Vec::new();
    if let Some((w, h)) = args.array {
        type FnArrayCreate = unsafe extern "C" fn(*mut *mut c_void, *const [u32; 6]) -> c_int;
        let create = unsafe { lib.func::<FnArrayCreate>("cuArrayCreate_v2")? };
        // CUDA_ARRAY_DESCRIPTOR: Width, Height (size_t), Format FLOAT (0x20), NumChannels 4.
        let mut desc = [0u32; 6];
        desc[0] = u32::try_from(w).context("--array width")?;
        desc[2] = u32::try_from(h).context("--array height")?;
        desc[4] = 0x20;
        desc[5] = 4;
        let mut a: *mut c_void = std::ptr::null_mut();
        check("cuArrayCreate_v2", unsafe { create(&raw mut a, &raw const desc) })?;
        println!("array {:#x} bytes {}", a as usize, w * h.max(1) * 16);
        arrays.push(a);
    }
    if args.threads > 0 {
        let held = std::sync::atomic::AtomicU64::new(0);
        let per = args.thread_bytes;
        // The function pointers are plain C functions, safe to call from any thread.
        let (alloc_fn, free_fn) = (mem_alloc as usize, mem_free as usize);
        let ctx_addr = ctx as usize;
        let set_current = unsafe { lib.func::<FnCtxSet>("cuCtxSetCurrent")? } as usize;
        // Every thread finishes its churn before any starts holding, so a holder is only ever refused
        // by blocks that are held, never by another thread's short-lived one.
        let churned = std::sync::Barrier::new(args.threads as usize);
        std::thread::scope(|sc| {
            for _ in 0..args.threads {
                let (held, churned) = (&held, &churned);
                sc.spawn(move || {
                    // SAFETY: the addresses are the CUDA functions resolved above, with these signatures.
                    let (alloc, free, set): (FnMemAlloc, FnMemFree, FnCtxSet) = unsafe {
                        (
                            std::mem::transmute::<usize, FnMemAlloc>(alloc_fn),
                            std::mem::transmute::<usize, FnMemFree>(free_fn),
                            std::mem::transmute::<usize, FnCtxSet>(set_current),
                        )
                    };
                    // SAFETY (all calls): valid out-pointers; the context is the process's.
                    unsafe { set(ctx_addr as *mut c_void) };
                    for _ in 0..100 {
                        let mut p = 0u64;
                        if unsafe { alloc(&raw mut p, per) } == 0 {
                            unsafe { free(p) };
                        }
                    }
                    churned.wait();
                    loop {
                        let mut p = 0u64;
                        if unsafe { alloc(&raw mut p, per) } != 0 {
                            break;
                        }
                        held.fetch_add(per as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        println!("threads held {}", held.load(std::sync::atomic::Ordering::Relaxed));
    }
    // Kept alive until exit: closing its nvidiactl frees what it still holds.
    let raw = raw(&args, args.raw_device.unwrap_or(gpu))?;
    if let Some(bytes) = args.fork_alloc {
        fork_alloc(&args, gpu, bytes)?;
    }
    let (mut free, mut total) = (0usize, 0usize);
    check("cuMemGetInfo_v2", unsafe {
        get_info(&raw mut free, &raw mut total)
    })?;
    println!("meminfo free {free} total {total}");
    if args.launch > 0 {
        let launch = unsafe { lib.func::<FnLaunchKernel>(twin("cuLaunchKernel", args.ptsz))? };
        // No modules are loaded by this workload; the fake driver accepts any non-null function handle.
        let f = std::ptr::NonNull::<c_void>::dangling().as_ptr();
        let null = std::ptr::null_mut();
        for _ in 0..args.launch {
            // SAFETY: no kernel parameters are passed.
            check("cuLaunchKernel", unsafe {
                launch(f, args.grid, 1, 1, 128, 1, 1, 0, null, null.cast(), null.cast())
            })?;
        }
        println!("launched {}", args.launch);
    }
    if args.launch_for_ms > 0 {
        let launch = unsafe { lib.func::<FnLaunchKernel>(twin("cuLaunchKernel", args.ptsz))? };
        let sync = unsafe { lib.func::<FnStreamSynchronize>("cuStreamSynchronize")? };
        let f = std::ptr::NonNull::<c_void>::dangling().as_ptr();
        let null = std::ptr::null_mut();
        let until = std::time::Instant::now() + std::time::Duration::from_millis(args.launch_for_ms);
        let mut n = 0u64;
        while std::time::Instant::now() < until {
            // SAFETY: no kernel parameters are passed.
            check("cuLaunchKernel", unsafe {
                launch(f, args.grid, 1, 1, 128, 1, 1, 0, null, null.cast(), null.cast())
            })?;
            check("cuStreamSynchronize", unsafe { sync(null) })?;
            n += 1;
        }
        println!("launched-for {n}");
    }
    if args.sync {
        let sync = unsafe { lib.func::<FnStreamSynchronize>("cuStreamSynchronize")? };
        check("cuStreamSynchronize", unsafe { sync(std::ptr::null_mut()) })?;
        println!("synchronized");
    }
    if args.bench > 0 {
        bench(&lib, args.bench, mem_alloc, mem_free)?;
    }
    if args.hold {
        read_line()?;
    }
    let mut freed = false;
    if args.free {
        for p in ptrs {
            check("cuMemFree_v2", unsafe { mem_free(p) })?;
        }
        if !arrays.is_empty() {
            type FnArrayDestroy = unsafe extern "C" fn(*mut c_void) -> c_int;
            let destroy = unsafe { lib.func::<FnArrayDestroy>("cuArrayDestroy")? };
            for a in arrays.drain(..) {
                check("cuArrayDestroy", unsafe { destroy(a) })?;
            }
        }
        if !asyncs.is_empty() {
            let f = unsafe { lib.func::<FnMemFreeAsync>(twin("cuMemFreeAsync", args.ptsz))? };
            for p in asyncs {
                check("cuMemFreeAsync", unsafe { f(p, std::ptr::null_mut()) })?;
            }
        }
        if !vmms.is_empty() {
            let unmap = unsafe { lib.func::<FnMemUnmap>("cuMemUnmap")? };
            let address_free = unsafe { lib.func::<FnMemAddressFree>("cuMemAddressFree")? };
            for (p, size) in vmms {
                // The handle was released after mapping: unmapping frees the memory.
                check("cuMemUnmap", unsafe { unmap(p, size) })?;
                check("cuMemAddressFree", unsafe { address_free(p, size) })?;
            }
        }
        freed = true;
    }
    if args.raw_free_device
        && let Some(r) = &raw
    {
        r.client
            .free(r.client.client, r.dev)
            .context("raw RM_FREE of the device")?;
        println!("raw-freed-device");
        freed = true;
    } else if args.raw_free
        && let Some(r) = &raw
    {
        for &h in &r.handles {
            r.client.free(r.parent, h).context("raw RM_FREE")?;
        }
        freed = true;
    }
    if freed {
        println!("freed");
        if args.hold {
            read_line()?;
        }
    }
    drop(raw);
    if args.primary_ctx {
        let release = unsafe { lib.func::<FnPrimaryRelease>("cuDevicePrimaryCtxRelease_v2")? };
        check("cuDevicePrimaryCtxRelease_v2", unsafe { release(dev) })?;
        println!("released primary context");
    }
    Ok(())
}
