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

/// A kernel launch occupying a share of a GPU's SMs until `end_ns`.
#[derive(Debug, Clone)]
struct Launch {
    pid: u32,
    sm_percent: u32,
    end_ns: u64,
}

#[derive(Debug, Clone)]
struct Gpu {
    device: GpuDevice,
    used_bytes: u64,
    lost: bool,
    xids: Vec<u32>,
    running: Vec<Launch>,
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
}

/// One GPU in a ground-truth snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Per-process SM utilisation now, percent (each process's running shares, capped at 100).
    pub sm_util_by_pid: BTreeMap<u32, u32>,
    /// Kernel launches so far, per process.
    pub launches_by_pid: BTreeMap<u32, u64>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
                    running: Vec::new(),
                    launches_by_pid: BTreeMap::new(),
                })
                .collect(),
            clients: BTreeMap::new(),
            managed: Vec::new(),
            next_client: CLIENT_HANDLE_BASE,
            next_handle: UNIQUE_HANDLE_BASE,
            now_ns: 0,
        }
    }

    /// Advances the model's clock (nanoseconds since the node started; never goes back). The
    /// utilisation model is evaluated at this time.
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
    }

    /// A kernel launch by `pid` on `gpu` occupying `sm_percent` of its SMs (clamped to 1..=100) for
    /// `duration_ns` from now.
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
        g.running.retain(|l| l.end_ns > now);
        let end_ns = now.saturating_add(duration_ns);
        g.running.push(Launch {
            pid,
            sm_percent: sm_percent.clamp(1, 100),
            end_ns,
        });
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
    /// left with no client also stops occupying SMs (its contexts are gone). Returns how many clients
    /// went.
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
        for (_, pid) in &gone {
            if !self.clients.values().any(|c| c.owner.tgid == *pid) {
                for g in &mut self.gpus {
                    g.running.retain(|l| l.pid != *pid);
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
                for l in g.running.iter().filter(|l| l.end_ns > now) {
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
