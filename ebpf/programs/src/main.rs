//! The hami eBPF programs.
//!
//! * `syscalls:sys_enter_ioctl` / `sys_exit_ioctl` (classic tracepoints, where tracefs is mounted: they
//!   run for ioctls only), or `sys_enter` / `sys_exit` (raw tracepoints, no tracefs needed, but they run
//!   for every syscall): `ioctl(2)` on the NVIDIA device files the agent registered, by device number
//!   (any node of the device, wherever a container runtime made it) or, for the simulated node's
//!   regular files, by (superblock dev, inode) ([`FileKey`]). Entry records the (XFER-unwrapped)
//!   escape; exit reads the parameter struct back from the caller's memory, checks the RM `status`
//!   written by the driver, and keeps the live device-memory objects in `HAMI_ALLOCS`, emitting one
//!   event per allocation, failed allocation and free.
//! * `sched_process_exit` / `sched_process_fork`: lifecycle of processes that used the driver.
//! * `lsm/file_ioctl` (BPF LSM, loaded only with the hard limit on and where the kernel allows it):
//!   refuses with `-ENOMEM`, before the driver runs, a device-memory allocation that would take the
//!   container past its hard limit (the same decision as the kill, [`hami_ebpf_common::over_hard_limit`]).
//! * uprobes on libcuda: managed allocations (invisible at the ioctl layer), frees, and per-cgroup call
//!   counters for launches and allocation entry points.
//!
//! Layouts and constants: [`hami_ebpf_common::nv`] and [`hami_ebpf_common::AbiConfig`], each citing
//! its file in NVIDIA/open-gpu-kernel-modules.
#![no_std]
#![no_main]
#![allow(
    unsafe_code,
    reason = "eBPF programs read kernel and user memory through helpers and raw pointers"
)]
#![allow(
    unreachable_pub,
    missing_docs,
    reason = "program and map symbols are exported for the loader, documented in hami-ebpf-common"
)]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_send_signal,
    },
    macros::{lsm, map, raw_tracepoint, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{LsmContext, ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use hami_ebpf_common::{
    AllocValue, CallKey, Event, FileKey, KernelConfig, LimitKey, ObjectKey, ObjectValue, Pending, SYS_IOCTL,
    UprobePending, call, counter,
    decode::{self, Decoded},
    event_kind, file_kind, nv, pt_regs,
};

#[map]
static HAMI_DEVICE_FILES: HashMap<FileKey, u32> = HashMap::pinned(256, 0);
#[map]
static HAMI_CONFIG: Array<KernelConfig> = Array::pinned(1, 0);
#[map]
static HAMI_PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16384, 0);
#[map]
static HAMI_OBJECTS: HashMap<ObjectKey, ObjectValue> = HashMap::pinned(65536, 0);
#[map]
static HAMI_ALLOCS: HashMap<ObjectKey, AllocValue> = HashMap::pinned(262_144, 0);
#[map]
static HAMI_TRACKED: HashMap<u32, u64> = HashMap::pinned(65536, 0);
#[map]
static HAMI_EVENTS: RingBuf = RingBuf::pinned(1 << 22, 0);
#[map]
static HAMI_CALLS: PerCpuHashMap<CallKey, u64> = PerCpuHashMap::pinned(16384, 0);
#[map]
static HAMI_UPROBE_PENDING: HashMap<u64, UprobePending> = HashMap::with_max_entries(16384, 0);
#[map]
static HAMI_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);
#[map]
static HAMI_LIMITS: HashMap<LimitKey, u64> = HashMap::pinned(4096, 0);
#[map]
static HAMI_LIMIT_USAGE: HashMap<LimitKey, u64> = HashMap::pinned(4096, 0);

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = HAMI_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot of this CPU, valid for the program's run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn config() -> Option<KernelConfig> {
    let c = HAMI_CONFIG.get(0)?;
    if c.ready == 0 { None } else { Some(*c) }
}

#[inline(always)]
unsafe fn kread<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address (returns an error on a fault).
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T).ok() }
}

#[inline(always)]
unsafe fn uread<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user copes with any address (returns an error on a fault).
    unsafe { bpf_probe_read_user((base + u64::from(off)) as *const T).ok() }
}

/// (dev, ino) of the file behind `fd` in the current task: task->files->fdt->fd[fd]->f_inode.
#[inline(always)]
unsafe fn file_of_fd(fd: u64, c: &KernelConfig) -> Option<FileKey> {
    let k = &c.kernel;
    unsafe {
        let task = bpf_get_current_task();
        let files: u64 = kread(task, k.task_files)?;
        let fdt: u64 = kread(files, k.files_fdt)?;
        let max_fds: u32 = kread(fdt, k.fdt_max_fds)?;
        if fd >= u64::from(max_fds) {
            return None;
        }
        let fd_array: u64 = kread(fdt, k.fdt_fd)?;
        let file: u64 = kread(fd_array + fd * 8, 0)?;
        file_key(file, c)
    }
}

/// [`FileKey`] of `struct file *file`: its device number for a device node, else (dev, ino).
#[inline(always)]
unsafe fn file_key(file: u64, c: &KernelConfig) -> Option<FileKey> {
    let k = &c.kernel;
    unsafe {
        let inode: u64 = kread(file, k.file_inode)?;
        let rdev: u32 = kread(inode, k.inode_rdev)?;
        if rdev != 0 {
            return Some(FileKey::of_inode(rdev, 0, 0));
        }
        let ino: u64 = kread(inode, k.inode_ino)?;
        let sb: u64 = kread(inode, k.inode_sb)?;
        let dev: u32 = kread(sb, k.sb_dev)?;
        Some(FileKey::of_inode(0, dev, ino))
    }
}

#[inline(always)]
fn emit(ev: &Event) {
    if HAMI_EVENTS.output::<Event>(ev, 0).is_err() {
        bump(counter::RINGBUF_FULL);
    }
}

#[inline(always)]
fn base_event(kind: u32) -> Event {
    let pid_tgid = bpf_get_current_pid_tgid();
    Event {
        kind,
        gpu: hami_ebpf_common::GPU_UNKNOWN,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ..Event::default()
    }
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn hami_sys_enter(ctx: RawTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    if id != SYS_IOCTL {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // SAFETY: reads through helpers only.
    unsafe {
        let Some(cmd) = kread::<u64>(regs, pt_regs::SI as u32) else {
            return 0;
        };
        if !candidate(cmd) {
            return 0;
        }
        let (Some(fd), Some(arg)) = (
            kread::<u64>(regs, pt_regs::DI as u32),
            kread::<u64>(regs, pt_regs::DX as u32),
        ) else {
            return 0;
        };
        on_ioctl_enter(fd, cmd, arg);
    }
    0
}

/// `syscalls:sys_enter_ioctl` (classic tracepoint: runs for ioctl only, needs tracefs). Record layout
/// (`struct syscall_trace_enter`, `include/trace/syscall.h`): 8-byte common header, `int nr` at 8,
/// `args[i]` at 16 + 8·i.
#[tracepoint]
pub fn hami_ioctl_enter(ctx: TracePointContext) -> i32 {
    // SAFETY: offsets inside the tracepoint record.
    unsafe {
        let Ok(cmd) = ctx.read_at::<u64>(24) else { return 0 };
        if !candidate(cmd) {
            return 0;
        }
        let (Ok(fd), Ok(arg)) = (ctx.read_at::<u64>(16), ctx.read_at::<u64>(32)) else {
            return 0;
        };
        on_ioctl_enter(fd, cmd, arg);
    }
    0
}

/// Whether an ioctl command can be an RM allocation, free, heap control or XFER. The driver dispatches
/// on `_IOC_NR` alone (`arg_cmd = _IOC_NR(cmd)` in `nvidia_ioctl`, `kernel-open/nvidia/nv.c`), so the number is tested before the
/// costlier walk from the fd to its inode.
#[inline(always)]
fn candidate(cmd: u64) -> bool {
    let nr = (cmd & 0xff) as u32;
    nr == nv::ESC_RM_ALLOC
        || nr == nv::ESC_RM_FREE
        || nr == nv::ESC_RM_VID_HEAP_CONTROL
        || nr == nv::ESC_IOCTL_XFER_CMD
}

#[inline(always)]
unsafe fn on_ioctl_enter(fd: u64, cmd: u64, arg: u64) -> Option<()> {
    let c = config()?;
    let key = unsafe { file_of_fd(fd, &c)? };
    // SAFETY: plain map lookup.
    let kind = unsafe { *HAMI_DEVICE_FILES.get(key)? };
    bump(counter::IOCTLS);
    let mut nr = (cmd & 0xff) as u32;
    let mut size = ((cmd >> 16) & 0x3fff) as u32;
    let mut ptr = arg;
    if nr == nv::ESC_IOCTL_XFER_CMD {
        if size != nv::XFER_SIZE {
            bump(counter::MALFORMED);
            return None;
        }
        let Some(inner_cmd) = (unsafe { uread::<u32>(arg, 0) }) else {
            bump(counter::MALFORMED);
            return None;
        };
        let Some(inner_size) = (unsafe { uread::<u32>(arg, 4) }) else {
            bump(counter::MALFORMED);
            return None;
        };
        let Some(inner_ptr) = (unsafe { uread::<u64>(arg, 8) }) else {
            bump(counter::MALFORMED);
            return None;
        };
        // The wrapper carries the bare escape number (`nvidia_ioctl` in `kernel-open/nvidia/nv.c`:
        // `arg_cmd = ioc_xfer.cmd`), not an ioctl command.
        nr = inner_cmd;
        size = inner_size;
        ptr = inner_ptr;
        if size > nv::MAX_IOCTL_SIZE || nr == nv::ESC_IOCTL_XFER_CMD {
            bump(counter::MALFORMED);
            return None;
        }
    }
    if nr != nv::ESC_RM_ALLOC && nr != nv::ESC_RM_FREE && nr != nv::ESC_RM_VID_HEAP_CONTROL {
        return None;
    }
    let pending = Pending {
        arg: ptr,
        nr,
        size,
        file_kind: kind,
        _pad: 0,
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = HAMI_PENDING.insert(pid_tgid, pending, 0);
    Some(())
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn hami_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    // SAFETY: reads through helpers only.
    if unsafe { kread::<u64>(regs, pt_regs::ORIG_AX as u32) } != Some(SYS_IOCTL) {
        return 0;
    }
    on_ioctl_exit(ctx.arg(1));
    0
}

/// `syscalls:sys_exit_ioctl`: `long ret` at 16 (`struct syscall_trace_exit`).
#[tracepoint]
pub fn hami_ioctl_exit(ctx: TracePointContext) -> i32 {
    // SAFETY: offset inside the tracepoint record.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(16) } {
        on_ioctl_exit(ret);
    }
    0
}

#[inline(always)]
fn on_ioctl_exit(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: plain map lookup; the value is copied out before removal.
    let Some(p) = (unsafe { HAMI_PENDING.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = HAMI_PENDING.remove(pid_tgid);
    if ret != 0 || p.file_kind != file_kind::CTL {
        // The syscall itself failed (the driver never ran the escape) or RM escapes were sent to a
        // per-GPU fd, which the driver refuses (`NV_CTL_DEVICE_ONLY`).
        return;
    }
    let Some(c) = config() else { return };
    if on_escape(&p, &c).is_none() {
        bump(counter::MALFORMED);
        let mut ev = base_event(event_kind::MALFORMED);
        ev.nr = p.nr;
        ev.bytes = u64::from(p.size);
        emit(&ev);
    }
}

#[inline(always)]
fn track(tgid: u32, cgroup: u64) {
    let _ = HAMI_TRACKED.insert(tgid, cgroup, 0);
}

#[inline(always)]
fn record_alloc(client: u32, handle: u32, parent: u32, bytes: u64, class: u32, nr: u32) {
    let mut ev = base_event(event_kind::ALLOC);
    if let Some(g) = gpu_of(ev.tgid, client, parent) {
        ev.gpu = g;
    }
    ev.client = client;
    ev.handle = handle;
    ev.parent = parent;
    ev.bytes = bytes;
    ev.class = class;
    ev.nr = nr;
    let key = ObjectKey::new(ev.tgid, client, handle);
    let val = AllocValue {
        cgroup_id: ev.cgroup_id,
        bytes,
        ts_ns: ev.ts_ns,
        gpu: ev.gpu,
        parent,
    };
    if HAMI_ALLOCS.insert(key, val, 0).is_err() {
        bump(counter::ALLOC_MAP_FULL);
    }
    track(ev.tgid, ev.cgroup_id);
    // Before the event: the agent, writing the exact usage after consuming events, may briefly miss
    // this allocation (never count it twice), so a limit is never enforced early.
    enforce_hard_limit(&ev);
    emit(&ev);
}

/// Hard limit (agent flag): when the container has a limit on this GPU (or on every GPU) and this
/// allocation takes it past the limit, the caller gets SIGKILL, like the memory cgroup's OOM killer; its
/// objects are released at exit. The usage compared is the agent's exact figure plus the allocations
/// seen since (added here without atomics: concurrent allocations on two CPUs may be undercounted until
/// the agent's next write, a few milliseconds later).
#[inline(always)]
fn enforce_hard_limit(ev: &Event) {
    let Some((key, limit)) = limit_of(ev.cgroup_id, ev.gpu) else {
        return;
    };
    let used = match HAMI_LIMIT_USAGE.get_ptr_mut(key) {
        Some(p) => {
            // SAFETY: the map value lives while the program runs.
            unsafe {
                *p += ev.bytes;
                *p
            }
        }
        None => {
            let _ = HAMI_LIMIT_USAGE.insert(key, ev.bytes, 0);
            ev.bytes
        }
    };
    if hami_ebpf_common::over_hard_limit(used, 0, limit) {
        // SAFETY: signals the current task (the allocating thread's process).
        unsafe { bpf_send_signal(9) };
        bump(counter::HARD_LIMIT_KILLS);
        let mut k = *ev;
        k.kind = event_kind::HARD_LIMIT_KILL;
        k.aux = limit;
        emit(&k);
    }
}

/// The container's hard limit on `gpu` (or on every GPU): (map key, bytes).
#[inline(always)]
fn limit_of(cgroup_id: u64, gpu: u32) -> Option<(LimitKey, u64)> {
    let exact = LimitKey {
        cgroup_id,
        gpu,
        _pad: 0,
    };
    let any = LimitKey {
        cgroup_id,
        gpu: hami_ebpf_common::GPU_UNKNOWN,
        _pad: 0,
    };
    // SAFETY: plain map lookups.
    match unsafe { HAMI_LIMITS.get(exact) } {
        Some(l) => Some((exact, *l)),
        None => unsafe { HAMI_LIMITS.get(any) }.map(|l| (any, *l)),
    }
}

/// BPF LSM `file_ioctl(struct file *file, unsigned int cmd, unsigned long arg)` (+ the previous
/// program's `retval`): refuses with `-ENOMEM` a device-memory allocation on `nvidiactl` that would
/// take the caller's container past its hard limit, before the driver allocates anything.
#[lsm(hook = "file_ioctl")]
pub fn hami_lsm_file_ioctl(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let (file, cmd, arg): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    // SAFETY: reads through helpers only.
    if unsafe { lsm_refuses(file, cmd & 0xffff_ffff, arg) } == Some(true) {
        -hami_ebpf_common::ENOMEM
    } else {
        0
    }
}

#[inline(always)]
unsafe fn lsm_refuses(file: u64, cmd: u64, arg: u64) -> Option<bool> {
    if !candidate(cmd) {
        return Some(false);
    }
    let c = config()?;
    let key = unsafe { file_key(file, &c)? };
    // SAFETY: plain map lookup.
    if unsafe { *HAMI_DEVICE_FILES.get(key)? } != file_kind::CTL {
        return Some(false);
    }
    let mut nr = (cmd & 0xff) as u32;
    let mut size = ((cmd >> 16) & 0x3fff) as u32;
    let mut ptr = arg;
    if nr == nv::ESC_IOCTL_XFER_CMD {
        if size != nv::XFER_SIZE {
            return Some(false);
        }
        nr = unsafe { uread::<u32>(arg, 0)? };
        size = unsafe { uread::<u32>(arg, 4)? };
        ptr = unsafe { uread::<u64>(arg, 8)? };
    }
    let (client, parent, bytes) = decode::requested_alloc(&UserMem, nr, ptr, size, &c.abi)?;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let gpu = gpu_of(tgid, client, parent).unwrap_or(hami_ebpf_common::GPU_UNKNOWN);
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let (key, limit) = limit_of(cgroup_id, gpu)?;
    // SAFETY: plain map lookup.
    let used = unsafe { HAMI_LIMIT_USAGE.get(key) }.copied().unwrap_or(0);
    Some(hami_ebpf_common::over_hard_limit(used, bytes, limit))
}

#[inline(always)]
fn record_failed(client: u32, parent: u32, bytes: u64, status: u32, nr: u32) {
    let mut ev = base_event(event_kind::ALLOC_FAILED);
    if let Some(g) = gpu_of(ev.tgid, client, parent) {
        ev.gpu = g;
    }
    ev.client = client;
    ev.parent = parent;
    ev.bytes = bytes;
    ev.status = status;
    ev.class = nv::CLASS_MEMORY_LOCAL_USER;
    ev.nr = nr;
    emit(&ev);
}

#[inline(always)]
fn record_free(client: u32, handle: u32, nr: u32) {
    let mut ev = base_event(event_kind::FREE);
    let key = ObjectKey::new(ev.tgid, client, handle);
    ev.client = client;
    ev.handle = handle;
    ev.nr = nr;
    // SAFETY: plain map lookup; copied before removal.
    if let Some(v) = unsafe { HAMI_ALLOCS.get(key) }.copied() {
        let _ = HAMI_ALLOCS.remove(key);
        ev.bytes = v.bytes;
        ev.gpu = v.gpu;
        ev.parent = v.parent;
        // The owner's cgroup, not the freeing thread's (they are the same process).
        ev.cgroup_id = v.cgroup_id;
        emit(&ev);
        return;
    }
    // SAFETY: plain map lookup.
    let was_object = unsafe { HAMI_OBJECTS.get(key) }.is_some();
    if was_object {
        let _ = HAMI_OBJECTS.remove(key);
    }
    if was_object || handle == client {
        ev.kind = event_kind::FREE_OBJECT;
        emit(&ev);
    }
}

/// Reads the calling process's memory.
struct UserMem;

impl decode::Reader for UserMem {
    #[inline(always)]
    fn u32_at(&self, base: u64, off: u32) -> Option<u32> {
        // SAFETY: bpf_probe_read_user copes with any address.
        unsafe { uread::<u32>(base, off) }
    }
    #[inline(always)]
    fn u64_at(&self, base: u64, off: u32) -> Option<u64> {
        // SAFETY: bpf_probe_read_user copes with any address.
        unsafe { uread::<u64>(base, off) }
    }
}

#[inline(always)]
fn gpu_of(tgid: u32, client: u32, handle: u32) -> Option<u32> {
    let key = ObjectKey::new(tgid, client, handle);
    // SAFETY: plain map lookup.
    unsafe { HAMI_OBJECTS.get(key) }.map(|v| v.gpu)
}

/// Records a device or subdevice object and tells the agent (the tree frees cascade through).
#[inline(always)]
fn record_object(client: u32, handle: u32, parent: u32, gpu: u32, class: u32, nr: u32) {
    let mut ev = base_event(event_kind::OBJECT);
    let key = ObjectKey::new(ev.tgid, client, handle);
    let _ = HAMI_OBJECTS.insert(key, ObjectValue { gpu, parent }, 0);
    ev.gpu = gpu;
    ev.client = client;
    ev.handle = handle;
    ev.parent = parent;
    ev.class = class;
    ev.nr = nr;
    emit(&ev);
}

#[inline(always)]
fn on_escape(p: &Pending, c: &KernelConfig) -> Option<()> {
    let r = UserMem;
    let d = match p.nr {
        nv::ESC_RM_ALLOC => decode::rm_alloc(&r, p.arg, p.size, &c.abi)?,
        nv::ESC_RM_FREE => decode::rm_free(&r, p.arg, p.size)?,
        _ => decode::vid_heap(&r, p.arg, p.size)?,
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match d {
        Decoded::Alloc {
            client,
            parent,
            handle,
            bytes,
        } => record_alloc(client, handle, parent, bytes, nv::CLASS_MEMORY_LOCAL_USER, p.nr),
        Decoded::AllocFailed {
            client,
            parent,
            bytes,
            status,
        } => record_failed(client, parent, bytes, status, p.nr),
        Decoded::Device {
            client,
            handle,
            device_id,
        } => record_object(client, handle, client, device_id, nv::CLASS_DEVICE, p.nr),
        Decoded::Subdevice {
            client,
            parent,
            handle,
        } => {
            // Kept even under a device allocated before tracing began (GPU unknown): frees still
            // cascade through it.
            let gpu = gpu_of(tgid, client, parent).unwrap_or(hami_ebpf_common::GPU_UNKNOWN);
            record_object(client, handle, parent, gpu, nv::CLASS_SUBDEVICE, p.nr);
        }
        Decoded::Free { client, handle } => record_free(client, handle, p.nr),
        Decoded::Ignored => {}
    }
    Some(())
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn hami_process_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = HAMI_PENDING.remove(pid_tgid);
    let _ = HAMI_UPROBE_PENDING.remove(pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != pid_tgid as u32 {
        return 0;
    }
    // SAFETY: plain map lookup.
    if unsafe { HAMI_TRACKED.get(tgid) }.is_none() {
        return 0;
    }
    let _ = HAMI_TRACKED.remove(tgid);
    emit(&base_event(event_kind::EXIT));
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn hami_process_exec(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: plain map lookup.
    if unsafe { HAMI_TRACKED.get(tgid) }.is_none() {
        return 0;
    }
    let _ = HAMI_TRACKED.remove(tgid);
    emit(&base_event(event_kind::EXEC));
    0
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn hami_process_fork(ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain map lookup.
    if unsafe { HAMI_TRACKED.get(tgid) }.is_none() {
        return 0;
    }
    let Some(c) = config() else { return 0 };
    let child: u64 = ctx.arg(1);
    // SAFETY: reads through helpers only.
    let (child_tgid, child_pid) = unsafe {
        (
            kread::<u32>(child, c.kernel.task_tgid),
            kread::<u32>(child, c.kernel.task_pid),
        )
    };
    let (Some(child_tgid), Some(child_pid)) = (child_tgid, child_pid) else {
        return 0;
    };
    if child_tgid != child_pid || child_tgid == tgid {
        // A new thread, not a new process.
        return 0;
    }
    let mut ev = base_event(event_kind::FORK);
    ev.aux = u64::from(child_tgid);
    emit(&ev);
    0
}

#[inline(always)]
fn count_call(id: u32) {
    let key = CallKey {
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        call: id,
        _pad: 0,
    };
    match HAMI_CALLS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of the entry.
        Some(p) => unsafe { *p += 1 },
        None => {
            let _ = HAMI_CALLS.insert(key, 1, 0);
        }
    }
}

#[inline(always)]
fn stash(ctx: &ProbeContext, id: u32, ptr_arg: usize, bytes_arg: Option<usize>) {
    let pending = UprobePending {
        ptr: ctx.arg::<u64>(ptr_arg).unwrap_or(0),
        bytes: bytes_arg.and_then(|n| ctx.arg::<u64>(n)).unwrap_or(0),
        call: id,
        _pad: 0,
    };
    let _ = HAMI_UPROBE_PENDING.insert(bpf_get_current_pid_tgid(), pending, 0);
}

#[uprobe]
pub fn hami_cu_mem_alloc(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_ALLOC);
    0
}

#[uprobe]
pub fn hami_cu_mem_alloc_pitch(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_ALLOC_PITCH);
    0
}

#[uprobe]
pub fn hami_cu_mem_create(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_CREATE);
    0
}

#[uprobe]
pub fn hami_cu_mem_alloc_async(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_ALLOC_ASYNC);
    0
}

#[uprobe]
pub fn hami_cu_mem_release(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_RELEASE);
    0
}

#[uprobe]
pub fn hami_cu_mem_free_async(_ctx: ProbeContext) -> u32 {
    count_call(call::MEM_FREE_ASYNC);
    0
}

#[uprobe]
pub fn hami_cu_mem_alloc_managed(ctx: ProbeContext) -> u32 {
    count_call(call::MEM_ALLOC_MANAGED);
    stash(&ctx, call::MEM_ALLOC_MANAGED, 0, Some(1));
    0
}

#[uprobe]
pub fn hami_cu_mem_free(ctx: ProbeContext) -> u32 {
    count_call(call::MEM_FREE);
    stash(&ctx, call::MEM_FREE, 0, None);
    0
}

#[uretprobe]
pub fn hami_cu_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: plain map lookup; copied before removal.
    let Some(p) = (unsafe { HAMI_UPROBE_PENDING.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = HAMI_UPROBE_PENDING.remove(pid_tgid);
    let result: u64 = ctx.ret();
    let result = result as u32;
    let mut ev = base_event(event_kind::CU_FREE);
    ev.status = result;
    if p.call == call::MEM_ALLOC_MANAGED {
        if result != 0 {
            return 0;
        }
        ev.kind = event_kind::MANAGED_ALLOC;
        ev.bytes = p.bytes;
        // SAFETY: reads through helpers only.
        ev.aux = unsafe { uread::<u64>(p.ptr, 0) }.unwrap_or(0);
    } else {
        if result != 0 {
            return 0;
        }
        ev.aux = p.ptr;
    }
    emit(&ev);
    0
}

/// Entry probes that only count their call (per cgroup).
macro_rules! counting_uprobes {
    ($($name:ident => $call:expr),* $(,)?) => {$(
        #[uprobe]
        pub fn $name(_ctx: ProbeContext) -> u32 {
            count_call($call);
            0
        }
    )*};
}

counting_uprobes! {
    hami_cu_launch_kernel_ptsz => call::LAUNCH_KERNEL_PTSZ,
    hami_cu_launch_kernel_ex_ptsz => call::LAUNCH_KERNEL_EX_PTSZ,
    hami_cu_launch_cooperative_ptsz => call::LAUNCH_COOPERATIVE_PTSZ,
    hami_cu_graph_launch_ptsz => call::GRAPH_LAUNCH_PTSZ,
    hami_cu_mem_alloc_async_ptsz => call::MEM_ALLOC_ASYNC_PTSZ,
    hami_cu_mem_free_async_ptsz => call::MEM_FREE_ASYNC_PTSZ,
    hami_cu_mem_alloc_from_pool_async => call::MEM_ALLOC_FROM_POOL_ASYNC,
    hami_cu_mem_alloc_from_pool_async_ptsz => call::MEM_ALLOC_FROM_POOL_ASYNC_PTSZ,
}

#[uprobe]
pub fn hami_cu_launch_kernel(_ctx: ProbeContext) -> u32 {
    count_call(call::LAUNCH_KERNEL);
    0
}

#[uprobe]
pub fn hami_cu_launch_kernel_ex(_ctx: ProbeContext) -> u32 {
    count_call(call::LAUNCH_KERNEL_EX);
    0
}

#[uprobe]
pub fn hami_cu_launch_cooperative(_ctx: ProbeContext) -> u32 {
    count_call(call::LAUNCH_COOPERATIVE);
    0
}

#[uprobe]
pub fn hami_cu_graph_launch(_ctx: ProbeContext) -> u32 {
    count_call(call::GRAPH_LAUNCH);
    0
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
