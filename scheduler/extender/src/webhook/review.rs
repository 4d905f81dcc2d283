//! The AdmissionReview v1 envelope: body → request → verdict → response, with the metrics and a
//! tracing span per request. Nothing here panics on any input: a body that is not an AdmissionReview v1
//! with a request uid is an HTTP 400 with a text reason; anything wrong after the uid is known is a
//! denial carrying that uid.

use std::time::Instant;

use axum::http::StatusCode;
use kube::core::{
    DynamicObject, Status,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use serde_json::Value;

use super::{
    WebhookState,
    pod::{self, Context, Verdict},
};

/// The only AdmissionReview version served (the chart sets `admissionReviewVersions: ["v1"]`).
const API_VERSION: &str = "admission.k8s.io/v1";

/// Metric `result` labels.
pub(super) const ALLOWED: &str = "allowed";
pub(super) const MUTATED: &str = "mutated";
pub(super) const DENIED: &str = "denied";
pub(super) const ERROR: &str = "error";

/// The `content-type` of a reply with this status.
pub(super) fn content_type(status: StatusCode) -> &'static str {
    if status == StatusCode::OK {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// The metric label of an operation.
fn operation_label(op: &Operation) -> &'static str {
    match op {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

/// A reply and its metric labels.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    operation: &'static str,
    result: &'static str,
}

/// A 400 with `message`.
fn bad_request(message: String) -> Reply {
    tracing::warn!(%message, "malformed admission request");
    Reply {
        status: StatusCode::BAD_REQUEST,
        body: message.into_bytes(),
        operation: "unknown",
        result: ERROR,
    }
}

/// Serialises a response into a 200 reply.
fn reply(response: AdmissionResponse, operation: &'static str, result: &'static str) -> Reply {
    match serde_json::to_vec(&response.into_review()) {
        Ok(body) => Reply {
            status: StatusCode::OK,
            body,
            operation,
            result,
        },
        Err(e) => bad_request(format!("cannot serialise the response: {e}")),
    }
}

/// A denial of the request with `uid`, HTTP-style `code` and `reason` in the Status.
fn deny(mut response: AdmissionResponse, message: &str, code: u16, reason: &str) -> AdmissionResponse {
    response.allowed = false;
    response.result = Status::failure(message, reason).with_code(code);
    response
}

pub(super) fn handle(state: &WebhookState, body: &[u8]) -> (StatusCode, Vec<u8>) {
    let start = Instant::now();
    let r = review(state, body);
    state.metrics.observe(r.operation, r.result, start.elapsed());
    (r.status, r.body)
}

fn review(state: &WebhookState, body: &[u8]) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    let field = |name: &str| v.get(name).and_then(Value::as_str);
    if field("kind") != Some("AdmissionReview") {
        return bad_request(format!(
            "kind is {:?}, expected \"AdmissionReview\"",
            field("kind")
        ));
    }
    if field("apiVersion") != Some(API_VERSION) {
        return bad_request(format!(
            "apiVersion is {:?}, expected {API_VERSION:?} (admissionReviewVersions: [\"v1\"])",
            field("apiVersion")
        ));
    }
    let Some(request) = v.get("request").filter(|r| r.is_object()) else {
        return bad_request("the AdmissionReview has no request".to_owned());
    };
    let Some(uid) = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    else {
        return bad_request("the AdmissionReview request has no uid".to_owned());
    };
    let uid = uid.to_owned();
    // The objects exactly as sent: the patch is computed against them.
    let object = request.get("object").filter(|o| !o.is_null()).cloned();
    let old_object = request.get("oldObject").filter(|o| !o.is_null()).cloned();

    let parsed = serde_json::from_value::<AdmissionReview<DynamicObject>>(v)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            let req: Result<AdmissionRequest<DynamicObject>, _> = r.try_into();
            req.map_err(|e| e.to_string())
        });
    let req = match parsed {
        Ok(req) => req,
        Err(e) => {
            let mut invalid = AdmissionResponse::invalid(format!("malformed AdmissionReview request: {e}"));
            invalid.uid = uid.clone();
            invalid.result = invalid.result.with_code(400);
            tracing::warn!(%uid, error = %e, "malformed admission request");
            return reply(invalid, "unknown", ERROR);
        }
    };

    let operation = operation_label(&req.operation);
    let namespace = req.namespace.clone().unwrap_or_default();
    let span = tracing::info_span!("admission", %uid, operation, namespace = %namespace, name = %req.name);
    let _entered = span.enter();
    let response = AdmissionResponse::from(&req);

    let sub_resource = req.sub_resource.as_deref().unwrap_or("");
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    let ephemeral = sub_resource == "ephemeralcontainers";
    if !is_pod || !(sub_resource.is_empty() || ephemeral) {
        tracing::debug!(kind = %req.kind.kind, sub_resource, "not a pod: allowed unchanged");
        return reply(response, operation, ALLOWED);
    }

    let ctx = Context {
        config: &state.config,
        names: &state.names,
        defaults: &state.defaults,
        view: state.view.as_ref(),
    };
    let (verdict, input) = match (&req.operation, object) {
        (Operation::Update, Some(obj)) if ephemeral => (pod::ephemeral(&ctx, &obj), obj),
        (Operation::Create, Some(obj)) => (pod::create(&ctx, &namespace, &obj), obj),
        (Operation::Update, Some(obj)) => (
            pod::update(&ctx, req.user_info.username.as_deref(), &obj, old_object.as_ref()),
            obj,
        ),
        (Operation::Create | Operation::Update, None) => {
            let message = format!("the {operation} request has no object");
            return reply(deny(response, &message, 400, "BadRequest"), operation, ERROR);
        }
        (Operation::Delete | Operation::Connect, _) => return reply(response, operation, ALLOWED),
    };

    match verdict {
        Verdict::Deny(problems) => {
            let message = problems.join("; ");
            tracing::info!(%message, "denied");
            reply(deny(response, &message, 403, "Forbidden"), operation, DENIED)
        }
        Verdict::Allow(out) => {
            let patch = json_patch::diff(&input, &out);
            if patch.0.is_empty() {
                tracing::debug!("allowed unchanged");
                return reply(response, operation, ALLOWED);
            }
            tracing::info!(ops = patch.0.len(), "mutated");
            match response.clone().with_patch(patch) {
                Ok(patched) => reply(patched, operation, MUTATED),
                Err(e) => {
                    let message = format!("cannot serialise the patch: {e}");
                    reply(deny(response, &message, 500, "InternalError"), operation, ERROR)
                }
            }
        }
    }
}
