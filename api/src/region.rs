//! The per-container shared region: one memory-mapped file per container, shared by every process of
//! the container (through the interceptor, `libvgpu.so`) and by the node agent.
//!
//! It holds the container's limits, one reservation counter per device that every allocation updates
//! atomically (so several processes together never exceed the limit, peer case C13), one slot per
//! process (so the reservations of a process that died without freeing can be reclaimed), and the
//! device memory the kernel observed for the container (written by the agent from its eBPF attribution,
//! so memory no hook sees, such as context and chunk rounding, still counts).
//!
//! Layout version 1, `#[repr(C)]`, little-endian, [`REGION_SIZE`] bytes. All mutable fields are atomics,
//! used through shared references to the mapped memory; this module does no I/O (the mapping is the
//! interceptor's and the agent's business). Compared with HAMi-core's region (magic 19920718, version
//! 1.2, `reference/hami.md` §4.4): the check-and-reserve is one atomic step instead of a read of every
//! slot followed by a record, and limits are not taken from the tenant's environment once the region
//! exists.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `b"HAMIRGN1"` read as a little-endian u64; written last by the creator.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"HAMIRGN1");
/// Layout version. Version 2 changed the meaning of a limit of 0 from "unlimited" to "nothing may be
/// allocated" ([`UNLIMITED`] is the only "no limit"), so a version-1 reader refuses a version-2 region
/// instead of reading its zero limits as unlimited.
pub const REGION_VERSION: u32 = 2;

/// The memory limit of a device without one, bytes: the largest value, so "used + requested ≤ limit"
/// holds for every representable request with no special case. A limit of 0 means that nothing may be
/// allocated; no limit value means "unlimited" but this one (peer case C29: HAMi-core reads a zero
/// limit as unlimited, so a 0-MiB decision became a whole GPU).
pub const UNLIMITED: u64 = u64::MAX;
/// Devices per container.
pub const MAX_DEVICES: usize = 16;
/// Process slots per container.
pub const MAX_PROCS: usize = 256;

/// Region header.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    /// [`REGION_MAGIC`] once initialised (0 while the creator fills the header).
    pub magic: AtomicU64,
    /// [`REGION_VERSION`].
    pub version: AtomicU32,
    /// Devices in use (`≤ MAX_DEVICES`).
    pub device_count: AtomicU32,
    /// Device-memory limit per device, bytes; [`UNLIMITED`] means no limit, 0 means nothing may be
    /// allocated.
    pub limit_bytes: [AtomicU64; MAX_DEVICES],
    /// SM limit per device, percent of the device's SMs (1..=100; 0 or 100 means no throttling).
    pub sm_limit_percent: [AtomicU32; MAX_DEVICES],
    /// Sum of the live reservations of every process, bytes.
    pub reserved_bytes: [AtomicU64; MAX_DEVICES],
    /// Device memory the kernel attributed to the container, bytes (written by the agent).
    pub kernel_used_bytes: [AtomicU64; MAX_DEVICES],
    /// SM utilisation the agent measured for the container, percent.
    pub kernel_sm_percent: [AtomicU32; MAX_DEVICES],
    /// Nonzero while a container of higher priority is active on the device: the interceptor holds
    /// this container's kernel launches on it (written by the agent; HAMi's `nvidia.com/priority`).
    pub suspended: [AtomicU32; MAX_DEVICES],
    /// Nonzero while any device of the container is suspended (the launch fast path reads only this).
    pub suspended_any: AtomicU32,
    /// Reserved, zero.
    pub _reserved: AtomicU32,
    /// CLOCK_MONOTONIC ns of the agent's last write (0: never).
    pub kernel_updated_ns: AtomicU64,
    /// cgroup v2 id of the container (the inode of its cgroup directory), written by the processes that
    /// map the region, so the agent knows whose kernel-side usage to write here (0: unknown).
    pub cgroup_id: AtomicU64,
}

/// One process slot.
#[repr(C)]
#[derive(Debug)]
pub struct Slot {
    /// Owner pid in the container's PID namespace; 0 = free; `u32::MAX` = being reclaimed.
    pub pid: AtomicU32,
    /// Reserved, zero.
    pub _pad: AtomicU32,
    /// Bytes this process holds per device (its share of `reserved_bytes`).
    pub used_bytes: [AtomicU64; MAX_DEVICES],
}

/// The whole region.
#[repr(C)]
#[derive(Debug)]
pub struct Region {
    /// Header.
    pub header: Header,
    /// Process slots.
    pub slots: [Slot; MAX_PROCS],
}

/// Size of the mapped file, bytes.
pub const REGION_SIZE: usize = std::mem::size_of::<Region>();

const _: () = {
    assert!(
        std::mem::size_of::<Header>()
            == 8 + 4 + 4 + 8 * 16 + 4 * 16 + 8 * 16 + 8 * 16 + 4 * 16 + 4 * 16 + 4 + 4 + 8 + 8
    );
    assert!(std::mem::size_of::<Slot>() == 8 + 8 * MAX_DEVICES);
    assert!(REGION_SIZE == std::mem::size_of::<Header>() + MAX_PROCS * std::mem::size_of::<Slot>());
};

/// Why a region cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The magic is not (yet) written.
    #[error("shared region not initialised (magic {0:#x})")]
    NotInitialised(u64),
    /// Another layout version.
    #[error("shared region layout version {0}, expected {REGION_VERSION}")]
    Version(u32),
    /// A device count beyond [`MAX_DEVICES`].
    #[error("shared region device count {0} exceeds {MAX_DEVICES}")]
    DeviceCount(u32),
    /// Every process slot is taken by a live process.
    #[error("all {MAX_PROCS} process slots of the shared region are in use")]
    NoSlot,
    /// A trusted limits file that cannot be used (what is wrong with it).
    #[error("trusted limits file: {0}")]
    InvalidLimits(String),
}

/// File name suffix of a container's trusted limits file: for the region directory
/// `<regions_dir>/<pod UID>_<container>` the device plugin writes `<regions_dir>/<pod UID>_<container>`
/// + [`LIMITS_SUFFIX`], beside the directory (never inside it: the directory is the tenant's).
pub const LIMITS_SUFFIX: &str = ".limits";

/// Where the trusted limits file appears in the container (a read-only bind mount of the host file).
pub const CONTAINER_LIMITS_FILE: &str = "/usr/local/vgpu/limits";

/// Version of the trusted limits format. Version 2: `memory_bytes` 0 means nothing may be allocated
/// (version 1 read it as unlimited; a version-1 reader refuses a version-2 file and fails closed).
pub const LIMITS_VERSION: u32 = 2;

/// Largest trusted limits file accepted, bytes (16 devices of UUID and numbers fit in 2 KiB).
pub const LIMITS_MAX_BYTES: usize = 16 * 1024;

/// What the interceptor does when the container's shared region cannot be used (missing directory,
/// unreadable or foreign file). Chosen by the operator (agent config
/// `device_plugin.on_region_error`) and carried in the trusted limits file, never taken from the
/// tenant's environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionFailure {
    /// Refuse every device-memory allocation with `CUDA_ERROR_OUT_OF_MEMORY` (the default).
    #[default]
    Closed,
    /// Let the process run, holding itself alone to the trusted limits (a private region: the other
    /// processes of the container and the agent's kernel view are not counted).
    Open,
}

/// `nvidia.com/priority` 0: high. A container of high priority that is active on a GPU suspends the
/// kernel launches of lower-priority containers on that GPU (HAMi's semantics, `CUDA_TASK_PRIORITY`).
pub const PRIORITY_HIGH: u32 = 0;

/// `nvidia.com/priority` 1: low, HAMi's default.
pub const PRIORITY_LOW: u32 = 1;

fn default_priority() -> u32 {
    PRIORITY_LOW
}

/// One device of a container, in container order (the order of `NVIDIA_VISIBLE_DEVICES`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLimit {
    /// The physical GPU's UUID (`GPU-…`, as NVML and `cuDeviceGetUuid` name it).
    pub uuid: String,
    /// Device-memory limit, bytes. There is no "unlimited": every decided device has an amount, and 0
    /// means nothing may be allocated on it.
    pub memory_bytes: u64,
    /// SM limit, percent of the GPU's SMs (0 or 100: no throttling).
    pub sm_percent: u32,
}

/// The limits the device plugin decided for one container: the trusted source the interceptor and the
/// agent's kernel hard limit read. JSON, written by the agent at Allocate (mode 0444, owned by the
/// agent's user) beside the tenant-writable region directory and bind-mounted read-only at
/// [`CONTAINER_LIMITS_FILE`]; the container cannot change it, unlike the region header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedLimits {
    /// [`LIMITS_VERSION`].
    pub version: u32,
    /// The container's devices in container order: device `i` of the region is `devices[i]`.
    pub devices: Vec<DeviceLimit>,
    /// What the interceptor does when the region cannot be used.
    #[serde(default)]
    pub on_region_error: RegionFailure,
    /// The container's task priority, [`PRIORITY_HIGH`] or [`PRIORITY_LOW`] (the default).
    #[serde(default = "default_priority")]
    pub priority: u32,
}

impl TrustedLimits {
    /// Parses and checks a trusted limits file: version, at most [`MAX_DEVICES`] devices, non-empty
    /// distinct UUIDs, SM percent ≤ 100, priority 0 or 1, at most [`LIMITS_MAX_BYTES`] bytes.
    ///
    /// # Errors
    /// [`RegionError::InvalidLimits`] naming what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self, RegionError> {
        let bad = |detail: String| RegionError::InvalidLimits(detail);
        if bytes.len() > LIMITS_MAX_BYTES {
            return Err(bad(format!("{} bytes, at most {LIMITS_MAX_BYTES}", bytes.len())));
        }
        let l: Self = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if l.version != LIMITS_VERSION {
            return Err(bad(format!("version {}, expected {LIMITS_VERSION}", l.version)));
        }
        if l.devices.len() > MAX_DEVICES {
            return Err(bad(format!("{} devices, at most {MAX_DEVICES}", l.devices.len())));
        }
        if l.priority > PRIORITY_LOW {
            return Err(bad(format!("priority {}, expected 0 or 1", l.priority)));
        }
        for (i, d) in l.devices.iter().enumerate() {
            if d.uuid.is_empty() || l.devices[..i].iter().any(|o| o.uuid == d.uuid) {
                return Err(bad(format!("device {i}: empty or repeated UUID {:?}", d.uuid)));
            }
            if d.sm_percent > 100 {
                return Err(bad(format!("device {i}: SM limit {} % above 100", d.sm_percent)));
            }
        }
        Ok(l)
    }

    /// The JSON text of the file (what [`TrustedLimits::parse`] reads back).
    #[must_use]
    pub fn to_json(&self) -> String {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Memory limit per container device, bytes.
    #[must_use]
    pub fn memory_limits(&self) -> Vec<u64> {
        self.devices.iter().map(|d| d.memory_bytes).collect()
    }

    /// SM limit per container device, percent.
    #[must_use]
    pub fn sm_limits(&self) -> Vec<u32> {
        self.devices.iter().map(|d| d.sm_percent).collect()
    }

    /// The container index of the GPU named `uuid` (case-insensitive).
    #[must_use]
    pub fn index_of(&self, uuid: &str) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.uuid.eq_ignore_ascii_case(uuid))
    }
}

/// The `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form of a 16-byte `CUuuid` (what NVML and
/// `nvidia-smi -L` print for the same GPU).
#[must_use]
pub fn gpu_uuid_string(bytes: &[u8; 16]) -> String {
    let mut s = String::with_capacity(40);
    s.push_str("GPU-");
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An allocation refused because it would exceed the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// The device's limit, bytes.
    pub limit: u64,
    /// What the container held (the larger of the reservations and the kernel's view), bytes.
    pub used: u64,
    /// What was asked, bytes.
    pub requested: u64,
}

impl Region {
    /// Initialises a zeroed region (the creator does this once, before anyone else maps it).
    /// `limits` in bytes ([`UNLIMITED`] for none, 0 for nothing) and `sm` in percent, per device;
    /// devices beyond `limits` get [`UNLIMITED`]; the magic is written last.
    pub fn init(&self, limits: &[u64], sm: &[u32]) {
        let n = limits.len().min(MAX_DEVICES);
        for (i, slot) in self.header.limit_bytes.iter().enumerate() {
            slot.store(limits.get(i).copied().unwrap_or(UNLIMITED), Ordering::Relaxed);
            self.header.sm_limit_percent[i].store(sm.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        self.header.version.store(REGION_VERSION, Ordering::Relaxed);
        self.header
            .device_count
            .store(u32::try_from(n).unwrap_or(0), Ordering::Relaxed);
        self.header.magic.store(REGION_MAGIC, Ordering::Release);
    }

    /// Checks magic, version and device count.
    ///
    /// # Errors
    /// See [`RegionError`].
    pub fn validate(&self) -> Result<(), RegionError> {
        let magic = self.header.magic.load(Ordering::Acquire);
        if magic != REGION_MAGIC {
            return Err(RegionError::NotInitialised(magic));
        }
        let v = self.header.version.load(Ordering::Relaxed);
        if v != REGION_VERSION {
            return Err(RegionError::Version(v));
        }
        let n = self.header.device_count.load(Ordering::Relaxed);
        if n as usize > MAX_DEVICES {
            return Err(RegionError::DeviceCount(n));
        }
        Ok(())
    }

    /// Devices in use.
    #[must_use]
    pub fn device_count(&self) -> usize {
        (self.header.device_count.load(Ordering::Relaxed) as usize).min(MAX_DEVICES)
    }

    /// The limit of `dev`, bytes ([`UNLIMITED`] for none, and for a device beyond [`MAX_DEVICES`]).
    #[must_use]
    pub fn limit(&self, dev: usize) -> u64 {
        self.header
            .limit_bytes
            .get(dev)
            .map_or(UNLIMITED, |l| l.load(Ordering::Relaxed))
    }

    /// The SM limit of `dev`, percent (0 = none).
    #[must_use]
    pub fn sm_limit(&self, dev: usize) -> u32 {
        self.header
            .sm_limit_percent
            .get(dev)
            .map_or(0, |l| l.load(Ordering::Relaxed))
    }

    /// What the container holds on `dev`: the larger of the reservations and the kernel's view, bytes.
    #[must_use]
    pub fn used(&self, dev: usize) -> u64 {
        let reserved = self
            .header
            .reserved_bytes
            .get(dev)
            .map_or(0, |r| r.load(Ordering::Acquire));
        let kernel = self
            .header
            .kernel_used_bytes
            .get(dev)
            .map_or(0, |r| r.load(Ordering::Acquire));
        reserved.max(kernel)
    }

    /// The slot of `pid`, taking a free one if it has none. A process that takes a slot first reclaims
    /// the slots and reservations of dead processes (per `alive`), so memory of a process killed with
    /// SIGKILL (no exit handler ran) is returned as soon as any process of the container starts, not
    /// only when an allocation is refused.
    ///
    /// # Errors
    /// [`RegionError::NoSlot`] when every slot belongs to a live process.
    pub fn attach(&self, pid: u32, alive: impl Fn(u32) -> bool) -> Result<usize, RegionError> {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.pid.load(Ordering::Acquire) == pid)
        {
            return Ok(i);
        }
        self.reclaim_dead(&alive);
        for (i, s) in self.slots.iter().enumerate() {
            if s.pid
                .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Threads of one process may attach at the same time, each taking a slot: the
                // lowest slot of the pid wins and the others are given back before anyone used them
                // (reservations made through one slot and released through another leaked).
                let first = self
                    .slots
                    .iter()
                    .position(|s| s.pid.load(Ordering::Acquire) == pid)
                    .unwrap_or(i);
                if first != i {
                    s.pid.store(0, Ordering::Release);
                }
                return Ok(first);
            }
        }
        Err(RegionError::NoSlot)
    }

    /// Reserves `bytes` on `dev` for the process in `slot`, atomically against every other process:
    /// succeeds only if the container's usage (reservations, or the kernel's view when larger) plus
    /// `bytes` stays within the limit. On a refusal, the reservations of dead processes are reclaimed
    /// and the check is repeated once.
    ///
    /// # Errors
    /// [`OverLimit`] when the allocation would exceed the limit.
    pub fn try_reserve(
        &self,
        slot: usize,
        dev: usize,
        bytes: u64,
        alive: impl Fn(u32) -> bool,
    ) -> Result<(), OverLimit> {
        self.try_reserve_within(slot, dev, bytes, self.limit(dev), alive)
    }

    /// [`Region::try_reserve`] against `limit` (bytes, [`UNLIMITED`] for none, 0 refuses every
    /// non-empty request) instead of the header's limit:
    /// the interceptor passes the limit of the trusted limits file, so a tenant that rewrites the
    /// header's limits gains nothing.
    ///
    /// # Errors
    /// [`OverLimit`] when the allocation would exceed `limit`.
    pub fn try_reserve_within(
        &self,
        slot: usize,
        dev: usize,
        bytes: u64,
        limit: u64,
        alive: impl Fn(u32) -> bool,
    ) -> Result<(), OverLimit> {
        let (Some(reserved), Some(s)) = (self.header.reserved_bytes.get(dev), self.slots.get(slot)) else {
            return Err(OverLimit {
                limit: 0,
                used: 0,
                requested: bytes,
            });
        };
        let mut reclaimed = false;
        loop {
            let before = reserved.fetch_add(bytes, Ordering::AcqRel);
            let kernel = self.header.kernel_used_bytes[dev].load(Ordering::Acquire);
            let used = before.max(kernel);
            if used.checked_add(bytes).is_some_and(|t| t <= limit) {
                s.used_bytes[dev].fetch_add(bytes, Ordering::AcqRel);
                return Ok(());
            }
            reserved.fetch_sub(bytes, Ordering::AcqRel);
            if !reclaimed && self.reclaim_dead(&alive) > 0 {
                reclaimed = true;
                continue;
            }
            return Err(OverLimit {
                limit,
                used,
                requested: bytes,
            });
        }
    }

    /// Returns `bytes` on `dev` reserved by the process in `slot` (saturating at what it holds).
    pub fn release(&self, slot: usize, dev: usize, bytes: u64) {
        let (Some(reserved), Some(s)) = (self.header.reserved_bytes.get(dev), self.slots.get(slot)) else {
            return;
        };
        let mut held = s.used_bytes[dev].load(Ordering::Acquire);
        loop {
            let take = held.min(bytes);
            match s.used_bytes[dev].compare_exchange(held, held - take, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    reserved.fetch_sub(take, Ordering::AcqRel);
                    return;
                }
                Err(now) => held = now,
            }
        }
    }

    /// Frees the slots of dead processes and returns their reservations. Returns how many slots.
    pub fn reclaim_dead(&self, alive: impl Fn(u32) -> bool) -> usize {
        let mut n = 0;
        for s in &self.slots {
            let pid = s.pid.load(Ordering::Acquire);
            if pid == 0 || pid == u32::MAX || alive(pid) {
                continue;
            }
            if s.pid
                .compare_exchange(pid, u32::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            for (dev, used) in s.used_bytes.iter().enumerate() {
                let u = used.swap(0, Ordering::AcqRel);
                self.header.reserved_bytes[dev].fetch_sub(u, Ordering::AcqRel);
            }
            s.pid.store(0, Ordering::Release);
            n += 1;
        }
        n
    }

    /// Frees the slot of an exiting process and returns its reservations.
    pub fn detach(&self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            for (dev, used) in s.used_bytes.iter().enumerate() {
                let u = used.swap(0, Ordering::AcqRel);
                self.header.reserved_bytes[dev].fetch_sub(u, Ordering::AcqRel);
            }
            s.pid.store(0, Ordering::Release);
        }
    }

    /// The container's cgroup id (0: not yet known).
    #[must_use]
    pub fn cgroup_id(&self) -> u64 {
        self.header.cgroup_id.load(Ordering::Acquire)
    }

    /// Records the container's cgroup id.
    pub fn set_cgroup_id(&self, id: u64) {
        self.header.cgroup_id.store(id, Ordering::Release);
    }

    /// Whether launches on `dev` are suspended (a higher-priority container is active on its GPU).
    #[must_use]
    pub fn suspended(&self, dev: usize) -> bool {
        self.header
            .suspended
            .get(dev)
            .is_some_and(|s| s.load(Ordering::Acquire) != 0)
    }

    /// Whether any device is suspended.
    #[must_use]
    pub fn any_suspended(&self) -> bool {
        self.header.suspended_any.load(Ordering::Acquire) != 0
    }

    /// Written by the agent: which devices are suspended (container order; missing ones are not).
    pub fn set_suspended(&self, devices: &[bool]) {
        let mut any = false;
        for (i, flag) in self.header.suspended.iter().enumerate() {
            let on = devices.get(i).copied().unwrap_or(false);
            any |= on;
            flag.store(u32::from(on), Ordering::Release);
        }
        self.header.suspended_any.store(u32::from(any), Ordering::Release);
    }

    /// Written by the agent: the device memory the kernel attributed to the container, bytes.
    pub fn set_kernel_used(&self, dev: usize, bytes: u64, now_ns: u64) {
        if let Some(k) = self.header.kernel_used_bytes.get(dev) {
            k.store(bytes, Ordering::Release);
            self.header.kernel_updated_ns.store(now_ns, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zeroed region on the heap (what a fresh `ftruncate`d file maps to).
    fn zeroed() -> Box<Region> {
        let layout = std::alloc::Layout::new::<Region>();
        #[allow(
            unsafe_code,
            reason = "a zeroed Region is valid: every field is an integer atomic"
        )]
        // SAFETY: the layout is Region's and all-zero bytes are a valid Region.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout).cast::<Region>();
            assert!(!p.is_null());
            Box::from_raw(p)
        }
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn uninitialised_and_foreign_regions_are_refused() {
        let r = zeroed();
        assert_eq!(r.validate(), Err(RegionError::NotInitialised(0)));
        r.init(&[GIB], &[30]);
        assert_eq!(r.validate(), Ok(()));
        // A version-1 region (whose zero limits meant "unlimited") is refused.
        r.header.version.store(1, Ordering::Relaxed);
        assert_eq!(r.validate(), Err(RegionError::Version(1)));
    }

    #[test]
    fn threads_of_one_process_attaching_at_once_share_one_slot() {
        // Found by the interceptor's threads test in CI: two threads attached two slots, a
        // reservation made through one was released through the other, and 3 MiB leaked.
        for _ in 0..200 {
            let r = zeroed();
            r.init(&[GIB], &[0]);
            let start = std::sync::Barrier::new(8);
            let slots: Vec<usize> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..8)
                    .map(|_| {
                        sc.spawn(|| {
                            start.wait();
                            r.attach(4242, |_| true).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(slots.iter().all(|s| *s == slots[0]), "{slots:?}");
            let owned = r
                .slots
                .iter()
                .filter(|s| s.pid.load(Ordering::Relaxed) == 4242)
                .count();
            assert_eq!(owned, 1);
        }
    }

    #[test]
    fn two_processes_share_one_limit_c13() {
        // C13: 1 GiB limit; A holds 600 MiB; B's 600 MiB is refused; after A exits, B succeeds.
        let r = zeroed();
        r.init(&[GIB], &[0]);
        let a = r.attach(100, |_| true).unwrap();
        let b = r.attach(200, |_| true).unwrap();
        assert_ne!(a, b);
        assert!(r.try_reserve(a, 0, 600 * MIB, |_| true).is_ok());
        let e = r.try_reserve(b, 0, 600 * MIB, |_| true).unwrap_err();
        assert_eq!((e.limit, e.used, e.requested), (GIB, 600 * MIB, 600 * MIB));
        // A dies without freeing: its reservation is reclaimed on B's next attempt.
        assert!(r.try_reserve(b, 0, 600 * MIB, |pid| pid != 100).is_ok());
        assert_eq!(r.used(0), 600 * MIB);
        assert_eq!(r.slots[a].pid.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_killed_process_is_reclaimed_when_the_next_one_attaches() {
        let r = zeroed();
        r.init(&[GIB], &[0]);
        let a = r.attach(100, |_| true).unwrap();
        assert!(r.try_reserve(a, 0, 600 * MIB, |_| true).is_ok());
        // A is killed with SIGKILL: no detach. B attaching returns A's slot and memory at once.
        let b = r.attach(200, |pid| pid != 100).unwrap();
        assert_eq!(r.used(0), 0);
        assert_eq!(
            r.slots[a].pid.load(Ordering::Relaxed),
            if a == b { 200 } else { 0 }
        );
        assert!(r.try_reserve(b, 0, GIB, |pid| pid != 100).is_ok());
    }

    #[test]
    fn kernel_view_counts_when_larger() {
        let r = zeroed();
        r.init(&[GIB], &[0]);
        let a = r.attach(1, |_| true).unwrap();
        // The kernel saw 900 MiB (context memory, raw ioctls) although nothing was reserved.
        r.set_kernel_used(0, 900 * MIB, 1);
        assert!(r.try_reserve(a, 0, 200 * MIB, |_| true).is_err());
        assert!(r.try_reserve(a, 0, 100 * MIB, |_| true).is_ok());
    }

    #[test]
    fn release_saturates_and_unlimited_devices_only_count() {
        let r = zeroed();
        r.init(&[UNLIMITED, GIB], &[0, 0]);
        let a = r.attach(1, |_| true).unwrap();
        assert!(
            r.try_reserve(a, 0, 100 * GIB, |_| true).is_ok(),
            "device 0 is unlimited"
        );
        r.release(a, 0, 200 * GIB);
        assert_eq!(r.used(0), 0);
        assert!(
            r.try_reserve(a, 7, 1, |_| true).is_ok(),
            "a device without a limit"
        );
        assert!(
            r.try_reserve(a, MAX_DEVICES, 1, |_| true).is_err(),
            "out of range"
        );
    }

    #[test]
    fn c29_a_zero_limit_refuses_everything_and_is_never_unlimited() {
        let r = zeroed();
        r.init(&[0, GIB], &[0, 0]);
        assert_eq!(r.limit(0), 0);
        assert_eq!(r.limit(2), UNLIMITED, "devices beyond the limits are not limited");
        let a = r.attach(1, |_| true).unwrap();
        let e = r.try_reserve(a, 0, 1, |_| true).unwrap_err();
        assert_eq!((e.limit, e.used, e.requested), (0, 0, 1));
        assert!(r.try_reserve(a, 0, 100 * GIB, |_| true).is_err());
        assert!(
            r.try_reserve_within(a, 1, MIB, 0, |_| true).is_err(),
            "a zero trusted limit"
        );
        assert_eq!(r.used(0), 0);
        // An empty request changes nothing and is not an allocation.
        assert!(r.try_reserve(a, 0, 0, |_| true).is_ok());
    }

    #[test]
    fn a_scribbled_header_limit_does_not_raise_the_trusted_limit() {
        let r = zeroed();
        r.init(&[GIB], &[0]);
        let a = r.attach(1, |_| true).unwrap();
        // The tenant writes 100 GiB into the header; the interceptor reserves against the trusted 1 GiB.
        r.header.limit_bytes[0].store(100 * GIB, Ordering::Relaxed);
        assert!(
            r.try_reserve(a, 0, 2 * GIB, |_| true).is_ok(),
            "the header alone is tenant-writable"
        );
        r.release(a, 0, 2 * GIB);
        let e = r.try_reserve_within(a, 0, 2 * GIB, GIB, |_| true).unwrap_err();
        assert_eq!((e.limit, e.used), (GIB, 0));
        assert!(r.try_reserve_within(a, 0, GIB, GIB, |_| true).is_ok());
    }

    #[test]
    fn trusted_limits_round_trip_and_strict_parsing() {
        let l = TrustedLimits {
            version: LIMITS_VERSION,
            devices: vec![
                DeviceLimit {
                    uuid: "GPU-b".into(),
                    memory_bytes: 3000 * MIB,
                    sm_percent: 30,
                },
                DeviceLimit {
                    uuid: "GPU-a".into(),
                    memory_bytes: 5000 * MIB,
                    sm_percent: 0,
                },
            ],
            on_region_error: RegionFailure::Open,
            priority: PRIORITY_HIGH,
        };
        let back = TrustedLimits::parse(l.to_json().as_bytes()).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.memory_limits(), [3000 * MIB, 5000 * MIB]);
        assert_eq!(back.index_of("gpu-A"), Some(1));
        // Defaults to fail-closed when the field is absent.
        let closed = TrustedLimits::parse(br#"{"version":2,"devices":[]}"#).unwrap();
        assert_eq!(closed.on_region_error, RegionFailure::Closed);
        assert_eq!(closed.priority, PRIORITY_LOW, "HAMi's default");
        for bad in [
            &br#"{"version":1,"devices":[]}"#[..],
            br#"{"version":3,"devices":[]}"#,
            br#"{"version":2,"devices":[],"extra":1}"#,
            br#"{"version":2,"devices":[{"uuid":"","memory_bytes":1,"sm_percent":0}]}"#,
            br#"{"version":2,"devices":[{"uuid":"a","memory_bytes":1,"sm_percent":101}]}"#,
            br#"{"version":2,"devices":[{"uuid":"a","memory_bytes":1,"sm_percent":0},{"uuid":"a","memory_bytes":1,"sm_percent":0}]}"#,
            br#"{"version":2,"devices":[{"uuid":"a","memory_bytes":-1,"sm_percent":0}]}"#,
            br#"{"version":2,"devices":[],"on_region_error":"maybe"}"#,
            br#"{"version":2,"devices":[],"priority":2}"#,
            b"not json",
        ] {
            assert!(
                matches!(TrustedLimits::parse(bad), Err(RegionError::InvalidLimits(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let uuid = [0xfa, 0x4e, 0, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(gpu_uuid_string(&uuid), "GPU-fa4e0000-0000-4000-8000-000000000002");
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let r = zeroed();
        r.init(&[100 * MIB], &[0]);
        let r: &Region = &r;
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8u32 {
                let granted = &granted;
                s.spawn(move || {
                    let slot = r.attach(1000 + t, |_| true).unwrap();
                    for _ in 0..1000 {
                        if r.try_reserve(slot, 0, 3 * MIB, |_| true).is_ok() {
                            granted.fetch_add(1, Ordering::Relaxed);
                            assert!(
                                r.header.reserved_bytes[0].load(Ordering::Relaxed) <= 100 * MIB + 8 * 3 * MIB
                            );
                            r.release(slot, 0, 3 * MIB);
                        }
                    }
                    // Hold as much as possible at the end.
                    while r.try_reserve(slot, 0, 3 * MIB, |_| true).is_ok() {}
                });
            }
        });
        // 33 × 3 MiB = 99 MiB fit in 100 MiB; never 34.
        let held: u64 = r
            .slots
            .iter()
            .map(|s| s.used_bytes[0].load(Ordering::Relaxed))
            .sum();
        assert_eq!(held, 33 * 3 * MIB);
        assert_eq!(r.used(0), held);
        assert!(granted.load(Ordering::Relaxed) > 0);
    }
}
