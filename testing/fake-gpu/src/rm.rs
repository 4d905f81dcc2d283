//! The fake driver's ioctl entry: what `nvidia_ioctl()` + `RmIoctl()` do with one frontend ioctl on
//! `/dev/nvidiactl` or `/dev/nvidiaN`, against the [`DeviceModel`]. Pure apart from the caller's memory,
//! which comes in through [`UserMemory`] (the FUSE server reads it with `process_vm_readv`, tests with a
//! map).
//!
//! Driver behaviour reproduced (`reference/nvidia-driver-abi.md` §2–§6):
//! - only `_IOC_NR` and `_IOC_SIZE` of the command count; the type and direction bits are ignored;
//! - a size that is not the escape's struct size, an unknown escape, an escape on the wrong kind of
//!   file, or an argument over 16 KiB fails the syscall with `EINVAL` (the driver maps any non-OK
//!   `rmStatus` from its checks to `-EINVAL`);
//! - per-call RM failures come back with syscall result 0 and the `NV_STATUS` in the struct's `status`;
//! - `NV_ESC_IOCTL_XFER_CMD` is unwrapped (the wrapped argument is read from and written back to the
//!   caller's memory); a nested XFER is refused.

use crate::abi::{self, RmAllocVariant, RmFree, Xfer, class, status};
use crate::model::{AllocPath, DeviceModel, ObjectParams, Owner};

/// The kind of device file an ioctl arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `/dev/nvidiactl`.
    Control,
    /// `/dev/nvidiaN`.
    Gpu(u32),
}

/// Access to the calling process's memory (for `pAllocParms` and XFER pointers).
pub trait UserMemory {
    /// Reads `len` bytes at `addr`; `None` when unreadable.
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// Writes `data` at `addr`; false when unwritable.
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

/// A caller with no readable memory (every pointer faults).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMemory;

impl UserMemory for NoMemory {
    fn read(&self, _addr: u64, _len: usize) -> Option<Vec<u8>> {
        None
    }
    fn write(&self, _addr: u64, _data: &[u8]) -> bool {
        false
    }
}

/// Who is calling and through which file.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// The calling process and open file.
    pub owner: Owner,
    /// Which device file.
    pub file: FileKind,
    /// The caller's memory.
    pub mem: &'a dyn UserMemory,
}

/// A syscall-level failure: the `errno` the ioctl returns.
pub type Errno = i32;

/// Handles one ioctl: `cmd` with argument bytes `arg` (exactly `_IOC_SIZE(cmd)` bytes copied in).
/// Returns the bytes copied back out on success (syscall result 0).
///
/// # Errors
/// The `errno` the real driver would fail the syscall with.
pub fn handle_ioctl(
    model: &mut DeviceModel,
    caller: &Caller<'_>,
    cmd: u32,
    arg: &[u8],
) -> Result<Vec<u8>, Errno> {
    let nr = abi::ioc_nr(cmd);
    let size = abi::ioc_size(cmd);
    if arg.len() != size {
        // The argument could not be copied in whole (FUSE gave us fewer bytes than _IOC_SIZE).
        return Err(libc::EFAULT);
    }
    if nr == abi::NV_ESC_IOCTL_XFER_CMD {
        let x = Xfer::decode(arg).map_err(|_| libc::EINVAL)?;
        let inner_size = x.size as usize;
        // The bare escape number: anything wider is no escape the driver knows.
        let inner_nr = u8::try_from(x.cmd).map_err(|_| libc::EINVAL)?;
        if inner_size > abi::NV_ABSOLUTE_MAX_IOCTL_SIZE || inner_nr == abi::NV_ESC_IOCTL_XFER_CMD {
            return Err(libc::EINVAL);
        }
        let mut inner = caller.mem.read(x.ptr, inner_size).ok_or(libc::EFAULT)?;
        escape(model, caller, inner_nr, &mut inner)?;
        if !caller.mem.write(x.ptr, &inner) {
            return Err(libc::EFAULT);
        }
        return Ok(arg.to_vec());
    }
    let mut buf = arg.to_vec();
    escape(model, caller, nr, &mut buf)?;
    Ok(buf)
}

/// Whether escape `nr` needs the control fd (`NV_CTL_DEVICE_ONLY`), a per-GPU fd
/// (`NV_ACTUAL_DEVICE_ONLY`), and the struct size it takes.
fn escape_rules(nr: u8, size: usize) -> Option<(bool, bool)> {
    let fixed = |want: usize| (size == want).then_some(());
    match nr {
        abi::NV_ESC_RM_ALLOC => RmAllocVariant::from_size(size).map(|_| (true, false)),
        abi::NV_ESC_RM_FREE => fixed(abi::NVOS00_SIZE).map(|()| (true, false)),
        abi::NV_ESC_RM_CONTROL => fixed(abi::NVOS54_SIZE).map(|()| (true, false)),
        abi::NV_ESC_RM_DUP_OBJECT => fixed(abi::NVOS55_SIZE).map(|()| (true, false)),
        abi::NV_ESC_RM_VID_HEAP_CONTROL => fixed(abi::NVOS32_SIZE).map(|()| (true, false)),
        abi::NV_ESC_CHECK_VERSION_STR => fixed(abi::CHECK_VERSION_SIZE).map(|()| (false, false)),
        abi::NV_ESC_REGISTER_FD => fixed(abi::REGISTER_FD_SIZE).map(|()| (false, true)),
        _ => None,
    }
}

/// A client that exists but was allocated through another open file: RM refuses it to this caller
/// (`rmclientValidate` compares the client's OS info with the caller's file) with
/// `NV_ERR_INVALID_CLIENT`, so one process cannot use or free another's objects.
fn foreign(model: &DeviceModel, caller: &Caller<'_>, client: u32) -> bool {
    model.client_fd(client).is_some_and(|fd| fd != caller.owner.fd)
}

fn escape(model: &mut DeviceModel, caller: &Caller<'_>, nr: u8, buf: &mut [u8]) -> Result<(), Errno> {
    let (ctl_only, gpu_only) = escape_rules(nr, buf.len()).ok_or(libc::EINVAL)?;
    match caller.file {
        FileKind::Gpu(_) if ctl_only => return Err(libc::EINVAL),
        FileKind::Control if gpu_only => return Err(libc::EINVAL),
        _ => {}
    }
    match nr {
        abi::NV_ESC_RM_ALLOC => rm_alloc(model, caller, buf),
        abi::NV_ESC_RM_FREE => {
            let f = RmFree::decode(buf).map_err(|_| libc::EINVAL)?;
            let st = if foreign(model, caller, f.h_root) {
                status::NV_ERR_INVALID_CLIENT
            } else {
                match model.free(f.h_root, f.h_old) {
                    Ok(()) => status::NV_OK,
                    Err(s) => s,
                }
            };
            abi::put_u32(buf, RmFree::STATUS_OFFSET, st);
        }
        abi::NV_ESC_RM_VID_HEAP_CONTROL => {
            if foreign(model, caller, abi::get_u32(buf, abi::nvos32::H_ROOT).unwrap_or(0)) {
                abi::put_u32(buf, abi::nvos32::STATUS, status::NV_ERR_INVALID_CLIENT);
            } else {
                vid_heap(model, caller, buf);
            }
        }
        abi::NV_ESC_RM_CONTROL => {
            // Controls are not modelled: known client → NOT_SUPPORTED, unknown → INVALID_CLIENT.
            let client = abi::get_u32(buf, 0).unwrap_or(0);
            let st = if model.has_client(client) && !foreign(model, caller, client) {
                status::NV_ERR_NOT_SUPPORTED
            } else {
                status::NV_ERR_INVALID_CLIENT
            };
            abi::put_u32(buf, 28, st);
        }
        abi::NV_ESC_RM_DUP_OBJECT => abi::put_u32(buf, 24, status::NV_ERR_NOT_SUPPORTED),
        abi::NV_ESC_CHECK_VERSION_STR => {
            // nv_ioctl_rm_api_version_t { cmd, reply, versionString[64] }:
            // NV_RM_API_VERSION_REPLY_RECOGNIZED = 1.
            abi::put_u32(buf, 4, 1);
        }
        // NV_ESC_REGISTER_FD on a per-GPU fd: accepted.
        _ => {}
    }
    Ok(())
}

fn rm_alloc(model: &mut DeviceModel, caller: &Caller<'_>, buf: &mut [u8]) {
    let Some(variant) = RmAllocVariant::from_size(buf.len()) else {
        return;
    };
    let Ok(a) = variant.decode(buf) else { return };
    let result = if a.flags & abi::NVOS64_FLAGS_FINN_SERIALIZED != 0 {
        Err(status::NV_ERR_NOT_SUPPORTED)
    } else {
        match a.h_class {
            class::NV01_ROOT | class::NV01_ROOT_NON_PRIV | class::NV01_ROOT_CLIENT => {
                model.alloc_client(caller.owner, a.h_new)
            }
            _ if foreign(model, caller, a.h_root) => Err(status::NV_ERR_INVALID_CLIENT),
            _ => alloc_params(caller, &a).and_then(|(p, write_back)| {
                let h = model.alloc_object(a.h_root, a.h_parent, a.h_new, a.h_class, p)?;
                if let (Some(bytes), ObjectParams::Memory { .. }) = (write_back, p) {
                    // RM writes the size it really allocated (and the limit) back into the params.
                    let _ = caller.mem.write(
                        a.p_alloc_parms + abi::mem_params::SIZE as u64,
                        &bytes.to_le_bytes(),
                    );
                    let limit = bytes.saturating_sub(1);
                    let _ = caller.mem.write(
                        a.p_alloc_parms + abi::mem_params::LIMIT as u64,
                        &limit.to_le_bytes(),
                    );
                }
                Ok(h)
            }),
        }
    };
    match result {
        Ok(h) => {
            abi::put_u32(buf, 8, h);
            abi::put_u32(buf, variant.status_offset(), status::NV_OK);
        }
        Err(s) => abi::put_u32(buf, variant.status_offset(), s),
    }
}

/// Reads the class's allocation parameters from the caller. Returns the object params and, for memory,
/// the size to write back.
///
/// The size copied in is the class's own parameter size, whatever the caller's `paramsSize` says (RM
/// sizes the copy from its class table).
fn alloc_params(caller: &Caller<'_>, a: &abi::RmAlloc) -> Result<(ObjectParams, Option<u64>), u32> {
    let read = |want: usize| -> Result<Vec<u8>, u32> {
        if a.p_alloc_parms == 0 {
            return Err(status::NV_ERR_INVALID_ARGUMENT);
        }
        caller
            .mem
            .read(a.p_alloc_parms, want)
            .ok_or(status::NV_ERR_INVALID_POINTER)
    };
    match a.h_class {
        // deviceConstruct_IMPL (src/nvidia/src/kernel/gpu/device.c): without parameters the device
        // instance is `externalClassId - NV01_DEVICE_0`, i.e. 0.
        class::NV01_DEVICE_0 if a.p_alloc_parms == 0 => Ok((ObjectParams::Device { device_id: 0 }, None)),
        class::NV01_DEVICE_0 => {
            let p = read(abi::NV0080_ALLOC_PARAMETERS_SIZE)?;
            Ok((
                ObjectParams::Device {
                    device_id: abi::get_u32(&p, 0).unwrap_or(u32::MAX),
                },
                None,
            ))
        }
        class::NV20_SUBDEVICE_0 => {
            let sub_device_id = if a.p_alloc_parms == 0 {
                0
            } else {
                abi::get_u32(&read(4)?, 0).unwrap_or(0)
            };
            Ok((ObjectParams::Subdevice { sub_device_id }, None))
        }
        class::NV01_MEMORY_LOCAL_USER | class::NV01_MEMORY_SYSTEM | class::NV50_MEMORY_VIRTUAL => {
            let p = read(abi::NV_MEMORY_ALLOCATION_PARAMS_SIZE)?;
            let bytes = abi::get_u64(&p, abi::mem_params::SIZE).unwrap_or(0);
            let flags = abi::get_u32(&p, abi::mem_params::FLAGS).unwrap_or(0);
            let attr = abi::get_u32(&p, abi::mem_params::ATTR).unwrap_or(0);
            if a.h_class == class::NV01_MEMORY_LOCAL_USER
                && (abi::attr_location(attr) != 0 || flags & abi::NVOS32_ALLOC_FLAGS_VIRTUAL != 0)
            {
                // vidmemConstruct_IMPL refuses non-VIDMEM locations and virtual allocs.
                return Err(status::NV_ERR_INVALID_ARGUMENT);
            }
            let vidmem = a.h_class == class::NV01_MEMORY_LOCAL_USER;
            Ok((
                ObjectParams::Memory {
                    bytes,
                    vidmem,
                    path: AllocPath::RmAlloc,
                },
                Some(bytes),
            ))
        }
        class::FERMI_VASPACE_A
        | class::KEPLER_CHANNEL_GROUP_A
        | class::FERMI_CONTEXT_SHARE_A
        | class::HOPPER_CHANNEL_GPFIFO_A
        | class::HOPPER_COMPUTE_A => Ok((ObjectParams::Other, None)),
        _ => Err(status::NV_ERR_INVALID_CLASS),
    }
}

fn vid_heap(model: &mut DeviceModel, _caller: &Caller<'_>, buf: &mut [u8]) {
    use abi::nvos32 as o;
    let u = |b: &[u8], off| abi::get_u32(b, off).unwrap_or(0);
    let client = u(buf, o::H_ROOT);
    let parent = u(buf, o::H_PARENT);
    let function = u(buf, o::FUNCTION);
    let gpu = model.gpu_of(client, parent);
    let result = match function {
        abi::NVOS32_FUNCTION_ALLOC_SIZE
        | abi::NVOS32_FUNCTION_ALLOC_SIZE_RANGE
        | abi::NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT => {
            let flags = u(buf, o::FLAGS);
            // Each member of the `data` union keeps `attr` and `size` at its own offsets.
            let (attr, bytes, size_at, limit_at) = match function {
                abi::NVOS32_FUNCTION_ALLOC_SIZE => (
                    u(buf, o::ATTR),
                    abi::get_u64(buf, o::SIZE).unwrap_or(0),
                    o::SIZE,
                    o::LIMIT,
                ),
                abi::NVOS32_FUNCTION_ALLOC_SIZE_RANGE => (
                    u(buf, o::range::ATTR),
                    abi::get_u64(buf, o::range::SIZE).unwrap_or(0),
                    o::range::SIZE,
                    o::range::LIMIT,
                ),
                _ => {
                    // _nvos32FunctionAllocTiledPitchHeight: size = height * pitch, written back.
                    let pitch = abi::get_u32(buf, o::tiled::PITCH).map_or(0, |p| p as i32);
                    let height = u64::from(u(buf, o::tiled::HEIGHT));
                    (
                        u(buf, o::tiled::ATTR),
                        height * u64::try_from(pitch).unwrap_or(0),
                        o::tiled::SIZE,
                        o::tiled::LIMIT,
                    )
                }
            };
            let requested = if flags & 0x4000 != 0 {
                u(buf, o::H_MEMORY)
            } else {
                0
            };
            // _rmVidHeapControlAllocCommon: VIRTUAL → NV50_MEMORY_VIRTUAL, VIDMEM → class 0x40, else sysmem.
            let (h_class, vidmem) = if flags & abi::NVOS32_ALLOC_FLAGS_VIRTUAL != 0 {
                (class::NV50_MEMORY_VIRTUAL, false)
            } else if abi::attr_location(attr) == 0 {
                (class::NV01_MEMORY_LOCAL_USER, true)
            } else {
                (class::NV01_MEMORY_SYSTEM, false)
            };
            let p = ObjectParams::Memory {
                bytes,
                vidmem,
                path: AllocPath::VidHeap,
            };
            if bytes == 0 {
                Err(status::NV_ERR_INVALID_ARGUMENT)
            } else {
                model
                    .alloc_object(client, parent, requested, h_class, p)
                    .map(|h| {
                        abi::put_u32(buf, o::H_MEMORY, h);
                        abi::put_u64(buf, size_at, bytes);
                        abi::put_u64(buf, limit_at, bytes.saturating_sub(1));
                    })
            }
        }
        abi::NVOS32_FUNCTION_FREE
            if u(buf, o::FREE_FLAGS) & abi::NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED == 0 =>
        {
            // _nvos32FunctionFree refuses a free that does not say it names the handle.
            Err(status::NV_ERR_INVALID_ARGUMENT)
        }
        abi::NVOS32_FUNCTION_FREE => {
            let h = u(buf, o::H_MEMORY);
            match model.class_of(client, h) {
                Some(
                    class::NV01_MEMORY_LOCAL_USER | class::NV01_MEMORY_SYSTEM | class::NV50_MEMORY_VIRTUAL,
                ) => model.free(client, h),
                Some(_) => Err(status::NV_ERR_INVALID_OBJECT_HANDLE),
                None if model.has_client(client) => Err(status::NV_ERR_OBJECT_NOT_FOUND),
                None => Err(status::NV_ERR_INVALID_CLIENT),
            }
        }
        abi::NVOS32_FUNCTION_INFO => {
            if gpu.is_some() {
                Ok(())
            } else {
                Err(status::NV_ERR_INVALID_OBJECT_PARENT)
            }
        }
        _ => Err(status::NV_ERR_INVALID_FUNCTION),
    };
    if let Some((total, free)) = gpu.and_then(|g| model.memory_info(g)) {
        abi::put_u64(buf, o::TOTAL, total);
        abi::put_u64(buf, o::FREE, free);
    }
    abi::put_u32(buf, o::STATUS, result.err().unwrap_or(status::NV_OK));
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;
    use crate::abi::{RmAlloc, nv_iowr};
    use crate::model::MIB;

    /// A fake address space: regions by base address.
    #[derive(Default)]
    struct Mem(RefCell<BTreeMap<u64, Vec<u8>>>);

    impl Mem {
        fn put(&self, addr: u64, data: Vec<u8>) {
            self.0.borrow_mut().insert(addr, data);
        }
        fn get(&self, addr: u64) -> Vec<u8> {
            self.0.borrow()[&addr].clone()
        }
    }

    impl UserMemory for Mem {
        fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
            let m = self.0.borrow();
            let (base, r) = m.range(..=addr).next_back()?;
            let off = (addr - base) as usize;
            r.get(off..off + len).map(<[u8]>::to_vec)
        }
        fn write(&self, addr: u64, data: &[u8]) -> bool {
            let mut m = self.0.borrow_mut();
            let Some((base, r)) = m.range_mut(..=addr).next_back() else {
                return false;
            };
            let off = (addr - *base) as usize;
            match r.get_mut(off..off + data.len()) {
                Some(s) => {
                    s.copy_from_slice(data);
                    true
                }
                None => false,
            }
        }
    }

    const OWNER: Owner = Owner { tgid: 42, fd: 9 };

    fn ctl(mem: &Mem) -> Caller<'_> {
        Caller {
            owner: OWNER,
            file: FileKind::Control,
            mem,
        }
    }

    fn alloc(m: &mut DeviceModel, c: &Caller<'_>, v: RmAllocVariant, a: &RmAlloc) -> (u32, u32) {
        let out = handle_ioctl(m, c, nv_iowr(abi::NV_ESC_RM_ALLOC, v.size()), &v.encode(a)).unwrap();
        (
            abi::get_u32(&out, 8).unwrap(),
            abi::get_u32(&out, v.status_offset()).unwrap(),
        )
    }

    fn rm(h_root: u32, h_parent: u32, h_class: u32, p: u64, params_size: u32) -> RmAlloc {
        RmAlloc {
            h_root,
            h_parent,
            h_new: 0,
            h_class,
            p_alloc_parms: p,
            params_size,
            flags: 0,
        }
    }

    /// Client + device on GPU `gpu`, through the ioctl path.
    fn open(m: &mut DeviceModel, mem: &Mem, gpu: u32) -> (u32, u32) {
        let c = ctl(mem);
        let (client, st) = alloc(
            m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(0, 0, class::NV01_ROOT_CLIENT, 0, 0),
        );
        assert_eq!(st, status::NV_OK);
        let mut p = vec![0u8; 56];
        abi::put_u32(&mut p, 0, gpu);
        mem.put(0x1000, p);
        let (dev, st) = alloc(
            m,
            &c,
            RmAllocVariant::Nvos64,
            &rm(client, client, class::NV01_DEVICE_0, 0x1000, 56),
        );
        assert_eq!(st, status::NV_OK);
        (client, dev)
    }

    #[test]
    fn rm_alloc_and_free_of_vidmem_round_trip() {
        let mut m = DeviceModel::uniform(2, 1024);
        let mem = Mem::default();
        let (client, dev) = open(&mut m, &mem, 1);
        mem.put(0x2000, abi::vidmem_alloc_params(client, 8 * MIB));
        let c = ctl(&mem);
        let (h, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x2000, 128),
        );
        assert_eq!(st, status::NV_OK);
        assert_eq!(
            abi::get_u64(&mem.get(0x2000), 88),
            Some(8 * MIB - 1),
            "limit written back"
        );
        assert_eq!(m.snapshot().bytes(42, 1), 8 * MIB);
        let free = RmFree {
            h_root: client,
            h_parent: dev,
            h_old: h,
        }
        .encode();
        let out = handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_RM_FREE, 16), &free).unwrap();
        assert_eq!(abi::get_u32(&out, 12), Some(status::NV_OK));
        assert_eq!(m.snapshot().bytes(42, 1), 0);
        let out = handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_RM_FREE, 16), &free).unwrap();
        assert_eq!(abi::get_u32(&out, 12), Some(status::NV_ERR_OBJECT_NOT_FOUND));
    }

    #[test]
    fn rm_alloc_failures_are_in_status_not_errno() {
        let mut m = DeviceModel::uniform(1, 16);
        let mem = Mem::default();
        let (client, dev) = open(&mut m, &mem, 0);
        let c = ctl(&mem);
        mem.put(0x3000, abi::vidmem_alloc_params(client, 32 * MIB));
        let (_, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x3000, 128),
        );
        assert_eq!(st, status::NV_ERR_NO_MEMORY);
        let (_, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x9999_0000, 128),
        );
        assert_eq!(st, status::NV_ERR_INVALID_POINTER);
        let (_, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x3000, 64),
        );
        assert_eq!(
            st,
            status::NV_ERR_NO_MEMORY,
            "RM sizes the copy by the class, not the caller's paramsSize: the same outcome as above"
        );
        let (_, st) = alloc(&mut m, &c, RmAllocVariant::Nvos21, &rm(client, dev, 0x1234, 0, 0));
        assert_eq!(st, status::NV_ERR_INVALID_CLASS);
        let mut a = rm(client, dev, 0x40, 0x3000, 128);
        a.flags = abi::NVOS64_FLAGS_FINN_SERIALIZED;
        let (_, st) = alloc(&mut m, &c, RmAllocVariant::Nvos64, &a);
        assert_eq!(st, status::NV_ERR_NOT_SUPPORTED);
        let mut p = abi::vidmem_alloc_params(client, MIB);
        abi::put_u32(&mut p, abi::mem_params::ATTR, 1 << 25);
        mem.put(0x4000, p);
        let (_, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x4000, 128),
        );
        assert_eq!(st, status::NV_ERR_INVALID_ARGUMENT, "class 0x40 outside vidmem");
        assert!(m.snapshot().allocations.is_empty());
    }

    #[test]
    fn vid_heap_alloc_info_and_free() {
        let mut m = DeviceModel::uniform(1, 1024);
        let mem = Mem::default();
        let (client, dev) = open(&mut m, &mem, 0);
        let c = ctl(&mem);
        let cmd = nv_iowr(abi::NV_ESC_RM_VID_HEAP_CONTROL, abi::NVOS32_SIZE);
        let out = handle_ioctl(&mut m, &c, cmd, &abi::nvos32_alloc_size(client, dev, 0, 2 * MIB)).unwrap();
        assert_eq!(abi::get_u32(&out, 20), Some(status::NV_OK));
        let h = abi::get_u32(&out, 44).unwrap();
        assert_ne!(h, 0);
        assert_eq!(abi::get_u64(&out, 24), Some(1024 * MIB));
        assert_eq!(abi::get_u64(&out, 32), Some(1022 * MIB));
        let t = m.snapshot();
        assert_eq!(t.allocations[0].path, AllocPath::VidHeap);
        let out = handle_ioctl(&mut m, &c, cmd, &abi::nvos32_free(client, dev, h)).unwrap();
        assert_eq!(abi::get_u32(&out, 20), Some(status::NV_OK));
        assert_eq!(m.snapshot().gpus[0].used_bytes, 0);
        let mut bad = abi::nvos32_free(client, dev, h);
        abi::put_u32(&mut bad, 8, 99);
        let out = handle_ioctl(&mut m, &c, cmd, &bad).unwrap();
        assert_eq!(abi::get_u32(&out, 20), Some(status::NV_ERR_INVALID_FUNCTION));
    }

    #[test]
    fn bad_sizes_unknown_escapes_and_wrong_files_are_einval() {
        let mut m = DeviceModel::uniform(1, 1024);
        let mem = Mem::default();
        let c = ctl(&mem);
        // 40-byte (pre-535) NVOS64.
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_RM_ALLOC, 40), &[0; 40]),
            Err(libc::EINVAL)
        );
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_RM_FREE, 12), &[0; 12]),
            Err(libc::EINVAL)
        );
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(0x77, 8), &[0; 8]),
            Err(libc::EINVAL)
        );
        // Short copy-in.
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_RM_FREE, 16), &[0; 4]),
            Err(libc::EFAULT)
        );
        let gpu = Caller {
            file: FileKind::Gpu(0),
            ..c
        };
        let free = RmFree {
            h_root: 1,
            h_parent: 1,
            h_old: 1,
        }
        .encode();
        assert_eq!(
            handle_ioctl(&mut m, &gpu, nv_iowr(abi::NV_ESC_RM_FREE, 16), &free),
            Err(libc::EINVAL)
        );
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_REGISTER_FD, 4), &[0; 4]),
            Err(libc::EINVAL)
        );
        assert!(handle_ioctl(&mut m, &gpu, nv_iowr(abi::NV_ESC_REGISTER_FD, 4), &[3, 0, 0, 0]).is_ok());
        // Type byte and direction bits are ignored: _IOC(0, 'X', 0x29, 16) still frees.
        let out = handle_ioctl(&mut m, &c, (16 << 16) | (u32::from(b'X') << 8) | 0x29, &free).unwrap();
        assert_eq!(abi::get_u32(&out, 12), Some(status::NV_ERR_INVALID_CLIENT));
    }

    #[test]
    fn another_files_client_is_refused() {
        let mut m = DeviceModel::uniform(1, 1024);
        let mem = Mem::default();
        let (client, dev) = open(&mut m, &mem, 0);
        mem.put(0x2000, abi::vidmem_alloc_params(client, MIB));
        let c = ctl(&mem);
        let (h, st) = alloc(
            &mut m,
            &c,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x2000, 128),
        );
        assert_eq!(st, status::NV_OK);
        // Another process (another open nvidiactl) names the same client.
        let other = Caller {
            owner: Owner { tgid: 43, fd: 10 },
            ..c
        };
        let (_, st) = alloc(
            &mut m,
            &other,
            RmAllocVariant::Nvos21,
            &rm(client, dev, 0x40, 0x2000, 128),
        );
        assert_eq!(st, status::NV_ERR_INVALID_CLIENT);
        let free = RmFree {
            h_root: client,
            h_parent: dev,
            h_old: h,
        }
        .encode();
        let out = handle_ioctl(&mut m, &other, nv_iowr(abi::NV_ESC_RM_FREE, 16), &free).unwrap();
        assert_eq!(abi::get_u32(&out, 12), Some(status::NV_ERR_INVALID_CLIENT));
        let cmd = nv_iowr(abi::NV_ESC_RM_VID_HEAP_CONTROL, abi::NVOS32_SIZE);
        let out = handle_ioctl(&mut m, &other, cmd, &abi::nvos32_free(client, dev, h)).unwrap();
        assert_eq!(abi::get_u32(&out, 20), Some(status::NV_ERR_INVALID_CLIENT));
        assert_eq!(
            m.snapshot().bytes(42, 0),
            MIB,
            "nothing of the owner's was touched"
        );
    }

    #[test]
    fn xfer_unwraps_and_writes_back() {
        let mut m = DeviceModel::uniform(1, 1024);
        let mem = Mem::default();
        let (client, dev) = open(&mut m, &mem, 0);
        let c = ctl(&mem);
        mem.put(0x5000, abi::vidmem_alloc_params(client, 4 * MIB));
        mem.put(
            0x6000,
            RmAllocVariant::Nvos64.encode(&rm(client, dev, 0x40, 0x5000, 128)),
        );
        // A full ioctl command in the wrapper is no escape the driver knows (it takes the bare number).
        let full = Xfer {
            cmd: nv_iowr(abi::NV_ESC_RM_ALLOC, 48),
            size: 48,
            ptr: 0x6000,
        }
        .encode();
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_IOCTL_XFER_CMD, 16), &full),
            Err(libc::EINVAL)
        );
        assert_eq!(m.snapshot().bytes(42, 0), 0);
        let x = Xfer {
            cmd: u32::from(abi::NV_ESC_RM_ALLOC),
            size: 48,
            ptr: 0x6000,
        }
        .encode();
        let out = handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_IOCTL_XFER_CMD, 16), &x).unwrap();
        assert_eq!(out, x);
        let inner = mem.get(0x6000);
        assert_eq!(abi::get_u32(&inner, 40), Some(status::NV_OK));
        assert_ne!(abi::get_u32(&inner, 8), Some(0));
        assert_eq!(m.snapshot().bytes(42, 0), 4 * MIB);
        let bad = Xfer {
            cmd: u32::from(abi::NV_ESC_RM_ALLOC),
            size: 48,
            ptr: 0xdead_0000,
        }
        .encode();
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_IOCTL_XFER_CMD, 16), &bad),
            Err(libc::EFAULT)
        );
        let big = Xfer {
            cmd: 0,
            size: 20000,
            ptr: 0x6000,
        }
        .encode();
        assert_eq!(
            handle_ioctl(&mut m, &c, nv_iowr(abi::NV_ESC_IOCTL_XFER_CMD, 16), &big),
            Err(libc::EINVAL)
        );
    }
}
