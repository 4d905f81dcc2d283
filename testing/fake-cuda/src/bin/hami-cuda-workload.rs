//! `hami-cuda-workload`: a tiny CUDA driver API tenant. It loads `libcuda.so.1` at run time with
//! `dlopen` (as real applications and runtimes do), creates a context, allocates device memory, prints
//! what it did, optionally waits for a line on stdin, and exits (freeing first only with `--free`).
//!
//! Output lines: `device <index> total <bytes>`, `allocated <ptr> …`, `raw-allocated <handle> …` (with
//! `--raw-alloc`), `meminfo free <b> total <b>`.
#![allow(
    unsafe_code,
    reason = "dlopen/dlsym and calls through C function pointers of the CUDA driver API"
)]

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::io::BufRead;

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
    /// Also allocate this many bytes with raw RM ioctls on `$HAMI_FAKE_GPU_DIR/nvidiactl`, bypassing
    /// libcuda (what an interceptor cannot see; repeatable).
    #[arg(long)]
    raw_alloc: Vec<u64>,
    /// Resolve cuMemAlloc through cuGetProcAddress_v2 instead of dlsym.
    #[arg(long)]
    proc_address: bool,
    /// Launch this many kernels with cuLaunchKernel (after allocating).
    #[arg(long, default_value_t = 0)]
    launch: u32,
    /// Thread blocks per launch (gridDimX).
    #[arg(long, default_value_t = 132)]
    grid: c_uint,
    /// cuStreamSynchronize after launching.
    #[arg(long)]
    sync: bool,
    /// Wait for a line on stdin before exiting.
    #[arg(long)]
    hold: bool,
    /// Free everything before exiting (default: exit without freeing).
    #[arg(long)]
    free: bool,
}

type FnInit = unsafe extern "C" fn(c_uint) -> c_int;
type FnDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type FnTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type FnCtxCreate = unsafe extern "C" fn(*mut *mut c_void, c_uint, c_int) -> c_int;
type FnMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
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
}

fn check(what: &str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        bail!("{what} failed: CUresult {rc}")
    }
}

/// Raw RM allocations through the node's control file (not through libcuda).
fn raw_alloc(sizes: &[u64], gpu: u32) -> Result<Option<RmClient>> {
    if sizes.is_empty() {
        return Ok(None);
    }
    let dir = std::env::var_os("HAMI_FAKE_GPU_DIR").context("--raw-alloc needs HAMI_FAKE_GPU_DIR")?;
    let c = RmClient::open(Path::new(&dir)).context("opening nvidiactl")?;
    let dev = c.alloc_device(gpu).context("allocating NV01_DEVICE_0")?;
    let mut handles = Vec::new();
    for &bytes in sizes {
        handles.push(format!(
            "{:#x}",
            c.alloc_vidmem(dev, bytes, AllocVia::Nvos21)
                .context("raw RM_ALLOC")?
        ));
    }
    println!("raw-allocated {}", handles.join(" "));
    Ok(Some(c))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let lib = Lib::open(&args.lib)?;
    // SAFETY (all transmutes): each symbol is the CUDA driver API function of that name, whose C
    // signature the function-pointer type spells out.
    let init = unsafe { std::mem::transmute::<*mut c_void, FnInit>(lib.sym("cuInit")?) };
    let device_get = unsafe { std::mem::transmute::<*mut c_void, FnDeviceGet>(lib.sym("cuDeviceGet")?) };
    let total_mem =
        unsafe { std::mem::transmute::<*mut c_void, FnTotalMem>(lib.sym("cuDeviceTotalMem_v2")?) };
    let ctx_create = unsafe { std::mem::transmute::<*mut c_void, FnCtxCreate>(lib.sym("cuCtxCreate_v2")?) };
    let mem_free = unsafe { std::mem::transmute::<*mut c_void, FnMemFree>(lib.sym("cuMemFree_v2")?) };
    let get_info = unsafe { std::mem::transmute::<*mut c_void, FnMemGetInfo>(lib.sym("cuMemGetInfo_v2")?) };
    let mem_alloc = if args.proc_address {
        let gpa =
            unsafe { std::mem::transmute::<*mut c_void, FnGetProcAddress2>(lib.sym("cuGetProcAddress_v2")?) };
        let name = CString::new("cuMemAlloc")?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let mut st: c_int = -1;
        // SAFETY: valid out-pointers and a NUL-terminated name.
        check("cuGetProcAddress_v2", unsafe {
            gpa(name.as_ptr(), &raw mut p, 12080, 0, &raw mut st)
        })?;
        unsafe { std::mem::transmute::<*mut c_void, FnMemAlloc>(p) }
    } else {
        unsafe { std::mem::transmute::<*mut c_void, FnMemAlloc>(lib.sym("cuMemAlloc_v2")?) }
    };

    // SAFETY (all calls): valid out-pointers to locals, per the CUDA driver API.
    check("cuInit", unsafe { init(0) })?;
    let mut dev: c_int = 0;
    check("cuDeviceGet", unsafe { device_get(&raw mut dev, args.device) })?;
    let mut total = 0usize;
    check("cuDeviceTotalMem_v2", unsafe { total_mem(&raw mut total, dev) })?;
    println!("device {dev} total {total}");
    let mut ctx: *mut c_void = std::ptr::null_mut();
    check("cuCtxCreate_v2", unsafe { ctx_create(&raw mut ctx, 0, dev) })?;
    let mut ptrs = Vec::new();
    for &bytes in &args.alloc {
        let mut p = 0u64;
        check("cuMemAlloc_v2", unsafe { mem_alloc(&raw mut p, bytes) })?;
        ptrs.push(p);
    }
    let list: Vec<String> = ptrs.iter().map(|p| format!("{p:#x}")).collect();
    println!("allocated {}", list.join(" "));
    // Kept alive until exit: closing its nvidiactl frees its memory.
    let _raw = raw_alloc(&args.raw_alloc, u32::try_from(dev).unwrap_or(0))?;
    let (mut free, mut total) = (0usize, 0usize);
    check("cuMemGetInfo_v2", unsafe {
        get_info(&raw mut free, &raw mut total)
    })?;
    println!("meminfo free {free} total {total}");
    if args.launch > 0 {
        let launch =
            unsafe { std::mem::transmute::<*mut c_void, FnLaunchKernel>(lib.sym("cuLaunchKernel")?) };
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
    if args.sync {
        let sync = unsafe {
            std::mem::transmute::<*mut c_void, FnStreamSynchronize>(lib.sym("cuStreamSynchronize")?)
        };
        check("cuStreamSynchronize", unsafe { sync(std::ptr::null_mut()) })?;
        println!("synchronized");
    }
    if args.hold {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading stdin")?;
    }
    if args.free {
        for p in ptrs {
            check("cuMemFree_v2", unsafe { mem_free(p) })?;
        }
    }
    Ok(())
}
