//! A Pod (any JSON) read into the scheduler's request with HAMi's defaults: never panics; every GPU
//! request it yields asks for at least one GPU, cores ≤ 100 and non-zero memory (peer case C29).
#![no_main]

use hami_api::{MemoryRequest, ResourceNames, k8s};
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else {
        return;
    };
    let names = ResourceNames::default();
    let _ = k8s::uses_managed_resources(&pod, &names);
    let Ok(req) = k8s::pod_request(&pod, &names, &k8s::RequestDefaults::default()) else {
        return;
    };
    for gpu in req.containers.iter().filter_map(|c| c.gpu.as_ref()) {
        assert!(gpu.count >= 1 && gpu.cores <= 100, "{gpu:?}");
        match gpu.memory {
            MemoryRequest::Mib(m) => assert!(m > 0, "{gpu:?}"),
            MemoryRequest::Percent(p) => assert!((1..=100).contains(&p), "{gpu:?}"),
        }
    }
    let _ = (req.effective_cpu_milli(), req.effective_memory_mib());
});
