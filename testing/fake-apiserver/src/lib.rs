//! Test double: an in-memory Kubernetes API server on loopback (plain HTTP), a stand-in for
//! kube-apiserver at the protocol level so kube-rs clients (`kube::Api`, `kube::runtime`
//! watchers and reflectors, patches, the `pods/binding` subresource) run against it unchanged
//! (`reference/kubernetes-testing.md` §3, pattern 2).
//!
//! Served: core/v1 Nodes and Pods (get, list, watch, create, replace, merge / strategic-merge /
//! JSON patch, delete, `status` subresource), `pods/{name}/binding`, core/v1 and
//! events.k8s.io/v1 Events (create, get, list, watch, patch, delete). Every other path answers
//! 404 with a `Status`.
//!
//! Semantics the tests rely on, as on the real apiserver:
//! - one global resourceVersion, bumped by one on every write; a no-op update writes nothing;
//! - a resourceVersion or uid in an update (patch body or PUT) that differs from the stored one
//!   is a 409 Conflict; a failed JSON-patch `test` is a 422 Invalid;
//! - updates to a Pod or Node keep `status`, `/status` updates change only `status`, a pod's
//!   spec is immutable except images, tolerations, activeDeadlineSeconds,
//!   terminationGracePeriodSeconds and schedulingGates (422), and the result must decode as the
//!   typed k8s-openapi object (422);
//! - list honours `fieldSelector` (`=`, `==`, `!=`; the pod and node fields the apiserver
//!   supports, others 400) and `labelSelector` (`=`, `==`, `!=`, `k`, `!k`, `in`, `notin`), and
//!   returns everything in one page (no `continue`);
//! - watch streams `{"type","object"}` lines after the requested resourceVersion, translating
//!   selector entry/exit into ADDED/DELETED, and answers a resourceVersion older than the kept
//!   history with an ERROR frame carrying a 410 Expired Status.
//!
//! Deliberate differences: no authentication, admission or defaulting beyond pod
//! `status.phase: Pending`; deletion is immediate (no graceful termination, since no kubelet
//! confirms it); strategic merge and server-side apply are applied as JSON merge patches;
//! `generateName` gets a 5-character suffix from the uid.

mod http;
mod select;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

use crate::http::{Fault, Shared};
use crate::store::Resource;

/// One request as the server received it (recorded before any injected fault applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, upper case (`"PATCH"`).
    pub method: String,
    /// Path and query exactly as sent (`/api/v1/nodes/n1?fieldManager=hami-agent`).
    pub path_and_query: String,
    /// The `Content-Type` header, if any (`application/merge-patch+json`).
    pub content_type: Option<String>,
    /// The raw body bytes (empty for GET).
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The body parsed as JSON, or `None` when it is empty or not JSON.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A running fake API server. It serves on its own thread and tokio runtime (so a test may
/// block its own thread, e.g. waiting on a child process, without stalling the server), and
/// stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and starts serving.
    ///
    /// # Errors
    /// When the socket cannot be bound or the server thread or runtime cannot be created.
    pub async fn start() -> anyhow::Result<FakeApiServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new());
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fake apiserver runtime")?;
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fake apiserver: listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            if let Err(e) = result {
                                eprintln!("fake apiserver: serve: {e}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime here cancels open connections (watch streams).
            })
            .context("spawning the fake apiserver thread")?;
        Ok(FakeApiServer {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (default namespace `default`, no credentials). Must be
    /// called inside a tokio runtime (kube's client spawns its buffer task there).
    ///
    /// Built with `kube::Config::new(url)`, which is what the kubeconfig of
    /// [`FakeApiServer::write_kubeconfig`] resolves to; [`FakeApiServer::client_via_kubeconfig`]
    /// takes the kubeconfig route itself.
    ///
    /// # Panics
    /// Never in practice: the URL is always a valid URI and plain-HTTP client construction does
    /// not fail.
    pub fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("loopback URL is a valid URI");
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).expect("plain-HTTP kube client")
    }

    /// A kube client built the way a binary builds one from `KUBECONFIG`:
    /// `Kubeconfig::from_yaml` → `Config::from_custom_kubeconfig` → `Client::try_from`.
    ///
    /// # Errors
    /// When kube refuses the generated kubeconfig.
    pub async fn client_via_kubeconfig(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The kubeconfig YAML pointing at this server (cluster, user and context named `fake`,
    /// namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// Writes [`FakeApiServer::kubeconfig_yaml`] to `path` (point a binary at it with
    /// `KUBECONFIG=path`).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).with_context(|| format!("writing {}", path.display()))
    }

    /// Stores a node (replacing one of the same name, which is a MODIFIED), filling in uid (if
    /// missing), creationTimestamp (if missing) and a new resourceVersion. Returns it as stored.
    pub fn insert_node(&self, node: Node) -> Node {
        self.insert(Resource::Node, "", &node)
    }

    /// Stores a pod in its `metadata.namespace` (`default` if unset), like
    /// [`FakeApiServer::insert_node`]; `status.phase` defaults to `Pending`.
    pub fn insert_pod(&self, pod: Pod) -> Pod {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        self.insert(Resource::Pod, &ns, &pod)
    }

    fn insert<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        resource: Resource,
        namespace: &str,
        object: &T,
    ) -> T {
        let mut value = serde_json::to_value(object).unwrap_or_else(|_| json!({}));
        let stored = self.shared.with(|state| {
            state.store.prepare_new(resource, namespace, &mut value);
            state.store.put(resource, namespace, value)
        });
        serde_json::from_value(stored).expect("stored object decodes as its type")
    }

    /// The stored node, if any.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.typed(Resource::Node, "", name)
    }

    /// The stored pod, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.typed(Resource::Pod, namespace, name)
    }

    /// All stored pods, ordered by namespace then name.
    pub fn pods(&self) -> Vec<Pod> {
        self.shared
            .with(|state| state.store.list(Resource::Pod, None))
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// All stored nodes, ordered by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.shared
            .with(|state| state.store.list(Resource::Node, None))
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// Every stored event (core/v1 and events.k8s.io/v1) as raw JSON, in store order.
    pub fn events(&self) -> Vec<Value> {
        self.shared.with(|state| {
            let mut events = state.store.list(Resource::Event, None);
            events.extend(state.store.list(Resource::EventV1, None));
            events
        })
    }

    fn typed<T: serde::de::DeserializeOwned>(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Option<T> {
        let value = self
            .shared
            .with(|state| state.store.get(resource, namespace, name).cloned())?;
        serde_json::from_value(value).ok()
    }

    /// Deletes a pod (a DELETED watch event with its last state); returns it.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let value = self
            .shared
            .with(|state| state.store.remove(Resource::Pod, namespace, name))?;
        serde_json::from_value(value).ok()
    }

    /// Deletes a node; returns it.
    pub fn delete_node(&self, name: &str) -> Option<Node> {
        let value = self
            .shared
            .with(|state| state.store.remove(Resource::Node, "", name))?;
        serde_json::from_value(value).ok()
    }

    /// Sets a pod's `status.phase` (`"Running"`, `"Succeeded"`, …), as a kubelet would; returns
    /// the updated pod, or `None` when it does not exist.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> Option<Pod> {
        let value = self.shared.with(|state| {
            let mut pod = state.store.get(Resource::Pod, namespace, name)?.clone();
            if !pod.get("status").is_some_and(Value::is_object) {
                pod["status"] = json!({});
            }
            pod["status"]["phase"] = json!(phase);
            Some(state.store.put(Resource::Pod, namespace, pod))
        })?;
        serde_json::from_value(value).ok()
    }

    /// The current global resourceVersion (number of writes so far).
    pub fn resource_version(&self) -> u64 {
        self.shared.with(|state| state.store.resource_version())
    }

    /// Bumps the resourceVersion by one (as a write to another resource would) and forgets the
    /// watch history, as etcd compaction does: every open watch gets an ERROR frame with a 410
    /// Expired Status and ends, and so does any later watch from an earlier resourceVersion, so
    /// clients must relist.
    pub fn compact_history(&self) {
        self.shared.with(|state| state.store.compact());
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.with(|state| state.requests.clone())
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.with(|state| state.requests.clear());
    }

    /// Makes the next `times` requests whose method is `method` (case-insensitive; `"*"` for
    /// any) and whose path-and-query contains `path_substring` fail with `status_code` and a
    /// Failure `Status` body (reason from the code: 409 Conflict, 500 InternalError, …). The
    /// request is still recorded; the store is not touched. Faults are matched in the order
    /// they were added.
    pub fn fail_next(&self, method: &str, path_substring: &str, status_code: u16, times: u32) {
        if times == 0 {
            return;
        }
        self.shared.with(|state| {
            state.faults.push(Fault {
                method: method.to_owned(),
                path_substring: path_substring.to_owned(),
                code: status_code,
                remaining: times,
            });
        });
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
