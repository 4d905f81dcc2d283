//! `hami.io/vgpu-devices-allocated` / `-to-allocate` (HAMi's `uuid,type,mem,cores:…;` decision):
//! decoding never panics; decode → encode → decode is the identity.
#![no_main]

use hami_api::PodDevices;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(devices) = PodDevices::decode(text) else {
        return;
    };
    if let Ok(encoded) = devices.encode() {
        assert_eq!(
            PodDevices::decode(&encoded).ok(),
            Some(devices),
            "round trip of {encoded}"
        );
    }
});
