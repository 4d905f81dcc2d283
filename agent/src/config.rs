//! The agent's one configuration structure (JSON file, every field optional with the default shown).
//!
//! ```json
//! {
//!   "node_name": "",                      // default: $NODE_NAME, else the host name
//!   "listen": "0.0.0.0:9394",            // HTTP: /metrics (Prometheus text), /snapshot (JSON), /healthz
//!   "interval_ms": 1000,                 // how often the cgroup index is refreshed and state saved
//!   "retain_terminated_secs": 300,       // chargeback counters of finished containers stay this long
//!   "syscall_hook": "auto",             // "tracepoint" (ioctl only; needs tracefs), "raw" (every
//!                                        // syscall; no tracefs), "auto": tracepoint when tracefs is up
//!   "hard_limit": false,                 // kill (SIGKILL from eBPF) a process that takes its container
//!                                        // past the limit in its shared region
//!   "driver_version": null,              // e.g. "595.45.04"; default: read paths.driver_version_file
//!   "libcuda": ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"],  // uprobe targets (a missing file or
//!                                        // symbol is a warning and a metric, not an error)
//!   "nvml_lib": null,                    // NVML for discovery; default libnvidia-ml.so.1
//!   "paths": {
//!     "dev_dir": "/dev",                 // nvidiactl, nvidia<N>, nvidia-uvm are looked up here
//!     "mounts": "/proc/self/mounts",     // to find the cgroup2 mount
//!     "proc": "/proc",                   // host procfs (pid → cgroup for NVML utilisation samples)
//!     "cgroup_root": null,               // cgroup2 mount; default: from `mounts`
//!     "bpffs": "/sys/fs/bpf/hami",       // pinned maps and links; programs stay attached across agent
//!                                        // restarts (`hami-agent detach` removes them); bpffs is mounted
//!                                        // at /sys/fs/bpf when missing
//!     "btf": "/sys/kernel/btf/vmlinux",
//!     "driver_version_file": "/sys/module/nvidia/version",
//!     "state_dir": "/var/lib/hami/agent", // attribution state saved across restarts
//!     "regions_dir": "/usr/local/vgpu/containers" // containers' shared regions: the agent writes the
//!                                        // kernel-observed memory and SM utilisation into them
//!   }
//! }
//! ```
//!
//! Privileges (the minimum, all on the host): `CAP_BPF` and `CAP_PERFMON` (load programs, attach
//! raw tracepoints and uprobes, read kernel memory from them), `CAP_SYS_RESOURCE` only on kernels older
//! than 5.11 (memlock accounting), read access to `/sys/kernel/btf/vmlinux` and the cgroup2 mount,
//! write access to the bpffs directory and `state_dir`, and the host PID namespace (`hostPID: true`) so
//! that pids and cgroup ids are the host's. No tracefs is needed: the programs use raw tracepoints.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// Host paths, all overridable so tests point them at fixtures and a simulated node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostPaths {
    /// Directory holding the NVIDIA device files.
    pub dev_dir: PathBuf,
    /// A `/proc/self/mounts`-format file.
    pub mounts: PathBuf,
    /// The host's procfs (for pid → cgroup of NVML samples).
    pub proc: PathBuf,
    /// The cgroup2 mount (default: found in `mounts`).
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    pub bpffs: PathBuf,
    /// Kernel BTF.
    pub btf: PathBuf,
    /// File holding the NVIDIA driver version.
    pub driver_version_file: PathBuf,
    /// Directory for the saved attribution state.
    pub state_dir: PathBuf,
    /// Where the containers' shared regions live (the device plugin's per-container directories);
    /// the agent writes the kernel's view into them. Missing: nothing is published.
    pub regions_dir: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            dev_dir: "/dev".into(),
            mounts: "/proc/self/mounts".into(),
            proc: "/proc".into(),
            cgroup_root: None,
            bpffs: "/sys/fs/bpf/hami".into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            driver_version_file: "/sys/module/nvidia/version".into(),
            state_dir: "/var/lib/hami/agent".into(),
            regions_dir: "/usr/local/vgpu/containers".into(),
        }
    }
}

/// How the programs hook the `ioctl` syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyscallHook {
    /// `tracepoint` when tracefs is mounted, else `raw`.
    #[default]
    Auto,
    /// Classic `syscalls:sys_{enter,exit}_ioctl` tracepoints: run for ioctls only. Needs tracefs
    /// (mounted at `/sys/kernel/tracing` by the agent when missing).
    Tracepoint,
    /// Raw `sys_enter`/`sys_exit` tracepoints: no tracefs needed, but they run (and return at once)
    /// for every syscall on the node.
    Raw,
}

/// Agent configuration (see the module documentation for the file format and defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Node name used in metric labels (default: `$NODE_NAME`, else the host name).
    pub node_name: String,
    /// HTTP listen address.
    pub listen: String,
    /// Housekeeping interval, milliseconds.
    pub interval_ms: u64,
    /// How long a finished container's counters are still exported, seconds.
    pub retain_terminated_secs: u64,
    /// How the ioctl syscall is hooked.
    pub syscall_hook: SyscallHook,
    /// Kernel hard limit: a process whose device-memory allocation takes its container past the limit
    /// in its shared region is killed from the eBPF program (SIGKILL; its memory is freed at exit).
    pub hard_limit: bool,
    /// Driver version override.
    pub driver_version: Option<String>,
    /// libcuda files to attach the uprobes to.
    pub libcuda: Vec<PathBuf>,
    /// NVML library for discovery (default: `libnvidia-ml.so.1` from the loader path).
    pub nvml_lib: Option<PathBuf>,
    /// Host paths.
    pub paths: HostPaths,
    /// Kubelet device plugin.
    pub device_plugin: crate::deviceplugin::DevicePluginConfig,
    /// Node registration (inventory and usage annotations).
    pub registration: crate::registration::RegistrationConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            listen: "0.0.0.0:9394".into(),
            interval_ms: 1000,
            retain_terminated_secs: 300,
            syscall_hook: SyscallHook::Auto,
            hard_limit: false,
            driver_version: None,
            libcuda: vec!["/usr/lib/x86_64-linux-gnu/libcuda.so.1".into()],
            nvml_lib: None,
            paths: HostPaths::default(),
            device_plugin: crate::deviceplugin::DevicePluginConfig::default(),
            registration: crate::registration::RegistrationConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Parses a JSON configuration.
    ///
    /// # Errors
    /// Invalid JSON, unknown fields, or values out of range (zero interval).
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| AgentError::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        if c.interval_ms == 0 {
            return Err(AgentError::Config {
                path: path.into(),
                message: "interval_ms must be at least 1".into(),
            });
        }
        c.registration.validate().map_err(|message| AgentError::Config {
            path: path.into(),
            message,
        })?;
        // The kubelet's replicas per GPU and the registered slots must agree, or the scheduler places
        // pods the kubelet cannot admit (or leaves replicas unused).
        if c.registration.enabled
            && c.device_plugin.enabled
            && c.registration.device_split_count != c.device_plugin.split_count
        {
            return Err(AgentError::Config {
                path: path.into(),
                message: format!(
                    "registration.device_split_count ({}) differs from device_plugin.split_count ({})",
                    c.registration.device_split_count, c.device_plugin.split_count
                ),
            });
        }
        Ok(c)
    }

    /// Reads and parses a JSON configuration file.
    ///
    /// # Errors
    /// The file cannot be read, or see [`AgentConfig::from_json`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::io(path, e))?;
        Self::from_json(path, &text)
    }

    /// The node name: the configured one, else `$NODE_NAME`, else the host name.
    #[must_use]
    pub fn effective_node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        if let Ok(n) = std::env::var("NODE_NAME")
            && !n.is_empty()
        {
            return n;
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let p = Path::new("agent.json");
        assert_eq!(AgentConfig::from_json(p, "{}").unwrap(), AgentConfig::default());
        let c = AgentConfig::from_json(
            p,
            r#"{"listen":"127.0.0.1:1","paths":{"dev_dir":"/tmp/x"},"driver_version":"530.41.03"}"#,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.paths.dev_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.paths.btf, PathBuf::from("/sys/kernel/btf/vmlinux"));
        assert_eq!(c.driver_version.as_deref(), Some("530.41.03"));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let p = Path::new("agent.json");
        let e = AgentConfig::from_json(p, r#"{"listn":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.json") && e.contains("listn"), "{e}");
        let e = AgentConfig::from_json(p, r#"{"interval_ms":0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval_ms"), "{e}");
        assert!(AgentConfig::from_json(p, "{").is_err());
        let e = AgentConfig::from_json(p, r#"{"registration":{"heartbeat_secs":0}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("registration.heartbeat_secs"), "{e}");
        let split = |r: u32, d: u32| {
            format!(
                r#"{{"registration":{{"enabled":true,"device_split_count":{r}}},"device_plugin":{{"enabled":true,"split_count":{d}}}}}"#
            )
        };
        let e = AgentConfig::from_json(p, &split(4, 10)).unwrap_err().to_string();
        assert!(
            e.contains("device_split_count (4)") && e.contains("split_count (10)"),
            "{e}"
        );
        assert!(AgentConfig::from_json(p, &split(4, 4)).is_ok());
    }
}
