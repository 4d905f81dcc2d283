//! The node agent's configuration (JSON, `hami-agent run --config`): parsing and validation never
//! panic; an accepted configuration has a non-zero interval and agreeing split counts.
#![no_main]

use hami_agent::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = AgentConfig::from_json(std::path::Path::new("agent.json"), text) else {
        return;
    };
    assert!(cfg.interval_ms > 0);
    if cfg.registration.enabled && cfg.device_plugin.enabled {
        assert_eq!(cfg.registration.device_split_count, cfg.device_plugin.split_count);
    }
});
