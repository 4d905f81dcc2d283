//! Generated types and stubs of the kubelet device plugin API `v1beta1` (from
//! `agent/proto/deviceplugin/v1beta1/api.proto` by `build.rs`). prost field names: `Device.ID` is
//! `id`, `available_deviceIDs` is `available_device_i_ds`, `deviceIDs` is `device_i_ds`.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]

tonic::include_proto!("v1beta1");

/// The API version registered (kubelet constant `Version`).
pub const VERSION: &str = "v1beta1";

/// Kubelet constant `Healthy`.
pub const HEALTHY: &str = "Healthy";

/// Kubelet constant `Unhealthy`.
pub const UNHEALTHY: &str = "Unhealthy";

/// The kubelet's registration socket in the device plugin directory (kubelet constant `KubeletSocket`).
pub const KUBELET_SOCKET: &str = "kubelet.sock";
