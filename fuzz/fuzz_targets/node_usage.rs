//! `hami.io/node-nvidia-usage` (the heartbeat): decoding never panics; decode → encode → decode is the
//! identity.
#![no_main]

use hami_api::annotations::NodeUsage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(usage) = NodeUsage::decode(text) else {
        return;
    };
    if let Ok(encoded) = usage.encode() {
        assert_eq!(
            NodeUsage::decode(&encoded).ok(),
            Some(usage),
            "round trip of {encoded}"
        );
    }
});
