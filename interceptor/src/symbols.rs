//! The one list of hooked CUDA driver API symbols. The macro generates, for each entry: the exported
//! function (which runs the hook under [`crate::guard`]), the lazily resolved pointer to the driver's
//! own definition (`real::<name>()`), the `dlsym` answer ([`hook_address`]) and the
//! `cuGetProcAddress` answer ([`hook_for_real`], which matches the driver's returned pointer, so every
//! version suffix maps to the right hook).
//!
//! Signatures follow `cuda.h` (CUDA 12): `CUdeviceptr` = u64, `size_t` = usize, handles are pointers.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

use crate::CUresult;
use crate::hooks;

macro_rules! hooked_symbols {
    (resolve = $resolve:path; $( $name:ident ( $($arg:ident : $ty:ty),* ) => $hook:path ; )*) => {
        /// Pointers to the driver's own definitions, resolved on first use.
        pub(crate) mod real {
            #[allow(unused_imports, reason = "the argument types of the generated signatures")]
            use super::*;
            $(
                pub(crate) fn $name() -> Option<unsafe extern "C" fn($($ty),*) -> CUresult> {
                    static CELL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                    let name = concat!(stringify!($name), "\0");
                    let p = *CELL.get_or_init(|| {
                        std::ffi::CStr::from_bytes_with_nul(name.as_bytes())
                            .map_or(0, |c| $resolve(c) as usize)
                    });
                    // SAFETY: a non-null address of the driver's function of this name, whose C
                    // signature is the one spelled out in the list.
                    (p != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> CUresult>(p)
                    })
                }
            )*
        }

        $(
            #[doc = concat!("Hooked `", stringify!($name), "`.")]
            ///
            /// # Safety
            /// The CUDA driver API's contract for this function.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
                // SAFETY: the hook upholds the same contract as the driver function.
                crate::guard(|| unsafe { $hook($($arg),*) })
            }
        )*

        /// This library's export for a hooked symbol name (`dlsym` answer).
        pub(crate) fn hook_address(name: &[u8]) -> Option<*mut c_void> {
            $( if name == stringify!($name).as_bytes() { return Some($name as *mut c_void); } )*
            None
        }

        /// The hook standing for a pointer the driver returned from `cuGetProcAddress`.
        #[allow(dead_code, reason = "NVML has no cuGetProcAddress counterpart")]
        pub(crate) fn hook_for_real(p: *mut c_void) -> Option<*mut c_void> {
            if p.is_null() {
                return None;
            }
            $(
                if let Some(r) = real::$name() {
                    if r as *mut c_void == p {
                        return Some($name as *mut c_void);
                    }
                }
            )*
            None
        }

        /// Names of every hooked symbol.
        pub const HOOKED: &[&str] = &[$(stringify!($name)),*];
    };
}

hooked_symbols! {
    resolve = crate::real_symbol;
    cuInit(flags: c_uint) => hooks::init;
    cuCtxGetDevice(device: *mut c_int) => hooks::ctx_get_device;
    cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int, flags: c_ulonglong) => hooks::get_proc_address;
    cuGetProcAddress_v2(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int, flags: c_ulonglong, status: *mut c_int) => hooks::get_proc_address_v2;
    cuMemAlloc_v2(dptr: *mut u64, bytesize: usize) => hooks::mem_alloc;
    cuMemAllocPitch_v2(dptr: *mut u64, pitch: *mut usize, width: usize, height: usize, elem: c_uint) => hooks::mem_alloc_pitch;
    cuMemAllocManaged(dptr: *mut u64, bytesize: usize, flags: c_uint) => hooks::mem_alloc_managed;
    cuMemAllocAsync(dptr: *mut u64, bytesize: usize, stream: *mut c_void) => hooks::mem_alloc_async;
    cuMemAllocAsync_ptsz(dptr: *mut u64, bytesize: usize, stream: *mut c_void) => hooks::mem_alloc_async_ptsz;
    cuMemCreate(handle: *mut c_ulonglong, size: usize, prop: *const c_void, flags: c_ulonglong) => hooks::mem_create;
    cuMemRelease(handle: c_ulonglong) => hooks::mem_release;
    cuMemMap(ptr: u64, size: usize, offset: usize, handle: c_ulonglong, flags: c_ulonglong) => hooks::mem_map;
    cuMemUnmap(ptr: u64, size: usize) => hooks::mem_unmap;
    cuMemFree_v2(dptr: u64) => hooks::mem_free;
    cuMemPoolCreate(pool: *mut *mut c_void, props: *const c_void) => hooks::mem_pool_create;
    cuMemAllocFromPoolAsync(dptr: *mut u64, bytesize: usize, pool: *mut c_void, stream: *mut c_void) => hooks::mem_alloc_from_pool_async;
    cuMemAllocFromPoolAsync_ptsz(dptr: *mut u64, bytesize: usize, pool: *mut c_void, stream: *mut c_void) => hooks::mem_alloc_from_pool_async_ptsz;
    cuArrayCreate_v2(handle: *mut *mut c_void, desc: *const c_void) => hooks::array_create;
    cuArrayDestroy(handle: *mut c_void) => hooks::array_destroy;
    cuMemFreeAsync(dptr: u64, stream: *mut c_void) => hooks::mem_free_async;
    cuMemFreeAsync_ptsz(dptr: u64, stream: *mut c_void) => hooks::mem_free_async_ptsz;
    cuMemGetInfo_v2(free: *mut usize, total: *mut usize) => hooks::mem_get_info;
    cuLaunchKernel(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) => hooks::launch_kernel;
    cuLaunchKernel_ptsz(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) => hooks::launch_kernel_ptsz;
    cuLaunchKernelEx(config: *const c_void, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) => hooks::launch_kernel_ex;
    cuLaunchKernelEx_ptsz(config: *const c_void, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void) => hooks::launch_kernel_ex_ptsz;
    cuLaunchCooperativeKernel(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void) => hooks::launch_cooperative;
    cuLaunchCooperativeKernel_ptsz(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: *mut c_void, params: *mut *mut c_void) => hooks::launch_cooperative_ptsz;
    cuGraphLaunch(exec: *mut c_void, stream: *mut c_void) => hooks::graph_launch;
    cuGraphLaunch_ptsz(exec: *mut c_void, stream: *mut c_void) => hooks::graph_launch_ptsz;
    cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) => hooks::device_total_mem;
}

/// Hooked NVML symbols (`nvml.h`; `nvmlReturn_t` is a C enum, returned as an `int`).
pub mod nvml {
    use std::ffi::{c_uint, c_void};

    use crate::CUresult;
    use crate::hooks;

    hooked_symbols! {
        resolve = crate::real_nvml_symbol;
        nvmlDeviceGetIndex(device: *mut c_void, index: *mut c_uint) => hooks::nvml_device_get_index;
        nvmlDeviceGetMemoryInfo(device: *mut c_void, memory: *mut c_void) => hooks::nvml_memory_info;
        nvmlDeviceGetMemoryInfo_v2(device: *mut c_void, memory: *mut c_void) => hooks::nvml_memory_info_v2;
    }
}
