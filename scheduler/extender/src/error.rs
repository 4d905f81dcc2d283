//! The one error type of `hami-scheduler`.
//!
//! Every variant says what was being done and with what input, so it can go verbatim into an
//! `ExtenderBindingResult.Error`, an `ExtenderFilterResult.Error`, an HTTP 400 body or a log line.
//! [`Error::reason`] gives a stable snake_case label for metrics.

use std::path::PathBuf;

/// Result alias with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the extender.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request body is not the extender wire type it should be (malformed JSON, wrong shape).
    #[error("malformed {what} request: {message}")]
    BadRequest {
        /// The wire type expected (`ExtenderArgs`, `ExtenderBindingArgs`).
        what: &'static str,
        /// The JSON decoder's message, with its position.
        message: String,
    },
    /// A pod's HAMi resources or annotations are invalid (the pod can never be scheduled as is).
    #[error("pod {pod}: {source}")]
    InvalidPod {
        /// `namespace/name`.
        pod: String,
        /// What is wrong.
        source: hami_api::Error,
    },
    /// A node annotation written by the agent or an admin is invalid.
    #[error("node {node}: {source}")]
    InvalidNode {
        /// Node name.
        node: String,
        /// What is wrong.
        source: hami_api::Error,
    },
    /// The node chosen for a bind cannot take the pod (any more): the reason in HAMi's words.
    #[error("node {node} cannot take pod {pod}: {reason}")]
    NodeUnfit {
        /// `namespace/name`.
        pod: String,
        /// Node name.
        node: String,
        /// Why (e.g. `1/4 CardInsufficientMemory`, `PendingAllocationConflict: …`, `stale heartbeat …`).
        reason: String,
    },
    /// Committing the decision was refused by the placement core (a racing bind took the capacity).
    #[error("pod {pod}: {source}")]
    Placement {
        /// `namespace/name`.
        pod: String,
        /// The ledger's refusal.
        source: hami_policy::Error,
    },
    /// The pod named by a bind request is not the one the API holds (re-created, other UID) or is gone.
    #[error("pod {pod}: {detail}")]
    PodMismatch {
        /// `namespace/name`.
        pod: String,
        /// What does not match.
        detail: String,
    },
    /// A Kubernetes API call failed (a 409 conflict on the pod patch, a failed Binding, …).
    #[error("{action} pod {pod}: {source}")]
    Kube {
        /// What was being done (`patching`, `binding`, `reading`).
        action: &'static str,
        /// `namespace/name`.
        pod: String,
        /// The client's error.
        source: kube::Error,
    },
    /// The extender was built without an API client (binding needs one).
    #[error("no Kubernetes API client configured; cannot {0}")]
    NoClient(&'static str),
    /// The extender is shutting down: a new bind is refused, or a bind that had not sent its Binding
    /// was rolled back (kube-scheduler retries the pod).
    #[error("pod {pod}: the extender is shutting down; bind {what}")]
    ShuttingDown {
        /// `namespace/name`.
        pod: String,
        /// `refused` or `rolled back`.
        what: &'static str,
    },
    /// The extender's view of the cluster is incomplete: its node or pod reflector has not finished a
    /// list (at start, or while relisting after a lost watch). No decision is taken on a partial view,
    /// where GPU memory and quota held by pods not yet read would look free (peer case C30);
    /// kube-scheduler retries the pod.
    #[error(
        "pod {pod}: not placed yet: the extender has not finished reading the cluster's {kinds} \
         (starting, or relisting after a lost watch); retry"
    )]
    NotSynced {
        /// `namespace/name`.
        pod: String,
        /// The views still incomplete (`nodes`, `pods`, `nodes and pods`).
        kinds: &'static str,
    },
    /// A decision could not be encoded as HAMi's annotation (a device UUID or value out of range).
    #[error("pod {pod}: cannot encode the decision: {source}")]
    Encode {
        /// `namespace/name`.
        pod: String,
        /// The codec's error.
        source: hami_api::Error,
    },
    /// Configuration file unreadable or invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("config field {field}: {message}")]
    ConfigValue {
        /// The field (camelCase, as in the file).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The generated kube-scheduler configuration breaks one of kube-scheduler's validation rules
    /// (`reference/kubernetes-testing.md` §5).
    #[error("invalid KubeSchedulerConfiguration: {0}")]
    SchedulerConfig(String),
    /// Serialising an output document failed.
    #[error("serialising {what}: {message}")]
    Serialize {
        /// What was being written.
        what: &'static str,
        /// The serialiser's message.
        message: String,
    },
    /// A socket could not be bound.
    #[error("{what}: {source}")]
    Listen {
        /// What was being done (`binding 0.0.0.0:8443`).
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be read (TLS certificate or key, decision key, config).
    #[error("reading {what} {path}: {source}")]
    Io {
        /// What the file is (`TLS certificate`, `decision key`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{what} {path}: {detail}")]
    Pem {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the certificate, key or protocol settings.
    #[error("TLS {what}: {source}")]
    Tls {
        /// What was being set up.
        what: &'static str,
        /// rustls' error.
        source: tokio_rustls::rustls::Error,
    },
    /// An HTTP(S) server failed while serving.
    #[error("serving: {0}")]
    Serve(std::io::Error),
    /// Metrics could not be registered (a name registered twice in one registry).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A self-signed certificate could not be generated.
    #[error("generating a certificate: {0}")]
    CertGen(#[from] rcgen::Error),
}

impl Error {
    /// Stable snake_case label for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::InvalidPod { .. } => "invalid_pod",
            Self::InvalidNode { .. } => "invalid_node",
            Self::NodeUnfit { .. } => "node_unfit",
            Self::Placement { .. } => "placement_conflict",
            Self::PodMismatch { .. } => "pod_mismatch",
            Self::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "api_conflict",
                _ => "api_error",
            },
            Self::NoClient(_) => "no_client",
            Self::ShuttingDown { .. } => "shutting_down",
            Self::NotSynced { .. } => "not_synced",
            Self::Encode { .. } => "encode",
            Self::Config { .. } | Self::ConfigValue { .. } => "config",
            Self::SchedulerConfig(_) => "scheduler_config",
            Self::Serialize { .. } => "serialize",
            Self::Listen { .. } => "listen",
            Self::Io { .. } => "io",
            Self::Pem { .. } => "pem",
            Self::Tls { .. } => "tls",
            Self::Serve(_) => "serve",
            Self::CertGen(_) => "certgen",
            Self::Metrics(_) => "metrics",
        }
    }
}
