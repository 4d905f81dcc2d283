//! The mutating admission webhook (AdmissionReview v1). (Being built; see issue 6.)

use serde::{Deserialize, Serialize};

/// Webhook settings (`webhook` block of the scheduler config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Serve the webhook.
    pub enabled: bool,
}
