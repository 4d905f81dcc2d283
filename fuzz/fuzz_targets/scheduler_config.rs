//! The extender's configuration (JSON, as `hami-scheduler serve --config` reads it) and the device
//! config: parsing and validation never panic; a valid configuration yields its policy and settings.
#![no_main]

use hami_scheduler::{
    config::{DeviceConfig, SchedulerConfig},
    state::Settings,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = serde_json::from_str::<SchedulerConfig>(text)
        && cfg.validate().is_ok()
    {
        assert!(cfg.policy_choice().is_ok());
        let _ = Settings::from_config(&cfg, None);
    }
    let _ = DeviceConfig::parse(std::path::Path::new("fuzz.json"), text);
});
