//! Hook bodies. Each reserves in the shared region before calling the driver, returns the
//! reservation when the driver fails, and records what it allocated so the free returns it.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

use hami_api::region::UNLIMITED;

use crate::state::{Enforcer, Mode, mode};
use crate::symbols::{hook_for_real, real};
use crate::{
    CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_FOUND, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, CUresult,
};

/// `CUmemAllocationProp.location` offsets (`type` u32, `requestedHandleTypes` u32,
/// `location {type u32, id i32}`; `cuda.h`).
const PROP_LOCATION_TYPE: usize = 8;
/// See [`PROP_LOCATION_TYPE`].
const PROP_LOCATION_ID: usize = 12;
/// `CU_MEM_LOCATION_TYPE_DEVICE`.
const LOCATION_DEVICE: u32 = 1;

/// The CUDA ordinal of the calling thread's current context (`cuCtxGetDevice`).
pub(crate) fn current_device() -> Option<usize> {
    let f = real::cuCtxGetDevice()?;
    let mut dev: c_int = -1;
    // SAFETY: a valid out-pointer.
    (unsafe { f(&raw mut dev) } == CUDA_SUCCESS)
        .then_some(())
        .and_then(|()| usize::try_from(dev).ok())
}

/// Runs `alloc` under a reservation of `bytes` on `dev`: refuses with OOM when over the limit,
/// returns the reservation when the driver fails, records `key()` on success.
fn reserved(
    e: &Enforcer,
    dev: usize,
    bytes: u64,
    alloc: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> u64,
) -> CUresult {
    if !e.reserve(dev, bytes) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = alloc();
    if rc == CUDA_SUCCESS {
        e.record(key(), dev, bytes);
    } else {
        e.unreserve(dev, bytes);
    }
    rc
}

/// Calls `alloc` under the process's mode: pass-through, enforced on the container device of the
/// driver's device `ordinal()` (when known), or refused (a broken configuration, or a device that is
/// not one of the container's).
fn on_device(
    ordinal: impl FnOnce() -> Option<usize>,
    bytes: u64,
    alloc: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> u64,
) -> CUresult {
    match mode() {
        Mode::Off => alloc(),
        Mode::Broken(why) => {
            crate::log(|| format!("refusing an allocation: {why}"));
            CUDA_ERROR_OUT_OF_MEMORY
        }
        Mode::Waiting(path) => {
            crate::log(|| format!("refusing an allocation: no limits yet ({path} does not exist)"));
            CUDA_ERROR_OUT_OF_MEMORY
        }
        Mode::On(e) => match ordinal() {
            Some(ordinal) => match e.index(ordinal) {
                Some(dev) => reserved(e, dev, bytes, alloc, key),
                None => CUDA_ERROR_OUT_OF_MEMORY,
            },
            None => alloc(),
        },
    }
}

/// An allocation that writes a device pointer to `dptr`, on the current device.
fn alloc_ptr(dptr: *mut u64, bytes: u64, alloc: impl FnOnce() -> CUresult) -> CUresult {
    if dptr.is_null() {
        // The driver validates (and refuses) its own arguments.
        return alloc();
    }
    // SAFETY: written by the driver on success.
    on_device(current_device, bytes, alloc, || unsafe { *dptr })
}

fn free_recorded(key: u64, free: impl FnOnce() -> CUresult) -> CUresult {
    let rc = free();
    if rc == CUDA_SUCCESS
        && let Mode::On(e) = mode()
        && let Some((dev, bytes)) = e.forget(key)
    {
        e.unreserve(dev, bytes);
    }
    rc
}

pub(crate) unsafe fn init(flags: c_uint) -> CUresult {
    let _ = mode();
    match real::cuInit() {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(flags) },
        None => crate::CUDA_ERROR_NOT_INITIALIZED,
    }
}

pub(crate) unsafe fn ctx_get_device(device: *mut c_int) -> CUresult {
    match real::cuCtxGetDevice() {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(device) },
        None => CUDA_ERROR_NOT_FOUND,
    }
}

pub(crate) unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: c_ulonglong,
) -> CUresult {
    let Some(f) = real::cuGetProcAddress() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { f(symbol, pfn, version, flags) };
    if rc == CUDA_SUCCESS && !pfn.is_null() {
        // SAFETY: the driver wrote a function pointer there.
        unsafe {
            if let Some(h) = hook_for_real(*pfn) {
                *pfn = h;
            }
        }
    }
    rc
}

pub(crate) unsafe fn get_proc_address_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: c_ulonglong,
    status: *mut c_int,
) -> CUresult {
    let Some(f) = real::cuGetProcAddress_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { f(symbol, pfn, version, flags, status) };
    if rc == CUDA_SUCCESS && !pfn.is_null() {
        // SAFETY: the driver wrote a function pointer there.
        unsafe {
            if let Some(h) = hook_for_real(*pfn) {
                *pfn = h;
            }
        }
    }
    rc
}

pub(crate) unsafe fn mem_alloc(dptr: *mut u64, bytesize: usize) -> CUresult {
    let Some(f) = real::cuMemAlloc_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    alloc_ptr(dptr, bytesize as u64, || unsafe { f(dptr, bytesize) })
}

pub(crate) unsafe fn mem_alloc_pitch(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    let Some(f) = real::cuMemAllocPitch_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if dptr.is_null() || pitch.is_null() {
        // SAFETY: the driver validates its own arguments.
        return unsafe { f(dptr, pitch, width, height, elem) };
    }
    // Rows are padded; reserve a 512-byte-aligned pitch (the usual texture alignment) and settle to
    // the driver's pitch afterwards.
    let estimate = (width.div_ceil(512) * 512) as u64 * height as u64;
    // SAFETY: forwarding.
    let rc = alloc_ptr(dptr, estimate, || unsafe { f(dptr, pitch, width, height, elem) });
    // Settle the reservation to the driver's pitch (the device is the one the allocation was
    // recorded on).
    if rc == CUDA_SUCCESS
        && let Mode::On(e) = mode()
        // SAFETY: written by the driver on success.
        && let (p, actual) = unsafe { (*dptr, (*pitch) as u64 * height as u64) }
        && let Some((dev, held)) = e.forget(p)
    {
        let settled = if actual > held && !e.reserve(dev, actual - held) {
            // Over the limit by the padding alone: keep what was reserved (the driver holds a little
            // more than accounted, until the free).
            held
        } else {
            if actual < held {
                e.unreserve(dev, held - actual);
            }
            actual
        };
        e.record(p, dev, settled);
    }
    rc
}

pub(crate) unsafe fn mem_alloc_managed(dptr: *mut u64, bytesize: usize, flags: c_uint) -> CUresult {
    let Some(f) = real::cuMemAllocManaged() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    alloc_ptr(dptr, bytesize as u64, || unsafe { f(dptr, bytesize, flags) })
}

pub(crate) unsafe fn mem_alloc_async(dptr: *mut u64, bytesize: usize, stream: *mut c_void) -> CUresult {
    // SAFETY: forwarding.
    unsafe { mem_alloc_async_with(real::cuMemAllocAsync(), dptr, bytesize, stream) }
}

/// `cuMemAllocAsync_ptsz` (per-thread default stream): the same hook around the driver's twin.
pub(crate) unsafe fn mem_alloc_async_ptsz(dptr: *mut u64, bytesize: usize, stream: *mut c_void) -> CUresult {
    // SAFETY: forwarding.
    unsafe { mem_alloc_async_with(real::cuMemAllocAsync_ptsz(), dptr, bytesize, stream) }
}

type MemAllocAsyncFn = unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> CUresult;

unsafe fn mem_alloc_async_with(
    real: Option<MemAllocAsyncFn>,
    dptr: *mut u64,
    bytesize: usize,
    stream: *mut c_void,
) -> CUresult {
    let Some(f) = real else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    alloc_ptr(dptr, bytesize as u64, || unsafe { f(dptr, bytesize, stream) })
}

pub(crate) unsafe fn mem_create(
    handle: *mut c_ulonglong,
    size: usize,
    prop: *const c_void,
    flags: c_ulonglong,
) -> CUresult {
    let Some(f) = real::cuMemCreate() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if handle.is_null() || prop.is_null() {
        // SAFETY: the driver validates its own arguments.
        return unsafe { f(handle, size, prop, flags) };
    }
    // SAFETY: `prop` points to a CUmemAllocationProp (location.type at 8, location.id at 12).
    let (location, dev) = unsafe {
        let p = prop.cast::<u8>();
        (
            p.add(PROP_LOCATION_TYPE).cast::<u32>().read_unaligned(),
            p.add(PROP_LOCATION_ID).cast::<i32>().read_unaligned(),
        )
    };
    if location != LOCATION_DEVICE {
        // Host or host-NUMA memory (NCCL probes, ggml pools): not device memory, never charged to a GPU
        // (peer case C12).
        // SAFETY: forwarding.
        return unsafe { f(handle, size, prop, flags) };
    }
    let Ok(dev) = usize::try_from(dev) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    on_device(
        || Some(dev),
        size as u64,
        // SAFETY: forwarding.
        || unsafe { f(handle, size, prop, flags) },
        // SAFETY: written by the driver on success.
        || unsafe { *handle },
    )
}

pub(crate) unsafe fn mem_release(handle: c_ulonglong) -> CUresult {
    let Some(f) = real::cuMemRelease() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(handle) };
    if rc == CUDA_SUCCESS
        && let Mode::On(e) = mode()
    {
        e.released(handle);
    }
    rc
}

pub(crate) unsafe fn mem_map(
    ptr: u64,
    size: usize,
    offset: usize,
    handle: c_ulonglong,
    flags: c_ulonglong,
) -> CUresult {
    let Some(f) = real::cuMemMap() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(ptr, size, offset, handle, flags) };
    if rc == CUDA_SUCCESS
        && let Mode::On(e) = mode()
    {
        e.mapped(ptr, handle);
    }
    rc
}

pub(crate) unsafe fn mem_unmap(ptr: u64, size: usize) -> CUresult {
    let Some(f) = real::cuMemUnmap() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(ptr, size) };
    if rc == CUDA_SUCCESS
        && let Mode::On(e) = mode()
    {
        e.unmapped(ptr);
    }
    rc
}

pub(crate) unsafe fn mem_free(dptr: u64) -> CUresult {
    let Some(f) = real::cuMemFree_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    free_recorded(dptr, || unsafe { f(dptr) })
}

pub(crate) unsafe fn mem_free_async(dptr: u64, stream: *mut c_void) -> CUresult {
    mem_free_async_with(real::cuMemFreeAsync(), dptr, stream)
}

/// `cuMemFreeAsync_ptsz`: the same hook around the driver's twin.
pub(crate) unsafe fn mem_free_async_ptsz(dptr: u64, stream: *mut c_void) -> CUresult {
    mem_free_async_with(real::cuMemFreeAsync_ptsz(), dptr, stream)
}

fn mem_free_async_with(
    real: Option<unsafe extern "C" fn(u64, *mut c_void) -> CUresult>,
    dptr: u64,
    stream: *mut c_void,
) -> CUresult {
    let Some(f) = real else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    free_recorded(dptr, || unsafe { f(dptr, stream) })
}

pub(crate) unsafe fn mem_get_info(free: *mut usize, total: *mut usize) -> CUresult {
    let Some(f) = real::cuMemGetInfo_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    if let Mode::On(e) = mode()
        && let Some(dev) = current_device().and_then(|o| e.index(o))
    {
        let limit = e.limit(dev);
        if limit != UNLIMITED {
            // SAFETY: written by the driver above.
            unsafe {
                let t = (*total as u64).min(limit);
                let used = e.region.used(dev);
                *total = usize::try_from(t).unwrap_or(usize::MAX);
                *free = usize::try_from(t.saturating_sub(used)).unwrap_or(0).min(*free);
            }
        }
    }
    rc
}

pub(crate) unsafe fn device_total_mem(bytes: *mut usize, dev: c_int) -> CUresult {
    let Some(f) = real::cuDeviceTotalMem_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(bytes, dev) };
    if rc != CUDA_SUCCESS || bytes.is_null() {
        return rc;
    }
    if let Mode::On(e) = mode()
        && let Some(d) = usize::try_from(dev).ok().and_then(|o| e.index(o))
    {
        let limit = e.limit(d);
        if limit != UNLIMITED {
            // SAFETY: written by the driver above.
            unsafe { *bytes = usize::try_from((*bytes as u64).min(limit)).unwrap_or(usize::MAX) };
        }
    }
    rc
}

pub(crate) unsafe fn nvml_device_get_index(device: *mut c_void, index: *mut c_uint) -> CUresult {
    match crate::symbols::nvml::real::nvmlDeviceGetIndex() {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(device, index) },
        None => NVML_ERROR_FUNCTION_NOT_FOUND,
    }
}

/// `NVML_ERROR_FUNCTION_NOT_FOUND`.
const NVML_ERROR_FUNCTION_NOT_FOUND: CUresult = 13;

/// The UUID NVML gives for `device` (`nvmlDeviceGetUUID`).
fn nvml_uuid(device: *mut c_void) -> Option<String> {
    type GetUuid = unsafe extern "C" fn(*mut c_void, *mut c_char, c_uint) -> CUresult;
    static F: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let p = *F.get_or_init(|| crate::real_nvml_symbol(c"nvmlDeviceGetUUID") as usize);
    if p == 0 {
        return None;
    }
    // SAFETY: NVML's nvmlDeviceGetUUID, whose C signature is GetUuid.
    let f = unsafe { std::mem::transmute::<usize, GetUuid>(p) };
    let mut buf = [0 as c_char; 96];
    // SAFETY: a 96-byte buffer (NVML_DEVICE_UUID_V2_BUFFER_SIZE); the handle is the caller's.
    if unsafe { f(device, buf.as_mut_ptr(), 96) } != 0 {
        return None;
    }
    buf[95] = 0;
    // SAFETY: NUL-terminated: NVML wrote a C string, and the last byte is 0 in any case.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    s.to_str().ok().map(str::to_owned)
}

/// The container's (limit, used) on the NVML `device`, when limited. With trusted limits the device
/// is found by UUID; otherwise by NVML index (HAMi's rule).
fn nvml_limit(device: *mut c_void) -> Option<(u64, u64)> {
    let Mode::On(e) = mode() else { return None };
    let dev = if e.by_uuid() {
        e.index_of_uuid(&nvml_uuid(device)?)?
    } else {
        let f = crate::symbols::nvml::real::nvmlDeviceGetIndex()?;
        let mut idx: c_uint = 0;
        // SAFETY: a valid out-pointer; the handle is the caller's.
        if unsafe { f(device, &raw mut idx) } != 0 {
            return None;
        }
        usize::try_from(idx).ok()?
    };
    let limit = e.limit(dev);
    (limit != UNLIMITED).then(|| (limit, e.region.used(dev)))
}

/// `nvmlMemory_t` = `{ total, free, used }` (u64 each, `nvml.h`).
pub(crate) unsafe fn nvml_memory_info(device: *mut c_void, memory: *mut c_void) -> CUresult {
    let Some(f) = crate::symbols::nvml::real::nvmlDeviceGetMemoryInfo() else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(device, memory) };
    if rc == 0
        && !memory.is_null()
        && let Some((limit, used)) = nvml_limit(device)
    {
        let m = memory.cast::<u64>();
        // SAFETY: the driver filled an nvmlMemory_t there.
        unsafe {
            let total = (*m).min(limit);
            m.write(total);
            m.add(1).write(total.saturating_sub(used));
            m.add(2).write(used.min(total));
        }
    }
    rc
}

/// `nvmlMemory_v2_t` = `{ u32 version; u64 total, reserved, free, used }` (offsets 0, 8, 16, 24, 32).
pub(crate) unsafe fn nvml_memory_info_v2(device: *mut c_void, memory: *mut c_void) -> CUresult {
    let Some(f) = crate::symbols::nvml::real::nvmlDeviceGetMemoryInfo_v2() else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(device, memory) };
    if rc == 0
        && !memory.is_null()
        && let Some((limit, used)) = nvml_limit(device)
    {
        let m = memory.cast::<u8>();
        // SAFETY: the driver filled an nvmlMemory_v2_t there.
        unsafe {
            let total = m.add(8).cast::<u64>().read_unaligned().min(limit);
            m.add(8).cast::<u64>().write_unaligned(total);
            m.add(16).cast::<u64>().write_unaligned(0);
            m.add(24)
                .cast::<u64>()
                .write_unaligned(total.saturating_sub(used));
            m.add(32).cast::<u64>().write_unaligned(used.min(total));
        }
    }
    rc
}

#[allow(clippy::too_many_arguments, reason = "the CUDA driver API's signature")]
pub(crate) unsafe fn launch_kernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchKernel(), |real| {
        // SAFETY: forwarding.
        unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) }
    })
}

/// `cuLaunchKernel_ptsz`: the same hook around the driver's twin.
#[allow(clippy::too_many_arguments, reason = "the C signature")]
pub(crate) unsafe fn launch_kernel_ptsz(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchKernel_ptsz(), |real| {
        // SAFETY: forwarding.
        unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) }
    })
}

/// Waits for the SM limiter, then launches through `real` (the driver's entry point, when found).
fn throttled<F>(real: Option<F>, launch: impl FnOnce(F) -> CUresult) -> CUresult {
    let Some(real) = real else {
        return CUDA_ERROR_NOT_FOUND;
    };
    crate::throttle::before_launch();
    launch(real)
}

pub(crate) unsafe fn launch_kernel_ex(
    config: *const c_void,
    f: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchKernelEx(), |real| {
        // SAFETY: forwarding.
        unsafe { real(config, f, params, extra) }
    })
}

/// `cuLaunchKernelEx_ptsz`: the same hook around the driver's twin.
pub(crate) unsafe fn launch_kernel_ex_ptsz(
    config: *const c_void,
    f: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchKernelEx_ptsz(), |real| {
        // SAFETY: forwarding.
        unsafe { real(config, f, params, extra) }
    })
}

#[allow(clippy::too_many_arguments, reason = "the CUDA driver API's signature")]
pub(crate) unsafe fn launch_cooperative(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchCooperativeKernel(), |real| {
        // SAFETY: forwarding.
        unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params) }
    })
}

/// `cuLaunchCooperativeKernel_ptsz`: the same hook around the driver's twin.
#[allow(clippy::too_many_arguments, reason = "the C signature")]
pub(crate) unsafe fn launch_cooperative_ptsz(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
) -> CUresult {
    throttled(real::cuLaunchCooperativeKernel_ptsz(), |real| {
        // SAFETY: forwarding.
        unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params) }
    })
}

pub(crate) unsafe fn graph_launch(exec: *mut c_void, stream: *mut c_void) -> CUresult {
    throttled(real::cuGraphLaunch(), |real| {
        // SAFETY: forwarding.
        unsafe { real(exec, stream) }
    })
}

/// `cuGraphLaunch_ptsz`: the same hook around the driver's twin.
pub(crate) unsafe fn graph_launch_ptsz(exec: *mut c_void, stream: *mut c_void) -> CUresult {
    throttled(real::cuGraphLaunch_ptsz(), |real| {
        // SAFETY: forwarding.
        unsafe { real(exec, stream) }
    })
}

/// Explicit pools and their device (`cuMemPoolCreate` with a device location).
static POOLS: std::sync::Mutex<std::collections::BTreeMap<usize, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn pools() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, usize>> {
    POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) unsafe fn mem_pool_create(pool: *mut *mut c_void, props: *const c_void) -> CUresult {
    let Some(f) = real::cuMemPoolCreate() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let rc = unsafe { f(pool, props) };
    if rc == CUDA_SUCCESS && !pool.is_null() && !props.is_null() {
        // SAFETY: `props` points to a CUmemPoolProps (location.type at 8, location.id at 12), and the
        // driver wrote the pool handle.
        let (location, id, handle) = unsafe {
            let p = props.cast::<u8>();
            (
                p.add(PROP_LOCATION_TYPE).cast::<u32>().read_unaligned(),
                p.add(PROP_LOCATION_ID).cast::<i32>().read_unaligned(),
                *pool as usize,
            )
        };
        if let (LOCATION_DEVICE, Ok(dev)) = (location, usize::try_from(id)) {
            pools().insert(handle, dev);
        }
    }
    rc
}

/// Pool allocations count like every other (peer case C11); `cuMemFreeAsync` returns them.
pub(crate) unsafe fn mem_alloc_from_pool_async(
    dptr: *mut u64,
    bytesize: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: forwarding.
    unsafe { from_pool_with(real::cuMemAllocFromPoolAsync(), dptr, bytesize, pool, stream) }
}

/// `cuMemAllocFromPoolAsync_ptsz`: the same hook around the driver's twin.
pub(crate) unsafe fn mem_alloc_from_pool_async_ptsz(
    dptr: *mut u64,
    bytesize: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: forwarding.
    unsafe { from_pool_with(real::cuMemAllocFromPoolAsync_ptsz(), dptr, bytesize, pool, stream) }
}

type FromPoolFn = unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> CUresult;

unsafe fn from_pool_with(
    real: Option<FromPoolFn>,
    dptr: *mut u64,
    bytesize: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CUresult {
    let Some(f) = real else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    let alloc = || unsafe { f(dptr, bytesize, pool, stream) };
    if dptr.is_null() {
        return alloc();
    }
    let dev = || pools().get(&(pool as usize)).copied().or_else(current_device);
    // SAFETY: written by the driver on success.
    on_device(dev, bytesize as u64, alloc, || unsafe { *dptr })
}

/// Bytes of a `CUDA_ARRAY_DESCRIPTOR` (`Width` size_t at 0, `Height` at 8, `Format` u32 at 16,
/// `NumChannels` u32 at 20; element sizes of `CUarray_format`, `cuda.h`).
fn array_bytes(desc: *const c_void) -> Option<u64> {
    // SAFETY: `desc` points to a CUDA_ARRAY_DESCRIPTOR (checked non-null by the caller).
    let (w, h, format, ch) = unsafe {
        let p = desc.cast::<u8>();
        (
            p.cast::<u64>().read_unaligned(),
            p.add(8).cast::<u64>().read_unaligned(),
            p.add(16).cast::<u32>().read_unaligned(),
            p.add(20).cast::<u32>().read_unaligned(),
        )
    };
    let elem = match format {
        0x01 | 0x08 => 1,
        0x02 | 0x09 | 0x10 => 2,
        0x03 | 0x0a | 0x20 => 4,
        _ => return None,
    };
    w.checked_mul(h.max(1))?.checked_mul(u64::from(ch) * elem)
}

pub(crate) unsafe fn array_create(handle: *mut *mut c_void, desc: *const c_void) -> CUresult {
    let Some(f) = real::cuArrayCreate_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let bytes = if handle.is_null() || desc.is_null() {
        None
    } else {
        array_bytes(desc)
    };
    match bytes {
        Some(bytes) => on_device(
            current_device,
            bytes,
            // SAFETY: forwarding.
            || unsafe { f(handle, desc) },
            // SAFETY: written by the driver on success.
            || unsafe { *handle as u64 },
        ),
        // SAFETY: the driver validates (and refuses) what cannot be sized.
        None => unsafe { f(handle, desc) },
    }
}

pub(crate) unsafe fn array_destroy(handle: *mut c_void) -> CUresult {
    let Some(f) = real::cuArrayDestroy() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwarding.
    free_recorded(handle as u64, || unsafe { f(handle) })
}
