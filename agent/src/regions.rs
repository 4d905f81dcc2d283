//! Publishes the kernel's view into the containers' shared regions (`hami_api::region`), so the
//! interceptor enforces limits against what the kernel saw (context memory, chunk rounding, processes
//! that bypass the interceptor) and throttles on the agent's utilisation figure.
//!
//! **Task priority** (`nvidia.com/priority`, HAMi's `CUDA_TASK_PRIORITY`: 0 high, 1 low, the
//! default). At every publication, a container device is suspended while another container of higher
//! priority was active (measured SM utilisation above zero since the previous publication) on the
//! same host GPU; the interceptor then holds that container's launches on it ([`suspensions`]). This
//! is HAMi's vGPU-monitor feedback with the kernel's per-container measurement instead of the
//! tenant-written `recent_kernel` counter, and it applies whatever the containers' core limits (HAMi's
//! limiter returns before its priority check unless 0 < gpucores < 100). A container's priority comes
//! from its trusted limits file (low without one).
//!
//! The regions are files under `paths.regions_dir` (the device plugin creates one per container; any
//! depth up to 3, any name, exactly [`REGION_SIZE`] bytes). Each names its container by cgroup id
//! (written by the processes that map it).
//!
//! Limits and device identities come from the container's trusted limits file
//! (`hami_api::region::TrustedLimits`, `<region directory>.limits`, written by the device plugin at
//! Allocate beside the tenant-writable directory and mounted read-only into the container): the
//! hard limit of container device `i` is the file's `devices[i].memory_bytes`, on the host GPU whose
//! NVML UUID is `devices[i].uuid`, so a tenant that rewrites its region header changes neither. The
//! file is used only when it is a regular file (not a link) owned by root or the agent's user and
//! writable by nobody else. Without one (a region made by hand), the region header's limits are used
//! and container device `i` is taken to be the `i`-th host GPU, by index, among those the container
//! holds memory on (exact for single-GPU containers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use hami_api::region::{
    LIMITS_MAX_BYTES, LIMITS_SUFFIX, PRIORITY_LOW, REGION_SIZE, Region, TrustedLimits, UNLIMITED,
};
use hami_ebpf_common::{GPU_UNKNOWN, LimitKey};

use crate::attribution::{MemoryKind, UsageRow};

/// Host GPUs the container holds device memory on, ascending: container device `i` is the `i`-th.
#[must_use]
pub fn container_gpus(rows: &[UsageRow], cgroup_id: u64) -> Vec<u32> {
    let mut gpus: Vec<u32> = rows
        .iter()
        .filter(|r| {
            r.key.cgroup_id == cgroup_id && r.key.kind == MemoryKind::Device && r.key.gpu != GPU_UNKNOWN
        })
        .map(|r| r.key.gpu)
        .collect();
    gpus.sort_unstable();
    gpus.dedup();
    gpus
}

/// The valid regions among `maps` that name their container: (file, cgroup id, region).
fn valid_regions(
    maps: &HashMap<PathBuf, memmap2::MmapMut>,
) -> impl Iterator<Item = (&PathBuf, u64, &Region)> {
    maps.iter().filter_map(|(path, m)| {
        #[allow(unsafe_code, reason = "viewing the mapping as the region")]
        // SAFETY: page-aligned, REGION_SIZE long, lives as long as `maps`; any bytes are a valid Region
        // (integer atomics only).
        let region = unsafe { &*m.as_ptr().cast::<Region>() };
        let cg = region.cgroup_id();
        (region.validate().is_ok() && cg != 0).then_some((path, cg, region))
    })
}

/// The trusted limits file of the region file `region`: `<its directory>.limits`.
#[must_use]
pub fn trusted_limits_path(region: &Path) -> Option<PathBuf> {
    let dir = region.parent()?;
    let mut p = dir.as_os_str().to_owned();
    p.push(LIMITS_SUFFIX);
    Some(PathBuf::from(p))
}

/// Reads a trusted limits file: `Ok(None)` when there is none; an error when it is a link, not a
/// regular file, owned by another user than root or the agent's, writable by group or others, or
/// invalid.
///
/// # Errors
/// What is wrong with it.
pub fn read_trusted_limits(path: &Path) -> Result<Option<TrustedLimits>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let m = f.metadata().map_err(|e| e.to_string())?;
    #[allow(unsafe_code, reason = "geteuid(2) has no preconditions")]
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if !m.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if m.uid() != 0 && m.uid() != euid {
        return Err(format!("owned by uid {}, not root or the agent's", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!("mode {:o} lets others write it", m.mode() & 0o7777));
    }
    let mut bytes = Vec::new();
    f.take(LIMITS_MAX_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    TrustedLimits::parse(&bytes).map(Some).map_err(|e| e.to_string())
}

/// Mapped regions, their trusted limits, and the utilisation bookkeeping.
#[derive(Default)]
pub struct RegionWriter {
    maps: HashMap<PathBuf, memmap2::MmapMut>,
    /// Trusted limits of the mapped regions (re-read at every scan).
    trusted: HashMap<PathBuf, TrustedLimits>,
    /// Trusted limits files refused (logged once each).
    refused: std::collections::HashSet<PathBuf>,
    /// GPU UUID (upper case) → host GPU index (the kernel's `gpu`), from NVML discovery.
    gpus: HashMap<String, u32>,
    /// (cgroup, GPU) → (SM-µs, CLOCK_MONOTONIC ns) at the previous publication.
    last_sm: HashMap<(u64, u32), (u64, u64)>,
}

fn region_files(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() && depth > 0 {
            region_files(&e.path(), depth - 1, out);
        } else if t.is_file() && e.metadata().is_ok_and(|m| m.len() == REGION_SIZE as u64) {
            out.push(e.path());
        }
    }
}

impl RegionWriter {
    /// A writer that maps trusted UUIDs to the host GPUs `gpus` (NVML discovery).
    #[must_use]
    pub fn with_gpus(gpus: &[crate::snapshot::GpuInfo]) -> Self {
        Self {
            gpus: gpus
                .iter()
                .map(|g| (g.uuid.to_ascii_uppercase(), g.index))
                .collect(),
            ..Self::default()
        }
    }

    /// Maps new region files under `dir`, drops the mappings of removed ones, and (re)reads their
    /// trusted limits files.
    pub fn scan(&mut self, dir: &Path) {
        let mut files = Vec::new();
        region_files(dir, 3, &mut files);
        self.maps.retain(|p, _| files.contains(p));
        self.trusted.clear();
        for f in &files {
            let Some(lp) = trusted_limits_path(f) else {
                continue;
            };
            match read_trusted_limits(&lp) {
                Ok(Some(t)) => {
                    self.trusted.insert(f.clone(), t);
                }
                Ok(None) => {}
                Err(e) => {
                    if self.refused.insert(lp.clone()) {
                        tracing::warn!(file = %lp.display(), error = %e, "trusted limits file refused; the region header's limits apply");
                    }
                }
            }
        }
        for f in files {
            if self.maps.contains_key(&f) {
                continue;
            }
            let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&f) else {
                continue;
            };
            #[allow(unsafe_code, reason = "a shared mapping of a region file")]
            // SAFETY: a shared mapping of a file of REGION_SIZE bytes; other processes change it only
            // through atomics.
            if let Ok(m) = unsafe { memmap2::MmapOptions::new().len(REGION_SIZE).map_mut(&file) } {
                self.maps.insert(f, m);
            }
        }
    }

    /// The host GPU of each container device of the region `path` (container order), and its limit,
    /// bytes: from the trusted limits file when there is one (GPUs by UUID), else from the header (GPUs
    /// by the order of [`container_gpus`]). `None`: not known (yet).
    fn devices(&self, path: &Path, region: &Region, cg: u64, rows: &[UsageRow]) -> Vec<(Option<u32>, u64)> {
        let by_use = container_gpus(rows, cg);
        match self.trusted.get(path) {
            Some(t) => t
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let gpu = match self.gpus.get(&d.uuid.to_ascii_uppercase()) {
                        Some(g) => Some(*g),
                        // No NVML identity: a single device is whichever GPU the container uses.
                        None if t.devices.len() == 1 => None,
                        None => by_use.get(i).copied(),
                    };
                    (gpu, d.memory_bytes)
                })
                .collect(),
            None => (0..region.device_count())
                .map(|d| (by_use.get(d).copied(), region.limit(d)))
                .collect(),
        }
    }

    /// The hard limits the regions give, as keys of the programs' limit map (bytes): container device
    /// `i` on its host GPU (see [`RegionWriter::devices`]); a single-device container whose GPU is not
    /// known holds its limit on whichever GPU it uses (`gpu == GPU_UNKNOWN`); for several devices,
    /// GPUs not known yet get no limit until they are.
    #[must_use]
    pub fn hard_limits(&self, rows: &[UsageRow]) -> Vec<(LimitKey, u64)> {
        let key = |cgroup_id, gpu| LimitKey {
            cgroup_id,
            gpu,
            _pad: 0,
        };
        let mut out = Vec::new();
        for (path, cg, region) in valid_regions(&self.maps) {
            let devices = self.devices(path, region, cg, rows);
            let single = devices.len() == 1;
            for (gpu, limit) in devices {
                match gpu {
                    Some(g) => out.push((key(cg, g), limit)),
                    None if single => out.push((key(cg, GPU_UNKNOWN), limit)),
                    None => {}
                }
            }
        }
        out.retain(|(_, l)| *l != UNLIMITED);
        out
    }

    /// Writes each region's kernel-observed device memory (bytes), SM utilisation (percent over the
    /// time since the previous call) and which of its devices are suspended by a higher-priority
    /// container ([`suspensions`]). Returns how many regions were updated.
    pub fn publish(&mut self, rows: &[UsageRow], now_ns: u64) -> usize {
        let by_key: BTreeMap<(u64, u32), &UsageRow> = rows
            .iter()
            .filter(|r| r.key.kind == MemoryKind::Device)
            .map(|r| ((r.key.cgroup_id, r.key.gpu), r))
            .collect();
        let mut n = 0;
        let mapped: Vec<(u64, &Region, Vec<Option<u32>>, u32)> = valid_regions(&self.maps)
            .map(|(path, cg, region)| {
                let mut gpus: Vec<Option<u32>> = self
                    .devices(path, region, cg, rows)
                    .into_iter()
                    .map(|d| d.0)
                    .collect();
                if let [g @ None] = gpus.as_mut_slice() {
                    *g = container_gpus(rows, cg).first().copied();
                }
                let priority = self.trusted.get(path).map_or(PRIORITY_LOW, |t| t.priority);
                (cg, region, gpus, priority)
            })
            .collect();
        // (region, device) → standing, for the priority rule.
        let mut presence: Vec<(usize, usize, Presence)> = Vec::new();
        for (ri, (cg, region, gpus, priority)) in mapped.iter().enumerate() {
            let (cg, region) = (*cg, *region);
            for dev in 0..region.device_count() {
                let row = gpus
                    .get(dev)
                    .copied()
                    .flatten()
                    .and_then(|g| by_key.get(&(cg, g)).copied());
                let (bytes, sm) = match row {
                    Some(r) => {
                        let key = (cg, r.key.gpu);
                        let pct = match self.last_sm.insert(key, (r.usage.sm_us, now_ns)) {
                            Some((prev_us, prev_ns)) if now_ns > prev_ns => {
                                let busy_ns = r.usage.sm_us.saturating_sub(prev_us) * 1000;
                                u32::try_from((busy_ns * 100 / (now_ns - prev_ns)).min(100)).unwrap_or(100)
                            }
                            _ => 0,
                        };
                        (r.usage.bytes, pct)
                    }
                    None => (0, 0),
                };
                region.set_kernel_used(dev, bytes, now_ns);
                region.header.kernel_sm_percent[dev].store(sm, std::sync::atomic::Ordering::Release);
                presence.push((
                    ri,
                    dev,
                    Presence {
                        container: cg,
                        gpu: gpus.get(dev).copied().flatten(),
                        priority: *priority,
                        active: sm > 0,
                    },
                ));
            }
            n += 1;
        }
        let flags = suspensions(&presence.iter().map(|p| p.2).collect::<Vec<_>>());
        for (ri, (_, region, _, _)) in mapped.iter().enumerate() {
            let devices: Vec<bool> = presence
                .iter()
                .zip(&flags)
                .filter(|((r, _, _), _)| *r == ri)
                .map(|((_, _, _), f)| *f)
                .collect();
            region.set_suspended(&devices);
        }
        n
    }
}

/// One container device's standing for the priority rule (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// The container (cgroup id).
    pub container: u64,
    /// Its host GPU, when known.
    pub gpu: Option<u32>,
    /// Its task priority (0 high, 1 low).
    pub priority: u32,
    /// Whether it used the GPU's SMs since the previous publication.
    pub active: bool,
}

/// HAMi's priority rule: each container device is suspended when another container on the same host
/// GPU with a higher priority (lower number) was active. Devices whose GPU is unknown are never
/// suspended.
#[must_use]
pub fn suspensions(presence: &[Presence]) -> Vec<bool> {
    presence
        .iter()
        .map(|p| {
            p.gpu.is_some()
                && presence.iter().any(|o| {
                    o.container != p.container && o.gpu == p.gpu && o.priority < p.priority && o.active
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(container: u64, gpu: u32, priority: u32, active: bool) -> Presence {
        Presence {
            container,
            gpu: Some(gpu),
            priority,
            active,
        }
    }

    #[test]
    fn an_active_high_priority_container_suspends_lower_ones_on_its_gpu_only() {
        let p = [
            at(1, 0, 0, true),  // high, active on GPU 0
            at(2, 0, 1, true),  // low on GPU 0: suspended
            at(3, 1, 1, true),  // low on GPU 1: not
            at(4, 1, 0, false), // high on GPU 1 but idle: suspends nobody
            at(5, 0, 0, true),  // another high on GPU 0: same priority, not suspended
        ];
        assert_eq!(suspensions(&p), [false, true, false, false, false]);
        // The high one goes idle: the low one resumes.
        let idle = [at(1, 0, 0, false), at(2, 0, 1, true)];
        assert_eq!(suspensions(&idle), [false, false]);
        // An unknown GPU is never suspended.
        let unknown = [
            at(1, 0, 0, true),
            Presence {
                gpu: None,
                ..at(2, 0, 1, true)
            },
        ];
        assert_eq!(suspensions(&unknown), [false, false]);
    }
}
