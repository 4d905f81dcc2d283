//! The pods bound to this node, from the API server: a watch-backed cache (kube-rs reflector, field
//! selector `spec.nodeName=<node>`), the patches that mark containers allocated, and a small overlay of
//! pods this plugin just patched or re-read, so a watch event still in flight never shows an entry the
//! plugin already handed out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client};

use crate::error::{AgentError, Result};

/// Outcome of a conditional patch.
#[derive(Debug)]
pub enum Patched {
    /// Applied; the pod as the API server returned it.
    Applied(Box<Pod>),
    /// The pod changed since it was read (409 Conflict on `metadata.resourceVersion`).
    Conflict,
}

/// The cache of this node's pods.
pub struct PodCache {
    client: Client,
    node: String,
    store: reflector::Store<Pod>,
    /// UID → (the resource version the cache may still show, the newer pod to show instead).
    overlay: Mutex<HashMap<String, (String, Arc<Pod>)>>,
    /// Woken on every watch event.
    changed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn api_error(what: &str, e: kube::Error) -> AgentError {
    AgentError::plugin(what.to_owned(), e)
}

impl PodCache {
    /// Starts watching the pods of `node` (returns at once; [`PodCache::pods`] is empty until the
    /// first list arrives).
    #[must_use]
    pub fn start(client: Client, node: &str) -> Self {
        let (store, writer) = reflector::store();
        let api: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let node_name = node.to_owned();
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(
                watcher(api, config)
                    .default_backoff()
                    .reflect(writer)
                    .applied_objects()
            );
            while let Some(ev) = events.next().await {
                notify.notify_waiters();
                if let Err(e) = ev {
                    tracing::warn!(node = %node_name, error = %e, "device plugin pod watch");
                }
            }
        });
        Self {
            client,
            node: node.to_owned(),
            store,
            overlay: Mutex::new(HashMap::new()),
            changed,
            task,
        }
    }

    /// A future that completes at the next watch event (enable it before reading the cache so that
    /// no event is missed in between).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn overlay(&self) -> MutexGuard<'_, HashMap<String, (String, Arc<Pod>)>> {
        self.overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits up to `limit` for the first list; whether it arrived.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.store.wait_until_ready())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The pods of this node now (the cache, with the overlay's newer copies).
    #[must_use]
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut overlay = self.overlay();
        let mut pods = self.store.state();
        for p in &mut pods {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let rv = p.metadata.resource_version.as_deref().unwrap_or_default();
            match overlay.get(&uid) {
                Some((stale, newer)) if stale == rv => *p = newer.clone(),
                Some(_) => {
                    overlay.remove(&uid);
                }
                None => {}
            }
        }
        pods
    }

    /// Shows `pod` instead of the cached copy while the cache still holds resource version `stale`.
    pub fn remember(&self, stale: &str, pod: Pod) {
        if let Some(uid) = pod.metadata.uid.clone() {
            self.overlay().insert(uid, (stale.to_owned(), Arc::new(pod)));
        }
    }

    /// Lists this node's pods from the API server (the fallback when the cache lags).
    ///
    /// # Errors
    /// The API server's error.
    pub async fn list(&self) -> Result<Vec<Arc<Pod>>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        let list = api.list(&lp).await.map_err(|e| api_error("listing pods", e))?;
        Ok(list.items.into_iter().map(Arc::new).collect())
    }

    /// Reads one pod.
    ///
    /// # Errors
    /// The API server's error.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(|e| api_error(&format!("reading pod {namespace}/{name}"), e))
    }

    /// Merge-patches the pod's annotations; with `resource_version`, only if the pod is still at that
    /// version.
    ///
    /// # Errors
    /// The API server's error other than a conflict.
    pub async fn patch_annotations(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Patched> {
        let mut meta = serde_json::json!({ "annotations": annotations });
        if let Some(rv) = resource_version {
            meta["resourceVersion"] = rv.into();
        }
        let body = serde_json::json!({ "metadata": meta });
        match Api::<Pod>::namespaced(self.client.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(p) => Ok(Patched::Applied(Box::new(p))),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Patched::Conflict),
            Err(e) => Err(api_error(&format!("patching pod {namespace}/{name}"), e)),
        }
    }
}
