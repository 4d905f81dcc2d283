//! A fake `libcuda.so.1` (skeleton): a subset of the CUDA driver API with the real signatures and
//! `CUresult` codes, backed by the simulated GPU node. Device memory goes through the node's
//! `nvidiactl` with the real RM ioctls (`NV_ESC_RM_ALLOC` class 0x40 by default, or the legacy
//! `NV_ESC_RM_VID_HEAP_CONTROL` path with `HAMI_FAKE_CUDA_ALLOC=vid-heap`), so the kernel sees what it
//! would see with the real driver.
//!
//! Configuration (environment): `HAMI_FAKE_GPU_DIR`, the node's mount directory (required);
//! `HAMI_FAKE_CUDA_ALLOC`: `nvos21` (default), `nvos64` or `vid-heap`.
//!
//! Static device facts (count, names, UUIDs, memory) come from the node's `hami-ground-truth.json`
//! (the real driver uses `NV_ESC_CARD_INFO` and RM controls, which the node does not model).
//! Never panics across the FFI boundary: every entry point catches panics and returns
//! `CUDA_ERROR_UNKNOWN`.
#![allow(
    unsafe_code,
    non_snake_case,
    reason = "C ABI exports of the CUDA driver API, with its names; every pointer is checked for null"
)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hami_fake_gpu::Error as GpuError;
use hami_fake_gpu::abi::status;
use hami_fake_gpu::client::{AllocVia, RmClient};
use hami_fake_gpu::model::GpuTruth;

/// `CUresult`.
pub type CUresult = c_int;
/// `CUdevice`.
pub type CUdevice = c_int;
/// `CUdeviceptr` (64-bit).
pub type CUdeviceptr = u64;
/// `CUcontext` (opaque).
pub type CUcontext = *mut c_void;

/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CUresult = 0;
/// `CUDA_ERROR_INVALID_VALUE`.
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `CUDA_ERROR_NOT_INITIALIZED`.
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// `CUDA_ERROR_NO_DEVICE`.
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
/// `CUDA_ERROR_INVALID_DEVICE`.
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
/// `CUDA_ERROR_INVALID_CONTEXT`.
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
/// `CUDA_ERROR_INVALID_HANDLE`.
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
/// `CUDA_ERROR_LAUNCH_FAILED`.
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
/// `CUDA_ERROR_NOT_FOUND`.
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
/// `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// The driver version reported (12.8).
pub const DRIVER_VERSION: c_int = 12080;
const VA_BASE: u64 = 0x7f00_0000_0000;
const VA_ALIGN: u64 = 2 << 20;

struct Driver {
    control: File,
    kernel_us: u64,
    busy_until: Instant,
    gpus: Vec<GpuTruth>,
    rm: RmClient,
    via: AllocVia,
    devices: HashMap<u32, u32>,
    contexts: HashMap<usize, u32>,
    next_ctx: usize,
    allocs: HashMap<u64, (u32, u32)>,
    next_va: u64,
}

static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

fn driver() -> MutexGuard<'static, Option<Driver>> {
    DRIVER.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` with the initialised driver, catching panics.
fn with_driver(f: impl FnOnce(&mut Driver) -> CUresult) -> CUresult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match driver().as_mut() {
        Some(d) => f(d),
        None => CUDA_ERROR_NOT_INITIALIZED,
    }))
    .unwrap_or(CUDA_ERROR_UNKNOWN)
}

fn rm_to_cu(e: &GpuError) -> CUresult {
    match e.status() {
        Some(status::NV_ERR_NO_MEMORY) => CUDA_ERROR_OUT_OF_MEMORY,
        _ => CUDA_ERROR_UNKNOWN,
    }
}

fn gpu(d: &Driver, dev: CUdevice) -> Option<&GpuTruth> {
    usize::try_from(dev).ok().and_then(|i| d.gpus.get(i))
}

/// The RM device handle of `gpu`, allocating `NV01_DEVICE_0` on first use.
fn device_handle(d: &mut Driver, gpu: u32) -> Result<u32, CUresult> {
    if let Some(h) = d.devices.get(&gpu) {
        return Ok(*h);
    }
    let h = d.rm.alloc_device(gpu).map_err(|e| rm_to_cu(&e))?;
    d.devices.insert(gpu, h);
    Ok(h)
}

fn current_gpu(d: &Driver) -> Result<u32, CUresult> {
    d.contexts
        .get(&CURRENT.with(Cell::get))
        .copied()
        .ok_or(CUDA_ERROR_INVALID_CONTEXT)
}

/// `cuInit`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::panic::catch_unwind(|| {
        let mut g = driver();
        if g.is_some() {
            return CUDA_SUCCESS;
        }
        let Some(dir) = std::env::var_os("HAMI_FAKE_GPU_DIR").map(PathBuf::from) else {
            return CUDA_ERROR_NO_DEVICE;
        };
        let via = std::env::var("HAMI_FAKE_CUDA_ALLOC")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(AllocVia::Nvos21);
        let Ok(truth) = hami_fake_gpu::fs::read_ground_truth(&dir) else {
            return CUDA_ERROR_NO_DEVICE;
        };
        let Ok(rm) = RmClient::open(&dir) else {
            return CUDA_ERROR_NO_DEVICE;
        };
        let control_file = dir.join(hami_fake_gpu::fs::CONTROL_FILE);
        let Ok(control) = OpenOptions::new().write(true).open(control_file) else {
            return CUDA_ERROR_NO_DEVICE;
        };
        let kernel_us = std::env::var("HAMI_FAKE_CUDA_KERNEL_US")
            .ok()
            .and_then(|v| v.parse().ok());
        *g = Some(Driver {
            control,
            kernel_us: kernel_us.unwrap_or(1000),
            busy_until: Instant::now(),
            gpus: truth.gpus,
            rm,
            via,
            devices: HashMap::new(),
            contexts: HashMap::new(),
            next_ctx: 0x1000,
            allocs: HashMap::new(),
            next_va: VA_BASE,
        });
        CUDA_SUCCESS
    })
    .unwrap_or(CUDA_ERROR_UNKNOWN)
}

/// `cuDriverGetVersion`.
///
/// # Safety
/// `version` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    if version.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null, and the caller passes a valid int pointer.
    unsafe { version.write(DRIVER_VERSION) };
    CUDA_SUCCESS
}

/// `cuDeviceGetCount`.
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    if count.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        // SAFETY: checked non-null above.
        unsafe { count.write(c_int::try_from(d.gpus.len()).unwrap_or(c_int::MAX)) };
        CUDA_SUCCESS
    })
}

/// `cuDeviceGet`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        if gpu(d, ordinal).is_none() {
            return CUDA_ERROR_INVALID_DEVICE;
        }
        // SAFETY: checked non-null above.
        unsafe { device.write(ordinal) };
        CUDA_SUCCESS
    })
}

/// `cuDeviceGetName`.
///
/// # Safety
/// `name` is null or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    let Ok(len) = usize::try_from(len) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if name.is_null() || len == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(g) = gpu(d, dev) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        let bytes = g.model.as_bytes();
        let n = bytes.len().min(len - 1);
        // SAFETY: the caller's buffer holds `len` bytes; we write n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
            name.add(n).write(0);
        }
        CUDA_SUCCESS
    })
}

/// `cuDeviceTotalMem_v2`.
///
/// # Safety
/// `bytes` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    if bytes.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(g) = gpu(d, dev) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        // SAFETY: checked non-null above.
        unsafe { bytes.write(usize::try_from(g.total_bytes).unwrap_or(usize::MAX)) };
        CUDA_SUCCESS
    })
}

/// `cuDeviceGetUuid` (16 raw bytes, parsed from the `GPU-…` UUID).
///
/// # Safety
/// `uuid` is null or valid for 16 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, dev: CUdevice) -> CUresult {
    if uuid.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(g) = gpu(d, dev) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        let hex: String = g
            .uuid
            .trim_start_matches("GPU-")
            .chars()
            .filter(char::is_ascii_hexdigit)
            .collect();
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = hex
                .get(2 * i..2 * i + 2)
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .unwrap_or(0);
        }
        // SAFETY: checked non-null; the caller's CUuuid holds 16 bytes.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), uuid, 16) };
        CUDA_SUCCESS
    })
}

/// `cuDeviceGetAttribute`: multiprocessor count (16) and compute capability (75, 76).
///
/// # Safety
/// `value` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(value: *mut c_int, attrib: c_int, dev: CUdevice) -> CUresult {
    if value.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        if gpu(d, dev).is_none() {
            return CUDA_ERROR_INVALID_DEVICE;
        }
        let v = match attrib {
            16 => 132,
            75 => 9,
            76 => 0,
            _ => return CUDA_ERROR_INVALID_VALUE,
        };
        // SAFETY: checked non-null above.
        unsafe { value.write(v) };
        CUDA_SUCCESS
    })
}

/// `cuCtxCreate_v2`: allocates the GPU's RM device on first use and makes the context current.
///
/// # Safety
/// `pctx` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(pctx: *mut CUcontext, _flags: c_uint, dev: CUdevice) -> CUresult {
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(index) = gpu(d, dev).map(|g| g.index) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        if let Err(e) = device_handle(d, index) {
            return e;
        }
        let id = d.next_ctx;
        d.next_ctx += 0x10;
        d.contexts.insert(id, index);
        CURRENT.with(|c| c.set(id));
        // SAFETY: checked non-null above.
        unsafe { pctx.write(id as CUcontext) };
        CUDA_SUCCESS
    })
}

/// `cuCtxDestroy_v2`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    with_driver(|d| {
        if d.contexts.remove(&(ctx as usize)).is_none() {
            return CUDA_ERROR_INVALID_CONTEXT;
        }
        CURRENT.with(|c| {
            if c.get() == ctx as usize {
                c.set(0);
            }
        });
        CUDA_SUCCESS
    })
}

/// `cuCtxGetCurrent`.
///
/// # Safety
/// `pctx` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|_| {
        // SAFETY: checked non-null above.
        unsafe { pctx.write(CURRENT.with(Cell::get) as CUcontext) };
        CUDA_SUCCESS
    })
}

/// `cuCtxSetCurrent`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    with_driver(|d| {
        if !ctx.is_null() && !d.contexts.contains_key(&(ctx as usize)) {
            return CUDA_ERROR_INVALID_CONTEXT;
        }
        CURRENT.with(|c| c.set(ctx as usize));
        CUDA_SUCCESS
    })
}

/// `cuMemAlloc_v2`: one RM vidmem object per call (no sub-allocation).
///
/// # Safety
/// `dptr` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    if dptr.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let gpu = match current_gpu(d) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let dev = match device_handle(d, gpu) {
            Ok(h) => h,
            Err(e) => return e,
        };
        let bytes = bytesize as u64;
        match d.rm.alloc_vidmem(dev, bytes, d.via) {
            Ok(h) => {
                let va = d.next_va;
                d.next_va += bytes.div_ceil(VA_ALIGN) * VA_ALIGN;
                d.allocs.insert(va, (dev, h));
                // SAFETY: checked non-null above.
                unsafe { dptr.write(va) };
                CUDA_SUCCESS
            }
            Err(e) => rm_to_cu(&e),
        }
    })
}

/// `cuMemFree_v2`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    with_driver(|d| {
        let Some((dev, h)) = d.allocs.remove(&dptr) else {
            return CUDA_ERROR_INVALID_VALUE;
        };
        match d.rm.free(dev, h) {
            Ok(()) => CUDA_SUCCESS,
            Err(e) => rm_to_cu(&e),
        }
    })
}

/// `cuMemGetInfo_v2` of the current context's GPU.
///
/// # Safety
/// `free` and `total` are null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    if free.is_null() || total.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let gpu = match current_gpu(d) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let dev = match device_handle(d, gpu) {
            Ok(h) => h,
            Err(e) => return e,
        };
        match d.rm.mem_info(dev) {
            Ok((t, f)) => {
                // SAFETY: checked non-null above.
                unsafe {
                    free.write(usize::try_from(f).unwrap_or(usize::MAX));
                    total.write(usize::try_from(t).unwrap_or(usize::MAX));
                }
                CUDA_SUCCESS
            }
            Err(e) => rm_to_cu(&e),
        }
    })
}

/// SMs of a simulated GPU (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`).
const SM_COUNT: u64 = 132;

/// Records one launch of `blocks` thread blocks (or the whole GPU for `None`) on the current context's
/// GPU: it occupies `min(100, blocks / SMs)` percent of the SMs for `HAMI_FAKE_CUDA_KERNEL_US`
/// microseconds (default 1000) in the node's utilisation model.
fn launch(blocks: Option<u64>) -> CUresult {
    with_driver(|d| {
        let gpu = match current_gpu(d) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let pct = blocks.map_or(100, |b| b.saturating_mul(100).div_ceil(SM_COUNT).clamp(1, 100));
        let line = format!("launch {gpu} {pct} {}\n", d.kernel_us);
        if d.control.write_all(line.as_bytes()).is_err() {
            return CUDA_ERROR_LAUNCH_FAILED;
        }
        let end = Instant::now() + Duration::from_micros(d.kernel_us);
        d.busy_until = d.busy_until.max(end);
        CUDA_SUCCESS
    })
}

fn grid(x: c_uint, y: c_uint, z: c_uint) -> u64 {
    u64::from(x) * u64::from(y) * u64::from(z)
}

/// `cuLaunchKernel` (no modules are loaded: any non-null function handle runs as a timed kernel).
///
/// # Safety
/// None beyond the C API's; the parameter arrays are not read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    _block_x: c_uint,
    _block_y: c_uint,
    _block_z: c_uint,
    _shared_mem_bytes: c_uint,
    _stream: *mut c_void,
    _kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    if f.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    launch(Some(grid(grid_x, grid_y, grid_z)))
}

/// `cuLaunchCooperativeKernel`.
///
/// # Safety
/// None beyond the C API's; the parameter array is not read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    _block_x: c_uint,
    _block_y: c_uint,
    _block_z: c_uint,
    _shared_mem_bytes: c_uint,
    _stream: *mut c_void,
    _kernel_params: *mut *mut c_void,
) -> CUresult {
    if f.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    launch(Some(grid(grid_x, grid_y, grid_z)))
}

/// `cuLaunchKernelEx`: the grid comes from `CUlaunchConfig` (`gridDimX/Y/Z` are its first three
/// `unsigned int`s).
///
/// # Safety
/// `config` is null or points to a `CUlaunchConfig`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const c_uint,
    f: *mut c_void,
    _kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    if config.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if f.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: non-null and pointing to a CUlaunchConfig, which starts with three unsigned ints.
    let (x, y, z) = unsafe { (config.read(), config.add(1).read(), config.add(2).read()) };
    launch(Some(grid(x, y, z)))
}

/// `cuGraphLaunch`: a graph occupies the whole GPU for one kernel time.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch(graph_exec: *mut c_void, _stream: *mut c_void) -> CUresult {
    if graph_exec.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    launch(None)
}

/// `cuStreamSynchronize`: waits until this process's launches have run.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(_stream: *mut c_void) -> CUresult {
    let mut until = None;
    let rc = with_driver(|d| {
        until = Some(d.busy_until);
        CUDA_SUCCESS
    });
    if let Some(t) = until {
        std::thread::sleep(t.saturating_duration_since(Instant::now()));
    }
    rc
}

/// The exported entry points by name, for `cuGetProcAddress`.
fn lookup(symbol: &str) -> Option<*mut c_void> {
    let f: *mut c_void = match symbol {
        "cuInit" => cuInit as *mut c_void,
        "cuDriverGetVersion" => cuDriverGetVersion as *mut c_void,
        "cuDeviceGetCount" => cuDeviceGetCount as *mut c_void,
        "cuDeviceGet" => cuDeviceGet as *mut c_void,
        "cuDeviceGetName" => cuDeviceGetName as *mut c_void,
        "cuDeviceTotalMem" | "cuDeviceTotalMem_v2" => cuDeviceTotalMem_v2 as *mut c_void,
        "cuDeviceGetUuid" => cuDeviceGetUuid as *mut c_void,
        "cuDeviceGetAttribute" => cuDeviceGetAttribute as *mut c_void,
        "cuCtxCreate" | "cuCtxCreate_v2" => cuCtxCreate_v2 as *mut c_void,
        "cuCtxDestroy" | "cuCtxDestroy_v2" => cuCtxDestroy_v2 as *mut c_void,
        "cuCtxGetCurrent" => cuCtxGetCurrent as *mut c_void,
        "cuCtxSetCurrent" => cuCtxSetCurrent as *mut c_void,
        "cuMemAlloc" | "cuMemAlloc_v2" => cuMemAlloc_v2 as *mut c_void,
        "cuMemFree" | "cuMemFree_v2" => cuMemFree_v2 as *mut c_void,
        "cuMemGetInfo" | "cuMemGetInfo_v2" => cuMemGetInfo_v2 as *mut c_void,
        "cuLaunchKernel" => cuLaunchKernel as *mut c_void,
        "cuLaunchCooperativeKernel" => cuLaunchCooperativeKernel as *mut c_void,
        "cuLaunchKernelEx" => cuLaunchKernelEx as *mut c_void,
        "cuGraphLaunch" => cuGraphLaunch as *mut c_void,
        "cuStreamSynchronize" => cuStreamSynchronize as *mut c_void,
        "cuGetProcAddress" => cuGetProcAddress as *mut c_void,
        "cuGetProcAddress_v2" => cuGetProcAddress_v2 as *mut c_void,
        _ => return None,
    };
    Some(f)
}

/// `cuGetProcAddress` (CUDA 11.3, 4 arguments).
///
/// # Safety
/// `symbol` is null or a NUL-terminated string; `pfn` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    _cuda_version: c_int,
    _flags: u64,
) -> CUresult {
    // SAFETY: forwarded under the same contract, with no status pointer.
    unsafe { cuGetProcAddress_v2(symbol, pfn, _cuda_version, _flags, std::ptr::null_mut()) }
}

/// `cuGetProcAddress_v2` (CUDA 12.0; `symbol_status`: 0 found, 1 symbol not found).
///
/// # Safety
/// `symbol` is null or a NUL-terminated string; `pfn` and `symbol_status` are null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    _cuda_version: c_int,
    _flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    if symbol.is_null() || pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null, NUL-terminated per the contract.
    let name = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
    let found = lookup(&name);
    // SAFETY: checked non-null above; `symbol_status` is checked before the write.
    unsafe {
        pfn.write(found.unwrap_or(std::ptr::null_mut()));
        if !symbol_status.is_null() {
            symbol_status.write(if found.is_some() { 0 } else { 1 });
        }
    }
    if found.is_some() {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_NOT_FOUND
    }
}
