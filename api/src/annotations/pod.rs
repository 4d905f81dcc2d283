//! Parsing of the selection and policy annotations a user puts on a pod (`reference/hami.md` §2.4, §3.1).
//!
//! Every parser trims surrounding whitespace and then matches case-sensitively; anything else is an
//! [`Error::InvalidAnnotation`] naming the key and the value (HAMi silently treats most unknown values
//! as the default; here they are errors so the pod gets a clear event instead of a surprise placement).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{
    DEVICE_SCORING_WEIGHTS, GPU_SCHEDULER_POLICY, NODE_SCHEDULER_POLICY, NOUSE_GPU_TYPE, NOUSE_GPU_UUID,
    NUMA_BIND, USE_GPU_TYPE, USE_GPU_UUID, VGPU_MODE,
};
use crate::device::DeviceMode;
use crate::error::{Error, Result};
use crate::request::{DeviceSelector, GpuPolicy, NodePolicy};

/// Splits a comma list (`nvidia.com/use-gputype`, `hami.io/device-cordon`, …) into items, trimming each
/// and dropping empty ones: `" A100, ,H100 "` → `["A100", "H100"]`. An empty list therefore means "no
/// restriction" for the `use-*` keys, as in HAMi (where an empty item matches every GPU).
#[must_use]
pub fn parse_comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The GPU selector from a pod's annotations: `nvidia.com/use-gputype`, `nouse-gputype` (model
/// substrings, matched case-insensitively by [`DeviceSelector::allows`]) and `use-gpuuuid`,
/// `nouse-gpuuuid` (exact UUIDs). Missing keys leave the list empty.
#[must_use]
pub fn device_selector(annotations: &BTreeMap<String, String>) -> DeviceSelector {
    let list = |key: &str| {
        annotations
            .get(key)
            .map(|v| parse_comma_list(v))
            .unwrap_or_default()
    };
    DeviceSelector {
        use_types: list(USE_GPU_TYPE),
        nouse_types: list(NOUSE_GPU_TYPE),
        use_uuids: list(USE_GPU_UUID),
        nouse_uuids: list(NOUSE_GPU_UUID),
    }
}

/// `nvidia.com/numa-bind`: exactly `true` or `false`.
pub fn parse_numa_bind(value: &str) -> Result<bool> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(NUMA_BIND, value, "expected \"true\" or \"false\"")),
    }
}

/// `hami.io/node-scheduler-policy`: `binpack` or `spread`.
pub fn parse_node_policy(value: &str) -> Result<NodePolicy> {
    match value.trim() {
        "binpack" => Ok(NodePolicy::Binpack),
        "spread" => Ok(NodePolicy::Spread),
        _ => Err(invalid(
            NODE_SCHEDULER_POLICY,
            value,
            "expected \"binpack\" or \"spread\"",
        )),
    }
}

/// `hami.io/gpu-scheduler-policy`: `binpack`, `spread` or `topology-aware`. HAMi v2.10's `mutex`, `numa`
/// and ordered comma lists are not supported yet and are errors, like any unknown value.
pub fn parse_gpu_policy(value: &str) -> Result<GpuPolicy> {
    match value.trim() {
        "binpack" => Ok(GpuPolicy::Binpack),
        "spread" => Ok(GpuPolicy::Spread),
        "topology-aware" => Ok(GpuPolicy::TopologyAware),
        "mutex" | "numa" => Err(invalid(
            GPU_SCHEDULER_POLICY,
            value,
            "HAMi policy not supported by hami yet",
        )),
        v if v.contains(',') => Err(invalid(
            GPU_SCHEDULER_POLICY,
            value,
            "ordered policy lists are not supported by hami yet",
        )),
        _ => Err(invalid(
            GPU_SCHEDULER_POLICY,
            value,
            "expected \"binpack\", \"spread\" or \"topology-aware\"",
        )),
    }
}

/// `nvidia.com/vgpu-mode`: `hami-core` or `mig`.
pub fn parse_vgpu_mode(value: &str) -> Result<DeviceMode> {
    match value.trim() {
        "hami-core" => Ok(DeviceMode::HamiCore),
        "mig" => Ok(DeviceMode::Mig),
        _ => Err(invalid(VGPU_MODE, value, "expected \"hami-core\" or \"mig\"")),
    }
}

/// Weights of the three terms of HAMi's device score (`hami.io/device-scoring-weights`,
/// `slot=<int>,core=<int>,memory=<int>`; `reference/hami.md` §3.1–3.2):
/// `10 × (slot·used_slots/slots + core·used_cores/cores + memory·used_mem/mem)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceScoringWeights {
    /// Weight of the slot (split count) term.
    pub slot: u32,
    /// Weight of the compute (percent of SMs) term.
    pub core: u32,
    /// Weight of the device-memory term.
    pub memory: u32,
}

impl Default for DeviceScoringWeights {
    /// HAMi's default, `slot=1,core=1,memory=1`.
    fn default() -> Self {
        Self {
            slot: 1,
            core: 1,
            memory: 1,
        }
    }
}

impl DeviceScoringWeights {
    /// Parses `slot=<int>,core=<int>,memory=<int>`: all three keys, each once, in any order, each a
    /// non-negative decimal integer, at least one above zero. Whitespace around items, keys and values
    /// is trimmed.
    pub fn parse(value: &str) -> Result<Self> {
        let err = |detail| invalid(DEVICE_SCORING_WEIGHTS, value, detail);
        let (mut slot, mut core, mut memory) = (None, None, None);
        for item in value.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                return Err(err("expected slot=<int>,core=<int>,memory=<int>"));
            };
            let target = match k.trim() {
                "slot" => &mut slot,
                "core" => &mut core,
                "memory" => &mut memory,
                _ => return Err(err("unknown weight (expected slot, core and memory)")),
            };
            if target.is_some() {
                return Err(err("a weight is given twice"));
            }
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err("a weight is not a non-negative integer"));
            }
            *target = Some(v.parse::<u32>().map_err(|_| err("a weight is too large"))?);
        }
        let (Some(slot), Some(core), Some(memory)) = (slot, core, memory) else {
            return Err(err("all three weights slot, core and memory are required"));
        };
        if slot == 0 && core == 0 && memory == 0 {
            return Err(err("at least one weight must be above zero"));
        }
        Ok(Self { slot, core, memory })
    }
}

impl fmt::Display for DeviceScoringWeights {
    /// The annotation form, `slot=1,core=1,memory=1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot={},core={},memory={}", self.slot, self.core, self.memory)
    }
}

/// Everything a pod's annotations say about where its GPUs may go, parsed at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodSchedulingAnnotations {
    /// From `nvidia.com/{use,nouse}-{gputype,gpuuuid}`.
    pub selector: DeviceSelector,
    /// `nvidia.com/numa-bind` (false when absent).
    pub numa_bind: bool,
    /// `nvidia.com/vgpu-mode`, `None` when absent (either mode).
    pub mode: Option<DeviceMode>,
    /// `hami.io/node-scheduler-policy`, `None` when absent (cluster default).
    pub node_policy: Option<NodePolicy>,
    /// `hami.io/gpu-scheduler-policy`, `None` when absent (cluster default).
    pub gpu_policy: Option<GpuPolicy>,
    /// `hami.io/device-scoring-weights`, `None` when absent (cluster default).
    pub scoring_weights: Option<DeviceScoringWeights>,
}

impl PodSchedulingAnnotations {
    /// Parses every scheduling annotation present; the first malformed one is the error (HAMi: an
    /// invalid value leaves the pod unschedulable).
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self> {
        let get = |key: &str| annotations.get(key).map(String::as_str);
        Ok(Self {
            selector: device_selector(annotations),
            numa_bind: get(NUMA_BIND).map(parse_numa_bind).transpose()?.unwrap_or(false),
            mode: get(VGPU_MODE).map(parse_vgpu_mode).transpose()?,
            node_policy: get(NODE_SCHEDULER_POLICY).map(parse_node_policy).transpose()?,
            gpu_policy: get(GPU_SCHEDULER_POLICY).map(parse_gpu_policy).transpose()?,
            scoring_weights: get(DEVICE_SCORING_WEIGHTS)
                .map(DeviceScoringWeights::parse)
                .transpose()?,
        })
    }
}

fn invalid(key: &'static str, value: &str, detail: &'static str) -> Error {
    Error::InvalidAnnotation {
        key,
        value: value.to_owned(),
        detail,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn annos(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn comma_lists_trim_and_drop_empties() {
        assert_eq!(parse_comma_list(" A100, ,H100 ,"), vec!["A100", "H100"]);
        assert!(parse_comma_list("").is_empty());
        assert!(parse_comma_list(" , ").is_empty());
        let s = device_selector(&annos(&[
            (USE_GPU_TYPE, "A100, H100"),
            (NOUSE_GPU_TYPE, "MIG"),
            (USE_GPU_UUID, "GPU-1,GPU-2"),
            (NOUSE_GPU_UUID, " GPU-3 "),
        ]));
        assert_eq!(s.use_types, vec!["A100", "H100"]);
        assert_eq!(s.nouse_types, vec!["MIG"]);
        assert_eq!(s.use_uuids, vec!["GPU-1", "GPU-2"]);
        assert_eq!(s.nouse_uuids, vec!["GPU-3"]);
        assert!(s.allows("NVIDIA-NVIDIA A100-SXM4-80GB", "GPU-1"));
        assert_eq!(device_selector(&BTreeMap::new()), DeviceSelector::default());
    }

    #[test]
    fn numa_bind_is_strict() {
        assert!(parse_numa_bind("true").unwrap());
        assert!(!parse_numa_bind("false").unwrap());
        assert!(parse_numa_bind(" true ").unwrap());
        for v in ["True", "1", "yes", "", "truee"] {
            let e = parse_numa_bind(v).unwrap_err();
            assert_eq!(
                e,
                Error::InvalidAnnotation {
                    key: NUMA_BIND,
                    value: v.into(),
                    detail: "expected \"true\" or \"false\""
                }
            );
        }
    }

    #[test]
    fn policies() {
        assert_eq!(parse_node_policy("binpack").unwrap(), NodePolicy::Binpack);
        assert_eq!(parse_node_policy("spread").unwrap(), NodePolicy::Spread);
        assert!(parse_node_policy("topology-aware").is_err());
        assert!(parse_node_policy("Binpack").is_err());
        assert_eq!(parse_gpu_policy("binpack").unwrap(), GpuPolicy::Binpack);
        assert_eq!(parse_gpu_policy("spread").unwrap(), GpuPolicy::Spread);
        assert_eq!(
            parse_gpu_policy(" topology-aware ").unwrap(),
            GpuPolicy::TopologyAware
        );
        for v in ["", "mutex", "numa", "binpack,numa", "topology", "pack"] {
            let e = parse_gpu_policy(v).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidAnnotation { key: GPU_SCHEDULER_POLICY, value, .. } if value == v),
                "{v}"
            );
        }
        assert_eq!(parse_vgpu_mode("mig").unwrap(), DeviceMode::Mig);
        assert_eq!(parse_vgpu_mode("hami-core").unwrap(), DeviceMode::HamiCore);
        assert!(parse_vgpu_mode("mps").is_err());
    }

    #[test]
    fn scoring_weights() {
        let w = DeviceScoringWeights::parse("slot=1,core=1,memory=1").unwrap();
        assert_eq!(w, DeviceScoringWeights::default());
        assert_eq!(
            DeviceScoringWeights::parse(" memory = 3 , slot=0,core=2").unwrap(),
            DeviceScoringWeights {
                slot: 0,
                core: 2,
                memory: 3
            }
        );
        assert_eq!(w.to_string(), "slot=1,core=1,memory=1");
        for v in [
            "",
            "slot=1,core=1",
            "slot=1,core=1,memory=1,slot=2",
            "slot=1,core=1,memory=1,extra=1",
            "slot=0,core=0,memory=0",
            "slot=-1,core=1,memory=1",
            "slot=1.5,core=1,memory=1",
            "slot=,core=1,memory=1",
            "slot=1;core=1;memory=1",
            "slot=99999999999,core=1,memory=1",
            "slot=1,core=1,memory=1,",
        ] {
            let e = DeviceScoringWeights::parse(v).unwrap_err();
            assert!(
                matches!(
                    &e,
                    Error::InvalidAnnotation {
                        key: DEVICE_SCORING_WEIGHTS,
                        ..
                    }
                ),
                "{v}: {e}"
            );
        }
    }

    #[test]
    fn all_at_once() {
        let a = annos(&[
            (USE_GPU_TYPE, "A100"),
            (NUMA_BIND, "true"),
            (VGPU_MODE, "hami-core"),
            (NODE_SCHEDULER_POLICY, "spread"),
            (GPU_SCHEDULER_POLICY, "topology-aware"),
            (DEVICE_SCORING_WEIGHTS, "slot=2,core=1,memory=1"),
            ("unrelated/key", "whatever"),
        ]);
        let p = PodSchedulingAnnotations::from_annotations(&a).unwrap();
        assert_eq!(p.selector.use_types, vec!["A100"]);
        assert!(p.numa_bind);
        assert_eq!(p.mode, Some(DeviceMode::HamiCore));
        assert_eq!(p.node_policy, Some(NodePolicy::Spread));
        assert_eq!(p.gpu_policy, Some(GpuPolicy::TopologyAware));
        assert_eq!(
            p.scoring_weights,
            Some(DeviceScoringWeights {
                slot: 2,
                core: 1,
                memory: 1
            })
        );
        assert_eq!(
            PodSchedulingAnnotations::from_annotations(&BTreeMap::new()).unwrap(),
            PodSchedulingAnnotations::default()
        );
        let bad = annos(&[(NUMA_BIND, "yes")]);
        assert_eq!(
            PodSchedulingAnnotations::from_annotations(&bad)
                .unwrap_err()
                .reason(),
            "invalid_annotation"
        );
    }

    proptest! {
        #[test]
        fn weights_round_trip(slot in 0u32..1000, core in 0u32..1000, memory in 1u32..1000) {
            let w = DeviceScoringWeights { slot, core, memory };
            prop_assert_eq!(DeviceScoringWeights::parse(&w.to_string()).unwrap(), w);
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,40}") {
            let _ = DeviceScoringWeights::parse(&s);
            let _ = parse_gpu_policy(&s);
            let _ = parse_comma_list(&s);
        }
    }
}
