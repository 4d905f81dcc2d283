//! The mutating webhook's request body (AdmissionReview v1, any bytes): handling never panics and is
//! answered 200 (a review, allowed or denied) or 400 (not a review), never 5xx.
#![no_main]

use std::sync::OnceLock;

use hami_api::{ResourceNames, k8s::RequestDefaults};
use hami_scheduler::webhook::{QuotaLimits, WebhookConfig, WebhookState};
use libfuzzer_sys::fuzz_target;

fn state() -> &'static WebhookState {
    static STATE: OnceLock<WebhookState> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = WebhookConfig {
            quotas: [(
                "ml".to_owned(),
                QuotaLimits {
                    gpumem: Some(1000),
                    gpucores: Some(100),
                },
            )]
            .into(),
            ..WebhookConfig::default()
        };
        match WebhookState::new(
            config,
            ResourceNames::default(),
            RequestDefaults::default(),
            &prometheus::Registry::new(),
        ) {
            Ok(s) => s,
            Err(e) => panic!("webhook state: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (status, _) = state().handle(data);
    assert!(
        status.as_u16() == 200 || status.as_u16() == 400,
        "status {status}"
    );
});
