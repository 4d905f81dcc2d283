//! Builders shared by the integration tests: GPUs, nodes, pods, policies and capacity checks.

#![allow(dead_code)]

use std::sync::Arc;

use hami_api::{
    ContainerKind, ContainerRequest, DeviceRequest, GpuDevice, MemoryRequest, NodeInventory, PodRequest,
};
use hami_policy::{Cluster, ClusterNorm, Decision, NodeState, Policy, WorkloadModel, build_policy};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One GiB in MiB.
pub(crate) const GIB: u64 = 1024;

/// A healthy GPU of model `NVIDIA-Tesla T4` with HAMi's default split count.
pub(crate) fn gpu(uuid: &str, index: u32, memory_mib: u64) -> GpuDevice {
    GpuDevice::new(uuid, index, "NVIDIA-Tesla T4", memory_mib)
}

/// `n` healthy GPUs `GPU-<prefix><i>` of `memory_mib` each.
pub(crate) fn gpus(prefix: &str, n: u32, memory_mib: u64) -> Vec<GpuDevice> {
    (0..n)
        .map(|i| gpu(&format!("GPU-{prefix}{i}"), i, memory_mib))
        .collect()
}

/// A node inventory with ample host CPU (64 vCPU) and memory (256 GiB).
pub(crate) fn inventory(name: &str, gpus: Vec<GpuDevice>) -> NodeInventory {
    NodeInventory {
        name: name.to_owned(),
        cpu_milli: 64_000,
        memory_mib: 256 * GIB,
        gpus,
    }
}

/// An idle node with ample host CPU and memory.
pub(crate) fn node(name: &str, gpus: Vec<GpuDevice>) -> NodeState {
    NodeState::new(Arc::new(inventory(name, gpus)))
}

/// A cluster of idle nodes.
pub(crate) fn cluster(nodes: Vec<NodeState>) -> Cluster {
    Cluster::new(nodes)
}

/// `count` GPUs with `mib` MiB and `cores` percent each.
pub(crate) fn mib(count: u32, mib: u64, cores: u32) -> DeviceRequest {
    DeviceRequest::new(count, MemoryRequest::Mib(mib), cores)
}

/// `count` GPUs with `pct` percent of memory and `cores` percent each.
pub(crate) fn pct(count: u32, pct: u32, cores: u32) -> DeviceRequest {
    DeviceRequest::new(count, MemoryRequest::Percent(pct), cores)
}

/// A container without host CPU or memory request.
pub(crate) fn ctr(name: &str, kind: ContainerKind, gpu: Option<DeviceRequest>) -> ContainerRequest {
    ContainerRequest {
        name: name.to_owned(),
        kind,
        cpu_milli: 0,
        memory_mib: 0,
        gpu,
    }
}

/// An app container asking for `gpu`.
pub(crate) fn app(name: &str, gpu: DeviceRequest) -> ContainerRequest {
    ctr(name, ContainerKind::App, Some(gpu))
}

/// An app container without GPUs.
pub(crate) fn plain(name: &str) -> ContainerRequest {
    ctr(name, ContainerKind::App, None)
}

/// An init container asking for `gpu`.
pub(crate) fn init(name: &str, gpu: DeviceRequest) -> ContainerRequest {
    ctr(name, ContainerKind::Init, Some(gpu))
}

/// A pod in namespace `default`.
pub(crate) fn pod(name: &str, uid: &str, containers: Vec<ContainerRequest>) -> PodRequest {
    PodRequest {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        containers,
        node_policy: None,
        gpu_policy: None,
    }
}

/// A one-container pod asking for `gpu`.
pub(crate) fn single(name: &str, gpu: DeviceRequest) -> PodRequest {
    pod(name, &format!("uid-{name}"), vec![app("main", gpu)])
}

/// The policy `name` for `cluster`, with an empty workload model.
pub(crate) fn policy(name: &str, cluster: &Cluster) -> Box<dyn Policy> {
    policy_with_model(name, cluster, WorkloadModel::default())
}

/// The policy `name` for `cluster`, with workload model `model`.
pub(crate) fn policy_with_model(name: &str, cluster: &Cluster, model: WorkloadModel) -> Box<dyn Policy> {
    build_policy(name, Arc::new(model), ClusterNorm::of(&cluster.nodes)).expect("known policy name")
}

/// A seeded random stream.
pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Decides `pod` with `policy` (seed 7, no cache).
pub(crate) fn decide(cluster: &Cluster, policy: &dyn Policy, pod: &PodRequest) -> Option<Decision> {
    cluster.decide(policy, pod, &mut rng(7), None)
}

/// Decides and commits `pod`; panics if it does not fit or the commit fails.
pub(crate) fn place(cluster: &mut Cluster, policy: &dyn Policy, pod: &PodRequest) -> Decision {
    let d = decide(cluster, policy, pod).expect("pod should fit");
    cluster.commit(pod, &d).expect("decided placement commits");
    d
}

/// The GPU indices of container `ci` in a decision.
pub(crate) fn gpus_of(d: &Decision, ci: usize) -> Vec<usize> {
    d.placement.containers[ci].iter().map(|g| g.gpu).collect()
}

/// Panics if any GPU of `node` is over its slots, schedulable memory or schedulable cores, if an
/// unhealthy GPU carries use, or if host CPU or memory are over-committed.
pub(crate) fn assert_within_capacity(node: &NodeState) {
    for (g, u) in node.inventory.gpus.iter().zip(&node.gpus) {
        assert!(
            u.slots <= g.split_count,
            "{}: slots {u:?} > {}",
            g.uuid,
            g.split_count
        );
        assert!(
            u.memory_mib <= g.schedulable_memory_mib(),
            "{}: memory {u:?} > {}",
            g.uuid,
            g.schedulable_memory_mib()
        );
        assert!(
            u.cores <= g.schedulable_cores(),
            "{}: cores {u:?} > {}",
            g.uuid,
            g.schedulable_cores()
        );
    }
    assert!(
        node.cpu_milli <= node.inventory.cpu_milli,
        "host CPU over-committed"
    );
    assert!(
        node.memory_mib <= node.inventory.memory_mib,
        "host memory over-committed"
    );
}
