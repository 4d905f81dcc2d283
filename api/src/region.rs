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
/// Layout version.
pub const REGION_VERSION: u32 = 1;
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
    /// Device-memory limit per device, bytes; 0 means unlimited.
    pub limit_bytes: [AtomicU64; MAX_DEVICES],
    /// SM limit per device, percent of the device's SMs (1..=100; 0 or 100 means no throttling).
    pub sm_limit_percent: [AtomicU32; MAX_DEVICES],
    /// Sum of the live reservations of every process, bytes.
    pub reserved_bytes: [AtomicU64; MAX_DEVICES],
    /// Device memory the kernel attributed to the container, bytes (written by the agent).
    pub kernel_used_bytes: [AtomicU64; MAX_DEVICES],
    /// SM utilisation the agent measured for the container, percent.
    pub kernel_sm_percent: [AtomicU32; MAX_DEVICES],
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
    assert!(std::mem::size_of::<Header>() == 8 + 4 + 4 + 8 * 16 + 4 * 16 + 8 * 16 + 8 * 16 + 4 * 16 + 8 + 8);
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
    /// `limits` in bytes (0 = unlimited) and `sm` in percent, per device; the magic is written last.
    pub fn init(&self, limits: &[u64], sm: &[u32]) {
        let n = limits.len().min(MAX_DEVICES);
        for (i, l) in limits.iter().take(n).enumerate() {
            self.header.limit_bytes[i].store(*l, Ordering::Relaxed);
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

    /// The limit of `dev`, bytes (0 = unlimited).
    #[must_use]
    pub fn limit(&self, dev: usize) -> u64 {
        self.header
            .limit_bytes
            .get(dev)
            .map_or(0, |l| l.load(Ordering::Relaxed))
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

    /// The slot of `pid`, taking a free one if it has none. Slots of dead processes (per `alive`) are
    /// reclaimed when no slot is free.
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
        for round in 0..2 {
            for (i, s) in self.slots.iter().enumerate() {
                if s.pid
                    .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(i);
                }
            }
            if round == 0 {
                self.reclaim_dead(&alive);
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
        let (Some(reserved), Some(s)) = (self.header.reserved_bytes.get(dev), self.slots.get(slot)) else {
            return Err(OverLimit {
                limit: 0,
                used: 0,
                requested: bytes,
            });
        };
        let limit = self.limit(dev);
        let mut reclaimed = false;
        loop {
            let before = reserved.fetch_add(bytes, Ordering::AcqRel);
            let kernel = self.header.kernel_used_bytes[dev].load(Ordering::Acquire);
            let used = before.max(kernel);
            if limit == 0 || used.checked_add(bytes).is_some_and(|t| t <= limit) {
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
        r.header.version.store(2, Ordering::Relaxed);
        assert_eq!(r.validate(), Err(RegionError::Version(2)));
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
        r.init(&[0, GIB], &[0, 0]);
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
