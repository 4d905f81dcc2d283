//! Starting and stopping a simulated node: mount the fake device files, hold the model, unmount on drop.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::fs::{self, FakeDeviceFs, SharedModel};
use crate::model::{DeviceModel, GroundTruth};

/// Environment variable that turns a skipped privileged test into a failure.
pub const REQUIRE_PRIVILEGED_ENV: &str = "HAMI_REQUIRE_PRIVILEGED";

/// Why this process cannot mount a FUSE node, or `Ok` when it can (root and `/dev/fuse`).
///
/// # Errors
/// A human-readable reason.
pub fn privileged_support() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".to_owned());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        return Err("/dev/fuse cannot be opened".to_owned());
    }
    Ok(())
}

/// For tests: true when privileged tests can run. Otherwise prints why and returns false (skip), or
/// panics when `HAMI_REQUIRE_PRIVILEGED=1` (a skip is then a failure).
///
/// # Panics
/// When privileges are missing and required.
#[must_use]
pub fn privileged_or_skip(test: &str) -> bool {
    match privileged_support() {
        Ok(()) => true,
        Err(why) => {
            let required = std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: privileged test cannot run ({why}) and {REQUIRE_PRIVILEGED_ENV}=1"
            );
            // Straight to stderr, not through eprintln!, so the test harness does not swallow it.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {why} (set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure)"
            );
            false
        }
    }
}

/// Whether `path` is a mount point now (from `/proc/self/mountinfo`).
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path
        .canonicalize()
        .or_else(|_| Ok::<_, io::Error>(path.to_path_buf()))
    else {
        return false;
    };
    let want = canon.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str())))
        .unwrap_or(false)
}

/// A mounted simulated node. Dropping it unmounts the files and removes a directory it created.
#[derive(Debug)]
pub struct FakeNode {
    dir: PathBuf,
    created_dir: bool,
    model: SharedModel,
    session: Option<BackgroundSession>,
    open_files: Arc<AtomicUsize>,
}

impl FakeNode {
    /// Mounts the fake device files for `model` at `dir` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created or the FUSE mount fails.
    pub fn start(dir: &Path, model: DeviceModel) -> io::Result<Self> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let model: SharedModel = Arc::new(Mutex::new(model));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("hami-fake-gpu".to_owned()),
            MountOption::Subtype("hami-fake-gpu".to_owned()),
            MountOption::NoExec,
            MountOption::NoSuid,
        ];
        config.acl = SessionACL::All;
        let fs = FakeDeviceFs::new(Arc::clone(&model));
        let open_files = fs.open_count();
        let session = match fuser::spawn_mount(fs, dir, &config) {
            Ok(s) => s,
            Err(e) => {
                if created_dir {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            created_dir,
            model,
            session: Some(session),
            open_files,
        })
    }

    /// Mounts at a fresh directory under the system temp dir.
    ///
    /// # Errors
    /// As [`FakeNode::start`].
    pub fn start_temp(model: DeviceModel) -> io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hami-fake-gpu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        Self::start(&dir, model)
    }

    /// The mount directory (holds `nvidiactl`, `nvidia<N>`, the ground-truth and control files).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shared model (in-process access; other processes read the ground-truth file).
    #[must_use]
    pub fn model(&self) -> &SharedModel {
        &self.model
    }

    /// What is allocated now.
    #[must_use]
    pub fn ground_truth(&self) -> GroundTruth {
        fs::lock(&self.model).snapshot()
    }

    /// Unmounts, waits for the server thread and removes the directory if this node created it.
    ///
    /// # Errors
    /// Unmounting or joining failed.
    pub fn stop(mut self) -> io::Result<()> {
        self.teardown()
    }

    /// Unmounting never blocks on tenants: the mount is detached lazily (it leaves the namespace at
    /// once). With no file open, the kernel then ends the FUSE connection and the server thread is
    /// joined. With files still open (a tenant alive), the connection is aborted through fusectl
    /// (`/sys/fs/fuse/connections/<dev>/abort`) when that is mounted, and the thread joined; otherwise the
    /// thread is left to end when the last tenant closes its files.
    fn teardown(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let conn = std::fs::metadata(&self.dir).ok().map(|m| {
            let dev = m.dev();
            // The FUSE connection id is the mount's device number (major 0 for anonymous devices).
            libc::minor(dev)
        });
        let detached = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let mut result = detached.map_err(io::Error::from);
        let busy = self.open_files.load(Ordering::SeqCst) > 0;
        let abort = conn.map(|c| PathBuf::from(format!("/sys/fs/fuse/connections/{c}/abort")));
        let aborted = busy && abort.is_some_and(|p| p.exists() && std::fs::write(&p, "1").is_ok());
        if !busy || aborted {
            // The connection ends (superblock destroyed or aborted), so the server loop returns.
            result = result.and(session.join());
        } else {
            drop(session);
        }
        if self.created_dir && !is_mounted(&self.dir) {
            let _ = std::fs::remove_dir(&self.dir);
        }
        result
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("hami-fake-gpu: unmounting {}: {e}", self.dir.display());
        }
    }
}
