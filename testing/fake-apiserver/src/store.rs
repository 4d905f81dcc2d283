//! The object store: JSON objects keyed by resource, namespace and name, one global
//! resourceVersion counter, and a bounded history of changes that watches replay.

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How many change records are kept for watches; a watch from an older resourceVersion gets
/// `410 Gone` (the real apiserver keeps about 5 minutes of etcd history).
pub(crate) const HISTORY_LIMIT: usize = 10_000;

/// A resource type the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Resource {
    Node,
    Pod,
    /// core/v1 Event.
    Event,
    /// events.k8s.io/v1 Event.
    EventV1,
}

impl Resource {
    /// Maps `(group/version, plural)` from a request path to a resource.
    pub(crate) fn from_path(group_version: &str, plural: &str) -> Option<Self> {
        match (group_version, plural) {
            ("v1", "nodes") => Some(Resource::Node),
            ("v1", "pods") => Some(Resource::Pod),
            ("v1", "events") => Some(Resource::Event),
            ("events.k8s.io/v1", "events") => Some(Resource::EventV1),
            _ => None,
        }
    }

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Resource::EventV1 => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Resource::Node => "Node",
            Resource::Pod => "Pod",
            Resource::Event | Resource::EventV1 => "Event",
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Resource::Node => "nodes",
            Resource::Pod => "pods",
            Resource::Event | Resource::EventV1 => "events",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Resource::Node)
    }

    /// Field-selector paths the real apiserver accepts for this resource (`None` = any):
    /// pods from `pkg/registry/core/pod/strategy.go` `PodToSelectableFields`, nodes from
    /// `pkg/registry/core/node/strategy.go` `NodeToSelectableFields`.
    pub(crate) fn selectable_fields(self) -> Option<&'static [&'static str]> {
        match self {
            Resource::Pod => Some(&[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.podIPs",
                "status.nominatedNodeName",
            ]),
            Resource::Node => Some(&["metadata.name", "spec.unschedulable"]),
            Resource::Event | Resource::EventV1 => None,
        }
    }
}

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One recorded change.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: Resource,
    pub(crate) namespace: String,
    pub(crate) event: EventType,
    /// The object before the change (`None` for ADDED), used to turn a MODIFIED into ADDED or
    /// DELETED for a watcher whose selector the object entered or left.
    pub(crate) before: Option<Value>,
    /// The object after the change (the last state for DELETED).
    pub(crate) after: Value,
}

type Key = (Resource, String, String);

/// The store. Every write bumps `rv` by one and appends a [`Change`].
#[derive(Debug, Default)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Changes with `rv <= compacted` are no longer in `history`.
    compacted: u64,
    uid_counter: u64,
}

impl Store {
    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    pub(crate) fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
    }

    /// Objects of a resource, optionally in one namespace, in key order.
    pub(crate) fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Changes after `rv`, or `None` if some of them were compacted away.
    pub(crate) fn changes_since(&self, rv: u64) -> Option<Vec<Change>> {
        if rv < self.compacted {
            return None;
        }
        Some(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// Bumps the resourceVersion (as a write to some other resource would) and drops all
    /// history: a watch from any earlier resourceVersion, including every open one, gets 410.
    pub(crate) fn compact(&mut self) {
        self.rv += 1;
        self.history.clear();
        self.compacted = self.rv;
    }

    /// A new unique id in UUID text form (version-4 layout; unique within the process).
    pub(crate) fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mixed = seed ^ self.uid_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (mixed >> 32) as u32,
            (mixed >> 16) as u16,
            mixed & 0xfff,
            (self.uid_counter >> 48) & 0xfff,
            self.uid_counter & 0xffff_ffff_ffff
        )
    }

    /// Fills in apiVersion, kind, namespace, uid, creationTimestamp (when missing) and, for pods,
    /// `status.phase: Pending` (the apiserver's pod create strategy does the same).
    pub(crate) fn prepare_new(&mut self, resource: Resource, namespace: &str, object: &mut Value) {
        if !object.is_object() {
            *object = json!({});
        }
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind());
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        if resource.namespaced() {
            object["metadata"]["namespace"] = json!(namespace);
        }
        if object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            let uid = self.new_uid();
            object["metadata"]["uid"] = json!(uid);
        }
        if object
            .pointer("/metadata/creationTimestamp")
            .is_none_or(Value::is_null)
        {
            object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        }
        if resource == Resource::Pod && object.pointer("/status/phase").is_none() {
            if !object.get("status").is_some_and(Value::is_object) {
                object["status"] = json!({});
            }
            object["status"]["phase"] = json!("Pending");
        }
    }

    /// Stores `object` under its name, bumping the resourceVersion; records ADDED or, when it
    /// replaces an existing object, MODIFIED. Returns the stored object.
    pub(crate) fn put(&mut self, resource: Resource, namespace: &str, mut object: Value) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ns = if resource.namespaced() {
            namespace.to_owned()
        } else {
            String::new()
        };
        let before = self.objects.insert((resource, ns.clone(), name), object.clone());
        let event = if before.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Change {
            rv: self.rv,
            resource,
            namespace: ns,
            event,
            before,
            after: object.clone(),
        });
        object
    }

    /// Removes an object, recording DELETED with its last state (carrying the deletion's
    /// resourceVersion, as the apiserver's watch does).
    pub(crate) fn remove(&mut self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let ns = if resource.namespaced() {
            namespace.to_owned()
        } else {
            String::new()
        };
        let mut object = self.objects.remove(&(resource, ns.clone(), name.to_owned()))?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            resource,
            namespace: ns,
            event: EventType::Deleted,
            before: None,
            after: object.clone(),
        });
        Some(object)
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }
}

/// The current time as RFC 3339 UTC with second precision (the `metav1.Time` wire form).
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, H. Hinnant's algorithm).
pub(crate) fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // 2000-02-29T12:34:56Z (leap day) = 951827696.
        assert_eq!(rfc3339(951_827_696), "2000-02-29T12:34:56Z");
        // 2026-11-29T16:09:00Z = 1795968540.
        assert_eq!(rfc3339(1_795_968_540), "2026-11-29T16:09:00Z");
    }

    #[test]
    fn every_write_bumps_the_version_and_history_replays() {
        let mut store = Store::default();
        let mut pod = json!({"metadata": {"name": "a"}});
        store.prepare_new(Resource::Pod, "ns", &mut pod);
        let stored = store.put(Resource::Pod, "ns", pod.clone());
        assert_eq!(stored["metadata"]["resourceVersion"], "1");
        assert_eq!(stored["status"]["phase"], "Pending");
        store.put(Resource::Pod, "ns", stored);
        let deleted = store.remove(Resource::Pod, "ns", "a").expect("exists");
        assert_eq!(deleted["metadata"]["resourceVersion"], "3");
        let changes = store.changes_since(1).expect("kept");
        let kinds: Vec<_> = changes.iter().map(|c| c.event).collect();
        assert_eq!(kinds, vec![EventType::Modified, EventType::Deleted]);
        store.compact();
        assert_eq!(store.resource_version(), 4);
        assert!(store.changes_since(3).is_none());
        assert_eq!(store.changes_since(4).map(|c| c.len()), Some(0));
    }
}
