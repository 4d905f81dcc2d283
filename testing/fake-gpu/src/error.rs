//! The crate's one error type.

/// Everything that can go wrong in the simulated node's library: decoding a driver struct, a system call
/// on a device file, a non-OK `NV_STATUS` from RM, a bad `hami-control` line, an unknown allocation-path
/// name, or an unreadable ground-truth file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer is not the size the driver struct must have.
    #[error("wrong size: {got} bytes, the struct has {want}")]
    WrongSize {
        /// Bytes given.
        got: usize,
        /// Bytes the struct has.
        want: usize,
    },
    /// A system call (open, ioctl, read) failed.
    #[error("system call failed: {0}")]
    Os(#[from] std::io::Error),
    /// The driver answered with a non-OK `NV_STATUS` (`kernel-open/common/inc/nvstatuscodes.h`).
    #[error("RM status {0:#x}")]
    Status(u32),
    /// A line written to `hami-control` is not a known command or names something unknown.
    #[error("control command `{line}`: {reason}")]
    Control {
        /// The offending line.
        line: String,
        /// Why it was refused.
        reason: String,
    },
    /// An allocation-path name other than `nvos21`, `nvos64`, `vid-heap`, `vid-heap-range` or
    /// `vid-heap-tiled`.
    #[error("unknown allocation path `{0}` (nvos21, nvos64, vid-heap, vid-heap-range, vid-heap-tiled)")]
    UnknownAllocVia(String),
    /// The ground-truth file is not valid JSON.
    #[error("ground truth is not valid JSON: {0}")]
    GroundTruth(#[from] serde_json::Error),
}

impl Error {
    /// The `NV_STATUS`, if the call reached RM and RM refused it.
    #[must_use]
    pub fn status(&self) -> Option<u32> {
        match self {
            Self::Status(s) => Some(*s),
            _ => None,
        }
    }
}
