//! Publishes the kernel's view into the containers' shared regions (`hami_api::region`), so the
//! interceptor enforces limits against what the kernel saw (context memory, chunk rounding, processes
//! that bypass the interceptor) and throttles on the agent's utilisation figure.
//!
//! The regions are files under `paths.regions_dir` (the device plugin creates one per container; any
//! depth up to 3, any name, exactly [`REGION_SIZE`] bytes). Each names its container by cgroup id
//! (written by the processes that map it). Container device `i` is mapped to the `i`-th host GPU, by
//! index, among those the container holds memory on: exact for single-GPU containers; multi-GPU
//! containers need the device plugin to record host GPU identities in the region (not yet).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use hami_api::region::{REGION_SIZE, Region};
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

/// The valid regions among `maps` that name their container, with its cgroup id.
fn valid_regions(maps: &HashMap<PathBuf, memmap2::MmapMut>) -> impl Iterator<Item = (u64, &Region)> {
    maps.values().filter_map(|m| {
        #[allow(unsafe_code, reason = "viewing the mapping as the region")]
        // SAFETY: page-aligned, REGION_SIZE long, lives as long as `maps`; any bytes are a valid Region
        // (integer atomics only).
        let region = unsafe { &*m.as_ptr().cast::<Region>() };
        let cg = region.cgroup_id();
        (region.validate().is_ok() && cg != 0).then_some((cg, region))
    })
}

/// Mapped regions and the utilisation bookkeeping.
#[derive(Default)]
pub struct RegionWriter {
    maps: HashMap<PathBuf, memmap2::MmapMut>,
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
    /// Maps new region files under `dir` and drops the mappings of removed ones.
    pub fn scan(&mut self, dir: &Path) {
        let mut files = Vec::new();
        region_files(dir, 3, &mut files);
        self.maps.retain(|p, _| files.contains(p));
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

    /// The hard limits the regions give, as keys of the programs' limit map: a single-device container's
    /// limit holds on whichever GPU it uses (`gpu == GPU_UNKNOWN`); for several devices, container
    /// device `i` is the `i`-th GPU of [`container_gpus`] (GPUs not used yet get no limit until they are).
    #[must_use]
    pub fn hard_limits(&self, rows: &[UsageRow]) -> Vec<(LimitKey, u64)> {
        let key = |cgroup_id, gpu| LimitKey {
            cgroup_id,
            gpu,
            _pad: 0,
        };
        let mut out = Vec::new();
        for (cg, region) in valid_regions(&self.maps) {
            let limits: Vec<u64> = (0..region.device_count()).map(|d| region.limit(d)).collect();
            match limits.as_slice() {
                [l] => out.push((key(cg, GPU_UNKNOWN), *l)),
                many => out.extend(
                    container_gpus(rows, cg)
                        .into_iter()
                        .zip(many)
                        .map(|(gpu, l)| (key(cg, gpu), *l)),
                ),
            }
        }
        out.retain(|(_, l)| *l > 0);
        out
    }

    /// Writes each region's kernel-observed device memory (bytes) and SM utilisation (percent over the
    /// time since the previous call). Returns how many regions were updated.
    pub fn publish(&mut self, rows: &[UsageRow], now_ns: u64) -> usize {
        let by_key: BTreeMap<(u64, u32), &UsageRow> = rows
            .iter()
            .filter(|r| r.key.kind == MemoryKind::Device)
            .map(|r| ((r.key.cgroup_id, r.key.gpu), r))
            .collect();
        let mut n = 0;
        for (cg, region) in valid_regions(&self.maps) {
            let gpus: Vec<&UsageRow> = container_gpus(rows, cg)
                .iter()
                .filter_map(|g| by_key.get(&(cg, *g)).copied())
                .collect();
            for dev in 0..region.device_count() {
                let (bytes, sm) = match gpus.get(dev) {
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
            }
            n += 1;
        }
        n
    }
}
