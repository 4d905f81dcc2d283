//! Attribution: a pure state machine from kernel events to per-cgroup, per-GPU usage.
//!
//! Input is the ordered stream of [`Event`]s from the ring buffer (the kernel assigns the order) plus,
//! at start-up, the kernel's table of live objects. Output is [`UsageRow`]s: device memory now and at
//! its peak, allocation/free/failure counts, and the chargeback integral of device memory over time
//! (byte-seconds), which only ever grows. No I/O happens here; [`Cleanup`] tells the caller which
//! kernel map entries to delete.
//!
//! Time is `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`), the same clock the caller must pass as
//! `now_ns`.

use std::collections::BTreeMap;

use hami_ebpf_common::{AllocValue, Event, GPU_UNKNOWN, ObjectKey, ObjectValue, event_kind};
use serde::{Deserialize, Serialize};

/// A live device-memory or managed-memory object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    /// Owner cgroup v2 id.
    pub cgroup_id: u64,
    /// GPU index ([`GPU_UNKNOWN`] when not known).
    pub gpu: u32,
    /// Parent RM handle (device or subdevice); 0 for managed memory.
    pub parent: u32,
    /// Bytes.
    pub bytes: u64,
    /// Creation time, CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
}

/// Usage counters of one (cgroup, GPU) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Device memory held now, bytes.
    pub bytes: u64,
    /// Highest `bytes` seen, bytes.
    pub peak_bytes: u64,
    /// Successful allocations (objects created).
    pub allocations: u64,
    /// Objects freed explicitly.
    pub frees: u64,
    /// Objects released because their process exited or their client/parent was freed.
    pub released: u64,
    /// Allocations the driver refused (non-zero RM status); they hold no memory.
    pub failed_allocations: u64,
    /// ∫ bytes dt up to `last_ns`, in byte-nanoseconds.
    pub byte_ns: u128,
    /// Time of the last change, CLOCK_MONOTONIC ns.
    pub last_ns: u64,
    /// Cumulative SM time from NVML per-process utilisation samples, in SM-microseconds (one SM-second
    /// is the whole GPU's SMs busy for one second).
    #[serde(default)]
    pub sm_us: u64,
    /// Processes killed by the kernel hard limit for an allocation on this GPU.
    #[serde(default)]
    pub hard_limit_kills: u64,
}

impl Usage {
    fn advance(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            self.byte_ns += u128::from(self.bytes) * u128::from(now_ns - self.last_ns);
            self.last_ns = now_ns;
        }
    }

    fn add(&mut self, bytes: u64, now_ns: u64) {
        self.advance(now_ns);
        self.bytes = self.bytes.saturating_add(bytes);
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }

    fn sub(&mut self, bytes: u64, now_ns: u64) {
        self.advance(now_ns);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Byte-seconds up to `now_ns` (the integral extended at the current level).
    #[must_use]
    pub fn byte_seconds_at(&self, now_ns: u64) -> f64 {
        let extra = u128::from(self.bytes) * u128::from(now_ns.saturating_sub(self.last_ns));
        // Lossy only beyond 2^53 byte-seconds (about 9 PB·s); fine for a metric.
        #[allow(clippy::cast_precision_loss, reason = "documented precision")]
        let v = (self.byte_ns + extra) as f64 / 1e9;
        v
    }
}

/// Which memory a [`UsageRow`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    /// RM device-memory objects (what NVML per-process usage counts), seen by the ioctl programs.
    Device,
    /// `cuMemAllocManaged` reservations, seen by the libcuda uprobes (no ioctl shows them).
    Managed,
}

/// Key of a usage entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UsageKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// GPU index ([`GPU_UNKNOWN`] for managed memory and unknown parents).
    pub gpu: u32,
    /// Device or managed memory.
    pub kind: MemoryKind,
}

/// One row of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The key.
    pub key: UsageKey,
    /// The counters.
    pub usage: Usage,
    /// Byte-seconds up to the snapshot time.
    pub byte_seconds: f64,
}

/// Kernel map entries the caller must delete after [`Attribution::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Entries of the live-object map.
    pub allocs: Vec<ObjectKey>,
    /// Entries of the object map (device/subdevice objects freed with an ancestor).
    pub objects: Vec<ObjectKey>,
    /// Remove every object-map entry of this tgid (the process exited).
    pub exited_tgid: Option<u32>,
}

/// Counts of inputs that could not be attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Anomalies {
    /// Malformed ioctl payloads reported by the programs.
    pub malformed: u64,
    /// Frees of objects that were not live (e.g. allocated before tracing started).
    pub unmatched_frees: u64,
    /// Events of an unknown kind.
    pub unknown_events: u64,
    /// Live objects added or dropped when reconciling with the kernel's table.
    pub reconciled: u64,
}

/// The attribution state. Serialisable so an agent restart continues from where it stopped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attribution {
    #[serde(with = "live_map")]
    live: BTreeMap<ObjectKey, Live>,
    #[serde(with = "as_pairs")]
    managed: BTreeMap<(u32, u64), Live>,
    #[serde(with = "as_pairs")]
    usage: BTreeMap<UsageKey, Usage>,
    /// What could not be attributed.
    pub anomalies: Anomalies,
    /// Events applied since the state was created.
    pub events: u64,
    /// Per GPU, the NVML timestamp (µs) up to which utilisation samples were integrated.
    #[serde(default)]
    pub utilization_seen_us: BTreeMap<u32, u64>,
    /// The RM device/subdevice objects (key → parent handle) that frees cascade through; reseeded
    /// from the kernel's object map at start-up ([`Attribution::seed_objects`]), so not saved.
    #[serde(skip)]
    objects: BTreeMap<ObjectKey, u32>,
    /// Every event stamped before this (CLOCK_MONOTONIC ns) has been applied ([`Attribution::settle`]);
    /// `None`: not known, integrals are extended to the time asked.
    #[serde(skip)]
    settled_ns: Option<u64>,
}

/// One NVML per-process utilisation sample (`nvmlProcessUtilizationSample_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtilSample {
    /// Host pid.
    pub pid: u32,
    /// CPU timestamp, µs.
    pub timestamp_us: u64,
    /// SM utilisation over the sample's period, percent.
    pub sm_percent: u32,
}

mod as_pairs {
    //! Maps whose keys are not strings are written as JSON lists of `[key, value]` pairs.
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let v: Vec<(K, V)> = Vec::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

mod live_map {
    //! `ObjectKey` is not a string, so JSON needs the map as a list of pairs.
    use std::collections::BTreeMap;

    use hami_ebpf_common::ObjectKey;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Live;

    #[derive(Serialize, Deserialize)]
    struct Entry {
        tgid: u32,
        client: u32,
        handle: u32,
        live: Live,
    }

    pub(super) fn serialize<S: Serializer>(m: &BTreeMap<ObjectKey, Live>, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<Entry> = m
            .iter()
            .map(|(k, l)| Entry {
                tgid: k.tgid,
                client: k.client,
                handle: k.handle,
                live: *l,
            })
            .collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ObjectKey, Live>, D::Error> {
        let v: Vec<Entry> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|e| {
                (
                    ObjectKey {
                        tgid: e.tgid,
                        client: e.client,
                        handle: e.handle,
                        _pad: 0,
                    },
                    e.live,
                )
            })
            .collect())
    }
}

/// Every [`ObjectKey`] of client `client` of process `tgid`.
fn client_range(tgid: u32, client: u32) -> std::ops::RangeInclusive<ObjectKey> {
    let at = |handle, pad| ObjectKey {
        tgid,
        client,
        handle,
        _pad: pad,
    };
    at(0, 0)..=at(u32::MAX, u32::MAX)
}

/// Every [`ObjectKey`] of process `tgid`.
fn tgid_range(tgid: u32) -> std::ops::RangeInclusive<ObjectKey> {
    let at = |v| ObjectKey {
        tgid,
        client: v,
        handle: v,
        _pad: v,
    };
    at(0)..=at(u32::MAX)
}

impl Attribution {
    /// An empty state.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the object tree with the kernel's object map (authoritative; read at start-up, when
    /// the events that built it may have been applied by an earlier agent).
    pub fn seed_objects(&mut self, kernel: &[(ObjectKey, ObjectValue)]) {
        self.objects = kernel.iter().map(|(k, v)| (*k, v.parent)).collect();
    }

    /// Handle `root` and every object below it in the tree of client `client` of `tgid`.
    fn subtree(&self, tgid: u32, client: u32, root: u32) -> std::collections::BTreeSet<u32> {
        let mut set = std::collections::BTreeSet::from([root]);
        // A handful of objects per client: repeat until nothing is added (depth is small).
        loop {
            let before = set.len();
            for (k, parent) in self.objects.range(client_range(tgid, client)) {
                if set.contains(parent) {
                    set.insert(k.handle);
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }

    fn entry(&mut self, cgroup_id: u64, gpu: u32, kind: MemoryKind) -> &mut Usage {
        self.usage.entry(UsageKey { cgroup_id, gpu, kind }).or_default()
    }

    fn release(&mut self, key: ObjectKey, now_ns: u64, explicit: bool) -> bool {
        let Some(l) = self.live.remove(&key) else {
            return false;
        };
        let u = self.entry(l.cgroup_id, l.gpu, MemoryKind::Device);
        u.sub(l.bytes, now_ns.max(l.ts_ns));
        if explicit {
            u.frees += 1;
        } else {
            u.released += 1;
        }
        true
    }

    /// Applies one event. Returns the kernel map entries to delete.
    pub fn apply(&mut self, ev: &Event) -> Cleanup {
        self.events += 1;
        let mut cleanup = Cleanup::default();
        let key = ObjectKey::new(ev.tgid, ev.client, ev.handle);
        match ev.kind {
            event_kind::ALLOC => {
                let live = Live {
                    cgroup_id: ev.cgroup_id,
                    gpu: ev.gpu,
                    parent: ev.parent,
                    bytes: ev.bytes,
                    ts_ns: ev.ts_ns,
                };
                // The same object may already be known (seeded from the kernel table at start-up).
                if self.live.get(&key) != Some(&live) {
                    self.release(key, ev.ts_ns, false);
                    self.live.insert(key, live);
                    let u = self.entry(ev.cgroup_id, ev.gpu, MemoryKind::Device);
                    u.add(ev.bytes, ev.ts_ns);
                    u.allocations += 1;
                }
            }
            event_kind::FREE => {
                if !self.release(key, ev.ts_ns, true) {
                    self.anomalies.unmatched_frees += 1;
                }
            }
            event_kind::ALLOC_FAILED => {
                let u = self.entry(ev.cgroup_id, ev.gpu, MemoryKind::Device);
                u.failed_allocations += 1;
            }
            event_kind::OBJECT => {
                self.objects.insert(key, ev.parent);
            }
            event_kind::FREE_OBJECT => {
                // RM frees the object's whole subtree (a client: everything it holds).
                let whole_client = ev.handle == ev.client;
                let freed = self.subtree(ev.tgid, ev.client, ev.handle);
                let doomed: Vec<ObjectKey> = self
                    .live
                    .iter()
                    .filter(|(k, l)| {
                        k.tgid == ev.tgid
                            && k.client == ev.client
                            && (whole_client || freed.contains(&l.parent))
                            && l.ts_ns <= ev.ts_ns
                    })
                    .map(|(k, _)| *k)
                    .collect();
                for k in &doomed {
                    self.release(*k, ev.ts_ns, false);
                }
                let objects: Vec<ObjectKey> = self
                    .objects
                    .range(client_range(ev.tgid, ev.client))
                    .filter(|(k, _)| whole_client || freed.contains(&k.handle))
                    .map(|(k, _)| *k)
                    .collect();
                for k in &objects {
                    self.objects.remove(k);
                }
                cleanup.allocs = doomed;
                cleanup.objects = objects;
            }
            event_kind::EXIT | event_kind::EXEC => {
                let doomed: Vec<ObjectKey> = self
                    .live
                    .iter()
                    .filter(|(k, l)| k.tgid == ev.tgid && l.ts_ns <= ev.ts_ns)
                    .map(|(k, _)| *k)
                    .collect();
                for k in &doomed {
                    self.release(*k, ev.ts_ns, false);
                }
                let managed: Vec<(u32, u64)> = self
                    .managed
                    .range((ev.tgid, 0)..=(ev.tgid, u64::MAX))
                    .filter(|(_, l)| l.ts_ns <= ev.ts_ns)
                    .map(|(k, _)| *k)
                    .collect();
                for k in managed {
                    self.release_managed(k, ev.ts_ns, false);
                }
                let objects: Vec<ObjectKey> =
                    self.objects.range(tgid_range(ev.tgid)).map(|(k, _)| *k).collect();
                for k in &objects {
                    self.objects.remove(k);
                }
                cleanup.allocs = doomed;
                cleanup.exited_tgid = Some(ev.tgid);
            }
            event_kind::FORK => {}
            event_kind::HARD_LIMIT_KILL => {
                self.entry(ev.cgroup_id, ev.gpu, MemoryKind::Device)
                    .hard_limit_kills += 1;
            }
            event_kind::MALFORMED => self.anomalies.malformed += 1,
            event_kind::MANAGED_ALLOC => {
                let live = Live {
                    cgroup_id: ev.cgroup_id,
                    gpu: GPU_UNKNOWN,
                    parent: 0,
                    bytes: ev.bytes,
                    ts_ns: ev.ts_ns,
                };
                self.release_managed((ev.tgid, ev.aux), ev.ts_ns, false);
                self.managed.insert((ev.tgid, ev.aux), live);
                let u = self.entry(ev.cgroup_id, GPU_UNKNOWN, MemoryKind::Managed);
                u.add(ev.bytes, ev.ts_ns);
                u.allocations += 1;
            }
            event_kind::CU_FREE => {
                // Frees of device (non-managed) pointers are accounted by the ioctl programs.
                self.release_managed((ev.tgid, ev.aux), ev.ts_ns, true);
            }
            _ => self.anomalies.unknown_events += 1,
        }
        cleanup
    }

    fn release_managed(&mut self, key: (u32, u64), now_ns: u64, explicit: bool) {
        if let Some(l) = self.managed.remove(&key) {
            let u = self.entry(l.cgroup_id, GPU_UNKNOWN, MemoryKind::Managed);
            u.sub(l.bytes, now_ns.max(l.ts_ns));
            if explicit {
                u.frees += 1;
            } else {
                u.released += 1;
            }
        }
    }

    /// Integrates NVML per-process utilisation samples of `gpu` into SM time. Each pid's samples are
    /// taken in time order; a sample covers the period since the pid's previous sample in this batch, or
    /// since the previous batch's timestamp (`utilization_seen_us`) for the first one. The first batch of
    /// a GPU only sets the starting timestamp (its period is unknown). `cgroup_of` maps host pids to
    /// cgroup ids (unknown pids are skipped). Returns the SM-microseconds added.
    pub fn apply_utilization(
        &mut self,
        gpu: u32,
        samples: &[UtilSample],
        now_us: u64,
        mut cgroup_of: impl FnMut(u32) -> Option<u64>,
    ) -> u64 {
        let Some(&seen) = self.utilization_seen_us.get(&gpu) else {
            let start = samples
                .iter()
                .map(|s| s.timestamp_us)
                .max()
                .unwrap_or(now_us)
                .max(now_us);
            self.utilization_seen_us.insert(gpu, start);
            return 0;
        };
        let mut sorted: Vec<UtilSample> = samples
            .iter()
            .copied()
            .filter(|s| s.timestamp_us > seen)
            .collect();
        sorted.sort_by_key(|s| (s.pid, s.timestamp_us));
        let mut added = 0;
        let mut prev: Option<(u32, u64)> = None;
        for s in &sorted {
            let from = match prev {
                Some((pid, ts)) if pid == s.pid => ts,
                _ => seen,
            };
            prev = Some((s.pid, s.timestamp_us));
            let sm_us = u64::from(s.sm_percent.min(100)) * (s.timestamp_us - from) / 100;
            if let Some(cg) = cgroup_of(s.pid) {
                self.entry(cg, gpu, MemoryKind::Device).sm_us += sm_us;
                added += sm_us;
            }
        }
        let newest = sorted.iter().map(|s| s.timestamp_us).max().unwrap_or(seen);
        self.utilization_seen_us.insert(gpu, newest.max(seen));
        added
    }

    /// Reconciles the live objects with the kernel's table (authoritative): objects the kernel holds
    /// but this state misses are added (counted as allocations at their kernel timestamp), objects
    /// this state holds but the kernel does not are released at `now_ns`. Returns how many changed.
    pub fn reconcile(&mut self, kernel: &[(ObjectKey, AllocValue)], now_ns: u64) -> u64 {
        let kernel_keys: BTreeMap<ObjectKey, AllocValue> = kernel.iter().copied().collect();
        let mut changed = 0;
        let stale: Vec<ObjectKey> = self
            .live
            .keys()
            .filter(|k| !kernel_keys.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.release(k, now_ns, false);
            changed += 1;
        }
        for (k, v) in kernel_keys {
            if self.live.contains_key(&k) {
                continue;
            }
            let ts = v.ts_ns.min(now_ns);
            self.live.insert(
                k,
                Live {
                    cgroup_id: v.cgroup_id,
                    gpu: v.gpu,
                    parent: v.parent,
                    bytes: v.bytes,
                    ts_ns: ts,
                },
            );
            let u = self.entry(v.cgroup_id, v.gpu, MemoryKind::Device);
            u.add(v.bytes, ts);
            u.allocations += 1;
            changed += 1;
        }
        self.anomalies.reconciled += changed;
        changed
    }

    /// Records that every event stamped before `ns` has been applied (the caller drained the event
    /// stream after that time). Never moves back.
    pub fn settle(&mut self, ns: u64) {
        self.settled_ns = Some(self.settled_ns.map_or(ns, |s| s.max(ns)));
    }

    /// Usage rows at `now_ns`, ordered by key. Each integral is extended at its current level up to
    /// `now_ns`, but not past the settled time ([`Attribution::settle`]): an event still in flight
    /// (a free applied later at its own, earlier timestamp) could otherwise pull a reported counter
    /// back, and chargeback counters never go backwards.
    #[must_use]
    pub fn rows(&self, now_ns: u64) -> Vec<UsageRow> {
        let until = self.settled_ns.map_or(now_ns, |s| now_ns.min(s));
        self.usage
            .iter()
            .map(|(k, u)| UsageRow {
                key: *k,
                usage: *u,
                byte_seconds: u.byte_seconds_at(until),
            })
            .collect()
    }

    /// cgroups with usage entries.
    #[must_use]
    pub fn cgroups(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.usage.keys().map(|k| k.cgroup_id).collect();
        v.dedup();
        v
    }

    /// Device memory a cgroup holds on `gpu` (`None`: on every GPU), bytes.
    #[must_use]
    pub fn device_bytes(&self, cgroup_id: u64, gpu: Option<u32>) -> u64 {
        self.usage
            .iter()
            .filter(|(k, _)| {
                k.cgroup_id == cgroup_id && k.kind == MemoryKind::Device && gpu.is_none_or(|g| k.gpu == g)
            })
            .map(|(_, u)| u.bytes)
            .sum()
    }

    /// Whether the cgroup holds any live object.
    #[must_use]
    pub fn holds_memory(&self, cgroup_id: u64) -> bool {
        self.live.values().any(|l| l.cgroup_id == cgroup_id)
            || self.managed.values().any(|l| l.cgroup_id == cgroup_id)
    }

    /// Drops every entry of a cgroup (after its final values were exported).
    pub fn forget_cgroup(&mut self, cgroup_id: u64) {
        self.usage.retain(|k, _| k.cgroup_id != cgroup_id);
    }

    /// Number of live device-memory objects.
    #[must_use]
    pub fn live_objects(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: u32, tgid: u32, cg: u64, ts: u64) -> Event {
        Event {
            kind,
            tgid,
            tid: tgid,
            cgroup_id: cg,
            ts_ns: ts,
            gpu: 0,
            client: 0xc1,
            ..Event::default()
        }
    }

    fn alloc(tgid: u32, cg: u64, handle: u32, gpu: u32, bytes: u64, ts: u64) -> Event {
        Event {
            handle,
            gpu,
            bytes,
            parent: 0xd0,
            ..ev(event_kind::ALLOC, tgid, cg, ts)
        }
    }

    fn dev_row(a: &Attribution, cg: u64, gpu: u32, now: u64) -> UsageRow {
        a.rows(now)
            .into_iter()
            .find(|r| r.key.cgroup_id == cg && r.key.gpu == gpu && r.key.kind == MemoryKind::Device)
            .unwrap()
    }

    #[test]
    fn a_late_free_never_pulls_a_reported_counter_back() {
        let mut a = Attribution::new();
        a.apply(&Event {
            bytes: 1000,
            ..ev(event_kind::ALLOC, 10, 7, 0)
        });
        a.settle(5_000_000_000);
        // Reported at 9 s: extended only to the settled 5 s.
        let before = a.rows(9_000_000_000)[0].byte_seconds;
        assert!((before - 5000.0).abs() < 1e-9, "{before}");
        // The free stamped at 6 s arrives late; the counter still grows from what was reported.
        a.apply(&ev(event_kind::FREE, 10, 7, 6_000_000_000));
        a.settle(8_000_000_000);
        let after = a.rows(9_000_000_000)[0].byte_seconds;
        assert!((after - 6000.0).abs() < 1e-9 && after >= before, "{after}");
    }

    #[test]
    fn alloc_free_peak_and_byte_seconds() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 1000, 1_000_000_000));
        a.apply(&alloc(10, 7, 2, 0, 500, 2_000_000_000));
        a.apply(&Event {
            handle: 1,
            ..ev(event_kind::FREE, 10, 7, 3_000_000_000)
        });
        let r = dev_row(&a, 7, 0, 4_000_000_000);
        assert_eq!(r.usage.bytes, 500);
        assert_eq!(r.usage.peak_bytes, 1500);
        assert_eq!((r.usage.allocations, r.usage.frees), (2, 1));
        // 1000 B for 1 s, 1500 B for 1 s, 500 B for 1 s.
        assert!((r.byte_seconds - 3000.0).abs() < 1e-9, "{}", r.byte_seconds);
    }

    #[test]
    fn exit_releases_only_that_process_and_reports_cleanup() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 1000, 10));
        a.apply(&alloc(11, 7, 1, 0, 300, 11));
        a.apply(&alloc(11, 7, 2, 1, 200, 12));
        let c = a.apply(&ev(event_kind::EXIT, 11, 7, 20));
        assert_eq!(c.allocs.len(), 2);
        assert_eq!(c.exited_tgid, Some(11));
        assert_eq!(dev_row(&a, 7, 0, 30).usage.bytes, 1000);
        assert_eq!(dev_row(&a, 7, 1, 30).usage.bytes, 0);
        assert_eq!(dev_row(&a, 7, 0, 30).usage.released, 1);
    }

    #[test]
    fn exec_releases_like_exit() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 1000, 10));
        let c = a.apply(&ev(event_kind::EXEC, 10, 7, 20));
        assert_eq!((c.allocs.len(), c.exited_tgid), (1, Some(10)));
        assert_eq!(dev_row(&a, 7, 0, 30).usage.bytes, 0);
    }

    #[test]
    fn exit_does_not_release_objects_of_a_reused_pid() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 1000, 50));
        // An exit of an earlier process with the same tgid, delivered late.
        let c = a.apply(&ev(event_kind::EXIT, 10, 7, 40));
        assert!(c.allocs.is_empty());
        assert_eq!(dev_row(&a, 7, 0, 60).usage.bytes, 1000);
    }

    #[test]
    fn subtree_free_of_a_device_releases_memory_under_its_subdevices_only() {
        let mut a = Attribution::new();
        let object = |handle, parent, ts| Event {
            handle,
            parent,
            ..ev(event_kind::OBJECT, 10, 7, ts)
        };
        // Client 0xc1 → devices 0xd0 (GPU 0) and 0xd5; subdevice 0x5d under 0xd0.
        a.apply(&object(0xd0, 0xc1, 1));
        a.apply(&object(0xd5, 0xc1, 1));
        a.apply(&object(0x5d, 0xd0, 2));
        a.apply(&alloc(10, 7, 1, 0, 100, 3)); // under the device 0xd0
        a.apply(&Event {
            parent: 0x5d,
            ..alloc(10, 7, 2, 0, 200, 4)
        });
        a.apply(&Event {
            parent: 0xd5,
            ..alloc(10, 7, 3, 0, 400, 4)
        });
        assert_eq!(dev_row(&a, 7, 0, 5).usage.bytes, 700);
        // Freeing the subdevice frees what is under it, not its parent's memory.
        let c = a.apply(&Event {
            handle: 0x5d,
            ..ev(event_kind::FREE_OBJECT, 10, 7, 6)
        });
        assert_eq!((c.allocs.len(), c.objects.len()), (1, 1));
        assert_eq!(dev_row(&a, 7, 0, 7).usage.bytes, 500);
        // A new subdevice, with memory under it; then the device goes: its whole subtree with it.
        a.apply(&object(0x5e, 0xd0, 8));
        a.apply(&Event {
            parent: 0x5e,
            ..alloc(10, 7, 4, 0, 800, 9)
        });
        let c = a.apply(&Event {
            handle: 0xd0,
            ..ev(event_kind::FREE_OBJECT, 10, 7, 10)
        });
        assert_eq!(
            c.allocs.len(),
            2,
            "memory under the device and under its subdevice"
        );
        assert_eq!(c.objects.len(), 2, "the device and its subdevice");
        let row = dev_row(&a, 7, 0, 11);
        assert_eq!((row.usage.bytes, row.usage.released), (400, 3));
        // The exit clears the rest.
        let c = a.apply(&ev(event_kind::EXIT, 10, 7, 12));
        assert_eq!((c.allocs.len(), a.objects.len()), (1, 0));
    }

    #[test]
    fn free_of_client_or_parent_releases_children() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 100, 1));
        a.apply(&Event {
            parent: 0xd1,
            ..alloc(10, 7, 2, 1, 200, 2)
        });
        let c = a.apply(&Event {
            handle: 0xd1,
            ..ev(event_kind::FREE_OBJECT, 10, 7, 3)
        });
        assert_eq!(c.allocs.len(), 1);
        assert_eq!(dev_row(&a, 7, 1, 4).usage.bytes, 0);
        let c = a.apply(&Event {
            handle: 0xc1,
            ..ev(event_kind::FREE_OBJECT, 10, 7, 5)
        });
        assert_eq!(c.allocs.len(), 1);
        assert_eq!(dev_row(&a, 7, 0, 6).usage.bytes, 0);
    }

    #[test]
    fn failed_and_unmatched_are_counted_not_charged() {
        let mut a = Attribution::new();
        a.apply(&Event {
            bytes: 1 << 40,
            status: 0x51,
            ..ev(event_kind::ALLOC_FAILED, 10, 7, 1)
        });
        a.apply(&Event {
            handle: 9,
            ..ev(event_kind::FREE, 10, 7, 2)
        });
        let r = dev_row(&a, 7, 0, 3);
        assert_eq!((r.usage.bytes, r.usage.failed_allocations), (0, 1));
        assert_eq!(a.anomalies.unmatched_frees, 1);
    }

    #[test]
    fn managed_memory_is_separate_and_freed_by_pointer() {
        let mut a = Attribution::new();
        a.apply(&Event {
            bytes: 4096,
            aux: 0x7000,
            ..ev(event_kind::MANAGED_ALLOC, 10, 7, 1)
        });
        a.apply(&alloc(10, 7, 1, 0, 100, 2));
        let managed = |a: &Attribution| {
            a.rows(3)
                .into_iter()
                .find(|r| r.key.kind == MemoryKind::Managed)
                .unwrap()
                .usage
                .bytes
        };
        assert_eq!(managed(&a), 4096);
        assert_eq!(dev_row(&a, 7, 0, 3).usage.bytes, 100);
        a.apply(&Event {
            aux: 0x7000,
            ..ev(event_kind::CU_FREE, 10, 7, 4)
        });
        assert_eq!(managed(&a), 0);
    }

    #[test]
    fn seeded_objects_are_not_counted_twice_and_reconcile_fixes_drift() {
        let mut a = Attribution::new();
        let key = ObjectKey {
            tgid: 10,
            client: 0xc1,
            handle: 1,
            _pad: 0,
        };
        let val = AllocValue {
            cgroup_id: 7,
            bytes: 1000,
            ts_ns: 5,
            gpu: 0,
            parent: 0xd0,
        };
        assert_eq!(a.reconcile(&[(key, val)], 10), 1);
        // The ALLOC event of the same object, still queued in the ring buffer.
        a.apply(&alloc(10, 7, 1, 0, 1000, 5));
        assert_eq!(dev_row(&a, 7, 0, 20).usage.bytes, 1000);
        assert_eq!(dev_row(&a, 7, 0, 20).usage.allocations, 1);
        // The kernel no longer holds it (its free event was lost): reconcile releases it.
        assert_eq!(a.reconcile(&[], 30), 1);
        assert_eq!(dev_row(&a, 7, 0, 40).usage.bytes, 0);
    }

    #[test]
    fn utilization_samples_integrate_per_pid_and_skip_unknown_pids() {
        let mut a = Attribution::new();
        let cg = |pid: u32| match pid {
            1 | 2 => Some(7),
            3 => Some(8),
            _ => None,
        };
        let s = |pid, ts, pct| UtilSample {
            pid,
            timestamp_us: ts,
            sm_percent: pct,
        };
        // First batch: only the starting point.
        assert_eq!(a.apply_utilization(0, &[s(1, 1_000_000, 50)], 1_000_000, cg), 0);
        // One sample per pid over (1 s, 2 s]: 50 % and 25 % in cgroup 7, 100 % in cgroup 8.
        let added = a.apply_utilization(
            0,
            &[
                s(1, 2_000_000, 50),
                s(2, 2_000_000, 25),
                s(3, 2_000_000, 100),
                s(9, 2_000_000, 100),
            ],
            2_000_000,
            cg,
        );
        assert_eq!(added, 500_000 + 250_000 + 1_000_000);
        // Periodic samples (real NVML): each covers the time since the previous one of the same pid.
        a.apply_utilization(0, &[s(1, 2_500_000, 100), s(1, 3_000_000, 0)], 3_000_000, cg);
        let sm = |a: &Attribution, c| {
            a.rows(0)
                .iter()
                .filter(|r| r.key.cgroup_id == c)
                .map(|r| r.usage.sm_us)
                .sum::<u64>()
        };
        assert_eq!(sm(&a, 7), 750_000 + 500_000);
        assert_eq!(sm(&a, 8), 1_000_000);
        // Samples not newer than what was integrated are ignored (no double counting).
        assert_eq!(a.apply_utilization(0, &[s(1, 3_000_000, 100)], 3_000_000, cg), 0);
        // A GPU's timeline is separate.
        assert_eq!(a.apply_utilization(1, &[s(1, 3_000_000, 100)], 3_000_000, cg), 0);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut a = Attribution::new();
        a.apply(&alloc(10, 7, 1, 0, 1000, 1));
        a.apply(&Event {
            bytes: 64,
            aux: 0x9000,
            ..ev(event_kind::MANAGED_ALLOC, 10, 7, 2)
        });
        let json = serde_json::to_string(&a).unwrap();
        let b: Attribution = serde_json::from_str(&json).unwrap();
        assert_eq!(a.rows(100), b.rows(100));
        assert_eq!(b.live_objects(), 1);
    }
}
