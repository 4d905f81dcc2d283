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
    /// Device plugin: a replica device ID the kubelet sent is not one this plugin advertises
    /// (`<GPU-uuid>-<n>`, `n < split_count`, a GPU of this node).
    #[error("device plugin: unknown device ID `{id}`")]
    UnknownDevice {
        /// The ID as the kubelet sent it.
        id: String,
    },
    /// Device plugin: no pod bound to this node has a pending, signed decision for the requested devices.
    #[error("device plugin: no pending decision on node {node} for devices [{devices}] (GPUs {gpus})")]
    DecisionNotFound {
        /// The node.
        node: String,
        /// The replica IDs requested, comma-joined.
        devices: String,
        /// Their physical GPU UUIDs, comma-joined.
        gpus: String,
    },
    /// Device plugin: the kubelet asked for several replica IDs of one physical GPU for one container.
    /// A container's `nvidia.com/gpu` counts distinct physical GPUs, so no decision can match; serving
    /// it would give the container fewer GPUs than the scheduler chose (peer case C20).
    #[error(
        "device plugin: devices [{devices}] are {ids} replica IDs on only {gpus} physical GPU(s) \
         ({uuids}); a container's GPUs are distinct physical GPUs (was GetPreferredAllocation ignored?)"
    )]
    RepeatedGpu {
        /// The replica IDs requested, comma-joined.
        devices: String,
        /// How many IDs.
        ids: usize,
        /// How many distinct GPUs they name.
        gpus: usize,
        /// Those GPUs' UUIDs, comma-joined.
        uuids: String,
    },
    /// Device plugin: several pods have different pending decisions for the requested devices; the
    /// plugin does not guess (peer case C19). Retryable.
    #[error("device plugin: ambiguous decision for devices [{devices}]: pods {pods} differ; retry")]
    AmbiguousDecision {
        /// The replica IDs requested, comma-joined.
        devices: String,
        /// The candidate pods (`namespace/name`), comma-joined.
        pods: String,
    },
    /// Device plugin: the only decisions for the requested devices are on pods whose decision signature
    /// does not verify (not written by the scheduler for that pod and node; peer case C18).
    #[error("device plugin: refused the decision of pod(s) {pods} for devices [{devices}]: {reason}")]
    DecisionRefused {
        /// The refused pods (`namespace/name`), comma-joined.
        pods: String,
        /// The replica IDs requested, comma-joined.
        devices: String,
        /// Why (missing or invalid signature, unreadable key).
        reason: String,
    },
    /// Device plugin: talking to the kubelet or the API server, or serving the plugin socket, failed.
    #[error("device plugin: {what}: {message}")]
    DevicePlugin {
        /// The operation.
        what: String,
        /// The underlying error.
        message: String,
    },
    /// Node registration: building the annotations or publishing them on the Node failed.
    #[error("node registration: {what}: {message}")]
    Registration {
        /// The operation.
        what: String,
        /// The underlying error.
        message: String,
    },
}

impl AgentError {
    /// An [`AgentError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`AgentError::DevicePlugin`].
    pub fn plugin(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::DevicePlugin {
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// An [`AgentError::Registration`].
    pub fn registration(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Registration {
            what: what.into(),
            message: message.to_string(),
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
