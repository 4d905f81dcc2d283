//! Node registration: publishes the node's GPU inventory (`hami.io/node-nvidia-register`) and the
//! measured-usage summary with a heartbeat (`hami.io/node-nvidia-usage`) as node annotations.
//! (Being built; see issue 6.)

use serde::{Deserialize, Serialize};

/// Node registration settings (`registration` block of the agent config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Publish the node annotations.
    pub enabled: bool,
}
