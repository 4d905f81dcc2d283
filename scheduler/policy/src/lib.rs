//! `hami-policy`: the placement core of hami, pure and deterministic (no I/O, no async, no Kubernetes
//! client). The scheduler extender and the trace simulator run exactly this code.
//!
//! - [`state`]: a node's inventory and committed use; commit/release that never overcommit.
//! - [`fit`]: the filter (does a pod fit a node, on which GPUs), complete and HAMi-compatible.
//! - [`frag`]: FGD's fragmentation measure over a workload model.
//! - [`policies`]: node scoring policies (HAMi binpack/spread, the FGD paper's baselines, FGD, ours).
//! - [`cluster`]: one decision over many nodes, with random tie-breaking and a score cache.
//! - [`usage`]: the usage-aware policy (packs on measured use with a safety margin).
//! - [`workload`]: the live workload model for FGD in a scheduler (observed shapes, decayed history).

pub mod cluster;
pub mod error;
pub mod fit;
pub mod frag;
pub mod ledger;
pub mod policies;
pub mod quota;
pub mod state;
pub mod usage;
pub mod workload;

pub use cluster::{Cluster, Decision, ScoreCache};
pub use error::{Error, Result};
pub use fit::{FitFailure, GpuOrder, Reason, ScoringWeights, fit_pod};
pub use frag::{TaskShape, WorkloadModel, node_frag};
pub use ledger::{Ledger, LedgerEntry};
pub use policies::{ClusterNorm, POLICY_NAMES, Policy, Scored, build_policy, build_policy_in};
pub use quota::{NamespaceQuota, QuotaExceeded, QuotaUsage, check_quota};
pub use state::{DeviceGrant, GpuUsage, NodePlacement, NodeState};
pub use usage::{MeasuredGpu, UsageAwarePolicy};
pub use workload::{DefaultModel, ModelSource, WorkloadHistory, build_model, gpu_shape};
