//! The NVIDIA RM ioctl ABI of driver 595.45.04 (x86_64), as `shared/reference/nvidia-driver-abi.md` gives
//! it: escape numbers, struct sizes and field offsets, classes and `NV_STATUS` codes, plus byte-level
//! decoders and encoders. Pure: no I/O.
//!
//! Layouts are read and written field by field at fixed little-endian offsets (never by casting a
//! `#[repr(C)]` struct), so a short buffer is an error, not undefined behaviour.

use crate::Error;

/// `NV_IOCTL_MAGIC` (`'F'`). The driver ignores the type byte; only `_IOC_NR` and `_IOC_SIZE` matter.
pub const NV_IOCTL_MAGIC: u8 = b'F';
/// `NV_ABSOLUTE_MAX_IOCTL_SIZE`: the largest argument the driver copies in.
pub const NV_ABSOLUTE_MAX_IOCTL_SIZE: usize = 16384;

/// `NV_ESC_RM_ALLOC_MEMORY` (NVOS02 + fd, per-GPU fd).
pub const NV_ESC_RM_ALLOC_MEMORY: u8 = 0x27;
/// `NV_ESC_RM_FREE` (NVOS00).
pub const NV_ESC_RM_FREE: u8 = 0x29;
/// `NV_ESC_RM_CONTROL` (NVOS54).
pub const NV_ESC_RM_CONTROL: u8 = 0x2A;
/// `NV_ESC_RM_ALLOC` (NVOS21 or NVOS64, chosen by size).
pub const NV_ESC_RM_ALLOC: u8 = 0x2B;
/// `NV_ESC_RM_DUP_OBJECT` (NVOS55).
pub const NV_ESC_RM_DUP_OBJECT: u8 = 0x34;
/// `NV_ESC_RM_VID_HEAP_CONTROL` (NVOS32, the legacy heap API).
pub const NV_ESC_RM_VID_HEAP_CONTROL: u8 = 0x4A;
/// `NV_ESC_CARD_INFO`.
pub const NV_ESC_CARD_INFO: u8 = 0xC8;
/// `NV_ESC_REGISTER_FD` (per-GPU fd).
pub const NV_ESC_REGISTER_FD: u8 = 0xC9;
/// `NV_ESC_CHECK_VERSION_STR`.
pub const NV_ESC_CHECK_VERSION_STR: u8 = 0xD2;
/// `NV_ESC_IOCTL_XFER_CMD`: the wrapper escape.
pub const NV_ESC_IOCTL_XFER_CMD: u8 = 0xD3;

/// `sizeof(NVOS00_PARAMETERS)`.
pub const NVOS00_SIZE: usize = 16;
/// `sizeof(NVOS21_PARAMETERS)` (535+ layout: `paramsSize` at 24, `status` at 28).
pub const NVOS21_SIZE: usize = 32;
/// `sizeof(NVOS64_PARAMETERS)` (535+ layout).
pub const NVOS64_SIZE: usize = 48;
/// `sizeof(NVOS54_PARAMETERS)`.
pub const NVOS54_SIZE: usize = 32;
/// `sizeof(NVOS55_PARAMETERS)`.
pub const NVOS55_SIZE: usize = 28;
/// `sizeof(NVOS32_PARAMETERS)`.
pub const NVOS32_SIZE: usize = 184;
/// `sizeof(nv_ioctl_xfer_t)`.
pub const XFER_SIZE: usize = 16;
/// `sizeof(nv_ioctl_register_fd_t)`.
pub const REGISTER_FD_SIZE: usize = 4;
/// `sizeof(nv_ioctl_rm_api_version_t)`.
pub const CHECK_VERSION_SIZE: usize = 72;
/// `sizeof(NV_MEMORY_ALLOCATION_PARAMS)` since 545 (`numaNode` added; `size` stays at 64).
pub const NV_MEMORY_ALLOCATION_PARAMS_SIZE: usize = 128;
/// `sizeof(NV0080_ALLOC_PARAMETERS)`.
pub const NV0080_ALLOC_PARAMETERS_SIZE: usize = 56;

/// `NVOS64_FLAGS_FINN_SERIALIZED`: the alloc params are a serialized blob (not modelled).
pub const NVOS64_FLAGS_FINN_SERIALIZED: u32 = 1;

/// `NVOS32_FUNCTION_ALLOC_SIZE`.
pub const NVOS32_FUNCTION_ALLOC_SIZE: u32 = 2;
/// `NVOS32_FUNCTION_FREE`.
pub const NVOS32_FUNCTION_FREE: u32 = 3;
/// `NVOS32_FUNCTION_INFO`.
pub const NVOS32_FUNCTION_INFO: u32 = 5;
/// `NVOS32_FUNCTION_ALLOC_SIZE_RANGE`.
pub const NVOS32_FUNCTION_ALLOC_SIZE_RANGE: u32 = 14;
/// `NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT`.
pub const NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT: u32 = 6;
/// `NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED`: `_nvos32FunctionFree` refuses a free without it
/// (`src/nvidia/interface/deprecated/rmapi_deprecated_vidheapctrl.c`, 595.45.04).
pub const NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED: u32 = 1;
/// `NVOS32_ALLOC_FLAGS_VIRTUAL`.
pub const NVOS32_ALLOC_FLAGS_VIRTUAL: u32 = 0x0008_0000;

/// RM classes the fake driver knows.
pub mod class {
    /// `NV01_ROOT` (legacy spelling of the client class; the driver forces 0x41).
    pub const NV01_ROOT: u32 = 0x0;
    /// `NV01_ROOT_NON_PRIV`.
    pub const NV01_ROOT_NON_PRIV: u32 = 0x1;
    /// `NV01_ROOT_CLIENT`.
    pub const NV01_ROOT_CLIENT: u32 = 0x41;
    /// `NV01_MEMORY_SYSTEM` (sysmem, not counted as vidmem).
    pub const NV01_MEMORY_SYSTEM: u32 = 0x3E;
    /// `NV01_MEMORY_LOCAL_USER`: device memory.
    pub const NV01_MEMORY_LOCAL_USER: u32 = 0x40;
    /// `NV50_MEMORY_VIRTUAL`: a GPU VA reservation.
    pub const NV50_MEMORY_VIRTUAL: u32 = 0x50A0;
    /// `NV01_DEVICE_0`.
    pub const NV01_DEVICE_0: u32 = 0x80;
    /// `NV20_SUBDEVICE_0`.
    pub const NV20_SUBDEVICE_0: u32 = 0x2080;
    /// `FERMI_VASPACE_A`.
    pub const FERMI_VASPACE_A: u32 = 0x90F1;
    /// `KEPLER_CHANNEL_GROUP_A`.
    pub const KEPLER_CHANNEL_GROUP_A: u32 = 0xA06C;
    /// `FERMI_CONTEXT_SHARE_A`.
    pub const FERMI_CONTEXT_SHARE_A: u32 = 0x9067;
    /// `HOPPER_CHANNEL_GPFIFO_A`.
    pub const HOPPER_CHANNEL_GPFIFO_A: u32 = 0xC86F;
    /// `HOPPER_COMPUTE_A`.
    pub const HOPPER_COMPUTE_A: u32 = 0xCBC0;
}

/// `NV_STATUS` codes (`kernel-open/common/inc/nvstatuscodes.h`).
pub mod status {
    /// `NV_OK`.
    pub const NV_OK: u32 = 0x00;
    /// `NV_ERR_GPU_IS_LOST`.
    pub const NV_ERR_GPU_IS_LOST: u32 = 0x0F;
    /// `NV_ERR_INSERT_DUPLICATE_NAME`: the requested handle already exists.
    pub const NV_ERR_INSERT_DUPLICATE_NAME: u32 = 0x19;
    /// `NV_ERR_INVALID_ARGUMENT`.
    pub const NV_ERR_INVALID_ARGUMENT: u32 = 0x1F;
    /// `NV_ERR_INVALID_CLASS`.
    pub const NV_ERR_INVALID_CLASS: u32 = 0x22;
    /// `NV_ERR_INVALID_CLIENT`.
    pub const NV_ERR_INVALID_CLIENT: u32 = 0x23;
    /// `NV_ERR_INVALID_FUNCTION`.
    pub const NV_ERR_INVALID_FUNCTION: u32 = 0x2A;
    /// `NV_ERR_INVALID_OBJECT_HANDLE`.
    pub const NV_ERR_INVALID_OBJECT_HANDLE: u32 = 0x33;
    /// `NV_ERR_INVALID_OBJECT_PARENT`.
    pub const NV_ERR_INVALID_OBJECT_PARENT: u32 = 0x36;
    /// `NV_ERR_INVALID_POINTER`.
    pub const NV_ERR_INVALID_POINTER: u32 = 0x3D;
    /// `NV_ERR_NO_MEMORY`.
    pub const NV_ERR_NO_MEMORY: u32 = 0x51;
    /// `NV_ERR_NOT_SUPPORTED`.
    pub const NV_ERR_NOT_SUPPORTED: u32 = 0x56;
    /// `NV_ERR_OBJECT_NOT_FOUND`.
    pub const NV_ERR_OBJECT_NOT_FOUND: u32 = 0x57;
}

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOWR(NV_IOCTL_MAGIC, nr, size)` as the driver headers build it.
#[must_use]
pub const fn nv_iowr(nr: u8, size: usize) -> u32 {
    ((IOC_READ | IOC_WRITE) << IOC_DIRSHIFT)
        | (((size as u32) & 0x3FFF) << IOC_SIZESHIFT)
        | ((NV_IOCTL_MAGIC as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
}

/// `_IOC_NR(cmd)`.
#[must_use]
pub const fn ioc_nr(cmd: u32) -> u8 {
    (cmd & 0xFF) as u8
}

/// `_IOC_SIZE(cmd)`.
#[must_use]
pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> IOC_SIZESHIFT) & 0x3FFF) as usize
}

/// Little-endian `u32` at `off`, `None` past the end.
#[must_use]
pub fn get_u32(buf: &[u8], off: usize) -> Option<u32> {
    buf.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off`, `None` past the end.
#[must_use]
pub fn get_u64(buf: &[u8], off: usize) -> Option<u64> {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

/// Writes a little-endian `u32` at `off`; ignored past the end (callers check sizes first).
pub fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(b) = buf.get_mut(off..off + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes a little-endian `u64` at `off`; ignored past the end.
pub fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    if let Some(b) = buf.get_mut(off..off + 8) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

fn exact(buf: &[u8], want: usize) -> Result<(), Error> {
    if buf.len() == want {
        Ok(())
    } else {
        Err(Error::WrongSize { got: buf.len(), want })
    }
}

/// `NV_ESC_RM_ALLOC` arguments, from either NVOS21 or NVOS64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmAlloc {
    /// `hRoot`: the client (0 when allocating a client).
    pub h_root: u32,
    /// `hObjectParent`.
    pub h_parent: u32,
    /// `hObjectNew`: the requested handle, 0 to let RM pick.
    pub h_new: u32,
    /// `hClass`.
    pub h_class: u32,
    /// `pAllocParms`: user pointer to the class's allocation parameters.
    pub p_alloc_parms: u64,
    /// `paramsSize`.
    pub params_size: u32,
    /// `flags` (NVOS64 only, 0 for NVOS21).
    pub flags: u32,
}

/// The two `NV_ESC_RM_ALLOC` variants; the ioctl size tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmAllocVariant {
    /// `NVOS21_PARAMETERS` (32 bytes).
    Nvos21,
    /// `NVOS64_PARAMETERS` (48 bytes).
    Nvos64,
}

impl RmAllocVariant {
    /// The variant for an ioctl argument size, `None` if neither.
    #[must_use]
    pub fn from_size(size: usize) -> Option<Self> {
        match size {
            NVOS21_SIZE => Some(Self::Nvos21),
            NVOS64_SIZE => Some(Self::Nvos64),
            _ => None,
        }
    }

    /// Struct size.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::Nvos21 => NVOS21_SIZE,
            Self::Nvos64 => NVOS64_SIZE,
        }
    }

    /// Offset of `status`.
    #[must_use]
    pub fn status_offset(self) -> usize {
        match self {
            Self::Nvos21 => 28,
            Self::Nvos64 => 40,
        }
    }

    /// Decodes the struct.
    ///
    /// # Errors
    /// The buffer is not exactly the struct's size.
    pub fn decode(self, buf: &[u8]) -> Result<RmAlloc, Error> {
        exact(buf, self.size())?;
        let u = |o| get_u32(buf, o).unwrap_or(0);
        let (params_size, flags) = match self {
            Self::Nvos21 => (u(24), 0),
            Self::Nvos64 => (u(32), u(36)),
        };
        Ok(RmAlloc {
            h_root: u(0),
            h_parent: u(4),
            h_new: u(8),
            h_class: u(12),
            p_alloc_parms: get_u64(buf, 16).unwrap_or(0),
            params_size,
            flags,
        })
    }

    /// Encodes the struct (status 0); NVOS64's `pRightsRequested` is NULL.
    #[must_use]
    pub fn encode(self, a: &RmAlloc) -> Vec<u8> {
        let mut b = vec![0u8; self.size()];
        put_u32(&mut b, 0, a.h_root);
        put_u32(&mut b, 4, a.h_parent);
        put_u32(&mut b, 8, a.h_new);
        put_u32(&mut b, 12, a.h_class);
        put_u64(&mut b, 16, a.p_alloc_parms);
        match self {
            Self::Nvos21 => put_u32(&mut b, 24, a.params_size),
            Self::Nvos64 => {
                put_u32(&mut b, 32, a.params_size);
                put_u32(&mut b, 36, a.flags);
            }
        }
        b
    }
}

/// `NVOS00_PARAMETERS` (`NV_ESC_RM_FREE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmFree {
    /// `hRoot`: the client.
    pub h_root: u32,
    /// `hObjectParent`.
    pub h_parent: u32,
    /// `hObjectOld`: the handle freed (`== h_root` frees the whole client).
    pub h_old: u32,
}

impl RmFree {
    /// Offset of `status`.
    pub const STATUS_OFFSET: usize = 12;

    /// Decodes the struct.
    ///
    /// # Errors
    /// The buffer is not 16 bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        exact(buf, NVOS00_SIZE)?;
        Ok(Self {
            h_root: get_u32(buf, 0).unwrap_or(0),
            h_parent: get_u32(buf, 4).unwrap_or(0),
            h_old: get_u32(buf, 8).unwrap_or(0),
        })
    }

    /// Encodes the struct (status 0).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; NVOS00_SIZE];
        put_u32(&mut b, 0, self.h_root);
        put_u32(&mut b, 4, self.h_parent);
        put_u32(&mut b, 8, self.h_old);
        b
    }
}

/// Offsets inside `NVOS32_PARAMETERS` (`NV_ESC_RM_VID_HEAP_CONTROL`).
pub mod nvos32 {
    /// `hRoot`.
    pub const H_ROOT: usize = 0;
    /// `hObjectParent` (the device).
    pub const H_PARENT: usize = 4;
    /// `function`.
    pub const FUNCTION: usize = 8;
    /// `status` [out].
    pub const STATUS: usize = 20;
    /// `total` [out].
    pub const TOTAL: usize = 24;
    /// `free` [out].
    pub const FREE: usize = 32;
    /// `data.AllocSize.owner` / `data.Free.owner`.
    pub const OWNER: usize = 40;
    /// `data.AllocSize.hMemory` [in/out] / `data.Free.hMemory`.
    pub const H_MEMORY: usize = 44;
    /// `data.AllocSize.type`.
    pub const TYPE: usize = 48;
    /// `data.AllocSize.flags`.
    pub const FLAGS: usize = 52;
    /// `data.AllocSize.attr`.
    pub const ATTR: usize = 56;
    /// `data.AllocSize.size` [in/out].
    pub const SIZE: usize = 88;
    /// `data.AllocSize.limit` [out].
    pub const LIMIT: usize = 112;
    /// `data.Free.flags`.
    pub const FREE_FLAGS: usize = 48;

    /// `data.AllocSizeRange`: same head as `AllocSize` up to `partitionStride` (72), then `size`.
    pub mod range {
        /// `attr`.
        pub const ATTR: usize = 56;
        /// `size` [in/out].
        pub const SIZE: usize = 80;
        /// `alignment` (where a reader expecting `AllocSize` would look for the size).
        pub const ALIGNMENT: usize = 88;
        /// `limit` [out].
        pub const LIMIT: usize = 104;
    }

    /// `data.AllocTiledPitchHeight`: `height`, `pitch` before `attr`; RM computes
    /// `size = height * pitch` and writes it back.
    pub mod tiled {
        /// `height` (pixels).
        pub const HEIGHT: usize = 56;
        /// `pitch` (bytes, signed).
        pub const PITCH: usize = 60;
        /// `attr`.
        pub const ATTR: usize = 64;
        /// `size` [out].
        pub const SIZE: usize = 88;
        /// `limit` [out].
        pub const LIMIT: usize = 112;
    }
}

/// Offsets inside `NV_MEMORY_ALLOCATION_PARAMS`.
pub mod mem_params {
    /// `owner`.
    pub const OWNER: usize = 0;
    /// `flags`.
    pub const FLAGS: usize = 8;
    /// `attr`.
    pub const ATTR: usize = 24;
    /// `size` [in/out].
    pub const SIZE: usize = 64;
    /// `limit` [out].
    pub const LIMIT: usize = 88;
}

/// `attr` bits 26:25 (`NVOS32_ATTR_LOCATION`): 0 = VIDMEM.
#[must_use]
pub fn attr_location(attr: u32) -> u32 {
    (attr >> 25) & 3
}

/// `nv_ioctl_xfer_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xfer {
    /// The wrapped escape number, bare (`nvidia_ioctl` in `kernel-open/nvidia/nv.c` dispatches on
    /// `arg_cmd = ioc_xfer.cmd`; an ioctl command here is an unknown escape).
    pub cmd: u32,
    /// Size of the wrapped argument.
    pub size: u32,
    /// User pointer to the wrapped argument.
    pub ptr: u64,
}

impl Xfer {
    /// Decodes the struct.
    ///
    /// # Errors
    /// The buffer is not 16 bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        exact(buf, XFER_SIZE)?;
        Ok(Self {
            cmd: get_u32(buf, 0).unwrap_or(0),
            size: get_u32(buf, 4).unwrap_or(0),
            ptr: get_u64(buf, 8).unwrap_or(0),
        })
    }

    /// Encodes the struct.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; XFER_SIZE];
        put_u32(&mut b, 0, self.cmd);
        put_u32(&mut b, 4, self.size);
        put_u64(&mut b, 8, self.ptr);
        b
    }
}

/// An `NV_MEMORY_ALLOCATION_PARAMS` for a plain vidmem allocation of `size` bytes (owner = `client`).
#[must_use]
pub fn vidmem_alloc_params(client: u32, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; NV_MEMORY_ALLOCATION_PARAMS_SIZE];
    put_u32(&mut b, mem_params::OWNER, client);
    put_u64(&mut b, mem_params::SIZE, size);
    b
}

/// An `NVOS32_PARAMETERS` for `NVOS32_FUNCTION_ALLOC_SIZE` of `size` bytes of vidmem.
#[must_use]
pub fn nvos32_alloc_size(client: u32, device: u32, h_memory: u32, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; NVOS32_SIZE];
    put_u32(&mut b, nvos32::H_ROOT, client);
    put_u32(&mut b, nvos32::H_PARENT, device);
    put_u32(&mut b, nvos32::FUNCTION, NVOS32_FUNCTION_ALLOC_SIZE);
    put_u32(&mut b, nvos32::OWNER, client);
    put_u32(&mut b, nvos32::H_MEMORY, h_memory);
    put_u64(&mut b, nvos32::SIZE, size);
    b
}

/// An `NVOS32_PARAMETERS` for `NVOS32_FUNCTION_ALLOC_SIZE_RANGE` of `size` bytes of vidmem (with an
/// `alignment` of 2 MiB, as a caller would ask, so the two offsets hold different values).
#[must_use]
pub fn nvos32_alloc_size_range(client: u32, device: u32, h_memory: u32, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; NVOS32_SIZE];
    put_u32(&mut b, nvos32::H_ROOT, client);
    put_u32(&mut b, nvos32::H_PARENT, device);
    put_u32(&mut b, nvos32::FUNCTION, NVOS32_FUNCTION_ALLOC_SIZE_RANGE);
    put_u32(&mut b, nvos32::OWNER, client);
    put_u32(&mut b, nvos32::H_MEMORY, h_memory);
    put_u64(&mut b, nvos32::range::SIZE, size);
    put_u64(&mut b, nvos32::range::ALIGNMENT, 2 << 20);
    b
}

/// An `NVOS32_PARAMETERS` for `NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT` of a `pitch`-byte by
/// `height`-line vidmem surface.
#[must_use]
pub fn nvos32_alloc_tiled(client: u32, device: u32, h_memory: u32, pitch: i32, height: u32) -> Vec<u8> {
    let mut b = vec![0u8; NVOS32_SIZE];
    put_u32(&mut b, nvos32::H_ROOT, client);
    put_u32(&mut b, nvos32::H_PARENT, device);
    put_u32(&mut b, nvos32::FUNCTION, NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT);
    put_u32(&mut b, nvos32::OWNER, client);
    put_u32(&mut b, nvos32::H_MEMORY, h_memory);
    put_u32(&mut b, nvos32::tiled::HEIGHT, height);
    b[nvos32::tiled::PITCH..nvos32::tiled::PITCH + 4].copy_from_slice(&pitch.to_le_bytes());
    b
}

/// An `NVOS32_PARAMETERS` for `NVOS32_FUNCTION_FREE` of `h_memory` (with
/// `NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED`, which the driver requires).
#[must_use]
pub fn nvos32_free(client: u32, device: u32, h_memory: u32) -> Vec<u8> {
    let mut b = vec![0u8; NVOS32_SIZE];
    put_u32(
        &mut b,
        nvos32::FREE_FLAGS,
        NVOS32_FREE_FLAGS_MEMORY_HANDLE_PROVIDED,
    );
    put_u32(&mut b, nvos32::H_ROOT, client);
    put_u32(&mut b, nvos32::H_PARENT, device);
    put_u32(&mut b, nvos32::FUNCTION, NVOS32_FUNCTION_FREE);
    put_u32(&mut b, nvos32::OWNER, client);
    put_u32(&mut b, nvos32::H_MEMORY, h_memory);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_match_the_reference_table() {
        assert_eq!(nv_iowr(NV_ESC_RM_FREE, NVOS00_SIZE), 0xC010_4629);
        assert_eq!(nv_iowr(NV_ESC_RM_CONTROL, NVOS54_SIZE), 0xC020_462A);
        assert_eq!(nv_iowr(NV_ESC_RM_ALLOC, NVOS21_SIZE), 0xC020_462B);
        assert_eq!(nv_iowr(NV_ESC_RM_ALLOC, NVOS64_SIZE), 0xC030_462B);
        assert_eq!(nv_iowr(NV_ESC_RM_DUP_OBJECT, NVOS55_SIZE), 0xC01C_4634);
        assert_eq!(nv_iowr(NV_ESC_RM_VID_HEAP_CONTROL, NVOS32_SIZE), 0xC0B8_464A);
        assert_eq!(nv_iowr(NV_ESC_REGISTER_FD, REGISTER_FD_SIZE), 0xC004_46C9);
        assert_eq!(nv_iowr(NV_ESC_CHECK_VERSION_STR, CHECK_VERSION_SIZE), 0xC048_46D2);
        assert_eq!(nv_iowr(NV_ESC_IOCTL_XFER_CMD, XFER_SIZE), 0xC010_46D3);
        assert_eq!(ioc_nr(0xC030_462B), NV_ESC_RM_ALLOC);
        assert_eq!(ioc_size(0xC030_462B), 48);
    }

    #[test]
    fn nvos21_decodes_a_byte_fixture() {
        // hRoot=0xc1d00001 hParent=0xcaf00000 hNew=0 hClass=0x40 p=0x7fff_0000_1000 paramsSize=128
        let fixture: [u8; 32] = [
            0x01, 0x00, 0xd0, 0xc1, 0x00, 0x00, 0xf0, 0xca, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x00, 0x10, 0x00,
            0x00, 0xff, 0x7f, 0x00, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0,
        ];
        let a = RmAllocVariant::Nvos21.decode(&fixture).unwrap();
        assert_eq!(
            a,
            RmAlloc {
                h_root: 0xc1d0_0001,
                h_parent: 0xcaf0_0000,
                h_new: 0,
                h_class: 0x40,
                p_alloc_parms: 0x7fff_0000_1000,
                params_size: 128,
                flags: 0,
            }
        );
        assert_eq!(RmAllocVariant::Nvos21.encode(&a), fixture.to_vec());
    }

    #[test]
    fn nvos64_round_trips_and_puts_fields_at_535_offsets() {
        let a = RmAlloc {
            h_root: 1,
            h_parent: 2,
            h_new: 3,
            h_class: 0x40,
            p_alloc_parms: 0x1122_3344_5566_7788,
            params_size: 128,
            flags: 0,
        };
        let b = RmAllocVariant::Nvos64.encode(&a);
        assert_eq!(b.len(), 48);
        assert_eq!(get_u32(&b, 32), Some(128));
        assert_eq!(RmAllocVariant::Nvos64.decode(&b).unwrap(), a);
        assert_eq!(
            RmAllocVariant::from_size(40),
            None,
            "the pre-535 40-byte NVOS64 is not this ABI"
        );
    }

    #[test]
    fn truncated_structs_are_errors() {
        assert!(matches!(
            RmAllocVariant::Nvos21.decode(&[0u8; 31]),
            Err(Error::WrongSize { got: 31, want: 32 })
        ));
        assert!(RmFree::decode(&[0u8; 12]).is_err());
        assert!(Xfer::decode(&[0u8; 8]).is_err());
    }

    #[test]
    fn nvos32_alloc_fixture_has_size_at_88_and_handle_at_44() {
        let b = nvos32_alloc_size(0xc1d0_0001, 0xcaf0_0000, 0x1234, 3 << 20);
        assert_eq!(b.len(), 184);
        assert_eq!(get_u32(&b, 8), Some(2));
        assert_eq!(get_u32(&b, 44), Some(0x1234));
        assert_eq!(get_u64(&b, 88), Some(3 << 20));
        let p = vidmem_alloc_params(7, 4096);
        assert_eq!(p.len(), 128);
        assert_eq!(get_u64(&p, 64), Some(4096));
        assert_eq!(attr_location(1 << 25), 1);
    }
}
