//! The thin edge to the Kubernetes API (kube-rs): the reflectors that feed Nodes and Pods (all
//! namespaces) into the pure [`SchedulerState`](crate::state::SchedulerState), and the bind's writes.
//!
//! **Reflectors.** One kube-rs `watcher` per kind (list, then watch, relisting with backoff on errors).
//! `Init`/`InitApply`/`InitDone` bracket a relist, so objects deleted while the watch was down are
//! released at `InitDone` (kube-rs has no tombstones; this is their equivalent). The extender is ready
//! once both kinds finished their first list.
//!
//! **Bind writes** (after [`SchedulerState::prepare_bind`](crate::state::SchedulerState::prepare_bind)
//! assumed the decision): one JSON merge patch on the pod carrying `metadata.resourceVersion` and
//! `metadata.uid` as preconditions (a pod changed or re-created since it was read gets 409) with
//! `hami.io/vgpu-node`, `hami.io/vgpu-time`, `hami.io/vgpu-devices-to-allocate`,
//! `hami.io/vgpu-devices-allocated`, `hami.io/bind-phase: allocating`, `hami.io/bind-time`,
//! `hami.io/vgpu-decision-signature` and the label `hami.io/vgpu-node`; then the `Binding`
//! (`POST pods/{name}/binding`). Any failure forgets the assumption, patches `hami.io/bind-phase:
//! failed` (removing the decision when it had been written), emits a `Warning` Event `BindingFailed`
//! (best effort), and returns the error for `ExtenderBindingResult.Error`.

use std::sync::{Arc, atomic::Ordering};

use futures::StreamExt;
use hami_api::annotations::{
    BIND_PHASE, BIND_PHASE_ALLOCATING, BIND_PHASE_FAILED, BIND_TIME, DECISION_SIGNATURE, DEVICES_ALLOCATED,
    DEVICES_TO_ALLOCATE, VGPU_NODE, VGPU_TIME, sign_decision,
};
use k8s_openapi::{
    api::core::v1::{Binding, Event, Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use crate::{
    error::{Error, Result},
    http::App,
    state::BindPlan,
    wire::ExtenderBindingArgs,
};

/// Field manager name on our patches.
pub const FIELD_MANAGER: &str = "hami-scheduler";

/// Runs the Node reflector until the task is dropped.
pub async fn run_node_reflector(app: Arc<App>, client: Client) {
    let api: Api<Node> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let problems = {
            let mut st = app.write_state();
            match event {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => st.apply_node(&n),
                Ok(watcher::Event::Delete(n)) => {
                    st.delete_node(&n);
                    Vec::new()
                }
                Ok(watcher::Event::Init) => {
                    st.begin_node_resync();
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    st.end_node_resync();
                    app.nodes_synced.store(true, Ordering::Release);
                    info!("node reflector synced");
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "node watch failed; retrying with backoff");
                    Vec::new()
                }
            }
        };
        for p in problems {
            app.metrics.annotation_errors.with_label_values(&["node"]).inc();
            warn!(problem = %p, "node annotation");
        }
    }
}

/// Runs the Pod reflector (all namespaces) until the task is dropped.
pub async fn run_pod_reflector(app: Arc<App>, client: Client) {
    let api: Api<Pod> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let problems = {
            let mut st = app.write_state();
            match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => st.apply_pod(&p),
                Ok(watcher::Event::Delete(p)) => {
                    st.delete_pod(&p);
                    Vec::new()
                }
                Ok(watcher::Event::Init) => {
                    st.begin_pod_resync();
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    st.end_pod_resync();
                    app.pods_synced.store(true, Ordering::Release);
                    info!("pod reflector synced");
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "pod watch failed; retrying with backoff");
                    Vec::new()
                }
            }
        };
        for p in problems {
            app.metrics.annotation_errors.with_label_values(&["pod"]).inc();
            warn!(problem = %p, "pod annotation");
        }
    }
}

/// The merge patch that records a decision on a pod (module docs).
///
/// # Errors
/// [`Error::Encode`] when the decision cannot be written in HAMi's format.
pub fn decision_patch(
    pod: &Pod,
    plan: &BindPlan,
    devices: &hami_api::PodDevices,
    key: &[u8],
    now: u64,
) -> Result<Value> {
    let pod_name = crate::state::pod_key(pod);
    let encoded = devices.encode().map_err(|source| Error::Encode {
        pod: pod_name,
        source,
    })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let signature = sign_decision(key, &uid, &plan.node, &encoded);
    let now = now.to_string();
    Ok(json!({
        "metadata": {
            "uid": uid,
            "resourceVersion": pod.metadata.resource_version,
            "annotations": {
                VGPU_NODE: plan.node,
                VGPU_TIME: now,
                DEVICES_TO_ALLOCATE: encoded,
                DEVICES_ALLOCATED: encoded,
                BIND_PHASE: BIND_PHASE_ALLOCATING,
                BIND_TIME: now,
                DECISION_SIGNATURE: signature,
            },
            "labels": { VGPU_NODE: plan.node },
        }
    }))
}

/// Binds a pod as kube-scheduler asked (module docs).
///
/// # Errors
/// [`Error::NoClient`], [`Error::Kube`] for a failed read, patch (409 included) or Binding,
/// [`Error::PodMismatch`] when the pod is gone, re-created or already bound, and the errors of
/// [`SchedulerState::prepare_bind`](crate::state::SchedulerState::prepare_bind).
pub async fn bind(app: &App, args: &ExtenderBindingArgs) -> Result<()> {
    let client = app.client.clone().ok_or(Error::NoClient("bind"))?;
    let key = format!("{}/{}", args.pod_namespace, args.pod_name);
    let api: Api<Pod> = Api::namespaced(client.clone(), &args.pod_namespace);
    let pod = api.get(&args.pod_name).await.map_err(|source| Error::Kube {
        action: "reading",
        pod: key.clone(),
        source,
    })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if !args.pod_uid.is_empty() && uid != args.pod_uid {
        return Err(Error::PodMismatch {
            pod: key,
            detail: format!("UID is {uid}, the bind asked for {} (re-created?)", args.pod_uid),
        });
    }
    if let Some(bound) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        return Err(Error::PodMismatch {
            pod: key,
            detail: format!("already bound to node {bound}"),
        });
    }
    let now = app.now();
    let plan = app.write_state().prepare_bind(&pod, &args.node, now)?;
    let mut written = false;
    let outcome = async {
        if let Some(devices) = &plan.devices {
            let patch = decision_patch(&pod, &plan, devices, &app.decision_key, now)?;
            api.patch(
                &args.pod_name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| Error::Kube {
                action: "patching",
                pod: key.clone(),
                source,
            })?;
            written = true;
        }
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(args.pod_name.clone()),
                namespace: Some(args.pod_namespace.clone()),
                uid: Some(uid.clone()),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(args.node.clone()),
                ..ObjectReference::default()
            },
        };
        api.create_subresource::<_, Value>("binding", &args.pod_name, &PostParams::default(), &binding)
            .await
            .map_err(|source| Error::Kube {
                action: "binding",
                pod: key.clone(),
                source,
            })?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = outcome {
        app.write_state().abort_bind(&uid);
        if matches!(&e, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409) {
            app.metrics.bind_conflicts.inc();
        }
        if plan.devices.is_some() {
            mark_failed(&api, &args.pod_name, written).await;
        }
        emit_event(&client, &pod, &args.node, &e.to_string()).await;
        return Err(e);
    }
    debug!(pod = %key, node = %args.node, "bound");
    Ok(())
}

/// Best effort: `hami.io/bind-phase: failed`, and the decision removed if it had been written (so a
/// rebuilt state does not count a pod that never got the node).
async fn mark_failed(api: &Api<Pod>, name: &str, written: bool) {
    let mut ann = Map::new();
    ann.insert(BIND_PHASE.into(), Value::from(BIND_PHASE_FAILED));
    let mut meta = Map::new();
    if written {
        for k in [
            DEVICES_ALLOCATED,
            DEVICES_TO_ALLOCATE,
            DECISION_SIGNATURE,
            VGPU_NODE,
        ] {
            ann.insert(k.into(), Value::Null);
        }
        meta.insert("labels".into(), json!({ VGPU_NODE: null }));
    }
    meta.insert("annotations".into(), Value::Object(ann));
    let patch = json!({ "metadata": meta });
    if let Err(e) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        debug!(pod = name, error = %e, "could not mark the bind failed");
    }
}

/// Best effort: a `Warning` Event `BindingFailed` on the pod.
async fn emit_event(client: &Client, pod: &Pod, node: &str, message: &str) {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some("BindingFailed".into()),
        message: Some(format!("binding to {node}: {message}")),
        type_: Some("Warning".into()),
        reporting_component: Some(FIELD_MANAGER.into()),
        event_time: Some(MicroTime(now)),
        action: Some("Binding".into()),
        reporting_instance: Some(FIELD_MANAGER.into()),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        debug!(error = %e, "could not emit the BindingFailed event");
    }
}
