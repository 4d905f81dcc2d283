//! `libhami_ioctl_log.so`: loaded with `LD_PRELOAD`, it logs every `ioctl(2)` a process makes on a
//! file whose path starts with `$HAMI_IOCTL_LOG_MATCH` (default `/dev/nvidia`), as one JSON object per
//! line appended to `$HAMI_IOCTL_LOG`. Nothing is decoded beyond what the ioctl encoding itself says:
//! the argument's bytes before and after the call, the wrapped argument of `NV_ESC_IOCTL_XFER_CMD`,
//! and the first 256 bytes of `pAllocParms` of `NV_ESC_RM_ALLOC`. It records what the real driver and
//! libcuda exchange, so that the layouts the agent decodes can be checked against a real GPU node (the
//! GPU kit, `cargo xtask gpu-kit`). Without `$HAMI_IOCTL_LOG` it only forwards.
//!
//! Record fields: `t_ns` (CLOCK_MONOTONIC), `pid`, `tid`, `path`, `cmd` (hex), `nr`, `size`, `ret`,
//! `errno` (0 on success), `before` and `after` (hex of `size` bytes, empty when unreadable),
//! optionally `xfer` {`cmd`, `size`, `ptr`, `before`, `after`} and `params_after` (hex).
//!
//! Escape numbers and the XFER layout: `nv_escape.h` and `nv-ioctl.h` of
//! NVIDIA/open-gpu-kernel-modules (595.45.04): `NV_ESC_RM_ALLOC` 0x2B, `NV_ESC_IOCTL_XFER_CMD` 0xD3
//! (`nv_ioctl_xfer_t { NvU32 cmd; NvU32 size; NvP64 ptr; }`, `cmd` the bare escape number).
#![allow(
    unsafe_code,
    reason = "an LD_PRELOAD interposer: the exported ioctl, dlsym of the real one, raw user memory"
)]

use std::cell::Cell;
use std::ffi::{c_int, c_ulong, c_void};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

/// `_IOC_NR`/`_IOC_SIZE` of the ioctl encoding (`include/uapi/asm-generic/ioctl.h`).
fn ioc_nr(cmd: c_ulong) -> u32 {
    (cmd & 0xff) as u32
}
fn ioc_size(cmd: c_ulong) -> usize {
    ((cmd >> 16) & 0x3fff) as usize
}

const ESC_RM_ALLOC: u32 = 0x2B;
const ESC_IOCTL_XFER_CMD: u32 = 0xD3;
/// `NV_ABSOLUTE_MAX_IOCTL_SIZE`.
const MAX_SIZE: usize = 16384;
const PARAMS_BYTES: usize = 256;

type RealIoctl = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;

fn real() -> Option<RealIoctl> {
    static REAL: OnceLock<usize> = OnceLock::new();
    let p = *REAL.get_or_init(|| {
        // SAFETY: a NUL-terminated name; RTLD_NEXT finds the definition after this library's.
        unsafe { libc::dlsym(libc::RTLD_NEXT, c"ioctl".as_ptr()) as usize }
    });
    // SAFETY: the address of libc's `ioctl`, whose C signature this is.
    (p != 0).then(|| unsafe { std::mem::transmute::<usize, RealIoctl>(p) })
}

struct Config {
    file: Mutex<std::fs::File>,
    prefix: String,
}

fn config() -> Option<&'static Config> {
    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let path = std::env::var_os("HAMI_IOCTL_LOG")?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()?;
            let prefix = std::env::var("HAMI_IOCTL_LOG_MATCH").unwrap_or_else(|_| "/dev/nvidia".to_owned());
            Some(Config {
                file: Mutex::new(file),
                prefix,
            })
        })
        .as_ref()
}

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Copies `len` bytes of this process's memory at `addr`, or nothing when any of it is unreadable
/// (`process_vm_readv` reports a fault instead of taking one).
fn read_mem(addr: u64, len: usize) -> Vec<u8> {
    if addr == 0 || len == 0 || len > MAX_SIZE {
        return Vec::new();
    }
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: len,
    };
    // SAFETY: both iovecs describe `len` bytes; the remote one may fault, which the call reports.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &raw const local, 1, &raw const remote, 1, 0) };
    if usize::try_from(n).ok() == Some(len) {
        buf
    } else {
        Vec::new()
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn fd_path(fd: c_int) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
}

/// The interposed `ioctl(2)`.
///
/// # Safety
/// As `ioctl(2)`: `arg` is whatever the request needs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    let Some(real) = real() else {
        // SAFETY: setting errno of this thread.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    };
    let cfg = config();
    let logging = cfg.is_some() && !BUSY.with(Cell::get);
    let path = if logging { fd_path(fd) } else { None };
    let (Some(cfg), Some(path)) = (
        cfg,
        path.filter(|p| cfg.is_some_and(|c| p.starts_with(&c.prefix))),
    ) else {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { real(fd, request, arg) };
    };
    BUSY.with(|b| b.set(true));
    let size = ioc_size(request);
    let nr = ioc_nr(request);
    let before = read_mem(arg as u64, size);
    let xfer_before = (nr == ESC_IOCTL_XFER_CMD && before.len() == 16)
        .then(|| {
            let (c, s, p) = (u32_at(&before, 0)?, u32_at(&before, 4)?, u64_at(&before, 8)?);
            Some((c, s, p, read_mem(p, s as usize)))
        })
        .flatten();
    let t = now_ns();
    // SAFETY: forwarding the caller's arguments.
    let ret = unsafe { real(fd, request, arg) };
    let errno = if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    let after = read_mem(arg as u64, size);
    let mut rec = format!(
        "{{\"t_ns\":{t},\"pid\":{},\"tid\":{},\"path\":{:?},\"cmd\":\"{request:#x}\",\"nr\":{nr},\"size\":{size},\"ret\":{ret},\"errno\":{errno},\"before\":\"{}\",\"after\":\"{}\"",
        std::process::id(),
        // SAFETY: no preconditions.
        unsafe { libc::gettid() },
        path,
        hex(&before),
        hex(&after),
    );
    let mut alloc_struct = (nr == ESC_RM_ALLOC).then(|| after.clone());
    if let Some((c, s, p, inner_before)) = xfer_before {
        let inner_after = read_mem(p, s as usize);
        let _ = write!(
            rec,
            ",\"xfer\":{{\"cmd\":{c},\"size\":{s},\"ptr\":\"{p:#x}\",\"before\":\"{}\",\"after\":\"{}\"}}",
            hex(&inner_before),
            hex(&inner_after)
        );
        if c == ESC_RM_ALLOC {
            alloc_struct = Some(inner_after);
        }
    }
    if let Some(params) = alloc_struct.as_deref().and_then(|a| u64_at(a, 16)) {
        let _ = write!(
            rec,
            ",\"params_after\":\"{}\"",
            hex(&read_mem(params, PARAMS_BYTES))
        );
    }
    rec.push_str("}\n");
    if let Ok(mut f) = cfg.file.lock() {
        let _ = f.write_all(rec.as_bytes());
    }
    BUSY.with(|b| b.set(false));
    if ret < 0 {
        // SAFETY: restoring this thread's errno for the caller.
        unsafe { *libc::__errno_location() = errno };
    }
    ret
}
