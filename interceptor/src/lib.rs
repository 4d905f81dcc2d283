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
//! Limits, in order of trust:
//! 1. the **trusted limits file** `/usr/local/vgpu/limits` (`hami_api::region::TrustedLimits`): the
//!    device plugin writes it at Allocate and mounts it read-only; when it is there, it is the only
//!    source (the environment's limits are ignored, and logged when they differ), the region is the
//!    one in `/usr/local/vgpu` whatever `CUDA_DEVICE_MEMORY_SHARED_CACHE` says, and devices are
//!    matched by UUID: the limit of CUDA ordinal `o` is that of the GPU whose `cuDeviceGetUuid` is the
//!    file's (CUDA numbers visible GPUs fastest first, then by PCI bus, not in `NVIDIA_VISIBLE_DEVICES`
//!    order); a GPU that is not in the file gets no allocation at all;
//! 2. otherwise HAMi's variables: the process that creates the region writes them from
//!    `CUDA_DEVICE_MEMORY_LIMIT_<i>` / `CUDA_DEVICE_MEMORY_LIMIT` and `CUDA_DEVICE_SM_LIMIT` (parsed
//!    strictly: `4Gi` is 4 GiB, `4GB` is an error), later processes use the region's limits and ignore
//!    their own environment, and CUDA ordinal `i` is container device `i`.
//!
//! # Integrity model (who can write what)
//!
//! | what | written by | the tenant (root in its container, no `CAP_SYS_ADMIN`) |
//! |---|---|---|
//! | trusted limits file (host `<regions_dir>/<pod UID>_<container>.limits`, 0444) | the agent, at Allocate | cannot write it (read-only bind mount: `EROFS` whatever its capabilities), replace or remove it (a mount point: `EBUSY`), or reach the host file (outside its mounts) |
//! | region directory `/usr/local/vgpu` (0777) | the device plugin creates it | can add, remove and replace files in it |
//! | region file (header, reservations, slots) | every process of the container; the agent writes the kernel's view | can rewrite anything in it |
//! | `libvgpu.so`, `/etc/ld.so.preload` | the node (read-only mounts) | cannot change them |
//!
//! So the limits (bytes, SM percent, which GPUs) and the failure policy cannot be raised from inside the
//! container: every check reads them from the trusted file, never from the region header (a tenant
//! that writes 100 GiB there still gets `CUDA_ERROR_OUT_OF_MEMORY` at its limit; test
//! `a_tenant_that_rewrites_the_region_header_still_gets_oom_at_the_trusted_limit`). The *usage*
//! counters live in the tenant-writable region, so a root tenant that zeroes them (or deletes the
//! region file and lets a new one be created) can get past the interceptor's accounting, and so can a
//! process that escapes the interceptor altogether; the kernel hard limit (agent `hard_limit`) holds
//! both: it counts device memory from the driver's ioctls and takes the limit from the same trusted
//! file, which the tenant cannot touch. The interceptor is the cooperative, precise layer (an
//! ordinary `CUDA_ERROR_OUT_OF_MEMORY`); the kernel is the one a hostile tenant cannot talk its way
//! past.
//!
//! # What escapes the interceptor
//!
//! Interposition needs the dynamic loader: `LD_PRELOAD` or `/etc/ld.so.preload` (which the device
//! plugin mounts, so a tenant that clears `LD_PRELOAD` is still intercepted; test
//! `a_tenant_that_clears_ld_preload_is_still_intercepted_through_ld_so_preload`), symbol lookups by
//! name, and `dlsym` (interposed). Not intercepted: a statically linked program (no loader, no
//! preload); code in a library loaded with `dlopen(..., RTLD_DEEPBIND)` (deep binding resolves that
//! library's own references, including its calls into libcuda and to `dlsym` itself, in its own
//! dependency scope before the global one, where this library is, so it reaches the real driver and
//! glibc's `dlsym` directly: a runtime loaded that way is not intercepted at all); a program that
//! finds libcuda's functions without `dlsym` (walking the ELF symbol table) or issues the driver's RM
//! ioctls itself; and anything that clears `/etc/ld.so.preload`, which the tenant cannot (read-only mount).
//! What escapes is still device memory allocated through `/dev/nvidiactl`, which the agent's eBPF
//! programs see: with `hard_limit` on, such a process is killed (or, where BPF LSM programs load, its
//! allocation refused with `ENOMEM`) when it takes the container past its trusted limit.
//!
//! Failure policy: with neither a trusted limits file, the region variable nor a limit variable, nothing
//! is enforced (the library is harmless in containers without vGPUs). With a trusted limits file whose
//! region cannot be used (missing or read-only directory, foreign or unreadable file), the file's
//! `on_region_error`, set by the operator (agent `device_plugin.on_region_error`), decides: `closed`
//! (the default) refuses every device-memory allocation with `CUDA_ERROR_OUT_OF_MEMORY`; `open` lets
//! the process run against a private region, holding itself alone to the limits (the container's other
//! processes and the agent's kernel view are not counted). A trusted limits file that is unreadable or
//! invalid, limit variables that do not parse, and limit variables without a region fail closed.
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
