//! The error type of `hami-policy`.

use crate::fit::Reason;

/// Errors of the placement core. Fit failures are not errors (see [`crate::fit::FitFailure`]); these are
/// refusals to change state or to build a policy from bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Committing the placement would exceed a GPU's capacity; nothing was committed.
    #[error("node {node}: committing would overcommit GPU {gpu}: {reason}")]
    Overcommit {
        /// Node name.
        node: String,
        /// GPU UUID.
        gpu: String,
        /// The capacity dimension that would be exceeded.
        reason: Reason,
    },
    /// Committing the placement would exceed the node's host CPU or memory; nothing was committed.
    #[error("node {node}: committing would overcommit host CPU or memory")]
    HostOvercommit {
        /// Node name.
        node: String,
    },
    /// The placement does not match the pod it is committed for.
    #[error("placement for pod {pod} is malformed: {why}")]
    PlacementShape {
        /// Pod name.
        pod: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An unknown policy name.
    #[error("unknown policy {name:?}; known: {known}")]
    UnknownPolicy {
        /// The name given.
        name: String,
        /// Comma-separated known names.
        known: String,
    },
    /// A node index outside the cluster.
    #[error("node index {index} is outside the cluster of {len} nodes")]
    NoSuchNode {
        /// Index given.
        index: usize,
        /// Number of nodes.
        len: usize,
    },
}

impl Error {
    /// Stable snake_case label for metrics and responses.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Overcommit { .. } => "overcommit",
            Self::HostOvercommit { .. } => "host_overcommit",
            Self::PlacementShape { .. } => "placement_shape",
            Self::UnknownPolicy { .. } => "unknown_policy",
            Self::NoSuchNode { .. } => "no_such_node",
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
