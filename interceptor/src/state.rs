//! The process's view of the container's shared region: mapping (created by the first process of the
//! container when absent), the process slot, and what this process allocated (to release it on free).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hami_api::region::{MAX_DEVICES, REGION_SIZE, Region};

/// Whether and how this process enforces limits.
pub(crate) enum Mode {
    /// No region and no limit configured: pass everything through.
    Off,
    /// Enforcing against the region.
    On(Enforcer),
    /// Configured but unusable: refuse allocations (fail-closed), with the reason.
    Broken(String),
}

/// Enforcement state.
pub(crate) struct Enforcer {
    pub(crate) region: &'static Region,
    /// (pid << 32 | slot) of the process that attached; re-attached after a fork.
    slot: AtomicU64,
    /// Device pointers and VMM handles this process allocated: key → (device, bytes).
    allocs: Mutex<HashMap<u64, (usize, u64)>>,
    /// VMM bookkeeping: physical memory lives until it is both released and unmapped.
    vmm: Mutex<Vmm>,
}

/// Mapped ranges of VMM handles and handles released while still mapped.
#[derive(Default)]
pub(crate) struct Vmm {
    /// Mapped virtual address → handle.
    mapped: HashMap<u64, u64>,
    /// Handle → number of live mappings.
    maps: HashMap<u64, u32>,
    /// Handles released while mapped.
    released: std::collections::HashSet<u64>,
}

fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Enforcer {
    /// The slot of the calling process (attaching a forked child to its own slot).
    pub(crate) fn slot(&self) -> Option<usize> {
        let pid = std::process::id();
        let cached = self.slot.load(Ordering::Acquire);
        if cached >> 32 == u64::from(pid) {
            return usize::try_from(cached & 0xffff_ffff).ok();
        }
        let slot = self.region.attach(pid, alive).ok()?;
        self.slot
            .store((u64::from(pid) << 32) | slot as u64, Ordering::Release);
        Some(slot)
    }

    /// Pids holding a slot in the container's region (this process included).
    pub(crate) fn container_pids(&self) -> Vec<u32> {
        self.region
            .slots
            .iter()
            .map(|s| s.pid.load(Ordering::Acquire))
            .filter(|p| *p != 0 && *p != u32::MAX)
            .collect()
    }

    /// Reserves `bytes` on `dev`; `false` when over the limit (or no slot).
    pub(crate) fn reserve(&self, dev: usize, bytes: u64) -> bool {
        let Some(slot) = self.slot() else { return false };
        match self.region.try_reserve(slot, dev, bytes, alive) {
            Ok(()) => true,
            Err(e) => {
                crate::log(|| {
                    format!(
                        "device {dev}: {} bytes refused (limit {}, used {})",
                        e.requested, e.limit, e.used
                    )
                });
                false
            }
        }
    }

    /// Returns a reservation.
    pub(crate) fn unreserve(&self, dev: usize, bytes: u64) {
        if let Some(slot) = self.slot() {
            self.region.release(slot, dev, bytes);
        }
    }

    fn allocs(&self) -> MutexGuard<'_, HashMap<u64, (usize, u64)>> {
        self.allocs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an allocation (device pointer or VMM handle).
    pub(crate) fn record(&self, key: u64, dev: usize, bytes: u64) {
        self.allocs().insert(key, (dev, bytes));
    }

    /// Forgets an allocation, returning its (device, bytes).
    pub(crate) fn forget(&self, key: u64) -> Option<(usize, u64)> {
        self.allocs().remove(&key)
    }

    fn vmm(&self) -> MutexGuard<'_, Vmm> {
        self.vmm.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `cuMemMap` of `handle` at `va` succeeded.
    pub(crate) fn mapped(&self, va: u64, handle: u64) {
        let mut v = self.vmm();
        v.mapped.insert(va, handle);
        *v.maps.entry(handle).or_default() += 1;
    }

    /// `cuMemUnmap` at `va` succeeded: returns the reservation of a handle released earlier once its
    /// last mapping goes.
    pub(crate) fn unmapped(&self, va: u64) {
        let done = {
            let mut v = self.vmm();
            let Some(handle) = v.mapped.remove(&va) else {
                return;
            };
            let left = v.maps.get_mut(&handle).map_or(0, |n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == 0 {
                v.maps.remove(&handle);
            }
            (left == 0 && v.released.remove(&handle)).then_some(handle)
        };
        if let Some(handle) = done
            && let Some((dev, bytes)) = self.forget(handle)
        {
            self.unreserve(dev, bytes);
        }
    }

    /// `cuMemRelease` of `handle` succeeded: the reservation goes now, or at the last unmap.
    pub(crate) fn released(&self, handle: u64) {
        let still_mapped = {
            let mut v = self.vmm();
            let mapped = v.maps.get(&handle).is_some_and(|n| *n > 0);
            if mapped {
                v.released.insert(handle);
            }
            mapped
        };
        if !still_mapped && let Some((dev, bytes)) = self.forget(handle) {
            self.unreserve(dev, bytes);
        }
    }
}

/// Limits from the environment (HAMi names), bytes and percent per device.
fn env_limits() -> Result<(Vec<u64>, Vec<u32>, bool), String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let all = var(hami_api::env::CUDA_DEVICE_MEMORY_LIMIT);
    let mut limits = vec![0u64; MAX_DEVICES];
    let mut any = false;
    for (i, l) in limits.iter_mut().enumerate() {
        let value = var(&hami_api::env::memory_limit_var(i)).or_else(|| all.clone());
        if let Some(v) = value {
            *l = hami_api::parse_memory_limit_env(&v).map_err(|e| e.to_string())?;
            any = true;
        }
    }
    let sm = match var(hami_api::env::CUDA_DEVICE_SM_LIMIT) {
        Some(v) => hami_api::parse_sm_limit_env(&v).map_err(|e| e.to_string())?,
        None => 0,
    };
    Ok((limits, vec![sm; MAX_DEVICES], any))
}

fn map_region(path: &str, limits: &[u64], sm: &[u32]) -> Result<&'static Region, String> {
    let created = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(path);
    let (file, fresh) = match created {
        Ok(f) => {
            f.set_len(REGION_SIZE as u64)
                .map_err(|e| format!("{path}: {e}"))?;
            (f, true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))?,
            false,
        ),
        Err(e) => return Err(format!("{path}: {e}")),
    };
    // Wait for a concurrent creator to size the file.
    let deadline = Instant::now() + Duration::from_secs(5);
    while file.metadata().map(|m| m.len()).unwrap_or(0) < REGION_SIZE as u64 {
        if Instant::now() > deadline {
            return Err(format!("{path}: shorter than the region ({REGION_SIZE} bytes)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: a shared mapping of a file of at least REGION_SIZE bytes; other processes change it only
    // through atomics.
    let map = unsafe { memmap2::MmapOptions::new().len(REGION_SIZE).map_mut(&file) }
        .map_err(|e| format!("{path}: mmap: {e}"))?;
    let map: &'static mut memmap2::MmapMut = Box::leak(Box::new(map));
    // SAFETY: the mapping is page-aligned, REGION_SIZE long, lives for the process, and every field of
    // Region is an integer atomic (any bytes are a valid Region).
    let region: &'static Region = unsafe { &*map.as_ptr().cast::<Region>() };
    if fresh {
        region.init(limits, sm);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match region.validate() {
            Ok(()) => return Ok(region),
            Err(e) if Instant::now() > deadline => return Err(format!("{path}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The calling process's cgroup v2 id: its `0::<path>` entry in `/proc/self/cgroup` resolved under the
/// cgroup2 mount (in a container with a cgroup namespace, the path is `/` and the mount is the
/// container's own cgroup).
fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let root = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| mnt.to_owned())
    })?;
    let path = std::path::Path::new(&root).join(rel.trim_start_matches('/'));
    std::fs::metadata(path).ok().map(|m| m.ino())
}

extern "C" fn detach_at_exit() {
    if let Mode::On(e) = mode() {
        let cached = e.slot.load(Ordering::Acquire);
        if cached >> 32 == u64::from(std::process::id())
            && let Ok(slot) = usize::try_from(cached & 0xffff_ffff)
        {
            e.region.detach(slot);
        }
    }
}

/// The process's mode, set up on first use.
/// Where the device plugin mounts the container's region directory (HAMi's container path). A region
/// found there wins over the environment, which the tenant controls.
pub(crate) const TRUSTED_REGION_DIR: &str = "/usr/local/vgpu";

/// The region file in [`TRUSTED_REGION_DIR`], if the device plugin put exactly one there.
fn trusted_region() -> Option<String> {
    let rd = std::fs::read_dir(TRUSTED_REGION_DIR).ok()?;
    let mut found: Vec<String> = rd
        .flatten()
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.len() == REGION_SIZE as u64)
        })
        .filter_map(|e| e.path().to_str().map(str::to_owned))
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

pub(crate) fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        let path = trusted_region().or_else(|| {
            std::env::var(hami_api::env::CUDA_DEVICE_MEMORY_SHARED_CACHE)
                .ok()
                .filter(|p| !p.is_empty())
        });
        let (limits, sm, any) = match env_limits() {
            Ok(l) => l,
            Err(e) => return Mode::Broken(e),
        };
        let Some(path) = path else {
            return if any {
                Mode::Broken(format!(
                    "memory limits are set but {} is not",
                    hami_api::env::CUDA_DEVICE_MEMORY_SHARED_CACHE
                ))
            } else {
                Mode::Off
            };
        };
        match map_region(&path, &limits, &sm) {
            Ok(region) => {
                if let Some(id) = own_cgroup_id() {
                    region.set_cgroup_id(id);
                }
                // SAFETY: registering a plain extern "C" function with atexit.
                unsafe { libc::atexit(detach_at_exit) };
                Mode::On(Enforcer {
                    region,
                    slot: AtomicU64::new(u64::MAX),
                    allocs: Mutex::new(HashMap::new()),
                    vmm: Mutex::new(Vmm::default()),
                })
            }
            Err(e) => Mode::Broken(e),
        }
    })
}
