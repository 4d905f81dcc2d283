//! Kubernetes objects (k8s-openapi `v1_34`) to the request and device model. Feature `k8s`.
//!
//! A pod's GPU request is read per container, init containers first (in spec order) then app containers,
//! which is the order of the allocation annotation's segments (`reference/hami.md` §1.3). Semantics follow
//! HAMi's `GenerateResourceRequests` (`reference/hami.md` §2.2): limits are read first and requests are the
//! fallback; `nvidia.com/gpu` is a count of distinct physical GPUs; `gpumem` is MiB per GPU and wins over
//! `gpumem-percentage`; a container that gives only memory, cores or a percentage gets
//! [`RequestDefaults::gpu_count`] GPUs; cores default to [`RequestDefaults::cores`]. Where HAMi is lax this
//! module is strict: a quantity that is negative, fractional, above HAMi's `int32`, or a percentage above
//! 100 is an [`Error::InvalidResource`] naming the container, the resource and the text, never a silent
//! zero (peer bugs C07, C09).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, Node, Pod},
    apimachinery::pkg::api::resource::Quantity as K8sQuantity,
};

use crate::{
    annotations::PodSchedulingAnnotations,
    device::FULL_GPU_CORES,
    error::{Error, Result},
    quantity::Quantity,
    request::{ContainerKind, ContainerRequest, DeviceRequest, MemoryRequest, PodRequest},
    resources::ResourceNames,
};

/// Largest value of HAMi's `int32` resource fields.
const HAMI_INT32_MAX: u64 = i32::MAX as u64;

/// Cluster defaults applied to GPU requests (HAMi's `defaultGPUNum`, `defaultMemory`, `defaultCores`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDefaults {
    /// GPUs given to a container that asks only for memory, cores or a percentage (HAMi: 1).
    pub gpu_count: u32,
    /// Memory per GPU, MiB, when neither `gpumem` nor `gpumem-percentage` is given; 0 means the whole
    /// GPU (100 %), HAMi's default.
    pub memory_mib: u64,
    /// Cores per GPU, percent of SMs, when `gpucores` is not given (HAMi: 0).
    pub cores: u32,
    /// A request for whole GPUs (no memory given, or 100 %) and no cores gets `gpucores: 100`, i.e. the
    /// GPUs exclusively (HAMi since v2.7, `defaultExclusiveCoreIfNeeded`).
    pub exclusive_when_whole: bool,
}

impl Default for RequestDefaults {
    /// HAMi's defaults.
    fn default() -> Self {
        Self {
            gpu_count: 1,
            memory_mib: 0,
            cores: 0,
            exclusive_when_whole: true,
        }
    }
}

/// The managed resources one container asks for, as written (after limits-then-requests resolution),
/// before defaults. `None` = not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerGpuResources {
    /// `nvidia.com/gpu`, a count.
    pub count: Option<u32>,
    /// `nvidia.com/gpumem`, MiB per GPU.
    pub memory_mib: Option<u64>,
    /// `nvidia.com/gpumem-percentage`, 0..=100.
    pub memory_percent: Option<u32>,
    /// `nvidia.com/gpucores`, percent of SMs, 0..=100.
    pub cores: Option<u32>,
    /// `nvidia.com/priority`, 0 or 1.
    pub priority: Option<u32>,
}

impl ContainerGpuResources {
    /// Whether any managed resource is named (even with value 0).
    #[must_use]
    pub fn any(&self) -> bool {
        self.count.is_some()
            || self.memory_mib.is_some()
            || self.memory_percent.is_some()
            || self.cores.is_some()
            || self.priority.is_some()
    }

    /// The device request after defaults, or `None` when the container takes no GPU (nothing named, or
    /// `nvidia.com/gpu: 0` with nothing else).
    #[must_use]
    pub fn device_request(&self, defaults: &RequestDefaults) -> Option<DeviceRequest> {
        let count = match self.count {
            Some(0) | None
                if self.memory_mib.is_none() && self.memory_percent.is_none() && self.cores.is_none() =>
            {
                return None;
            }
            Some(n) if n > 0 => n,
            _ => defaults.gpu_count.max(1),
        };
        let memory = match (self.memory_mib, self.memory_percent) {
            (Some(mib), _) => MemoryRequest::Mib(mib),
            (None, Some(pct)) => MemoryRequest::Percent(pct),
            (None, None) if defaults.memory_mib > 0 => MemoryRequest::Mib(defaults.memory_mib),
            (None, None) => MemoryRequest::Percent(100),
        };
        let whole = matches!(memory, MemoryRequest::Percent(100));
        let cores = match self.cores {
            Some(c) => c,
            None if whole && defaults.exclusive_when_whole => FULL_GPU_CORES,
            None => defaults.cores,
        };
        Some(DeviceRequest::new(count, memory, cores))
    }
}

/// The pod's containers in allocation-annotation order: init containers (restartable ones as
/// [`ContainerKind::Sidecar`]) then app containers.
#[must_use]
pub fn ordered_containers(pod: &Pod) -> Vec<(&Container, ContainerKind)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let init = spec.init_containers.iter().flatten().map(|c| {
        let kind = if c.restart_policy.as_deref() == Some("Always") {
            ContainerKind::Sidecar
        } else {
            ContainerKind::Init
        };
        (c, kind)
    });
    init.chain(spec.containers.iter().map(|c| (c, ContainerKind::App)))
        .collect()
}

/// The value of `resource` in the container's limits, else its requests.
fn limit_or_request<'a>(c: &'a Container, resource: &str) -> Option<&'a K8sQuantity> {
    let res = c.resources.as_ref()?;
    res.limits
        .as_ref()
        .and_then(|l| l.get(resource))
        .or_else(|| res.requests.as_ref().and_then(|r| r.get(resource)))
}

/// The value of `resource` in the container's requests, else its limits (host CPU and memory: the
/// scheduler charges requests, and Kubernetes defaults a missing request to the limit).
fn request_or_limit<'a>(c: &'a Container, resource: &str) -> Option<&'a K8sQuantity> {
    let res = c.resources.as_ref()?;
    res.requests
        .as_ref()
        .and_then(|r| r.get(resource))
        .or_else(|| res.limits.as_ref().and_then(|l| l.get(resource)))
}

fn invalid(container: &str, resource: &str, value: &str, detail: &'static str) -> Error {
    Error::InvalidResource {
        container: container.to_owned(),
        resource: resource.to_owned(),
        value: value.to_owned(),
        detail,
    }
}

/// A whole, non-negative resource value at most `max`.
fn whole(container: &str, resource: &str, q: &K8sQuantity, max: u64) -> Result<u64> {
    let parsed = Quantity::parse_non_negative(&q.0).map_err(|_| {
        invalid(
            container,
            resource,
            &q.0,
            "not a non-negative Kubernetes quantity",
        )
    })?;
    let n = parsed
        .as_integer_exact()
        .map_err(|_| invalid(container, resource, &q.0, "not a whole number"))?;
    if n > max {
        return Err(invalid(
            container,
            resource,
            &q.0,
            "above the largest accepted value",
        ));
    }
    Ok(n)
}

/// The managed resources of one container (limits first, requests as fallback).
///
/// # Errors
/// [`Error::InvalidResource`] for a value that is not a whole non-negative number, a count or MiB above
/// `i32::MAX` (HAMi's range; `gpumem` is MiB, so `4Gi` is refused rather than read as 4 Gi MiB), or a
/// percentage (`gpumem-percentage`, `gpucores`) above 100, or a priority other than 0 or 1; and a
/// memory request of zero (`gpumem: 0` or `gpumem-percentage: 0`): a GPU share without device memory
/// has no meaning, and HAMi-core reads a zero limit as "no limit" (peer case C29: HAMi #2312, PR
/// #2156), so it is refused here rather than turned into an unlimited device downstream.
pub fn container_gpu_resources(c: &Container, names: &ResourceNames) -> Result<ContainerGpuResources> {
    let get = |resource: &str, max: u64| -> Result<Option<u64>> {
        limit_or_request(c, resource)
            .map(|q| whole(&c.name, resource, q, max))
            .transpose()
    };
    // Memory requests are at least 1 (MiB or percent).
    let memory = |resource: &str, max: u64| -> Result<Option<u64>> {
        match get(resource, max)? {
            Some(0) => Err(invalid(
                &c.name,
                resource,
                limit_or_request(c, resource).map_or("0", |q| q.0.as_str()),
                "zero device memory: a GPU share needs at least 1 (omit the resource for the whole GPU)",
            )),
            v => Ok(v),
        }
    };
    let narrow = |v: Option<u64>| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    Ok(ContainerGpuResources {
        count: narrow(get(&names.gpu, HAMI_INT32_MAX)?),
        memory_mib: memory(&names.memory, HAMI_INT32_MAX)?,
        memory_percent: narrow(memory(&names.memory_percentage, 100)?),
        cores: narrow(get(&names.cores, u64::from(FULL_GPU_CORES))?),
        priority: narrow(get(&names.priority, 1)?),
    })
}

/// Whether any container (init or app) names one of the managed resources in its requests or limits:
/// the test kube-scheduler applies before calling the extender (`managedResources`), and the webhook's
/// test for pods it must touch.
#[must_use]
pub fn uses_managed_resources(pod: &Pod, names: &ResourceNames) -> bool {
    ordered_containers(pod).into_iter().any(|(c, _)| {
        c.resources.as_ref().is_some_and(|r| {
            [r.limits.as_ref(), r.requests.as_ref()]
                .into_iter()
                .flatten()
                .any(|m| m.keys().any(|k| names.contains(k)))
        })
    })
}

/// The pod as the placement policies see it: every container in annotation order with its host CPU and
/// memory requests and its GPU request after `defaults`; the pod's selection annotations
/// (`nvidia.com/use-gputype`, …, `nvidia.com/numa-bind`) apply to every GPU request; the
/// `hami.io/*-scheduler-policy` annotations become the per-pod overrides.
///
/// # Errors
/// [`Error::MissingField`] when the pod has no name, UID or spec; [`Error::InvalidResource`] for a bad
/// resource value (see [`container_gpu_resources`]; host `cpu` and `memory` too); the annotation parsers'
/// errors for a malformed selection annotation.
pub fn pod_request(pod: &Pod, names: &ResourceNames, defaults: &RequestDefaults) -> Result<PodRequest> {
    let meta = &pod.metadata;
    let name = meta.name.clone().ok_or(Error::MissingField {
        what: "metadata.name",
    })?;
    let uid = meta
        .uid
        .clone()
        .ok_or(Error::MissingField { what: "metadata.uid" })?;
    if pod.spec.is_none() {
        return Err(Error::MissingField { what: "spec" });
    }
    let empty = BTreeMap::new();
    let annotations =
        PodSchedulingAnnotations::from_annotations(meta.annotations.as_ref().unwrap_or(&empty))?;
    let mut containers = Vec::new();
    for (c, kind) in ordered_containers(pod) {
        let gpu = container_gpu_resources(c, names)?
            .device_request(defaults)
            .map(|mut d| {
                d.selector = annotations.selector.clone();
                d.numa_bind = annotations.numa_bind;
                d
            });
        // A host resource's request (else limit) in `conv`'s unit; 0 when absent.
        let host = |resource: &str, conv: fn(Quantity) -> Result<u64>| -> Result<u64> {
            request_or_limit(c, resource)
                .map(|q| {
                    Quantity::parse_non_negative(&q.0).and_then(conv).map_err(|_| {
                        invalid(&c.name, resource, &q.0, "not a non-negative Kubernetes quantity")
                    })
                })
                .transpose()
                .map(|v| v.unwrap_or(0))
        };
        let cpu_milli = host("cpu", Quantity::to_milli_ceil)?;
        let memory_mib = host("memory", Quantity::to_mib_ceil)?;
        containers.push(ContainerRequest {
            name: c.name.clone(),
            kind,
            cpu_milli,
            memory_mib,
            gpu,
        });
    }
    Ok(PodRequest {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        name,
        uid,
        containers,
        node_policy: annotations.node_policy,
        gpu_policy: annotations.gpu_policy,
    })
}

/// A node's allocatable host CPU (milli-vCPU) and memory (MiB) from `status.allocatable`; missing or
/// malformed values count as 0 (the node then fits no pod that asks for host resources).
#[must_use]
pub fn node_allocatable(node: &Node) -> (u64, u64) {
    let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |key: &str, conv: fn(Quantity) -> Result<u64>| {
        alloc
            .and_then(|a| a.get(key))
            .and_then(|q| Quantity::parse_non_negative(&q.0).ok())
            .and_then(|q| conv(q).ok())
            .unwrap_or(0)
    };
    (
        get("cpu", Quantity::to_milli_ceil),
        get("memory", Quantity::to_mib_ceil),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn ctr(name: &str, limits: &[(&str, &str)], requests: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), K8sQuantity((*v).to_owned())))
                    .collect()
            })
        };
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                limits: map(limits),
                requests: map(requests),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(init: Vec<Container>, app: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                init_containers: (!init.is_empty()).then_some(init),
                containers: app,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn init_first_limits_over_requests_and_defaults() {
        let p = pod(
            vec![ctr("init", &[("nvidia.com/gpumem", "1000")], &[])],
            vec![
                ctr(
                    "a",
                    &[("nvidia.com/gpu", "2"), ("nvidia.com/gpucores", "30")],
                    &[("nvidia.com/gpu", "5")],
                ),
                ctr("b", &[], &[("cpu", "500m"), ("memory", "1Gi")]),
                ctr("c", &[("nvidia.com/gpu", "1")], &[]),
            ],
        );
        let req = pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()).unwrap();
        let names: Vec<_> = req.containers.iter().map(|c| (c.name.as_str(), c.kind)).collect();
        assert_eq!(
            names,
            [
                ("init", ContainerKind::Init),
                ("a", ContainerKind::App),
                ("b", ContainerKind::App),
                ("c", ContainerKind::App)
            ]
        );
        // Memory only: one GPU by default, no cores.
        assert_eq!(
            req.containers[0].gpu,
            Some(DeviceRequest::new(1, MemoryRequest::Mib(1000), 0))
        );
        // Limits win over requests; no memory: the whole GPU's memory, cores as given.
        assert_eq!(
            req.containers[1].gpu,
            Some(DeviceRequest::new(2, MemoryRequest::Percent(100), 30))
        );
        assert_eq!(
            (
                req.containers[2].cpu_milli,
                req.containers[2].memory_mib,
                req.containers[2].gpu.clone()
            ),
            (500, 1024, None)
        );
        // A whole GPU with no cores is exclusive.
        assert_eq!(
            req.containers[3].gpu,
            Some(DeviceRequest::new(1, MemoryRequest::Percent(100), 100))
        );
    }

    #[test]
    fn strict_values_name_container_and_resource() {
        for (res, v) in [
            ("nvidia.com/gpumem", "4Gi"),
            ("nvidia.com/gpumem", "-1"),
            ("nvidia.com/gpu", "1500m"),
            ("nvidia.com/gpumem-percentage", "101"),
            ("nvidia.com/gpucores", "abc"),
            ("nvidia.com/priority", "2"),
        ] {
            let p = pod(vec![], vec![ctr("x", &[(res, v)], &[])]);
            let e = pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()).unwrap_err();
            match &e {
                Error::InvalidResource {
                    container,
                    resource,
                    value,
                    ..
                } => {
                    assert_eq!(
                        (container.as_str(), resource.as_str(), value.as_str()),
                        ("x", res, v)
                    );
                }
                other => panic!("{res}={v}: {other}"),
            }
            assert!(e.to_string().contains(res), "{e}");
        }
    }

    #[test]
    fn percent_and_zero_count() {
        let p = pod(
            vec![],
            vec![
                ctr("pct", &[("nvidia.com/gpumem-percentage", "20")], &[]),
                ctr("zero", &[("nvidia.com/gpu", "0")], &[]),
            ],
        );
        let req = pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()).unwrap();
        assert_eq!(
            req.containers[0].gpu,
            Some(DeviceRequest::new(1, MemoryRequest::Percent(20), 0))
        );
        assert_eq!(req.containers[1].gpu, None);
        assert!(uses_managed_resources(&p, &ResourceNames::default()));
        assert!(!uses_managed_resources(
            &pod(vec![], vec![ctr("n", &[("cpu", "1")], &[])]),
            &ResourceNames::default()
        ));
    }

    #[test]
    fn c29_zero_memory_is_refused_naming_the_container() {
        for (res, v) in [
            ("nvidia.com/gpumem", "0"),
            ("nvidia.com/gpumem-percentage", "0"),
            ("nvidia.com/gpumem", "0M"),
        ] {
            let p = pod(
                vec![],
                vec![ctr("zero", &[("nvidia.com/gpu", "1"), (res, v)], &[])],
            );
            let e = pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidResource { container, resource, value, .. }
                    if container == "zero" && resource == res && value == v),
                "{res}={v}: {e}"
            );
            assert!(e.to_string().contains("zero device memory"), "{e}");
        }
        // The smallest share is accepted.
        let p = pod(
            vec![],
            vec![ctr(
                "one",
                &[("nvidia.com/gpu", "1"), ("nvidia.com/gpumem", "1")],
                &[],
            )],
        );
        let req = pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()).unwrap();
        assert_eq!(
            req.containers[0].gpu,
            Some(DeviceRequest::new(1, MemoryRequest::Mib(1), 0))
        );
    }

    #[test]
    fn missing_uid_is_an_error() {
        let mut p = pod(vec![], vec![]);
        p.metadata.uid = None;
        assert!(matches!(
            pod_request(&p, &ResourceNames::default(), &RequestDefaults::default()),
            Err(Error::MissingField { what: "metadata.uid" })
        ));
    }
}
