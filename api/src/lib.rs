//! `hami-api`: the contracts shared by the hami agent, scheduler and interceptor.
//!
//! Pure data and codecs, no I/O: HAMi-compatible resource names and annotation keys, the Kubernetes
//! quantity parser, the device model of a node, pod device requests, and the node-inventory and
//! pod-decision annotation codecs. Facts about HAMi's formats come from `reference/hami.md` (HAMi v2.10.0).
//!
//! | module | what |
//! |---|---|
//! | [`error`] | the crate's one [`Error`] type and [`Result`] alias |
//! | [`quantity`] | exact Kubernetes `resource.Quantity` parsing; HAMi's in-container limit env values |
//! | [`resources`] | `nvidia.com/gpu`, `gpumem`, … and the configurable [`ResourceNames`] |
//! | [`annotations`] | HAMi's annotation keys; node inventory, pod decision and pod selector codecs |
//! | [`env`](mod@env) | env var names that carry limits into containers |
//! | [`device`] | a node's GPUs |
//! | [`request`] | pod device requests |
//! | [`metrics`] | descriptions of the exported Prometheus metrics; the metrics reference's Markdown |
//! | `k8s` | (feature `k8s`) Kubernetes `Pod`/`Node` to requests and inventory |

pub mod annotations;
pub mod device;
pub mod env;
pub mod error;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod metrics;
pub mod quantity;
pub mod region;
pub mod request;
pub mod resources;

pub use annotations::{
    ContainerDevice, ContainerDevices, DeviceScoringWeights, PodDevices, PodSchedulingAnnotations,
    decode_node_register, encode_node_inventory, encode_node_register,
};
pub use device::{DeviceMode, GpuDevice, NodeInventory};
pub use error::{Error, Result};
pub use quantity::{Quantity, parse_memory_limit_env, parse_sm_limit_env};
pub use request::{
    ContainerKind, ContainerRequest, DeviceRequest, DeviceSelector, GpuPolicy, MemoryRequest, NodePolicy,
    PodRequest,
};
pub use resources::ResourceNames;
