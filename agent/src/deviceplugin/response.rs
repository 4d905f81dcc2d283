//! What a container receives from Allocate (pure): env, mounts and device nodes, HAMi §1.5
//! (`reference/hami.md`), with host paths from the configuration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hami_api::ContainerDevices;
use hami_api::env as vars;

use crate::deviceplugin::proto;
use crate::error::{AgentError, Result};

/// Container directory of the shared region (the interceptor trusts a region found here).
pub const CONTAINER_REGION_DIR: &str = "/usr/local/vgpu";

/// Container path of the interceptor library.
pub const CONTAINER_LIBVGPU: &str = "/usr/local/vgpu/libvgpu.so";

/// Container path of the shared region file (`CUDA_DEVICE_MEMORY_SHARED_CACHE`), inside
/// [`CONTAINER_REGION_DIR`].
pub const CONTAINER_REGION_FILE: &str = "/usr/local/vgpu/vgpu.cache";

/// Container path of the trusted limits file (read-only bind mount of [`limits_path`]).
pub const CONTAINER_LIMITS_FILE: &str = hami_api::region::CONTAINER_LIMITS_FILE;

/// Container path of the preload list.
pub const CONTAINER_LD_SO_PRELOAD: &str = "/etc/ld.so.preload";

/// Host paths the response names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// The interceptor library.
    pub libvgpu: PathBuf,
    /// The preload list file, when mounted.
    pub ld_so_preload: Option<PathBuf>,
    /// Parent of the containers' region directories as the agent sees it (agent `paths.regions_dir`):
    /// where the directories are created.
    pub regions_dir: PathBuf,
    /// The same directory on the host (`device_plugin.host_regions_dir`, else `regions_dir`): what the
    /// response mounts.
    pub host_regions_dir: PathBuf,
    /// Directory of the NVIDIA device files on the host (`device_plugin.host_dev_dir`).
    pub dev_dir: PathBuf,
}

fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The host directory of a container's shared region: `<regions_dir>/<pod UID>_<container>`, HAMi's
/// layout (and what the agent's region writer scans).
///
/// # Errors
/// A UID or container name that could leave `regions_dir` (empty, `/`, `..`, other characters than
/// `[A-Za-z0-9._-]`).
pub fn region_dir(regions_dir: &Path, pod_uid: &str, container: &str) -> Result<PathBuf> {
    if !is_safe_name(pod_uid) || !is_safe_name(container) {
        return Err(AgentError::plugin(
            "region directory",
            format!("refusing pod UID `{pod_uid}` / container `{container}` as a file name"),
        ));
    }
    Ok(regions_dir.join(format!("{pod_uid}_{container}")))
}

/// The host path of a container's trusted limits file: `<region dir>.limits`, beside the
/// tenant-writable region directory (in `regions_dir`, which only the agent writes).
#[must_use]
pub fn limits_path(region: &Path) -> PathBuf {
    let mut p = region.as_os_str().to_owned();
    p.push(hami_api::region::LIMITS_SUFFIX);
    PathBuf::from(p)
}

/// The trusted limits of a container given `devices` (in container order): bytes and SM percent per
/// device, with its UUID, the interceptor's failure policy and the container's task priority.
#[must_use]
pub fn trusted_limits(
    devices: &ContainerDevices,
    on_region_error: hami_api::region::RegionFailure,
    priority: u32,
) -> hami_api::region::TrustedLimits {
    hami_api::region::TrustedLimits {
        version: hami_api::region::LIMITS_VERSION,
        devices: devices
            .0
            .iter()
            .map(|d| hami_api::region::DeviceLimit {
                uuid: d.uuid.clone(),
                memory_bytes: d.memory_mib.saturating_mul(1 << 20),
                sm_percent: d.cores.min(100),
            })
            .collect(),
        on_region_error,
        priority,
    }
}

/// The response for a container given `devices` (in container order) and its task `priority`, whose
/// region directory is `region` on the host. `minors` maps GPU UUIDs to device minors.
///
/// # Errors
/// A device UUID that is not a GPU of this node.
pub fn container_response(
    devices: &ContainerDevices,
    priority: u32,
    minors: &HashMap<String, u32>,
    region: &Path,
    host: &HostLayout,
) -> Result<proto::ContainerAllocateResponse> {
    let mut envs = HashMap::new();
    envs.insert(vars::CUDA_TASK_PRIORITY.to_owned(), priority.to_string());
    let uuids: Vec<&str> = devices.0.iter().map(|d| d.uuid.as_str()).collect();
    envs.insert(vars::NVIDIA_VISIBLE_DEVICES.to_owned(), uuids.join(","));
    for (i, d) in devices.0.iter().enumerate() {
        envs.insert(
            vars::memory_limit_var(i),
            vars::format_memory_limit_mib(d.memory_mib),
        );
    }
    let cores = devices.0.first().map_or(0, |d| d.cores);
    envs.insert(vars::CUDA_DEVICE_SM_LIMIT.to_owned(), cores.to_string());
    envs.insert(
        vars::CUDA_DEVICE_MEMORY_SHARED_CACHE.to_owned(),
        CONTAINER_REGION_FILE.to_owned(),
    );

    let mount = |container: &str, host: &Path, read_only: bool| proto::Mount {
        container_path: container.to_owned(),
        host_path: host.to_string_lossy().into_owned(),
        read_only,
    };
    let mut mounts = vec![
        mount(CONTAINER_REGION_DIR, region, false),
        mount(CONTAINER_LIMITS_FILE, &limits_path(region), true),
        mount(CONTAINER_LIBVGPU, &host.libvgpu, true),
    ];
    if let Some(p) = &host.ld_so_preload {
        mounts.push(mount(CONTAINER_LD_SO_PRELOAD, p, true));
    }

    let dev = |name: &str| proto::DeviceSpec {
        container_path: format!("/dev/{name}"),
        host_path: host.dev_dir.join(name).to_string_lossy().into_owned(),
        permissions: "rw".to_owned(),
    };
    let mut specs = vec![dev("nvidiactl"), dev("nvidia-uvm")];
    for d in &devices.0 {
        let minor = minors
            .get(&d.uuid)
            .ok_or_else(|| AgentError::UnknownDevice { id: d.uuid.clone() })?;
        specs.push(dev(&format!("nvidia{minor}")));
    }
    Ok(proto::ContainerAllocateResponse {
        envs,
        mounts,
        devices: specs,
        annotations: HashMap::new(),
        cdi_devices: Vec::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use hami_api::ContainerDevice;

    use super::*;

    #[test]
    fn hami_env_mounts_and_devices() {
        let host = HostLayout {
            libvgpu: "/opt/hami/libvgpu.so".into(),
            ld_so_preload: Some("/opt/hami/ld.so.preload".into()),
            regions_dir: "/r".into(),
            host_regions_dir: "/r".into(),
            dev_dir: "/hostdev".into(),
        };
        let minors = HashMap::from([("GPU-a".to_owned(), 2), ("GPU-b".to_owned(), 5)]);
        let devices = ContainerDevices(vec![
            ContainerDevice::new("GPU-b", "NVIDIA", 3000, 30),
            ContainerDevice::new("GPU-a", "NVIDIA", 5000, 0),
        ]);
        let region = region_dir(&host.regions_dir, "uid-1", "app").unwrap();
        assert_eq!(region, Path::new("/r/uid-1_app"));
        let r = container_response(&devices, 0, &minors, &region, &host).unwrap();
        let env = |k: &str| r.envs.get(k).map(String::as_str);
        assert_eq!(env("NVIDIA_VISIBLE_DEVICES"), Some("GPU-b,GPU-a"));
        assert_eq!(env("CUDA_DEVICE_MEMORY_LIMIT_0"), Some("3000m"));
        assert_eq!(env("CUDA_DEVICE_MEMORY_LIMIT_1"), Some("5000m"));
        assert_eq!(env("CUDA_DEVICE_SM_LIMIT"), Some("30"));
        assert_eq!(
            env("CUDA_DEVICE_MEMORY_SHARED_CACHE"),
            Some("/usr/local/vgpu/vgpu.cache")
        );
        assert_eq!(env("CUDA_TASK_PRIORITY"), Some("0"));
        assert_eq!(r.envs.len(), 6);
        let m: Vec<(&str, &str, bool)> = r
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            m,
            [
                ("/usr/local/vgpu", "/r/uid-1_app", false),
                ("/usr/local/vgpu/limits", "/r/uid-1_app.limits", true),
                ("/usr/local/vgpu/libvgpu.so", "/opt/hami/libvgpu.so", true),
                ("/etc/ld.so.preload", "/opt/hami/ld.so.preload", true),
            ]
        );
        let d: Vec<(&str, &str)> = r
            .devices
            .iter()
            .map(|d| (d.container_path.as_str(), d.host_path.as_str()))
            .collect();
        assert_eq!(
            d,
            [
                ("/dev/nvidiactl", "/hostdev/nvidiactl"),
                ("/dev/nvidia-uvm", "/hostdev/nvidia-uvm"),
                ("/dev/nvidia5", "/hostdev/nvidia5"),
                ("/dev/nvidia2", "/hostdev/nvidia2"),
            ]
        );
        assert!(r.devices.iter().all(|d| d.permissions == "rw"));
        let t = trusted_limits(&devices, hami_api::region::RegionFailure::Closed, 0);
        let t = hami_api::region::TrustedLimits::parse(t.to_json().as_bytes()).unwrap();
        assert_eq!(t.memory_limits(), [3000 << 20, 5000 << 20]);
        assert_eq!(t.sm_limits(), [30, 0]);
        assert_eq!((t.index_of("GPU-b"), t.index_of("GPU-a")), (Some(0), Some(1)));
        assert_eq!(t.priority, hami_api::region::PRIORITY_HIGH);
        let unknown = ContainerDevices(vec![ContainerDevice::new("GPU-z", "NVIDIA", 1, 0)]);
        assert!(container_response(&unknown, 1, &minors, &region, &host).is_err());
    }

    #[test]
    fn region_dir_names_cannot_escape() {
        for (uid, c) in [("..", "a"), ("u", "../x"), ("u/v", "a"), ("", "a"), ("u", "")] {
            assert!(region_dir(Path::new("/r"), uid, c).is_err(), "{uid} {c}");
        }
    }
}
