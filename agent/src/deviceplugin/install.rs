//! Installs the interceptor on the host for Allocate responses to mount: `<dir>/libvgpu.so` (copied from
//! the agent image) and `<dir>/ld.so.preload` (one line, the library's path inside GPU containers), the
//! files `device_plugin.libvgpu_host_path` and `ld_so_preload_host_path` name. Run by the chart's init
//! container (`hami-agent install-interceptor`) before the agent starts.
//!
//! Each file is replaced atomically (written beside it, then renamed), so a container starting at that
//! moment maps either the old or the new library, never a torn one; a file whose content is already
//! right is left alone (a running container's mapping stays the same inode).

use std::path::Path;

use crate::error::{AgentError, Result};

/// File name of the library in the install directory.
pub const LIBRARY_FILE: &str = "libvgpu.so";

/// File name of the preload list in the install directory.
pub const PRELOAD_FILE: &str = "ld.so.preload";

/// What [`install_interceptor`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The library was (re)written.
    pub library: bool,
    /// The preload list was (re)written.
    pub preload: bool,
}

/// Copies `library` to `<dir>/libvgpu.so` and writes `<dir>/ld.so.preload` naming
/// `container_library` (the path GPU containers see, `/usr/local/vgpu/libvgpu.so`), each only when its
/// content differs. `dir` is created if missing.
///
/// # Errors
/// [`AgentError::Io`] naming the file that could not be read, written or renamed.
pub fn install_interceptor(library: &Path, dir: &Path, container_library: &str) -> Result<Installed> {
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let bytes = std::fs::read(library).map_err(|e| AgentError::io(library, e))?;
    let preload = format!("{container_library}\n");
    Ok(Installed {
        library: replace_if_different(&dir.join(LIBRARY_FILE), &bytes, 0o755)?,
        preload: replace_if_different(&dir.join(PRELOAD_FILE), preload.as_bytes(), 0o644)?,
    })
}

fn replace_if_different(path: &Path, content: &[u8], mode: u32) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp-install");
    std::fs::write(&tmp, content).map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e))?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn installs_once_and_replaces_atomically_on_change() {
        let root = std::env::temp_dir().join(format!("hami-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let src = root.join("src.so");
        std::fs::write(&src, b"v1").unwrap();
        let dir = root.join("vgpu");
        let first = install_interceptor(&src, &dir, "/usr/local/vgpu/libvgpu.so").unwrap();
        assert_eq!(
            first,
            Installed {
                library: true,
                preload: true
            }
        );
        assert_eq!(std::fs::read(dir.join(LIBRARY_FILE)).unwrap(), b"v1");
        assert_eq!(
            std::fs::read_to_string(dir.join(PRELOAD_FILE)).unwrap(),
            "/usr/local/vgpu/libvgpu.so\n"
        );
        let ino = std::fs::metadata(dir.join(LIBRARY_FILE)).unwrap().ino();
        // Same content: nothing rewritten, same inode for running containers.
        let again = install_interceptor(&src, &dir, "/usr/local/vgpu/libvgpu.so").unwrap();
        assert_eq!(
            again,
            Installed {
                library: false,
                preload: false
            }
        );
        assert_eq!(std::fs::metadata(dir.join(LIBRARY_FILE)).unwrap().ino(), ino);
        // New library: a new inode (the old mapping stays valid), no temp file left.
        std::fs::write(&src, b"v2").unwrap();
        let upgraded = install_interceptor(&src, &dir, "/usr/local/vgpu/libvgpu.so").unwrap();
        assert_eq!(
            upgraded,
            Installed {
                library: true,
                preload: false
            }
        );
        assert_ne!(std::fs::metadata(dir.join(LIBRARY_FILE)).unwrap().ino(), ino);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        // A missing source is an error naming it.
        let e = install_interceptor(&root.join("missing.so"), &dir, "/x").unwrap_err();
        assert!(e.to_string().contains("missing.so"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
