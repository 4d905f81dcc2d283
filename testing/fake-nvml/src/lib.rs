//! A fake `libnvidia-ml.so.1`: the NVML entry points that `nvml-wrapper` uses for discovery and
//! per-process accounting, with the real signatures (C types from `nvml-wrapper-sys`) and the real
//! `nvmlReturn_t` codes, backed by the simulated GPU node of `hami-fake-gpu`.
//!
//! Configuration (environment, read by `nvmlInit*`): `HAMI_FAKE_GPU_DIR`, the node's mount directory.
//! Every query reads the node's `hami-ground-truth.json` afresh, so it sees what the fake driver
//! (`libcuda.so.1`, raw RM clients) holds at that moment, in every process.
//!
//! Never panics across the FFI boundary: every entry point catches panics and returns
//! `NVML_ERROR_UNKNOWN`.
//!
//! ## Per-process utilisation samples (`nvmlDeviceGetProcessUtilization`)
//!
//! The real library samples each process's SM share at a fixed period (about 1/6 s) into a ring
//! buffer and returns the buffered samples newer than `lastSeenTimeStamp`, each with its own CPU
//! timestamp (µs of `CLOCK_REALTIME`). This one computes samples from the node's exact launch history
//! instead ([`hami_fake_gpu::model::SmHistory`]), so that they integrate to the ground truth:
//!
//! - the window is `(lastSeenTimeStamp, now]`, `now` being `CLOCK_REALTIME` in whole µs read just
//!   before the node's ground truth is, so that every launch that started in the window is in it;
//!   wall-clock times map to the node's (monotonic) model clock through
//!   [`hami_fake_gpu::GroundTruth::clock_epoch_unix_ns`] (a step of the wall clock while the node
//!   runs shifts the mapping: not modelled);
//! - each process granted any SM time in the window gets exactly one sample, with `timeStamp = now`
//!   (so every sample of one call has the same timestamp, and passing it back as the next
//!   `lastSeenTimeStamp` tiles the windows without gaps or overlaps) and
//!   `smUtil = round(100 × SM-seconds in the window / window length in s)` (at most 100; it can be 0
//!   for a process with a sliver of SM time). `memUtil`, `encUtil` and `decUtil` are 0 (not
//!   modelled). So `Σ smUtil / 100 × (timeStamp − lastSeenTimeStamp) / 10⁶` over consecutive calls is
//!   the process's SM-seconds ([`hami_fake_gpu::model::GpuTruth::sm_seconds_by_pid`]) to within the
//!   1-percent rounding of `smUtil` times the window;
//! - `lastSeenTimeStamp == 0` means "since the node's clock epoch"
//!   ([`hami_fake_gpu::GroundTruth::clock_epoch_unix_ns`], before any launch): `smUtil` is then the
//!   average over the node's whole life, taken over the window `(epoch, now]` — not over
//!   `(0, now]`, which a caller integrating from 0 would assume; such a caller should use the first
//!   call only to learn a timestamp;
//! - a window reaching back past the retained history (at least 10 s of it) counts only the
//!   retained part (still divided by the whole window): poll more often than that to be exact;
//! - a window with no SM time in it (or `lastSeenTimeStamp` at or after `now`) gives
//!   `NVML_ERROR_NOT_FOUND`.
#![allow(
    unsafe_code,
    non_snake_case,
    reason = "C ABI exports of the NVML API, with its names; every pointer is checked for null"
)]

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use hami_fake_gpu::GroundTruth;
use hami_fake_gpu::model::GpuTruth;
use nvml_wrapper_sys::bindings as sys;
pub use sys::{
    nvmlDevice_t, nvmlMemory_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessInfo_t, nvmlProcessInfo_v1_t,
    nvmlProcessUtilizationSample_t, nvmlReturn_t, nvmlUtilization_t,
};

/// `NVML_SUCCESS`.
pub const NVML_SUCCESS: nvmlReturn_t = sys::nvmlReturn_enum_NVML_SUCCESS;
/// `NVML_ERROR_UNINITIALIZED`.
pub const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
/// `NVML_ERROR_INVALID_ARGUMENT`.
pub const NVML_ERROR_INVALID_ARGUMENT: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
/// `NVML_ERROR_NOT_SUPPORTED`.
pub const NVML_ERROR_NOT_SUPPORTED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
/// `NVML_ERROR_NOT_FOUND`.
pub const NVML_ERROR_NOT_FOUND: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
/// `NVML_ERROR_INSUFFICIENT_SIZE`.
pub const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
/// `NVML_ERROR_DRIVER_NOT_LOADED`.
pub const NVML_ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
/// `NVML_ERROR_GPU_IS_LOST`.
pub const NVML_ERROR_GPU_IS_LOST: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`.
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: nvmlReturn_t =
    sys::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
/// `NVML_ERROR_TIMEOUT`.
pub const NVML_ERROR_TIMEOUT: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
/// `NVML_ERROR_UNKNOWN`.
pub const NVML_ERROR_UNKNOWN: nvmlReturn_t = sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN;

/// The driver version reported (the RM ABI the node speaks).
pub const DRIVER_VERSION: &str = "595.45.04";
/// The NVML version reported (`<CUDA major>.<driver version>`).
pub const NVML_VERSION: &str = "12.595.45.04";
/// The CUDA driver version reported (12.8, as the fake `libcuda.so.1`).
pub const CUDA_DRIVER_VERSION: c_int = 12080;
/// PCI device id reported for every simulated GPU (H100 SXM5 80GB, vendor 0x10DE).
pub const PCI_DEVICE_ID: c_uint = 0x2330_10DE;
/// PCI subsystem id reported for every simulated GPU.
pub const PCI_SUBSYSTEM_ID: c_uint = 0x16C1_10DE;
/// `NVML_VALUE_NOT_AVAILABLE` (32-bit), the GPU/compute instance id of a process without MIG.
pub const NVML_VALUE_NOT_AVAILABLE: c_uint = c_uint::MAX;
/// The most GPUs a node can have here (handles are addresses into a static table).
pub const MAX_GPUS: usize = 64;

/// `NVML_STRUCT_VERSION(Memory, 2)`.
const MEMORY_V2_VERSION: c_uint = (size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;

/// Device handles point into this table (never written through), as real handles point to the
/// library's per-device structs.
static HANDLES: [u8; MAX_GPUS] = [0; MAX_GPUS];

struct State {
    dir: PathBuf,
    refs: u32,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f`, turning a panic into `NVML_ERROR_UNKNOWN`.
fn guard(f: impl FnOnce() -> nvmlReturn_t) -> nvmlReturn_t {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(NVML_ERROR_UNKNOWN)
}

/// The node's ground truth now, or `NVML_ERROR_UNINITIALIZED` before `nvmlInit`.
fn truth() -> Result<GroundTruth, nvmlReturn_t> {
    let dir = state()
        .as_ref()
        .map(|s| s.dir.clone())
        .ok_or(NVML_ERROR_UNINITIALIZED)?;
    hami_fake_gpu::fs::read_ground_truth(&dir).map_err(|_| NVML_ERROR_UNKNOWN)
}

fn handle_of(index: usize) -> nvmlDevice_t {
    HANDLES[index..].as_ptr().cast_mut().cast()
}

fn index_of(device: nvmlDevice_t) -> Option<usize> {
    let base = HANDLES.as_ptr() as usize;
    let at = (device as usize).checked_sub(base)?;
    (at < MAX_GPUS).then_some(at)
}

/// Runs `f` with the GPU behind `device` in a fresh ground truth.
fn with_gpu(device: nvmlDevice_t, f: impl FnOnce(&GroundTruth, &GpuTruth) -> nvmlReturn_t) -> nvmlReturn_t {
    guard(|| {
        let t = match truth() {
            Ok(t) => t,
            Err(e) => return e,
        };
        match index_of(device).and_then(|i| t.gpus.get(i)) {
            Some(g) => f(&t, g),
            None => NVML_ERROR_INVALID_ARGUMENT,
        }
    })
}

/// Like [`with_gpu`], failing with `NVML_ERROR_GPU_IS_LOST` for a GPU that fell off the bus.
fn with_live_gpu(
    device: nvmlDevice_t,
    f: impl FnOnce(&GroundTruth, &GpuTruth) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_gpu(
        device,
        |t, g| if g.lost { NVML_ERROR_GPU_IS_LOST } else { f(t, g) },
    )
}

/// Copies `s` NUL-terminated into `buf` of `len` bytes.
///
/// # Safety
/// `buf` is null or valid for `len` bytes.
unsafe fn write_str(buf: *mut c_char, len: c_uint, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if (len as usize) < bytes.len() + 1 {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `len` bytes; we write `bytes.len() + 1 <= len`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        buf.add(bytes.len()).write(0);
    }
    NVML_SUCCESS
}

/// Writes `value` through `out` unless it is null.
///
/// # Safety
/// `out` is null or valid for a write.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid per the contract.
    unsafe { out.write(value) };
    NVML_SUCCESS
}

/// Fills a fixed C string array with `s` (truncated, NUL-terminated).
fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len().saturating_sub(1));
    for (d, b) in dst.iter_mut().zip(s.bytes().take(n)) {
        *d = b as c_char;
    }
    if let Some(end) = dst.get_mut(n) {
        *end = 0;
    }
}

/// The simulated PCI address of GPU `index` (bus `0x18 + 8·index`, like an 8-GPU HGX board).
fn pci_info(index: u32) -> nvmlPciInfo_t {
    let bus = 0x18 + 8 * index;
    let mut p = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain: 0,
        bus,
        device: 0,
        pciDeviceId: PCI_DEVICE_ID,
        pciSubSystemId: PCI_SUBSYSTEM_ID,
        busId: [0; 32],
    };
    fill(&mut p.busIdLegacy, &format!("0000:{bus:02X}:00.0"));
    fill(&mut p.busId, &format!("00000000:{bus:02X}:00.0"));
    p
}

fn init(_flags: c_uint) -> nvmlReturn_t {
    guard(|| {
        let mut s = state();
        if let Some(st) = s.as_mut() {
            st.refs += 1;
            return NVML_SUCCESS;
        }
        let Some(dir) = std::env::var_os("HAMI_FAKE_GPU_DIR").map(PathBuf::from) else {
            return NVML_ERROR_DRIVER_NOT_LOADED;
        };
        if hami_fake_gpu::fs::read_ground_truth(&dir).is_err() {
            return NVML_ERROR_DRIVER_NOT_LOADED;
        }
        *s = Some(State { dir, refs: 1 });
        NVML_SUCCESS
    })
}

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init(0)
}

/// `nvmlInit` (v1).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> nvmlReturn_t {
    init(0)
}

/// `nvmlInitWithFlags` (flags are accepted and ignored).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(flags: c_uint) -> nvmlReturn_t {
    init(flags)
}

/// `nvmlShutdown`: balances one `nvmlInit*`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guard(|| {
        let mut s = state();
        match s.as_mut() {
            None => NVML_ERROR_UNINITIALIZED,
            Some(st) if st.refs > 1 => {
                st.refs -= 1;
                NVML_SUCCESS
            }
            Some(_) => {
                *s = None;
                NVML_SUCCESS
            }
        }
    })
}

/// `nvmlErrorString`: a static description of `result`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        NVML_ERROR_TIMEOUT => c"Timeout",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

fn initialized() -> bool {
    state().is_some()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    if !initialized() {
        return NVML_ERROR_UNINITIALIZED;
    }
    // SAFETY: forwarded contract.
    unsafe { write_str(version, length, DRIVER_VERSION) }
}

/// `nvmlSystemGetNVMLVersion` (works without init, like the real library).
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    unsafe { write_str(version, length, NVML_VERSION) }
}

/// `nvmlSystemGetCudaDriverVersion`.
///
/// # Safety
/// `version` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    unsafe { put(version, CUDA_DRIVER_VERSION) }
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
///
/// # Safety
/// `version` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    unsafe { put(version, CUDA_DRIVER_VERSION) }
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    guard(|| match truth() {
        // SAFETY: checked non-null above.
        Ok(t) => unsafe { put(count, c_uint::try_from(t.gpus.len().min(MAX_GPUS)).unwrap_or(0)) },
        Err(e) => e,
    })
}

/// `nvmlDeviceGetCount` (v1).
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    unsafe { nvmlDeviceGetCount_v2(count) }
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    guard(|| {
        let t = match truth() {
            Ok(t) => t,
            Err(e) => return e,
        };
        let i = index as usize;
        if i >= t.gpus.len().min(MAX_GPUS) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: checked non-null above.
        unsafe { put(device, handle_of(i)) }
    })
}

/// `nvmlDeviceGetHandleByIndex` (v1).
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// `nvmlDeviceGetHandleByUUID`.
///
/// # Safety
/// `uuid` is null or NUL-terminated; `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if uuid.is_null() || device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and NUL-terminated per the contract.
    let want = unsafe { CStr::from_ptr(uuid) }.to_string_lossy().into_owned();
    guard(|| {
        let t = match truth() {
            Ok(t) => t,
            Err(e) => return e,
        };
        match t.gpus.iter().take(MAX_GPUS).position(|g| g.uuid == want) {
            // SAFETY: checked non-null above.
            Some(i) => unsafe { put(device, handle_of(i)) },
            None => NVML_ERROR_NOT_FOUND,
        }
    })
}

/// `nvmlDeviceGetHandleByPciBusId_v2` (the bus ids of [`nvmlDeviceGetPciInfo_v3`]).
///
/// # Safety
/// `bus_id` is null or NUL-terminated; `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if bus_id.is_null() || device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and NUL-terminated per the contract.
    let want = unsafe { CStr::from_ptr(bus_id) }
        .to_string_lossy()
        .to_ascii_uppercase();
    guard(|| {
        let t = match truth() {
            Ok(t) => t,
            Err(e) => return e,
        };
        let found = t.gpus.iter().take(MAX_GPUS).position(|g| {
            let p = pci_info(g.index);
            // SAFETY: `fill` NUL-terminates both arrays.
            let (full, legacy) = unsafe {
                (
                    CStr::from_ptr(p.busId.as_ptr()),
                    CStr::from_ptr(p.busIdLegacy.as_ptr()),
                )
            };
            full.to_str() == Ok(want.as_str()) || legacy.to_str() == Ok(want.as_str())
        });
        match found {
            // SAFETY: checked non-null above.
            Some(i) => unsafe { put(device, handle_of(i)) },
            None => NVML_ERROR_NOT_FOUND,
        }
    })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, g| unsafe { write_str(uuid, length, &g.uuid) })
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, g| unsafe { write_str(name, length, &g.model) })
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, g| unsafe { put(index, g.index) })
}

/// `nvmlDeviceGetMinorNumber` (= the index: the node's `nvidia<N>` file).
///
/// # Safety
/// `minor` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: nvmlDevice_t, minor: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, g| unsafe { put(minor, g.index) })
}

/// `nvmlDeviceGetMemoryInfo` (v1 struct: total, free, used).
///
/// # Safety
/// `memory` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    with_live_gpu(device, |_, g| {
        let m = nvmlMemory_t {
            total: g.total_bytes,
            free: g.total_bytes.saturating_sub(g.used_bytes),
            used: g.used_bytes,
        };
        // SAFETY: forwarded contract.
        unsafe { put(memory, m) }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2` (`version` must be `NVML_STRUCT_VERSION(Memory, 2)`; nothing is
/// reserved).
///
/// # Safety
/// `memory` is null or valid for reads and writes of an `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid per the contract.
    if unsafe { (*memory).version } != MEMORY_V2_VERSION {
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    with_live_gpu(device, |_, g| {
        let m = nvmlMemory_v2_t {
            version: MEMORY_V2_VERSION,
            total: g.total_bytes,
            reserved: 0,
            free: g.total_bytes.saturating_sub(g.used_bytes),
            used: g.used_bytes,
        };
        // SAFETY: checked non-null above.
        unsafe { put(memory, m) }
    })
}

/// `nvmlDeviceGetPciInfo_v3`.
///
/// # Safety
/// `pci` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, g| unsafe { put(pci, pci_info(g.index)) })
}

/// `nvmlDeviceGetNumaNodeId`: the GPU's NUMA node from the ground truth (`GpuTruth::numa`, which
/// comes from `hami_api::GpuDevice::numa`); `NVML_ERROR_NOT_SUPPORTED` when the GPU has none (what the
/// real library answers on a system without NUMA affinity).
///
/// # Safety
/// `node` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNumaNodeId(device: nvmlDevice_t, node: *mut c_uint) -> nvmlReturn_t {
    if node.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |_, g| match g.numa {
        // SAFETY: checked non-null above; the caller passes a valid unsigned int pointer.
        Some(n) => unsafe { put(node, n) },
        None => NVML_ERROR_NOT_SUPPORTED,
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: every process holding device memory on the GPU, with
/// its bytes (no MIG: instance ids are `NVML_VALUE_NOT_AVAILABLE`). With `*info_count` too small,
/// sets it to the number needed and returns `NVML_ERROR_INSUFFICIENT_SIZE` (0 processes: success).
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or valid for `*info_count`
/// entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded under the same contract.
    unsafe {
        running_processes(device, info_count, infos, |pid, bytes| nvmlProcessInfo_t {
            pid,
            usedGpuMemory: bytes,
            gpuInstanceId: NVML_VALUE_NOT_AVAILABLE,
            computeInstanceId: NVML_VALUE_NOT_AVAILABLE,
        })
    }
}

/// `nvmlDeviceGetComputeRunningProcesses` (the unversioned name, `nvmlProcessInfo_v1_t`: pid and
/// bytes only), which programs linked against old NVML headers still call at start-up.
///
/// # Safety
/// As [`nvmlDeviceGetComputeRunningProcesses_v3`], with `nvmlProcessInfo_v1_t` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_v1_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded under the same contract.
    unsafe {
        running_processes(device, info_count, infos, |pid, bytes| nvmlProcessInfo_v1_t {
            pid,
            usedGpuMemory: bytes,
        })
    }
}

/// Every process holding device memory on the GPU, as entries made by `entry(pid, bytes)`.
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or valid for `*info_count`
/// entries of `T`.
unsafe fn running_processes<T>(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut T,
    entry: impl Fn(c_uint, c_ulonglong) -> T,
) -> nvmlReturn_t {
    if info_count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    with_live_gpu(device, |t, g| {
        let procs: Vec<T> = t
            .bytes_per_pid(g.index)
            .into_iter()
            .map(|(pid, bytes)| entry(pid, bytes))
            .collect();
        let n = c_uint::try_from(procs.len()).unwrap_or(c_uint::MAX);
        // SAFETY: checked non-null above.
        let room = unsafe { info_count.read() };
        // SAFETY: checked non-null above.
        unsafe { info_count.write(n) };
        if n == 0 {
            return NVML_SUCCESS;
        }
        if room < n || infos.is_null() {
            return NVML_ERROR_INSUFFICIENT_SIZE;
        }
        // SAFETY: `infos` holds `room >= n` entries per the contract.
        unsafe { std::ptr::copy_nonoverlapping(procs.as_ptr(), infos, procs.len()) };
        NVML_SUCCESS
    })
}

/// `nvmlDeviceGetUtilizationRates`: `gpu` is the node's SM utilisation now; memory (bandwidth)
/// utilisation is not modelled (0).
///
/// # Safety
/// `utilization` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_live_gpu(device, |_, g| {
        let u = nvmlUtilization_t {
            gpu: g.sm_util_percent.min(100),
            memory: 0,
        };
        // SAFETY: forwarded contract.
        unsafe { put(utilization, u) }
    })
}

/// `CLOCK_REALTIME` now, µs since the Unix epoch (0 before it).
#[must_use]
pub fn realtime_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The per-process utilisation samples of GPU `g` in ground truth `t` for the window
/// `(last_seen_us, now_us]` (µs of `CLOCK_REALTIME`; `last_seen_us` 0 for everything since the node's
/// clock epoch), by pid: one per process with SM time in the window, as the
/// [module documentation](self) describes. Empty when there are none. `now_us` must not be later than
/// the moment `t` was taken (launches after it are not in `t`).
#[must_use]
pub fn process_samples(
    t: &GroundTruth,
    g: &GpuTruth,
    last_seen_us: u64,
    now_us: u64,
) -> Vec<nvmlProcessUtilizationSample_t> {
    const NS_PER_US: u64 = 1_000;
    let epoch = t.clock_epoch_unix_ns;
    // The window's end on the model clock.
    let end_ns = now_us.saturating_mul(NS_PER_US).saturating_sub(epoch);
    let (start_ns, window_ns) = if last_seen_us == 0 {
        (0, end_ns)
    } else {
        let start_wall = last_seen_us.saturating_mul(NS_PER_US);
        (
            start_wall.saturating_sub(epoch),
            now_us.saturating_sub(last_seen_us).saturating_mul(NS_PER_US),
        )
    };
    if window_ns == 0 || start_ns >= end_ns {
        return Vec::new();
    }
    let window_s = window_ns as f64 / 1e9;
    g.sm_history
        .sm_seconds_between(start_ns, end_ns)
        .into_iter()
        .map(|(pid, sm_s)| nvmlProcessUtilizationSample_t {
            pid,
            timeStamp: now_us,
            // In 0..=100: the float-to-int cast saturates.
            smUtil: (100.0 * sm_s / window_s).round().min(100.0) as c_uint,
            memUtil: 0,
            encUtil: 0,
            decUtil: 0,
        })
        .collect()
}

/// `nvmlDeviceGetProcessUtilization`: per-process utilisation samples newer than
/// `last_seen_time_stamp` (µs of `CLOCK_REALTIME`), computed by [`process_samples`]. With
/// `utilization` null, or `*process_samples_count` smaller than the number of samples, sets
/// `*process_samples_count` to that number and returns `NVML_ERROR_INSUFFICIENT_SIZE`; no samples:
/// `NVML_ERROR_NOT_FOUND`; a null count or a bad handle: `NVML_ERROR_INVALID_ARGUMENT`; a lost GPU:
/// `NVML_ERROR_GPU_IS_LOST`.
///
/// # Safety
/// `process_samples_count` is null or valid for reads and writes; `utilization` is null or valid for
/// `*process_samples_count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    process_samples_count: *mut c_uint,
    last_seen_time_stamp: c_ulonglong,
) -> nvmlReturn_t {
    if process_samples_count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // Before the ground truth is read: every launch up to `now` is then in it.
    let now_us = realtime_us();
    with_live_gpu(device, |t, g| {
        let samples = process_samples(t, g, last_seen_time_stamp, now_us);
        if samples.is_empty() {
            return NVML_ERROR_NOT_FOUND;
        }
        let n = c_uint::try_from(samples.len()).unwrap_or(c_uint::MAX);
        // SAFETY: checked non-null above.
        let room = unsafe { process_samples_count.read() };
        // SAFETY: checked non-null above.
        unsafe { process_samples_count.write(n) };
        if utilization.is_null() || room < n {
            return NVML_ERROR_INSUFFICIENT_SIZE;
        }
        // SAFETY: `utilization` holds `room >= n` entries per the contract.
        unsafe { std::ptr::copy_nonoverlapping(samples.as_ptr(), utilization, samples.len()) };
        NVML_SUCCESS
    })
}

/// The event types this library can deliver: critical XIDs (from the node's injected XIDs; a lost GPU
/// reports XID 79, "fallen off the bus", once) and the ECC classes (accepted, never raised).
pub const SUPPORTED_EVENT_TYPES: u64 = (sys::nvmlEventTypeXidCriticalError
    | sys::nvmlEventTypeSingleBitEccError
    | sys::nvmlEventTypeDoubleBitEccError) as u64;
/// The XID the driver reports for a GPU that has fallen off the bus.
pub const XID_FALLEN_OFF_THE_BUS: u64 = 79;
/// Event sets are handed out as these values plus a counter (never dereferenced by the caller).
const EVENT_SET_BASE: usize = 0x5e70_0000;

#[derive(Default)]
struct Registration {
    mask: u64,
    /// XIDs of this GPU already delivered (or present at registration).
    xids_seen: usize,
    lost_seen: bool,
}

#[derive(Default)]
struct EventSetState {
    /// GPU index → what is registered.
    devices: std::collections::BTreeMap<usize, Registration>,
}

struct EventSets {
    next: usize,
    sets: std::collections::BTreeMap<usize, EventSetState>,
}

static EVENT_SETS: Mutex<EventSets> = Mutex::new(EventSets {
    next: 0,
    sets: std::collections::BTreeMap::new(),
});

fn event_sets() -> MutexGuard<'static, EventSets> {
    EVENT_SETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn set_id(set: sys::nvmlEventSet_t) -> usize {
    set as usize
}

/// `nvmlEventSetCreate`.
///
/// # Safety
/// `set` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut sys::nvmlEventSet_t) -> nvmlReturn_t {
    if set.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    guard(|| {
        if !initialized() {
            return NVML_ERROR_UNINITIALIZED;
        }
        let mut sets = event_sets();
        sets.next += 1;
        let id = EVENT_SET_BASE + sets.next;
        sets.sets.insert(id, EventSetState::default());
        // SAFETY: checked non-null above.
        unsafe { put(set, std::ptr::without_provenance_mut(id)) }
    })
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: sys::nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| match event_sets().sets.remove(&set_id(set)) {
        Some(_) => NVML_SUCCESS,
        None => NVML_ERROR_INVALID_ARGUMENT,
    })
}

/// `nvmlDeviceGetSupportedEventTypes`.
///
/// # Safety
/// `event_types` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut u64,
) -> nvmlReturn_t {
    // SAFETY: forwarded contract.
    with_gpu(device, |_, _| unsafe { put(event_types, SUPPORTED_EVENT_TYPES) })
}

/// `nvmlDeviceRegisterEvents`: XIDs already on the GPU are not delivered, only later ones. Types
/// outside [`SUPPORTED_EVENT_TYPES`] give `NVML_ERROR_NOT_SUPPORTED`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: u64,
    set: sys::nvmlEventSet_t,
) -> nvmlReturn_t {
    with_gpu(device, |_, g| {
        if event_types & !SUPPORTED_EVENT_TYPES != 0 {
            return NVML_ERROR_NOT_SUPPORTED;
        }
        let mut sets = event_sets();
        let Some(s) = sets.sets.get_mut(&set_id(set)) else {
            return NVML_ERROR_INVALID_ARGUMENT;
        };
        let r = s.devices.entry(g.index as usize).or_insert_with(|| Registration {
            mask: 0,
            xids_seen: g.xids.len(),
            lost_seen: g.lost,
        });
        r.mask |= event_types;
        NVML_SUCCESS
    })
}

/// The next undelivered event of `set` in `t`, marking it delivered.
fn next_event(s: &mut EventSetState, t: &GroundTruth) -> Option<sys::nvmlEventData_t> {
    for (&i, r) in &mut s.devices {
        if r.mask & u64::from(sys::nvmlEventTypeXidCriticalError) == 0 {
            continue;
        }
        let Some(g) = t.gpus.get(i) else { continue };
        let code = if let Some(&x) = g.xids.get(r.xids_seen) {
            r.xids_seen += 1;
            u64::from(x)
        } else if g.lost && !r.lost_seen {
            r.lost_seen = true;
            XID_FALLEN_OFF_THE_BUS
        } else {
            continue;
        };
        return Some(sys::nvmlEventData_t {
            device: handle_of(i),
            eventType: u64::from(sys::nvmlEventTypeXidCriticalError),
            eventData: code,
            gpuInstanceId: NVML_VALUE_NOT_AVAILABLE,
            computeInstanceId: NVML_VALUE_NOT_AVAILABLE,
        });
    }
    None
}

/// `nvmlEventSetWait_v2`: polls the node every 10 ms until an event or `timeout_ms`
/// (`NVML_ERROR_TIMEOUT`).
///
/// # Safety
/// `data` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: sys::nvmlEventSet_t,
    data: *mut sys::nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    if data.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    guard(|| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.into());
        loop {
            let t = match truth() {
                Ok(t) => t,
                Err(e) => return e,
            };
            {
                let mut sets = event_sets();
                let Some(s) = sets.sets.get_mut(&set_id(set)) else {
                    return NVML_ERROR_INVALID_ARGUMENT;
                };
                if let Some(ev) = next_event(s, &t) {
                    // SAFETY: checked non-null above.
                    return unsafe { put(data, ev) };
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return NVML_ERROR_TIMEOUT;
            }
            std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(10)));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_reject_foreign_pointers() {
        for i in [0, 1, MAX_GPUS - 1] {
            assert_eq!(index_of(handle_of(i)), Some(i));
        }
        assert_eq!(index_of(std::ptr::null_mut()), None);
        let past = HANDLES.as_ptr().wrapping_add(MAX_GPUS).cast_mut().cast();
        assert_eq!(index_of(past), None);
    }

    #[test]
    fn queries_before_init_are_uninitialized() {
        let mut n: c_uint = 0;
        // SAFETY: valid pointer.
        assert_eq!(
            unsafe { nvmlDeviceGetCount_v2(&raw mut n) },
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(nvmlShutdown(), NVML_ERROR_UNINITIALIZED);
    }

    #[test]
    fn strings_report_insufficient_size() {
        let mut buf = [0 as c_char; 4];
        // SAFETY: valid buffer of 4 bytes.
        let rc = unsafe { nvmlSystemGetNVMLVersion(buf.as_mut_ptr(), 4) };
        assert_eq!(rc, NVML_ERROR_INSUFFICIENT_SIZE);
        let mut buf = [0 as c_char; 80];
        // SAFETY: valid buffer of 80 bytes.
        let rc = unsafe { nvmlSystemGetNVMLVersion(buf.as_mut_ptr(), 80) };
        assert_eq!(rc, NVML_SUCCESS);
        // SAFETY: NUL-terminated by the call.
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str(), Ok(NVML_VERSION));
    }

    #[test]
    fn process_samples_integrate_to_the_sm_seconds_of_their_window() {
        use hami_fake_gpu::DeviceModel;
        const S: u64 = 1_000_000_000;
        let epoch = 1_700_000_000 * S + 123_456_789;
        let mut m = DeviceModel::uniform(1, 1024);
        m.set_clock_epoch_unix_ns(epoch);
        let at = |t_ns: u64| (epoch + t_ns) / 1_000;
        m.tick(S);
        m.launch(7, 0, 60, 2 * S).unwrap();
        m.launch(8, 0, 70, S).unwrap();
        m.tick(S + S / 2);
        let t = m.snapshot();
        // Window (0.5 s, 1.5 s]: 0.5 s of 60/130 and 70/130 of the GPU, over 1 s.
        let now = at(S + S / 2);
        let first = process_samples(&t, &t.gpus[0], at(S / 2), now);
        let by_pid: Vec<(u32, u64, u32)> = first.iter().map(|s| (s.pid, s.timeStamp, s.smUtil)).collect();
        assert_eq!(by_pid, [(7, now, 23), (8, now, 27)]);
        m.tick(4 * S);
        let t = m.snapshot();
        let end = at(4 * S);
        let second = process_samples(&t, &t.gpus[0], now, end);
        // (1.5 s, 4 s]: pid 7 had 0.5 s at 60/130 and 1 s at 60 %, pid 8 0.5 s at 70/130.
        let by_pid: Vec<(u32, u64, u32)> = second.iter().map(|s| (s.pid, s.timeStamp, s.smUtil)).collect();
        assert_eq!(by_pid, [(7, end, 33), (8, end, 11)]);
        for s in &t.gpus[0].sm_seconds_by_pid {
            let integral: f64 = [(&first, S), (&second, 5 * S / 2)]
                .iter()
                .filter_map(|(samples, window_ns)| {
                    samples
                        .iter()
                        .find(|x| x.pid == *s.0)
                        .map(|x| f64::from(x.smUtil) / 100.0 * *window_ns as f64 / 1e9)
                })
                .sum();
            assert!(
                (integral - s.1).abs() <= 0.005 * 3.5,
                "pid {}: {integral} vs {}",
                s.0,
                s.1
            );
        }
        // Nothing after the last launch ended; a stale or future lastSeen is no window.
        assert!(process_samples(&t, &t.gpus[0], end, end).is_empty());
        assert!(process_samples(&t, &t.gpus[0], at(3 * S + S / 2), end).is_empty());
        assert!(process_samples(&t, &t.gpus[0], end + 10, end).is_empty());
        // lastSeen 0: the average since the clock epoch (4 s): 1.0615 s of 7, 0.5385 s of 8.
        let all = process_samples(&t, &t.gpus[0], 0, end);
        let by_pid: Vec<(u32, u32)> = all.iter().map(|s| (s.pid, s.smUtil)).collect();
        assert_eq!(by_pid, [(7, 27), (8, 13)]);
    }

    #[test]
    fn pci_bus_ids_are_formatted_like_nvml() {
        let p = pci_info(1);
        // SAFETY: NUL-terminated by `fill`.
        let (full, legacy) = unsafe {
            (
                CStr::from_ptr(p.busId.as_ptr()),
                CStr::from_ptr(p.busIdLegacy.as_ptr()),
            )
        };
        assert_eq!(full.to_str(), Ok("00000000:20:00.0"));
        assert_eq!(legacy.to_str(), Ok("0000:20:00.0"));
        assert_eq!(p.bus, 0x20);
    }
}
