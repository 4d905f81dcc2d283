//! A container's trusted limits file (`/usr/local/vgpu/limits`, read by the interceptor and the agent):
//! parsing never panics and never reads more than its size limit; an accepted file has at most 16
//! distinct, non-empty UUIDs, SM limits ≤ 100 and a valid priority, and round-trips through its JSON.
#![no_main]

use hami_api::region::{LIMITS_MAX_BYTES, MAX_DEVICES, PRIORITY_LOW, TrustedLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(l) = TrustedLimits::parse(data) else {
        return;
    };
    assert!(data.len() <= LIMITS_MAX_BYTES);
    assert!(l.devices.len() <= MAX_DEVICES && l.priority <= PRIORITY_LOW);
    for (i, d) in l.devices.iter().enumerate() {
        assert!(!d.uuid.is_empty() && d.sm_percent <= 100);
        assert!(l.devices[..i].iter().all(|o| o.uuid != d.uuid));
    }
    assert_eq!(TrustedLimits::parse(l.to_json().as_bytes()).ok(), Some(l));
});
