//! The HTTP side: path routing, verbs, patches, binding, list and watch, errors as `Status`.
//!
//! Wire behaviour follows the Kubernetes API conventions
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/>): errors are
//! `{"kind":"Status","apiVersion":"v1","status":"Failure","message","reason","code"}`, watches
//! are newline-delimited `{"type","object"}` frames, and a resourceVersion in an update is an
//! optimistic-concurrency precondition (409 Conflict when stale).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::RecordedRequest;
use crate::select::Selector;
use crate::store::{Change, EventType, Resource, Store};

/// Largest request body accepted (the real apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Watch duration when the client gives no `timeoutSeconds` (the apiserver's
/// `--min-request-timeout` default, 1800 s).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// An injected failure: the next `remaining` requests with this method whose path and query
/// contain `path_substring` get `code`.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) method: String,
    pub(crate) path_substring: String,
    pub(crate) code: u16,
    pub(crate) remaining: u32,
}

/// Everything behind the lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) faults: Vec<Fault>,
}

/// State shared by the handlers and the test-side accessors.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Carries the current resourceVersion; watches wait on it.
    changed: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }

    /// Runs `f` under the lock and wakes the watches if it wrote anything.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let before = state.store.resource_version();
        let result = f(&mut state);
        let after = state.store.resource_version();
        if after != before {
            self.changed.send_replace(after);
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The parsed target of a request path.
#[derive(Debug)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/{group}/{version}/...` paths.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    let resource = Resource::from_path(&group_version, plural)?;
    // A cluster-scoped resource under a namespace, or a named namespaced object without one, is
    // not a path the apiserver serves.
    if namespace.is_some() != resource.namespaced() && (namespace.is_some() || name.is_some()) {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name,
        subresource,
    })
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space; empty pairs (kube sends `?&watch`)
/// are skipped.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v == "true" || v == "1")
    }
}

/// The HTTP status reason for a code, as `k8s.io/apimachinery/pkg/api/errors` names them.
pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// A failure `Status` object.
pub(crate) fn status_body(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<(&str, Resource)>,
) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some((name, resource)) = details {
        status["details"] = json!({"name": name, "kind": resource.plural()});
    }
    status
}

fn json_response(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(code: u16, message: &str, details: Option<(&str, Resource)>) -> Response {
    json_response(code, &status_body(code, reason_for(code), message, details))
}

fn not_found(resource: Resource, name: &str) -> Response {
    error(
        404,
        &format!("{} \"{name}\" not found", resource.plural()),
        Some((name, resource)),
    )
}

fn conflict(resource: Resource, name: &str, why: &str) -> Response {
    error(
        409,
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            resource.plural()
        ),
        Some((name, resource)),
    )
}

const STALE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The single entry point: records the request, applies injected faults, then dispatches.
pub(crate) async fn handle(AxumState(shared): AxumState<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error(413, &format!("request body: {e}"), None),
    };
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| uri.path().to_owned());

    let fault = shared.with(|state| {
        state.requests.push(RecordedRequest {
            method: method.as_str().to_owned(),
            path_and_query: path_and_query.clone(),
            content_type: content_type.clone(),
            body: body.to_vec(),
        });
        let index = state.faults.iter().position(|f| {
            (f.method == "*" || f.method.eq_ignore_ascii_case(method.as_str()))
                && path_and_query.contains(&f.path_substring)
        })?;
        let fault = &mut state.faults[index];
        fault.remaining = fault.remaining.saturating_sub(1);
        let code = fault.code;
        if fault.remaining == 0 {
            state.faults.remove(index);
        }
        Some(code)
    });
    if let Some(code) = fault {
        return error(
            code,
            &format!("injected failure ({code}) for {method} {path_and_query}"),
            None,
        );
    }

    let Some(target) = parse_path(uri.path()) else {
        return error(404, "the server could not find the requested resource", None);
    };
    let query = Query(query_pairs(uri.query().unwrap_or("")));
    let resource = target.resource;
    match (&method, target.name.as_deref(), target.subresource.as_deref()) {
        (&Method::GET, None, None) => {
            let selector = match Selector::parse(
                query.get("fieldSelector"),
                query.get("labelSelector"),
                resource.selectable_fields(),
            ) {
                Ok(s) => s,
                Err(message) => return error(400, &message, None),
            };
            if query.flag("watch") {
                watch_response(&shared, resource, target.namespace, selector, &query)
            } else {
                list(&shared, resource, target.namespace.as_deref(), &selector)
            }
        }
        (&Method::GET, Some(name), None | Some("status")) => {
            let ns = target.namespace.unwrap_or_default();
            shared.with(|state| match state.store.get(resource, &ns, name) {
                Some(object) => json_response(200, object),
                None => not_found(resource, name),
            })
        }
        (&Method::POST, None, None) => match target.namespace {
            Some(ns) if resource.namespaced() => create(&shared, resource, &ns, &body),
            None if !resource.namespaced() => create(&shared, resource, "", &body),
            _ => error(405, "a namespace is required to create this resource", None),
        },
        (&Method::POST, Some(name), Some("binding")) if resource == Resource::Pod => {
            bind(&shared, &target.namespace.unwrap_or_default(), name, &body)
        }
        (&Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let ns = target.namespace.unwrap_or_default();
            patch(
                &shared,
                resource,
                &ns,
                name,
                sub.is_some(),
                content_type.as_deref(),
                &body,
            )
        }
        (&Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let ns = target.namespace.unwrap_or_default();
            replace(&shared, resource, &ns, name, sub.is_some(), &body)
        }
        (&Method::DELETE, Some(name), None) => delete(
            &shared,
            resource,
            &target.namespace.unwrap_or_default(),
            name,
            &body,
        ),
        (_, _, Some(_)) => error(404, "the server could not find the requested resource", None),
        _ => error(
            405,
            &format!("method {method} is not supported on this path"),
            None,
        ),
    }
}

fn list(shared: &Shared, resource: Resource, namespace: Option<&str>, selector: &Selector) -> Response {
    shared.with(|state| {
        let items: Vec<Value> = state
            .store
            .list(resource, namespace)
            .into_iter()
            .filter(|o| selector.matches(o))
            .collect();
        json_response(
            200,
            &json!({
                "apiVersion": resource.api_version(),
                "kind": format!("{}List", resource.kind()),
                "metadata": {"resourceVersion": state.store.resource_version().to_string()},
                "items": items,
            }),
        )
    })
}

/// Checks that `object` decodes as the typed resource (the apiserver's decoding and schema
/// validation, approximated by k8s-openapi's types); the error is a message for 422.
fn validate(resource: Resource, object: &Value) -> Result<(), String> {
    fn check<T: serde::de::DeserializeOwned>(object: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(object.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        return Err("metadata.name: Required value: name or generateName is required".to_owned());
    }
    match resource {
        Resource::Node => check::<k8s_openapi::api::core::v1::Node>(object),
        Resource::Pod => check::<k8s_openapi::api::core::v1::Pod>(object),
        Resource::Event => check::<k8s_openapi::api::core::v1::Event>(object),
        Resource::EventV1 => check::<k8s_openapi::api::events::v1::Event>(object),
    }
}

fn invalid(resource: Resource, name: &str, why: &str) -> Response {
    error(
        422,
        &format!("{} \"{name}\" is invalid: {why}", resource.kind()),
        Some((name, resource)),
    )
}

/// Parses a request body; the error is a 400 BadRequest message.
fn parse_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body of the request was in an unknown format: {e}"))
}

fn create(shared: &Shared, resource: Resource, namespace: &str, body: &[u8]) -> Response {
    let mut object = match parse_json(body) {
        Ok(v) => v,
        Err(m) => return error(400, &m, None),
    };
    if let Some(body_ns) = object.pointer("/metadata/namespace").and_then(Value::as_str)
        && resource.namespaced()
        && !body_ns.is_empty()
        && body_ns != namespace
    {
        return error(
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        );
    }
    shared.with(|state| {
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let name = if name.is_empty() {
            match object.pointer("/metadata/generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let uid = state.store.new_uid();
                    format!("{prefix}{}", &uid[uid.len() - 5..])
                }
                _ => String::new(),
            }
        } else {
            name
        };
        object["metadata"]["name"] = json!(name);
        // Server-owned fields are the server's on create.
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("uid");
            meta.remove("creationTimestamp");
            meta.remove("resourceVersion");
        }
        state.store.prepare_new(resource, namespace, &mut object);
        if let Err(why) = validate(resource, &object) {
            return invalid(resource, &name, &why);
        }
        if state.store.get(resource, namespace, &name).is_some() {
            let message = format!("{} \"{name}\" already exists", resource.plural());
            return json_response(
                409,
                &status_body(409, "AlreadyExists", &message, Some((&name, resource))),
            );
        }
        let stored = state.store.put(resource, namespace, object);
        json_response(201, &stored)
    })
}

/// The fields of a pod spec that an update may change (`ValidatePodUpdate` in
/// `pkg/apis/core/validation`): container and init-container images, activeDeadlineSeconds,
/// tolerations, terminationGracePeriodSeconds and schedulingGates.
fn immutable_pod_spec(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(map) = spec.as_object_mut() {
        for key in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
            "schedulingGates",
        ] {
            map.remove(key);
        }
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(containers)) = map.get_mut(list) {
                for c in containers {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
    }
    spec
}

/// Applies the apiserver's update rules to `updated` (already patched or replaced) and stores
/// it: resourceVersion and uid in the new object are preconditions (409 when they differ from
/// the stored ones), server-owned metadata is kept, the main resource cannot change `status`
/// and `/status` can change nothing but `status`, a pod's spec is immutable but for a few
/// fields (422), the result must decode as the typed object (422), and a no-op writes nothing.
fn finish_update(
    state: &mut State,
    resource: Resource,
    namespace: &str,
    name: &str,
    status_subresource: bool,
    mut updated: Value,
) -> Response {
    let Some(current) = state.store.get(resource, namespace, name).cloned() else {
        return not_found(resource, name);
    };
    let current_rv = current
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(rv) = updated
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && !rv.is_empty()
        && rv != current_rv
    {
        return conflict(resource, name, STALE);
    }
    let current_uid = current
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(uid) = updated.pointer("/metadata/uid").and_then(Value::as_str)
        && !uid.is_empty()
        && uid != current_uid
    {
        return conflict(
            resource,
            name,
            &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {current_uid}"),
        );
    }
    if !updated.is_object() || !updated.get("metadata").is_some_and(Value::is_object) {
        return invalid(resource, name, "metadata: Required value");
    }
    if let Some(new_name) = updated.pointer("/metadata/name").and_then(Value::as_str)
        && new_name != name
    {
        return error(
            400,
            &format!("the name of the object ({new_name}) does not match the name on the URL ({name})"),
            None,
        );
    }
    let has_status_rules = matches!(resource, Resource::Pod | Resource::Node);
    if status_subresource && has_status_rules {
        let mut merged = current.clone();
        merged["status"] = updated.get("status").cloned().unwrap_or(Value::Null);
        updated = merged;
    } else if has_status_rules {
        updated["status"] = current.get("status").cloned().unwrap_or(Value::Null);
    }
    if let Some(map) = updated.as_object_mut()
        && map.get("status").is_some_and(Value::is_null)
    {
        map.remove("status");
    }
    updated["apiVersion"] = json!(resource.api_version());
    updated["kind"] = json!(resource.kind());
    for key in ["uid", "creationTimestamp", "namespace", "name"] {
        match current["metadata"].get(key) {
            Some(v) => updated["metadata"][key] = v.clone(),
            None => {
                if let Some(meta) = updated["metadata"].as_object_mut() {
                    meta.remove(key);
                }
            }
        }
    }
    updated["metadata"]["resourceVersion"] = json!(current_rv);
    if resource == Resource::Pod && !status_subresource {
        let old_spec = immutable_pod_spec(current.get("spec").unwrap_or(&Value::Null));
        let new_spec = immutable_pod_spec(updated.get("spec").unwrap_or(&Value::Null));
        if old_spec != new_spec {
            return invalid(
                resource,
                name,
                "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,\
                 `spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only \
                 additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be \
                 set to 1 if it was previously negative)",
            );
        }
    }
    if let Err(why) = validate(resource, &updated) {
        return invalid(resource, name, &why);
    }
    if updated == current {
        return json_response(200, &current);
    }
    let stored = state.store.put(resource, namespace, updated);
    json_response(200, &stored)
}

fn patch(
    shared: &Shared,
    resource: Resource,
    namespace: &str,
    name: &str,
    status_subresource: bool,
    content_type: Option<&str>,
    body: &[u8],
) -> Response {
    let patch = match parse_json(body) {
        Ok(v) => v,
        Err(m) => return error(400, &m, None),
    };
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    shared.with(|state| {
        let Some(mut updated) = state.store.get(resource, namespace, name).cloned() else {
            return not_found(resource, name);
        };
        match media {
            // Strategic merge and server-side apply are treated as JSON merge patches
            // (RFC 7386): right for metadata maps, wrong for lists keyed by name.
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => json_patch::merge(&mut updated, &patch),
            "application/json-patch+json" => {
                let ops: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(ops) => ops,
                    Err(e) => return error(400, &format!("invalid JSON patch: {e}"), None),
                };
                if let Err(e) = json_patch::patch(&mut updated, &ops) {
                    return invalid(resource, name, &format!("JSON patch failed: {e}"));
                }
            }
            other => {
                return error(415, &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"), None);
            }
        }
        finish_update(state, resource, namespace, name, status_subresource, updated)
    })
}

fn replace(
    shared: &Shared,
    resource: Resource,
    namespace: &str,
    name: &str,
    status_subresource: bool,
    body: &[u8],
) -> Response {
    let object = match parse_json(body) {
        Ok(v) => v,
        Err(m) => return error(400, &m, None),
    };
    shared.with(|state| finish_update(state, resource, namespace, name, status_subresource, object))
}

fn delete(shared: &Shared, resource: Resource, namespace: &str, name: &str, body: &[u8]) -> Response {
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match parse_json(body) {
            Ok(v) => v,
            Err(m) => return error(400, &m, None),
        }
    };
    shared.with(|state| {
        let Some(current) = state.store.get(resource, namespace, name) else {
            return not_found(resource, name);
        };
        for (key, field) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
            if let Some(want) = options
                .pointer(&format!("/preconditions/{key}"))
                .and_then(Value::as_str)
            {
                let have = current["metadata"][field].as_str().unwrap_or("");
                if want != have {
                    return conflict(
                        resource,
                        name,
                        &format!(
                            "Precondition failed: {key} in precondition: {want}, {key} in object meta: {have}"
                        ),
                    );
                }
            }
        }
        match state.store.remove(resource, namespace, name) {
            Some(object) => json_response(200, &object),
            None => not_found(resource, name),
        }
    })
}

/// `POST pods/{name}/binding`: sets `spec.nodeName` and the PodScheduled condition, copies the
/// binding's annotations onto the pod (as `pkg/registry/core/pod/storage` `assignPod` does), and
/// answers `201` with a Success Status. 409 when the pod is already bound or a uid /
/// resourceVersion precondition in the binding's metadata fails; 404 when the pod is missing.
fn bind(shared: &Shared, namespace: &str, name: &str, body: &[u8]) -> Response {
    let binding = match parse_json(body) {
        Ok(v) => v,
        Err(m) => return error(400, &m, None),
    };
    let Some(node) = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
    else {
        return invalid(Resource::Pod, name, "target.name: Required value");
    };
    shared.with(|state| {
        let Some(mut pod) = state.store.get(Resource::Pod, namespace, name).cloned() else {
            return not_found(Resource::Pod, name);
        };
        let conflict_binding = |why: &str| {
            error(
                409,
                &format!("Operation cannot be fulfilled on pods/binding \"{name}\": {why}"),
                Some((name, Resource::Pod)),
            )
        };
        for key in ["uid", "resourceVersion"] {
            if let Some(want) = binding["metadata"].get(key).and_then(Value::as_str)
                && !want.is_empty()
                && Some(want) != pod["metadata"][key].as_str()
            {
                return conflict_binding(&format!(
                    "Precondition failed: {key} in precondition: {want}, {key} in object meta: {}",
                    pod["metadata"][key].as_str().unwrap_or("")
                ));
            }
        }
        if let Some(bound) = pod.pointer("/spec/nodeName").and_then(Value::as_str)
            && !bound.is_empty()
        {
            return conflict_binding(&format!("pod {name} is already assigned to node \"{bound}\""));
        }
        if pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return conflict_binding(&format!(
                "pod {name} is being deleted, cannot be assigned to a host"
            ));
        }
        if !pod.get("spec").is_some_and(Value::is_object) {
            pod["spec"] = json!({});
        }
        pod["spec"]["nodeName"] = json!(node);
        if let Some(annotations) = binding
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
        {
            if !pod["metadata"].get("annotations").is_some_and(Value::is_object) {
                pod["metadata"]["annotations"] = json!({});
            }
            for (k, v) in annotations {
                pod["metadata"]["annotations"][k] = v.clone();
            }
        }
        if !pod.get("status").is_some_and(Value::is_object) {
            pod["status"] = json!({});
        }
        let mut conditions: Vec<Value> = pod["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c["type"] != "PodScheduled")
            .collect();
        conditions.push(json!({
            "type": "PodScheduled",
            "status": "True",
            "lastTransitionTime": crate::store::now_rfc3339(),
        }));
        pod["status"]["conditions"] = json!(conditions);
        state.store.put(Resource::Pod, namespace, pod);
        json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        )
    })
}

/// What one watch sends: its resource, namespace scope and selector.
struct WatchFilter {
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
}

impl WatchFilter {
    /// The event a change means to this watcher: a MODIFIED that moves the object into the
    /// selected set is ADDED, one that moves it out is DELETED (as the apiserver's watch cache
    /// does), and changes outside the set are not sent.
    fn translate(&self, change: &Change) -> Option<Value> {
        if change.resource != self.resource
            || self.namespace.as_ref().is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let now = self.selector.matches(&change.after);
        let kind = match change.event {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => now.then_some("DELETED"),
            EventType::Modified => {
                let was = change.before.as_ref().is_some_and(|b| self.selector.matches(b));
                match (was, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }?;
        Some(json!({"type": kind, "object": change.after}))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"type": "BOOKMARK", "object": {
            "apiVersion": self.resource.api_version(),
            "kind": self.resource.kind(),
            "metadata": metadata,
        }})
    }
}

fn expired(requested: u64, current: u64) -> Value {
    json!({"type": "ERROR", "object": status_body(
        410,
        "Expired",
        &format!("too old resource version: {requested} ({current})"),
        None,
    )})
}

struct WatchStream {
    shared: Arc<Shared>,
    rx: watch::Receiver<u64>,
    filter: WatchFilter,
    queue: VecDeque<Value>,
    last_rv: u64,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    done: bool,
}

impl WatchStream {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(frame) = self.queue.pop_front() {
                let mut line = serde_json::to_vec(&frame).unwrap_or_default();
                line.push(b'\n');
                return Some((Ok(Bytes::from(line)), self));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.collect();
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    self.done = true;
                    if self.bookmarks {
                        let rv = self.shared.with(|s| s.store.resource_version());
                        self.queue.push_back(self.filter.bookmark(rv, false));
                    }
                }
            }
        }
    }

    fn collect(&mut self) {
        let shared = Arc::clone(&self.shared);
        shared.with(|state| match state.store.changes_since(self.last_rv) {
            Some(changes) => {
                for change in &changes {
                    if let Some(frame) = self.filter.translate(change) {
                        self.queue.push_back(frame);
                    }
                }
                self.last_rv = state.store.resource_version();
            }
            None => {
                self.queue
                    .push_back(expired(self.last_rv, state.store.resource_version()));
                self.done = true;
            }
        });
    }
}

/// `?watch=true`: resourceVersion absent or `0` starts with synthetic ADDED events for the
/// current objects (then a BOOKMARK marked `k8s.io/initial-events-end` when
/// `sendInitialEvents=true`); a resourceVersion N replays every change after N, or sends an
/// ERROR 410 Expired frame when N is older than the kept history. The stream ends after
/// `timeoutSeconds` (with a final BOOKMARK when `allowWatchBookmarks=true`).
fn watch_response(
    shared: &Arc<Shared>,
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
    query: &Query,
) -> Response {
    let requested = match query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return error(400, &format!("invalid resource version: {rv}"), None),
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let filter = WatchFilter {
        resource,
        namespace,
        selector,
    };
    let (rx, queue, last_rv, done) = shared.with(|state| {
        let rx = shared.changed.subscribe();
        let current = state.store.resource_version();
        let mut queue = VecDeque::new();
        let mut done = false;
        match requested {
            None => {
                for object in state.store.list(resource, filter.namespace.as_deref()) {
                    if filter.selector.matches(&object) {
                        queue.push_back(json!({"type": "ADDED", "object": object}));
                    }
                }
                if query.flag("sendInitialEvents") {
                    queue.push_back(filter.bookmark(current, true));
                }
            }
            Some(n) => match state.store.changes_since(n) {
                Some(changes) => {
                    queue.extend(changes.iter().filter_map(|c| filter.translate(c)));
                }
                None => {
                    queue.push_back(expired(n, current));
                    done = true;
                }
            },
        }
        (rx, queue, current, done)
    });
    let stream = WatchStream {
        shared: Arc::clone(shared),
        rx,
        filter,
        queue,
        last_rv,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarks: query.flag("allowWatchBookmarks"),
        done,
    };
    let body = Body::from_stream(futures::stream::unfold(stream, WatchStream::next));
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/ns/pods/p/binding").expect("pod binding");
        assert_eq!(t.resource, Resource::Pod);
        assert_eq!(t.namespace.as_deref(), Some("ns"));
        assert_eq!(t.name.as_deref(), Some("p"));
        assert_eq!(t.subresource.as_deref(), Some("binding"));
        let t = parse_path("/api/v1/pods").expect("all pods");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_path("/api/v1/nodes/n1").expect("node");
        assert_eq!(t.name.as_deref(), Some("n1"));
        assert!(parse_path("/api/v1/namespaces/ns/nodes/n1").is_none());
        assert!(parse_path("/api/v1/pods/p").is_none());
        assert!(parse_path("/apis/coordination.k8s.io/v1/namespaces/ns/leases/l").is_none());
        let t = parse_path("/apis/events.k8s.io/v1/namespaces/ns/events").expect("events");
        assert_eq!(t.resource, Resource::EventV1);
    }

    #[test]
    fn query_decoding() {
        let q = Query(query_pairs(
            "&watch=true&fieldSelector=spec.nodeName%3Dnode-1&x=a+b&y=%zz",
        ));
        assert!(q.flag("watch"));
        assert_eq!(q.get("fieldSelector"), Some("spec.nodeName=node-1"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("y"), Some("%zz"));
    }
}
