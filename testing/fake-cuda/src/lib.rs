//! A fake `libcuda.so.1`: a subset of the CUDA driver API with the real signatures and `CUresult`
//! codes, backed by the simulated GPU node. Device memory goes through the node's `nvidiactl` with the
//! real RM ioctls (`NV_ESC_RM_ALLOC` class 0x40 by default, or the legacy `NV_ESC_RM_VID_HEAP_CONTROL`
//! path with `HAMI_FAKE_CUDA_ALLOC=vid-heap`), so the kernel sees what it would see with the real driver.
//!
//! What each allocation API does at the ioctl level (`reference/nvidia-driver-abi.md` §7, §11.1):
//! - `cuMemAlloc_v2`: one RM vidmem object of exactly the requested size (the real driver sub-allocates
//!   from 2 MiB chunks; not modelled), freed by `cuMemFree_v2`;
//! - `cuMemAllocPitch_v2`: rows padded to a pitch of the width rounded up to 512 bytes; one RM vidmem
//!   object of `pitch × height` bytes;
//! - `cuMemAllocManaged`: **no RM ioctl** (the real driver maps a UVM range, invisible to RM and to
//!   NVML); the range is registered with the node by a `managed <gpu> <bytes> <address>` line on
//!   `hami-control` (a `write(2)`, not an ioctl) so that the ground truth lists it, and `cuMemFree_v2`
//!   writes `managed-free <address>`;
//! - VMM: `cuMemCreate` is one RM vidmem object on `prop->location.id`; `cuMemRelease` frees it once
//!   no mapping uses it any more (the driver's documented deferred release); `cuMemAddressReserve`,
//!   `cuMemAddressFree`, `cuMemMap`, `cuMemUnmap` and `cuMemSetAccess` are bookkeeping only. Sizes must
//!   be multiples of the 2 MiB granularity that `cuMemGetAllocationGranularity` reports;
//! - `cuMemAllocAsync`: one RM vidmem object per call, freed at `cuMemFreeAsync`. Real stream-ordered
//!   pools grow in chunks and give memory back only when trimmed (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`),
//!   so a tracer sees pool growth, not individual async allocations; this model is the simplest
//!   faithful one (every byte the application holds is an RM object while it holds it).
//!
//! Configuration (environment): `HAMI_FAKE_GPU_DIR`, the node's mount directory (required);
//! `HAMI_FAKE_CUDA_ALLOC`: `nvos21` (default), `nvos64` or `vid-heap`; `NVIDIA_VISIBLE_DEVICES`: the
//! GPUs the process sees, as the NVIDIA container runtime exposes them to a container (a comma list
//! of UUIDs or host indices; unset, empty or `all`: every GPU; `none`/`void`: none). CUDA ordinal `i`
//! is the `i`-th listed GPU, as in a container; RM calls, launches and the ground truth keep the host
//! index.
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
use std::collections::{BTreeMap, HashMap};
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
/// `CUstream` (opaque; streams are not modelled, any value is accepted).
pub type CUstream = *mut c_void;
/// `CUmemGenericAllocationHandle` (an opaque 64-bit handle from `cuMemCreate`).
pub type CUmemGenericAllocationHandle = u64;

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
/// `CUDA_ERROR_NOT_SUPPORTED`.
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;

/// `CU_MEM_ATTACH_GLOBAL` (`cuMemAllocManaged` flag).
pub const CU_MEM_ATTACH_GLOBAL: c_uint = 0x1;
/// `CU_MEM_ATTACH_HOST` (`cuMemAllocManaged` flag).
pub const CU_MEM_ATTACH_HOST: c_uint = 0x2;
/// `CU_MEM_ALLOCATION_TYPE_PINNED` (`CUmemAllocationProp.type`).
pub const CU_MEM_ALLOCATION_TYPE_PINNED: u32 = 1;
/// `CU_MEM_LOCATION_TYPE_DEVICE` (`CUmemLocation.type`).
pub const CU_MEM_LOCATION_TYPE_DEVICE: u32 = 1;
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE` (`CUmemAccessDesc.flags`; `PROT_NONE` is 0, `PROT_READ` 1).
pub const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: u32 = 3;
/// `CU_MEM_ALLOC_GRANULARITY_RECOMMENDED` (`MINIMUM` is 0).
pub const CU_MEM_ALLOC_GRANULARITY_RECOMMENDED: c_int = 1;
/// `sizeof(CUmemAllocationProp)` on x86_64 (`cuda.h`: `type` u32 at 0, `requestedHandleTypes` u32 at 4,
/// `location {type u32 at 8, id i32 at 12}`, `win32HandleMetaData` pointer at 16, `allocFlags` 8 bytes
/// at 24).
pub const CU_MEM_ALLOCATION_PROP_SIZE: usize = 32;
/// `sizeof(CUmemAccessDesc)` (`cuda.h`: `location {type u32 at 0, id i32 at 4}`, `flags` u32 at 8).
pub const CU_MEM_ACCESS_DESC_SIZE: usize = 12;
/// The VMM allocation granularity reported and enforced, bytes (2 MiB, what current GPUs report for
/// both `MINIMUM` and `RECOMMENDED`).
pub const VMM_GRANULARITY: u64 = 2 << 20;
/// Row pitch alignment of `cuMemAllocPitch_v2`, bytes.
pub const PITCH_ALIGN: u64 = 512;
/// `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// The driver version reported (12.8).
pub const DRIVER_VERSION: c_int = 12080;
const VA_BASE: u64 = 0x7f00_0000_0000;
const VA_ALIGN: u64 = 2 << 20;

/// What a device pointer handed out by `cuMemAlloc*` stands for.
#[derive(Debug, Clone, Copy)]
enum Mem {
    /// One RM vidmem object (`cuMemAlloc_v2`, `cuMemAllocPitch_v2`).
    Rm { dev: u32, h: u32 },
    /// One RM vidmem object from `cuMemAllocAsync`.
    Async { dev: u32, h: u32 },
    /// A managed range registered with the node (no RM object).
    Managed,
}

/// A `cuMemCreate` allocation: one RM vidmem object, or host memory (no RM object).
#[derive(Debug)]
struct Phys {
    /// RM device handle (`None`: a host-located allocation, nothing on any GPU).
    dev: Option<u32>,
    h: u32,
    bytes: u64,
    /// Live `cuMemMap`s of it.
    maps: u32,
    /// `cuMemRelease` was called; the RM object goes with the last unmap.
    released: bool,
}

/// A `cuMemMap` of a whole physical allocation (offset 0) into a reserved range.
#[derive(Debug)]
struct Mapping {
    bytes: u64,
    handle: CUmemGenericAllocationHandle,
    /// `cuMemSetAccess` bookkeeping: GPU index → `CUmemAccess_flags`.
    access: BTreeMap<u32, u32>,
}

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
    /// Primary contexts (`cuDevicePrimaryCtxRetain`): GPU index → (context, retain count).
    primary: HashMap<u32, (usize, u32)>,
    allocs: HashMap<u64, Mem>,
    next_va: u64,
    /// `cuMemAddressReserve` ranges: base → bytes.
    reservations: BTreeMap<u64, u64>,
    phys: HashMap<CUmemGenericAllocationHandle, Phys>,
    next_phys: CUmemGenericAllocationHandle,
    /// `cuMemMap`s: base address → mapping.
    mappings: BTreeMap<u64, Mapping>,
    /// Explicit memory pools (`cuMemPoolCreate`): handle → GPU index.
    pools: HashMap<usize, u32>,
    /// `cuArrayCreate_v2` arrays: handle → (RM device handle, RM memory handle).
    arrays: HashMap<usize, (u32, u32)>,
    /// Next pool or array handle.
    next_handle: usize,
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

/// The GPUs `NVIDIA_VISIBLE_DEVICES` (`spec`) exposes, in its order (see the module docs); `None` for
/// an entry naming no GPU of the node.
fn visible(all: Vec<GpuTruth>, spec: Option<&str>) -> Option<Vec<GpuTruth>> {
    let spec = spec.map(str::trim).unwrap_or_default();
    match spec {
        "" | "all" => return Some(all),
        "none" | "void" => return Some(Vec::new()),
        _ => {}
    }
    spec.split(',')
        .map(str::trim)
        .map(|want| {
            all.iter()
                .find(|g| g.uuid == want || want.parse::<u32>().is_ok_and(|i| i == g.index))
                .cloned()
        })
        .collect()
}

/// The CUDA ordinal of the GPU with host index `index`.
fn ordinal(d: &Driver, index: u32) -> Option<CUdevice> {
    d.gpus
        .iter()
        .position(|g| g.index == index)
        .and_then(|i| CUdevice::try_from(i).ok())
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

/// Hands out `bytes` of fake virtual address space aligned to `align` (a power of two, at least 2 MiB).
fn take_va(d: &mut Driver, bytes: u64, align: u64) -> Result<u64, CUresult> {
    let align = align.max(VA_ALIGN);
    let base = d
        .next_va
        .checked_next_multiple_of(align)
        .ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
    let len = bytes
        .checked_next_multiple_of(VA_ALIGN)
        .ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
    d.next_va = base.checked_add(len).ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
    Ok(base)
}

/// One RM vidmem object of `bytes` on the current context's GPU, at a fresh address. Returns
/// `(address, device handle, memory handle)`.
fn alloc_rm(d: &mut Driver, bytes: u64) -> Result<(u64, u32, u32), CUresult> {
    let gpu = current_gpu(d)?;
    let dev = device_handle(d, gpu)?;
    let h = d.rm.alloc_vidmem(dev, bytes, d.via).map_err(|e| rm_to_cu(&e))?;
    match take_va(d, bytes, VA_ALIGN) {
        Ok(va) => Ok((va, dev, h)),
        Err(e) => {
            let _ = d.rm.free(dev, h);
            Err(e)
        }
    }
}

/// Writes one line to the node's `hami-control`.
fn control(d: &mut Driver, line: &str) -> Result<(), CUresult> {
    d.control
        .write_all(line.as_bytes())
        .map_err(|_| CUDA_ERROR_UNKNOWN)
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
        let Some(gpus) = visible(
            truth.gpus,
            std::env::var("NVIDIA_VISIBLE_DEVICES").ok().as_deref(),
        ) else {
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
            gpus,
            rm,
            via,
            devices: HashMap::new(),
            contexts: HashMap::new(),
            next_ctx: 0x1000,
            primary: HashMap::new(),
            allocs: HashMap::new(),
            next_va: VA_BASE,
            reservations: BTreeMap::new(),
            phys: HashMap::new(),
            next_phys: 1,
            mappings: BTreeMap::new(),
            pools: HashMap::new(),
            arrays: HashMap::new(),
            next_handle: 1,
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
        // `CUdevice_attribute` numbers from `cuda.h`; values of an H100 SXM.
        let v = match attrib {
            1 => 1024,  // MAX_THREADS_PER_BLOCK
            10 => 32,   // WARP_SIZE
            16 => 132,  // MULTIPROCESSOR_COUNT
            39 => 2048, // MAX_THREADS_PER_MULTIPROCESSOR
            75 => 9,    // COMPUTE_CAPABILITY_MAJOR
            76 => 0,    // COMPUTE_CAPABILITY_MINOR
            _ => return CUDA_ERROR_INVALID_VALUE,
        };
        // SAFETY: checked non-null above.
        unsafe { value.write(v) };
        CUDA_SUCCESS
    })
}

/// The GPU index of ordinal `dev` for a new context, its RM device allocated on first use.
fn context_device(d: &mut Driver, dev: CUdevice) -> Result<u32, CUresult> {
    let index = gpu(d, dev).map(|g| g.index).ok_or(CUDA_ERROR_INVALID_DEVICE)?;
    device_handle(d, index)?;
    Ok(index)
}

/// A new context on GPU `index`; returns its handle.
fn new_context(d: &mut Driver, index: u32) -> usize {
    let id = d.next_ctx;
    d.next_ctx += 0x10;
    d.contexts.insert(id, index);
    id
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
        let index = match context_device(d, dev) {
            Ok(i) => i,
            Err(e) => return e,
        };
        let id = new_context(d, index);
        CURRENT.with(|c| c.set(id));
        // SAFETY: checked non-null above.
        unsafe { pctx.write(id as CUcontext) };
        CUDA_SUCCESS
    })
}

/// `cuDevicePrimaryCtxRetain`: the device's primary context (created, with the GPU's RM device, on
/// first retain; not made current), its retain count raised. The CUDA runtime's first call on a
/// device.
///
/// # Safety
/// `pctx` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let index = match context_device(d, dev) {
            Ok(i) => i,
            Err(e) => return e,
        };
        let id = match d.primary.get_mut(&index) {
            Some((id, n)) => {
                *n += 1;
                *id
            }
            None => {
                let id = new_context(d, index);
                d.primary.insert(index, (id, 1));
                id
            }
        };
        // SAFETY: checked non-null above.
        unsafe { pctx.write(id as CUcontext) };
        CUDA_SUCCESS
    })
}

/// `cuDevicePrimaryCtxRelease_v2`: lowers the retain count; the last release destroys the context.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    with_driver(|d| {
        let Some(index) = gpu(d, dev).map(|g| g.index) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        let Some((id, n)) = d.primary.get_mut(&index) else {
            return CUDA_ERROR_INVALID_CONTEXT;
        };
        *n -= 1;
        if *n == 0 {
            let id = *id;
            d.primary.remove(&index);
            d.contexts.remove(&id);
            CURRENT.with(|c| {
                if c.get() == id {
                    c.set(0);
                }
            });
        }
        CUDA_SUCCESS
    })
}

/// `cuDevicePrimaryCtxRelease` (the pre-11 name of the same call).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDevicePrimaryCtxRelease_v2(dev) }
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

/// `cuCtxGetDevice`: the device of the current context.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| match current_gpu(d) {
        Ok(g) => {
            // SAFETY: checked non-null above.
            unsafe { device.write(ordinal(d, g).unwrap_or(0)) };
            CUDA_SUCCESS
        }
        Err(e) => e,
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
    with_driver(|d| match alloc_rm(d, bytesize as u64) {
        Ok((va, dev, h)) => {
            d.allocs.insert(va, Mem::Rm { dev, h });
            // SAFETY: checked non-null above.
            unsafe { dptr.write(va) };
            CUDA_SUCCESS
        }
        Err(e) => e,
    })
}

/// `cuMemAllocPitch_v2`: rows of `width_in_bytes` padded to a pitch of the width rounded up to
/// [`PITCH_ALIGN`] (512) bytes; one RM vidmem object of `pitch × height` bytes. `element_size_bytes`
/// must be 4, 8 or 16 (CUDA driver API reference, `cuMemAllocPitch`).
///
/// # Safety
/// `dptr` and `pitch` are null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width_in_bytes: usize,
    height: usize,
    element_size_bytes: c_uint,
) -> CUresult {
    if dptr.is_null() || pitch.is_null() || width_in_bytes == 0 || height == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !matches!(element_size_bytes, 4 | 8 | 16) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some(row) = (width_in_bytes as u64).checked_next_multiple_of(PITCH_ALIGN) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let (Some(bytes), Ok(row_usize)) = (row.checked_mul(height as u64), usize::try_from(row)) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    with_driver(|d| match alloc_rm(d, bytes) {
        Ok((va, dev, h)) => {
            d.allocs.insert(va, Mem::Rm { dev, h });
            // SAFETY: both checked non-null above.
            unsafe {
                dptr.write(va);
                pitch.write(row_usize);
            }
            CUDA_SUCCESS
        }
        Err(e) => e,
    })
}

/// `cuMemAllocManaged`: a managed range on the current context's GPU. Issues no RM ioctl (like the real
/// driver, whose managed memory is a UVM range); registers the range with the node by writing
/// `managed <gpu> <bytes> <address>` to `hami-control`. `flags` must be `CU_MEM_ATTACH_GLOBAL` or
/// `CU_MEM_ATTACH_HOST`.
///
/// # Safety
/// `dptr` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    if dptr.is_null() || bytesize == 0 || !matches!(flags, CU_MEM_ATTACH_GLOBAL | CU_MEM_ATTACH_HOST) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let gpu = match current_gpu(d) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let bytes = bytesize as u64;
        let va = match take_va(d, bytes, VA_ALIGN) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if let Err(e) = control(d, &format!("managed {gpu} {bytes} {va:#x}\n")) {
            return e;
        }
        d.allocs.insert(va, Mem::Managed);
        // SAFETY: checked non-null above.
        unsafe { dptr.write(va) };
        CUDA_SUCCESS
    })
}

/// Frees what `cuMemAlloc*` handed out at `dptr`.
fn free_mem(d: &mut Driver, dptr: CUdeviceptr, mem: Mem) -> CUresult {
    let result = match mem {
        Mem::Rm { dev, h } | Mem::Async { dev, h } => d.rm.free(dev, h).map_err(|e| rm_to_cu(&e)),
        Mem::Managed => control(d, &format!("managed-free {dptr:#x}\n")),
    };
    result.err().unwrap_or(CUDA_SUCCESS)
}

/// `cuMemFree_v2`: frees a `cuMemAlloc_v2`, `cuMemAllocPitch_v2`, `cuMemAllocManaged` or
/// `cuMemAllocAsync` pointer (the last synchronously).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    with_driver(|d| match d.allocs.remove(&dptr) {
        Some(mem) => free_mem(d, dptr, mem),
        None => CUDA_ERROR_INVALID_VALUE,
    })
}

/// `cuMemAllocAsync`: one RM vidmem object on the current context's GPU per call (streams are not
/// modelled: the allocation happens at once). Real pools grow and trim in chunks; see the crate docs.
///
/// # Safety
/// `dptr` is null or valid for a write.
#[allow(non_snake_case, reason = "named after the C entry point it implements")]
unsafe fn cuMemAllocAsync_impl(
    ptsz: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    _stream: CUstream,
) -> CUresult {
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
    if dptr.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| match alloc_rm(d, bytesize as u64) {
        Ok((va, dev, h)) => {
            d.allocs.insert(va, Mem::Async { dev, h });
            // SAFETY: checked non-null above.
            unsafe { dptr.write(va) };
            CUDA_SUCCESS
        }
        Err(e) => e,
    })
}

/// `cuMemFreeAsync`: frees a `cuMemAllocAsync` pointer at once (its RM object goes); any other pointer
/// is `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// None beyond the C API's.
#[allow(non_snake_case, reason = "named after the C entry point it implements")]
unsafe fn cuMemFreeAsync_impl(ptsz: bool, dptr: CUdeviceptr, _stream: CUstream) -> CUresult {
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
    with_driver(|d| match d.allocs.get(&dptr).copied() {
        Some(mem @ Mem::Async { .. }) => {
            d.allocs.remove(&dptr);
            free_mem(d, dptr, mem)
        }
        _ => CUDA_ERROR_INVALID_VALUE,
    })
}

/// `cuMemPoolCreate`: an explicit pool on the device of `props->location` (`CUmemPoolProps`: `allocType`
/// u32 at 0, `handleTypes` u32 at 4, `location {type u32 at 8, id i32 at 12}`). Only device locations.
///
/// # Safety
/// `pool` is null or valid for a write; `props` is null or points to a `CUmemPoolProps`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolCreate(pool: *mut *mut c_void, props: *const c_void) -> CUresult {
    if pool.is_null() || props.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: `props` points to a CUmemPoolProps (at least 16 bytes).
    let (loc_type, id) = unsafe { (read_u32(props.cast(), 8), read_u32(props.cast(), 12)) };
    if loc_type != CU_MEM_LOCATION_TYPE_DEVICE {
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    with_driver(|d| {
        let Some(index) = gpu(d, c_int::from_ne_bytes(id.to_ne_bytes())).map(|g| g.index) else {
            return CUDA_ERROR_INVALID_DEVICE;
        };
        let h = d.next_handle;
        d.next_handle += 1;
        d.pools.insert(h, index);
        // SAFETY: checked non-null above.
        unsafe { pool.write(h as *mut c_void) };
        CUDA_SUCCESS
    })
}

/// `cuMemPoolDestroy`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: *mut c_void) -> CUresult {
    with_driver(|d| match d.pools.remove(&(pool as usize)) {
        Some(_) => CUDA_SUCCESS,
        None => CUDA_ERROR_INVALID_VALUE,
    })
}

/// `cuMemAllocFromPoolAsync`: one RM vidmem object on the pool's GPU, freed by `cuMemFreeAsync`.
///
/// # Safety
/// `dptr` is null or valid for a write.
#[allow(non_snake_case, reason = "named after the C entry point it implements")]
unsafe fn cuMemAllocFromPoolAsync_impl(
    ptsz: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: *mut c_void,
    _stream: CUstream,
) -> CUresult {
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
    if dptr.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(gpu) = d.pools.get(&(pool as usize)).copied() else {
            return CUDA_ERROR_INVALID_VALUE;
        };
        let dev = match device_handle(d, gpu) {
            Ok(h) => h,
            Err(e) => return e,
        };
        let bytes = bytesize as u64;
        let h = match d.rm.alloc_vidmem(dev, bytes, d.via) {
            Ok(h) => h,
            Err(e) => return rm_to_cu(&e),
        };
        match take_va(d, bytes, VA_ALIGN) {
            Ok(va) => {
                d.allocs.insert(va, Mem::Async { dev, h });
                // SAFETY: checked non-null above.
                unsafe { dptr.write(va) };
                CUDA_SUCCESS
            }
            Err(e) => {
                let _ = d.rm.free(dev, h);
                e
            }
        }
    })
}

/// Bytes per element of a `CUarray_format` (`cuda.h`), `None` for unknown formats.
fn array_format_bytes(format: u32) -> Option<u64> {
    match format {
        0x01 | 0x08 => Some(1),
        0x02 | 0x09 | 0x10 => Some(2),
        0x03 | 0x0a | 0x20 => Some(4),
        _ => None,
    }
}

/// `cuArrayCreate_v2`: one RM vidmem object of `Width × max(Height, 1) × NumChannels × element size`
/// (`CUDA_ARRAY_DESCRIPTOR`: `Width` size_t at 0, `Height` size_t at 8, `Format` u32 at 16,
/// `NumChannels` u32 at 20).
///
/// # Safety
/// `handle` is null or valid for a write; `desc` is null or points to a `CUDA_ARRAY_DESCRIPTOR`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(handle: *mut *mut c_void, desc: *const c_void) -> CUresult {
    if handle.is_null() || desc.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: `desc` points to a CUDA_ARRAY_DESCRIPTOR (24 bytes).
    let (width, height, format, channels) = unsafe {
        let p = desc.cast::<u8>();
        (
            p.cast::<u64>().read_unaligned(),
            p.add(8).cast::<u64>().read_unaligned(),
            read_u32(p, 16),
            read_u32(p, 20),
        )
    };
    let Some(elem) = array_format_bytes(format) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if width == 0 || !matches!(channels, 1 | 2 | 4) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some(bytes) = width
        .checked_mul(height.max(1))
        .and_then(|b| b.checked_mul(u64::from(channels) * elem))
    else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    with_driver(|d| {
        let gpu = match current_gpu(d) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let dev = match device_handle(d, gpu) {
            Ok(h) => h,
            Err(e) => return e,
        };
        match d.rm.alloc_vidmem(dev, bytes, d.via) {
            Ok(h) => {
                let a = d.next_handle;
                d.next_handle += 1;
                d.arrays.insert(a, (dev, h));
                // SAFETY: checked non-null above.
                unsafe { handle.write(a as *mut c_void) };
                CUDA_SUCCESS
            }
            Err(e) => rm_to_cu(&e),
        }
    })
}

/// `cuArrayDestroy`.
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(handle: *mut c_void) -> CUresult {
    with_driver(|d| match d.arrays.remove(&(handle as usize)) {
        Some((dev, h)) => {
            d.rm.free(dev, h)
                .map_err(|e| rm_to_cu(&e))
                .err()
                .unwrap_or(CUDA_SUCCESS)
        }
        None => CUDA_ERROR_INVALID_HANDLE,
    })
}

/// Reads a `u32` at byte `off` of a caller's struct.
///
/// # Safety
/// `p` points to at least `off + 4` readable bytes.
unsafe fn read_u32(p: *const u8, off: usize) -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: per the contract.
    unsafe { std::ptr::copy_nonoverlapping(p.add(off), b.as_mut_ptr(), 4) };
    u32::from_ne_bytes(b)
}

/// Checks a `CUmemLocation` (`type` u32, `id` i32) names a simulated GPU; returns its index.
fn device_location(d: &Driver, kind: u32, id: u32) -> Result<u32, CUresult> {
    match kind {
        CU_MEM_LOCATION_TYPE_DEVICE => {
            let id = c_int::from_ne_bytes(id.to_ne_bytes());
            gpu(d, id).map(|g| g.index).ok_or(CUDA_ERROR_INVALID_DEVICE)
        }
        // HOST, HOST_NUMA, HOST_NUMA_CURRENT: not a GPU (access descriptors name GPUs here).
        CU_MEM_LOCATION_TYPE_HOST..=CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT => Err(CUDA_ERROR_NOT_SUPPORTED),
        _ => Err(CUDA_ERROR_INVALID_VALUE),
    }
}

/// `CU_MEM_LOCATION_TYPE_HOST` (CUDA 12.2+: `cuMemCreate` of pinned host memory).
const CU_MEM_LOCATION_TYPE_HOST: u32 = 2;
/// `CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT` (after `_HOST_NUMA` = 3).
const CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT: u32 = 4;

/// Validates a `CUmemAllocationProp`; returns the GPU index, or `None` for a host location (`HOST`,
/// `HOST_NUMA`, `HOST_NUMA_CURRENT`: pinned host memory, which the real driver accepts since CUDA
/// 12.2 and which uses no device memory; NCCL and ggml's VMM pool allocate so, peer case C12).
///
/// # Safety
/// `prop` is non-null and points to a `CUmemAllocationProp`.
unsafe fn prop_gpu(d: &Driver, prop: *const u8) -> Result<Option<u32>, CUresult> {
    // SAFETY: the struct is CU_MEM_ALLOCATION_PROP_SIZE bytes; we read its first 16.
    let (kind, loc_type, loc_id) = unsafe { (read_u32(prop, 0), read_u32(prop, 8), read_u32(prop, 12)) };
    if kind != CU_MEM_ALLOCATION_TYPE_PINNED {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    if (CU_MEM_LOCATION_TYPE_HOST..=CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT).contains(&loc_type) {
        return Ok(None);
    }
    device_location(d, loc_type, loc_id).map(Some)
}

/// `cuMemGetAllocationGranularity`: [`VMM_GRANULARITY`] (2 MiB) for both options.
///
/// # Safety
/// `granularity` is null or valid for a write; `prop` is null or points to a `CUmemAllocationProp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const c_void,
    option: c_int,
) -> CUresult {
    if granularity.is_null()
        || prop.is_null()
        || !(0..=CU_MEM_ALLOC_GRANULARITY_RECOMMENDED).contains(&option)
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        // SAFETY: non-null, a CUmemAllocationProp per the contract.
        if let Err(e) = unsafe { prop_gpu(d, prop.cast()) } {
            return e;
        }
        // SAFETY: checked non-null above.
        unsafe { granularity.write(VMM_GRANULARITY as usize) };
        CUDA_SUCCESS
    })
}

/// `cuMemCreate`: one RM vidmem object of `size` bytes on the GPU `prop->location.id`, or for a host
/// location (`HOST`, `HOST_NUMA`, `HOST_NUMA_CURRENT`) pinned host memory, which is nothing on any GPU
/// (no RM object; the ground truth does not change). `size` must be a multiple of
/// [`VMM_GRANULARITY`], `prop->type` `CU_MEM_ALLOCATION_TYPE_PINNED`, `flags` 0.
///
/// # Safety
/// `handle` is null or valid for a write; `prop` is null or points to a `CUmemAllocationProp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const c_void,
    flags: u64,
) -> CUresult {
    let bytes = size as u64;
    if handle.is_null()
        || prop.is_null()
        || flags != 0
        || bytes == 0
        || !bytes.is_multiple_of(VMM_GRANULARITY)
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        // SAFETY: non-null, a CUmemAllocationProp per the contract.
        let gpu = match unsafe { prop_gpu(d, prop.cast()) } {
            Ok(Some(g)) => g,
            Ok(None) => {
                let id = d.next_phys;
                d.next_phys += 1;
                d.phys.insert(
                    id,
                    Phys {
                        dev: None,
                        h: 0,
                        bytes,
                        maps: 0,
                        released: false,
                    },
                );
                // SAFETY: checked non-null above.
                unsafe { handle.write(id) };
                return CUDA_SUCCESS;
            }
            Err(e) => return e,
        };
        let dev = match device_handle(d, gpu) {
            Ok(h) => h,
            Err(e) => return e,
        };
        let h = match d.rm.alloc_vidmem(dev, bytes, d.via) {
            Ok(h) => h,
            Err(e) => return rm_to_cu(&e),
        };
        let id = d.next_phys;
        d.next_phys += 1;
        d.phys.insert(
            id,
            Phys {
                dev: Some(dev),
                h,
                bytes,
                maps: 0,
                released: false,
            },
        );
        // SAFETY: checked non-null above.
        unsafe { handle.write(id) };
        CUDA_SUCCESS
    })
}

/// Frees the RM object of a physical allocation once it is released and unmapped.
fn reap(d: &mut Driver, id: CUmemGenericAllocationHandle) -> CUresult {
    match d.phys.get(&id) {
        Some(p) if p.released && p.maps == 0 => {}
        _ => return CUDA_SUCCESS,
    }
    match d.phys.remove(&id) {
        Some(Phys {
            dev: Some(dev), h, ..
        }) => match d.rm.free(dev, h) {
            Ok(()) => CUDA_SUCCESS,
            Err(e) => rm_to_cu(&e),
        },
        _ => CUDA_SUCCESS,
    }
}

/// `cuMemRelease`: releases a `cuMemCreate` handle. Its RM object is freed now, or with the last
/// `cuMemUnmap` when it is still mapped (as the driver API documents).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    with_driver(|d| match d.phys.get_mut(&handle) {
        Some(p) if !p.released => {
            p.released = true;
            reap(d, handle)
        }
        _ => CUDA_ERROR_INVALID_VALUE,
    })
}

/// `cuMemAddressReserve`: reserves `size` bytes of virtual address space (a multiple of
/// [`VMM_GRANULARITY`]) aligned to `alignment` (0: the granularity; else a power of two). The `addr`
/// hint is ignored, as the driver may; `flags` must be 0. No memory, no RM ioctl.
///
/// # Safety
/// `ptr` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    alignment: usize,
    _addr: CUdeviceptr,
    flags: u64,
) -> CUresult {
    let (bytes, align) = (size as u64, alignment as u64);
    if ptr.is_null()
        || flags != 0
        || bytes == 0
        || !bytes.is_multiple_of(VMM_GRANULARITY)
        || (align != 0 && !align.is_power_of_two())
    {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| match take_va(d, bytes, align.max(VMM_GRANULARITY)) {
        Ok(va) => {
            d.reservations.insert(va, bytes);
            // SAFETY: checked non-null above.
            unsafe { ptr.write(va) };
            CUDA_SUCCESS
        }
        Err(e) => e,
    })
}

/// `cuMemAddressFree`: frees a whole reservation (`ptr` and `size` as reserved). A reservation with
/// live mappings is refused with `CUDA_ERROR_INVALID_VALUE` (unmap first).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    with_driver(|d| {
        if d.reservations.get(&ptr) != Some(&(size as u64)) {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let end = ptr.saturating_add(size as u64);
        if d.mappings.range(ptr..end).next().is_some() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        d.reservations.remove(&ptr);
        CUDA_SUCCESS
    })
}

/// Whether `[ptr, ptr + bytes)` lies inside one reservation.
fn reserved(d: &Driver, ptr: u64, bytes: u64) -> bool {
    let Some(end) = ptr.checked_add(bytes) else {
        return false;
    };
    d.reservations
        .range(..=ptr)
        .next_back()
        .is_some_and(|(base, len)| end <= base.saturating_add(*len))
}

/// `cuMemMap`: maps `size` bytes of physical allocation `handle` (from `offset` 0, which the driver
/// API requires) at `ptr` inside a reservation. Bookkeeping only: no RM ioctl (the real driver maps
/// through UVM external ranges).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> CUresult {
    let bytes = size as u64;
    if flags != 0 || offset != 0 || bytes == 0 || !bytes.is_multiple_of(VMM_GRANULARITY) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(p) = d.phys.get(&handle).filter(|p| !p.released) else {
            return CUDA_ERROR_INVALID_HANDLE;
        };
        if bytes > p.bytes || !reserved(d, ptr, bytes) {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let end = ptr.saturating_add(bytes);
        let overlaps_before = d
            .mappings
            .range(..=ptr)
            .next_back()
            .is_some_and(|(b, m)| b.saturating_add(m.bytes) > ptr);
        if overlaps_before || d.mappings.range(ptr..end).next().is_some() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        if let Some(p) = d.phys.get_mut(&handle) {
            p.maps += 1;
        }
        d.mappings.insert(
            ptr,
            Mapping {
                bytes,
                handle,
                access: BTreeMap::new(),
            },
        );
        CUDA_SUCCESS
    })
}

/// The mappings that exactly tile `[ptr, ptr + bytes)`, or `None`.
fn tiling(d: &Driver, ptr: u64, bytes: u64) -> Option<Vec<u64>> {
    let end = ptr.checked_add(bytes)?;
    let mut cursor = ptr;
    let mut bases = Vec::new();
    for (b, m) in d.mappings.range(ptr..end) {
        if *b != cursor {
            return None;
        }
        cursor = b.saturating_add(m.bytes);
        bases.push(*b);
    }
    (cursor == end && !bases.is_empty()).then_some(bases)
}

/// `cuMemUnmap`: unmaps the whole mappings that make up `[ptr, ptr + size)`; a released physical
/// allocation whose last mapping goes is freed (its RM object).
///
/// # Safety
/// None beyond the C API's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    with_driver(|d| {
        let Some(bases) = tiling(d, ptr, size as u64) else {
            return CUDA_ERROR_INVALID_VALUE;
        };
        let mut rc = CUDA_SUCCESS;
        for b in bases {
            let Some(m) = d.mappings.remove(&b) else {
                continue;
            };
            if let Some(p) = d.phys.get_mut(&m.handle) {
                p.maps = p.maps.saturating_sub(1);
            }
            let r = reap(d, m.handle);
            if rc == CUDA_SUCCESS {
                rc = r;
            }
        }
        rc
    })
}

/// `cuMemSetAccess`: records the access flags of `count` `CUmemAccessDesc`s for the mappings that make
/// up `[ptr, ptr + size)`. Bookkeeping only.
///
/// # Safety
/// `desc` is null or points to `count` `CUmemAccessDesc`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const c_void,
    count: usize,
) -> CUresult {
    if desc.is_null() || count == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    with_driver(|d| {
        let Some(bases) = tiling(d, ptr, size as u64) else {
            return CUDA_ERROR_INVALID_VALUE;
        };
        let mut grants = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: `desc` holds `count` descriptors of CU_MEM_ACCESS_DESC_SIZE bytes each.
            let (kind, id, flags) = unsafe {
                let p = desc.cast::<u8>().add(i * CU_MEM_ACCESS_DESC_SIZE);
                (read_u32(p, 0), read_u32(p, 4), read_u32(p, 8))
            };
            let gpu = match device_location(d, kind, id) {
                Ok(g) => g,
                Err(e) => return e,
            };
            if !matches!(flags, 0 | 1 | CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
                return CUDA_ERROR_INVALID_VALUE;
            }
            grants.push((gpu, flags));
        }
        for b in bases {
            if let Some(m) = d.mappings.get_mut(&b) {
                m.access.extend(grants.iter().copied());
            }
        }
        CUDA_SUCCESS
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
#[allow(
    non_snake_case,
    clippy::too_many_arguments,
    reason = "named after the C entry point it implements, with its arguments"
)]
unsafe fn cuLaunchKernel_impl(
    ptsz: bool,
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
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
    if f.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    launch(Some(grid(grid_x, grid_y, grid_z)))
}

/// `cuLaunchCooperativeKernel`.
///
/// # Safety
/// None beyond the C API's; the parameter array is not read.
#[allow(
    non_snake_case,
    clippy::too_many_arguments,
    reason = "named after the C entry point it implements, with its arguments"
)]
unsafe fn cuLaunchCooperativeKernel_impl(
    ptsz: bool,
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
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
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
#[allow(non_snake_case, reason = "named after the C entry point it implements")]
unsafe fn cuLaunchKernelEx_impl(
    ptsz: bool,
    config: *const c_uint,
    f: *mut c_void,
    _kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
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
#[allow(non_snake_case, reason = "named after the C entry point it implements")]
unsafe fn cuGraphLaunch_impl(ptsz: bool, graph_exec: *mut c_void, _stream: *mut c_void) -> CUresult {
    // The twins are distinct code in the real library: never let the two entry points merge.
    std::hint::black_box(ptsz);
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

/// The entry points that have a per-thread-default-stream twin (`cuda.h`: code built with
/// `--default-stream per-thread` calls `<name>_ptsz`). In the real library each is its own exported
/// function with the base call's arguments; here both do the same work through one implementation,
/// and are distinct code, so a uprobe on one never sees calls of the other.
macro_rules! with_ptsz_twin {
    ($($base:ident / $twin:ident => $imp:ident ( $($arg:ident : $ty:ty),* );)*) => {$(
        #[doc = concat!("`", stringify!($base), "`.")]
        ///
        /// # Safety
        /// The C API's contract for the pointers passed.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $base($($arg: $ty),*) -> CUresult {
            // SAFETY: forwarded under the same contract.
            unsafe { $imp(false, $($arg),*) }
        }

        #[doc = concat!("`", stringify!($twin), "`: as [`", stringify!($base), "`].")]
        ///
        /// # Safety
        /// As the base call.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $twin($($arg: $ty),*) -> CUresult {
            // SAFETY: forwarded under the same contract.
            unsafe { $imp(true, $($arg),*) }
        }
    )*};
}

with_ptsz_twin! {
    cuMemAllocAsync / cuMemAllocAsync_ptsz => cuMemAllocAsync_impl(
        dptr: *mut CUdeviceptr, bytesize: usize, stream: CUstream);
    cuMemFreeAsync / cuMemFreeAsync_ptsz => cuMemFreeAsync_impl(dptr: CUdeviceptr, stream: CUstream);
    cuMemAllocFromPoolAsync / cuMemAllocFromPoolAsync_ptsz => cuMemAllocFromPoolAsync_impl(
        dptr: *mut CUdeviceptr, bytesize: usize, pool: *mut c_void, stream: CUstream);
    cuLaunchKernel / cuLaunchKernel_ptsz => cuLaunchKernel_impl(
        f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void);
    cuLaunchCooperativeKernel / cuLaunchCooperativeKernel_ptsz => cuLaunchCooperativeKernel_impl(
        f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void);
    cuLaunchKernelEx / cuLaunchKernelEx_ptsz => cuLaunchKernelEx_impl(
        config: *const c_uint, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void);
    cuGraphLaunch / cuGraphLaunch_ptsz => cuGraphLaunch_impl(graph_exec: *mut c_void, stream: *mut c_void);
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
        "cuDevicePrimaryCtxRetain" => cuDevicePrimaryCtxRetain as *mut c_void,
        "cuDevicePrimaryCtxRelease" => cuDevicePrimaryCtxRelease as *mut c_void,
        "cuDevicePrimaryCtxRelease_v2" => cuDevicePrimaryCtxRelease_v2 as *mut c_void,
        "cuCtxDestroy" | "cuCtxDestroy_v2" => cuCtxDestroy_v2 as *mut c_void,
        "cuCtxGetCurrent" => cuCtxGetCurrent as *mut c_void,
        "cuCtxGetDevice" => cuCtxGetDevice as *mut c_void,
        "cuCtxSetCurrent" => cuCtxSetCurrent as *mut c_void,
        "cuMemAlloc" | "cuMemAlloc_v2" => cuMemAlloc_v2 as *mut c_void,
        "cuMemFree" | "cuMemFree_v2" => cuMemFree_v2 as *mut c_void,
        "cuMemAllocPitch" | "cuMemAllocPitch_v2" => cuMemAllocPitch_v2 as *mut c_void,
        "cuMemAllocManaged" => cuMemAllocManaged as *mut c_void,
        "cuMemAllocAsync" => cuMemAllocAsync as *mut c_void,
        "cuMemAllocAsync_ptsz" => cuMemAllocAsync_ptsz as *mut c_void,
        "cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as *mut c_void,
        "cuMemAllocFromPoolAsync_ptsz" => cuMemAllocFromPoolAsync_ptsz as *mut c_void,
        "cuMemPoolCreate" => cuMemPoolCreate as *mut c_void,
        "cuMemPoolDestroy" => cuMemPoolDestroy as *mut c_void,
        "cuArrayCreate" | "cuArrayCreate_v2" => cuArrayCreate_v2 as *mut c_void,
        "cuArrayDestroy" => cuArrayDestroy as *mut c_void,
        "cuMemFreeAsync" => cuMemFreeAsync as *mut c_void,
        "cuMemFreeAsync_ptsz" => cuMemFreeAsync_ptsz as *mut c_void,
        "cuMemGetAllocationGranularity" => cuMemGetAllocationGranularity as *mut c_void,
        "cuMemCreate" => cuMemCreate as *mut c_void,
        "cuMemRelease" => cuMemRelease as *mut c_void,
        "cuMemAddressReserve" => cuMemAddressReserve as *mut c_void,
        "cuMemAddressFree" => cuMemAddressFree as *mut c_void,
        "cuMemMap" => cuMemMap as *mut c_void,
        "cuMemUnmap" => cuMemUnmap as *mut c_void,
        "cuMemSetAccess" => cuMemSetAccess as *mut c_void,
        "cuMemGetInfo" | "cuMemGetInfo_v2" => cuMemGetInfo_v2 as *mut c_void,
        "cuLaunchKernel" => cuLaunchKernel as *mut c_void,
        "cuLaunchKernel_ptsz" => cuLaunchKernel_ptsz as *mut c_void,
        "cuLaunchCooperativeKernel" => cuLaunchCooperativeKernel as *mut c_void,
        "cuLaunchCooperativeKernel_ptsz" => cuLaunchCooperativeKernel_ptsz as *mut c_void,
        "cuLaunchKernelEx" => cuLaunchKernelEx as *mut c_void,
        "cuLaunchKernelEx_ptsz" => cuLaunchKernelEx_ptsz as *mut c_void,
        "cuGraphLaunch" => cuGraphLaunch as *mut c_void,
        "cuGraphLaunch_ptsz" => cuGraphLaunch_ptsz as *mut c_void,
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
