//! `hami.io/vgpu-decision-signature`: verifying any text never panics and never accepts a signature
//! for another pod, node or decision than the one signed; a signature made with the key verifies.
#![no_main]

use hami_api::annotations::{sign_decision, verify_decision};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\n');
    let (key, uid, node, devices, signature) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let _ = verify_decision(key.as_bytes(), uid, node, devices, signature);
    let good = sign_decision(key.as_bytes(), uid, node, devices);
    assert!(verify_decision(key.as_bytes(), uid, node, devices, &good));
    let other = format!("{devices}x");
    assert!(!verify_decision(key.as_bytes(), uid, node, &other, &good));
});
