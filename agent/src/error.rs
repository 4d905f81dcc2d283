//! The agent library's one error type.

use std::path::PathBuf;

/// Errors of the node agent library. Every variant names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A host file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid.
    #[error("configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A kernel structure or member the programs need is missing from the kernel's BTF.
    #[error("kernel BTF {path}: {message}")]
    Btf {
        /// The BTF file read.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
    /// The NVIDIA driver version is unknown or has no known ioctl layout.
    #[error("driver version `{version}`: {message}")]
    DriverVersion {
        /// The version string read.
        version: String,
        /// Why it is refused.
        message: String,
    },
    /// Loading, attaching, pinning or reading the eBPF programs and maps failed.
    #[error("eBPF {what}: {message}")]
    Ebpf {
        /// The operation.
        what: String,
        /// The loader's error.
        message: String,
    },
    /// Building or encoding metrics failed.
    #[error("metrics: {0}")]
    Metrics(String),
}

impl AgentError {
    /// An [`AgentError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`AgentError::Ebpf`].
    pub fn ebpf(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Ebpf {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

/// Result with [`AgentError`].
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
