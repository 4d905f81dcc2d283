//! The SM (compute) limiter: kernel launches (`cuLaunchKernel`, `cuLaunchKernelEx`,
//! `cuLaunchCooperativeKernel` and `cuGraphLaunch`; HAMi-core leaves the last two unthrottled) wait a
//! delay chosen by a controller fed by the container's measured utilisation.
//!
//! Every container device has its own delay, driven only by its own utilisation against its own limit
//! (peer case C23: HAMi-core once refilled one shared budget from GPU 0's utilisation and gated every
//! device with it, so a multi-GPU container throttled the wrong GPU). A launch waits the delay of the
//! device of the current context.
//!
//! Control law (one controller thread per process, every [`PERIOD`], for each limited device):
//! - measure the container's SM utilisation `U` on that device (percent): the agent's figure in the
//!   region when it wrote a new one within 3 s (it measures per container and GPU on host pids; each
//!   value is used once), else the sum of NVML's `nvmlDeviceGetProcessUtilization` samples of that GPU
//!   for the pids of the container's process slots over the last period (HAMi's model; needs the
//!   container to see host pids);
//! - a launch followed by a wait of `d` gives `U = k / (k + d)` for kernels of duration `k`, so the
//!   measurement gives `k ≈ d·U / (100 − U)` and the delay that reaches the target `T` is
//!   `d* = k · (100 − T) / T`; the controller moves halfway to `d*` each period (`d ← (d + d*) / 2`);
//! - when `U ≥ 99` (no idle time to learn `k` from) the delay doubles (starting at 1 ms); when the
//!   container is idle the delay is kept.
//!
//! **Priority.** While the agent marks a device of the container suspended (a container of higher
//! `nvidia.com/priority` is active on that GPU), launches on it wait until the mark is cleared,
//! checking every [`SUSPEND_POLL`].
//!
//! The launch fast path, with no SM limit on any device and nothing suspended, is two atomic loads;
//! otherwise it adds the current device's lookup (`cuCtxGetDevice`), one load and the sleep. The
//! controller is restarted in a forked child (threads do not survive `fork`).

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hami_api::region::MAX_DEVICES;

use crate::state::{Enforcer, Mode, mode};

/// Controller period.
pub(crate) const PERIOD: Duration = Duration::from_millis(100);

/// How often a suspended launch checks whether it may go.
pub(crate) const SUSPEND_POLL: Duration = Duration::from_millis(10);

/// The delay before each launch per container device, ns.
static DELAY_NS: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Whether any container device has an SM limit: [`UNREAD`], [`NONE`] or [`SOME`].
static LIMITED: AtomicU32 = AtomicU32::new(UNREAD);
const UNREAD: u32 = 0;
const NONE: u32 = 1;
const SOME: u32 = 2;
/// The pid whose controller runs (0: none).
static CONTROLLER: AtomicU32 = AtomicU32::new(0);

/// The SM target of container device `dev`, percent, when it is throttled (1..=99).
fn target(e: &Enforcer, dev: usize) -> Option<u32> {
    match e.sm_limit(dev) {
        l @ 1..=99 => Some(l),
        _ => None,
    }
}

/// Called before every launch.
#[inline]
pub(crate) fn before_launch() {
    let Mode::On(e) = mode() else {
        return;
    };
    let mut limited = LIMITED.load(Ordering::Relaxed);
    if limited == UNREAD {
        limited = if (0..MAX_DEVICES).any(|d| target(e, d).is_some()) {
            SOME
        } else {
            NONE
        };
        LIMITED.store(limited, Ordering::Relaxed);
    }
    let suspended = e.region.any_suspended();
    if limited == NONE && !suspended {
        return;
    }
    if limited == SOME {
        let pid = std::process::id();
        if CONTROLLER.load(Ordering::Acquire) != pid {
            start_controller(pid);
        }
    }
    let Some(dev) = crate::hooks::current_device().and_then(|o| e.index(o)) else {
        return;
    };
    if suspended {
        while e.region.suspended(dev) {
            std::thread::sleep(SUSPEND_POLL);
        }
    }
    let d = DELAY_NS.get(dev).map_or(0, |d| d.load(Ordering::Relaxed));
    if d > 0 {
        std::thread::sleep(Duration::from_nanos(d));
    }
}

fn start_controller(pid: u32) {
    let prev = CONTROLLER.load(Ordering::Acquire);
    if CONTROLLER
        .compare_exchange(prev, pid, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("hami-sm-limiter".into())
        .spawn(controller);
    if spawned.is_err() {
        crate::log(|| "could not start the SM controller".to_owned());
    }
}

/// One delay update of the control law: current delay `d` (ns), measured utilisation `u` and target
/// `t` (percent). Pure, so it is unit-tested.
#[must_use]
pub(crate) fn next_delay(d: u64, u: f64, t: f64) -> u64 {
    const START: u64 = 1_000_000;
    const MAX: u64 = 1_000_000_000;
    if u <= 0.5 {
        return d;
    }
    if u >= 99.0 || d == 0 {
        return if u > t { (d.max(START / 2) * 2).min(MAX) } else { d };
    }
    #[allow(clippy::cast_precision_loss, reason = "delays far below 2^52 ns")]
    let k = d as f64 * u / (100.0 - u);
    let target = k * (100.0 - t) / t;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a finite, non-negative value below MAX"
    )]
    let next = ((d as f64 + target) / 2.0).clamp(0.0, MAX as f64) as u64;
    next
}

type NvmlInit = unsafe extern "C" fn() -> i32;
type NvmlHandle = unsafe extern "C" fn(u32, *mut *mut c_void) -> i32;
type NvmlHandleByUuid = unsafe extern "C" fn(*const std::ffi::c_char, *mut *mut c_void) -> i32;
type NvmlProcUtil = unsafe extern "C" fn(*mut c_void, *mut Sample, *mut u32, u64) -> i32;

/// `nvmlProcessUtilizationSample_t` (`nvml.h`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Sample {
    pid: u32,
    time_stamp: u64,
    sm_util: u32,
    mem_util: u32,
    enc_util: u32,
    dec_util: u32,
}

fn nvml_fn<T: Copy>(name: &std::ffi::CStr) -> Option<T> {
    let p = crate::real_nvml_symbol(name);
    // SAFETY: a non-null NVML function pointer; `T` is its C signature (checked by the callers' types).
    (!p.is_null() && std::mem::size_of::<T>() == std::mem::size_of::<*mut c_void>())
        .then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// Per-process NVML access to one GPU for the fallback measurement.
struct Nvml {
    dev: *mut c_void,
    util: NvmlProcUtil,
    seen_us: u64,
    buf: Vec<Sample>,
}

// SAFETY: the handle is an opaque NVML device handle, valid for the process; only the controller
// thread that opened it uses it.
unsafe impl Send for Nvml {}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Nvml {
    /// The GPU of container device `dev`: by UUID with trusted limits, else by index (HAMi's rule).
    fn open(e: &Enforcer, dev: usize) -> Option<Self> {
        let init = nvml_fn::<NvmlInit>(c"nvmlInit_v2")?;
        let util = nvml_fn::<NvmlProcUtil>(c"nvmlDeviceGetProcessUtilization")?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: plain NVML call.
        if unsafe { init() } != 0 {
            return None;
        }
        let rc = match e.uuid(dev) {
            Some(uuid) => {
                let by_uuid = nvml_fn::<NvmlHandleByUuid>(c"nvmlDeviceGetHandleByUUID")?;
                let c = std::ffi::CString::new(uuid).ok()?;
                // SAFETY: a NUL-terminated UUID and a valid out-pointer.
                unsafe { by_uuid(c.as_ptr(), &raw mut handle) }
            }
            None => {
                let by_index = nvml_fn::<NvmlHandle>(c"nvmlDeviceGetHandleByIndex_v2")?;
                // SAFETY: a valid out-pointer.
                unsafe { by_index(u32::try_from(dev).ok()?, &raw mut handle) }
            }
        };
        if rc != 0 {
            return None;
        }
        let dev = handle;
        Some(Self {
            dev,
            util,
            seen_us: wall_us(),
            buf: vec![Sample::default(); 64],
        })
    }

    /// The summed SM utilisation of `pids` since the previous call, percent.
    fn utilisation(&mut self, pids: &[u32]) -> f64 {
        let mut n = u32::try_from(self.buf.len()).unwrap_or(0);
        // SAFETY: `buf` holds `n` samples.
        let rc = unsafe { (self.util)(self.dev, self.buf.as_mut_ptr(), &raw mut n, self.seen_us) };
        let (mut sum, mut newest) = (0.0, self.seen_us);
        if rc == 0 {
            for s in self.buf.iter().take(n as usize) {
                if pids.contains(&s.pid) && s.time_stamp > self.seen_us {
                    sum += f64::from(s.sm_util);
                    newest = newest.max(s.time_stamp);
                }
            }
        }
        self.seen_us = if newest > self.seen_us { newest } else { wall_us() };
        sum
    }
}

/// The agent's figure is used when it was written within this long.
const AGENT_FRESH_NS: u64 = 3_000_000_000;

/// One limited container device under the controller.
struct Budget {
    dev: usize,
    target: f64,
    /// NVML for the fallback measurement (opened once; `None` without NVML).
    nvml: Option<Nvml>,
}

fn controller() {
    let pid = std::process::id();
    let Mode::On(e) = mode() else { return };
    // The container's utilisation is summed over the pids of the region's slots: take ours.
    let _ = e.slot();
    let mut budgets: Vec<Budget> = (0..MAX_DEVICES)
        .filter_map(|dev| {
            target(e, dev).map(|t| Budget {
                dev,
                target: f64::from(t),
                nvml: Nvml::open(e, dev),
            })
        })
        .collect();
    let mut agent_seen = 0u64;
    while CONTROLLER.load(Ordering::Acquire) == pid {
        std::thread::sleep(PERIOD);
        // Preferred: the agent's measurement per container and GPU (host pids, no NVML in the
        // container); each new value is used once. Fallback: NVML samples of the region's pids.
        let updated = e.region.header.kernel_updated_ns.load(Ordering::Acquire);
        let from_agent = updated != agent_seen && monotonic_ns().saturating_sub(updated) < AGENT_FRESH_NS;
        if from_agent {
            agent_seen = updated;
        }
        let pids = e.container_pids();
        for b in &mut budgets {
            let (u, source) = if from_agent {
                (
                    f64::from(e.region.header.kernel_sm_percent[b.dev].load(Ordering::Acquire)),
                    "agent",
                )
            } else if let Some(n) = b.nvml.as_mut() {
                (n.utilisation(&pids), "nvml")
            } else {
                continue;
            };
            let delay = &DELAY_NS[b.dev];
            let d = delay.load(Ordering::Relaxed);
            let next = next_delay(d, u, b.target);
            delay.store(next, Ordering::Relaxed);
            crate::log(|| {
                format!(
                    "device {}: SM utilisation {u:.0} % ({source}; target {}), delay {d} -> {next} ns",
                    b.dev, b.target
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_delay;

    /// Simulates `U = k / (k + d)` for kernels of `k` ns and checks convergence to the target.
    #[test]
    fn converges_to_the_target_from_full_utilisation() {
        for (k, t) in [(5_000_000.0, 30.0), (1_000_000.0, 50.0), (20_000_000.0, 10.0)] {
            let mut d = 0u64;
            let mut u = 100.0;
            for _ in 0..40 {
                d = next_delay(d, u, t);
                u = 100.0 * k / (k + d as f64);
            }
            assert!((u - t).abs() < 1.0, "k {k} t {t}: u {u}, d {d}");
        }
    }

    #[test]
    fn idle_keeps_the_delay_and_saturation_backs_off() {
        assert_eq!(next_delay(3_000_000, 0.0, 30.0), 3_000_000);
        assert_eq!(next_delay(0, 100.0, 30.0), 1_000_000);
        assert_eq!(next_delay(1_000_000, 100.0, 30.0), 2_000_000);
        assert_eq!(
            next_delay(0, 20.0, 30.0),
            0,
            "under the target with no delay: nothing to do"
        );
    }
}
