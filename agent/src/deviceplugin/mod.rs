//! Kubelet device plugin (API v1beta1): registration, ListAndWatch, GetPreferredAllocation, Allocate,
//! PreStartContainer. (Being built; see issue 6.)

use serde::{Deserialize, Serialize};

/// Device plugin settings (`device_plugin` block of the agent config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicePluginConfig {
    /// Serve the kubelet device plugin.
    pub enabled: bool,
}
