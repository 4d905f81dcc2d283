//! A raw RM client: opens the (fake) device files and issues the real `_IOWR('F', nr, struct)` ioctls,
//! the way libcuda does at the kernel boundary. Used by the tests, the `hami-fake-node alloc` tenant, the
//! fake `libcuda.so.1` and `hami-cuda-workload`. It works the same against a real `/dev/nvidiactl` of
//! driver 595.
//!
//! With [`RmClient::set_xfer`] every RM call is wrapped in `NV_ESC_IOCTL_XFER_CMD` (`nv_ioctl_xfer_t
//! {u32 cmd; u32 size; u64 ptr}`, 16 bytes, `kernel-open/common/inc/nv-ioctl.h`): the ioctl then carries
//! only the wrapper, and the driver copies the real struct in from `ptr` and back out to it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::Error;
use crate::abi::{self, RmAlloc, RmAllocVariant, RmFree, Xfer, class, status};

/// Issues `ioctl(fd, cmd, arg)`. `arg` must hold at least `_IOC_SIZE(cmd)` bytes.
///
/// # Errors
/// `InvalidInput` when `arg` is shorter than the command's size; the syscall's error otherwise.
pub fn ioctl(file: &File, cmd: u32, arg: &mut [u8]) -> std::io::Result<()> {
    if arg.len() < abi::ioc_size(cmd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "argument shorter than _IOC_SIZE(cmd)",
        ));
    }
    #[allow(
        unsafe_code,
        reason = "ioctl(2) FFI: the kernel reads and writes at most _IOC_SIZE(cmd) bytes of `arg`, checked above"
    )]
    // SAFETY: `arg` is a live, exclusively borrowed buffer of at least _IOC_SIZE(cmd) bytes, and the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), cmd as _, arg.as_mut_ptr()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How device memory is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocVia {
    /// `NV_ESC_RM_ALLOC` with a 32-byte NVOS21.
    Nvos21,
    /// `NV_ESC_RM_ALLOC` with a 48-byte NVOS64.
    Nvos64,
    /// `NV_ESC_RM_VID_HEAP_CONTROL` / `NVOS32_FUNCTION_ALLOC_SIZE`.
    VidHeap,
    /// `NV_ESC_RM_VID_HEAP_CONTROL` / `NVOS32_FUNCTION_ALLOC_SIZE_RANGE`.
    VidHeapRange,
    /// `NV_ESC_RM_VID_HEAP_CONTROL` / `NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT`: a 4096-byte pitch,
    /// as many lines as the size needs (the size is rounded up to whole lines).
    VidHeapTiled,
}

impl std::str::FromStr for AllocVia {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "nvos21" | "rm-alloc" => Ok(Self::Nvos21),
            "nvos64" => Ok(Self::Nvos64),
            "vid-heap" => Ok(Self::VidHeap),
            "vid-heap-range" => Ok(Self::VidHeapRange),
            "vid-heap-tiled" => Ok(Self::VidHeapTiled),
            _ => Err(Error::UnknownAllocVia(s.to_owned())),
        }
    }
}

/// One RM client on an open control device.
#[derive(Debug)]
pub struct RmClient {
    ctl: File,
    /// The client handle (`hRoot` of every call).
    pub client: u32,
    xfer: bool,
}

impl RmClient {
    /// Opens `<dir>/nvidiactl`, checks the version string and allocates an `NV01_ROOT_CLIENT`.
    ///
    /// # Errors
    /// The file cannot be opened or the driver refuses.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("nvidiactl"))?;
        let mut v = vec![0u8; abi::CHECK_VERSION_SIZE];
        ioctl(&ctl, abi::nv_iowr(abi::NV_ESC_CHECK_VERSION_STR, v.len()), &mut v)?;
        let mut me = Self {
            ctl,
            client: 0,
            xfer: false,
        };
        me.client = me.alloc(RmAllocVariant::Nvos21, 0, 0, class::NV01_ROOT_CLIENT, &mut [])?;
        Ok(me)
    }

    /// The open control file.
    #[must_use]
    pub fn file(&self) -> &File {
        &self.ctl
    }

    /// Wraps every later RM call (`RM_ALLOC`, `RM_FREE`, `RM_VID_HEAP_CONTROL`) in
    /// `NV_ESC_IOCTL_XFER_CMD` (`on`) or issues it directly (`!on`, the default).
    pub fn set_xfer(&mut self, on: bool) {
        self.xfer = on;
    }

    /// Whether RM calls are wrapped in `NV_ESC_IOCTL_XFER_CMD`.
    #[must_use]
    pub fn xfer(&self) -> bool {
        self.xfer
    }

    /// Issues escape `nr` with the struct `arg` (its length is the struct size), directly or wrapped
    /// in `NV_ESC_IOCTL_XFER_CMD`; the driver's answer is written back into `arg` either way.
    ///
    /// # Errors
    /// The syscall's error.
    pub fn call(&self, nr: u8, arg: &mut [u8]) -> Result<(), Error> {
        let cmd = abi::nv_iowr(nr, arg.len());
        if !self.xfer {
            return Ok(ioctl(&self.ctl, cmd, arg)?);
        }
        let mut x = Xfer {
            cmd: u32::from(nr),
            size: u32::try_from(arg.len()).unwrap_or(u32::MAX),
            ptr: arg.as_mut_ptr() as u64,
        }
        .encode();
        // The driver reads and writes `arg` through `ptr` while this call runs; `arg` is exclusively
        // borrowed for its duration.
        Ok(ioctl(
            &self.ctl,
            abi::nv_iowr(abi::NV_ESC_IOCTL_XFER_CMD, x.len()),
            &mut x,
        )?)
    }

    /// `NV_ESC_RM_ALLOC` of `h_class` under `parent` with `params` (passed by pointer, as pAllocParms).
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn alloc(
        &self,
        variant: RmAllocVariant,
        h_root: u32,
        parent: u32,
        h_class: u32,
        params: &mut [u8],
    ) -> Result<u32, Error> {
        let a = RmAlloc {
            h_root,
            h_parent: parent,
            h_new: 0,
            h_class,
            p_alloc_parms: if params.is_empty() {
                0
            } else {
                params.as_mut_ptr() as u64
            },
            params_size: u32::try_from(params.len()).unwrap_or(u32::MAX),
            flags: 0,
        };
        let mut b = variant.encode(&a);
        self.call(abi::NV_ESC_RM_ALLOC, &mut b)?;
        match abi::get_u32(&b, variant.status_offset()) {
            Some(status::NV_OK) => Ok(abi::get_u32(&b, 8).unwrap_or(0)),
            s => Err(Error::Status(s.unwrap_or(u32::MAX))),
        }
    }

    /// `NV01_DEVICE_0` for GPU `device_id`.
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn alloc_device(&self, device_id: u32) -> Result<u32, Error> {
        let mut p = vec![0u8; abi::NV0080_ALLOC_PARAMETERS_SIZE];
        abi::put_u32(&mut p, 0, device_id);
        self.alloc(
            RmAllocVariant::Nvos64,
            self.client,
            self.client,
            class::NV01_DEVICE_0,
            &mut p,
        )
    }

    /// `NV01_DEVICE_0` without allocation parameters (they are optional: RM then takes device
    /// instance 0).
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn alloc_device_without_params(&self) -> Result<u32, Error> {
        self.alloc(
            RmAllocVariant::Nvos64,
            self.client,
            self.client,
            class::NV01_DEVICE_0,
            &mut [],
        )
    }

    /// `NV20_SUBDEVICE_0` (subdevice 0) under `device`, with an `NV2080_ALLOC_PARAMETERS`.
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn alloc_subdevice(&self, device: u32) -> Result<u32, Error> {
        let mut p = vec![0u8; 4];
        self.alloc(
            RmAllocVariant::Nvos21,
            self.client,
            device,
            class::NV20_SUBDEVICE_0,
            &mut p,
        )
    }

    /// Device memory of `bytes` under `device` (a device or subdevice handle). Returns the handle.
    ///
    /// # Errors
    /// The syscall or RM status (`NV_ERR_NO_MEMORY` when the GPU is full).
    pub fn alloc_vidmem(&self, device: u32, bytes: u64, via: AllocVia) -> Result<u32, Error> {
        match via {
            AllocVia::Nvos21 | AllocVia::Nvos64 => {
                let variant = if via == AllocVia::Nvos21 {
                    RmAllocVariant::Nvos21
                } else {
                    RmAllocVariant::Nvos64
                };
                let mut p = abi::vidmem_alloc_params(self.client, bytes);
                self.alloc(
                    variant,
                    self.client,
                    device,
                    class::NV01_MEMORY_LOCAL_USER,
                    &mut p,
                )
            }
            AllocVia::VidHeap | AllocVia::VidHeapRange | AllocVia::VidHeapTiled => {
                const PITCH: u32 = 4096;
                let mut b = match via {
                    AllocVia::VidHeap => abi::nvos32_alloc_size(self.client, device, 0, bytes),
                    AllocVia::VidHeapRange => abi::nvos32_alloc_size_range(self.client, device, 0, bytes),
                    _ => abi::nvos32_alloc_tiled(
                        self.client,
                        device,
                        0,
                        PITCH as i32,
                        u32::try_from(bytes.div_ceil(u64::from(PITCH))).unwrap_or(u32::MAX),
                    ),
                };
                self.call(abi::NV_ESC_RM_VID_HEAP_CONTROL, &mut b)?;
                match abi::get_u32(&b, abi::nvos32::STATUS) {
                    Some(status::NV_OK) => Ok(abi::get_u32(&b, abi::nvos32::H_MEMORY).unwrap_or(0)),
                    s => Err(Error::Status(s.unwrap_or(u32::MAX))),
                }
            }
        }
    }

    /// `(total, free)` device memory of the GPU of `device`, through `NVOS32_FUNCTION_INFO`.
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn mem_info(&self, device: u32) -> Result<(u64, u64), Error> {
        let mut b = vec![0u8; abi::NVOS32_SIZE];
        abi::put_u32(&mut b, abi::nvos32::H_ROOT, self.client);
        abi::put_u32(&mut b, abi::nvos32::H_PARENT, device);
        abi::put_u32(&mut b, abi::nvos32::FUNCTION, abi::NVOS32_FUNCTION_INFO);
        self.call(abi::NV_ESC_RM_VID_HEAP_CONTROL, &mut b)?;
        match abi::get_u32(&b, abi::nvos32::STATUS) {
            Some(status::NV_OK) => Ok((
                abi::get_u64(&b, abi::nvos32::TOTAL).unwrap_or(0),
                abi::get_u64(&b, abi::nvos32::FREE).unwrap_or(0),
            )),
            s => Err(Error::Status(s.unwrap_or(u32::MAX))),
        }
    }

    /// `NV_ESC_RM_FREE` of `handle` (child of `parent`).
    ///
    /// # Errors
    /// The syscall or RM status.
    pub fn free(&self, parent: u32, handle: u32) -> Result<(), Error> {
        let mut b = RmFree {
            h_root: self.client,
            h_parent: parent,
            h_old: handle,
        }
        .encode();
        self.call(abi::NV_ESC_RM_FREE, &mut b)?;
        match abi::get_u32(&b, RmFree::STATUS_OFFSET) {
            Some(status::NV_OK) => Ok(()),
            s => Err(Error::Status(s.unwrap_or(u32::MAX))),
        }
    }
}
