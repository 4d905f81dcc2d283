//! The I/O edge to the kernel: loads the eBPF object (embedded at build time), fills its
//! configuration, attaches the programs, pins maps and links in bpffs so a restarted agent continues
//! where the previous one stopped, and reads the maps and the ring buffer.
//!
//! bpffs layout under `paths.bpffs`: `maps/HAMI_*` (the maps, shared by every agent version) and
//! `links-<object hash>/<n>-<program>` (the attachments of one build of the programs). A restarted
//! agent whose object hash matches the pinned links adopts them (nothing is detached, so no event is
//! missed while it was down: they wait in the pinned ring buffer); a different build replaces them
//! (old links unpinned first, so there is a gap of a few milliseconds during an upgrade, never double
//! counting).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{Lsm, RawTracePoint, TracePoint, UProbe, links::FdLink, uprobe::UProbeScope};
use aya::{Ebpf, EbpfLoader};
use hami_ebpf_common::{
    AllocValue, CallKey, Event, FileKey, KernelConfig, LimitKey, ObjectKey, ObjectValue, counter, file_kind,
    names,
};

use crate::config::{AgentConfig, SyscallHook};
use crate::error::{AgentError, Result};
use crate::kernel;

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hami-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Raw tracepoints always attached: (program, tracepoint).
const RAW_TRACEPOINTS: [(&str, &str); 3] = [
    ("hami_process_exit", "sched_process_exit"),
    ("hami_process_fork", "sched_process_fork"),
    ("hami_process_exec", "sched_process_exec"),
];

/// The ioctl hook as raw tracepoints (every syscall).
const RAW_SYSCALL: [(&str, &str); 2] = [("hami_sys_enter", "sys_enter"), ("hami_sys_exit", "sys_exit")];

/// The ioctl hook as classic tracepoints (ioctl only): (program, category, name).
const IOCTL_TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("hami_ioctl_enter", "syscalls", "sys_enter_ioctl"),
    ("hami_ioctl_exit", "syscalls", "sys_exit_ioctl"),
];

/// The BPF LSM program of the hard limit and its pin name in the links directory.
const LSM_PROGRAM: &str = "hami_lsm_file_ioctl";
/// See [`LSM_PROGRAM`].
const LSM_PIN: &str = "lsm-hami_lsm_file_ioctl";

/// How the kernel hard limit is enforced (agent `hard_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardLimitMechanism {
    /// The ioctl exit program sends SIGKILL to a process whose allocation took its container past the
    /// limit (its memory is freed at exit). Always available (`bpf_send_signal`).
    Kill,
    /// The BPF LSM `file_ioctl` program refuses the allocation with `ENOMEM` before the driver runs
    /// (the kill stays armed behind it). Only where the kernel lets BPF LSM programs load and attach.
    Lsm,
}

impl HardLimitMechanism {
    /// The `mechanism` label of `hami_agent_hard_limit_mechanism`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Lsm => "lsm",
        }
    }
}

/// Loads and attaches the BPF LSM program and pins its link as `links_dir/`[`LSM_PIN`].
fn attach_lsm(ebpf: &mut Ebpf, btf_path: &Path, links_dir: &Path) -> Result<()> {
    let btf = aya::Btf::parse_file(btf_path, aya::Endianness::default())
        .map_err(|e| AgentError::ebpf(format!("BTF {}", btf_path.display()), e))?;
    let p: &mut Lsm = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or_else(|| AgentError::ebpf("program", format!("{LSM_PROGRAM} missing")))?
        .try_into()
        .map_err(|e| AgentError::ebpf(format!("program {LSM_PROGRAM}"), e))?;
    p.load("file_ioctl", &btf)
        .map_err(|e| AgentError::ebpf("load lsm/file_ioctl", e))?;
    let id = p
        .attach()
        .map_err(|e| AgentError::ebpf("attach lsm/file_ioctl", e))?;
    let link: FdLink = p
        .take_link(id)
        .map_err(|e| AgentError::ebpf("link lsm/file_ioctl", e))?
        .into();
    link.pin(links_dir.join(LSM_PIN))
        .map_err(|e| AgentError::ebpf("pin lsm/file_ioctl", e))?;
    Ok(())
}

/// With the hard limit on: BPF LSM when this kernel allows it (already pinned, or attached now),
/// else the kill, saying why once.
fn hard_limit_mechanism(ebpf: &mut Ebpf, cfg: &AgentConfig, links_dir: &Path) -> Option<HardLimitMechanism> {
    if !cfg.hard_limit {
        return None;
    }
    if links_dir.join(LSM_PIN).exists() {
        return Some(HardLimitMechanism::Lsm);
    }
    match attach_lsm(ebpf, &cfg.paths.btf, links_dir) {
        Ok(()) => {
            tracing::info!("hard limit: BPF LSM file_ioctl attached; allocations past a limit get ENOMEM");
            Some(HardLimitMechanism::Lsm)
        }
        Err(e) => {
            tracing::warn!(error = %e, "hard limit: BPF LSM refused by this kernel; falling back to SIGKILL from the ioctl tracepoint");
            Some(HardLimitMechanism::Kill)
        }
    }
}

const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn ioctl_tracepoints_available() -> bool {
    TRACEFS
        .iter()
        .any(|t| Path::new(t).join("events/syscalls/sys_enter_ioctl").exists())
}

/// Resolves the configured hook to `Tracepoint` or `Raw`, mounting tracefs for `Tracepoint`.
fn resolve_hook(hook: SyscallHook) -> Result<SyscallHook> {
    match hook {
        SyscallHook::Raw => Ok(SyscallHook::Raw),
        SyscallHook::Auto if ioctl_tracepoints_available() => Ok(SyscallHook::Tracepoint),
        SyscallHook::Auto => Ok(SyscallHook::Raw),
        SyscallHook::Tracepoint => {
            if !ioctl_tracepoints_available() {
                nix::mount::mount(
                    Some("tracefs"),
                    TRACEFS[0],
                    Some("tracefs"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(|e| AgentError::ebpf("mounting tracefs at /sys/kernel/tracing", e))?;
            }
            if ioctl_tracepoints_available() {
                Ok(SyscallHook::Tracepoint)
            } else {
                Err(AgentError::ebpf(
                    "syscall hook",
                    "no syscalls:sys_enter_ioctl tracepoint (kernel without CONFIG_FTRACE_SYSCALLS?); use \"raw\"",
                ))
            }
        }
    }
}

/// Call names of [`hami_ebpf_common::call`] ids, as exported in metric labels (from
/// [`hami_ebpf_common::PROBES`]).
#[must_use]
pub fn call_names() -> Vec<(u32, &'static str)> {
    hami_ebpf_common::PROBES
        .iter()
        .filter_map(|p| p.call.map(|c| (c, p.symbol)))
        .collect()
}

/// The libcuda files of `candidates` that exist, and for each, the [`hami_ebpf_common::PROBES`] it
/// exports (by dynamic symbol). A missing file or symbol is reported, never an error: drivers differ
/// in what they export and where they install the library.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UprobePlan {
    /// (library, probes whose symbol it exports).
    pub libs: Vec<(PathBuf, Vec<hami_ebpf_common::Probe>)>,
    /// Configured libraries that do not exist or cannot be parsed.
    pub missing_libs: Vec<PathBuf>,
    /// (library, symbol) pairs of probes the library does not export.
    pub missing_symbols: Vec<(PathBuf, &'static str)>,
}

impl UprobePlan {
    /// Reads the dynamic symbol tables of `candidates`.
    #[must_use]
    pub fn new(candidates: &[PathBuf]) -> Self {
        use object::{Object as _, ObjectSymbol as _};
        let mut plan = Self::default();
        for lib in candidates {
            let data = match std::fs::read(lib) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(path = %lib.display(), error = %e, "libcuda not found: no uprobes on it");
                    plan.missing_libs.push(lib.clone());
                    continue;
                }
            };
            let file = match object::File::parse(&*data) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %lib.display(), error = %e, "libcuda is not an ELF object: no uprobes on it");
                    plan.missing_libs.push(lib.clone());
                    continue;
                }
            };
            let exported: std::collections::BTreeSet<&[u8]> = file
                .dynamic_symbols()
                .filter(|s| s.is_definition())
                .filter_map(|s| s.name_bytes().ok())
                .collect();
            let mut probes = Vec::new();
            for p in hami_ebpf_common::PROBES {
                if exported.contains(p.symbol.as_bytes()) {
                    probes.push(p);
                } else if p.call.is_some() {
                    tracing::warn!(path = %lib.display(), symbol = p.symbol, "libcuda does not export a probed symbol");
                    plan.missing_symbols.push((lib.clone(), p.symbol));
                }
            }
            plan.libs.push((lib.clone(), probes));
        }
        plan
    }

    /// Attachments the plan makes.
    #[must_use]
    pub fn attachments(&self) -> usize {
        self.libs.iter().map(|(_, p)| p.len()).sum()
    }
}

fn object_hash() -> String {
    // FNV-1a, 64 bit: a stable name for this build of the programs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// NVIDIA device files in `dev_dir`: `nvidiactl`, `nvidia<N>`, `nvidia-uvm`.
///
/// # Errors
/// The directory cannot be read.
pub fn device_files(dev_dir: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dev_dir).map_err(|e| AgentError::io(dev_dir, e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = match name.as_str() {
            "nvidiactl" => file_kind::CTL,
            "nvidia-uvm" => file_kind::UVM,
            n if n
                .strip_prefix("nvidia")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) =>
            {
                file_kind::GPU
            }
            _ => continue,
        };
        out.push((e.path(), kind));
    }
    out.sort();
    Ok(out)
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpf filesystem, mounting one at `/sys/fs/bpf` when that is where
/// `dir` lives and nothing is mounted there yet.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if !is_bpffs(&probe) {
        let default = Path::new("/sys/fs/bpf");
        if dir.starts_with(default) && default.exists() {
            nix::mount::mount(
                Some("bpf"),
                default,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| AgentError::ebpf("mounting bpffs at /sys/fs/bpf", e))?;
        } else {
            return Err(AgentError::ebpf(
                "bpffs",
                format!(
                    "{} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
                    probe.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))
}

/// Removes every pin under `bpffs` (links and maps): the programs detach and the maps are freed once
/// no process holds them. Used by `hami-agent detach` and by tests.
///
/// # Errors
/// A pin cannot be removed.
pub fn detach(bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(bpffs).map_err(|e| AgentError::io(bpffs, e))
}

/// The program `name` of the object as type `T`, loaded into the kernel (once).
fn loaded<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    T: 'a,
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    T: LoadOnce,
{
    let p: &mut T = ebpf
        .program_mut(name)
        .ok_or_else(|| AgentError::ebpf("program", format!("{name} missing")))?
        .try_into()
        .map_err(|e| AgentError::ebpf(format!("program {name}"), e))?;
    p.load_once()
        .map_err(|e| AgentError::ebpf(format!("load {name}"), e))?;
    Ok(p)
}

/// Loads a program unless it is loaded already (one uprobe program serves several attachments).
trait LoadOnce {
    fn load_once(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! load_once {
    ($($t:ty),*) => {$(
        impl LoadOnce for $t {
            fn load_once(&mut self) -> Result<(), aya::programs::ProgramError> {
                if self.fd().is_ok() { Ok(()) } else { self.load() }
            }
        }
    )*};
}
load_once!(TracePoint, RawTracePoint, UProbe);

/// Pins attachments as `<dir>/<n>-<program>`, numbered in attachment order.
struct Pins<'a> {
    dir: &'a Path,
    n: usize,
}

impl Pins<'_> {
    fn pin<L>(&mut self, prog: &str, link: Result<L, aya::programs::ProgramError>) -> Result<()>
    where
        L: TryInto<FdLink>,
        L::Error: std::fmt::Display,
    {
        let link = link.map_err(|e| AgentError::ebpf(format!("link {prog}"), e))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e| AgentError::ebpf(format!("link {prog}"), e))?;
        fd.pin(self.dir.join(format!("{}-{prog}", self.n)))
            .map_err(|e| AgentError::ebpf(format!("pin {prog}"), e))?;
        self.n += 1;
        Ok(())
    }
}

/// The loaded (or adopted) programs and the agent's handles on their maps.
pub struct Probes {
    /// Keeps programs and unpinned links alive.
    _ebpf: Ebpf,
    events: RingBuf<MapData>,
    allocs: HashMap<MapData, ObjectKey, AllocValue>,
    objects: HashMap<MapData, ObjectKey, ObjectValue>,
    tracked: HashMap<MapData, u32, u64>,
    calls: PerCpuHashMap<MapData, CallKey, u64>,
    limits: HashMap<MapData, LimitKey, u64>,
    limit_usage: HashMap<MapData, LimitKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// Whether pinned links of this build were adopted instead of attaching anew.
    pub adopted: bool,
    /// Uprobe attachments made (0 when adopted).
    pub uprobes_attached: usize,
    /// Which libcuda files and symbols were attached to or missing.
    pub uprobe_plan: UprobePlan,
    /// How the ioctl syscall is hooked (`Tracepoint` or `Raw`).
    pub hook: SyscallHook,
    /// How the hard limit is enforced (`None`: the hard limit is off).
    pub hard_limit: Option<HardLimitMechanism>,
}

fn take<T: TryFrom<aya::maps::Map>>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| AgentError::ebpf("map", format!("{name} missing from the object")))?;
    T::try_from(map).map_err(|e| AgentError::ebpf(format!("map {name}"), e))
}

impl Probes {
    /// Loads, configures and attaches (or adopts) the programs for `cfg`.
    ///
    /// # Errors
    /// A stub object (built with `HAMI_EBPF_STUB=1`), unreadable BTF, unknown driver version,
    /// missing device files, or any loader failure.
    pub fn open(cfg: &AgentConfig) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(AgentError::ebpf(
                "object",
                "this agent was built with HAMI_EBPF_STUB=1 and has no eBPF programs",
            ));
        }
        let offsets = kernel::kernel_offsets(&cfg.paths.btf)?;
        let version = match &cfg.driver_version {
            Some(v) => v.clone(),
            None => std::fs::read_to_string(&cfg.paths.driver_version_file)
                .map_err(|e| AgentError::io(&cfg.paths.driver_version_file, e))?,
        };
        let abi = kernel::abi_for_driver(&version)?;
        let files = device_files(&cfg.paths.dev_dir)?;
        if !files.iter().any(|(_, k)| *k == file_kind::CTL) {
            return Err(AgentError::ebpf(
                "device files",
                format!("no nvidiactl in {}", cfg.paths.dev_dir.display()),
            ));
        }

        let bpffs = &cfg.paths.bpffs;
        let maps_dir = bpffs.join(format!("maps-v{}", names::MAPS_VERSION));
        let hook = resolve_hook(cfg.syscall_hook)?;
        let hook_name = if hook == SyscallHook::Tracepoint {
            "tp"
        } else {
            "raw"
        };
        let links_dir = bpffs.join(format!("links-{}-{hook_name}", object_hash()));
        ensure_bpffs(&maps_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        let mut ebpf = loader.load(OBJECT).map_err(|e| AgentError::ebpf("load", e))?;

        // Configuration and device files (rewritten on every start: devices may have changed).
        let mut config: Array<MapData, KernelConfig> = take(&mut ebpf, names::CONFIG)?;
        let mut dev_map: HashMap<MapData, FileKey, u32> = take(&mut ebpf, names::DEVICE_FILES)?;
        let stale: Vec<FileKey> = dev_map.keys().filter_map(std::result::Result::ok).collect();
        for k in stale {
            let _ = dev_map.remove(&k);
        }
        for (path, kind) in &files {
            let key = kernel::file_key(path)?;
            dev_map
                .insert(key, *kind, 0)
                .map_err(|e| AgentError::ebpf("device-file map", e))?;
        }
        config
            .set(
                0,
                KernelConfig {
                    kernel: offsets,
                    abi,
                    ready: 1,
                    _pad: 0,
                },
                0,
            )
            .map_err(|e| AgentError::ebpf("config map", e))?;

        let plan = UprobePlan::new(&cfg.libcuda);
        let ioctl_links = if hook == SyscallHook::Raw {
            RAW_SYSCALL.len()
        } else {
            IOCTL_TRACEPOINTS.len()
        };
        let expected_links = RAW_TRACEPOINTS.len() + ioctl_links + plan.attachments();
        let pinned_links = std::fs::read_dir(&links_dir)
            .map(|d| d.flatten().filter(|e| e.file_name() != LSM_PIN).count())
            .unwrap_or(0);
        let adopted = pinned_links == expected_links;
        let mut uprobes_attached = 0;
        if !adopted {
            // Unpin attachments of other builds (or an incomplete set of this one).
            if let Ok(rd) = std::fs::read_dir(bpffs) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with("links-") {
                        std::fs::remove_dir_all(e.path()).map_err(|err| AgentError::io(e.path(), err))?;
                    }
                }
            }
            std::fs::create_dir_all(&links_dir).map_err(|e| AgentError::io(&links_dir, e))?;
            let mut pins = Pins {
                dir: &links_dir,
                n: 0,
            };
            let mut raw: Vec<(&str, &str)> = RAW_TRACEPOINTS.to_vec();
            if hook == SyscallHook::Raw {
                raw.extend(RAW_SYSCALL);
            } else {
                for (prog, category, name) in IOCTL_TRACEPOINTS {
                    let p: &mut TracePoint = loaded(&mut ebpf, prog)?;
                    let id = p
                        .attach(category, name)
                        .map_err(|e| AgentError::ebpf(format!("attach {prog} to {category}:{name}"), e))?;
                    pins.pin(prog, p.take_link(id))?;
                }
            }
            for (prog, tp) in raw {
                let p: &mut RawTracePoint = loaded(&mut ebpf, prog)?;
                let id = p
                    .attach(tp)
                    .map_err(|e| AgentError::ebpf(format!("attach {prog} to {tp}"), e))?;
                pins.pin(prog, p.take_link(id))?;
            }
            for (lib, probes) in &plan.libs {
                for hami_ebpf_common::Probe {
                    program: prog,
                    symbol,
                    ..
                } in probes.iter().copied()
                {
                    let p: &mut UProbe = loaded(&mut ebpf, prog)?;
                    let id = p
                        .attach(symbol, lib.as_path(), UProbeScope::AllProcesses)
                        .map_err(|e| {
                            AgentError::ebpf(format!("attach {prog} to {symbol} in {}", lib.display()), e)
                        })?;
                    pins.pin(prog, p.take_link(id))?;
                    uprobes_attached += 1;
                }
            }
        }
        let hard_limit = hard_limit_mechanism(&mut ebpf, cfg, &links_dir);
        if !cfg.hard_limit && links_dir.join(LSM_PIN).exists() {
            std::fs::remove_file(links_dir.join(LSM_PIN))
                .map_err(|e| AgentError::io(links_dir.join(LSM_PIN), e))?;
        }
        Ok(Self {
            hard_limit,
            events: take(&mut ebpf, names::EVENTS)?,
            allocs: take(&mut ebpf, names::ALLOCS)?,
            objects: take(&mut ebpf, names::OBJECTS)?,
            tracked: take(&mut ebpf, names::TRACKED)?,
            calls: take(&mut ebpf, names::CALLS)?,
            limits: take(&mut ebpf, names::LIMITS)?,
            limit_usage: take(&mut ebpf, names::LIMIT_USAGE)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            _ebpf: ebpf,
            adopted,
            uprobes_attached,
            uprobe_plan: plan,
            hook,
        })
    }

    /// The raw fd of the event ring buffer (readable when events are queued).
    #[must_use]
    pub fn event_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }

    /// Waits up to `timeout_ms` for events, then hands every queued event to `f` in ring order.
    /// Returns how many were read.
    pub fn drain(&mut self, timeout_ms: i32, mut f: impl FnMut(&Event)) -> usize {
        let mut pfd = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        #[allow(unsafe_code, reason = "poll(2) on the ring buffer's fd")]
        // SAFETY: one valid pollfd, count 1.
        let _ = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        let mut n = 0;
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                #[allow(unsafe_code, reason = "reading a #[repr(C)] POD record from ring memory")]
                // SAFETY: the record holds at least size_of::<Event>() bytes written by the program
                // as an Event; read_unaligned copes with any alignment.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                f(&ev);
                n += 1;
            }
        }
        n
    }

    /// The kernel's table of live device-memory objects.
    #[must_use]
    pub fn live_objects(&self) -> Vec<(ObjectKey, AllocValue)> {
        self.allocs.iter().filter_map(std::result::Result::ok).collect()
    }

    /// The kernel's table of device and subdevice objects.
    #[must_use]
    pub fn objects(&self) -> Vec<(ObjectKey, ObjectValue)> {
        self.objects.iter().filter_map(std::result::Result::ok).collect()
    }

    /// Deletes entries of the live-object map, entries of the object map (objects freed with an
    /// ancestor) and, for an exited process, all its object-map entries.
    pub fn cleanup(&mut self, allocs: &[ObjectKey], objects: &[ObjectKey], exited_tgid: Option<u32>) {
        for k in allocs {
            let _ = self.allocs.remove(k);
        }
        for k in objects {
            let _ = self.objects.remove(k);
        }
        if let Some(tgid) = exited_tgid {
            let doomed: Vec<ObjectKey> = self
                .objects
                .keys()
                .filter_map(std::result::Result::ok)
                .filter(|k| k.tgid == tgid)
                .collect();
            for k in doomed {
                let _ = self.objects.remove(&k);
            }
        }
    }

    /// Per-cgroup libcuda call counts (summed over CPUs): cgroup → call id → count.
    #[must_use]
    pub fn calls(&self) -> BTreeMap<u64, BTreeMap<u32, u64>> {
        let mut out: BTreeMap<u64, BTreeMap<u32, u64>> = BTreeMap::new();
        for (k, v) in self.calls.iter().filter_map(std::result::Result::ok) {
            let total: u64 = v.iter().sum();
            *out.entry(k.cgroup_id).or_default().entry(k.call).or_default() += total;
        }
        out
    }

    /// The cgroup id of a process that used the driver (`None` when it never did).
    #[must_use]
    pub fn cgroup_of_tgid(&self, tgid: u32) -> Option<u64> {
        self.tracked.get(&tgid, 0).ok()
    }

    /// Replaces the hard limits (bytes per container and GPU) the programs enforce.
    pub fn set_limits(&mut self, limits: &[(LimitKey, u64)]) {
        let stale: Vec<LimitKey> = self
            .limits
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !limits.iter().any(|(l, _)| l == k))
            .collect();
        for k in stale {
            let _ = self.limits.remove(&k);
            let _ = self.limit_usage.remove(&k);
        }
        for (k, v) in limits {
            let _ = self.limits.insert(k, v, 0);
        }
    }

    /// Writes the exact device memory of limited containers (bytes), replacing the programs' running
    /// additions.
    pub fn publish_limit_usage(&mut self, usage: &[(LimitKey, u64)]) {
        for (k, v) in usage {
            let _ = self.limit_usage.insert(k, v, 0);
        }
    }

    /// Deletes the call counters of a cgroup (after its final values were exported).
    pub fn forget_calls(&mut self, cgroup_id: u64) {
        let doomed: Vec<CallKey> = self
            .calls
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| k.cgroup_id == cgroup_id)
            .collect();
        for k in doomed {
            let _ = self.calls.remove(&k);
        }
    }

    /// Program-level counters ([`counter`] slots, summed over CPUs).
    #[must_use]
    pub fn counters(&self) -> [u64; counter::COUNT as usize] {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            if let Ok(v) = self.counters.get(&idx, 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{OBJECT, call_names};
    use hami_ebpf_common::{PROBES, call};

    #[test]
    fn the_probe_list_names_every_call_once_and_every_program_exists() {
        // One entry probe per call id, 1..COUNT, each symbol once.
        let mut ids: Vec<u32> = call_names().iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..call::COUNT).collect::<Vec<_>>());
        let mut symbols: Vec<&str> = call_names().iter().map(|(_, s)| *s).collect();
        symbols.sort_unstable();
        symbols.dedup();
        assert_eq!(symbols.len(), ids.len());
        if OBJECT.is_empty() {
            eprintln!("skipped the object check: built with HAMI_EBPF_STUB=1");
            return;
        }
        // Every program the list attaches is a function of the built eBPF object.
        use object::{Object as _, ObjectSymbol as _};
        let file = object::File::parse(OBJECT).expect("the eBPF object is ELF");
        let functions: std::collections::BTreeSet<&str> = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text)
            .filter_map(|s| s.name().ok())
            .collect();
        assert!(functions.contains("hami_sys_enter"), "{functions:?}");
        assert!(!functions.contains("hami_no_such_program"));
        for p in PROBES {
            assert!(
                functions.contains(p.program),
                "{} is not in the object",
                p.program
            );
        }
    }
}
