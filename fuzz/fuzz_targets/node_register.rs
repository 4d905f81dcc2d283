//! `hami.io/node-nvidia-register` (JSON and legacy text forms): decoding never panics; a value that
//! decodes and encodes again decodes to the same GPUs (round trip).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(gpus) = hami_api::decode_node_register(text) else {
        return;
    };
    if let Ok(encoded) = hami_api::encode_node_register(&gpus) {
        let back = hami_api::decode_node_register(&encoded);
        assert_eq!(back.as_ref().ok(), Some(&gpus), "round trip of {encoded}");
    }
});
