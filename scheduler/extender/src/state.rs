//! The extender's state and every decision over it, pure: no I/O, no clock (callers pass `now` in Unix
//! seconds), no async. The reflector edge ([`crate::apiserver`]) feeds it API objects; the HTTP handlers
//! ([`crate::http`]) ask it to filter, prioritize and prepare binds.
//!
//! **What it holds.** Per node: the inventory from `hami.io/node-nvidia-register` plus allocatable host
//! CPU/memory, the cordoned GPUs (`hami.io/device-cordon`), and the measured usage and heartbeat
//! (`hami.io/node-nvidia-usage`). Per pod that holds GPUs: the decision from
//! `hami.io/vgpu-devices-allocated` on the node in `hami.io/vgpu-node`, with its bind phase. Allocations
//! live in a `hami_policy::Cluster` + `Ledger` keyed by pod UID, so a delete (or an update without the
//! annotations) releases exactly that UID and nothing else (peer case C03), and repeated deletes are
//! no-ops.
//!
//! **Rebuilt from the API.** An allocation read from a pod is restored exactly as annotated (device by
//! device, by UUID), even where it no longer fits (a GPU turned unhealthy): what runs is always
//! accounted. Pods in phase Succeeded/Failed, deleted pods, and pods whose bind failed before they were
//! bound hold nothing. When a node's inventory changes (health flips, GPUs added), its allocations are
//! re-laid onto the new inventory by UUID, so a GPU reported healthy again is schedulable at once (C05).
//!
//! **Unschedulable nodes** (reason in `FailedAndUnresolvableNodes`): no register annotation, a malformed
//! register or usage annotation, no heartbeat (when required), one older than the stale limit, or one
//! stamped more than [`HEARTBEAT_SKEW_SECS`] in the future (clock skew or a bad write: its age cannot be
//! trusted, peer case C28), or a node deleted from the API.
//!
//! **Undecodable allocations** (peer case C25). A live pod whose `hami.io/vgpu-devices-allocated`
//! names a node but cannot be decoded holds GPUs nobody can count. Its node takes no new placement
//! (reason `UndecodableAllocation` naming the pod, in `FailedNodes`: it clears when the pod gets a valid
//! decision, ends or is deleted) until every such pod on it is cleared; an allocation the pod held
//! before the annotation went bad stays accounted. Only the scheduler writes that annotation (the
//! webhook strips it from users), so a tenant cannot quarantine a node this way.
//!
//! **Host CPU and memory are kube-scheduler's.** kube-scheduler's `NodeResourcesFit` runs before the
//! extender's filter and counts every pod on the node; the extender sees only GPU pods, so a host check
//! here could only be an incomplete duplicate (false passes and, with assumed pods, false refusals).
//! Requests are therefore recorded GPU-only (host CPU and memory zero), and the fragmentation-aware
//! policies' shapes are GPU-only too.
//!
//! **Namespace quota** (`webhook.quotas` of the config): a placement that would take the pod's namespace
//! past its GPU memory or cores limit, counted from the ledger with each pod's effective (per-GPU peak)
//! charge (C02), is refused with reason `QuotaExceeded` (unresolvable when the pod alone exceeds it).
//! The check runs in the filter and again in [`SchedulerState::prepare_bind`] under the state's write
//! lock, so two binds racing at the boundary cannot both pass. `ResourceQuota` objects are not read.
//!
//! **Complete views only** (peer case C30). A state fed by reflectors ([`SchedulerState::expect_reflectors`])
//! decides nothing until both the node and the pod reflector have finished a list, and again from the
//! start of every relist (`Init`) to its end (`InitDone`): a missing pod would hide the GPU memory and
//! the quota it holds. Filter, prioritize and bind answer [`Error::NotSynced`] meanwhile (retryable:
//! kube-scheduler puts the pod back in its queue), and the webhook refuses quota-checked pods. Pods
//! that ask for no managed resource are not held up.
//!
//! **Pending-allocation rule (no node lock).** The device plugin's Allocate gets device IDs but no pod
//! identity; it matches a container to a decision by the exact devices and the decision's signature.
//! To keep that match unambiguous, a node is filtered out (reason `PendingAllocationConflict`, in
//! `FailedNodes`: it clears by itself) for a pod when another pod on that node is between bind and
//! Allocate (`hami.io/bind-phase: allocating`, bind time within `nodeLockTimeout`) with a pending
//! container entry in `hami.io/vgpu-devices-to-allocate` that has the same number of devices as one of
//! this pod's containers would get but a different decision (devices, memory or cores). Identical
//! decisions are interchangeable, so they never conflict; pods of other shapes are never held up.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use hami_api::{
    ContainerKind, ContainerRequest, DeviceRequest, DeviceScoringWeights, GpuPolicy, MemoryRequest,
    NodeInventory, NodePolicy, PodDevices, PodRequest, ResourceNames,
    annotations::{
        BIND_PHASE, BIND_PHASE_ALLOCATING, BIND_PHASE_FAILED, BIND_TIME, DEVICE_CORDON,
        DEVICE_SCORING_WEIGHTS, DEVICES_ALLOCATED, DEVICES_TO_ALLOCATE, NODE_NVIDIA_REGISTER,
        NODE_NVIDIA_USAGE, NodeUsage, VGPU_NODE, VGPU_TIME, parse_comma_list,
    },
    decode_node_register,
    k8s::{RequestDefaults, node_allocatable, ordered_containers, pod_request, uses_managed_resources},
};
use hami_policy::{
    Cluster, Decision, DefaultModel, DeviceGrant, Ledger, MeasuredGpu, ModelSource, NamespaceQuota,
    NodePlacement, NodeState, Policy, QuotaUsage, ScoringWeights, UsageAwarePolicy, WorkloadHistory,
    WorkloadModel, build_model, gpu_shape,
    policies::{FgdPolicy, HamiPolicy},
};
use k8s_openapi::api::core::v1::{Node, Pod};

use crate::{
    config::{DeviceConfig, PolicyChoice, SchedulerConfig},
    error::{Error, Result},
};

/// Vendor word written into the allocation annotation (`UUID,NVIDIA,mem,cores:`).
pub const VENDOR: &str = "NVIDIA";

/// Reason prefix of the pending-allocation rule.
pub const PENDING_ALLOCATION_CONFLICT: &str = "PendingAllocationConflict";

/// Reason prefix when placing the pod would take its namespace past its GPU quota.
pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";

/// Reason prefix while a live pod on the node has an allocation annotation that cannot be decoded.
pub const UNDECODABLE_ALLOCATION: &str = "UndecodableAllocation";

/// How far ahead of the extender's clock a heartbeat may be, seconds (clock skew between nodes);
/// beyond it the heartbeat is not trusted and the node is unschedulable (peer case C28).
pub const HEARTBEAT_SKEW_SECS: u64 = 30;

/// Everything the core needs from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Resource names.
    pub names: ResourceNames,
    /// Request defaults.
    pub defaults: RequestDefaults,
    /// Placement policy.
    pub policy: PolicyChoice,
    /// Default device scoring weights.
    pub weights: DeviceScoringWeights,
    /// Heartbeat age limit, seconds.
    pub stale_after_secs: u64,
    /// Whether a node without a heartbeat is unschedulable.
    pub require_heartbeat: bool,
    /// How long a pending allocation holds conflicting decisions off its node, seconds.
    pub pending_timeout_secs: u64,
    /// GPU quota per namespace (the config's `webhook.quotas`), enforced at filter and bind.
    pub quotas: BTreeMap<String, NamespaceQuota>,
    /// The fragmentation-aware policies' workload model.
    pub workload: WorkloadSettings,
}

/// How the live workload model is built (see [`crate::config::WorkloadModelConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSettings {
    /// Seconds between rebuilds.
    pub refresh_secs: u64,
    /// Weight needed before the observed model replaces the default.
    pub min_weight: f64,
    /// History half-life, observations.
    pub half_life: f64,
    /// Most shapes in the history.
    pub max_shapes: usize,
    /// Most UIDs remembered.
    pub max_uids: usize,
    /// Coverage of the model's shapes.
    pub coverage: f64,
    /// The model until enough was seen.
    pub default: DefaultModel,
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        Self::from(&crate::config::WorkloadModelConfig::default())
    }
}

impl From<&crate::config::WorkloadModelConfig> for WorkloadSettings {
    /// Takes the values as they are; an unknown default model name falls back to
    /// [`DefaultModel::AlibabaDefault`] (validation refuses it before this runs).
    fn from(c: &crate::config::WorkloadModelConfig) -> Self {
        Self {
            refresh_secs: c.refresh_secs,
            min_weight: f64::from(c.min_pods),
            half_life: f64::from(c.history_half_life),
            max_shapes: c.max_shapes as usize,
            max_uids: c.remembered_pods as usize,
            coverage: c.coverage,
            default: c.default_model().unwrap_or_default(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            names: ResourceNames::default(),
            defaults: RequestDefaults::default(),
            policy: PolicyChoice::Hami {
                node: NodePolicy::Binpack,
                gpu: GpuPolicy::Spread,
            },
            weights: DeviceScoringWeights::default(),
            stale_after_secs: crate::config::DEFAULT_STALE_AFTER_SECS,
            require_heartbeat: true,
            pending_timeout_secs: 300,
            quotas: BTreeMap::new(),
            workload: WorkloadSettings::default(),
        }
    }
}

impl Settings {
    /// From the validated configuration and the device config (which wins for names and defaults).
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for an invalid value.
    pub fn from_config(cfg: &SchedulerConfig, devices: Option<&DeviceConfig>) -> Result<Self> {
        cfg.validate()?;
        let (names, defaults) = match devices {
            Some(d) => (d.names.clone(), d.defaults),
            None => (cfg.resource_names.clone(), cfg.request_defaults.into()),
        };
        Ok(Self {
            names,
            defaults,
            policy: cfg.policy_choice()?,
            weights: cfg.scoring_weights()?,
            stale_after_secs: cfg.stale_after_secs,
            require_heartbeat: cfg.require_heartbeat,
            pending_timeout_secs: cfg.pending_timeout_secs()?,
            quotas: cfg
                .webhook
                .quotas
                .iter()
                .map(|(ns, q)| (ns.clone(), NamespaceQuota::from(*q)))
                .collect(),
            workload: WorkloadSettings::from(&cfg.workload_model),
        })
    }
}

/// The state of an annotation the node must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationState<T> {
    /// Absent.
    Missing,
    /// Present but malformed: the decoder's message.
    Invalid(String),
    /// Present and valid.
    Valid(T),
}

/// What the extender knows about one node beyond its `NodeState`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Whether the node exists in the API (false after a delete).
    pub present: bool,
    /// The register annotation's state (the inventory itself is in the `NodeState`).
    pub register: AnnotationState<()>,
    /// The usage annotation's state, with the heartbeat (Unix seconds) when valid.
    pub usage: AnnotationState<u64>,
    /// UUIDs excluded from new allocations (`hami.io/device-cordon`).
    pub cordoned: Vec<String>,
}

impl NodeInfo {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            present: false,
            register: AnnotationState::Missing,
            usage: AnnotationState::Missing,
            cordoned: Vec::new(),
        }
    }
}

/// A node object read into the model: inventory, usage, cordon list, with per-annotation errors.
#[derive(Debug, Clone)]
pub struct ParsedNode {
    /// Node name.
    pub name: String,
    /// Inventory (`None`: no register annotation).
    pub inventory: std::result::Result<Option<NodeInventory>, String>,
    /// Measured usage (`None`: no usage annotation).
    pub usage: std::result::Result<Option<NodeUsage>, String>,
    /// Cordoned GPU UUIDs.
    pub cordoned: Vec<String>,
}

/// Reads a Node's HAMi annotations and allocatable resources.
#[must_use]
pub fn parse_node(node: &Node) -> ParsedNode {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k));
    let inventory = match get(NODE_NVIDIA_REGISTER) {
        None => Ok(None),
        Some(v) => decode_node_register(v)
            .map(|gpus| {
                let (cpu_milli, memory_mib) = node_allocatable(node);
                Some(NodeInventory {
                    name: name.clone(),
                    cpu_milli,
                    memory_mib,
                    gpus,
                })
            })
            .map_err(|e| e.to_string()),
    };
    let usage = match get(NODE_NVIDIA_USAGE) {
        None => Ok(None),
        Some(v) => NodeUsage::decode(v).map(Some).map_err(|e| e.to_string()),
    };
    let cordoned = get(DEVICE_CORDON)
        .map(|v| parse_comma_list(v))
        .unwrap_or_default();
    ParsedNode {
        name,
        inventory,
        usage,
        cordoned,
    }
}

fn measured_of(inv: &NodeInventory, usage: Option<&NodeUsage>) -> Vec<Option<MeasuredGpu>> {
    let Some(u) = usage else {
        return Vec::new();
    };
    inv.gpus
        .iter()
        .map(|g| {
            u.gpu(&g.uuid).map(|s| MeasuredGpu {
                used_mib: s.used_mib,
                peak_mib: s.peak_mib,
                sm_percent: s.sm_percent,
            })
        })
        .collect()
}

/// One pod that holds (or is being given) GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Node of the decision (`hami.io/vgpu-node`).
    pub node: String,
    /// Containers in annotation order: name, kind, host CPU milli, host memory MiB.
    pub containers: Vec<(String, ContainerKind, u64, u64)>,
    /// The decision (`hami.io/vgpu-devices-allocated`).
    pub devices: PodDevices,
    /// What the device plugin has still to hand out (`hami.io/vgpu-devices-to-allocate`).
    pub to_allocate: PodDevices,
    /// `hami.io/bind-phase`.
    pub bind_phase: Option<String>,
    /// `hami.io/bind-time` (else `hami.io/vgpu-time`), Unix seconds.
    pub bind_time: Option<u64>,
    /// Assumed by this extender's bind and not yet seen back from the API with its annotations: events
    /// without the annotations are older than the bind's patch and must not release it.
    pub ours_unseen: bool,
    /// `spec.nodeName` is the decision's node: the Binding happened.
    pub bound: bool,
}

impl PodRecord {
    /// Whether the pod is between bind and Allocate at `now` (see the module docs).
    #[must_use]
    pub fn pending(&self, now: u64, timeout_secs: u64) -> bool {
        self.bind_phase.as_deref() == Some(BIND_PHASE_ALLOCATING)
            && self
                .bind_time
                .is_some_and(|t| now.saturating_sub(t) <= timeout_secs)
            && self.to_allocate.has_devices()
    }
}

/// Why a node cannot take a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// Not now (capacity in use, a pending allocation): `FailedNodes`.
    Resolvable(String),
    /// Never as things stand (no inventory, stale, too small even when idle):
    /// `FailedAndUnresolvableNodes`.
    Unresolvable(String),
}

/// The verdict on a set of candidate nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdicts {
    /// Feasible nodes with the policy's score, in candidate order.
    pub fits: Vec<(String, f64)>,
    /// Node → reason, for nodes that do not fit now.
    pub failed: BTreeMap<String, String>,
    /// Node → reason, for nodes that can never fit.
    pub unresolvable: BTreeMap<String, String>,
}

/// What a bind must write.
#[derive(Debug, Clone, PartialEq)]
pub struct BindPlan {
    /// Node.
    pub node: String,
    /// The decision; `None` for a pod without GPUs (plain Binding, no annotations).
    pub devices: Option<PodDevices>,
}

/// Per-GPU allocation view for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuView {
    /// Node.
    pub node: String,
    /// GPU UUID.
    pub uuid: String,
    /// NVML index.
    pub index: u32,
    /// Registered model.
    pub model: String,
    /// Schedulable memory, MiB.
    pub memory_limit_mib: u64,
    /// Schedulable cores, percent.
    pub core_limit: u32,
    /// Allocated memory, MiB.
    pub memory_allocated_mib: u64,
    /// Allocated cores, percent.
    pub cores_allocated: u32,
    /// Containers sharing it.
    pub shared: u32,
}

/// Per-container device allocation view for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct VgpuView {
    /// Namespace.
    pub namespace: String,
    /// Pod.
    pub pod: String,
    /// Node.
    pub node: String,
    /// Container position (init containers first).
    pub container_index: usize,
    /// GPU UUID.
    pub uuid: String,
    /// MiB.
    pub memory_mib: u64,
    /// Percent of SMs.
    pub cores: u32,
}

/// Node counts by condition, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Schedulable.
    pub ready: u64,
    /// Heartbeat missing, too old, or stamped in the future.
    pub stale: u64,
    /// A malformed register or usage annotation.
    pub invalid: u64,
    /// No register annotation.
    pub no_inventory: u64,
    /// Otherwise ready, but a live pod on it has an undecodable allocation (module docs).
    pub blocked: u64,
}

/// A live pod whose allocation annotation cannot be decoded (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// `namespace/name`.
    pub pod: String,
    /// The node it names (`spec.nodeName`, else `hami.io/vgpu-node`).
    pub node: String,
    /// The decoder's message.
    pub error: String,
}

/// Whether the extender has read every node and every pod (module docs: "Complete views only").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewSync {
    /// The node reflector finished its last list.
    pub nodes: bool,
    /// The pod reflector finished its last list.
    pub pods: bool,
}

impl ViewSync {
    /// Both views complete.
    #[must_use]
    pub fn complete(self) -> bool {
        self.nodes && self.pods
    }

    /// The incomplete views as words for messages, `None` when both are complete.
    #[must_use]
    pub fn incomplete(self) -> Option<&'static str> {
        match (self.nodes, self.pods) {
            (true, true) => None,
            (false, true) => Some("nodes"),
            (true, false) => Some("pods"),
            (false, false) => Some("nodes and pods"),
        }
    }
}

/// The extender's state (module docs).
#[derive(Debug)]
pub struct SchedulerState {
    settings: Settings,
    cluster: Cluster,
    ledger: Ledger,
    infos: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    pods: HashMap<String, PodRecord>,
    by_node: HashMap<String, BTreeSet<String>>,
    node_resync: Option<HashSet<String>>,
    pod_resync: Option<HashSet<String>>,
    /// Whether the node and pod views are complete (module docs).
    synced: ViewSync,
    /// Live pods whose allocation annotation cannot be decoded, by UID (module docs).
    undecodable: HashMap<String, Undecodable>,
    /// Binds of this extender between [`SchedulerState::prepare_bind`] and their outcome.
    in_flight: HashSet<String>,
    /// Pods bound by this extender (bind finished, not seen back) when the current pod relist began:
    /// the list, read after their binds, must have them, so any it lacks were deleted.
    unseen_at_resync: HashSet<String>,
    /// Requests seen by the filter (fragmentation-aware policies only); a mutex so the filter can
    /// record under the shared lock.
    history: Mutex<WorkloadHistory>,
    model: Arc<WorkloadModel>,
    model_source: ModelSource,
    /// Pending (unbound, not finished) pods that ask for managed resources, by `namespace/name`: what
    /// bind reads instead of a GET.
    unbound: HashMap<String, Pod>,
}

/// A pod's `namespace/name` for messages.
#[must_use]
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn phase_is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl SchedulerState {
    /// An empty state.
    #[must_use]
    pub fn new(settings: Settings) -> Self {
        let w = &settings.workload;
        let history = Mutex::new(WorkloadHistory::new(w.half_life, w.max_shapes, w.max_uids));
        let model = Arc::new(w.default.model());
        Self {
            in_flight: HashSet::new(),
            unseen_at_resync: HashSet::new(),
            unbound: HashMap::new(),
            history,
            model,
            model_source: ModelSource::Default,
            settings,
            cluster: Cluster::default(),
            ledger: Ledger::new(),
            infos: Vec::new(),
            index: HashMap::new(),
            pods: HashMap::new(),
            by_node: HashMap::new(),
            node_resync: None,
            pod_resync: None,
            synced: ViewSync {
                nodes: true,
                pods: true,
            },
            undecodable: HashMap::new(),
        }
    }

    /// Marks both views incomplete until their reflectors finish a list ([`Self::end_node_resync`],
    /// [`Self::end_pod_resync`]). A state fed by hand (tests, benches, the simulator) is complete as
    /// fed and never calls this.
    pub fn expect_reflectors(&mut self) {
        self.synced = ViewSync {
            nodes: false,
            pods: false,
        };
    }

    /// Whether the node and pod views are complete.
    #[must_use]
    pub fn synced(&self) -> ViewSync {
        self.synced
    }

    /// [`Error::NotSynced`] for `pod` while a view is incomplete.
    fn require_synced(&self, pod: &Pod) -> Result<()> {
        match self.synced.incomplete() {
            None => Ok(()),
            Some(kinds) => Err(Error::NotSynced {
                pod: pod_key(pod),
                kinds,
            }),
        }
    }

    /// The settings.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The node's state (inventory and committed use).
    #[must_use]
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.index.get(name).map(|&i| &self.cluster.nodes[i])
    }

    /// The node's info.
    #[must_use]
    pub fn node_info(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }

    /// The record of the pod with `uid`.
    #[must_use]
    pub fn pod(&self, uid: &str) -> Option<&PodRecord> {
        self.pods.get(uid)
    }

    /// Whether the pod with `uid` holds an allocation in the ledger.
    #[must_use]
    pub fn holds(&self, uid: &str) -> bool {
        self.ledger.contains(uid)
    }

    /// Number of pods holding an allocation.
    #[must_use]
    pub fn allocations(&self) -> usize {
        self.ledger.len()
    }

    /// Committed use per GPU UUID over the whole cluster (slots, MiB, cores), sorted by UUID: what a
    /// restart must reproduce exactly.
    #[must_use]
    pub fn gpu_usage(&self) -> BTreeMap<String, (u32, u64, u32)> {
        let mut out = BTreeMap::new();
        for n in &self.cluster.nodes {
            for (g, u) in n.inventory.gpus.iter().zip(&n.gpus) {
                out.insert(g.uuid.clone(), (u.slots, u.memory_mib, u.cores));
            }
        }
        out
    }

    /// GPU memory and cores the pods of `namespace` hold (each pod's per-GPU peak commitment, summed).
    #[must_use]
    pub fn quota_used(&self, namespace: &str) -> hami_policy::QuotaUsage {
        let mut total = hami_policy::QuotaUsage::default();
        for (_, e) in self.ledger.iter() {
            if e.pod.namespace == namespace {
                let gpus = self.cluster.nodes.get(e.node).map_or(0, |n| n.gpus.len());
                let u = hami_policy::QuotaUsage::of_placement(&e.pod, &e.placement, gpus);
                total.memory_mib = total.memory_mib.saturating_add(u.memory_mib);
                total.cores = total.cores.saturating_add(u.cores);
            }
        }
        total
    }

    // ---- Nodes ----

    fn slot(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.cluster.nodes.len();
        self.cluster.nodes.push(NodeState::new(Arc::new(NodeInventory {
            name: name.to_owned(),
            cpu_milli: 0,
            memory_mib: 0,
            gpus: Vec::new(),
        })));
        self.infos.push(NodeInfo::new(name));
        self.index.insert(name.to_owned(), i);
        i
    }

    /// Applies an added or updated Node. Returns the problems found (malformed annotations), to be
    /// logged and counted by the caller; the node is then unschedulable, never read as empty.
    pub fn apply_node(&mut self, node: &Node) -> Vec<String> {
        let parsed = parse_node(node);
        let mut problems = Vec::new();
        if parsed.name.is_empty() {
            problems.push("a Node without metadata.name was ignored".to_owned());
            return problems;
        }
        if let Some(seen) = self.node_resync.as_mut() {
            seen.insert(parsed.name.clone());
        }
        let i = self.slot(&parsed.name);
        self.infos[i].present = true;
        let mut usage = None;
        match parsed.usage {
            Ok(Some(u)) => {
                self.infos[i].usage = AnnotationState::Valid(u.heartbeat);
                usage = Some(u);
            }
            Ok(None) => self.infos[i].usage = AnnotationState::Missing,
            Err(e) => {
                problems.push(format!("node {}: {e}", parsed.name));
                self.infos[i].usage = AnnotationState::Invalid(e);
            }
        }
        match parsed.inventory {
            Ok(Some(inv)) => {
                self.infos[i].register = AnnotationState::Valid(());
                if *self.cluster.nodes[i].inventory != inv {
                    problems.extend(self.rebuild_node(i, inv));
                }
            }
            Ok(None) => self.infos[i].register = AnnotationState::Missing,
            Err(e) => {
                problems.push(format!("node {}: {e}", parsed.name));
                self.infos[i].register = AnnotationState::Invalid(e);
            }
        }
        let node_state = &mut self.cluster.nodes[i];
        node_state.measured = measured_of(&node_state.inventory, usage.as_ref());
        node_state.generation += 1;
        self.infos[i].cordoned = parsed.cordoned;
        problems
    }

    /// Applies a deleted Node: it becomes unschedulable; allocations on it stay accounted until their
    /// pods go.
    pub fn delete_node(&mut self, node: &Node) {
        if let Some(&i) = node.metadata.name.as_ref().and_then(|n| self.index.get(n)) {
            self.infos[i].present = false;
        }
    }

    /// Starts a node relist (kube-rs watcher `Init`): nodes not applied before [`Self::end_node_resync`]
    /// are treated as deleted.
    pub fn begin_node_resync(&mut self) {
        self.node_resync = Some(HashSet::new());
        self.synced.nodes = false;
    }

    /// Ends a node relist (`InitDone`).
    pub fn end_node_resync(&mut self) {
        self.synced.nodes = true;
        if let Some(seen) = self.node_resync.take() {
            for info in &mut self.infos {
                if !seen.contains(&info.name) {
                    info.present = false;
                }
            }
        }
    }

    /// Replaces node `i`'s inventory, re-laying its allocations onto it by UUID.
    fn rebuild_node(&mut self, i: usize, inv: NodeInventory) -> Vec<String> {
        let name = inv.name.clone();
        let uids: Vec<String> = self
            .by_node
            .get(&name)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for uid in &uids {
            self.ledger.forget(&mut self.cluster, uid);
        }
        self.cluster.nodes[i] = NodeState::new(Arc::new(inv));
        uids.iter().flat_map(|uid| self.restore(uid)).collect()
    }

    // ---- Pods ----

    /// Records `rec` for `uid` (replacing any older record) and accounts it.
    fn insert_record(&mut self, uid: &str, rec: PodRecord) -> Vec<String> {
        self.release(uid);
        self.by_node
            .entry(rec.node.clone())
            .or_default()
            .insert(uid.to_owned());
        self.pods.insert(uid.to_owned(), rec);
        self.restore(uid)
    }

    /// Accounts the record of `uid` in the ledger, exactly as annotated (module docs). A node not known
    /// yet (or without GPUs) is skipped: its inventory will bring the record in.
    fn restore(&mut self, uid: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(rec) = self.pods.get(uid) else {
            return problems;
        };
        let Some(&i) = self.index.get(&rec.node) else {
            return problems;
        };
        let inv = Arc::clone(&self.cluster.nodes[i].inventory);
        if inv.gpus.is_empty() || self.ledger.contains(uid) {
            return problems;
        }
        let n = rec.containers.len().max(rec.devices.0.len());
        let mut containers = Vec::with_capacity(n);
        let mut grants = Vec::with_capacity(n);
        for c in 0..n {
            let (cname, kind, cpu, mem) = rec
                .containers
                .get(c)
                .cloned()
                .unwrap_or_else(|| (format!("container-{c}"), ContainerKind::App, 0, 0));
            let mut g: Vec<DeviceGrant> = Vec::new();
            for d in rec
                .devices
                .container(c)
                .map(|d| d.0.as_slice())
                .unwrap_or_default()
            {
                match inv.gpus.iter().position(|x| x.uuid == d.uuid) {
                    Some(gi) if g.iter().any(|o| o.gpu == gi) => problems.push(format!(
                        "pod {}/{}: container {c} lists GPU {} twice; counted once",
                        rec.namespace, rec.name, d.uuid
                    )),
                    Some(gi) => g.push(DeviceGrant {
                        gpu: gi,
                        memory_mib: d.memory_mib,
                        cores: d.cores,
                    }),
                    None => problems.push(format!(
                        "pod {}/{}: GPU {} is not on node {}; that device is not accounted",
                        rec.namespace, rec.name, d.uuid, rec.node
                    )),
                }
            }
            let gpu = g.first().map(|f| {
                DeviceRequest::new(
                    u32::try_from(g.len()).unwrap_or(u32::MAX),
                    MemoryRequest::Mib(f.memory_mib),
                    f.cores,
                )
            });
            containers.push(ContainerRequest {
                name: cname,
                kind,
                cpu_milli: cpu,
                memory_mib: mem,
                gpu,
            });
            grants.push(g);
        }
        let req = PodRequest {
            namespace: rec.namespace.clone(),
            name: rec.name.clone(),
            uid: uid.to_owned(),
            containers,
            node_policy: None,
            gpu_policy: None,
        };
        let decision = Decision {
            node: i,
            placement: NodePlacement { containers: grants },
            score: 0.0,
        };
        if let Err(e) = self.ledger.restore(&mut self.cluster, &req, &decision) {
            problems.push(format!("pod {}/{}: {e}", req.namespace, req.name));
        }
        problems
    }

    /// Releases everything the pod with `uid` holds and drops its record. Idempotent.
    pub fn release(&mut self, uid: &str) -> bool {
        let held = self.ledger.forget(&mut self.cluster, uid);
        if let Some(rec) = self.pods.remove(uid)
            && let Some(set) = self.by_node.get_mut(&rec.node)
        {
            set.remove(uid);
        }
        held
    }

    /// Applies an added or updated Pod (module docs). Returns the problems found, to be logged.
    pub fn apply_pod(&mut self, pod: &Pod) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(uid) = pod.metadata.uid.as_deref() else {
            problems.push(format!("pod {} without metadata.uid ignored", pod_key(pod)));
            return problems;
        };
        if let Some(seen) = self.pod_resync.as_mut() {
            seen.insert(uid.to_owned());
        }
        // Set again below if the allocation still cannot be read.
        self.undecodable.remove(uid);
        let key = pod_key(pod);
        let unbound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_none());
        if unbound && !phase_is_terminal(pod) && uses_managed_resources(pod, &self.settings.names) {
            self.unbound.insert(key, pod.clone());
        } else if self
            .unbound
            .get(&key)
            .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid))
        {
            self.unbound.remove(&key);
        }
        if phase_is_terminal(pod) {
            self.release(uid);
            return problems;
        }
        let empty = BTreeMap::new();
        let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
        let (Some(node), Some(alloc)) = (ann.get(VGPU_NODE), ann.get(DEVICES_ALLOCATED)) else {
            if !self.pods.get(uid).is_some_and(|r| r.ours_unseen) {
                self.release(uid);
            }
            return problems;
        };
        let bind_phase = ann.get(BIND_PHASE).cloned();
        let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if bind_phase.as_deref() == Some(BIND_PHASE_FAILED) && spec_node != Some(node.as_str()) {
            self.release(uid);
            return problems;
        }
        let devices = match PodDevices::decode(alloc) {
            Ok(d) => d,
            Err(e) => {
                // Whatever the pod held before stays accounted; its node takes nothing new.
                problems.push(format!("pod {}: {e}", pod_key(pod)));
                self.undecodable.insert(
                    uid.to_owned(),
                    Undecodable {
                        pod: pod_key(pod),
                        node: spec_node.unwrap_or(node).to_owned(),
                        error: e.to_string(),
                    },
                );
                return problems;
            }
        };
        if !devices.has_devices() {
            self.release(uid);
            return problems;
        }
        let to_allocate = match ann.get(DEVICES_TO_ALLOCATE).map(|v| PodDevices::decode(v)) {
            None => PodDevices::default(),
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                problems.push(format!("pod {}: {DEVICES_TO_ALLOCATE}: {e}", pod_key(pod)));
                PodDevices::default()
            }
        };
        let bind_time = ann
            .get(BIND_TIME)
            .or_else(|| ann.get(VGPU_TIME))
            .and_then(|t| t.trim().parse::<u64>().ok());
        if let Some(rec) = self.pods.get_mut(uid)
            && rec.node == *node
            && rec.devices == devices
        {
            rec.to_allocate = to_allocate;
            rec.bind_phase = bind_phase;
            rec.bind_time = bind_time.or(rec.bind_time);
            rec.ours_unseen = false;
            rec.bound = spec_node == Some(node.as_str());
            return problems;
        }
        // Host CPU and memory are kube-scheduler's (module docs): recorded as zero.
        let containers = ordered_containers(pod)
            .into_iter()
            .map(|(c, kind)| (c.name.clone(), kind, 0, 0))
            .collect::<Vec<_>>();
        if containers.len() != devices.0.len() {
            problems.push(format!(
                "pod {}: {DEVICES_ALLOCATED} has {} container entries for {} containers",
                pod_key(pod),
                devices.0.len(),
                containers.len()
            ));
        }
        let rec = PodRecord {
            namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: node.clone(),
            containers,
            devices,
            to_allocate,
            bind_phase,
            bind_time,
            ours_unseen: false,
            bound: spec_node == Some(node.as_str()),
        };
        problems.extend(self.insert_record(uid, rec));
        problems
    }

    /// Applies a deleted Pod: releases exactly its UID, whatever the object carries (C03).
    pub fn delete_pod(&mut self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.release(uid);
            self.undecodable.remove(uid);
            let key = pod_key(pod);
            if self
                .unbound
                .get(&key)
                .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid))
            {
                self.unbound.remove(&key);
            }
        }
    }

    /// The pending pod `namespace/name` as the reflector last saw it (`None`: not seen, bound, finished
    /// or asking for no managed resource). It may lag the API; a write based on it carries its
    /// resourceVersion, so a stale copy gets 409, never a wrong write.
    #[must_use]
    pub fn unbound_pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.unbound.get(&format!("{namespace}/{name}"))
    }

    /// Starts a pod relist (`Init`): pods not applied before [`Self::end_pod_resync`] are deleted.
    pub fn begin_pod_resync(&mut self) {
        self.pod_resync = Some(HashSet::new());
        self.synced.pods = false;
        self.unseen_at_resync = self
            .pods
            .iter()
            .filter(|(uid, r)| r.ours_unseen && !self.in_flight.contains(*uid))
            .map(|(uid, _)| uid.clone())
            .collect();
    }

    /// Ends a pod relist (`InitDone`): releases the pods the relist no longer has (deletes missed while
    /// the watch was down, the kube-rs form of a tombstone). Binds of this extender still in flight, or
    /// finished after the relist began, are kept (the list may predate their writes); one finished
    /// before it began and absent from it was deleted.
    pub fn end_pod_resync(&mut self) {
        self.synced.pods = true;
        let before = std::mem::take(&mut self.unseen_at_resync);
        if let Some(seen) = self.pod_resync.take() {
            let gone: Vec<String> = self
                .pods
                .iter()
                .filter(|(uid, r)| {
                    !seen.contains(*uid)
                        && !self.in_flight.contains(*uid)
                        && (!r.ours_unseen || before.contains(*uid))
                })
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in gone {
                self.release(&uid);
            }
            self.undecodable.retain(|uid, _| seen.contains(uid));
            self.unbound
                .retain(|_, p| p.metadata.uid.as_deref().is_some_and(|u| seen.contains(u)));
        }
    }

    // ---- Decisions ----

    /// The policy for a pod (the configured one, with the pod's own scoring weights if it sets them).
    fn policy_for(&self, pod: &Pod) -> std::result::Result<Box<dyn Policy>, Error> {
        let weights = match pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEVICE_SCORING_WEIGHTS))
        {
            Some(v) => DeviceScoringWeights::parse(v).map_err(|source| Error::InvalidPod {
                pod: pod_key(pod),
                source,
            })?,
            None => self.settings.weights,
        };
        let w = ScoringWeights {
            slot: f64::from(weights.slot),
            core: f64::from(weights.core),
            memory: f64::from(weights.memory),
        };
        Ok(match self.settings.policy {
            PolicyChoice::Hami { node, gpu } => Box::new(HamiPolicy::new(node, gpu).with_weights(w)),
            PolicyChoice::UsageAware { margin_percent } => {
                Box::new(UsageAwarePolicy::new(margin_percent).with_weights(w))
            }
            PolicyChoice::Fgd { consolidate: false } => Box::new(FgdPolicy::new(Arc::clone(&self.model))),
            PolicyChoice::Fgd { consolidate: true } => {
                Box::new(FgdPolicy::consolidating(Arc::clone(&self.model)))
            }
        })
    }

    /// The pod's request, or `None` when it asks for no GPU (it then passes the filter untouched).
    ///
    /// # Errors
    /// [`Error::InvalidPod`] for invalid HAMi resources or annotations.
    pub fn request(&self, pod: &Pod) -> Result<Option<PodRequest>> {
        if !uses_managed_resources(pod, &self.settings.names) {
            return Ok(None);
        }
        let mut req = pod_request(pod, &self.settings.names, &self.settings.defaults).map_err(|source| {
            Error::InvalidPod {
                pod: pod_key(pod),
                source,
            }
        })?;
        // Host CPU and memory are kube-scheduler's (module docs).
        for c in &mut req.containers {
            c.cpu_milli = 0;
            c.memory_mib = 0;
        }
        Ok(req.wants_gpu().then_some(req))
    }

    fn unavailable(&self, info: &NodeInfo, now: u64) -> Option<String> {
        if !info.present {
            return Some("node is not in the API (deleted)".into());
        }
        match &info.register {
            AnnotationState::Missing => {
                return Some(format!(
                    "no {NODE_NVIDIA_REGISTER} annotation: no hami agent has registered GPUs on this node"
                ));
            }
            AnnotationState::Invalid(e) => return Some(format!("invalid {NODE_NVIDIA_REGISTER}: {e}")),
            AnnotationState::Valid(()) => {}
        }
        match &info.usage {
            AnnotationState::Missing if self.settings.require_heartbeat => {
                Some(format!("no heartbeat: no {NODE_NVIDIA_USAGE} annotation"))
            }
            AnnotationState::Missing => None,
            AnnotationState::Invalid(e) => Some(format!("invalid {NODE_NVIDIA_USAGE}: {e}")),
            AnnotationState::Valid(hb) if hb.saturating_sub(now) > HEARTBEAT_SKEW_SECS => Some(format!(
                "untrusted heartbeat: {NODE_NVIDIA_USAGE} is stamped {}s in the future (clock skew \
                 beyond {HEARTBEAT_SKEW_SECS}s or a bad write): the agent's liveness cannot be told",
                hb - now
            )),
            AnnotationState::Valid(hb) => {
                let age = now.saturating_sub(*hb);
                (age > self.settings.stale_after_secs).then(|| {
                    format!(
                        "stale heartbeat: {NODE_NVIDIA_USAGE} is {age}s old (limit {}s)",
                        self.settings.stale_after_secs
                    )
                })
            }
        }
    }

    /// Evaluates one node for a pod: the policy's score and placement, or why not.
    fn evaluate(
        &self,
        node: &NodeState,
        info: &NodeInfo,
        req: &PodRequest,
        policy: &dyn Policy,
        quota: Option<&(NamespaceQuota, QuotaUsage)>,
        now: u64,
    ) -> std::result::Result<hami_policy::Scored, Unfit> {
        if let Some(why) = self.unavailable(info, now) {
            return Err(Unfit::Unresolvable(why));
        }
        if let Some(why) = self.undecodable_on(&info.name) {
            return Err(Unfit::Resolvable(why));
        }
        let cordoned: Vec<&String> = info
            .cordoned
            .iter()
            .filter(|u| node.inventory.gpus.iter().any(|g| &g.uuid == *u))
            .collect();
        let owned;
        let req = if cordoned.is_empty() {
            req
        } else {
            let mut r = req.clone();
            for c in &mut r.containers {
                if let Some(g) = c.gpu.as_mut() {
                    g.selector
                        .nouse_uuids
                        .extend(cordoned.iter().map(|u| (*u).clone()));
                }
            }
            owned = r;
            &owned
        };
        match policy.score(node, req) {
            Ok(scored) => {
                if let Some(q) = quota {
                    quota_fit(req, node, &scored.placement, q)?;
                }
                if let Some(why) = self.pending_conflict(node, req, &scored.placement, now) {
                    return Err(Unfit::Resolvable(why));
                }
                Ok(scored)
            }
            Err(failure) => {
                let mut why = failure.to_string();
                if why.is_empty() {
                    why = "does not fit".into();
                }
                if !cordoned.is_empty() {
                    why.push_str(&format!(
                        " ({} GPU(s) cordoned by {DEVICE_CORDON})",
                        cordoned.len()
                    ));
                }
                let idle = NodeState::new(Arc::clone(&node.inventory));
                if policy.score(&idle, req).is_err() {
                    Err(Unfit::Unresolvable(why))
                } else {
                    Err(Unfit::Resolvable(why))
                }
            }
        }
    }

    /// Why the node is blocked by undecodable allocations (module docs), naming the pods.
    fn undecodable_on(&self, node: &str) -> Option<String> {
        let mut bad: Vec<&Undecodable> = self.undecodable.values().filter(|u| u.node == node).collect();
        if bad.is_empty() {
            return None;
        }
        bad.sort_by(|a, b| a.pod.cmp(&b.pod));
        let list: Vec<String> = bad.iter().map(|u| format!("{} ({})", u.pod, u.error)).collect();
        Some(format!(
            "{UNDECODABLE_ALLOCATION}: the allocation of live pod(s) {} on this node cannot be read, so \
             what they hold is unknown; no new placement here until they get a valid decision or end",
            list.join("; ")
        ))
    }

    /// Live pods whose allocation annotation cannot be decoded.
    pub fn undecodable(&self) -> impl Iterator<Item = &Undecodable> {
        self.undecodable.values()
    }

    fn pending_conflict(
        &self,
        node: &NodeState,
        req: &PodRequest,
        placement: &NodePlacement,
        now: u64,
    ) -> Option<String> {
        let pending = self.by_node.get(node.name())?;
        let mine = placement.to_pod_devices(&node.inventory, VENDOR);
        for uid in pending {
            if *uid == req.uid {
                continue;
            }
            let Some(other) = self.pods.get(uid) else { continue };
            if !other.pending(now, self.settings.pending_timeout_secs) {
                continue;
            }
            for theirs in other.to_allocate.0.iter().filter(|c| !c.is_empty()) {
                if mine
                    .0
                    .iter()
                    .any(|m| !m.is_empty() && m.0.len() == theirs.0.len() && m != theirs)
                {
                    return Some(format!(
                        "{PENDING_ALLOCATION_CONFLICT}: pod {}/{} is between bind and Allocate with a \
                         {}-device container on other devices or limits",
                        other.namespace,
                        other.name,
                        theirs.0.len()
                    ));
                }
            }
        }
        None
    }

    /// Filters (and scores) candidate nodes for a pod. Nodes given as objects (`Nodes` mode) that the
    /// extender does not know are judged from the object alone, idle. `Ok(None)`: the pod asks for no
    /// GPU, every candidate passes.
    ///
    /// # Errors
    /// [`Error::InvalidPod`] for a pod whose request or annotations are invalid; [`Error::NotSynced`]
    /// while a view is incomplete (module docs).
    pub fn evaluate_nodes(
        &self,
        pod: &Pod,
        names: &[String],
        objects: &HashMap<String, &Node>,
        now: u64,
    ) -> Result<Option<Verdicts>> {
        let Some(req) = self.request(pod)? else {
            return Ok(None);
        };
        self.require_synced(pod)?;
        self.observe(&req);
        let policy = self.policy_for(pod)?;
        let quota = self.quota_of(&req.namespace);
        let quota = quota.as_ref();
        let mut v = Verdicts::default();
        for name in names {
            let result = match self.index.get(name) {
                Some(&i) => self.evaluate(
                    &self.cluster.nodes[i],
                    &self.infos[i],
                    &req,
                    policy.as_ref(),
                    quota,
                    now,
                ),
                None => match objects.get(name) {
                    Some(obj) => {
                        let (state, info) = transient_node(obj);
                        self.evaluate(&state, &info, &req, policy.as_ref(), quota, now)
                    }
                    None => Err(Unfit::Unresolvable(format!(
                        "unknown node: no {NODE_NVIDIA_REGISTER} annotation seen"
                    ))),
                },
            };
            match result {
                Ok(s) => v.fits.push((name.clone(), s.score)),
                Err(Unfit::Resolvable(why)) => {
                    v.failed.insert(name.clone(), why);
                }
                Err(Unfit::Unresolvable(why)) => {
                    v.unresolvable.insert(name.clone(), why);
                }
            }
        }
        Ok(Some(v))
    }

    /// Decides the pod's devices on `node` on current state and assumes them in the ledger (the
    /// ledger's re-check makes a racing bind for the same capacity fail). The record is marked as this
    /// extender's until the API echoes it; [`Self::abort_bind`] undoes it.
    ///
    /// # Errors
    /// [`Error::InvalidPod`], [`Error::PodMismatch`] (the pod already holds an allocation),
    /// [`Error::NodeUnfit`] (with HAMi's reason), [`Error::Placement`] (a racing bind won),
    /// [`Error::NotSynced`] while a view is incomplete (module docs).
    pub fn prepare_bind(&mut self, pod: &Pod, node: &str, now: u64) -> Result<BindPlan> {
        let key = pod_key(pod);
        let Some(req) = self.request(pod)? else {
            return Ok(BindPlan {
                node: node.to_owned(),
                devices: None,
            });
        };
        self.require_synced(pod)?;
        if let Some(rec) = self.pods.get(&req.uid) {
            if rec.bound || self.in_flight.contains(&req.uid) {
                return Err(Error::PodMismatch {
                    pod: key,
                    detail: format!("already holds an allocation on node {}", rec.node),
                });
            }
            // A decision on a pod that is still pending and that no bind of ours is writing: a bind
            // that stopped between its patch and its Binding (an extender killed mid-bind). kube-scheduler
            // binds a pod once at a time, so that bind is over: the decision is void. Decide again;
            // the new patch replaces it (resourceVersion precondition).
            self.release(&req.uid);
        }
        let Some(&i) = self.index.get(node) else {
            return Err(Error::NodeUnfit {
                pod: key,
                node: node.to_owned(),
                reason: format!("unknown node: no {NODE_NVIDIA_REGISTER} annotation seen"),
            });
        };
        let policy = self.policy_for(pod)?;
        let quota = self.quota_of(&req.namespace);
        let scored = self
            .evaluate(
                &self.cluster.nodes[i],
                &self.infos[i],
                &req,
                policy.as_ref(),
                quota.as_ref(),
                now,
            )
            .map_err(|u| Error::NodeUnfit {
                pod: key.clone(),
                node: node.to_owned(),
                reason: match u {
                    Unfit::Resolvable(r) | Unfit::Unresolvable(r) => r,
                },
            })?;
        let decision = Decision {
            node: i,
            placement: scored.placement,
            score: scored.score,
        };
        self.ledger
            .assume(&mut self.cluster, &req, &decision)
            .map_err(|source| Error::Placement {
                pod: key.clone(),
                source,
            })?;
        let devices = decision
            .placement
            .to_pod_devices(&self.cluster.nodes[i].inventory, VENDOR);
        let rec = PodRecord {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            node: node.to_owned(),
            containers: req
                .containers
                .iter()
                .map(|c| (c.name.clone(), c.kind, c.cpu_milli, c.memory_mib))
                .collect(),
            devices: devices.clone(),
            to_allocate: devices.clone(),
            bind_phase: Some(BIND_PHASE_ALLOCATING.to_owned()),
            bind_time: Some(now),
            ours_unseen: true,
            bound: false,
        };
        self.by_node
            .entry(node.to_owned())
            .or_default()
            .insert(req.uid.clone());
        self.pods.insert(req.uid.clone(), rec);
        self.in_flight.insert(req.uid.clone());
        Ok(BindPlan {
            node: node.to_owned(),
            devices: Some(devices),
        })
    }

    /// Undoes [`Self::prepare_bind`] after a failed write: the assumption is forgotten.
    pub fn abort_bind(&mut self, uid: &str) {
        self.in_flight.remove(uid);
        self.release(uid);
    }

    /// Ends a bind of [`Self::prepare_bind`] that succeeded: the allocation stays, recorded as bound.
    pub fn finish_bind(&mut self, uid: &str) {
        self.in_flight.remove(uid);
        if let Some(rec) = self.pods.get_mut(uid) {
            rec.bound = true;
        }
    }

    /// Binds between [`Self::prepare_bind`] and [`Self::finish_bind`]/[`Self::abort_bind`].
    #[must_use]
    pub fn binds_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    // ---- Quota ----

    /// The namespace's configured quota with what its pods hold now.
    fn quota_of(&self, namespace: &str) -> Option<(NamespaceQuota, QuotaUsage)> {
        let q = self.settings.quotas.get(namespace)?;
        Some((*q, self.quota_used(namespace)))
    }

    // ---- Workload model (fgd, fgd-pack) ----

    /// Records a request the filter saw, for the workload model (fragmentation-aware policies only;
    /// each pod UID once while remembered).
    fn observe(&self, req: &PodRequest) {
        if !matches!(self.settings.policy, PolicyChoice::Fgd { .. }) {
            return;
        }
        if let Some(shape) = gpu_shape(req) {
            self.history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .observe(&req.uid, shape);
        }
    }

    /// Rebuilds the workload model from the pods held now and the history
    /// (`hami_policy::workload::build_model`); returns where it came from. Callers run it every
    /// `refresh_secs`, not per request.
    pub fn refresh_model(&mut self) -> ModelSource {
        let w = &self.settings.workload;
        let fallback = w.default.model();
        let held = self.ledger.iter().filter_map(|(_, e)| gpu_shape(&e.pod));
        let history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (model, source) = build_model(held, &history, w.coverage, w.min_weight, &fallback);
        drop(history);
        self.model = Arc::new(model);
        self.model_source = source;
        source
    }

    /// The workload model in use and where it came from.
    #[must_use]
    pub fn workload_model(&self) -> (&WorkloadModel, ModelSource) {
        (&self.model, self.model_source)
    }

    // ---- Views ----

    /// Node counts by condition at `now`.
    #[must_use]
    pub fn node_counts(&self, now: u64) -> NodeCounts {
        let mut c = NodeCounts::default();
        for info in self.infos.iter().filter(|i| i.present) {
            match (&info.register, &info.usage) {
                (AnnotationState::Missing, _) => c.no_inventory += 1,
                (AnnotationState::Invalid(_), _) | (_, AnnotationState::Invalid(_)) => c.invalid += 1,
                _ if self.unavailable(info, now).is_some() => c.stale += 1,
                _ if self.undecodable.values().any(|u| u.node == info.name) => c.blocked += 1,
                _ => c.ready += 1,
            }
        }
        c
    }

    /// Allocation per GPU of every present node with an inventory.
    #[must_use]
    pub fn gpu_views(&self) -> Vec<GpuView> {
        let mut out = Vec::new();
        for (n, info) in self.cluster.nodes.iter().zip(&self.infos) {
            if !info.present {
                continue;
            }
            for (g, u) in n.inventory.gpus.iter().zip(&n.gpus) {
                out.push(GpuView {
                    node: info.name.clone(),
                    uuid: g.uuid.clone(),
                    index: g.index,
                    model: g.model.clone(),
                    memory_limit_mib: g.schedulable_memory_mib(),
                    core_limit: g.schedulable_cores(),
                    memory_allocated_mib: u.memory_mib,
                    cores_allocated: u.cores,
                    shared: u.slots,
                });
            }
        }
        out
    }

    /// Allocation per container and device of every pod that holds GPUs.
    #[must_use]
    pub fn vgpu_views(&self) -> Vec<VgpuView> {
        let mut out = Vec::new();
        for rec in self.pods.values() {
            for (ci, c) in rec.devices.0.iter().enumerate() {
                for d in &c.0 {
                    out.push(VgpuView {
                        namespace: rec.namespace.clone(),
                        pod: rec.name.clone(),
                        node: rec.node.clone(),
                        container_index: ci,
                        uuid: d.uuid.clone(),
                        memory_mib: d.memory_mib,
                        cores: d.cores,
                    });
                }
            }
        }
        out
    }

    /// Every pod record (pods holding or being given GPUs) with its UID, for metrics.
    pub fn pod_records(&self) -> impl Iterator<Item = (&str, &PodRecord)> {
        self.pods.iter().map(|(uid, r)| (uid.as_str(), r))
    }

    /// The requests of the pods holding an allocation (the fragmentation metrics' workload model).
    pub fn held_requests(&self) -> impl Iterator<Item = &PodRequest> {
        self.ledger.iter().map(|(_, e)| &e.pod)
    }

    /// Inventory and committed use of every node present in the API, for metrics.
    pub fn present_nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.cluster
            .nodes
            .iter()
            .zip(&self.infos)
            .filter(|(_, i)| i.present)
            .map(|(n, _)| n)
    }
}

/// Whether `placement` on `node` keeps the pod's namespace within its quota `q` (limits, used now).
/// Over the limit even alone: unresolvable; otherwise it may clear when the namespace's pods finish.
fn quota_fit(
    req: &PodRequest,
    node: &NodeState,
    placement: &NodePlacement,
    q: &(NamespaceQuota, QuotaUsage),
) -> std::result::Result<(), Unfit> {
    let demand = QuotaUsage::of_placement(req, placement, node.gpus.len());
    let Err(e) = hami_policy::check_quota(&q.0, q.1, demand) else {
        return Ok(());
    };
    let why = format!(
        "{QUOTA_EXCEEDED}: namespace {:?} would use {} {} of its limit {} ({} in use)",
        req.namespace,
        e.used.saturating_add(e.requested),
        e.resource,
        e.limit,
        e.used
    );
    if hami_policy::check_quota(&q.0, QuotaUsage::default(), demand).is_err() {
        Err(Unfit::Unresolvable(why))
    } else {
        Err(Unfit::Resolvable(why))
    }
}

/// A node known only from an `ExtenderArgs.Nodes` object: judged idle from its annotations.
fn transient_node(obj: &Node) -> (NodeState, NodeInfo) {
    let parsed = parse_node(obj);
    let mut info = NodeInfo::new(&parsed.name);
    info.present = true;
    info.cordoned = parsed.cordoned;
    let mut usage = None;
    info.usage = match parsed.usage {
        Ok(Some(u)) => {
            let hb = u.heartbeat;
            usage = Some(u);
            AnnotationState::Valid(hb)
        }
        Ok(None) => AnnotationState::Missing,
        Err(e) => AnnotationState::Invalid(e),
    };
    let inv = match parsed.inventory {
        Ok(Some(inv)) => {
            info.register = AnnotationState::Valid(());
            inv
        }
        other => {
            info.register = match other {
                Err(e) => AnnotationState::Invalid(e),
                _ => AnnotationState::Missing,
            };
            NodeInventory {
                name: parsed.name.clone(),
                cpu_milli: 0,
                memory_mib: 0,
                gpus: Vec::new(),
            }
        }
    };
    let mut state = NodeState::new(Arc::new(inv));
    state.measured = measured_of(&state.inventory, usage.as_ref());
    (state, info)
}

/// Scales policy scores of feasible nodes to kube-scheduler's 0..=10 (the best node 10, the worst 0,
/// linear in between; all equal → all 10).
#[must_use]
pub fn scale_scores(fits: &[(String, f64)]) -> Vec<(String, i64)> {
    let (lo, hi) = fits
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, s)| {
            (lo.min(*s), hi.max(*s))
        });
    fits.iter()
        .map(|(n, s)| {
            let scaled = if hi - lo > 1e-9 {
                (10.0 * (s - lo) / (hi - lo)).round()
            } else {
                10.0
            };
            // `scaled` is in 0.0..=10.0, so the cast is exact.
            (n.clone(), scaled.clamp(0.0, 10.0) as i64)
        })
        .collect()
}
