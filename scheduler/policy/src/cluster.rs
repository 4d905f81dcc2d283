//! A set of nodes and one scheduling decision over them: filter every node, score the feasible ones, take
//! the best, break ties uniformly at random (as kube-scheduler's `selectHost` does), and commit.
//!
//! [`ScoreCache`] memoises a policy's per-node result by (pod shape key, node generation): a node's
//! score depends only on its own state and the pod, so only nodes changed since the last pod of the same
//! shape are scored again. The result is identical with or without the cache.

use std::collections::HashMap;

use hami_api::PodRequest;
use rand::RngCore;

use crate::{
    error::{Error, Result},
    fit::FitFailure,
    policies::{Policy, Scored, draw},
    state::{NodePlacement, NodeState},
};

/// Scores closer than this are ties.
const TIE_EPSILON: f64 = 1e-9;

/// The nodes a scheduler places onto.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Nodes, in a fixed order.
    pub nodes: Vec<NodeState>,
}

/// Where a pod goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Index of the node in [`Cluster::nodes`].
    pub node: usize,
    /// GPUs per container.
    pub placement: NodePlacement,
    /// The winning score.
    pub score: f64,
}

/// The best score seen so far. Ties go to the first node in cluster order (the FGD artifact's observable
/// behaviour, which the paper's numbers depend on: it names nodes with a per-seed random prefix and
/// sorts them), or, for policies that ask for it, to a uniformly random tied node (reservoir sampling).
#[derive(Debug, Default)]
struct TiePick {
    best: Option<(usize, f64)>,
    ties: usize,
    random: bool,
}

impl TiePick {
    fn new(random: bool) -> Self {
        Self {
            best: None,
            ties: 0,
            random,
        }
    }

    /// Offers node `i` with `score`; returns whether it is now the pick.
    fn offer(&mut self, i: usize, score: f64, rng: &mut dyn RngCore) -> bool {
        match self.best {
            Some((_, b)) if score < b - TIE_EPSILON => false,
            Some((_, b)) if score <= b + TIE_EPSILON => {
                self.ties += 1;
                let take = self.random && draw(rng, self.ties) == 0;
                if take {
                    self.best = Some((i, b.max(score)));
                }
                take
            }
            _ => {
                self.ties = 1;
                self.best = Some((i, score));
                true
            }
        }
    }
}

/// A node's cached result: the node generation it was computed at, and the score if the pod fits.
type CachedScore = (u64, Option<Scored>);

/// Memoised policy results, keyed by a caller-chosen pod shape key (pods with the same key must have the
/// same requests) and node generation.
#[derive(Debug, Default)]
pub struct ScoreCache {
    entries: HashMap<u64, Vec<Option<CachedScore>>>,
}

impl ScoreCache {
    /// An empty cache.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl Cluster {
    /// A cluster of idle nodes.
    #[must_use]
    pub fn new(nodes: Vec<NodeState>) -> Self {
        Self { nodes }
    }

    /// Picks a node and GPUs for `pod` with `policy`, or `None` if no node fits. Deterministic for the
    /// same state, node order, pod and random stream. `cache` is an optional memo with the pod's shape key.
    pub fn decide(
        &self,
        policy: &dyn Policy,
        pod: &PodRequest,
        rng: &mut dyn RngCore,
        cache: Option<(&mut ScoreCache, u64)>,
    ) -> Option<Decision> {
        let mut pick = TiePick::new(policy.random_ties());
        let scored = match cache {
            Some((cache, key)) => {
                let slots = cache
                    .entries
                    .entry(key)
                    .or_insert_with(|| vec![None; self.nodes.len()]);
                slots.resize(self.nodes.len(), None);
                for (i, node) in self.nodes.iter().enumerate() {
                    let fresh = matches!(&slots[i], Some((generation, _)) if *generation == node.generation);
                    if !fresh {
                        slots[i] = Some((node.generation, policy.score(node, pod).ok()));
                    }
                    if let Some((_, Some(scored))) = &slots[i] {
                        pick.offer(i, scored.score, rng);
                    }
                }
                let (i, _) = pick.best?;
                slots[i].as_ref().and_then(|(_, s)| s.clone())?
            }
            None => {
                let mut best = None;
                for (i, node) in self.nodes.iter().enumerate() {
                    if let Ok(scored) = policy.score(node, pod)
                        && pick.offer(i, scored.score, rng)
                    {
                        best = Some(scored);
                    }
                }
                best?
            }
        };
        let (node, score) = pick.best?;
        let placement = policy.finalize(&self.nodes[node], pod, scored, rng);
        Some(Decision {
            node,
            placement,
            score,
        })
    }

    /// Why `pod` fits no node: each node's failure, by node name.
    #[must_use]
    pub fn explain(&self, policy: &dyn Policy, pod: &PodRequest) -> Vec<(String, FitFailure)> {
        self.nodes
            .iter()
            .filter_map(|n| policy.score(n, pod).err().map(|f| (n.name().to_owned(), f)))
            .collect()
    }

    /// Commits a decision to its node (re-checked; nothing changes on error).
    ///
    /// # Errors
    /// [`Error::NoSuchNode`] or the node's commit error.
    pub fn commit(&mut self, pod: &PodRequest, decision: &Decision) -> Result<()> {
        let len = self.nodes.len();
        let node = self.nodes.get_mut(decision.node).ok_or(Error::NoSuchNode {
            index: decision.node,
            len,
        })?;
        node.commit(pod, &decision.placement)
    }
}
