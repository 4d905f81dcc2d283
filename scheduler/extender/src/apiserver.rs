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
//!
//! **Reading the pod.** Bind uses the pod reflector's copy of a pending pod when it has one with the
//! bind's UID, and a GET otherwise; the patch's resourceVersion precondition turns a stale copy into a
//! 409, after which the bind is retried once from a GET. A Binding that got no answer (transport error)
//! is checked with a GET before it is rolled back, so a pod that did get the node keeps its decision.
//!
//! **Shutdown.** While the extender drains ([`App::drain`]) new binds are refused; binds in flight
//! finish, or, once [`App::cancel_binds`] is called, roll back at their next safe point: before the
//! patch, during the patch (the decision is then removed whether or not it landed), or before the
//! Binding. A Binding already sent is never abandoned: its answer decides.

use std::sync::{Arc, atomic::Ordering};

use futures::StreamExt;
use hami_api::annotations::{
    BIND_PHASE, BIND_PHASE_ALLOCATING, BIND_PHASE_FAILED, BIND_TIME, DECISION_SIGNATURE, DEVICES_ALLOCATED,
    DEVICES_TO_ALLOCATE, VGPU_NODE, VGPU_TIME, sign_decision,
};
use k8s_openapi::{
    api::core::v1::{Binding, Event, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use crate::{
    error::{Error, Result},
    http::App,
    state::{BindPlan, SchedulerState},
    wire::ExtenderBindingArgs,
};

/// Field manager name on our patches.
pub const FIELD_MANAGER: &str = "hami-scheduler";

/// Runs the Node reflector until the task is dropped.
pub async fn run_node_reflector(app: Arc<App>, client: Client) {
    run_reflector(
        app,
        client,
        Reflected {
            kind: "node",
            apply: SchedulerState::apply_node,
            delete: SchedulerState::delete_node,
            begin_resync: SchedulerState::begin_node_resync,
            end_resync: SchedulerState::end_node_resync,
        },
    )
    .await;
}

/// Runs the Pod reflector (all namespaces) until the task is dropped.
pub async fn run_pod_reflector(app: Arc<App>, client: Client) {
    run_reflector(
        app,
        client,
        Reflected {
            kind: "pod",
            apply: SchedulerState::apply_pod,
            delete: SchedulerState::delete_pod,
            begin_resync: SchedulerState::begin_pod_resync,
            end_resync: SchedulerState::end_pod_resync,
        },
    )
    .await;
}

/// How a reflector of one kind feeds the state: the kind (in logs and the `annotation_errors` label)
/// and the state's handlers for it; `begin_resync` / `end_resync` also mark the kind's view
/// incomplete / complete.
struct Reflected<K> {
    kind: &'static str,
    apply: fn(&mut SchedulerState, &K) -> Vec<String>,
    delete: fn(&mut SchedulerState, &K),
    begin_resync: fn(&mut SchedulerState),
    end_resync: fn(&mut SchedulerState),
}

/// Watches every object of kind `K` (all namespaces) with backoff, applying each event to the state
/// until the task is dropped.
async fn run_reflector<K>(app: Arc<App>, client: Client, r: Reflected<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let kind = r.kind;
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let problems = {
            let mut st = app.write_state();
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (r.apply)(&mut st, &o),
                Ok(watcher::Event::Delete(o)) => {
                    (r.delete)(&mut st, &o);
                    Vec::new()
                }
                Ok(watcher::Event::Init) => {
                    (r.begin_resync)(&mut st);
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    (r.end_resync)(&mut st);
                    info!("{kind} reflector synced");
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "{kind} watch failed; retrying with backoff");
                    Vec::new()
                }
            }
        };
        for p in problems {
            app.metrics.annotation_errors.with_label_values(&[kind]).inc();
            warn!(problem = %p, "{kind} annotation");
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

/// Where a bind read its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The pod reflector's copy (may lag; a stale copy gets 409 on the patch).
    Store,
    /// A GET.
    Get,
}

fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409)
}

/// Binds a pod as kube-scheduler asked (module docs). The pod is read from the reflector's copy when
/// the pod reflector has synced and holds it with the bind's UID; a 409 on the patch made from that
/// copy is retried once from a GET (the copy was stale). Refused while the extender drains.
///
/// # Errors
/// [`Error::NoClient`], [`Error::ShuttingDown`], [`Error::Kube`] for a failed read, patch (409
/// included) or Binding, [`Error::PodMismatch`] when the pod is gone, re-created or already bound, and
/// the errors of [`SchedulerState::prepare_bind`](crate::state::SchedulerState::prepare_bind).
pub async fn bind(app: &App, args: &ExtenderBindingArgs) -> Result<()> {
    let key = format!("{}/{}", args.pod_namespace, args.pod_name);
    let Some(_guard) = app.bind_started() else {
        return Err(Error::ShuttingDown {
            pod: key,
            what: "refused",
        });
    };
    let client = app.client.clone().ok_or(Error::NoClient("bind"))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), &args.pod_namespace);
    let cached = if app.bind_from_store.load(Ordering::Relaxed) && app.read_state().synced().pods {
        app.read_state()
            .unbound_pod(&args.pod_namespace, &args.pod_name)
            .filter(|p| args.pod_uid.is_empty() || p.metadata.uid.as_deref() == Some(args.pod_uid.as_str()))
            .cloned()
    } else {
        None
    };
    if let Some(pod) = cached {
        app.bind_reads[0].fetch_add(1, Ordering::Relaxed);
        match bind_pod(app, &client, &api, args, &pod, Source::Store).await {
            Err(e) if is_conflict(&e) => debug!(pod = %key, "reflector copy was stale; reading the pod"),
            other => return other,
        }
    }
    app.bind_reads[1].fetch_add(1, Ordering::Relaxed);
    let pod = api.get(&args.pod_name).await.map_err(|source| Error::Kube {
        action: "reading",
        pod: key.clone(),
        source,
    })?;
    bind_pod(app, &client, &api, args, &pod, Source::Get).await
}

/// Resolves when the extender asks binds to roll back.
async fn cancelled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One bind attempt from `pod` as read from `source`.
async fn bind_pod(
    app: &App,
    client: &Client,
    api: &Api<Pod>,
    args: &ExtenderBindingArgs,
    pod: &Pod,
    source: Source,
) -> Result<()> {
    let key = format!("{}/{}", args.pod_namespace, args.pod_name);
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
    let plan = app.write_state().prepare_bind(pod, &args.node, now)?;
    let mut cancel = app.cancel_signal();
    let rolled_back = || Error::ShuttingDown {
        pod: key.clone(),
        what: "rolled back",
    };
    // Whether the decision may be on the pod (a cancelled patch may or may not have been applied).
    let mut written = false;
    let outcome = async {
        if let Some(devices) = &plan.devices {
            let patch = decision_patch(pod, &plan, devices, &app.decision_key, now)?;
            if *cancel.borrow() {
                return Err(rolled_back());
            }
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let merge = Patch::Merge(&patch);
            let write = api.patch(&args.pod_name, &params, &merge);
            tokio::select! {
                r = write => {
                    r.map_err(|source| Error::Kube {
                        action: "patching",
                        pod: key.clone(),
                        source,
                    })?;
                }
                () = cancelled(&mut cancel) => {
                    written = true;
                    return Err(rolled_back());
                }
            }
            written = true;
        }
        if *cancel.borrow() {
            return Err(rolled_back());
        }
        // From here on the bind is not cancelled: once the Binding is sent, only its answer tells
        // whether the pod got the node.
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
        let result = api
            .create_subresource::<_, Value>("binding", &args.pod_name, &PostParams::default(), &binding)
            .await;
        if let Err(source) = result {
            // No answer (transport error, timeout): the Binding may have been applied; ask.
            if !matches!(source, kube::Error::Api(_))
                && let Ok(p) = api.get(&args.pod_name).await
                && p.metadata.uid.as_deref() == Some(uid.as_str())
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(args.node.as_str())
            {
                return Ok(());
            }
            return Err(Error::Kube {
                action: "binding",
                pod: key.clone(),
                source,
            });
        }
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = outcome {
        app.write_state().abort_bind(&uid);
        if matches!(e, Error::ShuttingDown { .. }) {
            app.binds_cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if is_conflict(&e) {
            app.metrics.bind_conflicts.inc();
            if source == Source::Store {
                // The caller retries from a GET; the pod changed, nothing of ours was written.
                return Err(e);
            }
        }
        if plan.devices.is_some() {
            mark_failed(api, &args.pod_name, written).await;
        }
        emit_event(client, pod, &args.node, &e.to_string()).await;
        return Err(e);
    }
    app.write_state().finish_bind(&uid);
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
