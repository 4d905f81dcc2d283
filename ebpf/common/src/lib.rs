//! Types shared by the hami eBPF programs and the node agent.
//!
//! Every type is `#[repr(C)]`, has no padding holes the kernel could leave uninitialised, and has its
//! size asserted at compile time, because the kernel side writes them into maps and the ring buffer and
//! the agent reads them back byte for byte. Sizes and offsets of the NVIDIA structures decoded by the
//! programs come from `src/common/sdk/nvidia/inc/nvos.h` of NVIDIA/open-gpu-kernel-modules (tags
//! 515.43.04 to 595.45.04); the agent selects a generation at load time ([`AbiConfig`]).
#![no_std]

/// Name of every map and program, shared so the agent opens exactly what the object defines.
pub mod names {
    /// Version of the pinned maps' key and value layouts, part of their bpffs directory name
    /// (`maps-v<N>`): an agent whose layouts differ starts with fresh maps instead of failing to reuse
    /// incompatible pins (the old ones stay until `hami-agent detach`).
    pub const MAPS_VERSION: u32 = 2;
    /// `HashMap<FileKey, u32>`: NVIDIA device files (value: [`super::file_kind`]).
    pub const DEVICE_FILES: &str = "HAMI_DEVICE_FILES";
    /// `Array<KernelConfig>` with one entry.
    pub const CONFIG: &str = "HAMI_CONFIG";
    /// `HashMap<u64 pid_tgid, Pending>`: an ioctl between syscall entry and exit.
    pub const PENDING: &str = "HAMI_PENDING";
    /// `HashMap<ObjectKey, ObjectValue>`: RM device/subdevice objects, the GPU they stand for and their
    /// parent (pinned).
    pub const OBJECTS: &str = "HAMI_OBJECTS";
    /// `HashMap<ObjectKey, AllocValue>`: live device-memory objects (pinned; authoritative).
    pub const ALLOCS: &str = "HAMI_ALLOCS";
    /// `HashMap<u32 tgid, u64 cgroup id>`: processes that used the driver (pinned).
    pub const TRACKED: &str = "HAMI_TRACKED";
    /// `RingBuf` of [`super::Event`] (pinned).
    pub const EVENTS: &str = "HAMI_EVENTS";
    /// `PerCpuHashMap<CallKey, u64>`: calls of hooked libcuda functions per cgroup.
    pub const CALLS: &str = "HAMI_CALLS";
    /// `HashMap<u64 pid_tgid, UprobePending>`: libcuda call between entry and return.
    pub const UPROBE_PENDING: &str = "HAMI_UPROBE_PENDING";
    /// `HashMap<LimitKey, u64>`: hard device-memory limits per container and GPU, bytes (agent-filled;
    /// `gpu == GPU_UNKNOWN` applies to every GPU).
    pub const LIMITS: &str = "HAMI_LIMITS";
    /// `HashMap<LimitKey, u64>`: device memory of limited containers, bytes (the agent writes the exact
    /// value after each batch of events; the programs add each new allocation meanwhile).
    pub const LIMIT_USAGE: &str = "HAMI_LIMIT_USAGE";
    /// `PerCpuArray<u64>` of [`super::counter`] slots: program-level counters (errors, drops).
    pub const COUNTERS: &str = "HAMI_COUNTERS";
}

/// Kind of an NVIDIA device file, the value of the device-file map.
pub mod file_kind {
    /// `/dev/nvidiactl` (RM object management).
    pub const CTL: u32 = 1;
    /// `/dev/nvidia<N>` (per GPU).
    pub const GPU: u32 = 2;
    /// `/dev/nvidia-uvm`.
    pub const UVM: u32 = 3;
}

/// Identity of an NVIDIA device file as the programs and the agent both compute it
/// ([`FileKey::of_inode`]).
///
/// The real driver knows its files only by character-device number (`nv.c` of
/// NVIDIA/open-gpu-kernel-modules 595.45.04: `nv_is_control_device` compares the minor with 255; major
/// 195, minors 0–254 are GPUs, `nvidia-uvm` gets a dynamic major listed in `/proc/devices`). A container
/// runtime that makes its own `/dev/nvidiactl` with `mknod` (runc with CDI, no bind mount) gives the same
/// device another filesystem and inode, so a character device is keyed by its device number alone:
/// `dev` = `inode->i_rdev` in the kernel's encoding (`MKDEV(major, minor) = major << 20 | minor`,
/// `include/linux/kdev_t.h`), `ino` = 0. Any other file (the simulated node's FUSE files, whose
/// `i_rdev` is 0) is keyed by its superblock's device number and its inode number, which is never 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileKey {
    /// `inode->i_rdev` of a device, else `inode->i_sb->s_dev`; kernel encoding, widened to 64 bits.
    pub dev: u64,
    /// 0 for a device, else `inode->i_ino`.
    pub ino: u64,
}

impl FileKey {
    /// The key of an inode whose `i_rdev` is `rdev` (0 unless it is a device node), superblock
    /// device `sb_dev` and number `ino` (all in the kernel's encoding).
    #[inline(always)]
    #[must_use]
    pub fn of_inode(rdev: u32, sb_dev: u32, ino: u64) -> Self {
        if rdev != 0 {
            Self {
                dev: rdev as u64,
                ino: 0,
            }
        } else {
            Self {
                dev: sb_dev as u64,
                ino,
            }
        }
    }
}

/// Byte offsets into kernel structures, read from the running kernel's BTF by the agent
/// (`/sys/kernel/btf/vmlinux`), so the programs need no compile-time kernel headers.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// `task_struct.files`.
    pub task_files: u32,
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.pid`.
    pub task_pid: u32,
    /// `files_struct.fdt`.
    pub files_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdt_max_fds: u32,
    /// `fdtable.fd`.
    pub fdt_fd: u32,
    /// `file.f_inode`.
    pub file_inode: u32,
    /// `inode.i_ino`.
    pub inode_ino: u32,
    /// `inode.i_sb`.
    pub inode_sb: u32,
    /// `super_block.s_dev`.
    pub sb_dev: u32,
    /// `inode.i_rdev` (a `dev_t`, 32 bits).
    pub inode_rdev: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Offsets of the RM parameter structures that moved between driver generations, read from
/// `src/common/sdk/nvidia/inc/nvos.h` of NVIDIA/open-gpu-kernel-modules at each tag: up to 520.61.07
/// `NVOS64_PARAMETERS` is 40 bytes with `status` at 32 and no `flags`; 525.47.04 to 530.41.03 add
/// `flags` at 32 (status at 36, still 40 bytes); 535.43.02 adds `paramsSize` to NVOS21 (status 24 → 28)
/// and NVOS64 (48 bytes, flags 36, status 40), unchanged up to 595.45.04.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AbiConfig {
    /// Offset of `status` in `NVOS21_PARAMETERS`.
    pub nvos21_status: u32,
    /// `sizeof(NVOS64_PARAMETERS)`.
    pub nvos64_size: u32,
    /// Offset of `flags` in `NVOS64_PARAMETERS`, or [`AbiConfig::NO_FIELD`].
    pub nvos64_flags: u32,
    /// Offset of `status` in `NVOS64_PARAMETERS`.
    pub nvos64_status: u32,
}

impl AbiConfig {
    /// An offset for a field the generation does not have.
    pub const NO_FIELD: u32 = u32::MAX;
    /// Branches 515 and 520 (open-gpu-kernel-modules 515.43.04 to 520.61.07).
    pub const R515: Self = Self {
        nvos21_status: 24,
        nvos64_size: 40,
        nvos64_flags: Self::NO_FIELD,
        nvos64_status: 32,
    };
    /// Branches 525 and 530 (525.47.04 to 530.41.03).
    pub const R525: Self = Self {
        nvos21_status: 24,
        nvos64_size: 40,
        nvos64_flags: 32,
        nvos64_status: 36,
    };
    /// Branches 535 and later (535.43.02, verified up to 595.45.04).
    pub const R535: Self = Self {
        nvos21_status: 28,
        nvos64_size: 48,
        nvos64_flags: 36,
        nvos64_status: 40,
    };
    /// Every generation, oldest first.
    pub const ALL: [Self; 3] = [Self::R515, Self::R525, Self::R535];
}

/// The one entry of the config map, written by the agent before the programs attach.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelConfig {
    /// Kernel structure offsets.
    pub kernel: KernelOffsets,
    /// Driver ABI generation.
    pub abi: AbiConfig,
    /// Non-zero once the agent filled the entry; the programs do nothing before.
    pub ready: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Key of an RM object: the host tgid that created it, its client and its handle.
/// Handles are unique only within a client (RM's resource server keys objects by client and handle).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Host tgid of the allocating process.
    pub tgid: u32,
    /// `hClient` / `hRoot`.
    pub client: u32,
    /// `hObject`.
    pub handle: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

impl ObjectKey {
    /// The key of object `handle` of client `client` created by process `tgid`.
    #[inline(always)]
    #[must_use]
    pub const fn new(tgid: u32, client: u32, handle: u32) -> Self {
        Self {
            tgid,
            client,
            handle,
            _pad: 0,
        }
    }
}

/// An RM `NV01_DEVICE_0` or `NV20_SUBDEVICE_0` object, the value of the object map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ObjectValue {
    /// GPU index (`deviceId` of the device), or [`GPU_UNKNOWN`].
    pub gpu: u32,
    /// Parent handle: the client for a device, the device for a subdevice.
    pub parent: u32,
}

/// A live device-memory object.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocValue {
    /// cgroup v2 id of the allocating task (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// Bytes RM reports it allocated (`size` written back by the driver).
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` at the allocation (CLOCK_MONOTONIC, nanoseconds).
    pub ts_ns: u64,
    /// GPU index (RM `deviceId` of the `NV01_DEVICE_0` ancestor), or [`GPU_UNKNOWN`].
    pub gpu: u32,
    /// Parent handle (device or subdevice).
    pub parent: u32,
}

/// GPU index used when the parent device object was not seen (allocated before tracing began).
pub const GPU_UNKNOWN: u32 = u32::MAX;

/// An ioctl on an NVIDIA file between syscall entry and exit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// User pointer to the (unwrapped) parameter struct.
    pub arg: u64,
    /// Escape number (`_IOC_NR`, after XFER unwrapping).
    pub nr: u32,
    /// Parameter size (`_IOC_SIZE`, after XFER unwrapping).
    pub size: u32,
    /// [`file_kind`] of the file.
    pub file_kind: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// A hooked libcuda call between entry and return.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UprobePending {
    /// Pointer argument (`CUdeviceptr*` for allocations) or the device pointer (frees).
    pub ptr: u64,
    /// Requested bytes.
    pub bytes: u64,
    /// [`call`] id.
    pub call: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Hooked libcuda entry points: the call ids counted per cgroup. [`PROBES`] names each one's symbol.
pub mod call {
    /// `cuMemAlloc_v2`.
    pub const MEM_ALLOC: u32 = 1;
    /// `cuMemAllocManaged`.
    pub const MEM_ALLOC_MANAGED: u32 = 2;
    /// `cuMemFree_v2`.
    pub const MEM_FREE: u32 = 3;
    /// `cuLaunchKernel`.
    pub const LAUNCH_KERNEL: u32 = 4;
    /// `cuLaunchKernelEx`.
    pub const LAUNCH_KERNEL_EX: u32 = 5;
    /// `cuLaunchCooperativeKernel`.
    pub const LAUNCH_COOPERATIVE: u32 = 6;
    /// `cuGraphLaunch`.
    pub const GRAPH_LAUNCH: u32 = 7;
    /// `cuMemCreate` (VMM physical allocation).
    pub const MEM_CREATE: u32 = 8;
    /// `cuMemAllocAsync`.
    pub const MEM_ALLOC_ASYNC: u32 = 9;
    /// `cuMemAllocPitch_v2`.
    pub const MEM_ALLOC_PITCH: u32 = 10;
    /// `cuMemRelease` (VMM physical free).
    pub const MEM_RELEASE: u32 = 11;
    /// `cuMemFreeAsync`.
    pub const MEM_FREE_ASYNC: u32 = 12;
    /// `cuLaunchKernel_ptsz` (per-thread default stream: code built with
    /// `--default-stream per-thread` calls these twins, `cuda.h`'s `__CUDA_API_PTSZ`).
    pub const LAUNCH_KERNEL_PTSZ: u32 = 13;
    /// `cuLaunchKernelEx_ptsz`.
    pub const LAUNCH_KERNEL_EX_PTSZ: u32 = 14;
    /// `cuLaunchCooperativeKernel_ptsz`.
    pub const LAUNCH_COOPERATIVE_PTSZ: u32 = 15;
    /// `cuGraphLaunch_ptsz`.
    pub const GRAPH_LAUNCH_PTSZ: u32 = 16;
    /// `cuMemAllocAsync_ptsz`.
    pub const MEM_ALLOC_ASYNC_PTSZ: u32 = 17;
    /// `cuMemFreeAsync_ptsz`.
    pub const MEM_FREE_ASYNC_PTSZ: u32 = 18;
    /// `cuMemAllocFromPoolAsync`.
    pub const MEM_ALLOC_FROM_POOL_ASYNC: u32 = 19;
    /// `cuMemAllocFromPoolAsync_ptsz`.
    pub const MEM_ALLOC_FROM_POOL_ASYNC_PTSZ: u32 = 20;
    /// One past the largest id.
    pub const COUNT: u32 = 21;
}

/// One uprobe attachment on libcuda.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The eBPF program (`#[uprobe]` or `#[uretprobe]` function of the programs crate).
    pub program: &'static str,
    /// The libcuda symbol it attaches to.
    pub symbol: &'static str,
    /// The [`call`] id the program counts under `symbol`; `None` for a return probe.
    pub call: Option<u32>,
}

const fn entry(program: &'static str, symbol: &'static str, call: u32) -> Probe {
    Probe {
        program,
        symbol,
        call: Some(call),
    }
}

/// Every libcuda attachment, the one list the agent attaches from and names call metrics by (each
/// entry probe's `call` id appears once). A symbol a library does not export is skipped and counted.
pub const PROBES: [Probe; 22] = [
    entry("hami_cu_mem_alloc", "cuMemAlloc_v2", call::MEM_ALLOC),
    entry(
        "hami_cu_mem_alloc_pitch",
        "cuMemAllocPitch_v2",
        call::MEM_ALLOC_PITCH,
    ),
    entry(
        "hami_cu_mem_alloc_managed",
        "cuMemAllocManaged",
        call::MEM_ALLOC_MANAGED,
    ),
    entry("hami_cu_mem_free", "cuMemFree_v2", call::MEM_FREE),
    entry("hami_cu_mem_create", "cuMemCreate", call::MEM_CREATE),
    entry("hami_cu_mem_release", "cuMemRelease", call::MEM_RELEASE),
    entry(
        "hami_cu_mem_alloc_async",
        "cuMemAllocAsync",
        call::MEM_ALLOC_ASYNC,
    ),
    entry(
        "hami_cu_mem_alloc_async_ptsz",
        "cuMemAllocAsync_ptsz",
        call::MEM_ALLOC_ASYNC_PTSZ,
    ),
    entry("hami_cu_mem_free_async", "cuMemFreeAsync", call::MEM_FREE_ASYNC),
    entry(
        "hami_cu_mem_free_async_ptsz",
        "cuMemFreeAsync_ptsz",
        call::MEM_FREE_ASYNC_PTSZ,
    ),
    entry(
        "hami_cu_mem_alloc_from_pool_async",
        "cuMemAllocFromPoolAsync",
        call::MEM_ALLOC_FROM_POOL_ASYNC,
    ),
    entry(
        "hami_cu_mem_alloc_from_pool_async_ptsz",
        "cuMemAllocFromPoolAsync_ptsz",
        call::MEM_ALLOC_FROM_POOL_ASYNC_PTSZ,
    ),
    entry("hami_cu_launch_kernel", "cuLaunchKernel", call::LAUNCH_KERNEL),
    entry(
        "hami_cu_launch_kernel_ptsz",
        "cuLaunchKernel_ptsz",
        call::LAUNCH_KERNEL_PTSZ,
    ),
    entry(
        "hami_cu_launch_kernel_ex",
        "cuLaunchKernelEx",
        call::LAUNCH_KERNEL_EX,
    ),
    entry(
        "hami_cu_launch_kernel_ex_ptsz",
        "cuLaunchKernelEx_ptsz",
        call::LAUNCH_KERNEL_EX_PTSZ,
    ),
    entry(
        "hami_cu_launch_cooperative",
        "cuLaunchCooperativeKernel",
        call::LAUNCH_COOPERATIVE,
    ),
    entry(
        "hami_cu_launch_cooperative_ptsz",
        "cuLaunchCooperativeKernel_ptsz",
        call::LAUNCH_COOPERATIVE_PTSZ,
    ),
    entry("hami_cu_graph_launch", "cuGraphLaunch", call::GRAPH_LAUNCH),
    entry(
        "hami_cu_graph_launch_ptsz",
        "cuGraphLaunch_ptsz",
        call::GRAPH_LAUNCH_PTSZ,
    ),
    Probe {
        program: "hami_cu_ret",
        symbol: "cuMemAllocManaged",
        call: None,
    },
    Probe {
        program: "hami_cu_ret",
        symbol: "cuMemFree_v2",
        call: None,
    },
];

/// The symbol counted under call id `id` (the metric label), from [`PROBES`].
#[must_use]
pub fn call_name(id: u32) -> Option<&'static str> {
    let mut i = 0;
    while i < PROBES.len() {
        if PROBES[i].call == Some(id) {
            return Some(PROBES[i].symbol);
        }
        i += 1;
    }
    None
}

/// Key of the hard-limit maps.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LimitKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// GPU index, or [`GPU_UNKNOWN`] for "every GPU".
    pub gpu: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Key of the per-cgroup libcuda call counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CallKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// [`call`] id.
    pub call: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Program-level counter slots of the counters map.
pub mod counter {
    /// Ioctl payloads that could not be read or had an unexpected size (ignored safely).
    pub const MALFORMED: u32 = 0;
    /// Events dropped because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 1;
    /// Allocation objects not recorded because the allocation map was full.
    pub const ALLOC_MAP_FULL: u32 = 2;
    /// Ioctls on NVIDIA files with an allocation, free, heap or XFER escape number, at syscall entry.
    pub const IOCTLS: u32 = 3;
    /// Processes killed for taking their container past its hard limit.
    pub const HARD_LIMIT_KILLS: u32 = 4;
    /// Number of slots.
    pub const COUNT: u32 = 5;
}

/// What an [`Event`] reports.
pub mod event_kind {
    /// A device-memory object was created (`bytes`, `gpu`, `client`, `handle`, `parent`).
    pub const ALLOC: u32 = 1;
    /// A device-memory object was freed explicitly (`bytes` and `gpu` of the object).
    pub const FREE: u32 = 2;
    /// A device-memory allocation came back with a non-zero RM `status` (nothing allocated).
    pub const ALLOC_FAILED: u32 = 3;
    /// A non-memory object was freed (`handle`; `handle == client` frees the whole client): the driver
    /// frees its whole subtree, so the agent releases every memory object below it, however deep.
    pub const FREE_OBJECT: u32 = 4;
    /// An `NV01_DEVICE_0` or `NV20_SUBDEVICE_0` was created (`client`, `handle`, `parent`, `class`,
    /// `gpu`): the agent keeps the object tree that frees cascade through.
    pub const OBJECT: u32 = 12;
    /// The thread-group leader exited: every object of the tgid is released.
    pub const EXIT: u32 = 5;
    /// A process forked (`aux` = child tgid).
    pub const FORK: u32 = 6;
    /// A process that used the driver called `execve`: libcuda opens the device files close-on-exec,
    /// so the driver frees its objects as at exit.
    pub const EXEC: u32 = 10;
    /// A malformed or unreadable ioctl payload (`nr`, `size`), ignored.
    pub const MALFORMED: u32 = 7;
    /// `cuMemAllocManaged` returned (`aux` = device pointer, `bytes`, `status` = CUresult).
    pub const MANAGED_ALLOC: u32 = 8;
    /// `cuMemFree_v2` returned (`aux` = device pointer, `status` = CUresult).
    pub const CU_FREE: u32 = 9;
    /// The allocating process was sent SIGKILL: the allocation (`bytes`, `gpu`) took its container past
    /// its hard limit (`aux` = the limit, bytes). Its objects are released at its exit.
    pub const HARD_LIMIT_KILL: u32 = 11;
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Event {
    /// [`event_kind`].
    pub kind: u32,
    /// GPU index or [`GPU_UNKNOWN`].
    pub gpu: u32,
    /// Host tgid.
    pub tgid: u32,
    /// Host thread id.
    pub tid: u32,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC, nanoseconds).
    pub ts_ns: u64,
    /// RM client handle.
    pub client: u32,
    /// RM object handle.
    pub handle: u32,
    /// RM parent handle.
    pub parent: u32,
    /// RM `status` or CUresult.
    pub status: u32,
    /// Bytes.
    pub bytes: u64,
    /// Kind-specific (device pointer, child tgid).
    pub aux: u64,
    /// RM class of the object.
    pub class: u32,
    /// Ioctl escape number.
    pub nr: u32,
}

/// NVIDIA RM constants the programs decode: escape numbers from `src/nvidia/arch/nvalloc/unix/include/nv_escape.h`
/// and `kernel-open/common/inc/nv-ioctl-numbers.h`,
/// structures and flags from `src/common/sdk/nvidia/inc/nvos.h`, classes from
/// `src/common/sdk/nvidia/inc/class/` (NVIDIA/open-gpu-kernel-modules 595.45.04).
pub mod nv {
    /// `NV_ESC_RM_FREE`.
    pub const ESC_RM_FREE: u32 = 0x29;
    /// `NV_ESC_RM_ALLOC`.
    pub const ESC_RM_ALLOC: u32 = 0x2B;
    /// `NV_ESC_RM_VID_HEAP_CONTROL`.
    pub const ESC_RM_VID_HEAP_CONTROL: u32 = 0x4A;
    /// `NV_ESC_IOCTL_XFER_CMD`.
    pub const ESC_IOCTL_XFER_CMD: u32 = 0xD3;
    /// `sizeof(NVOS00_PARAMETERS)`.
    pub const NVOS00_SIZE: u32 = 16;
    /// `sizeof(NVOS21_PARAMETERS)` (both generations).
    pub const NVOS21_SIZE: u32 = 32;
    /// `sizeof(NVOS32_PARAMETERS)`.
    pub const NVOS32_SIZE: u32 = 184;
    /// `sizeof(nv_ioctl_xfer_t)`.
    pub const XFER_SIZE: u32 = 16;
    /// `NV_ABSOLUTE_MAX_IOCTL_SIZE`.
    pub const MAX_IOCTL_SIZE: u32 = 16384;
    /// `NV01_MEMORY_LOCAL_USER`: device memory.
    pub const CLASS_MEMORY_LOCAL_USER: u32 = 0x40;
    /// `NV01_DEVICE_0`.
    pub const CLASS_DEVICE: u32 = 0x80;
    /// `NV20_SUBDEVICE_0`.
    pub const CLASS_SUBDEVICE: u32 = 0x2080;
    /// `NVOS64_FLAGS_FINN_SERIALIZED`.
    pub const NVOS64_FLAGS_FINN_SERIALIZED: u32 = 1;
    /// Offset of `size` in `NV_MEMORY_ALLOCATION_PARAMS` (both generations).
    pub const MEM_PARAMS_SIZE: u32 = 64;
    /// `NVOS32_FUNCTION_ALLOC_SIZE`.
    pub const NVOS32_FUNCTION_ALLOC_SIZE: u32 = 2;
    /// `NVOS32_FUNCTION_FREE`.
    pub const NVOS32_FUNCTION_FREE: u32 = 3;
    /// `NVOS32_FUNCTION_ALLOC_SIZE_RANGE`.
    pub const NVOS32_FUNCTION_ALLOC_SIZE_RANGE: u32 = 14;
    /// `NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT` (also creates device memory).
    pub const NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT: u32 = 6;
    /// `NVOS32_ALLOC_FLAGS_VIRTUAL`.
    pub const NVOS32_ALLOC_FLAGS_VIRTUAL: u32 = 0x0008_0000;
    /// NVOS32 offsets (`NVOS32_PARAMETERS`, 184 bytes; the `data` union starts at 40): `function`.
    pub const NVOS32_FUNCTION: u32 = 8;
    /// `status`.
    pub const NVOS32_STATUS: u32 = 20;
    /// `hMemory` of every allocating member and of `data.Free` (each starts `owner`, `hMemory`).
    pub const NVOS32_H_MEMORY: u32 = 44;
    /// `flags` of every allocating member (after `owner`, `hMemory`, `type`).
    pub const NVOS32_FLAGS: u32 = 52;
    /// `data.Free.flags`.
    pub const NVOS32_FREE_FLAGS: u32 = 48;
    /// `data.AllocTiledPitchHeight.height` (lines).
    pub const NVOS32_TILED_HEIGHT: u32 = 56;
    /// `data.AllocTiledPitchHeight.pitch` (bytes, signed): RM allocates `height * pitch` bytes.
    pub const NVOS32_TILED_PITCH: u32 = 60;

    /// Where an NVOS32 heap function keeps what the decoders read: `(attr, size)` offsets of
    /// `data.AllocSize` (56, 88), `data.AllocSizeRange` (56, 80: its `size` follows
    /// `partitionStride` at 72; 88 is its `alignment`) and `data.AllocTiledPitchHeight` (64, 88:
    /// `height` and `pitch` come before `attr`), the members that create memory; `None` for any other
    /// function. Offsets computed from `nvos.h` (515.43.04 and 595.45.04 agree).
    #[inline(always)]
    #[must_use]
    pub fn nvos32_alloc_fields(function: u32) -> Option<(u32, u32)> {
        match function {
            NVOS32_FUNCTION_ALLOC_SIZE => Some((56, 88)),
            NVOS32_FUNCTION_ALLOC_SIZE_RANGE => Some((56, 80)),
            NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT => Some((64, 88)),
            _ => None,
        }
    }

    /// Whether an NVOS32 allocation with `flags` and `attr` creates device memory: not
    /// `NVOS32_ALLOC_FLAGS_VIRTUAL` and `NVOS32_ATTR_LOCATION` (bits 26:25) `VIDMEM` (0).
    #[inline(always)]
    #[must_use]
    pub fn nvos32_is_vidmem(flags: u32, attr: u32) -> bool {
        flags & NVOS32_ALLOC_FLAGS_VIRTUAL == 0 && (attr >> 25) & 3 == 0
    }
}

/// x86_64 `struct pt_regs` offsets of the first three syscall arguments (`arch/x86/include/asm/ptrace.h`).
pub mod pt_regs {
    /// `di`: first argument.
    pub const DI: usize = 112;
    /// `si`: second argument.
    pub const SI: usize = 104;
    /// `dx`: third argument.
    pub const DX: usize = 96;
    /// `orig_ax`: the syscall number (kept at syscall exit, when `ax` holds the return value).
    pub const ORIG_AX: usize = 120;
}

/// x86_64 `ioctl` syscall number.
pub const SYS_IOCTL: u64 = 16;

const _: () = {
    assert!(core::mem::size_of::<FileKey>() == 16);
    assert!(core::mem::size_of::<KernelOffsets>() == 48);
    assert!(core::mem::size_of::<AbiConfig>() == 16);
    assert!(core::mem::size_of::<KernelConfig>() == 72);
    assert!(core::mem::size_of::<ObjectKey>() == 16);
    assert!(core::mem::size_of::<AllocValue>() == 32);
    assert!(core::mem::size_of::<ObjectValue>() == 8);
    assert!(core::mem::size_of::<Pending>() == 24);
    assert!(core::mem::size_of::<UprobePending>() == 24);
    assert!(core::mem::size_of::<CallKey>() == 16);
    assert!(core::mem::size_of::<LimitKey>() == 16);
    assert!(core::mem::size_of::<Event>() == 72);
};

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    use super::{AllocValue, CallKey, Event, FileKey, KernelConfig, LimitKey, ObjectKey, ObjectValue};
    // SAFETY: all are #[repr(C)], Copy, made only of integers, without padding (sizes asserted above).
    unsafe impl aya::Pod for FileKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ObjectKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ObjectValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CallKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LimitKey {}
}

/// The hard-limit decision, shared by the kill (ioctl exit tracepoint, after the allocation, `used`
/// already including it: `bytes` 0) and the BPF LSM refusal (`file_ioctl`, before it: `bytes` the
/// request): whether the container's device memory `used` plus `bytes` exceeds `limit` (bytes). A
/// key is only present for a limited container; a limit of 0 holds every allocation (it is never
/// "unlimited", peer case C29).
#[inline(always)]
#[must_use]
pub fn over_hard_limit(used: u64, bytes: u64, limit: u64) -> bool {
    used.saturating_add(bytes) > limit
}

/// `ENOMEM`: what the BPF LSM program returns (negated) for an allocation past the hard limit.
pub const ENOMEM: i32 = 12;

/// Decoding of the RM parameter structures, shared by the kernel programs (reading the caller's memory
/// with `bpf_probe_read_user`) and user-space tests (reading byte fixtures), so the layouts are
/// tested on bytes without a kernel.
pub mod decode {
    use super::{AbiConfig, nv};

    /// Reads little-endian integers at byte offsets of some memory; `None` when unreadable.
    pub trait Reader {
        /// The `u32` at `base + off`.
        fn u32_at(&self, base: u64, off: u32) -> Option<u32>;
        /// The `u64` at `base + off`.
        fn u64_at(&self, base: u64, off: u32) -> Option<u64>;
    }

    /// What an RM escape did, decoded after the driver returned.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Decoded {
        /// A device-memory object was created.
        Alloc {
            /// `hRoot`.
            client: u32,
            /// Parent handle.
            parent: u32,
            /// New object handle.
            handle: u32,
            /// Bytes allocated (written back by RM).
            bytes: u64,
        },
        /// A device-memory allocation failed with RM `status`.
        AllocFailed {
            /// `hRoot`.
            client: u32,
            /// Parent handle.
            parent: u32,
            /// Bytes requested (0 when unreadable).
            bytes: u64,
            /// RM status.
            status: u32,
        },
        /// An `NV01_DEVICE_0` object for GPU `device_id` was created.
        Device {
            /// `hRoot`.
            client: u32,
            /// New handle.
            handle: u32,
            /// RM `deviceId`: the driver's device instance.
            device_id: u32,
        },
        /// An `NV20_SUBDEVICE_0` was created under `parent`.
        Subdevice {
            /// `hRoot`.
            client: u32,
            /// Parent (device) handle.
            parent: u32,
            /// New handle.
            handle: u32,
        },
        /// An object was freed successfully.
        Free {
            /// `hRoot`.
            client: u32,
            /// Freed handle.
            handle: u32,
        },
        /// Nothing to account (other classes, failed frees, non-vidmem heap allocations).
        Ignored,
    }

    /// `NV_ESC_RM_ALLOC` of `size` bytes at `arg` (NVOS21 when 32 bytes, NVOS64 when
    /// `abi.nvos64_size`). `None`: unknown size or unreadable/serialized payload.
    #[inline(always)]
    pub fn rm_alloc<R: Reader>(r: &R, arg: u64, size: u32, abi: &AbiConfig) -> Option<Decoded> {
        let status_off = if size == nv::NVOS21_SIZE {
            abi.nvos21_status
        } else if size == abi.nvos64_size {
            abi.nvos64_status
        } else {
            return None;
        };
        let client = r.u32_at(arg, 0)?;
        let parent = r.u32_at(arg, 4)?;
        let handle = r.u32_at(arg, 8)?;
        let class = r.u32_at(arg, 12)?;
        let params = r.u64_at(arg, 16)?;
        let status = r.u32_at(arg, status_off)?;
        if size != nv::NVOS21_SIZE && abi.nvos64_flags != AbiConfig::NO_FIELD {
            let flags = r.u32_at(arg, abi.nvos64_flags)?;
            if flags & nv::NVOS64_FLAGS_FINN_SERIALIZED != 0 {
                // Serialized parameters are not the C struct; never seen from libcuda.
                return if class == nv::CLASS_MEMORY_LOCAL_USER {
                    None
                } else {
                    Some(Decoded::Ignored)
                };
            }
        }
        match class {
            nv::CLASS_MEMORY_LOCAL_USER => {
                let bytes = r.u64_at(params, nv::MEM_PARAMS_SIZE);
                if status != 0 {
                    Some(Decoded::AllocFailed {
                        client,
                        parent,
                        bytes: bytes.unwrap_or(0),
                        status,
                    })
                } else {
                    Some(Decoded::Alloc {
                        client,
                        parent,
                        handle,
                        bytes: bytes?,
                    })
                }
            }
            // Without parameters (they are optional) RM takes device instance
            // `externalClassId - NV01_DEVICE_0` = 0 (`deviceConstruct_IMPL`,
            // src/nvidia/src/kernel/gpu/device.c); unreadable ones are malformed (`None`).
            nv::CLASS_DEVICE if status == 0 => Some(Decoded::Device {
                client,
                handle,
                device_id: if params == 0 { 0 } else { r.u32_at(params, 0)? },
            }),
            nv::CLASS_SUBDEVICE if status == 0 => Some(Decoded::Subdevice {
                client,
                parent,
                handle,
            }),
            _ => Some(Decoded::Ignored),
        }
    }

    /// A device-memory allocation as requested, read *before* the driver runs (what a BPF LSM
    /// `file_ioctl` program sees): `(client, parent, bytes)` of an `NV_ESC_RM_ALLOC` of
    /// `NV01_MEMORY_LOCAL_USER` (NVOS21 or the ABI's NVOS64, not FINN-serialized) or of an
    /// `NV_ESC_RM_VID_HEAP_CONTROL` allocation of vidmem (as [`vid_heap`]). `None`: anything else,
    /// or an unreadable payload (the call is then let through; the exit path still sees it).
    #[inline(always)]
    pub fn requested_alloc<R: Reader>(
        r: &R,
        nr: u32,
        arg: u64,
        size: u32,
        abi: &AbiConfig,
    ) -> Option<(u32, u32, u64)> {
        if nr == nv::ESC_RM_ALLOC {
            if size != nv::NVOS21_SIZE && size != abi.nvos64_size {
                return None;
            }
            if r.u32_at(arg, 12)? != nv::CLASS_MEMORY_LOCAL_USER {
                return None;
            }
            if size != nv::NVOS21_SIZE
                && abi.nvos64_flags != AbiConfig::NO_FIELD
                && r.u32_at(arg, abi.nvos64_flags)? & nv::NVOS64_FLAGS_FINN_SERIALIZED != 0
            {
                return None;
            }
            let params = r.u64_at(arg, 16)?;
            Some((
                r.u32_at(arg, 0)?,
                r.u32_at(arg, 4)?,
                r.u64_at(params, nv::MEM_PARAMS_SIZE)?,
            ))
        } else if nr == nv::ESC_RM_VID_HEAP_CONTROL && size == nv::NVOS32_SIZE {
            let function = r.u32_at(arg, nv::NVOS32_FUNCTION)?;
            let (attr_off, size_off) = nv::nvos32_alloc_fields(function)?;
            let flags = r.u32_at(arg, nv::NVOS32_FLAGS)?;
            let attr = r.u32_at(arg, attr_off)?;
            if !nv::nvos32_is_vidmem(flags, attr) {
                return None;
            }
            // A tiled surface's size is an output: RM computes it from height and pitch.
            let bytes = if function == nv::NVOS32_FUNCTION_ALLOC_TILED_PITCH_HEIGHT {
                let height = u64::from(r.u32_at(arg, nv::NVOS32_TILED_HEIGHT)?);
                let pitch = r.u32_at(arg, nv::NVOS32_TILED_PITCH)? as i32;
                height * (if pitch > 0 { pitch as u64 } else { 0 })
            } else {
                r.u64_at(arg, size_off)?
            };
            Some((r.u32_at(arg, 0)?, r.u32_at(arg, 4)?, bytes))
        } else {
            None
        }
    }

    /// `NV_ESC_RM_FREE` (NVOS00, 16 bytes).
    #[inline(always)]
    pub fn rm_free<R: Reader>(r: &R, arg: u64, size: u32) -> Option<Decoded> {
        if size != nv::NVOS00_SIZE {
            return None;
        }
        let client = r.u32_at(arg, 0)?;
        let handle = r.u32_at(arg, 8)?;
        let status = r.u32_at(arg, 12)?;
        Some(if status == 0 {
            Decoded::Free { client, handle }
        } else {
            Decoded::Ignored
        })
    }

    /// `NV_ESC_RM_VID_HEAP_CONTROL` (NVOS32, 184 bytes): `ALLOC_SIZE`, `ALLOC_SIZE_RANGE` and
    /// `ALLOC_TILED_PITCH_HEIGHT` of vidmem ([`nv::nvos32_is_vidmem`], each member's own offsets from
    /// [`nv::nvos32_alloc_fields`]) and `FREE`.
    #[inline(always)]
    pub fn vid_heap<R: Reader>(r: &R, arg: u64, size: u32) -> Option<Decoded> {
        if size != nv::NVOS32_SIZE {
            return None;
        }
        let client = r.u32_at(arg, 0)?;
        let parent = r.u32_at(arg, 4)?;
        let function = r.u32_at(arg, nv::NVOS32_FUNCTION)?;
        let status = r.u32_at(arg, nv::NVOS32_STATUS)?;
        if let Some((attr_off, size_off)) = nv::nvos32_alloc_fields(function) {
            let flags = r.u32_at(arg, nv::NVOS32_FLAGS)?;
            let attr = r.u32_at(arg, attr_off)?;
            let handle = r.u32_at(arg, nv::NVOS32_H_MEMORY)?;
            let bytes = r.u64_at(arg, size_off)?;
            if !nv::nvos32_is_vidmem(flags, attr) {
                return Some(Decoded::Ignored);
            }
            Some(if status != 0 {
                Decoded::AllocFailed {
                    client,
                    parent,
                    bytes,
                    status,
                }
            } else {
                Decoded::Alloc {
                    client,
                    parent,
                    handle,
                    bytes,
                }
            })
        } else if function == nv::NVOS32_FUNCTION_FREE && status == 0 {
            Some(Decoded::Free {
                client,
                handle: r.u32_at(arg, nv::NVOS32_H_MEMORY)?,
            })
        } else {
            Some(Decoded::Ignored)
        }
    }
}
