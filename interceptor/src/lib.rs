//! `libvgpu.so`: enforces a container's device-memory limits from inside its processes.
//!
//! Loaded with `LD_PRELOAD` (or `/etc/ld.so.preload`). It exports the hooked CUDA driver API symbols
//! of [`symbols`] (one list generates the exports, the lazily resolved forwarding table, and the answers
//! to `dlsym` and `cuGetProcAddress`/`_v2`), and its own `dlsym`, so an application that `dlopen`s
//! `libcuda.so.1` and looks symbols up at run time (as the CUDA runtime does) still reaches the hooks.
//!
//! Memory: every process of the container maps the container's shared region
//! (`hami_api::region`): the one region file the device plugin mounted under `/usr/local/vgpu` when there
//! is one (the tenant cannot point the library elsewhere then), else the file named by
//! `CUDA_DEVICE_MEMORY_SHARED_CACHE`; an allocation first reserves
//! its bytes there, atomically against every other process, and returns `CUDA_ERROR_OUT_OF_MEMORY`
//! without calling the driver when the reservation would exceed the limit. `cuMemGetInfo_v2` and
//! `cuDeviceTotalMem_v2` report the limit as the total, and so do NVML's `nvmlDeviceGetMemoryInfo` and
//! `_v2` (what `nvidia-smi` and frameworks that size themselves from NVML read).
//!
//! Compute: launches are throttled to the container's SM limit by a controller fed by measured
//! utilisation ([`throttle`] documents the control law).
//!
//! Limits: the process that creates the region writes them from `CUDA_DEVICE_MEMORY_LIMIT_<i>` /
//! `CUDA_DEVICE_MEMORY_LIMIT` and `CUDA_DEVICE_SM_LIMIT` (HAMi's names, parsed strictly: `4Gi` is 4 GiB,
//! `4GB` is an error); later processes use the region's limits and ignore their own environment.
//!
//! Failure policy: with neither the region variable nor a limit variable set, nothing is enforced (the
//! library is harmless in containers without vGPUs). When they are set but the region cannot be used,
//! allocations fail (fail-closed).
//!
//! Every export catches panics; nothing is logged unless `HAMI_VGPU_LOG=1`.
#![allow(
    unsafe_code,
    non_snake_case,
    reason = "C ABI exports with the CUDA driver API's names, dlsym interposition and a shared mapping"
)]

mod hooks;
mod state;
pub mod symbols;
mod throttle;

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

/// `CUresult` (`cuda.h`).
pub type CUresult = c_int;
/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CUresult = 0;
/// `CUDA_ERROR_INVALID_VALUE`.
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `CUDA_ERROR_NOT_INITIALIZED`.
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// `CUDA_ERROR_NOT_FOUND`.
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
/// `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// Runs a hook body, turning a panic into `CUDA_ERROR_UNKNOWN` (never unwinds into C).
pub(crate) fn guard(f: impl FnOnce() -> CUresult) -> CUresult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(CUDA_ERROR_UNKNOWN)
}

pub(crate) fn log(msg: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("HAMI_VGPU_LOG").is_some_and(|v| v == "1")) {
        eprintln!("libvgpu: {}", msg());
    }
}

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// The C library's `dlsym` (ours shadows it), found with `dlvsym(RTLD_NEXT, ...)`.
fn real_dlsym() -> Option<DlsymFn> {
    static REAL: OnceLock<usize> = OnceLock::new();
    let p = *REAL.get_or_init(|| {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5"] {
            // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated names.
            let p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !p.is_null() {
                return p as usize;
            }
        }
        0
    });
    // SAFETY: a non-null address of glibc's dlsym, whose signature is DlsymFn.
    (p != 0).then(|| unsafe { std::mem::transmute::<usize, DlsymFn>(p) })
}

/// The real `libcuda.so.1` handle (opened by this library, so `dlsym` on it finds the driver's own
/// definitions, not the hooks).
fn libcuda() -> *mut c_void {
    static HANDLE: OnceLock<usize> = OnceLock::new();
    *HANDLE.get_or_init(|| {
        // SAFETY: dlopen of a NUL-terminated name.
        let h = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        h as usize
    }) as *mut c_void
}

/// The real `libnvidia-ml.so.1` handle.
fn libnvml() -> *mut c_void {
    static HANDLE: OnceLock<usize> = OnceLock::new();
    *HANDLE.get_or_init(|| {
        // SAFETY: dlopen of a NUL-terminated name.
        let h = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        h as usize
    }) as *mut c_void
}

/// NVML's own definition of `name` (NUL-terminated), or null.
pub(crate) fn real_nvml_symbol(name: &CStr) -> *mut c_void {
    let h = libnvml();
    match (h.is_null(), real_dlsym()) {
        // SAFETY: a live handle and a NUL-terminated name.
        (false, Some(dlsym)) => unsafe { dlsym(h, name.as_ptr()) },
        _ => std::ptr::null_mut(),
    }
}

/// The driver's own definition of `name` (NUL-terminated), or null.
pub(crate) fn real_symbol(name: &CStr) -> *mut c_void {
    let h = libcuda();
    match (h.is_null(), real_dlsym()) {
        // SAFETY: a live handle and a NUL-terminated name.
        (false, Some(dlsym)) => unsafe { dlsym(h, name.as_ptr()) },
        _ => std::ptr::null_mut(),
    }
}

/// `dlsym`, interposed: the hooked CUDA symbols resolve to this library's exports whatever the
/// handle; everything else goes to the C library.
///
/// # Safety
/// As `dlsym(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    let hooked = std::panic::catch_unwind(|| {
        if symbol.is_null() {
            return None;
        }
        // SAFETY: a NUL-terminated C string per dlsym's contract.
        let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
        if name.starts_with(b"cu") {
            symbols::hook_address(name)
        } else if name.starts_with(b"nvml") {
            symbols::nvml::hook_address(name)
        } else {
            None
        }
    });
    if let Ok(Some(p)) = hooked {
        return p;
    }
    match real_dlsym() {
        // SAFETY: forwarding the caller's arguments to the real dlsym.
        Some(f) => unsafe { f(handle, symbol) },
        None => std::ptr::null_mut(),
    }
}
