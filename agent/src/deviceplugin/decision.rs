//! Finding the scheduler's decision for a container request (pure; the design is in the
//! [module docs](super)).

use std::collections::{BTreeSet, HashMap};

use hami_api::annotations::{
    self as ann, BIND_PHASE, BIND_PHASE_ALLOCATING, BIND_TIME, DECISION_SIGNATURE, DEVICES_ALLOCATED,
    DEVICES_TO_ALLOCATE, VGPU_NODE,
};
use hami_api::region::PRIORITY_LOW;
use hami_api::{ContainerDevices, PodDevices, ResourceNames};
use k8s_openapi::api::core::v1::Pod;

use crate::deviceplugin::devices::ReplicaRequest;
use crate::error::{AgentError, Result};

/// A pod's identity, as errors and patches name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod on this node that is waiting for Allocate (`bind-phase: allocating`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPod {
    /// Identity.
    pub pod: PodRef,
    /// `hami.io/bind-time`, Unix seconds.
    pub bind_time: u64,
    /// Container names, init containers first (the positions of the decision's entries).
    pub containers: Vec<String>,
    /// How many of `containers` are init containers.
    pub init_containers: usize,
    /// Each container's `nvidia.com/priority` (same order; [`PRIORITY_LOW`], HAMi's default, when not
    /// given or not a valid priority).
    pub priorities: Vec<u32>,
    /// `hami.io/vgpu-devices-to-allocate`, decoded.
    pub to_allocate: PodDevices,
    /// `metadata.resourceVersion` the pod was read at (the patch precondition).
    pub resource_version: String,
    /// `None` when the decision signature verifies, else why it does not (such a pod is refused).
    pub refused: Option<String>,
}

/// Reads a pod: `None` when it is not waiting for Allocate on `node` (another phase, another node, no
/// decision), else the pending pod (refused when its signature does not verify under `key`).
///
/// # Errors
/// A pending pod with a malformed decision or bind time (an error naming the pod and the key).
pub fn pending_pod(pod: &Pod, node: &str, key: &[u8]) -> Option<Result<PendingPod>> {
    let meta = &pod.metadata;
    let annotations = meta.annotations.as_ref()?;
    if annotations.get(BIND_PHASE).map(String::as_str) != Some(BIND_PHASE_ALLOCATING) {
        return None;
    }
    let to_allocate = annotations.get(DEVICES_TO_ALLOCATE)?;
    let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if spec_node.is_some_and(|n| n != node) {
        return None;
    }
    let pod_ref = PodRef {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
    };
    let bad =
        |what: &str, detail: String| AgentError::plugin(format!("pod {pod_ref} annotation {what}"), detail);
    Some((|| {
        let to_allocate =
            PodDevices::decode(to_allocate).map_err(|e| bad(DEVICES_TO_ALLOCATE, e.to_string()))?;
        let bind_time = match annotations.get(BIND_TIME) {
            Some(t) => t
                .parse::<u64>()
                .map_err(|e| bad(BIND_TIME, format!("`{t}`: {e}")))?,
            None => 0,
        };
        let refused = refusal(annotations, &pod_ref, node, key);
        let all: Vec<&k8s_openapi::api::core::v1::Container> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .collect();
        let containers = all.iter().map(|c| c.name.clone()).collect();
        let names = ResourceNames::default();
        let priorities = all
            .iter()
            .map(|c| {
                hami_api::k8s::container_gpu_resources(c, &names)
                    .ok()
                    .and_then(|r| r.priority)
                    .unwrap_or(PRIORITY_LOW)
            })
            .collect();
        let init_containers = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .map_or(0, Vec::len);
        Ok(PendingPod {
            pod: pod_ref.clone(),
            bind_time,
            containers,
            init_containers,
            priorities,
            to_allocate,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            refused,
        })
    })())
}

/// Why the pod's decision is not the scheduler's, if it is not.
fn refusal(
    annotations: &std::collections::BTreeMap<String, String>,
    pod: &PodRef,
    node: &str,
    key: &[u8],
) -> Option<String> {
    if annotations.get(VGPU_NODE).map(String::as_str) != Some(node) {
        return Some(format!("{VGPU_NODE} is not {node}"));
    }
    let Some(signature) = annotations.get(DECISION_SIGNATURE) else {
        return Some(format!("no {DECISION_SIGNATURE}"));
    };
    let Some(allocated) = annotations.get(DEVICES_ALLOCATED) else {
        return Some(format!("no {DEVICES_ALLOCATED}"));
    };
    if pod.uid.is_empty() {
        return Some("no UID".into());
    }
    (!ann::verify_decision(key, &pod.uid, node, allocated, signature))
        .then(|| format!("{DECISION_SIGNATURE} does not verify for this pod, node and decision"))
}

/// The decision chosen for one container request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The pod.
    pub pod: PodRef,
    /// Position of the container's entry (init containers first).
    pub entry: usize,
    /// The container's name.
    pub container: String,
    /// Whether it is an init container.
    pub init: bool,
    /// Its `nvidia.com/priority` ([`PRIORITY_LOW`] when not given).
    pub priority: u32,
    /// Its devices, in the container's order.
    pub devices: ContainerDevices,
    /// The pod's resource version read (the patch precondition).
    pub resource_version: String,
    /// `hami.io/vgpu-devices-to-allocate` after this container is allocated.
    pub remaining: PodDevices,
}

/// The outcome of [`choose`].
#[derive(Debug)]
pub struct Decision {
    /// The choice, or why there is none.
    pub result: Result<Choice>,
    /// Pods refused on this request (their pending entry matched but their decision does not
    /// verify): to be marked failed.
    pub refused: Vec<PodRef>,
}

fn uuid_set(d: &ContainerDevices) -> BTreeSet<&str> {
    d.0.iter().map(|d| d.uuid.as_str()).collect()
}

/// The first pending entry of `p` for `req` (count and UUID set equal).
fn matching_entry(p: &PendingPod, req: &ReplicaRequest) -> Option<usize> {
    let want: BTreeSet<&str> = req.uuids.iter().map(String::as_str).collect();
    p.to_allocate
        .0
        .iter()
        .position(|e| !e.is_empty() && e.0.len() == req.ids.len() && uuid_set(e) == want)
}

/// Devices compared regardless of order.
fn normalised(d: &ContainerDevices) -> Vec<&hami_api::ContainerDevice> {
    let mut v: Vec<_> = d.0.iter().collect();
    v.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    v
}

fn choice(p: &PendingPod, entry: usize) -> Result<Choice> {
    let container = p.containers.get(entry).cloned().ok_or_else(|| {
        AgentError::plugin(
            format!("pod {}", p.pod),
            format!(
                "{DEVICES_TO_ALLOCATE} has an entry for container {entry} but the pod has {} containers",
                p.containers.len()
            ),
        )
    })?;
    let mut remaining = p.to_allocate.clone();
    let devices = std::mem::take(&mut remaining.0[entry]);
    Ok(Choice {
        pod: p.pod.clone(),
        entry,
        container,
        init: entry < p.init_containers,
        priority: p.priorities.get(entry).copied().unwrap_or(PRIORITY_LOW),
        devices,
        resource_version: p.resource_version.clone(),
        remaining,
    })
}

/// Chooses the decision for one container request among the pending pods of this node.
///
/// `reused_by` maps replica IDs the plugin handed to init containers to their pod's UID: a request
/// holding one of them is that pod's (the kubelet reuses an init container's devices for the next
/// containers of the same pod), and takes the pod's first pending entry of the request's size.
#[must_use]
pub fn choose(
    pods: &[PendingPod],
    req: &ReplicaRequest,
    reused_by: &HashMap<String, String>,
    node: &str,
) -> Decision {
    let valid = || pods.iter().filter(|p| p.refused.is_none());
    if let Some(uid) = req.ids.iter().find_map(|id| reused_by.get(id))
        && let Some(p) = valid().find(|p| &p.pod.uid == uid)
        && let Some(entry) = p
            .to_allocate
            .0
            .iter()
            .position(|e| !e.is_empty() && e.0.len() == req.ids.len())
    {
        return Decision {
            result: choice(p, entry),
            refused: Vec::new(),
        };
    }
    let refused: Vec<PodRef> = pods
        .iter()
        .filter(|p| p.refused.is_some() && matching_entry(p, req).is_some())
        .map(|p| p.pod.clone())
        .collect();
    let mut candidates: Vec<(&PendingPod, usize)> = valid()
        .filter_map(|p| matching_entry(p, req).map(|e| (p, e)))
        .collect();
    candidates.sort_by(|(a, _), (b, _)| {
        (a.bind_time, &a.pod.namespace, &a.pod.name).cmp(&(b.bind_time, &b.pod.namespace, &b.pod.name))
    });
    let result = match candidates.as_slice() {
        [] if !refused.is_empty() => {
            let reasons: BTreeSet<&str> = pods
                .iter()
                .filter(|p| refused.contains(&p.pod))
                .filter_map(|p| p.refused.as_deref())
                .collect();
            Err(AgentError::DecisionRefused {
                pods: join(&refused),
                devices: req.ids_text(),
                reason: reasons.into_iter().collect::<Vec<_>>().join("; "),
            })
        }
        [] => Err(AgentError::DecisionNotFound {
            node: node.to_owned(),
            devices: req.ids_text(),
            gpus: req.uuids_text(),
        }),
        [(first, entry), rest @ ..] => {
            let want = normalised(&first.to_allocate.0[*entry]);
            if rest.iter().all(|(p, e)| normalised(&p.to_allocate.0[*e]) == want) {
                choice(first, *entry)
            } else {
                let pods: Vec<PodRef> = candidates.iter().map(|(p, _)| p.pod.clone()).collect();
                Err(AgentError::AmbiguousDecision {
                    devices: req.ids_text(),
                    pods: join(&pods),
                })
            }
        }
    };
    Decision { result, refused }
}

fn join(pods: &[PodRef]) -> String {
    pods.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// GetPreferredAllocation for one container: `size` IDs from `available`, all of `must_include`
/// first, then replicas of the GPUs of the pending entries of this size (when every pending pod agrees,
/// else those of the pod bound first), then replicas of GPUs not chosen yet (distinct physical GPUs),
/// then any. `gpu_of` names the GPU of an ID (unknown IDs are skipped).
#[must_use]
pub fn preferred(
    pods: &[PendingPod],
    available: &[String],
    must_include: &[String],
    size: usize,
    gpu_of: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let available_gpus: BTreeSet<String> = available.iter().filter_map(|id| gpu_of(id)).collect();
    let mut entries: Vec<(u64, &PodRef, BTreeSet<&str>)> = pods
        .iter()
        .filter(|p| p.refused.is_none())
        .filter_map(|p| {
            p.to_allocate
                .0
                .iter()
                .find(|e| !e.is_empty() && e.0.len() == size)
                .map(|e| (p.bind_time, &p.pod, uuid_set(e)))
        })
        .filter(|(_, _, u)| u.iter().all(|g| available_gpus.contains(*g)))
        .collect();
    entries.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let target: Vec<&str> = entries
        .first()
        .map(|(_, _, u)| u.iter().copied().collect())
        .unwrap_or_default();
    let mut out: Vec<String> = must_include.iter().take(size).cloned().collect();
    let mut used: BTreeSet<String> = out.iter().filter_map(|id| gpu_of(id)).collect();
    let mut take = |out: &mut Vec<String>, pick: &dyn Fn(&str, &BTreeSet<String>) -> bool| {
        for id in available {
            if out.len() >= size {
                return;
            }
            if !out.contains(id) && pick(id, &used) {
                if let Some(g) = gpu_of(id) {
                    used.insert(g);
                }
                out.push(id.clone());
            }
        }
    };
    take(&mut out, &|id, used| {
        gpu_of(id).is_some_and(|g| target.contains(&g.as_str()) && !used.contains(&g))
    });
    take(&mut out, &|id, used| {
        gpu_of(id).is_some_and(|g| !used.contains(&g))
    });
    take(&mut out, &|_, _| true);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use hami_api::ContainerDevice;

    use super::*;
    use crate::deviceplugin::devices::{Gpu, ReplicaRequest};

    const NODE: &str = "node-1";
    const KEY: &[u8] = b"k";

    fn gpus() -> Vec<Gpu> {
        ["GPU-X", "GPU-Y", "GPU-Z"]
            .iter()
            .enumerate()
            .map(|(i, u)| Gpu {
                uuid: (*u).into(),
                minor: u32::try_from(i).unwrap(),
                numa: None,
                healthy: true,
            })
            .collect()
    }

    fn req(ids: &[&str]) -> ReplicaRequest {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        ReplicaRequest::resolve(&ids, &gpus(), 10).unwrap()
    }

    fn pending(name: &str, bind_time: u64, value: &str) -> PendingPod {
        let to_allocate = PodDevices::decode(value).unwrap();
        PendingPod {
            pod: PodRef {
                namespace: "ns".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            },
            bind_time,
            containers: (0..to_allocate.0.len()).map(|i| format!("c{i}")).collect(),
            init_containers: 0,
            priorities: Vec::new(),
            to_allocate,
            resource_version: "1".into(),
            refused: None,
        }
    }

    fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                         "resourceVersion": "7",
                         "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<std::collections::BTreeMap<_,_>>()},
            "spec": {"nodeName": NODE,
                     "initContainers": [{"name": "init"}],
                     "containers": [{"name": "app"}, {"name": "side"}]}
        }))
        .unwrap()
    }

    fn signed(name: &str, value: &str) -> Pod {
        let sig = ann::sign_decision(KEY, &format!("uid-{name}"), NODE, value);
        pod(
            name,
            &[
                (BIND_PHASE, "allocating"),
                (BIND_TIME, "100"),
                (VGPU_NODE, NODE),
                (DEVICES_TO_ALLOCATE, value),
                (DEVICES_ALLOCATED, value),
                (DECISION_SIGNATURE, &sig),
            ],
        )
    }

    #[test]
    fn reads_pending_pods_and_verifies_signatures() {
        let v = "GPU-X,NVIDIA,1000,30:;GPU-Y,NVIDIA,2000,0:;;";
        let p = pending_pod(&signed("a", v), NODE, KEY).unwrap().unwrap();
        assert_eq!(p.refused, None);
        assert_eq!(p.containers, ["init", "app", "side"]);
        assert_eq!(p.bind_time, 100);
        assert_eq!(p.resource_version, "7");
        // Another node's pod, or not allocating: not pending.
        assert!(pending_pod(&signed("a", v), "node-2", KEY).is_none());
        assert!(
            pending_pod(
                &pod("b", &[(BIND_PHASE, "success"), (DEVICES_TO_ALLOCATE, v)]),
                NODE,
                KEY
            )
            .is_none()
        );
        // Forged: unsigned, wrong key, signature of another pod.
        let unsigned = pod(
            "f",
            &[
                (BIND_PHASE, "allocating"),
                (VGPU_NODE, NODE),
                (DEVICES_TO_ALLOCATE, v),
                (DEVICES_ALLOCATED, v),
            ],
        );
        let r = pending_pod(&unsigned, NODE, KEY)
            .unwrap()
            .unwrap()
            .refused
            .unwrap();
        assert!(r.contains("no hami.io/vgpu-decision-signature"), "{r}");
        assert!(
            pending_pod(&signed("a", v), NODE, b"other")
                .unwrap()
                .unwrap()
                .refused
                .is_some()
        );
        let mut copied = signed("a", v);
        copied.metadata.uid = Some("uid-f".into());
        assert!(
            pending_pod(&copied, NODE, KEY)
                .unwrap()
                .unwrap()
                .refused
                .is_some()
        );
        // Malformed values are errors naming the pod and key.
        let bad = pod(
            "m",
            &[
                (BIND_PHASE, "allocating"),
                (DEVICES_TO_ALLOCATE, "GPU-X,NVIDIA,x,0:;"),
            ],
        );
        let e = pending_pod(&bad, NODE, KEY).unwrap().unwrap_err().to_string();
        assert!(e.contains("ns/m") && e.contains(DEVICES_TO_ALLOCATE), "{e}");
    }

    #[test]
    fn c19_the_exact_match_wins_over_the_older_pod() {
        let a = pending("a", 1, "GPU-X,NVIDIA,1000,30:;");
        let b = pending("b", 2, "GPU-Y,NVIDIA,2000,50:;");
        let pods = [a, b];
        let d = choose(&pods, &req(&["GPU-Y-3"]), &HashMap::new(), NODE);
        let c = d.result.unwrap();
        assert_eq!(c.pod.name, "b");
        assert_eq!(c.devices.0, [ContainerDevice::new("GPU-Y", "NVIDIA", 2000, 50)]);
        assert!(!c.remaining.has_devices());
        let c = choose(&pods, &req(&["GPU-X-0"]), &HashMap::new(), NODE)
            .result
            .unwrap();
        assert_eq!(c.pod.name, "a");
    }

    #[test]
    fn identical_entries_take_the_oldest_and_different_ones_are_ambiguous() {
        let v = "GPU-X,NVIDIA,1000,30:;";
        let pods = [pending("b", 5, v), pending("a", 3, v), pending("c", 3, v)];
        let c = choose(&pods, &req(&["GPU-X-1"]), &HashMap::new(), NODE)
            .result
            .unwrap();
        assert_eq!(c.pod.name, "a");
        let pods = [pending("a", 1, v), pending("b", 2, "GPU-X,NVIDIA,1001,30:;")];
        let e = choose(&pods, &req(&["GPU-X-1"]), &HashMap::new(), NODE)
            .result
            .unwrap_err();
        assert!(matches!(e, AgentError::AmbiguousDecision { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("ns/a,ns/b") && e.contains("retry"), "{e}");
    }

    #[test]
    fn count_and_uuid_set_must_match() {
        let pods = [pending("a", 1, "GPU-X,NVIDIA,1000,30:GPU-Y,NVIDIA,1000,30:;")];
        // Two replicas of one GPU are not two GPUs: refused before any decision is looked at (C20).
        let ids = ["GPU-X-1".to_owned(), "GPU-X-2".to_owned()];
        let e = ReplicaRequest::resolve(&ids, &gpus(), 10).unwrap_err();
        assert!(
            matches!(e, AgentError::RepeatedGpu { ids: 2, gpus: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("GPU-X-1,GPU-X-2"), "{e}");
        assert!(
            choose(&pods, &req(&["GPU-X-1"]), &HashMap::new(), NODE)
                .result
                .is_err()
        );
        let c = choose(&pods, &req(&["GPU-Y-1", "GPU-X-4"]), &HashMap::new(), NODE)
            .result
            .unwrap();
        assert_eq!(c.devices.0.len(), 2);
    }

    #[test]
    fn containers_are_taken_in_order_and_named_by_position() {
        let pods = [pending("a", 1, ";GPU-X,NVIDIA,1000,30:;GPU-X,NVIDIA,500,10:;")];
        let c = choose(&pods, &req(&["GPU-X-1"]), &HashMap::new(), NODE)
            .result
            .unwrap();
        assert_eq!((c.entry, c.container.as_str()), (1, "c1"));
        assert_eq!(c.remaining.encode().unwrap(), ";;GPU-X,NVIDIA,500,10:;");
    }

    #[test]
    fn c18_refused_pods_are_reported_and_never_chosen() {
        let mut f = pending("f", 0, "GPU-X,NVIDIA,20000,100:;");
        f.refused = Some("no signature".into());
        let d = choose(&[f.clone()], &req(&["GPU-X-1"]), &HashMap::new(), NODE);
        let e = d.result.unwrap_err();
        assert!(matches!(e, AgentError::DecisionRefused { .. }));
        assert!(
            e.to_string().contains("ns/f") && e.to_string().contains("no signature"),
            "{e}"
        );
        assert_eq!(d.refused, [f.pod.clone()]);
        // With a legitimate pending pod the forged one is still refused, and never chosen.
        let pods = [f.clone(), pending("a", 5, "GPU-X,NVIDIA,1000,30:;")];
        let d = choose(&pods, &req(&["GPU-X-1"]), &HashMap::new(), NODE);
        assert_eq!(d.result.unwrap().pod.name, "a");
        assert_eq!(d.refused, [f.pod]);
    }

    #[test]
    fn reused_init_devices_identify_the_pod() {
        let pods = [
            pending("a", 1, ";GPU-Y,NVIDIA,1000,30:;"),
            pending("b", 2, "GPU-X,NVIDIA,9,9:;"),
        ];
        let reused = HashMap::from([("GPU-X-1".to_owned(), "uid-a".to_owned())]);
        let c = choose(&pods, &req(&["GPU-X-1"]), &reused, NODE).result.unwrap();
        assert_eq!((c.pod.name.as_str(), c.entry), ("a", 1));
        assert_eq!(c.devices.0[0].uuid, "GPU-Y");
    }

    #[test]
    fn preferred_allocation_lands_on_the_decided_gpus() {
        let gpu = |id: &str| id.rsplit_once('-').map(|(u, _)| u.to_owned());
        let avail: Vec<String> = ["GPU-X-0", "GPU-X-1", "GPU-Y-0", "GPU-Y-1", "GPU-Z-0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let pods = [
            pending("old", 1, "GPU-Z,NVIDIA,1,1:GPU-Y,NVIDIA,1,1:;"),
            pending("new", 2, "GPU-Y,NVIDIA,1,1:;"),
        ];
        assert_eq!(preferred(&pods, &avail, &[], 1, gpu), ["GPU-Y-0"]);
        let mut two = preferred(&pods, &avail, &[], 2, gpu);
        two.sort();
        assert_eq!(two, ["GPU-Y-0", "GPU-Z-0"]);
        // No pending entry of that size: distinct GPUs first (C06).
        assert_eq!(
            preferred(&pods, &avail, &[], 3, gpu),
            ["GPU-X-0", "GPU-Y-0", "GPU-Z-0"]
        );
        // must_include is kept.
        assert_eq!(preferred(&pods, &avail, &["GPU-X-1".into()], 1, gpu), ["GPU-X-1"]);
        let disagree = [
            pending("a", 1, "GPU-X,NVIDIA,1,1:;"),
            pending("b", 0, "GPU-Z,NVIDIA,1,1:;"),
        ];
        assert_eq!(preferred(&disagree, &avail, &[], 1, gpu), ["GPU-Z-0"]);
    }
}
