//! From a cgroup to the container and pod it belongs to.
//!
//! The kubelet names pod cgroups after the pod UID and the container runtime names container cgroups
//! after the container ID. Layouts recognised (cgroup v2 unified paths and cgroup v1 per-controller
//! paths look the same below the mount point):
//!
//! | driver / runtime | container cgroup |
//! |---|---|
//! | systemd + containerd | `…/kubepods-<qos>-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | systemd + CRI-O | `…/kubepods-<qos>-pod<uid>.slice/crio-<id>.scope` (`crio-conmon-<id>.scope` is the monitor, not the container) |
//! | systemd + Docker (cri-dockerd) | `…/kubepods-<qos>-pod<uid>.slice/docker-<id>.scope` |
//! | cgroupfs (any runtime) | `/kubepods/<qos>/pod<uid>/<id>` or `/kubepods/pod<uid>/<id>` (guaranteed) |
//! | containerd on a v1 systemd hierarchy | `…/kubepods-<qos>-pod<uid>.slice:cri-containerd:<id>` |
//!
//! `<id>` is the 64-hex-digit container ID; `<qos>` is `burstable` or `besteffort` (absent for
//! guaranteed pods). Sources: kubelet `pkg/kubelet/cm/cgroup_manager_linux.go` (slice naming with `-`
//! → `_` escaping of the UID), containerd/CRI-O/cri-dockerd scope prefixes.
//!
//! [`identify`] is pure; [`CgroupIndex`] is the thin I/O edge that maps a cgroup v2 id (the directory's
//! inode number, what `bpf_get_current_cgroup_id` returns) to its path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The container runtime that created a container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// containerd (`cri-containerd-` scopes or cgroupfs).
    Containerd,
    /// CRI-O (`crio-` scopes).
    Crio,
    /// Docker / cri-dockerd (`docker-` scopes).
    Docker,
    /// A cgroupfs-driver path, which does not name the runtime.
    Unknown,
}

/// Kubernetes QoS class of the pod, from the pod cgroup's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    /// `Guaranteed` (pod cgroup directly under `kubepods`).
    Guaranteed,
    /// `Burstable`.
    Burstable,
    /// `BestEffort`.
    BestEffort,
}

/// What a cgroup path says about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    /// Pod UID in its canonical dashed form (`8-4-4-4-12` hex), when the path is under a pod cgroup.
    pub pod_uid: Option<String>,
    /// Container ID (64 lowercase hex digits), when the path is a container cgroup.
    pub container_id: Option<String>,
    /// Runtime, when a container was recognised.
    pub runtime: Option<Runtime>,
    /// QoS class, when a pod was recognised.
    pub qos: Option<QosClass>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn canonical_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| uid.to_ascii_lowercase())
}

/// Parses one path component as a pod cgroup: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid>.slice` (systemd). Returns the UID and the QoS named in the slice.
fn pod_component(c: &str) -> Option<(String, Option<QosClass>)> {
    if let Some(rest) = c.strip_prefix("pod") {
        return canonical_uid(rest).map(|u| (u, None));
    }
    let slice = c.strip_suffix(".slice")?;
    let (prefix, uid) = slice.rsplit_once("-pod")?;
    let qos = match prefix {
        "kubepods" => Some(QosClass::Guaranteed),
        "kubepods-burstable" => Some(QosClass::Burstable),
        "kubepods-besteffort" => Some(QosClass::BestEffort),
        _ => return None,
    };
    canonical_uid(uid).map(|u| (u, qos))
}

fn container_component(c: &str) -> Option<(String, Runtime)> {
    let scoped = |prefix: &str, rt: Runtime| {
        c.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".scope"))
            .filter(|id| is_container_id(id))
            .map(|id| (id.to_owned(), rt))
    };
    scoped("cri-containerd-", Runtime::Containerd)
        .or_else(|| scoped("crio-", Runtime::Crio))
        .or_else(|| scoped("docker-", Runtime::Docker))
        .or_else(|| is_container_id(c).then(|| (c.to_owned(), Runtime::Unknown)))
}

/// Identifies the pod and container of a cgroup path (relative to a cgroup mount or absolute; the
/// mount point itself is not interpreted). Unknown layouts give an empty [`Identity`]; a path under a
/// pod but not in a container (the pod's own or the sandbox's cgroup) gives only the pod.
#[must_use]
pub fn identify(path: &str) -> Identity {
    let mut id = Identity::default();
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in comps.iter().enumerate() {
        // containerd on a cgroup v1 systemd hierarchy: "<pod slice>:cri-containerd:<id>".
        if let Some((slice, rest)) = c.split_once(':') {
            if let (Some((uid, qos)), Some(cid)) = (
                pod_component(slice),
                rest.strip_prefix("cri-containerd:")
                    .filter(|r| is_container_id(r)),
            ) {
                id.pod_uid = Some(uid);
                id.qos = qos;
                id.container_id = Some(cid.to_owned());
                id.runtime = Some(Runtime::Containerd);
                return id;
            }
            continue;
        }
        if let Some((uid, qos)) = pod_component(c) {
            let parent = i.checked_sub(1).and_then(|p| comps.get(p)).copied();
            id.qos = qos.or(match parent {
                Some("burstable") => Some(QosClass::Burstable),
                Some("besteffort") => Some(QosClass::BestEffort),
                Some("kubepods") => Some(QosClass::Guaranteed),
                _ => None,
            });
            id.pod_uid = Some(uid);
            continue;
        }
        if id.pod_uid.is_some()
            && let Some((cid, rt)) = container_component(c)
        {
            id.container_id = Some(cid);
            id.runtime = Some(rt);
            return id;
        }
    }
    id
}

/// Maps cgroup v2 ids (directory inode numbers) under a cgroup2 mount to their paths relative to the
/// mount. Rescans the tree on a miss, at most once per [`CgroupIndex::refresh`] generation. Paths of
/// removed cgroups are remembered until [`CgroupIndex::forget`].
#[derive(Debug)]
pub struct CgroupIndex {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    scanned: bool,
}

impl CgroupIndex {
    /// An index over the cgroup2 mount at `root`.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            by_id: HashMap::new(),
            scanned: false,
        }
    }

    /// Allows the next miss to rescan (call once per snapshot interval).
    pub fn refresh(&mut self) {
        self.scanned = false;
    }

    /// The path of cgroup `id` relative to the mount (`/` for the root), if it exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        if !self.scanned {
            self.scan();
        }
        self.by_id.get(&id).cloned()
    }

    /// Drops what is known about cgroup `id` (after the agent forgot the cgroup).
    pub fn forget(&mut self, id: u64) {
        self.by_id.remove(&id);
    }

    /// Whether cgroup `id` still exists (its directory is present).
    pub fn exists(&mut self, id: u64) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match self.path_of(id) {
            Some(p) => {
                std::fs::metadata(self.root.join(p.trim_start_matches('/'))).is_ok_and(|m| m.ino() == id)
            }
            None => false,
        }
    }

    fn scan(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        self.scanned = true;
        // Entries of removed cgroups are kept (cgroup ids are never reused while the system runs), so a
        // finished container keeps its identity until the agent forgets it.
        let mut stack: Vec<(PathBuf, String)> = vec![(self.root.clone(), "/".to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            if let Ok(md) = std::fs::metadata(&dir) {
                self.by_id.insert(md.ino(), rel.clone());
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child_rel = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((e.path(), child_rel));
                }
            }
        }
    }
}

/// The cgroup v2 id of process `pid`: its `0::<path>` line in `<proc_root>/<pid>/cgroup`, resolved to
/// the directory's inode under the cgroup2 mount `cgroup_root`. `None` when the process is gone or is
/// not in a v2 cgroup.
#[must_use]
pub fn cgroup_id_of_pid(proc_root: &Path, cgroup_root: &Path, pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(cgroup_root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

/// The cgroup2 mount point listed in a `/proc/self/mounts`-format file (first match), e.g.
/// `/sys/fs/cgroup` on a unified host or `/sys/fs/cgroup/unified` on a hybrid one.
///
/// # Errors
/// The mounts file cannot be read (`None` is returned when no cgroup2 mount is listed).
pub fn cgroup2_mount(mounts_file: &Path) -> std::io::Result<Option<PathBuf>> {
    let text = std::fs::read_to_string(mounts_file)?;
    Ok(text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(mnt))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f4a9c2e1b0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";
    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn uid_us() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn fixture_table() {
        let us = uid_us();
        type Case<'a> = (
            String,
            Option<&'a str>,
            Option<&'a str>,
            Option<Runtime>,
            Option<QosClass>,
        );
        let cases: Vec<Case<'_>> = vec![
            // cgroup v2, systemd driver, containerd.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/cri-containerd-{CID}.scope"
                ),
                Some(UID),
                Some(CID),
                Some(Runtime::Containerd),
                Some(QosClass::Burstable),
            ),
            // cgroup v2, systemd, CRI-O, guaranteed pod.
            (
                format!("/kubepods.slice/kubepods-pod{us}.slice/crio-{CID}.scope"),
                Some(UID),
                Some(CID),
                Some(Runtime::Crio),
                Some(QosClass::Guaranteed),
            ),
            // CRI-O's conmon scope is not the container.
            (
                format!("/kubepods.slice/kubepods-pod{us}.slice/crio-conmon-{CID}.scope"),
                Some(UID),
                None,
                None,
                Some(QosClass::Guaranteed),
            ),
            // systemd + cri-dockerd, best effort.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{us}.slice/docker-{CID}.scope"
                ),
                Some(UID),
                Some(CID),
                Some(Runtime::Docker),
                Some(QosClass::BestEffort),
            ),
            // cgroupfs driver (v1 controller path or v2), burstable.
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                Some(UID),
                Some(CID),
                Some(Runtime::Unknown),
                Some(QosClass::Burstable),
            ),
            // cgroupfs, guaranteed.
            (
                format!("/kubepods/pod{UID}/{CID}"),
                Some(UID),
                Some(CID),
                Some(Runtime::Unknown),
                Some(QosClass::Guaranteed),
            ),
            // containerd on a v1 systemd hierarchy.
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{us}.slice:cri-containerd:{CID}"
                ),
                Some(UID),
                Some(CID),
                Some(Runtime::Containerd),
                Some(QosClass::Burstable),
            ),
            // Pod cgroup only.
            (
                format!("/kubepods/besteffort/pod{UID}"),
                Some(UID),
                None,
                None,
                Some(QosClass::BestEffort),
            ),
            // Not Kubernetes.
            (
                format!("/system.slice/docker-{CID}.scope"),
                None,
                None,
                None,
                None,
            ),
            (
                "/user.slice/user-0.slice/session-1.scope".to_owned(),
                None,
                None,
                None,
                None,
            ),
            ("/".to_owned(), None, None, None, None),
            // Malformed UID or ID.
            (
                format!("/kubepods/burstable/podnot-a-uid/{CID}"),
                None,
                None,
                None,
                None,
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{}", &CID[..63]),
                Some(UID),
                None,
                None,
                Some(QosClass::Burstable),
            ),
        ];
        for (path, uid, cid, rt, qos) in cases {
            let id = identify(&path);
            assert_eq!(id.pod_uid.as_deref(), uid, "{path}");
            assert_eq!(id.container_id.as_deref(), cid, "{path}");
            assert_eq!(id.runtime, rt, "{path}");
            assert_eq!(id.qos, qos, "{path}");
        }
    }

    #[test]
    fn mounts_parsing() {
        let dir = std::env::temp_dir().join(format!("hami-mounts-{}", std::process::id()));
        std::fs::write(
            &dir,
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
        )
        .unwrap();
        assert_eq!(
            cgroup2_mount(&dir).unwrap(),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        std::fs::write(&dir, "proc /proc proc rw 0 0\n").unwrap();
        assert_eq!(cgroup2_mount(&dir).unwrap(), None);
        std::fs::remove_file(&dir).unwrap();
    }
}
