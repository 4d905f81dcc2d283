//! Facts about the running kernel and driver that the eBPF programs need at load time: structure
//! offsets from the kernel's BTF, the driver's ioctl layout generation, and device numbers.

use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation};
use hami_ebpf_common::{AbiConfig, FileKey, KernelOffsets};

use crate::error::{AgentError, Result};

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).ok();
        let slice = start
            .and_then(|s| s.checked_add(buffer.len()).map(|e| (s, e)))
            .and_then(|(s, e)| self.0.get(s..e));
        match slice {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// Reads the offsets of `task_struct.files/tgid/pid`, `files_struct.fdt`, `fdtable.max_fds/fd`,
/// `file.f_inode`, `inode.i_ino/i_sb/i_rdev` and `super_block.s_dev` from a BTF file (normally
/// `/sys/kernel/btf/vmlinux`).
///
/// # Errors
/// The file cannot be read or parsed, or a member is missing or is a bitfield.
pub fn kernel_offsets(btf_path: &Path) -> Result<KernelOffsets> {
    let data = std::fs::read(btf_path).map_err(|e| AgentError::io(btf_path, e))?;
    let info = TypeInformation::new(&Bytes(data)).map_err(|e| AgentError::Btf {
        path: btf_path.into(),
        message: format!("cannot parse: {e:?}"),
    })?;
    let off = |ty: &str, member: &str| -> Result<u32> {
        let err = |message: String| AgentError::Btf {
            path: btf_path.into(),
            message,
        };
        let id = info
            .id_of(ty)
            .ok_or_else(|| err(format!("no type `struct {ty}`")))?;
        match info.offset_of(id, member) {
            Ok((_, Offset::ByteOffset(o))) => Ok(o),
            Ok((_, Offset::BitOffsetAndSize(..))) => Err(err(format!("{ty}.{member} is a bitfield"))),
            Err(e) => Err(err(format!("no member {ty}.{member}: {e:?}"))),
        }
    };
    Ok(KernelOffsets {
        task_files: off("task_struct", "files")?,
        task_tgid: off("task_struct", "tgid")?,
        task_pid: off("task_struct", "pid")?,
        files_fdt: off("files_struct", "fdt")?,
        fdt_max_fds: off("fdtable", "max_fds")?,
        fdt_fd: off("fdtable", "fd")?,
        file_inode: off("file", "f_inode")?,
        inode_ino: off("inode", "i_ino")?,
        inode_sb: off("inode", "i_sb")?,
        sb_dev: off("super_block", "s_dev")?,
        inode_rdev: off("inode", "i_rdev")?,
        _pad: 0,
    })
}

/// The oldest driver branch whose ioctl layouts are known: the first tag of
/// NVIDIA/open-gpu-kernel-modules (515.43.04), where every layout in [`AbiConfig`] was read.
pub const OLDEST_DRIVER_BRANCH: u32 = 515;

/// The ioctl layout generation of a driver version such as `595.45.04` (the content of
/// `/sys/module/nvidia/version`): [`AbiConfig::R515`] for branches 515 to 524, [`AbiConfig::R525`] for
/// 525 to 534, [`AbiConfig::R535`] from 535. Branches older than [`OLDEST_DRIVER_BRANCH`] (their
/// layouts cannot be checked against a published source) or newer than 999 are refused rather than
/// guessed.
///
/// # Errors
/// The string is not `MAJOR.MINOR[.PATCH]` or the major branch is outside 515..=999.
pub fn abi_for_driver(version: &str) -> Result<AbiConfig> {
    let v = version.trim();
    let refuse = |message: &str| AgentError::DriverVersion {
        version: v.to_owned(),
        message: message.to_owned(),
    };
    let mut parts = v.split('.');
    let major: u32 = parts
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| refuse("not MAJOR.MINOR[.PATCH]"))?;
    let minor_ok = parts
        .next()
        .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()));
    if !minor_ok || parts.any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(refuse("not MAJOR.MINOR[.PATCH]"));
    }
    match major {
        515..=524 => Ok(AbiConfig::R515),
        525..=534 => Ok(AbiConfig::R525),
        535..=999 => Ok(AbiConfig::R535),
        0..515 => Err(refuse(
            "driver branches before 515 are not supported (their ioctl layouts are unpublished); \
             upgrade the driver to 515 or later",
        )),
        _ => Err(refuse(
            "no known ioctl layout for this branch (supported: 515 to 999)",
        )),
    }
}

/// The kernel-internal encoding of a device number (`MKDEV`, `include/linux/kdev_t.h`:
/// `major << 20 | minor`) from the user-space `st_dev` that `stat(2)` returns (glibc
/// `gnu_dev_major/minor` encoding).
#[must_use]
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    (major << 20) | (minor & 0xf_ffff)
}

/// The [`FileKey`] the programs compute for `path`: the device number of a character or block
/// device node (any node of that device, in any mount, has the same key), else the file's
/// superblock device and inode.
///
/// # Errors
/// The file cannot be stat'ed, or its device number does not fit the kernel's 32-bit `dev_t`.
pub fn file_key(path: &Path) -> Result<FileKey> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let md = std::fs::metadata(path).map_err(|e| AgentError::io(path, e))?;
    let narrow = |d: u64| {
        u32::try_from(kernel_dev(d)).map_err(|_| {
            AgentError::io(
                path,
                std::io::Error::other(format!("device number {d:#x} does not fit a kernel dev_t")),
            )
        })
    };
    let ft = md.file_type();
    if ft.is_char_device() || ft.is_block_device() {
        return Ok(FileKey::of_inode(narrow(md.rdev())?, 0, 0));
    }
    Ok(FileKey::of_inode(0, narrow(md.dev())?, md.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_generations() {
        assert_eq!(abi_for_driver("515.43.04").unwrap(), AbiConfig::R515);
        assert_eq!(abi_for_driver("520.61.07").unwrap(), AbiConfig::R515);
        assert_eq!(abi_for_driver("525.47.04").unwrap(), AbiConfig::R525);
        assert_eq!(abi_for_driver("530.41.03").unwrap(), AbiConfig::R525);
        assert_eq!(abi_for_driver("535.43.02").unwrap(), AbiConfig::R535);
        assert_eq!(abi_for_driver("595.45.04\n").unwrap(), AbiConfig::R535);
        let old = abi_for_driver("470.256").unwrap_err().to_string();
        assert!(old.contains("before 515") && old.contains("470.256"), "{old}");
        for bad in [
            "", "595", "x.1", "595..1", "595.45.", "390.157", "1000.1", "595.4a", "514.1",
        ] {
            assert!(abi_for_driver(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kernel_dev_encoding() {
        // 195:255 (/dev/nvidiactl): glibc makedev = (minor & 0xff) | (major << 8) = 0xc3ff.
        assert_eq!(kernel_dev(0xc3ff), (195 << 20) | 255);
        // A large minor (anonymous superblocks of FUSE use major 0): minor 300 → 0x2c | 0x100 << 12.
        let st = 0x2c | (0x100 << 12);
        assert_eq!(kernel_dev(st), 300);
    }

    #[test]
    fn offsets_from_this_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: no {}", path.display());
            return;
        }
        let o = kernel_offsets(path).unwrap();
        // `task_struct` starts with thread_info/state; every member the programs use is past it, and
        // the members of the small structures are distinct.
        assert!(o.task_files > 0 && o.task_tgid > 0 && o.task_pid > 0);
        assert_ne!(o.task_tgid, o.task_pid);
        assert_ne!(o.fdt_fd, o.fdt_max_fds);
        assert_ne!(o.inode_ino, o.inode_sb);
        assert!(o.inode_rdev > 0 && o.inode_rdev != o.inode_ino && o.inode_rdev != o.inode_sb);
    }

    #[test]
    fn rdev_device_nodes_are_keyed_by_number_other_files_by_inode() {
        // /dev/null is 1:3 on every Linux system (Documentation/admin-guide/devices.txt).
        let null = file_key(Path::new("/dev/null")).unwrap();
        assert_eq!(
            null,
            FileKey {
                dev: (1 << 20) | 3,
                ino: 0
            }
        );
        let dir = std::env::temp_dir().join(format!("hami-rdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("nvidiactl");
        std::fs::write(&plain, b"").unwrap();
        let k = file_key(&plain).unwrap();
        assert!(k.ino != 0 && k.dev != null.dev, "{k:?}");
        // A second node of the same device, made where this process may (root only), has the same key.
        let node = dir.join("null-again");
        let made = nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        );
        if made.is_ok() {
            assert_eq!(file_key(&node).unwrap(), null);
        } else {
            assert!(
                std::env::var_os("HAMI_REQUIRE_PRIVILEGED").is_none(),
                "mknod: {made:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
