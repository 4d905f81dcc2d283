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
/// `file.f_inode`, `inode.i_ino/i_sb` and `super_block.s_dev` from a BTF file (normally
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
    })
}

/// The ioctl layout generation of a driver version such as `595.45.04` (the content of
/// `/sys/module/nvidia/version`). Branches before 535 use [`AbiConfig::PRE_535`]; 535 and later
/// [`AbiConfig::SINCE_535`] (`reference/nvidia-driver-abi.md` §4.3). Branches older than 470 or newer
/// than 999 are refused rather than guessed.
///
/// # Errors
/// The string is not `MAJOR.MINOR[.PATCH]` or the major branch is outside 470..=999.
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
        470..=534 => Ok(AbiConfig::PRE_535),
        535..=999 => Ok(AbiConfig::SINCE_535),
        _ => Err(refuse(
            "no known ioctl layout for this branch (supported: 470 to 999)",
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

/// The [`FileKey`] the programs compute for `path` (the file's superblock device and inode).
///
/// # Errors
/// The file cannot be stat'ed.
pub fn file_key(path: &Path) -> Result<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::metadata(path).map_err(|e| AgentError::io(path, e))?;
    Ok(FileKey {
        dev: kernel_dev(md.dev()),
        ino: md.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_generations() {
        assert_eq!(abi_for_driver("530.41.03").unwrap(), AbiConfig::PRE_535);
        assert_eq!(abi_for_driver("535.43.02").unwrap(), AbiConfig::SINCE_535);
        assert_eq!(abi_for_driver("595.45.04\n").unwrap(), AbiConfig::SINCE_535);
        assert_eq!(abi_for_driver("470.256").unwrap(), AbiConfig::PRE_535);
        for bad in [
            "", "595", "x.1", "595..1", "595.45.", "390.157", "1000.1", "595.4a",
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
    }
}
