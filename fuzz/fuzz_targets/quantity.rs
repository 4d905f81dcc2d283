//! Kubernetes quantities and the limit env vars (`CUDA_DEVICE_MEMORY_LIMIT_<i>`,
//! `CUDA_DEVICE_SM_LIMIT`): parsing never panics; a parsed quantity prints as a plain decimal that parses
//! back to the same value; a memory limit is never 0 (never "unlimited") and an SM limit is at most 100.
#![no_main]

use hami_api::Quantity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = Quantity::parse(text) {
        let shown = q.to_string();
        assert_eq!(Quantity::parse(&shown).ok(), Some(q), "{text} printed as {shown}");
        let _ = (q.to_mib_ceil(), q.to_milli_ceil(), q.as_integer_exact());
    }
    let _ = Quantity::parse_non_negative(text);
    if let Ok(bytes) = hami_api::parse_memory_limit_env(text) {
        assert!(bytes > 0, "{text} parsed as a zero limit");
    }
    if let Ok(sm) = hami_api::parse_sm_limit_env(text) {
        assert!(sm <= 100, "{text} parsed as {sm} %");
    }
});
