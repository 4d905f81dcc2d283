//! The running agent: the kernel probes, the attribution state, cgroup resolution, retention of
//! finished containers, and the state file that carries counters across restarts.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hami_ebpf_common::counter;

use crate::attribution::{Attribution, UtilSample};
use crate::cgroup::{self, CgroupIndex};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::loader::{Probes, call_names};
use crate::snapshot::{self, AgentStats, CgroupFacts, GpuInfo, Snapshot};

/// File name of the saved attribution state in `paths.state_dir`.
pub const STATE_FILE: &str = "attribution.json";

/// How far before the start of a drain of the event stream the attribution is taken to be settled,
/// nanoseconds: an event stamped just before the drain may still be being written into the ring
/// buffer when the drain reads it.
const SETTLE_MARGIN_NS: u64 = 5_000_000;

/// CLOCK_MONOTONIC now, nanoseconds (the clock of `bpf_ktime_get_ns`).
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

#[derive(Debug, Clone, Copy)]
struct Terminated {
    since: Instant,
    exported: bool,
}

/// The agent.
pub struct Agent {
    cfg: AgentConfig,
    node: String,
    probes: Probes,
    state: Attribution,
    index: CgroupIndex,
    terminated: HashMap<u64, Terminated>,
    gpus: Vec<GpuInfo>,
    nvml: Option<nvml_wrapper::Nvml>,
    regions: crate::regions::RegionWriter,
    /// Hard-limit keys in force (cgroup, GPU or GPU_UNKNOWN for every GPU).
    limit_keys: Vec<hami_ebpf_common::LimitKey>,
    cgroup_root: PathBuf,
    state_file: PathBuf,
}

fn nvml_error(e: nvml_wrapper::error::NvmlError) -> AgentError {
    AgentError::ebpf("NVML", e)
}

/// Opens NVML (`nvml_lib` overrides the library path).
///
/// # Errors
/// NVML cannot be loaded or initialised.
pub fn open_nvml(nvml_lib: Option<&std::path::Path>) -> Result<nvml_wrapper::Nvml> {
    let mut b = nvml_wrapper::Nvml::builder();
    if let Some(p) = nvml_lib {
        b.lib_path(p.as_os_str());
    }
    b.init().map_err(nvml_error)
}

/// Discovers the GPUs through NVML.
///
/// # Errors
/// NVML answers with an error.
pub fn discover_gpus(nvml: &nvml_wrapper::Nvml) -> Result<Vec<GpuInfo>> {
    let fail = nvml_error;
    let n = nvml.device_count().map_err(fail)?;
    let mut out = Vec::new();
    for i in 0..n {
        let d = nvml.device_by_index(i).map_err(fail)?;
        out.push(GpuInfo {
            index: d.index().map_err(fail)?,
            uuid: d.uuid().map_err(fail)?,
            name: d.name().map_err(fail)?,
            memory_total_bytes: d.memory_info().map_err(fail)?.total,
        });
    }
    Ok(out)
}

impl Agent {
    /// Opens the probes, restores the saved state, applies the events queued while no agent ran, and
    /// reconciles with the kernel's live-object table.
    ///
    /// # Errors
    /// See [`Probes::open`]; an unreadable or corrupt state file is an error too (it is never
    /// silently dropped: move it away to start from the kernel table alone).
    pub fn start(cfg: AgentConfig) -> Result<Self> {
        let cgroup_root = match &cfg.paths.cgroup_root {
            Some(r) => r.clone(),
            None => cgroup::cgroup2_mount(&cfg.paths.mounts)
                .map_err(|e| AgentError::io(&cfg.paths.mounts, e))?
                .ok_or_else(|| AgentError::Config {
                    path: cfg.paths.mounts.clone(),
                    message: "no cgroup2 mount listed; set paths.cgroup_root".into(),
                })?,
        };
        let probes = Probes::open(&cfg)?;
        let nvml = match open_nvml(cfg.nvml_lib.as_deref()) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "NVML unavailable: no GPU UUIDs and no SM time");
                None
            }
        };
        let gpus = match nvml.as_ref().map(discover_gpus) {
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "GPU discovery failed; series carry GPU indexes only");
                Vec::new()
            }
            None => Vec::new(),
        };
        std::fs::create_dir_all(&cfg.paths.state_dir).map_err(|e| AgentError::io(&cfg.paths.state_dir, e))?;
        let state_file = cfg.paths.state_dir.join(STATE_FILE);
        let state = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::Config {
                path: state_file.clone(),
                message: format!("corrupt attribution state: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Attribution::new(),
            Err(e) => return Err(AgentError::io(&state_file, e)),
        };
        let mut agent = Self {
            node: cfg.effective_node_name(),
            index: CgroupIndex::new(cgroup_root.clone()),
            cgroup_root,
            nvml,
            regions: crate::regions::RegionWriter::with_gpus(&gpus),
            limit_keys: Vec::new(),
            cfg,
            probes,
            state,
            terminated: HashMap::new(),
            gpus,
            state_file,
        };
        agent.pump(0);
        // Utilisation is integrated from here on (the first query of a GPU only sets the baseline).
        agent.sample_utilization();
        let kernel = agent.probes.live_objects();
        let fixed = agent.state.reconcile(&kernel, monotonic_ns());
        agent.state.seed_objects(&agent.probes.objects());
        // Parsing the kernel's BTF (several MiB of types) leaves freed heap behind; hand it back so
        // the agent's resident set reflects what it keeps.
        #[allow(unsafe_code, reason = "malloc_trim(3) has no preconditions")]
        // SAFETY: glibc malloc_trim may be called at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::info!(
            adopted = agent.probes.adopted,
            hook = ?agent.probes.hook,
            uprobes = agent.probes.uprobes_attached,
            live_objects = kernel.len(),
            reconciled = fixed,
            "agent started"
        );
        Ok(agent)
    }

    /// The raw fd of the event ring buffer, to wait on without holding the agent.
    #[must_use]
    pub fn event_fd(&self) -> std::os::fd::RawFd {
        self.probes.event_fd()
    }

    /// Applies every queued event (waiting up to `timeout_ms` for the first). Returns the count.
    pub fn pump(&mut self, timeout_ms: i32) -> usize {
        // Events stamped before this (less a margin for one being written while the drain starts)
        // are all applied once the drain ends.
        let drain_start = monotonic_ns().saturating_sub(SETTLE_MARGIN_NS);
        let mut cleanups = Vec::new();
        let state = &mut self.state;
        let n = self.probes.drain(timeout_ms, |ev| {
            let c = state.apply(ev);
            if !c.allocs.is_empty() || !c.objects.is_empty() || c.exited_tgid.is_some() {
                cleanups.push(c);
            }
        });
        for c in cleanups {
            self.probes.cleanup(&c.allocs, &c.objects, c.exited_tgid);
        }
        self.state.settle(drain_start);
        if n > 0 && !self.limit_keys.is_empty() {
            self.publish_limit_usage();
        }
        n
    }

    /// Writes the exact device memory of every limited container into the programs' map.
    fn publish_limit_usage(&mut self) {
        let usage: Vec<(hami_ebpf_common::LimitKey, u64)> = self
            .limit_keys
            .iter()
            .map(|k| {
                let gpu = (k.gpu != hami_ebpf_common::GPU_UNKNOWN).then_some(k.gpu);
                (*k, self.state.device_bytes(k.cgroup_id, gpu))
            })
            .collect();
        self.probes.publish_limit_usage(&usage);
    }

    /// Integrates NVML per-process utilisation samples of every GPU into per-container SM time.
    pub fn sample_utilization(&mut self) {
        let Some(nvml) = &self.nvml else { return };
        let now_us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).map_or(0, |t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
        });
        for g in &self.gpus {
            let Ok(dev) = nvml.device_by_index(g.index) else {
                continue;
            };
            let seen = self.state.utilization_seen_us.get(&g.index).copied().unwrap_or(0);
            let samples = match dev.process_utilization_stats(seen) {
                Ok(v) => v,
                Err(nvml_wrapper::error::NvmlError::NotFound) => Vec::new(),
                Err(e) => {
                    tracing::debug!(gpu = g.index, error = %e, "process utilisation unavailable");
                    continue;
                }
            };
            let samples: Vec<UtilSample> = samples
                .iter()
                .map(|s| UtilSample {
                    pid: s.pid,
                    timestamp_us: s.timestamp,
                    sm_percent: s.sm_util,
                })
                .collect();
            let probes = &self.probes;
            let (proc_root, cg_root) = (&self.cfg.paths.proc, &self.cgroup_root);
            let added = self.state.apply_utilization(g.index, &samples, now_us, |pid| {
                probes
                    .cgroup_of_tgid(pid)
                    .or_else(|| cgroup::cgroup_id_of_pid(proc_root, cg_root, pid))
            });
            tracing::debug!(gpu = g.index, seen, samples = ?samples, added_sm_us = added, "utilisation");
        }
    }

    /// Periodic work: refreshes cgroup paths, marks finished containers, forgets those whose
    /// retention ended after they were exported, saves the state.
    ///
    /// # Errors
    /// The state file cannot be written.
    pub fn housekeeping(&mut self) -> Result<()> {
        self.index.refresh();
        self.sample_utilization();
        self.publish_regions();
        let retain = Duration::from_secs(self.cfg.retain_terminated_secs);
        let mut cgroups = self.state.cgroups();
        cgroups.extend(self.probes.calls().into_keys());
        cgroups.sort_unstable();
        cgroups.dedup();
        for cg in cgroups {
            let gone = !self.index.exists(cg) && !self.state.holds_memory(cg);
            if gone {
                self.terminated.entry(cg).or_insert(Terminated {
                    since: Instant::now(),
                    exported: false,
                });
            } else {
                self.terminated.remove(&cg);
            }
        }
        let expired: Vec<u64> = self
            .terminated
            .iter()
            .filter(|(_, t)| t.exported && t.since.elapsed() >= retain)
            .map(|(cg, _)| *cg)
            .collect();
        for cg in expired {
            self.state.forget_cgroup(cg);
            self.probes.forget_calls(cg);
            self.index.forget(cg);
            self.terminated.remove(&cg);
        }
        self.save_state()
    }

    /// Writes the kernel's view (device memory, SM utilisation) into the containers' shared regions.
    /// Returns how many regions were updated.
    pub fn publish_regions(&mut self) -> usize {
        let now = monotonic_ns();
        self.regions.scan(&self.cfg.paths.regions_dir);
        let rows = self.state.rows(now);
        let n = self.regions.publish(&rows, now);
        if self.cfg.hard_limit {
            let limits = self.regions.hard_limits(&rows);
            self.limit_keys = limits.iter().map(|(k, _)| *k).collect();
            self.probes.set_limits(&limits);
            self.publish_limit_usage();
        }
        n
    }

    /// Writes the attribution state (atomically: temp file + rename).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save_state(&self) -> Result<()> {
        let tmp = self.state_file.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&self.state).map_err(|e| AgentError::Config {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(|e| AgentError::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.state_file).map_err(|e| AgentError::io(&self.state_file, e))
    }

    /// The snapshot now. `for_export` marks finished containers as exported (their counters are then
    /// dropped once retention ends). SM time is what [`Agent::housekeeping`] integrated and saved: a
    /// snapshot never samples NVML itself, so no reported SM time can be lost to a kill before the
    /// next save (NVML samples integrated again over a longer window round differently).
    pub fn snapshot(&mut self, for_export: bool) -> Snapshot {
        let now = monotonic_ns();
        let rows = self.state.rows(now);
        let names: BTreeMap<u32, &str> = call_names().into_iter().collect();
        let calls: BTreeMap<u64, BTreeMap<String, u64>> = self
            .probes
            .calls()
            .into_iter()
            .map(|(cg, per)| {
                let named = per
                    .into_iter()
                    .map(|(id, n)| (names.get(&id).copied().unwrap_or("unknown").to_owned(), n))
                    .collect();
                (cg, named)
            })
            .collect();
        let mut facts = BTreeMap::new();
        for cg in rows.iter().map(|r| r.key.cgroup_id).chain(calls.keys().copied()) {
            if facts.contains_key(&cg) {
                continue;
            }
            let path = self.index.path_of(cg);
            let identity = path.as_deref().map(cgroup::identify).unwrap_or_default();
            facts.insert(
                cg,
                CgroupFacts {
                    path,
                    identity,
                    terminated: self.terminated.contains_key(&cg),
                },
            );
        }
        if for_export {
            for t in self.terminated.values_mut() {
                t.exported = true;
            }
        }
        let k = self.probes.counters();
        let stats = AgentStats {
            events: self.state.events,
            live_objects: u64::try_from(self.state.live_objects()).unwrap_or(u64::MAX),
            malformed_ioctls: k[counter::MALFORMED as usize],
            ringbuf_full: k[counter::RINGBUF_FULL as usize],
            alloc_map_full: k[counter::ALLOC_MAP_FULL as usize],
            ioctls: k[counter::IOCTLS as usize],
            unmatched_frees: self.state.anomalies.unmatched_frees,
            reconciled: self.state.anomalies.reconciled,
            hard_limit_kills: k[counter::HARD_LIMIT_KILLS as usize],
            hard_limit_mechanism: self.probes.hard_limit.map(|m| m.label().to_owned()),
            libcuda_missing: u64::try_from(self.probes.uprobe_plan.missing_libs.len()).unwrap_or(u64::MAX),
            uprobe_symbols_missing: u64::try_from(self.probes.uprobe_plan.missing_symbols.len())
                .unwrap_or(u64::MAX),
        };
        snapshot::build(&self.node, now, &self.gpus, &rows, &calls, &facts, stats)
    }

    /// How the ioctl syscall is hooked (resolved from the configuration).
    #[must_use]
    pub fn syscall_hook(&self) -> crate::config::SyscallHook {
        self.probes.hook
    }

    /// How the kernel hard limit is enforced (`None`: `hard_limit` is off).
    #[must_use]
    pub fn hard_limit_mechanism(&self) -> Option<crate::loader::HardLimitMechanism> {
        self.probes.hard_limit
    }

    /// Whether pinned programs of this build were adopted at start.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.probes.adopted
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }
}
