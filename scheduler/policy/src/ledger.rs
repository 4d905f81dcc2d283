//! The scheduler's allocation ledger: which pod holds what, on which node, keyed by **pod UID**.
//!
//! The ledger is the one record from which a pod's device use is released, so a delete releases exactly
//! what was committed for that pod and nothing else. Pure: no I/O, no clock; the caller feeds it the
//! cluster it commits to.
//!
//! The key is the pod UID, never the pod name (peer bug C03): a pod deleted and re-created under the same
//! name gets a new UID, and a late or repeated delete for the old UID `u1` must not release the new pod
//! `u2`. Deletes are idempotent: forgetting a UID the ledger does not hold (already forgotten, never
//! assumed, or the delete notice came twice or as a tombstone) changes nothing.

use std::collections::{BTreeMap, btree_map};

use hami_api::PodRequest;

use crate::{
    cluster::{Cluster, Decision},
    error::{Error, Result},
    state::NodePlacement,
};

/// What one pod holds: the node, the pod's request as committed, and its GPUs per container.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    /// Index of the node in [`Cluster::nodes`].
    pub node: usize,
    /// The pod request the placement was committed for (release needs it to recompute the charge).
    pub pod: PodRequest,
    /// GPUs per container, as committed.
    pub placement: NodePlacement,
}

/// Allocations by pod UID. Iteration is in UID order, so it is deterministic.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    entries: BTreeMap<String, LedgerEntry>,
}

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Commits `decision` for `pod` to `cluster` and records it under `pod.uid`. The commit re-checks
    /// capacity against the cluster's current use ([`Cluster::commit`]), so decisions computed from the
    /// same snapshot (as concurrent filters would) can never overcommit a GPU: the ones that no longer
    /// fit fail here. On error neither the cluster nor the ledger changes.
    ///
    /// # Errors
    /// [`Error::PlacementShape`] when `pod.uid` already holds an allocation (forget it first), or the
    /// cluster's commit error ([`Error::Overcommit`], [`Error::HostOvercommit`], [`Error::NoSuchNode`],
    /// [`Error::PlacementShape`]).
    pub fn assume(&mut self, cluster: &mut Cluster, pod: &PodRequest, decision: &Decision) -> Result<()> {
        let btree_map::Entry::Vacant(slot) = self.entries.entry(pod.uid.clone()) else {
            return Err(Error::PlacementShape {
                pod: pod.name.clone(),
                why: "pod UID already holds an allocation",
            });
        };
        cluster.commit(pod, decision)?;
        slot.insert(LedgerEntry {
            node: decision.node,
            pod: pod.clone(),
            placement: decision.placement.clone(),
        });
        Ok(())
    }

    /// Records an allocation that already exists (read back from the API) under `pod.uid`, committing it
    /// with [`crate::state::NodeState::commit_unchecked`]: it is accounted even if it no longer fits (a
    /// GPU turned unhealthy, capacity shrank), so nothing running is ever lost from the books. On error
    /// neither the cluster nor the ledger changes.
    ///
    /// # Errors
    /// [`Error::PlacementShape`] when `pod.uid` already holds an allocation or the placement does not
    /// match the pod; [`Error::NoSuchNode`] for a node index outside the cluster.
    pub fn restore(&mut self, cluster: &mut Cluster, pod: &PodRequest, decision: &Decision) -> Result<()> {
        let btree_map::Entry::Vacant(slot) = self.entries.entry(pod.uid.clone()) else {
            return Err(Error::PlacementShape {
                pod: pod.name.clone(),
                why: "pod UID already holds an allocation",
            });
        };
        let len = cluster.nodes.len();
        let node = cluster.nodes.get_mut(decision.node).ok_or(Error::NoSuchNode {
            index: decision.node,
            len,
        })?;
        node.commit_unchecked(pod, &decision.placement)?;
        slot.insert(LedgerEntry {
            node: decision.node,
            pod: pod.clone(),
            placement: decision.placement.clone(),
        });
        Ok(())
    }

    /// Releases everything the pod with `uid` holds and drops its record. Returns whether anything was
    /// held; an unknown UID is a no-op returning `false`, so repeated or stale deletes are harmless. Only
    /// the entry with exactly this UID is touched, never another pod with the same name.
    pub fn forget(&mut self, cluster: &mut Cluster, uid: &str) -> bool {
        let Some(entry) = self.entries.remove(uid) else {
            return false;
        };
        if let Some(node) = cluster.nodes.get_mut(entry.node) {
            node.release(&entry.pod, &entry.placement);
        }
        true
    }

    /// The allocation held by the pod with `uid`.
    #[must_use]
    pub fn get(&self, uid: &str) -> Option<&LedgerEntry> {
        self.entries.get(uid)
    }

    /// Whether the pod with `uid` holds an allocation.
    #[must_use]
    pub fn contains(&self, uid: &str) -> bool {
        self.entries.contains_key(uid)
    }

    /// Number of pods holding an allocation.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no pod holds an allocation.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(uid, entry)` pairs in UID order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LedgerEntry)> {
        self.entries.iter().map(|(uid, e)| (uid.as_str(), e))
    }
}

impl<'a> IntoIterator for &'a Ledger {
    type Item = (&'a String, &'a LedgerEntry);
    type IntoIter = btree_map::Iter<'a, String, LedgerEntry>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}
