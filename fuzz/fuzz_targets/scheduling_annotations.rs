//! A pod's scheduling annotations (`hami.io/*-scheduler-policy`, `nvidia.com/use-gputype`, numa-bind,
//! scoring weights, …) from a JSON map: parsing never panics; scoring weights print in a form that
//! parses back to the same weights.
#![no_main]

use std::collections::BTreeMap;

use hami_api::annotations::{DEVICE_SCORING_WEIGHTS, DeviceScoringWeights, PodSchedulingAnnotations};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(map) = serde_json::from_slice::<BTreeMap<String, String>>(data) else {
        return;
    };
    let _ = PodSchedulingAnnotations::from_annotations(&map);
    if let Some(v) = map.get(DEVICE_SCORING_WEIGHTS)
        && let Ok(w) = DeviceScoringWeights::parse(v)
    {
        assert_eq!(DeviceScoringWeights::parse(&w.to_string()).ok(), Some(w));
    }
});
