//! Kubelet device plugin (API `v1beta1`, `reference/kubernetes-testing.md` §4): registration,
//! ListAndWatch, GetPreferredAllocation, Allocate, PreStartContainer, HAMi-compatible
//! (`reference/hami.md` §1.3–§1.5).
//!
//! # What it serves
//!
//! The plugin serves `DevicePlugin` on the unix socket `<plugin_dir>/<socket_name>` and registers it
//! with the kubelet (`Registration.Register` on `<plugin_dir>/kubelet.sock`, version `v1beta1`,
//! options `pre_start_required` and `get_preferred_allocation_available`). It advertises
//! `split_count` replicas of every GPU, IDs `<GPU-uuid>-<n>` for `n` in `0..split_count` (HAMi's
//! naming), with the GPU's health (NVML: a GPU whose queries fail is `Unhealthy`, and `Healthy` again
//! as soon as they succeed, without a restart: peer case C05) and its NUMA node. Every change of the
//! inventory is pushed on the ListAndWatch stream. When the kubelet restarts it recreates
//! `kubelet.sock` and removes the plugin sockets; the plugin notices (inode of `kubelet.sock` changed or
//! its own socket gone, checked every `watch_interval_ms`), serves a new socket and registers again.
//!
//! # How Allocate finds the decision (no node lock)
//!
//! The kubelet's `AllocateRequest` carries replica IDs only, not the pod. HAMi serialises binding per
//! node with a lock so that at most one pod is between Bind and Allocate (`reference/hami.md` §1.4),
//! and its peers that skip the lock guess the pod by age (peer case C19). Here:
//!
//! 1. The plugin keeps a watch-backed cache (kube-rs reflector, field selector
//!    `spec.nodeName=<node>`) of the pods bound to this node. Allocate and GetPreferredAllocation, by
//!    default (`consistent_allocate`), decide on one fresh list of the node's pods
//!    (a consistent read): the kubelet calls Allocate for a pod *it* has seen, and the plugin's watch
//!    may not have delivered that pod yet; deciding on a cache that lacks the second of two
//!    different candidates would hand the first pod's decision to the second pod's container (the C19
//!    outcome; `tests/device_plugin.rs` caught it; a lagging preference sends the kubelet to the wrong
//!    GPU, `benches/allocate.rs` caught that). With `consistent_allocate: false` both read
//!    the cache only (no API list; when it has no candidate yet it waits up to `cache_wait_ms` for a
//!    watch event, then lists once), accepting that window.
//! 2. Candidates for a container request with replica IDs `R` are the pods on this node with
//!    `hami.io/bind-phase: allocating`, a decision signature that verifies
//!    ([`hami_api::annotations::verify_decision`] over the pod UID, this node and
//!    `hami.io/vgpu-devices-allocated`, key from `decision_key_file`), and a pending
//!    `hami.io/vgpu-devices-to-allocate` entry whose device count is `|R|` and whose UUID set is the
//!    physical GPUs of `R` (the first such entry of the pod, containers in pod order).
//!    A pod whose decision does not verify is refused (counted, `bind-phase: failed`; peer case C18):
//!    a hand-written decision gets nothing.
//! 3. One candidate, or several whose pending entries are identical (same UUIDs, MiB and cores): the
//!    one bound first (`hami.io/bind-time`, then namespace/name) is taken; the limits are the same,
//!    and each container still gets a region directory of its own. Candidates that differ: Allocate
//!    fails with an error naming the pods, to be retried; the plugin never guesses between different
//!    decisions. No candidate: an error naming the devices and GPUs asked for.
//! 4. The kubelet gives an app container the devices of an init container of the same pod (its
//!    "reusable" devices) without asking for a preference. A request whose IDs the plugin handed to an
//!    init container of pod P is therefore P's, by identity: P's next pending entry of that size is
//!    used, whatever its UUIDs.
//! 5. The container is marked allocated by a JSON merge patch with `metadata.resourceVersion` as
//!    precondition (a conflict re-reads the pod and decides again): its entry in
//!    `hami.io/vgpu-devices-to-allocate` is emptied, and with no entry left `hami.io/bind-phase`
//!    becomes `success`.
//!
//! GetPreferredAllocation steers the kubelet onto the decided GPUs: for a request of size `k` it
//! prefers replicas of the UUIDs of the pending entries of size `k` (when they all agree, else those
//! of the pod bound first), then distinct GPUs (peer case C06). Allocate verifies anyway.
//!
//! # What a container receives (HAMi §1.5, paths from the configuration)
//!
//! Env `NVIDIA_VISIBLE_DEVICES` (UUIDs), `CUDA_DEVICE_MEMORY_LIMIT_<i>=<MiB>m`,
//! `CUDA_DEVICE_SM_LIMIT` (cores of the first device), `CUDA_DEVICE_MEMORY_SHARED_CACHE`
//! (`/usr/local/vgpu/vgpu.cache`); mounts: `libvgpu_host_path` at `/usr/local/vgpu/libvgpu.so`
//! (read-only), the container's region directory `<paths.regions_dir>/<pod UID>_<container>` at
//! `/usr/local/vgpu` (created 0777 when missing, never deleted or emptied: peer case C19), the
//! container's trusted limits file `<paths.regions_dir>/<pod UID>_<container>.limits` (written by the
//! agent at every Allocate, mode 0444, beside the directory, not in it) at `/usr/local/vgpu/limits`
//! (read-only: the interceptor and the kernel hard limit trust it, never the tenant-writable region
//! header), and
//! `ld_so_preload_host_path` at `/etc/ld.so.preload` (read-only) when configured. The container's own
//! `CUDA_DISABLE_CONTROL` does not remove the preload (unlike HAMi: it is an escape). Devices:
//! `nvidiactl`, `nvidia-uvm` and `nvidia<minor>` of each GPU from `paths.dev_dir`.
//!
//! Layers: [`devices`], [`decision`] and [`response`] are pure; [`pods`] (API server), [`server`]
//! (gRPC service), [`kubelet`] (sockets, registration) and [`health`] (NVML) are the I/O edges.

pub mod decision;
pub mod devices;
pub mod health;
pub mod install;
pub mod kubelet;
pub mod metrics;
pub mod pods;
pub mod proto;
pub mod response;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use kubelet::{DevicePlugin, PluginSettings};

/// Device plugin settings (`device_plugin` block of the agent config).
///
/// ```json
/// "device_plugin": {
///   "enabled": false,
///   "plugin_dir": "/var/lib/kubelet/device-plugins",   // kubelet.sock is here; our socket too
///   "socket_name": "hami-nvidia.sock",
///   "resource_name": "nvidia.com/gpu",
///   "split_count": 10,                                  // replicas advertised per GPU
///   "libvgpu_host_path": "/usr/local/vgpu/libvgpu.so",
///   "ld_so_preload_host_path": "/usr/local/vgpu/ld.so.preload",  // null: not mounted
///   "decision_key_file": "/etc/hami/decision-key/key",  // HMAC key (mounted Secret)
///   "watch_interval_ms": 1000,                          // kubelet restart check
///   "health_interval_ms": 5000,                         // NVML health poll
///   "cache_wait_ms": 2000,                              // cache mode: wait this long for the cache
///   "consistent_allocate": true,                        // Allocate decides on a fresh list
///   "host_dev_dir": "/dev",                             // the HOST's device directory
///   "host_regions_dir": null,                           // host path of paths.regions_dir; null: same
///   "on_region_error": "closed"                         // interceptor without a usable region: "open"
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicePluginConfig {
    /// Serve the kubelet device plugin.
    pub enabled: bool,
    /// The kubelet's device plugin directory (host path; kubelet constant `DevicePluginPath`).
    pub plugin_dir: PathBuf,
    /// File name of the plugin's socket in `plugin_dir` (the `endpoint` registered).
    pub socket_name: String,
    /// Extended resource advertised (HAMi default `nvidia.com/gpu`,
    /// [`hami_api::resources::ResourceNames::gpu`]).
    pub resource_name: String,
    /// Replicas advertised per GPU (HAMi `deviceSplitCount`), at least 1.
    pub split_count: u32,
    /// Host path of the interceptor library, mounted read-only at `/usr/local/vgpu/libvgpu.so`.
    pub libvgpu_host_path: PathBuf,
    /// Host file mounted read-only at `/etc/ld.so.preload` (one line naming the library); `None`: not
    /// mounted.
    pub ld_so_preload_host_path: Option<PathBuf>,
    /// File holding the HMAC key of decision signatures (the scheduler's Secret, mounted); read on
    /// every Allocate, so a rotated key takes effect at once.
    pub decision_key_file: PathBuf,
    /// How often the kubelet socket is checked for a kubelet restart, milliseconds.
    pub watch_interval_ms: u64,
    /// How often NVML is asked for GPU health, milliseconds.
    pub health_interval_ms: u64,
    /// How long Allocate waits for the pod cache to show a decision before listing once, milliseconds.
    pub cache_wait_ms: u64,
    /// Allocate decides on a fresh list of the node's pods (one API list per Allocate) rather than on
    /// the watch cache, which may lag behind the kubelet's view (see the module docs).
    pub consistent_allocate: bool,
    /// The host's device directory, as the kubelet names device files in Allocate responses (`/dev`).
    /// The agent itself may see it elsewhere (`paths.dev_dir`, e.g. `/host/dev` in the chart).
    pub host_dev_dir: PathBuf,
    /// Host path of the agent's `paths.regions_dir`, as the kubelet mounts region directories; `None`:
    /// the agent sees the host directory at the same path (the chart mounts it so).
    pub host_regions_dir: Option<PathBuf>,
    /// What the interceptor does in a container whose shared region cannot be used: `closed` (refuse
    /// device-memory allocations, the default) or `open` (each process holds itself to the limits
    /// alone). Written into every container's trusted limits file, so the tenant cannot choose.
    pub on_region_error: hami_api::region::RegionFailure,
}

impl Default for DevicePluginConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            plugin_dir: "/var/lib/kubelet/device-plugins".into(),
            socket_name: "hami-nvidia.sock".into(),
            resource_name: hami_api::resources::GPU.into(),
            split_count: 10,
            libvgpu_host_path: "/usr/local/vgpu/libvgpu.so".into(),
            ld_so_preload_host_path: Some("/usr/local/vgpu/ld.so.preload".into()),
            decision_key_file: "/etc/hami/decision-key/key".into(),
            watch_interval_ms: 1000,
            health_interval_ms: 5000,
            cache_wait_ms: 2000,
            consistent_allocate: true,
            host_dev_dir: "/dev".into(),
            host_regions_dir: None,
            on_region_error: hami_api::region::RegionFailure::Closed,
        }
    }
}
