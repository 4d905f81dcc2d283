//! The admission decision for one pod: pure functions from the request's objects (as raw JSON, so the
//! patch applies to exactly what the API server holds) to an allowed, possibly mutated, object or a
//! denial.

use hami_api::{
    ContainerKind, MemoryRequest, ResourceNames, annotations as ann, env,
    k8s::{self, ContainerGpuResources},
};
use hami_policy::{NamespaceQuota, QuotaUsage, check_quota};
use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use serde_json::{Map, Value};

use super::{ClusterView, WebhookConfig};

/// HAMi's MIG reservation annotation (`reference/hami.md` §1.3), written by the scheduler.
const MIG_ALLOCATIONS: &str = "hami.io/vgpu-mig-allocations";

/// Pod annotations only the scheduler and the device plugin write: the decision, its signature and
/// the bind progress. A user-supplied value is removed on CREATE and reverted on an untrusted UPDATE
/// (peer bug C18: a pod on another scheduler forging its own allocation).
pub const SCHEDULER_OWNED_ANNOTATIONS: &[&str] = &[
    ann::VGPU_NODE,
    ann::VGPU_TIME,
    ann::DEVICES_TO_ALLOCATE,
    ann::DEVICES_ALLOCATED,
    ann::BIND_PHASE,
    ann::BIND_TIME,
    ann::DECISION_SIGNATURE,
    MIG_ALLOCATIONS,
];

/// Pod labels only the scheduler writes (`hami.io/vgpu-node`, which the monitor selects on).
pub const SCHEDULER_OWNED_LABELS: &[&str] = &[ann::VGPU_NODE];

/// Whether a container environment variable named `name` would switch enforcement off or change the
/// limits the device plugin sets (container env wins over the device plugin's in the kubelet): the
/// interceptor's inputs (`CUDA_DEVICE_MEMORY_LIMIT` and `CUDA_DEVICE_MEMORY_LIMIT_<i>`,
/// `CUDA_DEVICE_SM_LIMIT`, `CUDA_DEVICE_MEMORY_SHARED_CACHE`), HAMi-core's policy and priority switches
/// (`GPU_CORE_UTILIZATION_POLICY`, `CUDA_TASK_PRIORITY`), the device plugin's opt-out
/// (`CUDA_DISABLE_CONTROL`: no `/etc/ld.so.preload`), and `NVIDIA_VISIBLE_DEVICES` (the container
/// runtime would expose GPUs other than the allocated ones). `LD_PRELOAD` is not in the list: the
/// interceptor comes from `/etc/ld.so.preload` either way, and a program can load the driver by itself
/// without any variable (the kernel hard limit holds those); add it with
/// [`WebhookConfig::extra_denied_env`] if wanted.
#[must_use]
pub fn enforcement_env_var(name: &str) -> bool {
    [
        env::CUDA_DISABLE_CONTROL,
        env::CUDA_DEVICE_MEMORY_LIMIT,
        env::CUDA_DEVICE_SM_LIMIT,
        env::CUDA_DEVICE_MEMORY_SHARED_CACHE,
        env::GPU_CORE_UTILIZATION_POLICY,
        env::CUDA_TASK_PRIORITY,
        env::NVIDIA_VISIBLE_DEVICES,
    ]
    .contains(&name)
        || name
            .strip_prefix(env::CUDA_DEVICE_MEMORY_LIMIT)
            .is_some_and(|rest| rest.starts_with('_'))
}

/// Whether `name` matches one of the configured extra names (`PREFIX*` or exact).
fn extra_denied(name: &str, extra: &[String]) -> bool {
    extra.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

/// What the webhook decided about one object.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// Admit the object as given here (equal to the input: no patch).
    Allow(Value),
    /// Refuse it, for these reasons (each names the container, resource or field).
    Deny(Vec<String>),
}

/// The settings one decision reads.
pub(super) struct Context<'a> {
    pub config: &'a WebhookConfig,
    pub names: &'a ResourceNames,
    pub defaults: &'a k8s::RequestDefaults,
    pub view: &'a dyn ClusterView,
}

/// Sets (`Some`) or removes (`None`) `metadata.<field>.<key>` of a raw object, creating the map when
/// needed; a non-object `metadata` is left alone (such an object is refused elsewhere).
fn set_meta(obj: &mut Value, field: &str, key: &str, value: Option<Value>) {
    let Some(meta) = obj.as_object_mut().and_then(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
    }) else {
        return;
    };
    match value {
        None => {
            if let Some(m) = meta.get_mut(field).and_then(Value::as_object_mut) {
                m.remove(key);
            }
        }
        Some(v) => {
            let slot = meta.entry(field).or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            if let Some(m) = slot.as_object_mut() {
                m.insert(key.to_owned(), v);
            }
        }
    }
}

/// The scheduler-owned annotations and labels of a raw object, as (field, key) pairs.
fn owned_keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    SCHEDULER_OWNED_ANNOTATIONS
        .iter()
        .map(|k| ("annotations", *k))
        .chain(SCHEDULER_OWNED_LABELS.iter().map(|k| ("labels", *k)))
}

/// CREATE: removes every scheduler-owned annotation and label.
fn strip_owned(obj: &mut Value) {
    for (field, key) in owned_keys() {
        set_meta(obj, field, key, None);
    }
}

/// UPDATE by `username`: unless trusted, every scheduler-owned annotation and label is put back to its
/// value in `old` (removed when `old` has none), so the change cannot forge nor wipe a decision.
pub(super) fn update(ctx: &Context<'_>, username: Option<&str>, obj: &Value, old: Option<&Value>) -> Verdict {
    let mut out = obj.clone();
    if username.is_some_and(|u| ctx.config.trusted_usernames.iter().any(|t| t == u)) {
        return Verdict::Allow(out);
    }
    for (field, key) in owned_keys() {
        let before = old
            .and_then(|o| o.get("metadata"))
            .and_then(|m| m.get(field))
            .and_then(|m| m.get(key))
            .cloned();
        let now = obj
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(|m| m.get(key));
        if now != before.as_ref() {
            set_meta(&mut out, field, key, before);
        }
    }
    Verdict::Allow(out)
}

/// UPDATE of `pods/ephemeralcontainers` (`kubectl debug`): a privileged ephemeral container in a pod
/// with managed resources is denied like a privileged container at creation (C16); nothing is changed
/// otherwise (the subresource only accepts changes to ephemeral containers).
pub(super) fn ephemeral(ctx: &Context<'_>, obj: &Value) -> Verdict {
    let pod: Pod = match serde_json::from_value(obj.clone()) {
        Ok(p) => p,
        Err(e) => return Verdict::Deny(vec![format!("the object is not a valid Pod: {e}")]),
    };
    if !k8s::uses_managed_resources(&pod, ctx.names) {
        return Verdict::Allow(obj.clone());
    }
    let problems: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true))
        .map(|c| {
            format!(
                "ephemeral container {:?} is privileged and the pod requests GPU resources: a privileged \
                 container sees every GPU of the node, so GPU limits cannot be enforced",
                c.name
            )
        })
        .collect();
    if problems.is_empty() {
        Verdict::Allow(obj.clone())
    } else {
        Verdict::Deny(problems)
    }
}

/// One container's managed resources as written on one side (limits or requests only).
fn one_side(c: &Container, limits: bool, names: &ResourceNames) -> hami_api::Result<ContainerGpuResources> {
    let res = c.resources.as_ref();
    let side = ResourceRequirements {
        limits: if limits {
            res.and_then(|r| r.limits.clone())
        } else {
            None
        },
        requests: if limits {
            None
        } else {
            res.and_then(|r| r.requests.clone())
        },
        ..Default::default()
    };
    let only = Container {
        name: c.name.clone(),
        resources: Some(side),
        ..Default::default()
    };
    k8s::container_gpu_resources(&only, names)
}

/// The fields of [`ContainerGpuResources`] with their resource names.
fn fields<'a>(r: &ContainerGpuResources, names: &'a ResourceNames) -> [(&'a str, Option<u64>); 5] {
    [
        (names.gpu.as_str(), r.count.map(u64::from)),
        (names.memory.as_str(), r.memory_mib),
        (names.memory_percentage.as_str(), r.memory_percent.map(u64::from)),
        (names.cores.as_str(), r.cores.map(u64::from)),
        (names.priority.as_str(), r.priority.map(u64::from)),
    ]
}

/// Kubernetes' effective request: `max(max over init of (init + sidecars started before),
/// sum(app) + sum(sidecars))` (the rule of `PodRequest::effective_cpu_milli`, for GPU amounts).
fn effective(items: &[(ContainerKind, u64)]) -> u64 {
    let (mut sidecars, mut init_peak, mut apps) = (0u64, 0u64, 0u64);
    for &(kind, v) in items {
        match kind {
            ContainerKind::Init => init_peak = init_peak.max(sidecars.saturating_add(v)),
            ContainerKind::Sidecar => {
                sidecars = sidecars.saturating_add(v);
                init_peak = init_peak.max(sidecars);
            }
            ContainerKind::App => apps = apps.saturating_add(v),
        }
    }
    init_peak.max(apps.saturating_add(sidecars))
}

/// Resource writes for one container: (JSON list, index, resource, value for both requests and limits).
type Write = (&'static str, usize, String, String);

/// CREATE in `namespace`: the full check (see the module documentation of `webhook`).
pub(super) fn create(ctx: &Context<'_>, namespace: &str, obj: &Value) -> Verdict {
    let pod: Pod = match serde_json::from_value(obj.clone()) {
        Ok(p) => p,
        Err(e) => return Verdict::Deny(vec![format!("the object is not a valid Pod: {e}")]),
    };
    let mut out = obj.clone();
    strip_owned(&mut out);

    let ignored = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ann::WEBHOOK_LABEL))
        .is_some_and(|v| v == ann::WEBHOOK_IGNORE)
        || ctx.config.ignored_namespaces.iter().any(|n| n == namespace)
        || ctx.view.namespace_ignored(namespace);
    if ignored || !k8s::uses_managed_resources(&pod, ctx.names) {
        return Verdict::Allow(out);
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Verdict::Allow(out);
    };

    let mut problems = Vec::new();
    // The scheduling annotations are read exactly as the extender reads them: an unknown or misspelled
    // policy is refused here with the valid values, never left to invert placement (peer case C22).
    let no_annotations = std::collections::BTreeMap::new();
    if let Err(e) = ann::PodSchedulingAnnotations::from_annotations(
        pod.metadata.annotations.as_ref().unwrap_or(&no_annotations),
    ) {
        problems.push(e.to_string());
    }
    let ours = ctx.config.scheduler_name.as_str();
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        problems.push(format!(
            "spec.nodeName is preset to {node:?}: a pod that requests GPU resources must be placed by \
             {ours:?}, which chooses its GPUs; remove spec.nodeName (pin it with a nodeSelector or node \
             affinity instead)"
        ));
    }
    let containers = k8s::ordered_containers(&pod);
    for (c, _) in &containers {
        if c.security_context.as_ref().and_then(|s| s.privileged) == Some(true) {
            problems.push(format!(
                "container {:?} is privileged and the pod requests GPU resources: a privileged container \
                 sees every GPU of the node, so GPU limits cannot be enforced; drop privileged or move \
                 the container to a pod without GPU resources",
                c.name
            ));
        }
    }
    let set_scheduler = match spec.scheduler_name.as_deref().unwrap_or("") {
        "" => true,
        name if name == ours => false,
        "default-scheduler" => ctx.config.force_overwrite_default_scheduler,
        other => {
            problems.push(format!(
                "spec.schedulerName is {other:?}, but the pod requests GPU resources, which only {ours:?} \
                 accounts for; remove spec.schedulerName or set it to {ours:?}"
            ));
            false
        }
    };

    let init_count = spec.init_containers.as_ref().map_or(0, Vec::len);
    let mut writes: Vec<Write> = Vec::new();
    let (mut memory, mut cores) = (Vec::new(), Vec::new());
    for (pos, (c, kind)) in containers.iter().enumerate() {
        let (list, index) = if pos < init_count {
            ("initContainers", pos)
        } else {
            ("containers", pos - init_count)
        };
        let before = problems.len();
        let (limits, requests) = match (
            k8s::container_gpu_resources(c, ctx.names),
            one_side(c, true, ctx.names),
            one_side(c, false, ctx.names),
        ) {
            (Ok(_), Ok(l), Ok(r)) => (l, r),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                problems.push(e.to_string());
                continue;
            }
        };
        for ((resource, l), (_, r)) in fields(&limits, ctx.names)
            .into_iter()
            .zip(fields(&requests, ctx.names))
        {
            if let (Some(l), Some(r)) = (l, r)
                && l != r
            {
                problems.push(format!(
                    "container {:?}: resource {resource}: request {r} differs from limit {l} (an extended \
                     resource's request must equal its limit)",
                    c.name
                ));
            }
        }
        // Limits first, requests as fallback (HAMi's reading).
        let res = ContainerGpuResources {
            count: limits.count.or(requests.count),
            memory_mib: limits.memory_mib.or(requests.memory_mib),
            memory_percent: limits.memory_percent.or(requests.memory_percent),
            cores: limits.cores.or(requests.cores),
            priority: limits.priority.or(requests.priority),
        };
        if !res.any() {
            continue;
        }
        if res.count == Some(0)
            && (res.memory_mib.is_some() || res.memory_percent.is_some() || res.cores.is_some())
        {
            problems.push(format!(
                "container {:?}: resource {} = 0 but GPU memory or cores are given; ask for at least one GPU \
                 or drop the other GPU resources",
                c.name, ctx.names.gpu
            ));
        }
        for var in c.env.iter().flatten() {
            if enforcement_env_var(&var.name) || extra_denied(&var.name, &ctx.config.extra_denied_env) {
                problems.push(format!(
                    "container {:?}: environment variable {} is not allowed on a container that requests \
                     GPU resources: it would switch off or change GPU limit enforcement (the device plugin \
                     sets the limits)",
                    c.name, var.name
                ));
            }
        }
        if problems.len() > before {
            continue;
        }

        // Every managed resource given, on both sides, with the winning text.
        let resources = c.resources.as_ref();
        for resource in fields(&res, ctx.names).into_iter().map(|(n, _)| n) {
            let text = [
                resources.and_then(|r| r.limits.as_ref()),
                resources.and_then(|r| r.requests.as_ref()),
            ]
            .into_iter()
            .flatten()
            .find_map(|m| m.get(resource));
            if let Some(q) = text {
                writes.push((list, index, resource.to_owned(), q.0.clone()));
            }
        }
        let Some(device) = res.device_request(ctx.defaults) else {
            continue;
        };
        if res.count.is_none() {
            writes.push((list, index, ctx.names.gpu.clone(), device.count.to_string()));
        }
        if res.cores.is_none() && device.cores > 0 {
            writes.push((list, index, ctx.names.cores.clone(), device.cores.to_string()));
        }
        let count = u64::from(device.count);
        // A percentage resolves against the GPU the pod lands on: the extender checks it at placement.
        let mib = match device.memory {
            MemoryRequest::Mib(m) => m.saturating_mul(count),
            MemoryRequest::Percent(_) => 0,
        };
        memory.push((*kind, mib));
        cores.push((*kind, u64::from(device.cores).saturating_mul(count)));
    }

    if problems.is_empty() {
        let quota = ctx
            .config
            .quotas
            .get(namespace)
            .copied()
            .map(NamespaceQuota::from)
            .or_else(|| ctx.view.namespace_quota(namespace));
        if let Some(quota) = quota {
            let demand = QuotaUsage {
                memory_mib: effective(&memory),
                cores: effective(&cores),
            };
            match ctx.view.quota_used(namespace) {
                Some(used) => {
                    if let Err(e) = check_quota(&quota, used, demand) {
                        problems.push(format!("namespace {namespace:?}: {e}"));
                    }
                }
                None => problems.push(format!(
                    "namespace {namespace:?} has a GPU quota, and the scheduler has not finished reading \
                     the cluster's pods (starting, or relisting after a lost watch), so what the namespace \
                     holds is not known yet; retry shortly"
                )),
            }
        }
    }
    if !problems.is_empty() {
        return Verdict::Deny(problems);
    }

    if set_scheduler && let Some(s) = out.get_mut("spec").and_then(Value::as_object_mut) {
        s.insert("schedulerName".to_owned(), Value::String(ours.to_owned()));
    }
    for (list, index, resource, value) in writes {
        let Some(c) = out
            .get_mut("spec")
            .and_then(|s| s.get_mut(list))
            .and_then(|l| l.get_mut(index))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        let resources = c.entry("resources").or_insert_with(|| Value::Object(Map::new()));
        if !resources.is_object() {
            *resources = Value::Object(Map::new());
        }
        for side in ["limits", "requests"] {
            let Some(r) = resources.as_object_mut() else {
                continue;
            };
            let m = r.entry(side).or_insert_with(|| Value::Object(Map::new()));
            if !m.is_object() {
                *m = Value::Object(Map::new());
            }
            if let Some(m) = m.as_object_mut() {
                m.insert(resource.clone(), Value::String(value.clone()));
            }
        }
    }
    Verdict::Allow(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use serde_json::json;

    use super::*;
    use crate::webhook::NoClusterView;

    fn ctx(config: &WebhookConfig) -> Context<'_> {
        static NAMES: std::sync::LazyLock<ResourceNames> = std::sync::LazyLock::new(ResourceNames::default);
        static DEFAULTS: k8s::RequestDefaults = k8s::RequestDefaults {
            gpu_count: 1,
            memory_mib: 0,
            cores: 0,
            exclusive_when_whole: true,
        };
        Context {
            config,
            names: &NAMES,
            defaults: &DEFAULTS,
            view: &NoClusterView,
        }
    }

    #[test]
    fn env_names() {
        for n in [
            "CUDA_DISABLE_CONTROL",
            "CUDA_DEVICE_MEMORY_LIMIT",
            "CUDA_DEVICE_MEMORY_LIMIT_0",
            "CUDA_DEVICE_MEMORY_LIMIT_12",
            "CUDA_DEVICE_SM_LIMIT",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            "GPU_CORE_UTILIZATION_POLICY",
            "CUDA_TASK_PRIORITY",
            "NVIDIA_VISIBLE_DEVICES",
        ] {
            assert!(enforcement_env_var(n), "{n}");
        }
        for n in [
            "CUDA_VISIBLE_DEVICES",
            "LD_PRELOAD",
            "CUDA_DEVICE_MEMORY_LIMITX",
            "PATH",
            "HAMI_VGPU_LOG",
        ] {
            assert!(!enforcement_env_var(n), "{n}");
        }
        let extra = ["LD_PRELOAD".to_owned(), "MY_*".to_owned()];
        assert!(extra_denied("LD_PRELOAD", &extra) && extra_denied("MY_HOOK", &extra));
        assert!(!extra_denied("LD_PRELOAD_X", &extra) && !extra_denied("M", &extra));
    }

    #[test]
    fn effective_is_max_of_init_and_app_sum() {
        use ContainerKind::{App, Init, Sidecar};
        assert_eq!(effective(&[(Init, 10), (Init, 10), (Init, 10), (App, 0)]), 10);
        assert_eq!(effective(&[(Init, 5), (App, 3), (App, 4)]), 7);
        assert_eq!(effective(&[(Sidecar, 2), (Init, 5), (App, 1)]), 7);
        assert_eq!(effective(&[]), 0);
    }

    #[test]
    fn update_reverts_untrusted_changes_and_keeps_trusted_ones() {
        let config = WebhookConfig {
            trusted_usernames: vec!["system:serviceaccount:hami:hami-scheduler".into()],
            ..WebhookConfig::default()
        };
        let old = json!({"metadata": {"annotations": {"hami.io/vgpu-node": "node-1", "a": "1"}}});
        let new = json!({"metadata": {
            "annotations": {"hami.io/vgpu-node": "node-2", "hami.io/bind-phase": "success", "a": "2"},
            "labels": {"hami.io/vgpu-node": "node-2"}
        }});
        let Verdict::Allow(out) = update(&ctx(&config), Some("alice"), &new, Some(&old)) else {
            panic!("denied")
        };
        assert_eq!(
            out,
            json!({"metadata": {"annotations": {"hami.io/vgpu-node": "node-1", "a": "2"}, "labels": {}}})
        );
        let Verdict::Allow(out) = update(
            &ctx(&config),
            Some("system:serviceaccount:hami:hami-scheduler"),
            &new,
            Some(&old),
        ) else {
            panic!("denied")
        };
        assert_eq!(out, new);
        // A user removing the scheduler's annotation gets it back, even with no annotations left.
        let bare = json!({"metadata": {}});
        let Verdict::Allow(out) = update(&ctx(&config), None, &bare, Some(&old)) else {
            panic!("denied")
        };
        assert_eq!(
            out,
            json!({"metadata": {"annotations": {"hami.io/vgpu-node": "node-1"}}})
        );
        // Garbage never panics.
        for junk in [
            json!(null),
            json!([1]),
            json!({"metadata": 3}),
            json!({"metadata": {"annotations": "x"}}),
        ] {
            let _ = update(&ctx(&config), None, &junk, Some(&old));
            let _ = update(&ctx(&config), None, &old, Some(&junk));
        }
    }

    #[test]
    fn request_limit_mismatch_and_zero_count_are_denied() {
        let config = WebhookConfig::default();
        let pod = |resources: Value| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                   "spec": {"containers": [{"name": "c", "resources": resources}]}})
        };
        let Verdict::Deny(why) = create(
            &ctx(&config),
            "ns",
            &pod(json!({"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "5"}})),
        ) else {
            panic!("allowed")
        };
        assert!(
            why[0].contains("\"c\"") && why[0].contains("nvidia.com/gpu") && why[0].contains("differs"),
            "{why:?}"
        );
        let Verdict::Deny(why) = create(
            &ctx(&config),
            "ns",
            &pod(json!({"limits": {"nvidia.com/gpu": "0", "nvidia.com/gpumem": "100"}})),
        ) else {
            panic!("allowed")
        };
        assert!(why[0].contains("= 0"), "{why:?}");
        // A request-only value is validated too.
        let Verdict::Deny(why) = create(
            &ctx(&config),
            "ns",
            &pod(json!({"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpucores": "150"}})),
        ) else {
            panic!("allowed")
        };
        assert!(why[0].contains("nvidia.com/gpucores"), "{why:?}");
    }
}
