//! The scheduler binary's configuration (`hami-scheduler --config FILE`, JSON or YAML-as-JSON rendered
//! by the chart). Unknown fields are errors, so a typo in values.yaml fails loudly.

use serde::{Deserialize, Serialize};

use crate::webhook::WebhookConfig;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Mutating webhook settings.
    pub webhook: WebhookConfig,
}
