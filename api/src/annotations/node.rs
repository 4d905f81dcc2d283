//! The node inventory annotation, `hami.io/node-nvidia-register`.
//!
//! **HAMi's JSON** (v2.8+, `reference/hami.md` §1.2; fields of HAMi `pkg/device/devices.go` `DeviceInfo`):
//!
//! ```text
//! [{"id":"GPU-…","index":1,"count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-NVIDIA A100-SXM4-80GB",
//!   "numa":0,"mode":"hami-core","health":true}, …]
//! ```
//!
//! `count` = `deviceSplitCount` (slots), `devmem` = schedulable MiB (physical × `deviceMemoryScaling`),
//! `devcore` = 100 × `deviceCoreScaling`. HAMi's Go struct uses `omitempty` on every field, so a missing
//! `index`, `count`, `devmem`, `devcore` or `numa` means 0, a missing `health` means false, a missing
//! `type` means "", and a missing `mode` means `hami-core`; only `id` is required. HAMi's numbers are
//! `int32`: larger ones are errors. Unknown fields (`migtemplate`, `devicevendor`, `custominfo`, …) are
//! ignored. A `numa` of -1 (Linux sysfs: no NUMA affinity) decodes as `None`.
//!
//! **Our extension.** [`encode_node_register`] writes HAMi's fields (with HAMi's `omitempty` behaviour,
//! so the JSON reads like HAMi's) plus one object HAMi ignores, under a key no HAMi field matches
//! (Go's decoder matches keys case-insensitively, so the key must differ from all of them):
//!
//! ```text
//! "x-hami-rs":{"version":1,"memoryMiB":81920,"smCount":108,"numa":0,"nvlink":{"1":12},
//!              "memoryScaling":1.0,"coreScaling":1.0}
//! ```
//!
//! carrying the physical memory (MiB), the SM count, the NUMA node (`null` when unknown), the NVLink peers
//! (peer GPU index → link count) and both scaling factors exactly, so `decode(encode(x)) == x`. When the
//! extension is present, HAMi's `devmem`, `devcore` and `numa` must agree with it, or the record is an
//! error. Without it (a HAMi device plugin), the device gets `memory_mib = devmem`, `memory_scaling = 1`,
//! a `core_scaling` with `schedulable_cores() == devcore`, `sm_count = 0` and no NVLink peers.
//!
//! **Legacy text** (still parsed by HAMi's `DecodeNodeDevices`): `;`-free records, each terminated by
//! `:`, of 7 fields `UUID,count,devmem,devcore,type,numa,health` (as in HAMi `docs/develop/protocol.md`)
//! or 9 fields `…,index,mode` (as HAMi's `EncodeNodeDevices` writes). A 7-field record has index 0 and
//! mode `hami-core`, as in HAMi. `health` accepts Go's `strconv.ParseBool` spellings.
//!
//! A value starting with `[` (after whitespace) is decoded as JSON, anything else as legacy text.
//! In both forms a device id must be non-empty, unique on the node, and free of whitespace, control
//! characters and the `,` `:` `;` separators (it is copied into the pod allocation annotation).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::{NODE_NVIDIA_REGISTER, token_problem};
use crate::device::{DeviceMode, GpuDevice, NodeInventory};
use crate::error::{Error, Result};

/// Key of our extension object inside each device record.
pub const EXTENSION_KEY: &str = "x-hami-rs";

/// Version of the extension object this crate writes and reads.
pub const EXTENSION_VERSION: u64 = 1;

/// Largest value of HAMi's `int32` fields.
const HAMI_INT32_MAX: u64 = i32::MAX as u64;

/// Prefix HAMi's device plugin puts before the model name in `type` when it lacks it.
const NVIDIA_TYPE_PREFIX: &str = "NVIDIA-";

/// The `type` HAMi's device plugin registers for an NVML model name: the name prefixed with `NVIDIA-`
/// unless it already starts with it (e.g. `NVIDIA A100-SXM4-80GB` → `NVIDIA-NVIDIA A100-SXM4-80GB`).
#[must_use]
pub fn registered_type_name(model: &str) -> String {
    if model.starts_with(NVIDIA_TYPE_PREFIX) {
        model.to_owned()
    } else {
        format!("{NVIDIA_TYPE_PREFIX}{model}")
    }
}

/// Encodes a node's GPUs as the `hami.io/node-nvidia-register` value: HAMi's JSON plus our extension
/// object (module docs). `type` is written as `model` is, unchanged (use [`registered_type_name`] when
/// filling `model` from NVML).
///
/// Errors ([`Error::Unencodable`]) for an empty, duplicate or unrepresentable UUID (whitespace, control
/// characters, `,` `:` `;`), a non-finite or negative scaling
/// factor, or a `count`, `devmem`, `devcore` or `numa` above HAMi's `int32`.
pub fn encode_node_register(gpus: &[GpuDevice]) -> Result<String> {
    let mut seen = BTreeSet::new();
    let mut wire = Vec::with_capacity(gpus.len());
    for g in gpus {
        if let Some(detail) = token_problem(&g.uuid, true) {
            return Err(unencodable("uuid", &g.uuid, detail));
        }
        if !seen.insert(g.uuid.as_str()) {
            return Err(unencodable("uuid", &g.uuid, "duplicate device id"));
        }
        for (what, s) in [
            ("memory_scaling", g.memory_scaling),
            ("core_scaling", g.core_scaling),
        ] {
            if !s.is_finite() || s < 0.0 {
                return Err(unencodable(
                    what,
                    &s.to_string(),
                    "must be finite and non-negative",
                ));
            }
        }
        let devmem = g.schedulable_memory_mib();
        let devcore = g.schedulable_cores();
        int32("split_count", u64::from(g.split_count))?;
        int32("devmem", devmem)?;
        int32("devcore", u64::from(devcore))?;
        if let Some(n) = g.numa {
            int32("numa", u64::from(n))?;
        }
        wire.push(WireDevice {
            id: &g.uuid,
            index: g.index,
            count: g.split_count,
            devmem,
            devcore,
            kind: &g.model,
            numa: g.numa.unwrap_or(0),
            mode: mode_name(g.mode),
            health: g.healthy,
            ext: WireExt {
                version: EXTENSION_VERSION,
                memory_mib: g.memory_mib,
                sm_count: g.sm_count,
                numa: g.numa,
                nvlink: &g.nvlink_peers,
                memory_scaling: g.memory_scaling,
                core_scaling: g.core_scaling,
            },
        });
    }
    serde_json::to_string(&wire).map_err(|_| unencodable("node register", "", "JSON serialization failed"))
}

/// [`encode_node_register`] of the inventory's GPUs.
pub fn encode_node_inventory(inventory: &NodeInventory) -> Result<String> {
    encode_node_register(&inventory.gpus)
}

/// Decodes a `hami.io/node-nvidia-register` value, in any of the three forms (module docs), into the
/// node's GPUs in annotation order. Strict: a malformed value is an error naming the record and field.
pub fn decode_node_register(value: &str) -> Result<Vec<GpuDevice>> {
    let trimmed = value.trim_start();
    let gpus = if trimmed.starts_with('[') {
        decode_json(value)?
    } else if trimmed.starts_with('{') || trimmed.starts_with("null") {
        return Err(value_err(value, "expected a JSON array of devices"));
    } else {
        decode_legacy(value)?
    };
    let mut seen = BTreeSet::new();
    for (i, g) in gpus.iter().enumerate() {
        if !seen.insert(g.uuid.as_str()) {
            return Err(record_err(i, Some("id"), &g.uuid, "duplicate device id"));
        }
    }
    Ok(gpus)
}

// ---- Encoding ----

#[derive(Serialize)]
struct WireDevice<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "is_zero_u32")]
    index: u32,
    #[serde(skip_serializing_if = "is_zero_u32")]
    count: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    devmem: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    devcore: u32,
    #[serde(rename = "type", skip_serializing_if = "str::is_empty")]
    kind: &'a str,
    #[serde(skip_serializing_if = "is_zero_u32")]
    numa: u32,
    mode: &'static str,
    #[serde(skip_serializing_if = "is_false")]
    health: bool,
    #[serde(rename = "x-hami-rs")]
    ext: WireExt<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireExt<'a> {
    version: u64,
    #[serde(rename = "memoryMiB")]
    memory_mib: u64,
    sm_count: u32,
    numa: Option<u32>,
    nvlink: &'a BTreeMap<u32, u32>,
    memory_scaling: f64,
    core_scaling: f64,
}

// serde's skip_serializing_if passes a reference.
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn mode_name(mode: DeviceMode) -> &'static str {
    match mode {
        DeviceMode::HamiCore => "hami-core",
        DeviceMode::Mig => "mig",
    }
}

fn unencodable(what: &'static str, value: &str, detail: &'static str) -> Error {
    Error::Unencodable {
        what,
        value: value.to_owned(),
        detail,
    }
}

fn int32(what: &'static str, v: u64) -> Result<()> {
    if v > HAMI_INT32_MAX {
        return Err(unencodable(what, &v.to_string(), "above HAMi's int32 range"));
    }
    Ok(())
}

// ---- Decoding, shared ----

fn record_err(record: usize, field: Option<&'static str>, value: &str, detail: &'static str) -> Error {
    Error::InvalidNodeRegister {
        key: NODE_NVIDIA_REGISTER,
        record: Some(record),
        field,
        value: value.to_owned(),
        detail,
    }
}

fn value_err(value: &str, detail: &'static str) -> Error {
    Error::InvalidNodeRegister {
        key: NODE_NVIDIA_REGISTER,
        record: None,
        field: None,
        value: preview(value),
        detail,
    }
}

/// At most 80 characters of `s`, for error messages about a whole value.
fn preview(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse_mode(s: &str) -> Option<DeviceMode> {
    match s {
        "" | "hami-core" => Some(DeviceMode::HamiCore),
        "mig" => Some(DeviceMode::Mig),
        _ => None,
    }
}

/// HAMi's `numa` (Go `int`) to ours: -1 is "none", other negatives are errors.
fn numa_from_int(n: i64) -> Option<Option<u32>> {
    match n {
        -1 => Some(None),
        n => u32::try_from(n)
            .ok()
            .filter(|&n| u64::from(n) <= HAMI_INT32_MAX)
            .map(Some),
    }
}

/// A device as HAMi describes it, before our extension is applied.
struct HamiFields {
    id: String,
    index: u32,
    count: u32,
    devmem: u64,
    devcore: u32,
    kind: String,
    numa: Option<u32>,
    mode: DeviceMode,
    health: bool,
}

impl HamiFields {
    /// The device from HAMi's fields alone: physical memory = `devmem`, memory scaling 1, and the
    /// smallest core scaling whose `schedulable_cores()` equals `devcore`.
    fn into_device(self) -> GpuDevice {
        let mut g = GpuDevice::new(self.id, self.index, self.kind, self.devmem);
        g.numa = self.numa;
        g.healthy = self.health;
        g.split_count = self.count;
        g.mode = self.mode;
        g.core_scaling = f64::from(self.devcore) / 100.0;
        // devcore / 100 may land one ulp low, so that floor(100 × s) = devcore − 1; step up.
        for _ in 0..4 {
            if g.schedulable_cores() >= self.devcore {
                break;
            }
            g.core_scaling = g.core_scaling.next_up();
        }
        g
    }
}

// ---- JSON ----

fn decode_json(value: &str) -> Result<Vec<GpuDevice>> {
    let parsed: Value = serde_json::from_str(value).map_err(|e| Error::InvalidJson {
        key: NODE_NVIDIA_REGISTER,
        message: e.to_string(),
    })?;
    let Value::Array(records) = parsed else {
        return Err(value_err(value, "expected a JSON array of devices"));
    };
    records
        .iter()
        .enumerate()
        .map(|(i, r)| decode_json_record(i, r))
        .collect()
}

fn decode_json_record(i: usize, record: &Value) -> Result<GpuDevice> {
    let Value::Object(obj) = record else {
        return Err(record_err(i, None, &record.to_string(), "expected a JSON object"));
    };
    let r = Record { i, obj };
    let id = r.string("id")?.unwrap_or_default();
    if id.is_empty() {
        return Err(record_err(i, Some("id"), "", "missing or empty device id"));
    }
    if let Some(detail) = token_problem(&id, true) {
        return Err(record_err(i, Some("id"), &id, detail));
    }
    let mode_text = r.string("mode")?.unwrap_or_default();
    let mode = parse_mode(&mode_text).ok_or_else(|| {
        record_err(
            i,
            Some("mode"),
            &mode_text,
            "unsupported mode (expected hami-core or mig)",
        )
    })?;
    let numa = match r.get("numa") {
        None => Some(0),
        Some(v) => v.as_i64().and_then(numa_from_int).ok_or_else(|| {
            record_err(
                i,
                Some("numa"),
                &v.to_string(),
                "expected -1 or a non-negative int32",
            )
        })?,
    };
    let hami = HamiFields {
        index: r
            .uint("index", u64::from(u32::MAX))?
            .unwrap_or(0)
            .try_into()
            .unwrap_or(u32::MAX),
        count: r.int32("count")?.try_into().unwrap_or(u32::MAX),
        devmem: r.int32("devmem")?,
        devcore: r.int32("devcore")?.try_into().unwrap_or(u32::MAX),
        kind: r.string("type")?.unwrap_or_default(),
        health: r.boolean("health")?.unwrap_or(false),
        id,
        numa,
        mode,
    };
    match obj.get(EXTENSION_KEY) {
        None => Ok(hami.into_device()),
        Some(ext) => apply_extension(i, hami, ext),
    }
}

/// One JSON record, for typed field access with errors naming the record and field.
struct Record<'a> {
    i: usize,
    obj: &'a Map<String, Value>,
}

impl Record<'_> {
    /// The JSON key of a field label: its last `.`-separated part (`x-hami-rs.memoryMiB` → `memoryMiB`).
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field.rsplit('.').next().unwrap_or(field))
    }

    fn err(&self, field: &'static str, v: &Value, detail: &'static str) -> Error {
        record_err(self.i, Some(field), &v.to_string(), detail)
    }

    fn string(&self, field: &'static str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(field, v, "expected a string")),
        }
    }

    fn boolean(&self, field: &'static str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(field, v, "expected true or false")),
        }
    }

    /// A non-negative integer up to `max`, `None` when absent.
    fn uint(&self, field: &'static str, max: u64) -> Result<Option<u64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                Some(_) => Err(self.err(field, v, "too large")),
                None => Err(self.err(field, v, "expected a non-negative integer")),
            },
        }
    }

    /// A non-negative integer up to `max`; absent is an error.
    fn required_uint(&self, field: &'static str, max: u64) -> Result<u64> {
        self.uint(field, max)?
            .ok_or_else(|| record_err(self.i, Some(field), "", "missing"))
    }

    /// A non-negative integer within HAMi's `int32`, 0 when absent (`omitempty`).
    fn int32(&self, field: &'static str) -> Result<u64> {
        Ok(self.uint(field, HAMI_INT32_MAX)?.unwrap_or(0))
    }

    /// A finite non-negative number; absent is an error.
    fn float(&self, field: &'static str) -> Result<f64> {
        match self.get(field) {
            None => Err(record_err(self.i, Some(field), "", "missing")),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 => Ok(f),
                _ => Err(self.err(field, v, "expected a non-negative number")),
            },
        }
    }
}

fn apply_extension(i: usize, hami: HamiFields, ext: &Value) -> Result<GpuDevice> {
    let Value::Object(obj) = ext else {
        return Err(record_err(
            i,
            Some(EXTENSION_KEY),
            &ext.to_string(),
            "expected a JSON object",
        ));
    };
    let r = Record { i, obj };
    let version = r.required_uint("x-hami-rs.version", u64::MAX)?;
    if version != EXTENSION_VERSION {
        return Err(record_err(
            i,
            Some("x-hami-rs.version"),
            &version.to_string(),
            "unsupported extension version (expected 1)",
        ));
    }
    let memory_mib = r.required_uint("x-hami-rs.memoryMiB", u64::MAX)?;
    let sm_count = r
        .uint("x-hami-rs.smCount", u64::from(u32::MAX))?
        .unwrap_or(0)
        .try_into()
        .unwrap_or(u32::MAX);
    let numa = match r.get("x-hami-rs.numa") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| r.err("x-hami-rs.numa", v, "expected null or a non-negative integer"))?,
        ),
    };
    let nvlink = match r.get("x-hami-rs.nvlink") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => {
            let mut peers = BTreeMap::new();
            for (k, v) in m {
                let peer = k
                    .parse::<u32>()
                    .ok()
                    .filter(|p| p.to_string() == *k)
                    .ok_or_else(|| {
                        record_err(i, Some("x-hami-rs.nvlink"), k, "peer key is not a GPU index")
                    })?;
                let links = v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                    r.err("x-hami-rs.nvlink", v, "link count is not a non-negative integer")
                })?;
                peers.insert(peer, links);
            }
            peers
        }
        Some(v) => {
            return Err(r.err(
                "x-hami-rs.nvlink",
                v,
                "expected an object of GPU index to link count",
            ));
        }
    };
    let memory_scaling = r.float("x-hami-rs.memoryScaling")?;
    let core_scaling = r.float("x-hami-rs.coreScaling")?;
    let (devmem, devcore, hami_numa) = (hami.devmem, hami.devcore, hami.numa);
    let mut g = hami.into_device();
    g.memory_mib = memory_mib;
    g.sm_count = sm_count;
    g.numa = numa;
    g.nvlink_peers = nvlink;
    g.memory_scaling = memory_scaling;
    g.core_scaling = core_scaling;
    if g.schedulable_memory_mib() != devmem {
        return Err(record_err(
            i,
            Some("devmem"),
            &devmem.to_string(),
            "disagrees with x-hami-rs memoryMiB × memoryScaling",
        ));
    }
    if g.schedulable_cores() != devcore {
        return Err(record_err(
            i,
            Some("devcore"),
            &devcore.to_string(),
            "disagrees with 100 × x-hami-rs coreScaling",
        ));
    }
    if numa.unwrap_or(0) != hami_numa.unwrap_or(0) {
        return Err(record_err(
            i,
            Some("numa"),
            &format!("{hami_numa:?}"),
            "disagrees with x-hami-rs numa",
        ));
    }
    Ok(g)
}

// ---- Legacy text ----

fn decode_legacy(value: &str) -> Result<Vec<GpuDevice>> {
    if value.trim().is_empty() {
        return Err(value_err(
            value,
            "empty (expected a JSON array or ':'-terminated device records)",
        ));
    }
    let records: Vec<&str> = value.split(':').collect();
    let Some((last, body)) = records.split_last() else {
        return Ok(Vec::new());
    };
    if !last.is_empty() {
        return Err(record_err(body.len(), None, last, "record not terminated by ':'"));
    }
    body.iter()
        .enumerate()
        .map(|(i, r)| decode_legacy_record(i, r))
        .collect()
}

fn decode_legacy_record(i: usize, record: &str) -> Result<GpuDevice> {
    let fields: Vec<&str> = record.split(',').collect();
    if fields.len() != 7 && fields.len() != 9 {
        return Err(record_err(
            i,
            None,
            record,
            "expected 7 fields UUID,count,devmem,devcore,type,numa,health or 9 with ,index,mode",
        ));
    }
    let uint = |field: &'static str, s: &str, max: u64| -> Result<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(record_err(
                i,
                Some(field),
                s,
                "expected a non-negative decimal integer",
            ));
        }
        s.parse::<u64>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| record_err(i, Some(field), s, "too large"))
    };
    let id = fields[0];
    if let Some(detail) = token_problem(id, true) {
        return Err(record_err(i, Some("id"), id, detail));
    }
    let numa_text = fields[5];
    let numa = numa_text
        .parse::<i64>()
        .ok()
        .filter(|_| numa_text.bytes().all(|c| c.is_ascii_digit() || c == b'-'))
        .and_then(numa_from_int)
        .ok_or_else(|| record_err(i, Some("numa"), numa_text, "expected -1 or a non-negative int32"))?;
    let health = match fields[6] {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
        "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
        other => return Err(record_err(i, Some("health"), other, "expected true or false")),
    };
    let (index, mode) = if fields.len() == 9 {
        let index = uint("index", fields[7], u64::from(u32::MAX))?;
        let mode = parse_mode(fields[8]).ok_or_else(|| {
            record_err(
                i,
                Some("mode"),
                fields[8],
                "unsupported mode (expected hami-core or mig)",
            )
        })?;
        (index, mode)
    } else {
        (0, DeviceMode::HamiCore)
    };
    let hami = HamiFields {
        id: id.to_owned(),
        count: uint("count", fields[1], HAMI_INT32_MAX)?
            .try_into()
            .unwrap_or(u32::MAX),
        devmem: uint("devmem", fields[2], HAMI_INT32_MAX)?,
        devcore: uint("devcore", fields[3], HAMI_INT32_MAX)?
            .try_into()
            .unwrap_or(u32::MAX),
        kind: fields[4].to_owned(),
        index: index.try_into().unwrap_or(u32::MAX),
        numa,
        mode,
        health,
    };
    Ok(hami.into_device())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn a100(uuid: &str, index: u32) -> GpuDevice {
        let mut g = GpuDevice::new(uuid, index, "NVIDIA-NVIDIA A100-SXM4-80GB", 81920);
        g.numa = Some(0);
        g.sm_count = 108;
        g
    }

    #[test]
    fn decodes_hamis_documented_example() {
        let v = r#"[{"id":"GPU-abc","index":1,"count":10,"devmem":81920,"devcore":100,
            "type":"NVIDIA-NVIDIA A100-SXM4-80GB","numa":0,"mode":"hami-core","health":true,
            "migProfiles":[{"name":"2g.20gb","memoryMB":19968,"core":29,"sliceCount":2,"placements":[{"start":0,"size":2}]}]}]"#;
        let gpus = decode_node_register(v).unwrap();
        assert_eq!(gpus.len(), 1);
        let g = &gpus[0];
        assert_eq!(g.uuid, "GPU-abc");
        assert_eq!(g.index, 1);
        assert_eq!(g.split_count, 10);
        assert_eq!(g.memory_mib, 81920);
        assert_eq!(g.schedulable_memory_mib(), 81920);
        assert_eq!(g.schedulable_cores(), 100);
        assert_eq!(g.model, "NVIDIA-NVIDIA A100-SXM4-80GB");
        assert_eq!(g.numa, Some(0));
        assert_eq!(g.mode, DeviceMode::HamiCore);
        assert!(g.healthy);
        assert_eq!(g.sm_count, 0);
        assert!(g.nvlink_peers.is_empty());
    }

    #[test]
    fn omitempty_fields_default_to_zero_and_false() {
        // As HAMi's Go encoder writes index 0, numa 0 and health false: omitted.
        let v = r#"[{"id":"GPU-0","count":10,"devmem":16384,"devcore":100,"type":"NVIDIA-Tesla T4","mode":"hami-core"}]"#;
        let g = &decode_node_register(v).unwrap()[0];
        assert_eq!((g.index, g.numa, g.healthy), (0, Some(0), false));
        let g = &decode_node_register(r#"[{"id":"GPU-0"}]"#).unwrap()[0];
        assert_eq!(
            (g.split_count, g.memory_mib, g.schedulable_cores(), g.mode),
            (0, 0, 0, DeviceMode::HamiCore)
        );
        assert_eq!(decode_node_register("[]").unwrap(), Vec::<GpuDevice>::new());
        let g = &decode_node_register(r#"[{"id":"GPU-0","numa":-1}]"#).unwrap()[0];
        assert_eq!(g.numa, None);
    }

    #[test]
    fn encodes_like_hami_plus_extension() {
        let mut g = a100("GPU-abc", 1);
        g.nvlink_peers.insert(0, 12);
        let s = encode_node_register(&[g.clone()]).unwrap();
        assert_eq!(
            s,
            r#"[{"id":"GPU-abc","index":1,"count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-NVIDIA A100-SXM4-80GB","mode":"hami-core","health":true,"x-hami-rs":{"version":1,"memoryMiB":81920,"smCount":108,"numa":0,"nvlink":{"0":12},"memoryScaling":1.0,"coreScaling":1.0}}]"#
        );
        assert_eq!(decode_node_register(&s).unwrap(), vec![g.clone()]);
        let inv = NodeInventory {
            name: "node-1".into(),
            cpu_milli: 1000,
            memory_mib: 1024,
            gpus: vec![g],
        };
        assert_eq!(encode_node_inventory(&inv).unwrap(), s);
    }

    #[test]
    fn scaled_device_round_trips_and_advertises_scaled_values() {
        let mut g = a100("GPU-1", 0);
        g.memory_scaling = 1.5;
        g.core_scaling = 2.0;
        g.numa = None;
        g.healthy = false;
        g.mode = DeviceMode::Mig;
        let s = encode_node_register(&[g.clone()]).unwrap();
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v[0]["devmem"], 122_880);
        assert_eq!(v[0]["devcore"], 200);
        assert_eq!(v[0]["mode"], "mig");
        assert!(v[0].get("numa").is_none() && v[0].get("health").is_none() && v[0].get("index").is_none());
        assert_eq!(v[0]["x-hami-rs"]["numa"], Value::Null);
        assert_eq!(decode_node_register(&s).unwrap(), vec![g]);
    }

    #[test]
    fn decodes_legacy_text() {
        let v = "GPU-0055,10,32768,100,NVIDIA-Tesla V100-PCIE-32GB,0,true:GPU-0056,10,32768,100,NVIDIA-Tesla V100-PCIE-32GB,1,false,1,mig:";
        let gpus = decode_node_register(v).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            (
                gpus[0].uuid.as_str(),
                gpus[0].index,
                gpus[0].split_count,
                gpus[0].memory_mib,
                gpus[0].numa,
                gpus[0].healthy
            ),
            ("GPU-0055", 0, 10, 32768, Some(0), true)
        );
        assert_eq!(gpus[0].model, "NVIDIA-Tesla V100-PCIE-32GB");
        assert_eq!(
            (gpus[1].index, gpus[1].mode, gpus[1].numa, gpus[1].healthy),
            (1, DeviceMode::Mig, Some(1), false)
        );
        assert_eq!(gpus[1].schedulable_cores(), 100);
    }

    #[test]
    fn malformed_values_are_errors_naming_record_and_field() {
        let cases: &[(&str, Option<usize>, Option<&str>)] = &[
            ("", None, None),
            ("   ", None, None),
            ("null", None, None),
            ("{}", None, None),
            (r#"{"id":"GPU-0"}"#, None, None),
            (r#"[{"id":"GPU-0","devmem":"abc"}]"#, Some(0), Some("devmem")),
            (
                r#"[{"id":"GPU-0"},{"id":"GPU-1","devmem":-5}]"#,
                Some(1),
                Some("devmem"),
            ),
            (r#"[{"id":"GPU-0","devmem":1.5}]"#, Some(0), Some("devmem")),
            (r#"[{"id":"GPU-0","devmem":2147483648}]"#, Some(0), Some("devmem")),
            (
                r#"[{"id":"GPU-0","count":99999999999999999999}]"#,
                Some(0),
                Some("count"),
            ),
            (r#"[{"id":"GPU-0","health":"true"}]"#, Some(0), Some("health")),
            (r#"[{"id":"GPU-0","numa":-2}]"#, Some(0), Some("numa")),
            (r#"[{"id":"GPU-0","mode":"mps"}]"#, Some(0), Some("mode")),
            (r#"[{"id":"GPU-0","type":5}]"#, Some(0), Some("type")),
            (r#"[{"index":1}]"#, Some(0), Some("id")),
            (r#"[{"id":""}]"#, Some(0), Some("id")),
            (r#"[{"id":"GPU 0"}]"#, Some(0), Some("id")),
            (r#"[{"id":"GPU-0;x"}]"#, Some(0), Some("id")),
            (r#"[{"id":"GPU-0"},{"id":"GPU-0"}]"#, Some(1), Some("id")),
            (r#"[5]"#, Some(0), None),
            (
                r#"[{"id":"GPU-0","devmem":100,"x-hami-rs":{"version":1,"memoryMiB":200,"memoryScaling":1.0,"coreScaling":0}}]"#,
                Some(0),
                Some("devmem"),
            ),
            (
                r#"[{"id":"GPU-0","devcore":100,"x-hami-rs":{"version":1,"memoryMiB":0,"memoryScaling":1.0,"coreScaling":2.0}}]"#,
                Some(0),
                Some("devcore"),
            ),
            (
                r#"[{"id":"GPU-0","numa":1,"x-hami-rs":{"version":1,"memoryMiB":0,"memoryScaling":1.0,"coreScaling":0}}]"#,
                Some(0),
                Some("numa"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"version":2}}]"#,
                Some(0),
                Some("x-hami-rs.version"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"memoryMiB":0}}]"#,
                Some(0),
                Some("x-hami-rs.version"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"version":1,"memoryScaling":1.0,"coreScaling":0}}]"#,
                Some(0),
                Some("x-hami-rs.memoryMiB"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"version":1,"memoryMiB":0,"coreScaling":0}}]"#,
                Some(0),
                Some("x-hami-rs.memoryScaling"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"version":1,"memoryMiB":0,"memoryScaling":-1,"coreScaling":0}}]"#,
                Some(0),
                Some("x-hami-rs.memoryScaling"),
            ),
            (
                r#"[{"id":"GPU-0","x-hami-rs":{"version":1,"memoryMiB":0,"memoryScaling":1,"coreScaling":0,"nvlink":{"a":1}}}]"#,
                Some(0),
                Some("x-hami-rs.nvlink"),
            ),
            (r#"[{"id":"GPU-0","x-hami-rs":[]}]"#, Some(0), Some("x-hami-rs")),
            // Legacy text.
            ("GPU-0,10,32768,100,T4,0,true", Some(0), None),
            ("GPU-0,10,32768,100,T4,0:", Some(0), None),
            ("GPU-0,10,32768,100,T4,0,true,1:", Some(0), None),
            ("GPU-0,10,abc,100,T4,0,true:", Some(0), Some("devmem")),
            (
                "GPU-0,10,32768,100,T4,0,true:GPU-1,-10,1,100,T4,0,true:",
                Some(1),
                Some("count"),
            ),
            ("GPU-0,10,4294967296,100,T4,0,true:", Some(0), Some("devmem")),
            ("GPU-0,10,32768,100,T4,x,true:", Some(0), Some("numa")),
            ("GPU-0,10,32768,100,T4,-2,true:", Some(0), Some("numa")),
            ("GPU-0,10,32768,100,T4,0,yes:", Some(0), Some("health")),
            (
                "GPU-0,10,32768,100,T4,0,true,x,hami-core:",
                Some(0),
                Some("index"),
            ),
            ("GPU-0,10,32768,100,T4,0,true,0,mps:", Some(0), Some("mode")),
            (",10,32768,100,T4,0,true:", Some(0), Some("id")),
            (" GPU-0,10,32768,100,T4,0,true:", Some(0), Some("id")),
            ("GPU-0,10,32768,100,T4,0,true::", Some(1), None),
            (
                "GPU-0,10,32768,100,T4,0,true:GPU-0,10,32768,100,T4,0,true:",
                Some(1),
                Some("id"),
            ),
        ];
        for &(v, record, field) in cases {
            let e = decode_node_register(v).unwrap_err();
            match &e {
                Error::InvalidNodeRegister {
                    record: r, field: f, ..
                } => {
                    assert_eq!((*r, *f), (record, field), "{v:?}: {e}");
                }
                Error::InvalidJson { .. } => assert!(record.is_none() && field.is_none(), "{v:?}: {e}"),
                other => panic!("{v:?}: unexpected {other:?}"),
            }
        }
        // Syntax errors are reported by the JSON parser with a position.
        let e = decode_node_register("[{").unwrap_err();
        assert_eq!(e.reason(), "invalid_json");
    }

    #[test]
    fn encode_rejects_unrepresentable_devices() {
        let mut bad = vec![];
        let mut g = a100("", 0);
        bad.push(vec![g.clone()]);
        g.uuid = "GPU 0".into();
        bad.push(vec![g.clone()]);
        g.uuid = "GPU-0:1".into();
        bad.push(vec![g.clone()]);
        g.uuid = "GPU-0".into();
        bad.push(vec![g.clone(), g.clone()]);
        let mut n = g.clone();
        n.memory_scaling = f64::NAN;
        bad.push(vec![n]);
        let mut n = g.clone();
        n.core_scaling = f64::INFINITY;
        bad.push(vec![n]);
        let mut n = g.clone();
        n.memory_scaling = -1.0;
        bad.push(vec![n]);
        let mut n = g.clone();
        n.memory_mib = 1 << 40;
        bad.push(vec![n]);
        let mut n = g.clone();
        n.split_count = u32::MAX;
        bad.push(vec![n]);
        let mut n = g.clone();
        n.numa = Some(u32::MAX);
        bad.push(vec![n]);
        for gpus in bad {
            assert_eq!(
                encode_node_register(&gpus).unwrap_err().reason(),
                "unencodable",
                "{gpus:?}"
            );
        }
    }

    #[test]
    fn registered_type_name_adds_prefix_once() {
        assert_eq!(
            registered_type_name("NVIDIA A100-SXM4-80GB"),
            "NVIDIA-NVIDIA A100-SXM4-80GB"
        );
        assert_eq!(registered_type_name("Tesla T4"), "NVIDIA-Tesla T4");
        assert_eq!(registered_type_name("NVIDIA-Tesla T4"), "NVIDIA-Tesla T4");
    }

    fn scaling() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(1.0),
            Just(0.0),
            0.0f64..8.0,
            (1u32..800).prop_map(|k| f64::from(k) / 100.0)
        ]
    }

    fn gpu_strategy() -> impl Strategy<Value = GpuDevice> {
        (
            (
                any::<u32>(),
                "\\PC{0,24}",
                0u64..=200_000,
                any::<u32>(),
                prop::option::of(0u32..=1024),
            ),
            (
                prop::collection::btree_map(0u32..64, 0u32..19, 0..4),
                any::<bool>(),
                0u32..=1000,
                scaling(),
                scaling(),
            ),
            prop_oneof![Just(DeviceMode::HamiCore), Just(DeviceMode::Mig)],
        )
            .prop_map(
                |(
                    (index, model, memory_mib, sm_count, numa),
                    (nvlink_peers, healthy, split_count, ms, cs),
                    mode,
                )| {
                    GpuDevice {
                        uuid: String::new(),
                        index,
                        model,
                        memory_mib,
                        sm_count,
                        numa,
                        nvlink_peers,
                        healthy,
                        split_count,
                        memory_scaling: ms,
                        core_scaling: cs,
                        mode,
                    }
                },
            )
    }

    fn gpus_strategy() -> impl Strategy<Value = Vec<GpuDevice>> {
        prop::collection::vec((gpu_strategy(), "[0-9a-f]{8}"), 0..6).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (mut g, suffix))| {
                    g.uuid = format!("GPU-{i}-{suffix}");
                    g
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn round_trip(gpus in gpus_strategy()) {
            let s = encode_node_register(&gpus).unwrap();
            prop_assert_eq!(decode_node_register(&s).unwrap(), gpus);
        }

        /// A plain HAMi record (no extension) decodes to a device advertising exactly HAMi's numbers,
        /// and that device round-trips through our encoding.
        #[test]
        fn hami_plain_json_keeps_advertised_values(
            count in 0u64..=HAMI_INT32_MAX, devmem in 0u64..=HAMI_INT32_MAX, devcore in 0u64..=HAMI_INT32_MAX,
            index in any::<u32>(), numa in 0i64..=64, health in any::<bool>(),
        ) {
            let v = format!(
                r#"[{{"id":"GPU-x","index":{index},"count":{count},"devmem":{devmem},"devcore":{devcore},"type":"NVIDIA-T4","numa":{numa},"mode":"hami-core","health":{health},"devicevendor":"NVIDIA"}}]"#
            );
            let gpus = decode_node_register(&v).unwrap();
            let g = &gpus[0];
            prop_assert_eq!(u64::from(g.split_count), count);
            prop_assert_eq!(g.schedulable_memory_mib(), devmem);
            prop_assert_eq!(u64::from(g.schedulable_cores()), devcore);
            prop_assert_eq!(g.index, index);
            prop_assert_eq!(g.numa, u32::try_from(numa).ok());
            prop_assert_eq!(g.healthy, health);
            prop_assert_eq!(decode_node_register(&encode_node_register(&gpus).unwrap()).unwrap(), gpus.clone());
        }

        #[test]
        fn legacy_records_decode(count in 0u64..=1000, devmem in 0u64..=HAMI_INT32_MAX, devcore in 0u64..=1000, numa in -1i64..=8) {
            let v = format!("GPU-a,{count},{devmem},{devcore},NVIDIA-T4,{numa},true:GPU-b,{count},{devmem},{devcore},NVIDIA-T4,{numa},false,3,hami-core:");
            let gpus = decode_node_register(&v).unwrap();
            prop_assert_eq!(gpus.len(), 2);
            prop_assert_eq!(gpus[1].index, 3);
            prop_assert_eq!(gpus[0].schedulable_memory_mib(), devmem);
            prop_assert_eq!(u64::from(gpus[0].schedulable_cores()), devcore);
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,80}") {
            let _ = decode_node_register(&s);
        }

        #[test]
        fn decode_never_panics_on_json_like(s in r#"\[\{("(id|devmem|numa|x-hami-rs|version|nvlink)":(-?[0-9]{1,12}|"[a-z0-9]{0,4}"|\{\}|null|true)[,]?){0,6}\}\]"#) {
            let _ = decode_node_register(&s);
        }
    }
}
