//! kube-rs clients against the fake API server: the round trips the agent and scheduler use,
//! with the wire details and the apiserver semantics (resourceVersion conflicts, binding,
//! selectors, watch translation and expiry) checked against the store.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use hami_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::Status;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([("gpu".to_owned(), "true".to_owned())])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

fn pod(ns: &str, name: &str, node: Option<&str>, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: node.map(str::to_owned),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "c".to_owned(),
                image: Some("busybox".to_owned()),
                ..Default::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The next event of a pod watch, within 5 s.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .expect("the watch goes on")
        .expect("an event, not an error")
}

fn api_code(err: &kube::Error) -> Option<(u16, String)> {
    match err {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

fn rv(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("numeric resourceVersion")
}

#[tokio::test]
async fn node_get_list_and_merge_patch_round_trip() {
    let server = FakeApiServer::start().await.unwrap();
    let stored = server.insert_node(node("gpu-node-1"));
    assert!(stored.metadata.uid.is_some() && stored.metadata.creation_timestamp.is_some());
    let nodes: Api<Node> = Api::all(server.client());

    let got = nodes.get("gpu-node-1").await.unwrap();
    assert_eq!(got.metadata.uid, stored.metadata.uid);
    assert_eq!(rv(&got.metadata), 1);

    let list = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.metadata.resource_version.as_deref(), Some("1"));

    let pp = PatchParams {
        field_manager: Some("hami-agent".to_owned()),
        ..PatchParams::default()
    };
    let patch = json!({"metadata": {"annotations": {"hami.io/node-nvidia-register": "[]"}}});
    let patched = nodes
        .patch("gpu-node-1", &pp, &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(rv(&patched.metadata), 2);
    let stored = server.node("gpu-node-1").unwrap();
    assert_eq!(
        stored.metadata.annotations.unwrap()["hami.io/node-nvidia-register"],
        "[]"
    );
    // Labels untouched by the merge.
    assert_eq!(stored.metadata.labels.unwrap()["gpu"], "true");

    let request = server
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(
        request.path_and_query,
        "/api/v1/nodes/gpu-node-1?&fieldManager=hami-agent"
    );
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(request.body_json().unwrap(), patch);

    // The same patch again is a no-op: no write, same resourceVersion.
    let again = nodes
        .patch("gpu-node-1", &pp, &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(rv(&again.metadata), 2);
    assert_eq!(server.resource_version(), 2);

    // Strategic merge patch on metadata merges like a merge patch; a main-resource patch cannot
    // change status.
    let smp = json!({"metadata": {"labels": {"zone": "a"}}, "status": {"phase": "Terminated"}});
    nodes
        .patch("gpu-node-1", &pp, &Patch::Strategic(&smp))
        .await
        .unwrap();
    let stored = server.node("gpu-node-1").unwrap();
    assert_eq!(stored.metadata.labels.as_ref().unwrap()["zone"], "a");
    assert_eq!(stored.metadata.labels.as_ref().unwrap()["gpu"], "true");
    assert!(stored.status.is_none_or(|s| s.phase.is_none()));

    let missing = nodes.get("nope").await.unwrap_err();
    assert_eq!(api_code(&missing), Some((404, "NotFound".to_owned())));
}

#[tokio::test]
async fn stale_resource_version_or_uid_in_a_patch_is_a_conflict() {
    let server = FakeApiServer::start().await.unwrap();
    let stored = server.insert_node(node("n1"));
    let nodes: Api<Node> = Api::all(server.client());
    let first_rv = stored.metadata.resource_version.clone().unwrap();

    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1"}}})),
        )
        .await
        .unwrap();

    // Optimistic concurrency: the body names the resourceVersion it read, which is now stale.
    let stale = json!({"metadata": {"resourceVersion": first_rv, "annotations": {"a": "2"}}});
    let err = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((409, "Conflict".to_owned())));
    assert_eq!(server.node("n1").unwrap().metadata.annotations.unwrap()["a"], "1");

    let wrong_uid = json!({"metadata": {"uid": "not-the-uid", "annotations": {"a": "3"}}});
    let err = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&wrong_uid))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((409, "Conflict".to_owned())));

    // With the current resourceVersion it applies.
    let current = server.node("n1").unwrap().metadata.resource_version.unwrap();
    let fresh = json!({"metadata": {"resourceVersion": current, "annotations": {"a": "4"}}});
    let patched = nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&fresh))
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.unwrap()["a"], "4");
}

#[tokio::test]
async fn json_patch_applies_and_a_failed_test_is_invalid() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_pod(pod("ns", "p", None, &[]));
    let client = server.client();
    let send = |ops: Value| {
        let client = client.clone();
        async move {
            let request = http::Request::patch("/api/v1/namespaces/ns/pods/p")
                .header("content-type", "application/json-patch+json")
                .body(serde_json::to_vec(&ops).unwrap())
                .unwrap();
            client.request::<Pod>(request).await
        }
    };
    let err = send(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": "999"},
        {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
    ]))
    .await
    .unwrap_err();
    assert_eq!(api_code(&err), Some((422, "Invalid".to_owned())));
    assert!(server.pod("ns", "p").unwrap().metadata.annotations.is_none());

    let patched = send(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
        {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
    ]))
    .await
    .unwrap();
    assert_eq!(patched.metadata.annotations.as_ref().unwrap()["x"], "y");
    assert_eq!(rv(&patched.metadata), 2);
}

#[tokio::test]
async fn pods_create_list_select_and_delete() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let ns_a: Api<Pod> = Api::namespaced(client.clone(), "a");
    let created = ns_a
        .create(
            &PostParams::default(),
            &pod("a", "p1", Some("node-1"), &[("app", "web")]),
        )
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));
    assert!(created.metadata.uid.is_some());
    let dup = ns_a
        .create(&PostParams::default(), &pod("a", "p1", None, &[]))
        .await
        .unwrap_err();
    assert_eq!(api_code(&dup), Some((409, "AlreadyExists".to_owned())));
    server.insert_pod(pod("a", "p2", None, &[("app", "db")]));
    server.insert_pod(pod("b", "p3", Some("node-1"), &[("app", "web"), ("tier", "x")]));
    server.set_pod_phase("b", "p3", "Running").unwrap();

    let all: Api<Pod> = Api::all(client.clone());
    let names =
        |pods: Vec<Pod>| -> Vec<String> { pods.into_iter().map(|p| p.metadata.name.unwrap()).collect() };
    let list = |lp: ListParams| {
        let all = all.clone();
        async move { all.list(&lp).await }
    };
    let listed = |lp: ListParams| {
        let list = list(lp);
        async move { names(list.await.unwrap().items) }
    };
    assert_eq!(listed(ListParams::default()).await, ["p1", "p2", "p3"]);
    assert_eq!(
        names(ns_a.list(&ListParams::default()).await.unwrap().items),
        ["p1", "p2"]
    );
    let by_field = |f: &str| ListParams::default().fields(f);
    assert_eq!(listed(by_field("spec.nodeName=node-1")).await, ["p1", "p3"]);
    assert_eq!(
        listed(by_field("spec.nodeName==node-1,metadata.namespace=b")).await,
        ["p3"]
    );
    assert_eq!(listed(by_field("spec.nodeName=")).await, ["p2"]);
    assert_eq!(listed(by_field("spec.nodeName!=node-1")).await, ["p2"]);
    assert_eq!(listed(by_field("status.phase=Running")).await, ["p3"]);
    assert_eq!(listed(by_field("metadata.name=p2")).await, ["p2"]);
    assert_eq!(
        listed(ListParams::default().labels("app=web")).await,
        ["p1", "p3"]
    );
    assert_eq!(
        listed(ListParams::default().labels("app=web,tier=x")).await,
        ["p3"]
    );
    let bad = list(by_field("spec.containers=x")).await.unwrap_err();
    assert_eq!(api_code(&bad), Some((400, "BadRequest".to_owned())));

    let raw = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path_and_query.contains("labelSelector"))
        .unwrap();
    assert!(
        raw.path_and_query.contains("labelSelector=app%3Dweb%2Ctier%3Dx"),
        "{}",
        raw.path_and_query
    );

    let deleted = ns_a.delete("p1", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().unwrap().metadata.name.as_deref(), Some("p1"));
    assert!(server.pod("a", "p1").is_none());
    let gone = ns_a.delete("p1", &DeleteParams::default()).await.unwrap_err();
    assert_eq!(api_code(&gone), Some((404, "NotFound".to_owned())));
    assert_eq!(server.pods().len(), 2);
}

#[tokio::test]
async fn pod_updates_follow_the_apiserver_rules() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_pod(pod("ns", "p", None, &[]));
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    // Binding by patching spec.nodeName is refused (spec is immutable).
    let err = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((422, "Invalid".to_owned())));
    // Status only through /status.
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let phase = || server.pod("ns", "p").unwrap().status.unwrap().phase;
    pods.patch("p", &PatchParams::default(), &running).await.unwrap();
    assert_eq!(phase().as_deref(), Some("Pending"));
    pods.patch_status("p", &PatchParams::default(), &running)
        .await
        .unwrap();
    assert_eq!(phase().as_deref(), Some("Running"));
    // Annotations must be strings: the typed decode refuses anything else.
    let err = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": 1}}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((422, "Invalid".to_owned())));
}

#[tokio::test]
async fn binding_sets_the_node_once() {
    let server = FakeApiServer::start().await.unwrap();
    let stored = server.insert_pod(pod("ns", "p", None, &[]));
    let pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let binding = |node: &str| Binding {
        metadata: ObjectMeta {
            name: Some("p".to_owned()),
            namespace: Some("ns".to_owned()),
            uid: stored.metadata.uid.clone(),
            annotations: Some(BTreeMap::from([(
                "hami.io/bind-phase".to_owned(),
                "success".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            ..ObjectReference::default()
        },
    };
    let status: Status = pods
        .create_subresource("binding", "p", &PostParams::default(), &binding("node-1"))
        .await
        .unwrap();
    assert!(status.is_success(), "{status:?}");
    let bound = server.pod("ns", "p").unwrap();
    assert_eq!(bound.spec.unwrap().node_name.as_deref(), Some("node-1"));
    assert_eq!(
        bound.metadata.annotations.unwrap()["hami.io/bind-phase"],
        "success"
    );
    let conditions = bound.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True")
    );

    let err = pods
        .create_subresource::<_, Status>("binding", "p", &PostParams::default(), &binding("node-2"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((409, "Conflict".to_owned())));
    assert_eq!(
        server.pod("ns", "p").unwrap().spec.unwrap().node_name.as_deref(),
        Some("node-1")
    );

    let err = pods
        .create_subresource::<_, Status>("binding", "missing", &PostParams::default(), &binding("node-1"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some((404, "NotFound".to_owned())));
}

#[tokio::test]
async fn reflector_sees_added_modified_deleted() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_pod(pod("ns", "before", None, &[]));
    let pods: Api<Pod> = Api::all(server.client());
    let (store, writer) = reflector::store::<Pod>();
    let mut events = Box::pin(reflector(
        writer,
        watcher(pods.clone(), watcher::Config::default()),
    ));

    let mut seen: Vec<String> = Vec::new();
    let mut next = async || {
        let event = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Init => "init".to_owned(),
            watcher::Event::InitApply(p) => format!("init-apply {}", p.metadata.name.unwrap()),
            watcher::Event::InitDone => "init-done".to_owned(),
            watcher::Event::Apply(p) => format!(
                "apply {} {}",
                p.metadata.name.unwrap(),
                p.status.and_then(|s| s.phase).unwrap_or_default()
            ),
            watcher::Event::Delete(p) => format!("delete {}", p.metadata.name.unwrap()),
        }
    };
    for _ in 0..3 {
        seen.push(next().await);
    }
    assert_eq!(seen, ["init", "init-apply before", "init-done"]);
    assert_eq!(store.state().len(), 1);

    server.insert_pod(pod("ns", "new", None, &[]));
    assert_eq!(next().await, "apply new Pending");
    server.set_pod_phase("ns", "new", "Running").unwrap();
    assert_eq!(next().await, "apply new Running");
    let deleted = server.delete_pod("ns", "before").unwrap();
    assert_eq!(next().await, "delete before");
    assert!(store.get(&reflector::ObjectRef::from(&deleted)).is_none());
    assert_eq!(store.state().len(), 1);
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.contains("watch=true"))
        .unwrap();
    assert!(
        watch.path_and_query.contains("allowWatchBookmarks=true"),
        "{}",
        watch.path_and_query
    );

    // Compaction breaks the open watch with 410; the watcher relists and carries on.
    server.compact_history();
    let mut after: Vec<String> = Vec::new();
    while after.last().is_none_or(|e| e != "init-done") {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
            .unwrap();
        after.push(match event {
            Err(watcher::Error::WatchError(status)) => format!("error {}", status.code),
            Err(e) => panic!("unexpected {e}"),
            Ok(watcher::Event::Init) => "init".to_owned(),
            Ok(watcher::Event::InitApply(p)) => format!("init-apply {}", p.metadata.name.unwrap()),
            Ok(watcher::Event::InitDone) => "init-done".to_owned(),
            Ok(other) => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(after, ["error 410", "init", "init-apply new", "init-done"]);
    assert_eq!(store.state().len(), 1);
}

#[tokio::test]
async fn watch_translates_selector_moves_and_expires_old_versions() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_pod(pod("ns", "p", None, &[]));
    let start = server.resource_version();
    let pods: Api<Pod> = Api::all(server.client());
    let wp = WatchParams::default().fields("spec.nodeName=node-1").timeout(2);
    let mut stream = pods.watch(&wp, &start.to_string()).await.unwrap().boxed();

    // Binding moves the pod into the selector: ADDED, not MODIFIED.
    let node_pods: Api<Pod> = Api::namespaced(server.client(), "ns");
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
                         "target": {"kind": "Node", "name": "node-1"}});
    node_pods
        .create_subresource::<_, Status>("binding", "p", &PostParams::default(), &binding)
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert!(
        matches!(&event, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("p")),
        "{event:?}"
    );
    server.set_pod_phase("ns", "p", "Running").unwrap();
    let event = next_event(&mut stream).await;
    assert!(
        matches!(&event, WatchEvent::Modified(p) if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    );
    let deleted = server.delete_pod("ns", "p").unwrap();
    let event = next_event(&mut stream).await;
    assert!(
        matches!(&event, WatchEvent::Deleted(p) if p.metadata.resource_version == deleted.metadata.resource_version)
    );
    // timeoutSeconds=2 ends the stream (after the pending events).
    let rest = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        rest.iter().all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))),
        "{rest:?}"
    );

    server.compact_history();
    let mut stream = pods
        .watch(&WatchParams::default(), &start.to_string())
        .await
        .unwrap()
        .boxed();
    let event = next_event(&mut stream).await;
    match event {
        WatchEvent::Error(status) => assert_eq!(status.code, 410),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
}

#[tokio::test]
async fn injected_faults_fail_the_next_matching_requests() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_node(node("n1"));
    let nodes: Api<Node> = Api::all(server.client());
    server.fail_next("PATCH", "/api/v1/nodes/n1", 500, 2);
    let patch = Patch::Merge(json!({"metadata": {"annotations": {"a": "1"}}}));
    for _ in 0..2 {
        let err = nodes
            .patch("n1", &PatchParams::default(), &patch)
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), Some((500, "InternalError".to_owned())));
    }
    // GETs were never affected; the third PATCH goes through.
    nodes.get("n1").await.unwrap();
    nodes.patch("n1", &PatchParams::default(), &patch).await.unwrap();
    assert_eq!(server.node("n1").unwrap().metadata.annotations.unwrap()["a"], "1");
    assert_eq!(
        server.requests().iter().filter(|r| r.method == "PATCH").count(),
        3
    );

    server.fail_next("*", "nodes", 409, 1);
    let err = nodes.get("n1").await.unwrap_err();
    assert_eq!(api_code(&err), Some((409, "Conflict".to_owned())));
}

#[tokio::test]
async fn events_are_recorded_and_unknown_paths_are_404() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client_via_kubeconfig().await.unwrap();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let event = k8s_openapi::api::core::v1::Event {
        metadata: ObjectMeta {
            generate_name: Some("p.".to_owned()),
            ..ObjectMeta::default()
        },
        reason: Some("Scheduled".to_owned()),
        involved_object: ObjectReference {
            kind: Some("Pod".to_owned()),
            name: Some("p".to_owned()),
            ..ObjectReference::default()
        },
        ..Default::default()
    };
    let created = events.create(&PostParams::default(), &event).await.unwrap();
    assert!(created.metadata.name.unwrap().starts_with("p."));
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    v1.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "e2"}, "eventTime": "2026-11-29T16:09:00.000000Z",
                                        "reason": "Bound", "action": "Binding"}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let recorded = server.events();
    let reasons: Vec<_> = recorded.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["Scheduled", "Bound"]);

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "kube-system");
    let err = leases.get("hami-scheduler").await.unwrap_err();
    assert_eq!(api_code(&err), Some((404, "NotFound".to_owned())));

    let dir = std::env::temp_dir().join(format!("fake-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("server: {}", server.url())));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn status_subresource_keeps_spec_and_node_status_is_patchable() {
    let server = FakeApiServer::start().await.unwrap();
    server.insert_node(node("n1"));
    let nodes: Api<Node> = Api::all(server.client());
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"unschedulable": true}, "status": {"capacity": {"nvidia.com/gpu": "20"}}}),
            ),
        )
        .await
        .unwrap();
    let stored = server.node("n1").unwrap();
    assert!(stored.spec.is_none_or(|s| s.unschedulable.is_none()));
    let capacity = stored.status.unwrap().capacity.unwrap();
    assert_eq!(capacity["nvidia.com/gpu"].0, "20");
    // PodStatus import kept meaningful: a pod inserted with a phase keeps it.
    let p = server.insert_pod(Pod {
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            ..PodStatus::default()
        }),
        ..pod("ns", "r", Some("n1"), &[])
    });
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
}
