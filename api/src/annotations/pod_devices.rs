//! The scheduler's per-container device decision, as HAMi writes it into `hami.io/vgpu-devices-allocated`
//! and `hami.io/vgpu-devices-to-allocate`.
//!
//! Format (`reference/hami.md` §1.3, HAMi `pkg/device/devices.go` `EncodePodSingleDevice` /
//! `DecodePodDevices`):
//!
//! ```text
//! value     := container*                 one segment per container, init containers first, in pod order
//! container := device* ";"                a container without devices is the empty segment ";"
//! device    := UUID "," Type "," MemMiB "," Cores ":"
//! ```
//!
//! e.g. `;GPU-A,NVIDIA,2500,25:;GPU-B,NVIDIA,2500,25:;` for a pod with a non-GPU init container and two
//! GPU app containers (peer bug C14). The segment position *is* the container index, so there is exactly
//! one segment per container and one canonical empty form, `;` (peer bug C08). The decoder also accepts
//! HAMi's legacy placeholder device `,,0,0:` as "no device" and drops it; the encoder never writes it.
//!
//! The value is not trimmed. Numbers are decimal digits without sign (leading zeros allowed) and must fit
//! HAMi's `int32` (`ContainerDevice.Usedmem` / `Usedcores`), so anything we write HAMi can read.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::token_problem;
use crate::error::{Error, Result};

/// The legacy "no device" placeholder device (empty UUID and type, zero usage), without its `:`.
const LEGACY_PLACEHOLDER: &str = ",,0,0";

/// Largest number HAMi's `int32` fields can carry.
const HAMI_INT32_MAX: u64 = i32::MAX as u64;

/// One device given to a container: `UUID,Type,usedmem,usedcores`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerDevice {
    /// Physical GPU UUID, e.g. `GPU-6f0c…` (non-empty, no whitespace, no `,` `:` `;`).
    pub uuid: String,
    /// Vendor "common word", e.g. `NVIDIA` (not the card model; non-empty, no `,` `:` `;`).
    pub vendor_type: String,
    /// Device memory given on this GPU, MiB (at most `i32::MAX`, HAMi's `Usedmem`).
    pub memory_mib: u64,
    /// Compute given on this GPU, percent of its SMs (at most `i32::MAX`, HAMi's `Usedcores`).
    pub cores: u32,
}

impl ContainerDevice {
    /// A device entry.
    #[must_use]
    pub fn new(uuid: impl Into<String>, vendor_type: impl Into<String>, memory_mib: u64, cores: u32) -> Self {
        Self {
            uuid: uuid.into(),
            vendor_type: vendor_type.into(),
            memory_mib,
            cores,
        }
    }
}

/// The devices of one container, in the order the container sees them (CUDA index inside the container).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerDevices(pub Vec<ContainerDevice>);

impl ContainerDevices {
    /// Whether the container has no device.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The whole pod's decision: one entry per container, init containers first, then app containers, in
/// pod spec order. Containers without devices have an empty entry, so positions match containers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodDevices(pub Vec<ContainerDevices>);

impl PodDevices {
    /// Decodes an annotation value (format in the module docs). Accepts HAMi's legacy `,,0,0:`
    /// placeholder as "no device". The empty string is a pod with no container entries.
    pub fn decode(value: &str) -> Result<Self> {
        if value.is_empty() {
            return Ok(Self::default());
        }
        let segments: Vec<&str> = value.split(';').collect();
        let Some((last, body)) = segments.split_last() else {
            return Ok(Self::default());
        };
        if !last.is_empty() {
            return Err(Error::InvalidPodDevices {
                container: body.len(),
                device: None,
                field: None,
                value: (*last).to_owned(),
                detail: "container segment not terminated by ';'",
            });
        }
        body.iter()
            .enumerate()
            .map(|(i, seg)| decode_segment(i, seg))
            .collect::<Result<Vec<_>>>()
            .map(Self)
    }

    /// Encodes to the canonical annotation value: one `;`-terminated segment per container, `;` alone
    /// for a container without devices. Errors if a field would break the format or exceed HAMi's
    /// `int32` (see [`ContainerDevice`]).
    pub fn encode(&self) -> Result<String> {
        let mut out = String::new();
        for container in &self.0 {
            for d in &container.0 {
                check_token("uuid", &d.uuid, true)?;
                check_token("vendor_type", &d.vendor_type, false)?;
                check_int32("memory_mib", d.memory_mib)?;
                check_int32("cores", u64::from(d.cores))?;
                // Writing to a String cannot fail.
                let _ = write!(out, "{},{},{},{}:", d.uuid, d.vendor_type, d.memory_mib, d.cores);
            }
            out.push(';');
        }
        Ok(out)
    }

    /// Whether any container has a device. HAMi's device plugin marks the bind successful once
    /// `-to-allocate` has none left.
    #[must_use]
    pub fn has_devices(&self) -> bool {
        self.0.iter().any(|c| !c.is_empty())
    }

    /// The entry of container `index` (init containers first), if the pod has that many entries.
    #[must_use]
    pub fn container(&self, index: usize) -> Option<&ContainerDevices> {
        self.0.get(index)
    }

    /// Takes the first non-empty container entry, leaving it empty in place, and returns its position
    /// and devices: what HAMi's device plugin `Allocate` does with `-to-allocate` for each container
    /// kubelet asks about (`reference/hami.md` §1.3 step 6).
    pub fn take_first_pending(&mut self) -> Option<(usize, ContainerDevices)> {
        let (i, entry) = self.0.iter_mut().enumerate().find(|(_, c)| !c.is_empty())?;
        Some((i, std::mem::take(entry)))
    }
}

fn decode_segment(container: usize, seg: &str) -> Result<ContainerDevices> {
    if seg.is_empty() {
        return Ok(ContainerDevices::default());
    }
    let entries: Vec<&str> = seg.split(':').collect();
    let Some((last, body)) = entries.split_last() else {
        return Ok(ContainerDevices::default());
    };
    if !last.is_empty() {
        return Err(Error::InvalidPodDevices {
            container,
            device: Some(body.len()),
            field: None,
            value: (*last).to_owned(),
            detail: "device entry not terminated by ':'",
        });
    }
    let mut devices = Vec::with_capacity(body.len());
    for (i, entry) in body.iter().enumerate() {
        if *entry == LEGACY_PLACEHOLDER {
            continue;
        }
        devices.push(decode_device(container, i, entry)?);
    }
    Ok(ContainerDevices(devices))
}

fn decode_device(container: usize, device: usize, entry: &str) -> Result<ContainerDevice> {
    let err = |field: Option<&'static str>, value: &str, detail: &'static str| Error::InvalidPodDevices {
        container,
        device: Some(device),
        field,
        value: value.to_owned(),
        detail,
    };
    let fields: Vec<&str> = entry.split(',').collect();
    let [uuid, vendor_type, mem, cores] = fields[..] else {
        return Err(err(
            None,
            entry,
            if entry.is_empty() {
                "empty device entry"
            } else {
                "expected 4 comma-separated fields UUID,Type,usedmem,usedcores"
            },
        ));
    };
    if let Some(detail) = token_problem(uuid, true) {
        return Err(err(Some("uuid"), uuid, detail));
    }
    if let Some(detail) = token_problem(vendor_type, false) {
        return Err(err(Some("type"), vendor_type, detail));
    }
    let memory_mib = parse_int32(mem).map_err(|detail| err(Some("usedmem"), mem, detail))?;
    let cores = parse_int32(cores).map_err(|detail| err(Some("usedcores"), cores, detail))?;
    Ok(ContainerDevice {
        uuid: uuid.to_owned(),
        vendor_type: vendor_type.to_owned(),
        memory_mib,
        // parse_int32 bounds the value by i32::MAX.
        cores: u32::try_from(cores).map_err(|_| err(Some("usedcores"), "", "above HAMi's int32 range"))?,
    })
}

fn check_token(what: &'static str, s: &str, no_whitespace: bool) -> Result<()> {
    match token_problem(s, no_whitespace) {
        Some(detail) => Err(Error::Unencodable {
            what,
            value: s.to_owned(),
            detail,
        }),
        None => Ok(()),
    }
}

fn check_int32(what: &'static str, v: u64) -> Result<()> {
    if v > HAMI_INT32_MAX {
        return Err(Error::Unencodable {
            what,
            value: v.to_string(),
            detail: "above HAMi's int32 range",
        });
    }
    Ok(())
}

/// A non-negative decimal integer within HAMi's `int32`.
fn parse_int32(s: &str) -> std::result::Result<u64, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.starts_with('-') {
        return Err("negative");
    }
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err("expected a non-negative decimal integer");
    }
    let digits = s.trim_start_matches('0');
    if digits.len() > 10 {
        return Err("above HAMi's int32 range");
    }
    let v = digits.bytes().fold(0u64, |acc, c| acc * 10 + u64::from(c - b'0'));
    if v > HAMI_INT32_MAX {
        return Err("above HAMi's int32 range");
    }
    Ok(v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dev(uuid: &str, mem: u64, cores: u32) -> ContainerDevice {
        ContainerDevice::new(uuid, "NVIDIA", mem, cores)
    }

    fn pod(containers: Vec<Vec<ContainerDevice>>) -> PodDevices {
        PodDevices(containers.into_iter().map(ContainerDevices).collect())
    }

    /// Peer bug C08: 5 containers, only container 1 has GPU-A with 1000 MiB.
    #[test]
    fn c08_one_segment_per_container_canonical_empty_form() {
        let p = pod(vec![vec![], vec![dev("GPU-A", 1000, 0)], vec![], vec![], vec![]]);
        let s = p.encode().unwrap();
        assert_eq!(s, ";GPU-A,NVIDIA,1000,0:;;;;");
        assert_eq!(s.matches(';').count(), 5);
        assert_eq!(PodDevices::decode(&s).unwrap(), p);
        assert_eq!(
            PodDevices::decode(&s).unwrap().container(1).unwrap().0[0].uuid,
            "GPU-A"
        );
    }

    /// Peer bug C08: the legacy placeholder `,,0,0:` decodes as "no device" and re-encodes canonically.
    #[test]
    fn c08_legacy_placeholder_is_no_device() {
        let legacy = "GPU-A,NVIDIA,1000,0:;;,,0,0:;,,0,0:;,,0,0:;";
        let p = PodDevices::decode(legacy).unwrap();
        assert_eq!(
            p,
            pod(vec![vec![dev("GPU-A", 1000, 0)], vec![], vec![], vec![], vec![]])
        );
        assert_eq!(p.encode().unwrap(), "GPU-A,NVIDIA,1000,0:;;;;;");
        let p = PodDevices::decode(";GPU-A,NVIDIA,1000,0:,,0,0:;,,0,0:;").unwrap();
        assert_eq!(p, pod(vec![vec![], vec![dev("GPU-A", 1000, 0)], vec![]]));
    }

    /// Peer bug C14: a non-GPU init container keeps its (empty) first segment.
    #[test]
    fn c14_init_container_slot_is_kept() {
        let p = pod(vec![
            vec![],
            vec![dev("GPU-A", 2500, 25)],
            vec![dev("GPU-B", 2500, 25)],
        ]);
        let s = p.encode().unwrap();
        assert_eq!(s, ";GPU-A,NVIDIA,2500,25:;GPU-B,NVIDIA,2500,25:;");
        let back = PodDevices::decode(&s).unwrap();
        assert_eq!(back.0.len(), 3);
        assert!(back.0[0].is_empty());
        assert_eq!(back, p);
    }

    #[test]
    fn multi_device_container_and_hami_example() {
        let s = "GPU-0fc3,NVIDIA,3000,30:;GPU-0fc3,NVIDIA,5000,0:;";
        let p = PodDevices::decode(s).unwrap();
        assert_eq!(
            p,
            pod(vec![
                vec![dev("GPU-0fc3", 3000, 30)],
                vec![dev("GPU-0fc3", 5000, 0)]
            ])
        );
        let two = pod(vec![vec![dev("GPU-A", 1, 2), dev("GPU-B", 3, 4)]]);
        assert_eq!(two.encode().unwrap(), "GPU-A,NVIDIA,1,2:GPU-B,NVIDIA,3,4:;");
        assert_eq!(PodDevices::decode("").unwrap(), PodDevices::default());
        assert_eq!(PodDevices::default().encode().unwrap(), "");
        assert_eq!(PodDevices::decode(";;").unwrap(), pod(vec![vec![], vec![]]));
        assert_eq!(
            PodDevices::decode("GPU-A,NVIDIA,0100,007:;").unwrap(),
            pod(vec![vec![dev("GPU-A", 100, 7)]])
        );
    }

    #[test]
    fn take_first_pending_empties_entries_in_order() {
        let mut p = pod(vec![
            vec![],
            vec![dev("GPU-A", 1, 0)],
            vec![],
            vec![dev("GPU-B", 2, 0)],
        ]);
        assert!(p.has_devices());
        let (i, first) = p.take_first_pending().unwrap();
        assert_eq!((i, first.0[0].uuid.as_str()), (1, "GPU-A"));
        assert_eq!(p.encode().unwrap(), ";;;GPU-B,NVIDIA,2,0:;");
        assert_eq!(p.take_first_pending().unwrap().0, 3);
        assert!(!p.has_devices());
        assert_eq!(p.encode().unwrap(), ";;;;");
        assert!(p.take_first_pending().is_none());
    }

    #[test]
    fn malformed_values_are_errors_with_positions() {
        let cases: &[(&str, usize, Option<usize>, Option<&str>)] = &[
            ("GPU-A,NVIDIA,1000,0:", 0, None, None),                 // missing ';'
            (";GPU-A,NVIDIA,1000,0:;GPU-B", 2, None, None),          // last segment unterminated
            ("GPU-A,NVIDIA,1000,0;", 0, Some(0), None),              // device missing ':'
            ("GPU-A,NVIDIA,1000:;", 0, Some(0), None),               // 3 fields
            ("GPU-A,NVIDIA,1000,0,5:;", 0, Some(0), None),           // 5 fields
            (";GPU-A,NVIDIA,abc,0:;", 1, Some(0), Some("usedmem")),  // non-numeric mem
            ("GPU-A,NVIDIA,-1000,0:;", 0, Some(0), Some("usedmem")), // negative
            ("GPU-A,NVIDIA,1000,-1:;", 0, Some(0), Some("usedcores")),
            ("GPU-A,NVIDIA,2147483648,0:;", 0, Some(0), Some("usedmem")), // int32 overflow
            (
                "GPU-A,NVIDIA,99999999999999999999999,0:;",
                0,
                Some(0),
                Some("usedmem"),
            ),
            ("GPU-A,NVIDIA,1000,4294967296:;", 0, Some(0), Some("usedcores")),
            ("GPU-A,NVIDIA,,0:;", 0, Some(0), Some("usedmem")),
            ("GPU-A,NVIDIA,+5,0:;", 0, Some(0), Some("usedmem")),
            ("GPU-A,NVIDIA, 5,0:;", 0, Some(0), Some("usedmem")),
            ("GPU-A,NVIDIA,1.5,0:;", 0, Some(0), Some("usedmem")),
            (",NVIDIA,1000,0:;", 0, Some(0), Some("uuid")), // empty uuid (not the placeholder)
            (",,1000,0:;", 0, Some(0), Some("uuid")),
            ("GPU A,NVIDIA,1,0:;", 0, Some(0), Some("uuid")),
            ("GPU-A,,1,0:;", 0, Some(0), Some("type")),
            ("GPU-A,NVIDIA,1,0::;", 0, Some(1), None), // empty device entry
            ("GPU-A,NVIDIA,1,0:;;x", 2, None, None),
            (" ;", 0, Some(0), None),
        ];
        for &(s, container, device, field) in cases {
            let e = PodDevices::decode(s).unwrap_err();
            match &e {
                Error::InvalidPodDevices {
                    container: c,
                    device: d,
                    field: f,
                    ..
                } => {
                    assert_eq!((*c, *d, *f), (container, device, field), "{s:?}: {e}");
                }
                other => panic!("{s:?}: unexpected error {other:?}"),
            }
            assert_eq!(e.reason(), "invalid_pod_devices");
        }
    }

    #[test]
    fn encode_rejects_values_that_would_break_the_format() {
        for d in [
            dev("", 1, 0),
            dev("GPU,A", 1, 0),
            dev("GPU:A", 1, 0),
            dev("GPU;A", 1, 0),
            dev("GPU A", 1, 0),
            ContainerDevice::new("GPU-A", "", 1, 0),
            ContainerDevice::new("GPU-A", "NV;IDIA", 1, 0),
            dev("GPU-A", HAMI_INT32_MAX + 1, 0),
            dev("GPU-A", 1, u32::MAX),
        ] {
            let e = pod(vec![vec![d.clone()]]).encode().unwrap_err();
            assert_eq!(e.reason(), "unencodable", "{d:?}");
        }
    }

    fn device_strategy() -> impl Strategy<Value = ContainerDevice> {
        (
            "[A-Za-z0-9-]{1,40}",
            "[A-Za-z0-9._-]([A-Za-z0-9 ._-]{0,10}[A-Za-z0-9._-])?",
            0..=HAMI_INT32_MAX,
            0..=i32::MAX as u32,
        )
            .prop_map(|(uuid, t, mem, cores)| ContainerDevice::new(uuid, t, mem, cores))
    }

    fn pod_strategy() -> impl Strategy<Value = PodDevices> {
        prop::collection::vec(
            prop::collection::vec(device_strategy(), 0..4).prop_map(ContainerDevices),
            0..8,
        )
        .prop_map(PodDevices)
    }

    proptest! {
        #[test]
        fn round_trip(p in pod_strategy()) {
            let s = p.encode().unwrap();
            prop_assert_eq!(s.matches(';').count(), p.0.len());
            prop_assert_eq!(PodDevices::decode(&s).unwrap(), p);
        }

        #[test]
        fn decode_never_panics_and_is_canonical(s in "[A-C0-9,:; -]{0,60}") {
            if let Ok(p) = PodDevices::decode(&s) {
                let canonical = p.encode().unwrap();
                prop_assert_eq!(PodDevices::decode(&canonical).unwrap(), p);
            }
        }

        #[test]
        fn decode_never_panics_on_any_text(s in "\\PC{0,80}") {
            let _ = PodDevices::decode(&s);
        }
    }
}
