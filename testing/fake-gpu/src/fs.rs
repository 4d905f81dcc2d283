//! The fake NVIDIA device files, served over FUSE.
//!
//! The mount directory holds:
//! - `nvidiactl` and `nvidia0` … `nvidia<N-1>`: regular files whose ioctls go to [`crate::rm`]
//!   (restricted FUSE ioctls: the kernel copies `_IOC_SIZE(cmd)` bytes in and out, so the caller must
//!   use `_IOWR` commands, as the driver headers do);
//! - `hami-ground-truth.json`: read-only; a JSON [`GroundTruth`] taken when the file is opened;
//! - `hami-control`: write-only, one command per line: failure injection (`xid <gpu> <code>`,
//!   `lost <gpu>`, `recover <gpu>`) and, from tenants, kernel launches for the utilisation model
//!   (`launch <gpu> <sm_percent> <duration_us>`, attributed to the writing process) and managed memory
//!   (`managed <gpu> <bytes> <address>` registers a managed range of the writing process,
//!   `managed-free <address>` forgets it; numbers are decimal or `0x` hex). Managed memory travels
//!   this way, by `write(2)`, because on the real driver it involves no RM ioctl at all (a UVM `mmap`,
//!   `reference/nvidia-driver-abi.md` §7): an ioctl tracer must not see it. Closing the open
//!   `hami-control` file it was written through forgets the ranges, as the real driver does when the
//!   UVM fd goes at exit.
//!
//! The server process holds the one [`DeviceModel`], so every process that opens the files sees the
//! same device: the mount is the state service. Pointers inside ioctl structs (`pAllocParms`, the XFER
//! argument) are read from and written to the caller with `process_vm_readv`/`process_vm_writev`
//! (the FUSE request carries the caller's pid; the server runs as root). Closing the last reference to
//! an open `nvidiactl` frees every RM client allocated through it, as the driver does on close/exit.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

use crate::Error;
use crate::model::{DeviceModel, GroundTruth, Owner};
use crate::rm::{self, Caller, FileKind, UserMemory};

/// Name of the ground-truth file in the mount.
pub const GROUND_TRUTH_FILE: &str = "hami-ground-truth.json";
/// Name of the failure-injection file in the mount.
pub const CONTROL_FILE: &str = "hami-control";
/// Name of the control device file in the mount.
pub const CTL_FILE: &str = "nvidiactl";

const TTL: Duration = Duration::from_secs(1);
const INO_ROOT: u64 = 1;
const INO_CTL: u64 = 2;
const INO_CONTROL: u64 = 3;
const INO_TRUTH: u64 = 4;
const INO_GPU_BASE: u64 = 16;

/// The device model shared between the FUSE server and in-process readers.
pub type SharedModel = Arc<Mutex<DeviceModel>>;

/// The node clock's start: a monotonic instant and the wall-clock time taken with it.
fn clock_start() -> &'static (Instant, SystemTime) {
    static START: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    START.get_or_init(|| (Instant::now(), SystemTime::now()))
}

/// Nanoseconds since this process first asked (the node's clock for the utilisation model; monotonic).
#[must_use]
pub fn clock_ns() -> u64 {
    u64::try_from(clock_start().0.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The wall-clock time (`CLOCK_REALTIME`, nanoseconds since the Unix epoch) at which [`clock_ns`]
/// was 0, measured once when the clock started (later steps of the wall clock are not followed).
#[must_use]
pub fn clock_epoch_unix_ns() -> u64 {
    clock_start()
        .1
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Locks the model (recovering from a poisoned lock: a panicking test thread must not wedge the
/// device) and advances its clock to now (and tells it the clock's wall-clock epoch).
pub fn lock(model: &SharedModel) -> MutexGuard<'_, DeviceModel> {
    let mut g = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    g.set_clock_epoch_unix_ns(clock_epoch_unix_ns());
    g.tick(clock_ns());
    g
}

/// The caller's memory, through `process_vm_readv`/`process_vm_writev`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    /// Any thread id of the caller.
    pub pid: i32,
}

impl UserMemory for ProcessMemory {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let remote = [RemoteIoVec {
            base: usize::try_from(addr).ok()?,
            len,
        }];
        let n = process_vm_readv(Pid::from_raw(self.pid), &mut [IoSliceMut::new(&mut buf)], &remote).ok()?;
        (n == len).then_some(buf)
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Ok(base) = usize::try_from(addr) else {
            return false;
        };
        let remote = [RemoteIoVec {
            base,
            len: data.len(),
        }];
        process_vm_writev(Pid::from_raw(self.pid), &[IoSlice::new(data)], &remote)
            .is_ok_and(|n| n == data.len())
    }
}

/// The thread-group id of thread `tid` (`Tgid:` in `/proc/<tid>/status`), `tid` itself if unreadable.
#[must_use]
pub fn tgid_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

#[derive(Debug)]
enum Open {
    Device(FileKind),
    Truth(Vec<u8>),
    Control,
}

/// The FUSE filesystem.
#[derive(Debug)]
pub struct FakeDeviceFs {
    model: SharedModel,
    gpus: u32,
    next_fh: AtomicU64,
    open: Mutex<BTreeMap<u64, Open>>,
    open_count: Arc<AtomicUsize>,
    uid: u32,
    gid: u32,
}

impl FakeDeviceFs {
    /// A filesystem serving `model`.
    #[must_use]
    pub fn new(model: SharedModel) -> Self {
        let gpus = lock(&model).gpu_count();
        Self {
            model,
            gpus,
            next_fh: AtomicU64::new(1),
            open: Mutex::new(BTreeMap::new()),
            open_count: Arc::new(AtomicUsize::new(0)),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    /// How many files of the mount are open now (shared counter, for teardown decisions).
    #[must_use]
    pub fn open_count(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.open_count)
    }

    fn entries(&self) -> Vec<(u64, FileType, String)> {
        let mut v = vec![
            (INO_ROOT, FileType::Directory, ".".to_owned()),
            (INO_ROOT, FileType::Directory, "..".to_owned()),
            (INO_CTL, FileType::RegularFile, CTL_FILE.to_owned()),
        ];
        v.extend((0..self.gpus).map(|i| {
            (
                INO_GPU_BASE + u64::from(i),
                FileType::RegularFile,
                format!("nvidia{i}"),
            )
        }));
        v.push((INO_TRUTH, FileType::RegularFile, GROUND_TRUTH_FILE.to_owned()));
        v.push((INO_CONTROL, FileType::RegularFile, CONTROL_FILE.to_owned()));
        v
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm) = match ino {
            INO_ROOT => (FileType::Directory, 0o755),
            INO_CTL => (FileType::RegularFile, 0o666),
            INO_TRUTH => (FileType::RegularFile, 0o444),
            INO_CONTROL => (FileType::RegularFile, 0o200),
            i if (INO_GPU_BASE..INO_GPU_BASE + u64::from(self.gpus)).contains(&i) => {
                (FileType::RegularFile, 0o666)
            }
            _ => return None,
        };
        let t = SystemTime::UNIX_EPOCH;
        Some(FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 512,
        })
    }

    fn opens(&self) -> MutexGuard<'_, BTreeMap<u64, Open>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Applies one command line written to `hami-control` through the open file of `owner` (the writing
/// process and its file handle) to the model.
///
/// # Errors
/// [`Error::Control`] when the line is not a known command, lacks or has malformed arguments, or the
/// model refuses it (unknown GPU, unknown managed address, …).
pub fn apply_control(model: &mut DeviceModel, line: &str, owner: Owner) -> Result<(), Error> {
    let fail = |reason: String| Error::Control {
        line: line.to_owned(),
        reason,
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let arg = |i: usize| -> Result<u64, Error> {
        let w = words.get(i).ok_or_else(|| fail("missing argument".to_owned()))?;
        let parsed = match w.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => w.parse(),
        };
        parsed.map_err(|e| fail(format!("`{w}`: {e}")))
    };
    let num = |i: usize| -> Result<u32, Error> {
        u32::try_from(arg(i)?).map_err(|e| fail(format!("argument {i}: {e}")))
    };
    let status = |r: Result<(), u32>| r.map_err(|s| fail(format!("NV_STATUS {s:#x}")));
    let ok = match words.first().copied() {
        None => return Ok(()),
        Some("xid") => model.inject_xid(num(1)?, num(2)?),
        Some("lost") => model.set_lost(num(1)?, true),
        Some("recover") => model.set_lost(num(1)?, false),
        Some("launch") => {
            let duration_ns = arg(3)?.saturating_mul(1_000);
            return status(model.launch(owner.tgid, num(1)?, num(2)?, duration_ns));
        }
        Some("managed") => return status(model.alloc_managed(owner, num(1)?, arg(2)?, arg(3)?)),
        Some("managed-free") => return status(model.free_managed(owner.tgid, arg(1)?)),
        Some(other) => {
            return Err(fail(format!(
                "unknown command `{other}` (xid, lost, recover, launch, managed, managed-free)"
            )));
        }
    };
    if ok {
        Ok(())
    } else {
        Err(fail("no such GPU".to_owned()))
    }
}

impl Filesystem for FakeDeviceFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent.0 == INO_ROOT)
            .then(|| {
                self.entries()
                    .into_iter()
                    .skip(2)
                    .find(|(_, _, n)| OsStr::new(n) == name)
            })
            .flatten()
            .and_then(|(ino, _, _)| self.attr(ino));
        match found {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Truncation on open (`echo … > hami-control`) is accepted and changes nothing.
        self.getattr(_req, ino, None, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let o = match ino.0 {
            INO_CTL => Open::Device(FileKind::Control),
            INO_TRUTH => {
                let truth = lock(&self.model).snapshot();
                match serde_json::to_vec_pretty(&truth) {
                    Ok(mut v) => {
                        v.push(b'\n');
                        Open::Truth(v)
                    }
                    Err(_) => return reply.error(Errno::EIO),
                }
            }
            INO_CONTROL => Open::Control,
            i if (INO_GPU_BASE..INO_GPU_BASE + u64::from(self.gpus)).contains(&i) => {
                Open::Device(FileKind::Gpu(u32::try_from(i - INO_GPU_BASE).unwrap_or(0)))
            }
            INO_ROOT => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::ENOENT),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.opens().insert(fh, o);
        self.open_count.fetch_add(1, Ordering::SeqCst);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.opens().get(&fh.0) {
            Some(Open::Truth(bytes)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            // The real device files return nothing to read().
            Some(Open::Device(_)) => reply.data(&[]),
            _ => reply.error(Errno::EBADF),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !matches!(self.opens().get(&fh.0), Some(Open::Control)) {
            return reply.error(Errno::EBADF);
        }
        let Ok(text) = std::str::from_utf8(data) else {
            return reply.error(Errno::EINVAL);
        };
        let owner = Owner {
            tgid: tgid_of(req.pid()),
            fd: fh.0,
        };
        let mut model = lock(&self.model);
        for line in text.lines() {
            if let Err(e) = apply_control(&mut model, line, owner) {
                eprintln!("hami-fake-gpu: {e}");
                return reply.error(Errno::EINVAL);
            }
        }
        reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let gone = self.opens().remove(&fh.0);
        if gone.is_some() {
            self.open_count.fetch_sub(1, Ordering::SeqCst);
        }
        // The control device's clients, or the managed ranges registered through hami-control.
        if let Some(Open::Device(FileKind::Control) | Open::Control) = gone {
            lock(&self.model).release_fd(fh.0);
        }
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != INO_ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        for (i, (ino, kind, name)) in self
            .entries()
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(0))
        {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let file = match self.opens().get(&fh.0) {
            Some(Open::Device(kind)) => *kind,
            _ => return reply.error(Errno::ENOTTY),
        };
        let tid = req.pid();
        let mem = ProcessMemory {
            pid: i32::try_from(tid).unwrap_or(0),
        };
        let caller = Caller {
            owner: Owner {
                tgid: tgid_of(tid),
                fd: fh.0,
            },
            file,
            mem: &mem,
        };
        let result = rm::handle_ioctl(&mut lock(&self.model), &caller, cmd, in_data);
        match result {
            Ok(out) => {
                let n = out.len().min(out_size as usize);
                reply.ioctl(0, &out[..n]);
            }
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }
}

/// Reads and parses the ground-truth file of a mounted node (from any process).
///
/// # Errors
/// [`Error::Os`] when the file cannot be read, [`Error::GroundTruth`] when it is not valid JSON.
pub fn read_ground_truth(mount: &std::path::Path) -> Result<GroundTruth, Error> {
    let bytes = std::fs::read(mount.join(GROUND_TRUTH_FILE))?;
    Ok(serde_json::from_slice(&bytes)?)
}
