//! The GPUs a node offers and their replica device IDs (pure).
//!
//! Every GPU is advertised as `split_count` replicas `<GPU-uuid>-<n>`, `n` in `0..split_count`
//! (HAMi's naming), all sharing the GPU's health and NUMA node.

use std::collections::BTreeSet;

use crate::deviceplugin::proto;
use crate::error::{AgentError, Result};

/// One physical GPU as the device plugin sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// NVML UUID, e.g. `GPU-6f0c…`.
    pub uuid: String,
    /// Device minor number: the device file is `/dev/nvidia<minor>`.
    pub minor: u32,
    /// NUMA node of the GPU, when the platform reports one.
    pub numa: Option<i64>,
    /// Whether the GPU answers (NVML queries succeed).
    pub healthy: bool,
}

/// Replica `n` of the GPU `uuid`: `<uuid>-<n>`.
#[must_use]
pub fn replica_id(uuid: &str, n: u32) -> String {
    format!("{uuid}-{n}")
}

/// The GPU of a replica ID advertised for `gpus` with `split_count` replicas each.
///
/// # Errors
/// [`AgentError::UnknownDevice`] when the ID is not `<uuid>-<n>` with a known UUID and
/// `n < split_count`.
pub fn gpu_of<'a>(id: &str, gpus: &'a [Gpu], split_count: u32) -> Result<&'a Gpu> {
    let unknown = || AgentError::UnknownDevice { id: id.to_owned() };
    let (uuid, n) = id.rsplit_once('-').ok_or_else(unknown)?;
    let n: u32 = n
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| n.parse().ok())
        .flatten()
        .ok_or_else(unknown)?;
    if n >= split_count {
        return Err(unknown());
    }
    gpus.iter().find(|g| g.uuid == uuid).ok_or_else(unknown)
}

/// What one container request asks for, resolved against the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRequest {
    /// The replica IDs, as sent.
    pub ids: Vec<String>,
    /// Their distinct physical GPU UUIDs.
    pub uuids: BTreeSet<String>,
}

impl ReplicaRequest {
    /// Resolves the kubelet's IDs.
    ///
    /// # Errors
    /// [`AgentError::UnknownDevice`] for an ID that is not advertised; [`AgentError::RepeatedGpu`] when
    /// two IDs are replicas of one GPU.
    pub fn resolve(ids: &[String], gpus: &[Gpu], split_count: u32) -> Result<Self> {
        let uuids = ids
            .iter()
            .map(|id| gpu_of(id, gpus, split_count).map(|g| g.uuid.clone()))
            .collect::<Result<BTreeSet<_>>>()?;
        let req = Self {
            ids: ids.to_vec(),
            uuids,
        };
        if req.uuids.len() < req.ids.len() {
            return Err(AgentError::RepeatedGpu {
                devices: req.ids_text(),
                ids: req.ids.len(),
                gpus: req.uuids.len(),
                uuids: req.uuids_text(),
            });
        }
        Ok(req)
    }

    /// The IDs, comma-joined (for errors and logs).
    #[must_use]
    pub fn ids_text(&self) -> String {
        self.ids.join(",")
    }

    /// The UUIDs, comma-joined (for errors and logs).
    #[must_use]
    pub fn uuids_text(&self) -> String {
        self.uuids.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

/// The ListAndWatch message for `gpus`: `split_count` replicas of each, with health and NUMA topology.
#[must_use]
pub fn advertised(gpus: &[Gpu], split_count: u32) -> proto::ListAndWatchResponse {
    let devices = gpus
        .iter()
        .flat_map(|g| {
            (0..split_count).map(move |n| proto::Device {
                id: replica_id(&g.uuid, n),
                health: if g.healthy {
                    proto::HEALTHY
                } else {
                    proto::UNHEALTHY
                }
                .to_owned(),
                topology: g.numa.map(|id| proto::TopologyInfo {
                    nodes: vec![proto::NumaNode { id }],
                }),
            })
        })
        .collect();
    proto::ListAndWatchResponse { devices }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn gpus() -> Vec<Gpu> {
        vec![
            Gpu {
                uuid: "GPU-a-1".into(),
                minor: 0,
                numa: Some(1),
                healthy: true,
            },
            Gpu {
                uuid: "GPU-b".into(),
                minor: 3,
                numa: None,
                healthy: false,
            },
        ]
    }

    #[test]
    fn replica_ids_round_trip_and_unknown_ids_are_errors() {
        let g = gpus();
        assert_eq!(replica_id("GPU-a-1", 7), "GPU-a-1-7");
        assert_eq!(gpu_of("GPU-a-1-7", &g, 10).unwrap().uuid, "GPU-a-1");
        assert_eq!(gpu_of("GPU-b-0", &g, 10).unwrap().minor, 3);
        for bad in [
            "GPU-a-1-10",
            "GPU-a-1",
            "GPU-c-0",
            "GPU-b-+1",
            "GPU-b-",
            "nodash",
            "GPU-b-x",
        ] {
            let e = gpu_of(bad, &g, 10).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        let r = ReplicaRequest::resolve(&["GPU-a-1-2".into(), "GPU-b-9".into()], &g, 10).unwrap();
        assert_eq!(r.uuids_text(), "GPU-a-1,GPU-b");
        assert!(ReplicaRequest::resolve(&["GPU-z-0".into()], &g, 10).is_err());
    }

    #[test]
    fn advertises_split_count_replicas_with_health_and_numa() {
        let m = advertised(&gpus(), 3);
        let ids: Vec<&str> = m.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "GPU-a-1-0",
                "GPU-a-1-1",
                "GPU-a-1-2",
                "GPU-b-0",
                "GPU-b-1",
                "GPU-b-2"
            ]
        );
        assert!(m.devices[..3].iter().all(|d| d.health == "Healthy"));
        assert!(m.devices[3..].iter().all(|d| d.health == "Unhealthy"));
        assert_eq!(m.devices[0].topology.as_ref().unwrap().nodes[0].id, 1);
        assert!(m.devices[3].topology.is_none());
    }
}
