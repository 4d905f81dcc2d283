//! The simulated device model: N GPUs, the RM object tree (clients → devices → subdevices → memory),
//! per-process device-memory accounting, failure injection, and ground-truth snapshots. Pure: no I/O.
//!
//! Handles look like the real driver's: clients from `0xC1D00001` (`RS_CLIENT_HANDLE_BASE`), RM-chosen
//! object handles from `0xCAF00000` (`RS_UNIQUE_HANDLE_BASE`). Errors are `NV_STATUS` codes.
//!
//! Managed (unified) memory is kept apart from the RM object tree: on the real driver
//! `cuMemAllocManaged` creates a UVM range (`mmap` of `/dev/nvidia-uvm`) with no RM memory object and no
//! RM ioctl, and NVML's per-process and used-memory figures do not include it
//! (`reference/nvidia-driver-abi.md` §7). So a [`ManagedAllocation`] never counts in `used_bytes` or in
//! [`GroundTruth::bytes`]; it is reported on its own ([`GroundTruth::managed`],
//! [`GpuTruth::managed_bytes`]) and goes when the file it was registered through is closed (the UVM fd
//! of the real driver).
//!
//! ## Utilisation and SM-seconds
//!
//! A kernel launch ([`DeviceModel::launch`]) asks for a share of a GPU's SMs (1–100 %) from the
//! moment it is recorded for a fixed duration; launches are never queued. At any instant the model
//! grants each process `min(100, Σ its running launches' percent)` (its *demand*, what
//! [`GpuTruth::sm_util_by_pid`] reports), and when the demands of all processes add up to more than
//! 100 % every process is scaled down by the same factor `100 / Σ demands`, so the shares *granted*
//! add up to [`GpuTruth::sm_util_percent`] (= `min(100, Σ demands)`). A process's SM-seconds are the
//! time integral of its granted share divided by 100 ([`GpuTruth::sm_seconds_by_pid`]): one second
//! of a whole GPU is one SM-second.
//!
//! Each GPU keeps the launches of at least the last [`SM_HISTORY_NS`] (up to
//! [`SM_HISTORY_MAX_LAUNCHES`] finished ones) in an [`SmHistory`], from which the SM-seconds of any
//! window inside the retained history can be computed exactly (the fake NVML's per-process
//! utilisation samples do that). What is trimmed from the history is first folded into per-process
//! accumulators, so the cumulative figures never lose anything.

use std::collections::BTreeMap;

use hami_api::GpuDevice;
use serde::{Deserialize, Serialize};

use crate::abi::{class, status};

/// One MiB.
pub const MIB: u64 = 1 << 20;
const CLIENT_HANDLE_BASE: u32 = 0xC1D0_0001;
const UNIQUE_HANDLE_BASE: u32 = 0xCAF0_0000;

/// An `NV_STATUS` code other than `NV_OK`.
pub type NvStatus = u32;

/// Who opened the control device: the allocating process (tgid) and the open file it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Thread-group id (the process) of the caller, as RM records it.
    pub tgid: u32,
    /// The open file (FUSE file handle) the client was allocated through; closing it frees the client.
    pub fd: u64,
}

/// How a device-memory object was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocPath {
    /// `NV_ESC_RM_ALLOC` with class `NV01_MEMORY_LOCAL_USER`.
    RmAlloc,
    /// `NV_ESC_RM_VID_HEAP_CONTROL` / `NVOS32_FUNCTION_ALLOC_SIZE`.
    VidHeap,
}

/// What an allocation request carries besides the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectParams {
    /// `NV01_DEVICE_0`: `NV0080_ALLOC_PARAMETERS.deviceId`.
    Device {
        /// RM device instance (= GPU index here).
        device_id: u32,
    },
    /// `NV20_SUBDEVICE_0`: `subDeviceId`.
    Subdevice {
        /// Subdevice index (only 0 exists: no SLI).
        sub_device_id: u32,
    },
    /// A memory object of `bytes`; counted as device memory when `vidmem`.
    Memory {
        /// Size in bytes.
        bytes: u64,
        /// Physical vidmem (class 0x40) rather than sysmem or a VA reservation.
        vidmem: bool,
        /// The path it came through.
        path: AllocPath,
    },
    /// Any other class: an object with no accounting.
    Other,
}

#[derive(Debug, Clone)]
enum Kind {
    Device {
        gpu: u32,
    },
    Subdevice {
        gpu: u32,
    },
    Memory {
        gpu: Option<u32>,
        bytes: u64,
        vidmem: bool,
        path: AllocPath,
    },
    Other {
        gpu: Option<u32>,
    },
}

#[derive(Debug, Clone)]
struct Object {
    parent: u32,
    class: u32,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct Client {
    owner: Owner,
    objects: BTreeMap<u32, Object>,
}

/// A live managed range, with the open file it was registered through.
#[derive(Debug, Clone)]
struct Managed {
    owner: Owner,
    gpu: u32,
    bytes: u64,
    address: u64,
}

/// How far back, at least, each GPU's launch history reaches: 10 s, in nanoseconds of the model
/// clock (NVML callers poll every second or faster). The history is trimmed back to this when it spans
/// twice as much. Kept short because every ground-truth read serialises the history.
pub const SM_HISTORY_NS: u64 = 10 * 1_000_000_000;
/// The most finished launches a GPU's history keeps: past this, the oldest-ending are folded into
/// the accumulators until half of it is left (running launches are always kept).
pub const SM_HISTORY_MAX_LAUNCHES: usize = 2_000;

/// One kernel launch: `pid` asked for `sm_percent` of the GPU's SMs over `[start_ns, end_ns)` (model
/// clock, nanoseconds since the node's clock epoch). `end_ns` lies in the future while it runs; it is
/// cut to the moment the process lost its last RM client when its kernels died with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRecord {
    /// Launching process (tgid).
    pub pid: u32,
    /// Share of the SMs asked for, percent (1..=100).
    pub sm_percent: u32,
    /// Start, ns of the model clock.
    pub start_ns: u64,
    /// End (exclusive), ns of the model clock.
    pub end_ns: u64,
}

/// A GPU's bounded launch history plus what was trimmed from it: enough to compute every process's
/// SM-seconds up to any time at or after `settled_ns`, and between two such times.
///
/// SM-seconds follow the granting rule of the [module documentation](self): per process
/// `min(100, Σ percent)`, all processes scaled by `100 / Σ` when they ask for more than 100 % together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmHistory {
    /// Up to this model time (ns) SM-seconds are folded into `settled_sm_seconds`; launches that
    /// ended by then are gone from `launches`.
    pub settled_ns: u64,
    /// SM-seconds per pid granted from the clock epoch to `settled_ns`.
    pub settled_sm_seconds: BTreeMap<u32, f64>,
    /// Launches still running at, or ending after, `settled_ns`, in start order.
    pub launches: Vec<LaunchRecord>,
}

impl SmHistory {
    /// Adds to `into` the SM-seconds each pid is granted over `[from_ns, to_ns)` by the launches held
    /// here (a sweep over their starts and ends: O(n log n)).
    fn integrate(&self, from_ns: u64, to_ns: u64, into: &mut BTreeMap<u32, f64>) {
        if to_ns <= from_ns {
            return;
        }
        // (time, pid, +percent or -percent)
        let mut events: Vec<(u64, u32, i64)> = Vec::new();
        for l in &self.launches {
            let (s, e) = (l.start_ns.max(from_ns), l.end_ns.min(to_ns));
            if s < e {
                events.push((s, l.pid, i64::from(l.sm_percent)));
                events.push((e, l.pid, -i64::from(l.sm_percent)));
            }
        }
        events.sort_unstable_by_key(|&(t, _, _)| t);
        let mut demand: BTreeMap<u32, i64> = BTreeMap::new();
        let mut t = from_ns;
        let mut i = 0;
        while let Some(&(at, _, _)) = events.get(i) {
            if at > t && !demand.is_empty() {
                add_granted(&demand, at - t, into);
            }
            t = at;
            while let Some(&(_, pid, d)) = events.get(i).filter(|e| e.0 == at) {
                let e = demand.entry(pid).or_insert(0);
                *e += d;
                if *e <= 0 {
                    demand.remove(&pid);
                }
                i += 1;
            }
        }
    }

    /// SM-seconds per pid granted over the window `(from_ns, to_ns]` of the model clock (pids with
    /// none are absent). Exact for `from_ns == 0` (the clock epoch, before any launch) and for
    /// `from_ns >= settled_ns`; a window reaching back into trimmed history is clipped to start at
    /// `settled_ns` (what was granted before that cannot be told apart any more).
    #[must_use]
    pub fn sm_seconds_between(&self, from_ns: u64, to_ns: u64) -> BTreeMap<u32, f64> {
        let mut m = BTreeMap::new();
        if from_ns == 0 {
            m.clone_from(&self.settled_sm_seconds);
        }
        self.integrate(from_ns.max(self.settled_ns), to_ns, &mut m);
        m.retain(|_, s| *s > 0.0);
        m
    }

    /// Folds everything before `cut_ns` into the accumulators and drops the launches that ended by
    /// then.
    fn settle(&mut self, cut_ns: u64) {
        if cut_ns <= self.settled_ns {
            return;
        }
        let mut acc = std::mem::take(&mut self.settled_sm_seconds);
        self.integrate(self.settled_ns, cut_ns, &mut acc);
        self.settled_sm_seconds = acc;
        self.settled_ns = cut_ns;
        self.launches.retain(|l| l.end_ns > cut_ns);
    }

    /// Keeps the history within its bounds at model time `now_ns` (cheap unless a bound is hit).
    ///
    /// Cuts fall on launch starts or ends only, so settling splits no interval the sums are made of:
    /// the floating-point additions are the same before and after, and cumulative figures stay
    /// bit-for-bit monotonic.
    fn trim(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.settled_ns) >= 2 * SM_HISTORY_NS {
            let horizon = now_ns - SM_HISTORY_NS;
            let cut = self
                .launches
                .iter()
                .flat_map(|l| [l.start_ns, l.end_ns])
                .filter(|&t| t > self.settled_ns && t <= horizon)
                .max();
            if let Some(cut) = cut {
                self.settle(cut);
            }
        }
        if self.launches.len() > SM_HISTORY_MAX_LAUNCHES {
            let mut ends: Vec<u64> = self
                .launches
                .iter()
                .map(|l| l.end_ns)
                .filter(|&e| e <= now_ns)
                .collect();
            ends.sort_unstable();
            let excess = self.launches.len() - SM_HISTORY_MAX_LAUNCHES / 2;
            if let Some(&cut) = ends.get(excess.min(ends.len()).saturating_sub(1)) {
                self.settle(cut);
            }
        }
    }
}

/// Adds `dt_ns` of the granted shares for these per-pid demands (Σ percent of running launches).
fn add_granted(demand: &BTreeMap<u32, i64>, dt_ns: u64, into: &mut BTreeMap<u32, f64>) {
    let capped = |d: i64| d.clamp(0, 100) as f64;
    let total: f64 = demand.values().map(|&d| capped(d)).sum();
    let scale = if total > 100.0 { 100.0 / total } else { 1.0 };
    let seconds = dt_ns as f64 / 1e9;
    for (&pid, &d) in demand {
        *into.entry(pid).or_insert(0.0) += capped(d) * scale / 100.0 * seconds;
    }
}

#[derive(Debug, Clone)]
struct Gpu {
    device: GpuDevice,
    used_bytes: u64,
    lost: bool,
    xids: Vec<u32>,
    history: SmHistory,
    launches_by_pid: BTreeMap<u32, u64>,
}

impl Gpu {
    fn total_bytes(&self) -> u64 {
        self.device.memory_mib.saturating_mul(MIB)
    }
}

/// The whole simulated node's device state.
#[derive(Debug, Clone)]
pub struct DeviceModel {
    gpus: Vec<Gpu>,
    clients: BTreeMap<u32, Client>,
    managed: Vec<Managed>,
    next_client: u32,
    next_handle: u32,
    now_ns: u64,
    epoch_unix_ns: u64,
}

/// One GPU in a ground-truth snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuTruth {
    /// Index (= RM device instance = `/dev/nvidiaN` minor).
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Physical memory, bytes.
    pub total_bytes: u64,
    /// Device memory held by live vidmem objects, bytes (what NVML reports as used; managed memory is
    /// not in it).
    pub used_bytes: u64,
    /// Managed (unified) memory registered for this GPU, bytes; not in `used_bytes`.
    #[serde(default)]
    pub managed_bytes: u64,
    /// NUMA node of the GPU (`hami_api::GpuDevice::numa`), `None` when the platform reports none.
    #[serde(default)]
    pub numa: Option<u32>,
    /// Injected "fallen off the bus".
    pub lost: bool,
    /// Injected XID codes, oldest first.
    pub xids: Vec<u32>,
    /// SM utilisation now, percent: the shares of the running launches, capped at 100.
    pub sm_util_percent: u32,
    /// Per-process SM utilisation now, percent (each process's running shares, capped at 100): its
    /// demand, before the GPU-wide scaling of the [module documentation](self).
    pub sm_util_by_pid: BTreeMap<u32, u32>,
    /// Kernel launches so far, per process.
    pub launches_by_pid: BTreeMap<u32, u64>,
    /// Cumulative SM-seconds per process since the node's clock epoch, up to the moment of the
    /// snapshot: the integral of the share of the SMs the process was *granted* (its
    /// demand, scaled down with every other process's when they ask for more than 100 % together),
    /// divided by 100, over time in seconds; running launches count up to now. Never decreases, and
    /// survives history trimming and the process's exit.
    #[serde(default)]
    pub sm_seconds_by_pid: BTreeMap<u32, f64>,
    /// The launch history behind `sm_seconds_by_pid` (bounded, see [`SmHistory`]): what the fake
    /// NVML computes per-process utilisation samples of arbitrary windows from.
    #[serde(default)]
    pub sm_history: SmHistory,
}

/// One live device-memory allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Allocating process (tgid).
    pub pid: u32,
    /// GPU index.
    pub gpu: u32,
    /// RM client handle.
    pub client: u32,
    /// RM memory handle.
    pub handle: u32,
    /// Bytes.
    pub bytes: u64,
    /// How it was allocated.
    pub path: AllocPath,
}

/// One live managed (unified) memory range (`cuMemAllocManaged`): no RM object stands behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedAllocation {
    /// Allocating process (tgid).
    pub pid: u32,
    /// GPU index of the allocating context.
    pub gpu: u32,
    /// Bytes.
    pub bytes: u64,
    /// The managed pointer (virtual address in the allocating process).
    pub address: u64,
}

/// What the fake driver really holds at one moment: what tests compare attribution against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Every GPU.
    pub gpus: Vec<GpuTruth>,
    /// Every live vidmem allocation, by (client, handle).
    pub allocations: Vec<Allocation>,
    /// Live RM clients: handle → owning pid.
    pub clients: BTreeMap<u32, u32>,
    /// Every live managed range, by (pid, address); none of it is in `allocations` or `used_bytes`.
    #[serde(default)]
    pub managed: Vec<ManagedAllocation>,
    /// The wall-clock time (`CLOCK_REALTIME`, nanoseconds since the Unix epoch) of the model clock's 0,
    /// as the serving process measured it when its clock started; 0 when nobody set it (a model used
    /// in-process without [`crate::fs`]). Wall time of model time `t` = `clock_epoch_unix_ns + t`.
    #[serde(default)]
    pub clock_epoch_unix_ns: u64,
}

impl GroundTruth {
    /// Device memory held by `pid` on `gpu`, bytes.
    #[must_use]
    pub fn bytes(&self, pid: u32, gpu: u32) -> u64 {
        self.allocations
            .iter()
            .filter(|a| a.pid == pid && a.gpu == gpu)
            .map(|a| a.bytes)
            .sum()
    }

    /// Managed memory registered by `pid` on `gpu`, bytes (not part of [`GroundTruth::bytes`]).
    #[must_use]
    pub fn managed_bytes(&self, pid: u32, gpu: u32) -> u64 {
        self.managed
            .iter()
            .filter(|m| m.pid == pid && m.gpu == gpu)
            .map(|m| m.bytes)
            .sum()
    }

    /// Device memory held per pid on `gpu`.
    #[must_use]
    pub fn bytes_per_pid(&self, gpu: u32) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for a in self.allocations.iter().filter(|a| a.gpu == gpu) {
            *m.entry(a.pid).or_insert(0) += a.bytes;
        }
        m
    }
}

impl DeviceModel {
    /// A node with these GPUs (their `index` must be 0..N in order).
    #[must_use]
    pub fn new(gpus: Vec<GpuDevice>) -> Self {
        Self {
            gpus: gpus
                .into_iter()
                .map(|device| Gpu {
                    device,
                    used_bytes: 0,
                    lost: false,
                    xids: Vec::new(),
                    history: SmHistory::default(),
                    launches_by_pid: BTreeMap::new(),
                })
                .collect(),
            clients: BTreeMap::new(),
            managed: Vec::new(),
            next_client: CLIENT_HANDLE_BASE,
            next_handle: UNIQUE_HANDLE_BASE,
            now_ns: 0,
            epoch_unix_ns: 0,
        }
    }

    /// Advances the model's clock (nanoseconds since the node's clock epoch; never goes back). The
    /// utilisation model is evaluated at this time, and launch histories are trimmed to their bounds.
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        for g in &mut self.gpus {
            g.history.trim(self.now_ns);
        }
    }

    /// Records the wall-clock time (`CLOCK_REALTIME`, ns since the Unix epoch) of model time 0, for
    /// [`GroundTruth::clock_epoch_unix_ns`].
    pub fn set_clock_epoch_unix_ns(&mut self, unix_ns: u64) {
        self.epoch_unix_ns = unix_ns;
    }

    /// A kernel launch by `pid` on `gpu` asking for `sm_percent` of its SMs (clamped to 1..=100) for
    /// `duration_ns` from now (no queueing: what it is granted follows the rule of the
    /// [module documentation](self)). A zero duration counts as a launch and occupies nothing.
    ///
    /// # Errors
    /// `NV_ERR_INVALID_ARGUMENT` for an unknown GPU, `NV_ERR_GPU_IS_LOST` for a lost one.
    pub fn launch(&mut self, pid: u32, gpu: u32, sm_percent: u32, duration_ns: u64) -> Result<(), NvStatus> {
        let now = self.now_ns;
        let g = self
            .gpus
            .get_mut(gpu as usize)
            .ok_or(status::NV_ERR_INVALID_ARGUMENT)?;
        if g.lost {
            return Err(status::NV_ERR_GPU_IS_LOST);
        }
        if duration_ns > 0 {
            g.history.launches.push(LaunchRecord {
                pid,
                sm_percent: sm_percent.clamp(1, 100),
                start_ns: now,
                end_ns: now.saturating_add(duration_ns),
            });
            g.history.trim(now);
        }
        *g.launches_by_pid.entry(pid).or_insert(0) += 1;
        Ok(())
    }

    /// `n` identical GPUs of `memory_mib` each, with deterministic UUIDs.
    #[must_use]
    pub fn uniform(n: u32, memory_mib: u64) -> Self {
        Self::new(
            (0..n)
                .map(|i| {
                    let mut d = GpuDevice::new(
                        format!("GPU-fa4e0000-0000-4000-8000-{i:012x}"),
                        i,
                        "NVIDIA H100 80GB HBM3 (simulated)",
                        memory_mib,
                    );
                    d.sm_count = 132;
                    d.numa = Some(0);
                    d
                })
                .collect(),
        )
    }

    /// Number of GPUs.
    #[must_use]
    pub fn gpu_count(&self) -> u32 {
        u32::try_from(self.gpus.len()).unwrap_or(u32::MAX)
    }

    /// The static description of GPU `index`.
    #[must_use]
    pub fn device(&self, index: u32) -> Option<&GpuDevice> {
        self.gpus.get(index as usize).map(|g| &g.device)
    }

    /// `(total, free)` bytes of GPU `index`.
    #[must_use]
    pub fn memory_info(&self, index: u32) -> Option<(u64, u64)> {
        self.gpus
            .get(index as usize)
            .map(|g| (g.total_bytes(), g.total_bytes().saturating_sub(g.used_bytes)))
    }

    /// Records an XID event on a GPU (it stays usable). Returns false for an unknown GPU.
    pub fn inject_xid(&mut self, gpu: u32, code: u32) -> bool {
        self.gpus
            .get_mut(gpu as usize)
            .map(|g| g.xids.push(code))
            .is_some()
    }

    /// Marks a GPU lost (every later allocation on it fails with `NV_ERR_GPU_IS_LOST`) or back.
    pub fn set_lost(&mut self, gpu: u32, lost: bool) -> bool {
        self.gpus.get_mut(gpu as usize).map(|g| g.lost = lost).is_some()
    }

    fn pick_handle(&mut self) -> u32 {
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        h
    }

    /// `NV01_ROOT_CLIENT`: a new client owned by `owner`. `requested` 0 lets RM pick.
    ///
    /// # Errors
    /// `NV_ERR_INSERT_DUPLICATE_NAME` when the requested handle is taken.
    pub fn alloc_client(&mut self, owner: Owner, requested: u32) -> Result<u32, NvStatus> {
        let h = if requested == 0 {
            while self.clients.contains_key(&self.next_client) {
                self.next_client = self.next_client.wrapping_add(1);
            }
            let h = self.next_client;
            self.next_client = self.next_client.wrapping_add(1);
            h
        } else {
            requested
        };
        if self.clients.contains_key(&h) {
            return Err(status::NV_ERR_INSERT_DUPLICATE_NAME);
        }
        self.clients.insert(
            h,
            Client {
                owner,
                objects: BTreeMap::new(),
            },
        );
        Ok(h)
    }

    /// The GPU an object (or its nearest device ancestor) belongs to.
    #[must_use]
    pub fn gpu_of(&self, client: u32, handle: u32) -> Option<u32> {
        let c = self.clients.get(&client)?;
        match &c.objects.get(&handle)?.kind {
            Kind::Device { gpu } | Kind::Subdevice { gpu } => Some(*gpu),
            Kind::Memory { gpu, .. } | Kind::Other { gpu } => *gpu,
        }
    }

    /// Allocates an object of `class` under `parent` in `client`. `requested` 0 lets RM pick.
    ///
    /// # Errors
    /// The `NV_STATUS` the driver would put in the struct.
    pub fn alloc_object(
        &mut self,
        client: u32,
        parent: u32,
        requested: u32,
        h_class: u32,
        params: ObjectParams,
    ) -> Result<u32, NvStatus> {
        let c = self.clients.get(&client).ok_or(status::NV_ERR_INVALID_CLIENT)?;
        if requested != 0 && (c.objects.contains_key(&requested) || requested == client) {
            return Err(status::NV_ERR_INSERT_DUPLICATE_NAME);
        }
        let parent_kind = if parent == client {
            None
        } else {
            Some(
                c.objects
                    .get(&parent)
                    .ok_or(status::NV_ERR_INVALID_OBJECT_PARENT)?
                    .kind
                    .clone(),
            )
        };
        let kind = match params {
            ObjectParams::Device { device_id } => {
                if parent_kind.is_some() {
                    return Err(status::NV_ERR_INVALID_OBJECT_PARENT);
                }
                if device_id >= self.gpu_count() {
                    return Err(status::NV_ERR_INVALID_ARGUMENT);
                }
                Kind::Device { gpu: device_id }
            }
            ObjectParams::Subdevice { sub_device_id } => match parent_kind {
                Some(Kind::Device { gpu }) if sub_device_id == 0 => Kind::Subdevice { gpu },
                Some(Kind::Device { .. }) => return Err(status::NV_ERR_INVALID_ARGUMENT),
                _ => return Err(status::NV_ERR_INVALID_OBJECT_PARENT),
            },
            ObjectParams::Memory { bytes, vidmem, path } => {
                let gpu = match parent_kind {
                    Some(Kind::Device { gpu } | Kind::Subdevice { gpu }) => gpu,
                    _ => return Err(status::NV_ERR_INVALID_OBJECT_PARENT),
                };
                if bytes == 0 {
                    return Err(status::NV_ERR_INVALID_ARGUMENT);
                }
                let g = self
                    .gpus
                    .get_mut(gpu as usize)
                    .ok_or(status::NV_ERR_INVALID_ARGUMENT)?;
                if g.lost {
                    return Err(status::NV_ERR_GPU_IS_LOST);
                }
                if vidmem {
                    let free = g.total_bytes().saturating_sub(g.used_bytes);
                    if bytes > free {
                        return Err(status::NV_ERR_NO_MEMORY);
                    }
                    g.used_bytes += bytes;
                }
                Kind::Memory {
                    gpu: Some(gpu),
                    bytes,
                    vidmem,
                    path,
                }
            }
            ObjectParams::Other => {
                let gpu = match parent_kind {
                    None => None,
                    Some(Kind::Device { gpu } | Kind::Subdevice { gpu }) => Some(gpu),
                    Some(Kind::Memory { gpu, .. } | Kind::Other { gpu }) => gpu,
                };
                Kind::Other { gpu }
            }
        };
        let h = if requested == 0 {
            self.pick_handle()
        } else {
            requested
        };
        if let Some(c) = self.clients.get_mut(&client) {
            c.objects.insert(
                h,
                Object {
                    parent,
                    class: h_class,
                    kind,
                },
            );
        }
        Ok(h)
    }

    /// `NV_ESC_RM_FREE`: frees `handle` and its descendants; `handle == client` frees the client.
    ///
    /// # Errors
    /// `NV_ERR_INVALID_CLIENT` or `NV_ERR_OBJECT_NOT_FOUND`.
    pub fn free(&mut self, client: u32, handle: u32) -> Result<(), NvStatus> {
        if handle == client {
            let c = self
                .clients
                .remove(&client)
                .ok_or(status::NV_ERR_INVALID_CLIENT)?;
            for o in c.objects.values() {
                self.uncharge(o);
            }
            return Ok(());
        }
        let c = self
            .clients
            .get_mut(&client)
            .ok_or(status::NV_ERR_INVALID_CLIENT)?;
        if !c.objects.contains_key(&handle) {
            return Err(status::NV_ERR_OBJECT_NOT_FOUND);
        }
        // Collect the subtree rooted at `handle`.
        let mut doomed = vec![handle];
        let mut i = 0;
        while i < doomed.len() {
            let p = doomed[i];
            doomed.extend(c.objects.iter().filter(|(_, o)| o.parent == p).map(|(h, _)| *h));
            i += 1;
        }
        let removed: Vec<Object> = doomed.iter().filter_map(|h| c.objects.remove(h)).collect();
        for o in &removed {
            self.uncharge(o);
        }
        Ok(())
    }

    fn uncharge(&mut self, o: &Object) {
        if let Kind::Memory {
            gpu: Some(gpu),
            bytes,
            vidmem: true,
            ..
        } = o.kind
            && let Some(g) = self.gpus.get_mut(gpu as usize)
        {
            g.used_bytes = g.used_bytes.saturating_sub(bytes);
        }
    }

    /// Registers a managed range of `bytes` at `address` for the process and open file of `owner`, on
    /// `gpu`. Nothing is charged to the GPU (managed memory can oversubscribe it, and the real driver
    /// backs it through UVM, not RM).
    ///
    /// # Errors
    /// `NV_ERR_INVALID_ARGUMENT` for an unknown GPU, 0 bytes or an address the process already has
    /// registered; `NV_ERR_GPU_IS_LOST` for a lost GPU.
    pub fn alloc_managed(
        &mut self,
        owner: Owner,
        gpu: u32,
        bytes: u64,
        address: u64,
    ) -> Result<(), NvStatus> {
        let g = self
            .gpus
            .get(gpu as usize)
            .ok_or(status::NV_ERR_INVALID_ARGUMENT)?;
        if g.lost {
            return Err(status::NV_ERR_GPU_IS_LOST);
        }
        if bytes == 0
            || self
                .managed
                .iter()
                .any(|m| m.owner.tgid == owner.tgid && m.address == address)
        {
            return Err(status::NV_ERR_INVALID_ARGUMENT);
        }
        self.managed.push(Managed {
            owner,
            gpu,
            bytes,
            address,
        });
        Ok(())
    }

    /// Forgets the managed range of process `pid` at `address` (`cuMemFree` of a managed pointer).
    ///
    /// # Errors
    /// `NV_ERR_OBJECT_NOT_FOUND` when the process has no managed range there.
    pub fn free_managed(&mut self, pid: u32, address: u64) -> Result<(), NvStatus> {
        let i = self
            .managed
            .iter()
            .position(|m| m.owner.tgid == pid && m.address == address)
            .ok_or(status::NV_ERR_OBJECT_NOT_FOUND)?;
        self.managed.remove(i);
        Ok(())
    }

    /// Closing an open file frees every RM client allocated through it (what the driver does on close
    /// or process exit, without any ioctl) and every managed range registered through it. A process
    /// left with no client also stops occupying SMs (its contexts are gone: its running launches end
    /// now). Returns how many clients went.
    pub fn release_fd(&mut self, fd: u64) -> usize {
        self.managed.retain(|m| m.owner.fd != fd);
        let gone: Vec<(u32, u32)> = self
            .clients
            .iter()
            .filter(|(_, c)| c.owner.fd == fd)
            .map(|(h, c)| (*h, c.owner.tgid))
            .collect();
        for (h, _) in &gone {
            let _ = self.free(*h, *h);
        }
        let now = self.now_ns;
        for (_, pid) in &gone {
            if !self.clients.values().any(|c| c.owner.tgid == *pid) {
                for g in &mut self.gpus {
                    for l in g.history.launches.iter_mut().filter(|l| l.pid == *pid) {
                        l.end_ns = l.end_ns.min(now);
                    }
                }
            }
        }
        gone.len()
    }

    /// The open file a client was allocated through (`None` for an unknown client).
    #[must_use]
    pub fn client_fd(&self, client: u32) -> Option<u64> {
        self.clients.get(&client).map(|c| c.owner.fd)
    }

    /// Whether `client` exists.
    #[must_use]
    pub fn has_client(&self, client: u32) -> bool {
        self.clients.contains_key(&client)
    }

    /// The class of an object.
    #[must_use]
    pub fn class_of(&self, client: u32, handle: u32) -> Option<u32> {
        if handle == client {
            return self
                .clients
                .contains_key(&client)
                .then_some(class::NV01_ROOT_CLIENT);
        }
        self.clients.get(&client)?.objects.get(&handle).map(|o| o.class)
    }

    /// What is allocated now.
    #[must_use]
    pub fn snapshot(&self) -> GroundTruth {
        let now = self.now_ns;
        let gpus = self
            .gpus
            .iter()
            .map(|g| {
                let mut by_pid: BTreeMap<u32, u32> = BTreeMap::new();
                for l in g.history.launches.iter().filter(|l| l.end_ns > now) {
                    let e = by_pid.entry(l.pid).or_insert(0);
                    *e = (*e + l.sm_percent).min(100);
                }
                (g, by_pid)
            })
            .map(|(g, by_pid)| GpuTruth {
                index: g.device.index,
                uuid: g.device.uuid.clone(),
                model: g.device.model.clone(),
                total_bytes: g.total_bytes(),
                used_bytes: g.used_bytes,
                managed_bytes: self
                    .managed
                    .iter()
                    .filter(|m| m.gpu == g.device.index)
                    .map(|m| m.bytes)
                    .sum(),
                numa: g.device.numa,
                lost: g.lost,
                xids: g.xids.clone(),
                sm_util_percent: by_pid.values().sum::<u32>().min(100),
                sm_util_by_pid: by_pid,
                launches_by_pid: g.launches_by_pid.clone(),
                sm_seconds_by_pid: g.history.sm_seconds_between(0, now),
                sm_history: g.history.clone(),
            })
            .collect();
        let mut allocations = Vec::new();
        for (&ch, c) in &self.clients {
            for (&h, o) in &c.objects {
                if let Kind::Memory {
                    gpu: Some(gpu),
                    bytes,
                    vidmem: true,
                    path,
                } = o.kind
                {
                    allocations.push(Allocation {
                        pid: c.owner.tgid,
                        gpu,
                        client: ch,
                        handle: h,
                        bytes,
                        path,
                    });
                }
            }
        }
        let clients = self.clients.iter().map(|(h, c)| (*h, c.owner.tgid)).collect();
        let managed = self
            .managed
            .iter()
            .map(|m| ManagedAllocation {
                pid: m.owner.tgid,
                gpu: m.gpu,
                bytes: m.bytes,
                address: m.address,
            })
            .collect();
        GroundTruth {
            gpus,
            allocations,
            clients,
            managed,
            clock_epoch_unix_ns: self.epoch_unix_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner = Owner { tgid: 100, fd: 1 };

    fn setup(m: &mut DeviceModel, gpu: u32) -> (u32, u32) {
        let c = m.alloc_client(OWNER, 0).unwrap();
        let d = m
            .alloc_object(
                c,
                c,
                0,
                class::NV01_DEVICE_0,
                ObjectParams::Device { device_id: gpu },
            )
            .unwrap();
        (c, d)
    }

    fn vidmem(bytes: u64) -> ObjectParams {
        ObjectParams::Memory {
            bytes,
            vidmem: true,
            path: AllocPath::RmAlloc,
        }
    }

    #[test]
    fn launches_occupy_sm_shares_for_their_duration() {
        let mut m = DeviceModel::uniform(2, 1024);
        m.tick(1_000);
        m.launch(7, 0, 30, 500).unwrap();
        m.launch(7, 0, 50, 2_000).unwrap();
        m.launch(8, 0, 40, 2_000).unwrap();
        let t = m.snapshot();
        assert_eq!(t.gpus[0].sm_util_percent, 100, "capped");
        assert_eq!(t.gpus[0].sm_util_by_pid, BTreeMap::from([(7, 80), (8, 40)]));
        assert_eq!(t.gpus[0].launches_by_pid, BTreeMap::from([(7, 2), (8, 1)]));
        assert_eq!(t.gpus[1].sm_util_percent, 0);
        m.tick(1_600);
        assert_eq!(
            m.snapshot().gpus[0].sm_util_by_pid,
            BTreeMap::from([(7, 50), (8, 40)])
        );
        m.tick(5_000);
        let t = m.snapshot();
        assert_eq!(t.gpus[0].sm_util_percent, 0);
        assert_eq!(t.gpus[0].launches_by_pid[&7], 2, "counts stay");
        m.tick(10);
        assert_eq!(
            m.snapshot().gpus[0].sm_util_percent,
            0,
            "the clock never goes back"
        );
        assert!(m.set_lost(1, true));
        assert_eq!(m.launch(7, 1, 10, 10), Err(status::NV_ERR_GPU_IS_LOST));
        assert_eq!(m.launch(7, 9, 10, 10), Err(status::NV_ERR_INVALID_ARGUMENT));
    }

    const S: u64 = 1_000_000_000;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn sm(m: &DeviceModel, gpu: usize, pid: u32) -> f64 {
        m.snapshot().gpus[gpu]
            .sm_seconds_by_pid
            .get(&pid)
            .copied()
            .unwrap_or(0.0)
    }

    #[test]
    fn sm_seconds_of_sequential_and_concurrent_launches_follow_the_granted_shares() {
        let mut m = DeviceModel::uniform(2, 1024);
        // Sequential: pid 7 at 50 % for 2 s, then pid 8 at 100 % for 1 s.
        m.tick(S);
        m.launch(7, 0, 50, 2 * S).unwrap();
        m.tick(3 * S);
        m.launch(8, 0, 100, S).unwrap();
        m.tick(5 * S);
        assert!(close(sm(&m, 0, 7), 1.0), "{}", sm(&m, 0, 7));
        assert!(close(sm(&m, 0, 8), 1.0), "{}", sm(&m, 0, 8));
        // Concurrent: pid 7 asks 60 %, pid 8 asks 70 % + 50 % (its demand caps at 100 %). Together
        // 160 %: both are scaled by 100/160, so 7 gets 37.5 % and 8 gets 62.5 % for 1 s.
        m.tick(10 * S);
        m.launch(7, 0, 60, S).unwrap();
        m.launch(8, 0, 70, S).unwrap();
        m.launch(8, 0, 50, S).unwrap();
        let t = m.snapshot();
        assert_eq!(t.gpus[0].sm_util_by_pid, BTreeMap::from([(7, 60), (8, 100)]));
        assert_eq!(t.gpus[0].sm_util_percent, 100);
        m.tick(12 * S);
        assert!(close(sm(&m, 0, 7), 1.375), "{}", sm(&m, 0, 7));
        assert!(close(sm(&m, 0, 8), 1.625), "{}", sm(&m, 0, 8));
        // Together they never exceed one GPU: 1 + 1 + 1 SM-seconds over the three busy seconds.
        let total: f64 = m.snapshot().gpus[0].sm_seconds_by_pid.values().sum();
        assert!(close(total, 3.0), "{total}");
        // Under 100 % together nothing is scaled; other GPUs are apart.
        m.launch(7, 1, 30, S).unwrap();
        m.launch(8, 1, 20, S).unwrap();
        // (Within twice SM_HISTORY_NS of the start, so nothing is trimmed from the windows below.)
        m.tick(15 * S);
        assert!(close(sm(&m, 1, 7), 0.3));
        assert!(close(sm(&m, 1, 8), 0.2));
        assert!(close(sm(&m, 0, 7), 1.375), "GPU 0 unchanged");
        // Windows of the history.
        let h = &m.snapshot().gpus[0].sm_history;
        let w = h.sm_seconds_between(2 * S, 11 * S);
        assert!(close(w[&7], 0.5 + 0.375), "{w:?}");
        assert!(close(w[&8], 1.0 + 0.625), "{w:?}");
        assert!(h.sm_seconds_between(5 * S, 10 * S).is_empty(), "idle window");
    }

    #[test]
    fn a_running_launch_counts_up_to_now_and_ends_with_its_process() {
        let mut m = DeviceModel::uniform(1, 1024);
        setup(&mut m, 0);
        m.launch(100, 0, 40, 10 * S).unwrap();
        m.tick(S * 5 / 2);
        assert!(close(sm(&m, 0, 100), 1.0), "{}", sm(&m, 0, 100));
        m.tick(5 * S);
        let at_five = sm(&m, 0, 100);
        assert!(close(at_five, 2.0), "{at_five}");
        // The process's last client goes: its kernels die now; what it had stays.
        assert_eq!(m.release_fd(OWNER.fd), 1);
        m.tick(8 * S);
        assert_eq!(sm(&m, 0, 100), at_five, "nothing more, nothing lost");
        assert_eq!(m.snapshot().gpus[0].sm_util_percent, 0);
    }

    #[test]
    fn trimming_the_history_loses_no_sm_seconds() {
        let mut m = DeviceModel::uniform(1, 1024);
        // Past the launch-count bound: 10 % for 1 ms, back to back, 1.5 × the bound.
        let n = SM_HISTORY_MAX_LAUNCHES * 3 / 2;
        let mut t = 0;
        let mut last = 0.0;
        for i in 0..n {
            m.launch(1, 0, 10, 1_000_000).unwrap();
            t += 1_000_000;
            m.tick(t);
            if i % 1000 == 999 {
                let now = m.gpus[0].history.sm_seconds_between(0, t)[&1];
                assert!(now >= last, "cumulative, never decreasing");
                last = now;
            }
        }
        let h = &m.gpus[0].history;
        assert!(
            h.launches.len() <= SM_HISTORY_MAX_LAUNCHES,
            "{}",
            h.launches.len()
        );
        assert!(h.settled_ns > 0, "trimmed");
        let want = n as f64 * 0.1 * 0.001;
        assert!((sm(&m, 0, 1) - want).abs() < 1e-9, "{} vs {want}", sm(&m, 0, 1));

        // Past the time bound: an old launch goes, its seconds stay, bit for bit.
        let mut m = DeviceModel::uniform(1, 1024);
        m.launch(2, 0, 50, S).unwrap();
        m.tick(100 * S);
        m.launch(3, 0, 20, 1000 * S).unwrap();
        m.tick(200 * S);
        let before = m.snapshot().gpus[0].sm_seconds_by_pid.clone();
        m.tick(300 * S);
        let h = &m.gpus[0].history;
        assert_eq!(
            h.settled_ns,
            100 * S,
            "cut at the last launch edge before now - SM_HISTORY_NS"
        );
        assert_eq!(h.launches.len(), 1, "only the running launch is left");
        let after = m.snapshot().gpus[0].sm_seconds_by_pid.clone();
        assert_eq!(after[&2], before[&2], "bit for bit");
        assert!(close(after[&2], 0.5));
        assert!(close(after[&3], 40.0), "{}", after[&3]);
        // A window reaching into the trimmed part is clipped to what is kept; from 0 it is exact.
        let h = &m.snapshot().gpus[0].sm_history;
        assert!(!h.sm_seconds_between(S / 2, 300 * S).contains_key(&2));
        assert!(close(h.sm_seconds_between(0, 300 * S)[&2], 0.5));
        // The long launch is settled once it has ended and aged.
        m.tick(1100 * S + SM_HISTORY_NS + 1);
        assert!(m.gpus[0].history.launches.is_empty());
        assert!(close(sm(&m, 0, 3), 200.0), "{}", sm(&m, 0, 3));
        assert!(close(sm(&m, 0, 2), 0.5));
    }

    #[test]
    fn handles_look_like_the_real_driver() {
        let mut m = DeviceModel::uniform(2, 1024);
        let (c, d) = setup(&mut m, 1);
        assert_eq!(c, 0xC1D0_0001);
        assert_eq!(d, 0xCAF0_0000);
        assert_eq!(m.gpu_of(c, d), Some(1));
    }

    #[test]
    fn accounting_follows_alloc_and_free() {
        let mut m = DeviceModel::uniform(2, 1024);
        let (c, d) = setup(&mut m, 1);
        let h = m
            .alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(64 * MIB))
            .unwrap();
        let t = m.snapshot();
        assert_eq!(t.bytes(100, 1), 64 * MIB);
        assert_eq!(t.bytes(100, 0), 0);
        assert_eq!(t.gpus[1].used_bytes, 64 * MIB);
        assert_eq!(m.memory_info(1), Some((1024 * MIB, 960 * MIB)));
        m.free(c, h).unwrap();
        assert_eq!(m.snapshot().gpus[1].used_bytes, 0);
        assert_eq!(m.free(c, h), Err(status::NV_ERR_OBJECT_NOT_FOUND));
    }

    #[test]
    fn over_capacity_is_no_memory_and_nothing_is_charged() {
        let mut m = DeviceModel::uniform(1, 100);
        let (c, d) = setup(&mut m, 0);
        m.alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(60 * MIB))
            .unwrap();
        assert_eq!(
            m.alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(60 * MIB)),
            Err(status::NV_ERR_NO_MEMORY)
        );
        assert_eq!(m.snapshot().gpus[0].used_bytes, 60 * MIB);
        // Sysmem does not count against the GPU.
        let sys = ObjectParams::Memory {
            bytes: 500 * MIB,
            vidmem: false,
            path: AllocPath::RmAlloc,
        };
        m.alloc_object(c, d, 0, class::NV01_MEMORY_SYSTEM, sys).unwrap();
        assert_eq!(m.snapshot().allocations.len(), 1);
    }

    #[test]
    fn freeing_a_parent_or_the_client_frees_descendants() {
        let mut m = DeviceModel::uniform(1, 1024);
        let (c, d) = setup(&mut m, 0);
        let s = m
            .alloc_object(
                c,
                d,
                0,
                class::NV20_SUBDEVICE_0,
                ObjectParams::Subdevice { sub_device_id: 0 },
            )
            .unwrap();
        m.alloc_object(c, s, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB))
            .unwrap();
        m.alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB))
            .unwrap();
        m.free(c, s).unwrap();
        assert_eq!(m.snapshot().gpus[0].used_bytes, MIB);
        m.free(c, c).unwrap();
        assert_eq!(m.snapshot().gpus[0].used_bytes, 0);
        assert!(!m.has_client(c));
        assert_eq!(m.free(c, c), Err(status::NV_ERR_INVALID_CLIENT));
    }

    #[test]
    fn closing_the_fd_frees_its_clients_only() {
        let mut m = DeviceModel::uniform(1, 1024);
        let (c1, d1) = setup(&mut m, 0);
        let other = Owner { tgid: 200, fd: 2 };
        let c2 = m.alloc_client(other, 0).unwrap();
        let d2 = m
            .alloc_object(
                c2,
                c2,
                0,
                class::NV01_DEVICE_0,
                ObjectParams::Device { device_id: 0 },
            )
            .unwrap();
        m.alloc_object(c1, d1, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(3 * MIB))
            .unwrap();
        m.alloc_object(c2, d2, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(5 * MIB))
            .unwrap();
        m.launch(100, 0, 40, 1_000_000).unwrap();
        m.launch(200, 0, 30, 1_000_000).unwrap();
        assert_eq!(m.release_fd(1), 1);
        assert_eq!(
            m.snapshot().gpus[0].sm_util_by_pid,
            BTreeMap::from([(200, 30)]),
            "pid 100's kernels died"
        );
        let t = m.snapshot();
        assert_eq!(t.bytes_per_pid(0), BTreeMap::from([(200, 5 * MIB)]));
    }

    #[test]
    fn managed_memory_is_reported_apart_and_goes_with_its_file() {
        let mut m = DeviceModel::uniform(2, 100);
        let (c, d) = setup(&mut m, 1);
        m.alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(10 * MIB))
            .unwrap();
        // Oversubscription is fine: nothing is charged.
        m.alloc_managed(OWNER, 1, 500 * MIB, 0x7000).unwrap();
        m.alloc_managed(OWNER, 1, 2 * MIB, 0x9000).unwrap();
        let other = Owner { tgid: 200, fd: 2 };
        m.alloc_managed(other, 0, MIB, 0x7000).unwrap();
        assert_eq!(
            m.alloc_managed(OWNER, 1, MIB, 0x7000),
            Err(status::NV_ERR_INVALID_ARGUMENT),
            "the process already has a range there"
        );
        assert_eq!(
            m.alloc_managed(OWNER, 5, MIB, 0x1),
            Err(status::NV_ERR_INVALID_ARGUMENT)
        );
        assert_eq!(
            m.alloc_managed(OWNER, 0, 0, 0x1),
            Err(status::NV_ERR_INVALID_ARGUMENT)
        );
        let t = m.snapshot();
        assert_eq!(t.bytes(100, 1), 10 * MIB, "managed is not RM memory");
        assert_eq!(t.gpus[1].used_bytes, 10 * MIB);
        assert_eq!(t.managed_bytes(100, 1), 502 * MIB);
        assert_eq!(t.gpus[1].managed_bytes, 502 * MIB);
        assert_eq!(t.gpus[0].managed_bytes, MIB);
        assert_eq!(t.gpus[1].numa, Some(0));
        assert_eq!(m.memory_info(1), Some((100 * MIB, 90 * MIB)));
        m.free_managed(100, 0x9000).unwrap();
        assert_eq!(m.free_managed(100, 0x9000), Err(status::NV_ERR_OBJECT_NOT_FOUND));
        assert_eq!(m.snapshot().managed_bytes(100, 1), 500 * MIB);
        m.release_fd(1);
        let t = m.snapshot();
        assert_eq!(
            t.managed,
            vec![ManagedAllocation {
                pid: 200,
                gpu: 0,
                bytes: MIB,
                address: 0x7000
            }]
        );
        assert!(m.set_lost(0, true));
        assert_eq!(
            m.alloc_managed(other, 0, MIB, 0x1),
            Err(status::NV_ERR_GPU_IS_LOST)
        );
    }

    #[test]
    fn bad_parents_handles_and_lost_gpus_are_refused() {
        let mut m = DeviceModel::uniform(1, 1024);
        let (c, d) = setup(&mut m, 0);
        assert_eq!(
            m.alloc_object(c, c, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB)),
            Err(status::NV_ERR_INVALID_OBJECT_PARENT)
        );
        assert_eq!(
            m.alloc_object(
                c,
                c,
                0,
                class::NV01_DEVICE_0,
                ObjectParams::Device { device_id: 7 }
            ),
            Err(status::NV_ERR_INVALID_ARGUMENT)
        );
        assert_eq!(
            m.alloc_object(c, d, d, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB)),
            Err(status::NV_ERR_INSERT_DUPLICATE_NAME)
        );
        assert_eq!(
            m.alloc_object(0xdead, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB)),
            Err(status::NV_ERR_INVALID_CLIENT)
        );
        assert!(m.inject_xid(0, 79));
        assert!(m.set_lost(0, true));
        assert_eq!(
            m.alloc_object(c, d, 0, class::NV01_MEMORY_LOCAL_USER, vidmem(MIB)),
            Err(status::NV_ERR_GPU_IS_LOST)
        );
        let t = m.snapshot();
        assert!(t.gpus[0].lost);
        assert_eq!(t.gpus[0].xids, vec![79]);
        assert!(!m.set_lost(5, true));
    }
}
