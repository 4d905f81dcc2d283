//! The scheduler extender wire format, `k8s.io/kube-scheduler/extender/v1` (release-1.34;
//! `reference/kubernetes-testing.md` §5).
//!
//! The Go types have no json tags, so keys are the **PascalCase field names** and a nil pointer, slice
//! or map is `null`. Note `PodUID` (not `PodUid`). kube-scheduler decodes our replies with Go's
//! `encoding/json`, which matches keys case-insensitively; we write the exact spelling. Incoming keys
//! must be spelled as Go writes them.

use std::collections::BTreeMap;

use k8s_openapi::{
    List,
    api::core::v1::{Node, Pod},
};
use serde::{Deserialize, Serialize};

/// `ExtenderArgs`: the body of the filter and prioritize calls.
///
/// With `nodeCacheCapable: true` kube-scheduler sends `NodeNames` and `Nodes: null`; with `false` it
/// sends the full `Nodes` list and `NodeNames: null`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtenderArgs {
    /// The pod being scheduled.
    #[serde(rename = "Pod")]
    pub pod: Pod,
    /// Candidate nodes (nodeCacheCapable false).
    #[serde(rename = "Nodes", default)]
    pub nodes: Option<List<Node>>,
    /// Candidate node names (nodeCacheCapable true).
    #[serde(rename = "NodeNames", default)]
    pub node_names: Option<Vec<String>>,
}

/// `FailedNodesMap`: node name → reason.
pub type FailedNodesMap = BTreeMap<String, String>;

/// `ExtenderFilterResult`: the filter reply.
///
/// kube-scheduler uses `NodeNames` when it runs with `nodeCacheCapable: true` and `NodeNames` is not
/// null (each must be one it sent), else `Nodes.items`; so the reply mirrors the request's form.
/// `FailedAndUnresolvableNodes` are nodes preemption cannot help; it wins over `FailedNodes`. A
/// non-empty `Error` fails the whole call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtenderFilterResult {
    /// Nodes that fit (request sent `Nodes`).
    #[serde(rename = "Nodes")]
    pub nodes: Option<List<Node>>,
    /// Names of nodes that fit (request sent `NodeNames`).
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    /// Nodes that do not fit now, with the reason (HAMi's codes, e.g. `1/4 CardInsufficientMemory`).
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: FailedNodesMap,
    /// Nodes the pod can never fit (no inventory, stale, invalid, or too small even when idle).
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: FailedNodesMap,
    /// Non-empty: the call failed.
    #[serde(rename = "Error")]
    pub error: String,
}

/// `HostPriority`: one node's score, 0 (`MinExtenderPriority`) to 10 (`MaxExtenderPriority`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPriority {
    /// Node name.
    #[serde(rename = "Host")]
    pub host: String,
    /// Score, 0..=10.
    #[serde(rename = "Score")]
    pub score: i64,
}

/// `HostPriorityList`: the prioritize reply.
pub type HostPriorityList = Vec<HostPriority>;

/// Lowest extender score.
pub const MIN_EXTENDER_PRIORITY: i64 = 0;
/// Highest extender score.
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// `ExtenderBindingArgs`: the bind request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtenderBindingArgs {
    /// Pod name.
    #[serde(rename = "PodName")]
    pub pod_name: String,
    /// Pod namespace.
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    /// Pod UID.
    #[serde(rename = "PodUID")]
    pub pod_uid: String,
    /// The node kube-scheduler chose.
    #[serde(rename = "Node")]
    pub node: String,
}

/// `ExtenderBindingResult`: the bind reply; a non-empty `Error` means the bind failed and kube-scheduler
/// retries the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtenderBindingResult {
    /// Non-empty: the bind failed, and why.
    #[serde(rename = "Error")]
    pub error: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    #[test]
    fn binding_args_use_pod_uid() {
        let a: ExtenderBindingArgs =
            serde_json::from_str(r#"{"PodName":"p","PodNamespace":"ns","PodUID":"u-1","Node":"n1"}"#)
                .unwrap();
        assert_eq!(a.pod_uid, "u-1");
        assert!(serde_json::to_string(&a).unwrap().contains(r#""PodUID":"u-1""#));
    }

    #[test]
    fn args_in_both_node_cache_modes() {
        let names: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p","uid":"u"},"spec":{"containers":[]}},"Nodes":null,"NodeNames":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(names.node_names.unwrap(), ["a", "b"]);
        assert!(names.nodes.is_none());
        let full: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p"}},"Nodes":{"metadata":{},"items":[{"metadata":{"name":"a"}}]},"NodeNames":null}"#,
        )
        .unwrap();
        assert_eq!(full.nodes.unwrap().items[0].metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn filter_result_keys() {
        let r = ExtenderFilterResult {
            node_names: Some(vec!["a".into()]),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Nodes":null,"NodeNames":["a"],"FailedNodes":{},"FailedAndUnresolvableNodes":{},"Error":""}"#
        );
        let p = vec![HostPriority {
            host: "n".into(),
            score: 7,
        }];
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"[{"Host":"n","Score":7}]"#);
    }
}
