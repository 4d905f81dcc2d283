//! The node usage summary, `hami.io/node-nvidia-usage` (ours; HAMi has no equivalent).
//!
//! Written by the agent with every heartbeat from its kernel telemetry, read by the scheduler's
//! usage-aware policy and its staleness check:
//!
//! ```text
//! {"version":1,"heartbeat":1764430000,"gpus":[{"uuid":"GPU-…","usedMiB":6144,"peakMiB":8192,"smPercent":35}]}
//! ```
//!
//! `heartbeat` is Unix seconds of the agent's last successful publication; a node whose heartbeat is
//! older than the scheduler's stale limit is treated as unhealthy. `usedMiB` is device memory the kernel
//! saw allocated on that GPU by every container (rounded up to MiB), `peakMiB` the largest value since the
//! previous heartbeat, `smPercent` the measured SM utilisation (percent of the GPU, 0..=100, `null` when
//! not measured). Decoding is strict: unknown versions, unknown fields, duplicate UUIDs and
//! `peakMiB < usedMiB` are errors.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Annotation key of the usage summary.
pub const NODE_NVIDIA_USAGE: &str = "hami.io/node-nvidia-usage";

/// Version this crate writes and reads.
pub const USAGE_VERSION: u32 = 1;

/// Measured use of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GpuUsageSample {
    /// GPU UUID, as in the register annotation.
    pub uuid: String,
    /// Device memory in use, MiB (kernel-observed, all containers).
    #[serde(rename = "usedMiB")]
    pub used_mib: u64,
    /// Largest `used_mib` since the previous heartbeat, MiB.
    #[serde(rename = "peakMiB")]
    pub peak_mib: u64,
    /// Measured SM utilisation, percent of the GPU (0..=100); `None` when not measured.
    pub sm_percent: Option<u32>,
}

/// A node's usage summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeUsage {
    /// Format version ([`USAGE_VERSION`]).
    pub version: u32,
    /// Unix seconds of the publication.
    pub heartbeat: u64,
    /// Per GPU.
    pub gpus: Vec<GpuUsageSample>,
}

impl NodeUsage {
    /// Encodes as the annotation value.
    ///
    /// # Errors
    /// [`Error::Unencodable`] when the summary would not decode (see [`NodeUsage::decode`]).
    pub fn encode(&self) -> Result<String> {
        self.check().map_err(|detail| Error::Unencodable {
            what: "node usage",
            value: format!("{self:?}"),
            detail,
        })?;
        serde_json::to_string(self).map_err(|_| Error::Unencodable {
            what: "node usage",
            value: String::new(),
            detail: "not serialisable",
        })
    }

    /// Decodes an annotation value.
    ///
    /// # Errors
    /// [`Error::InvalidJson`] for JSON of the wrong shape; [`Error::InvalidAnnotation`] for an unknown
    /// version, an empty or duplicate UUID, `peakMiB < usedMiB` or `smPercent > 100`.
    pub fn decode(value: &str) -> Result<Self> {
        let usage: Self = serde_json::from_str(value).map_err(|e| Error::InvalidJson {
            key: NODE_NVIDIA_USAGE,
            message: e.to_string(),
        })?;
        usage.check().map_err(|detail| Error::InvalidAnnotation {
            key: NODE_NVIDIA_USAGE,
            value: value.to_owned(),
            detail,
        })?;
        Ok(usage)
    }

    /// Seconds since the heartbeat at `now_unix_s` (0 if the heartbeat is in the future).
    #[must_use]
    pub fn age_s(&self, now_unix_s: u64) -> u64 {
        now_unix_s.saturating_sub(self.heartbeat)
    }

    /// The sample of the GPU with `uuid`.
    #[must_use]
    pub fn gpu(&self, uuid: &str) -> Option<&GpuUsageSample> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }

    fn check(&self) -> std::result::Result<(), &'static str> {
        if self.version != USAGE_VERSION {
            return Err("unknown version");
        }
        let mut seen = BTreeSet::new();
        for g in &self.gpus {
            if g.uuid.is_empty() {
                return Err("empty GPU UUID");
            }
            if !seen.insert(g.uuid.as_str()) {
                return Err("duplicate GPU UUID");
            }
            if g.peak_mib < g.used_mib {
                return Err("peakMiB below usedMiB");
            }
            if g.sm_percent.is_some_and(|p| p > 100) {
                return Err("smPercent above 100");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_text() {
        let u = NodeUsage {
            version: 1,
            heartbeat: 1_764_430_000,
            gpus: vec![GpuUsageSample {
                uuid: "GPU-a".into(),
                used_mib: 6144,
                peak_mib: 8192,
                sm_percent: Some(35),
            }],
        };
        let text = u.encode().unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"heartbeat":1764430000,"gpus":[{"uuid":"GPU-a","usedMiB":6144,"peakMiB":8192,"smPercent":35}]}"#
        );
        assert_eq!(NodeUsage::decode(&text).unwrap(), u);
        assert_eq!(u.age_s(1_764_430_030), 30);
    }

    #[test]
    fn strict_decoding() {
        for bad in [
            r#"{"version":2,"heartbeat":1,"gpus":[]}"#,
            r#"{"version":1,"heartbeat":1,"gpus":[{"uuid":"a","usedMiB":5,"peakMiB":4,"smPercent":null}]}"#,
            r#"{"version":1,"heartbeat":1,"gpus":[{"uuid":"a","usedMiB":1,"peakMiB":1,"smPercent":101}]}"#,
            r#"{"version":1,"heartbeat":1,"gpus":[{"uuid":"a","usedMiB":1,"peakMiB":1,"smPercent":1},{"uuid":"a","usedMiB":1,"peakMiB":1,"smPercent":1}]}"#,
            r#"{"version":1,"heartbeat":-1,"gpus":[]}"#,
            r#"{"version":1,"heartbeat":1,"gpus":[],"extra":0}"#,
            "",
        ] {
            assert!(NodeUsage::decode(bad).is_err(), "{bad}");
        }
    }
}
