//! The process's view of the container's shared region: mapping (created by the first process of the
//! container when absent), the process slot, and what this process allocated (to release it on free).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hami_api::region::{MAX_DEVICES, REGION_SIZE, Region, RegionFailure, TrustedLimits, UNLIMITED};

/// Whether and how this process enforces limits.
pub(crate) enum Mode {
    /// No region and no limit configured: pass everything through.
    Off,
    /// Enforcing against the region.
    On(Box<Enforcer>),
    /// Configured but unusable: refuse allocations (fail-closed), with the reason.
    Broken(String),
    /// Limits from the environment only, and this process carries none while the container's region
    /// (the path) does not exist yet: allocations are refused until a process with limits creates it,
    /// after which this process is held to the region's limits (peer case C27: a process without
    /// limits never creates or seeds a region).
    Waiting(String),
}

/// The limits a process enforces, per container device (the region's device index).
pub(crate) struct Limits {
    /// Bytes per device ([`UNLIMITED`] for none; 0: nothing may be allocated).
    memory: [u64; MAX_DEVICES],
    /// Percent per device (0: none).
    sm: [u32; MAX_DEVICES],
    /// GPU UUIDs in container order, from the trusted file: CUDA ordinals are mapped to container
    /// devices by UUID. `None`: ordinal = container index (HAMi's rule, for limits from the env).
    uuids: Option<Vec<String>>,
}

impl Limits {
    fn from_trusted(t: &TrustedLimits) -> Self {
        let mut l = Self {
            memory: [UNLIMITED; MAX_DEVICES],
            sm: [0; MAX_DEVICES],
            uuids: Some(t.devices.iter().map(|d| d.uuid.clone()).collect()),
        };
        for (i, d) in t.devices.iter().take(MAX_DEVICES).enumerate() {
            l.memory[i] = d.memory_bytes;
            l.sm[i] = d.sm_percent;
        }
        l
    }

    /// The limits a region holds (env mode: frozen by the region's creator).
    fn from_region(r: &Region) -> Self {
        let mut l = Self {
            memory: [UNLIMITED; MAX_DEVICES],
            sm: [0; MAX_DEVICES],
            uuids: None,
        };
        for i in 0..MAX_DEVICES {
            l.memory[i] = r.limit(i);
            l.sm[i] = r.sm_limit(i);
        }
        l
    }
}

/// Container index cache entry: not looked up yet.
const UNKNOWN: u32 = u32::MAX;
/// Container index cache entry: the driver's device is none of the container's devices.
const FOREIGN: u32 = u32::MAX - 1;

/// Enforcement state.
pub(crate) struct Enforcer {
    pub(crate) region: &'static Region,
    /// The limits enforced (trusted file, or the region's when limits come from the environment).
    limits: Limits,
    /// CUDA ordinal → container device index ([`UNKNOWN`], [`FOREIGN`]).
    ordinals: [std::sync::atomic::AtomicU32; MAX_DEVICES],
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

    /// The memory limit of container device `dev`, bytes ([`UNLIMITED`] for none).
    pub(crate) fn limit(&self, dev: usize) -> u64 {
        self.limits.memory.get(dev).copied().unwrap_or(UNLIMITED)
    }

    /// The SM limit of container device `dev`, percent (0: none).
    pub(crate) fn sm_limit(&self, dev: usize) -> u32 {
        self.limits.sm.get(dev).copied().unwrap_or(0)
    }

    /// The container device of the driver's device `ordinal` (`cuCtxGetDevice`, a `CUmemLocation`
    /// id): with trusted limits, the position of the device's UUID (`cuDeviceGetUuid`) in the trusted
    /// list, because CUDA numbers the visible GPUs in its own order (fastest first, then PCI bus), not
    /// in `NVIDIA_VISIBLE_DEVICES` order; `None` for a device that is not the container's. Without
    /// UUIDs (limits from the environment, or a driver that cannot tell), the ordinal itself.
    pub(crate) fn index(&self, ordinal: usize) -> Option<usize> {
        let Some(uuids) = &self.limits.uuids else {
            return Some(ordinal);
        };
        let cell = self.ordinals.get(ordinal)?;
        match cell.load(Ordering::Relaxed) {
            FOREIGN => return None,
            UNKNOWN => {}
            i => return usize::try_from(i).ok(),
        }
        let Some(uuid) = device_uuid(ordinal) else {
            return Some(ordinal);
        };
        let found = uuids.iter().position(|u| u.eq_ignore_ascii_case(&uuid));
        let v = found.map_or(FOREIGN, |i| u32::try_from(i).unwrap_or(FOREIGN));
        cell.store(v, Ordering::Relaxed);
        if found.is_none() {
            crate::log(|| format!("device {ordinal} ({uuid}) is not one of the container's GPUs"));
        }
        found
    }

    /// The container device of the GPU named `uuid` (NVML's answer), or `None`.
    pub(crate) fn index_of_uuid(&self, uuid: &str) -> Option<usize> {
        self.limits
            .uuids
            .as_ref()
            .and_then(|u| u.iter().position(|x| x.eq_ignore_ascii_case(uuid)))
    }

    /// The UUID of container device `dev` (trusted limits only).
    pub(crate) fn uuid(&self, dev: usize) -> Option<&str> {
        self.limits.uuids.as_ref()?.get(dev).map(String::as_str)
    }

    /// Whether devices are identified by UUID (trusted limits).
    pub(crate) fn by_uuid(&self) -> bool {
        self.limits.uuids.is_some()
    }

    /// Reserves `bytes` on container device `dev`; `false` when over the limit (or no slot).
    pub(crate) fn reserve(&self, dev: usize, bytes: u64) -> bool {
        let Some(slot) = self.slot() else { return false };
        match self
            .region
            .try_reserve_within(slot, dev, bytes, self.limit(dev), alive)
        {
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

/// The UUID of the driver's device `ordinal` (`cuDeviceGetUuid`), `GPU-…` form.
fn device_uuid(ordinal: usize) -> Option<String> {
    type GetUuid = unsafe extern "C" fn(*mut u8, std::ffi::c_int) -> crate::CUresult;
    static F: OnceLock<usize> = OnceLock::new();
    let p = *F.get_or_init(|| crate::real_symbol(c"cuDeviceGetUuid") as usize);
    if p == 0 {
        return None;
    }
    // SAFETY: the driver's cuDeviceGetUuid, whose C signature is GetUuid.
    let f = unsafe { std::mem::transmute::<usize, GetUuid>(p) };
    let mut raw = [0u8; 16];
    let dev = std::ffi::c_int::try_from(ordinal).ok()?;
    // SAFETY: a 16-byte out-buffer (CUuuid).
    let rc = unsafe { f(raw.as_mut_ptr(), dev) };
    (rc == crate::CUDA_SUCCESS).then(|| hami_api::region::gpu_uuid_string(&raw))
}

/// The trusted limits file, when the device plugin mounted one: `Ok(None)` when there is none,
/// `Err` when it is there but unreadable or invalid (the process then fails closed: the operator's
/// failure policy is in the file it cannot read).
fn trusted_limits() -> Result<Option<TrustedLimits>, String> {
    let path = hami_api::region::CONTAINER_LIMITS_FILE;
    match std::fs::read(path) {
        Ok(bytes) => TrustedLimits::parse(&bytes)
            .map(Some)
            .map_err(|e| format!("{path}: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// Logs (when asked) where the environment's limits differ from the trusted file's: the file wins.
fn compare_env(t: &TrustedLimits, env: Result<&(Vec<u64>, Vec<u32>, bool), &String>) {
    match env {
        Err(e) => crate::log(|| format!("ignoring the environment's limits ({e}): the trusted file wins")),
        Ok((mem, sm, any)) => {
            let file_mem = t.memory_limits();
            let differs = (*any
                && mem
                    .iter()
                    .enumerate()
                    .any(|(i, m)| file_mem.get(i).copied().unwrap_or(UNLIMITED) != *m))
                || t.devices.first().map_or(0, |d| d.sm_percent) != sm.first().copied().unwrap_or(0);
            if differs {
                crate::log(|| {
                    format!(
                        "environment limits {:?} / SM {:?} differ from the trusted file's {:?} / SM {:?}: the file wins",
                        &mem[..t.devices.len().max(1).min(mem.len())],
                        sm.first(),
                        file_mem,
                        t.devices.first().map(|d| d.sm_percent)
                    )
                });
            }
        }
    }
}

/// A private, process-local region (fail-open): the process holds itself to the limits alone.
fn private_region(limits: &[u64], sm: &[u32]) -> Result<&'static Region, String> {
    let map = memmap2::MmapOptions::new()
        .len(REGION_SIZE)
        .map_anon()
        .map_err(|e| format!("anonymous region: {e}"))?;
    let map: &'static mut memmap2::MmapMut = Box::leak(Box::new(map));
    // SAFETY: a zeroed, page-aligned anonymous mapping of REGION_SIZE bytes that lives for the
    // process; every field of Region is an integer atomic.
    let region: &'static Region = unsafe { &*map.as_ptr().cast::<Region>() };
    region.init(limits, sm);
    Ok(region)
}

/// Limits from the environment (HAMi names), bytes and percent per device.
fn env_limits() -> Result<(Vec<u64>, Vec<u32>, bool), String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let all = var(hami_api::env::CUDA_DEVICE_MEMORY_LIMIT);
    let mut limits = vec![UNLIMITED; MAX_DEVICES];
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

/// Maps the container's region at `path`. With `seed` (limits in bytes and SM percent per device) a
/// missing region is created, mode 0666 whatever the umask (every user of the container maps it),
/// and initialised with them; without, only an existing region is mapped (`Ok(None)`: none yet).
fn map_region(path: &str, seed: Option<(&[u64], &[u32])>) -> Result<Option<&'static Region>, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let open_existing = || OpenOptions::new().read(true).write(true).open(path);
    let (file, fresh) = match seed {
        Some(_) => match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(path)
        {
            Ok(f) => {
                f.set_permissions(std::fs::Permissions::from_mode(0o666))
                    .map_err(|e| format!("{path}: chmod: {e}"))?;
                f.set_len(REGION_SIZE as u64)
                    .map_err(|e| format!("{path}: {e}"))?;
                (f, true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (open_existing().map_err(|e| format!("{path}: {e}"))?, false)
            }
            Err(e) => return Err(format!("{path}: {e}")),
        },
        None => match open_existing() {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{path}: {e}")),
        },
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
    if fresh && let Some((limits, sm)) = seed {
        region.init(limits, sm);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match region.validate() {
            Ok(()) => return Ok(Some(region)),
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
    /// The mode of a process that waited for its region ([`Mode::Waiting`]) once the region exists.
    static LATE: OnceLock<Mode> = OnceLock::new();
    let mode = MODE.get_or_init(setup);
    let Mode::Waiting(path) = mode else {
        return mode;
    };
    if let Some(late) = LATE.get() {
        return late;
    }
    match map_region(path, None) {
        Ok(Some(region)) => LATE.get_or_init(|| {
            attach(region);
            enforcer(region, Limits::from_region(region))
        }),
        Ok(None) => mode,
        Err(e) => LATE.get_or_init(|| Mode::Broken(e)),
    }
}

fn enforcer(region: &'static Region, limits: Limits) -> Mode {
    Mode::On(Box::new(Enforcer {
        region,
        limits,
        ordinals: std::array::from_fn(|_| std::sync::atomic::AtomicU32::new(UNKNOWN)),
        slot: AtomicU64::new(u64::MAX),
        allocs: Mutex::new(HashMap::new()),
        vmm: Mutex::new(Vmm::default()),
    }))
}

fn attach(region: &'static Region) {
    if let Some(id) = own_cgroup_id() {
        region.set_cgroup_id(id);
    }
    // SAFETY: registering a plain extern "C" function with atexit.
    unsafe { libc::atexit(detach_at_exit) };
}

fn setup() -> Mode {
    let env = env_limits();
    let trusted = match trusted_limits() {
        Ok(t) => t,
        Err(e) => return Mode::Broken(e),
    };
    if let Some(t) = trusted {
        // The device plugin's limits: the region is the one in its directory, whatever the
        // environment says, and the environment's limits are ignored.
        compare_env(&t, env.as_ref());
        let path = trusted_region().unwrap_or_else(|| format!("{TRUSTED_REGION_DIR}/vgpu.cache"));
        let (mem, sm) = (t.memory_limits(), t.sm_limits());
        let limits = Limits::from_trusted(&t);
        let mapped = map_region(&path, Some((&mem, &sm)))
            .and_then(|r| r.ok_or_else(|| format!("{path}: not created")));
        return match mapped {
            Ok(region) => {
                attach(region);
                enforcer(region, limits)
            }
            Err(e) => match t.on_region_error {
                RegionFailure::Closed => Mode::Broken(format!("{e} (fail-closed)")),
                RegionFailure::Open => {
                    crate::log(|| format!("{e}: fail-open, this process alone holds itself to the limits"));
                    match private_region(&mem, &sm) {
                        Ok(region) => enforcer(region, limits),
                        Err(e2) => Mode::Broken(format!("{e}; {e2}")),
                    }
                }
            },
        };
    }
    let path = trusted_region().or_else(|| {
        std::env::var(hami_api::env::CUDA_DEVICE_MEMORY_SHARED_CACHE)
            .ok()
            .filter(|p| !p.is_empty())
    });
    let (limits, sm, any) = match env {
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
    if !any {
        // No limits of its own: held to an existing region's, never creating one (C27).
        return match map_region(&path, None) {
            Ok(Some(region)) => {
                attach(region);
                enforcer(region, Limits::from_region(region))
            }
            Ok(None) => {
                crate::log(|| format!("{path} does not exist yet and this process has no limits: waiting"));
                Mode::Waiting(path)
            }
            Err(e) => Mode::Broken(e),
        };
    }
    match map_region(&path, Some((&limits, &sm))) {
        Ok(Some(region)) => {
            attach(region);
            // The stricter of the region's and this process's limits holds, for this process and for
            // every later one (the header only ever goes down here).
            for (i, l) in limits.iter().enumerate().take(MAX_DEVICES) {
                region.header.limit_bytes[i].fetch_min(*l, Ordering::AcqRel);
            }
            // The same for SM limits, where 0 means "none": a non-zero limit replaces 0 or a larger one.
            for (i, want) in sm.iter().enumerate().take(MAX_DEVICES) {
                if *want > 0 {
                    let _ = region.header.sm_limit_percent[i].fetch_update(
                        Ordering::AcqRel,
                        Ordering::Acquire,
                        |cur| (cur == 0 || *want < cur).then_some(*want),
                    );
                }
            }
            let mut own = Limits::from_region(region);
            for (i, l) in limits.iter().enumerate().take(MAX_DEVICES) {
                own.memory[i] = own.memory[i].min(*l);
            }
            enforcer(region, own)
        }
        Ok(None) => Mode::Broken(format!("{path}: not created")),
        Err(e) => Mode::Broken(e),
    }
}
