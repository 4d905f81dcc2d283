//! Reading the Alibaba `cluster-trace-gpu-v2023` CSVs (schema in `reference/alibaba-gpu-trace.md` §1)
//! and turning rows into hami's device model and pod requests.
//!
//! Every row is validated; a bad row is an error naming the file, the line and the field. Mapping:
//! - a node row becomes a [`NodeInventory`] with `gpu` GPUs of `model`, host CPU and memory as given;
//!   GPU memory comes from [`GPU_MODELS`] (our assumption where Alibaba does not disclose it; requests
//!   are percentages, so the value does not change placements), split count [`SIM_SPLIT_COUNT`];
//! - a pod row becomes a one-container [`PodRequest`] asking `num_gpu` GPUs with `gpu_milli / 10`
//!   percent of SMs and the same percent of memory (the trace's single GPU share maps onto both of
//!   HAMi's dimensions); `gpu_spec` (`A|B`) becomes a GPU-type selector.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use hami_api::{
    ContainerKind, ContainerRequest, DeviceRequest, DeviceSelector, GpuDevice, MemoryRequest, NodeInventory,
    PodRequest,
};
use hami_policy::{Cluster, NodeState};
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::error::{Error, Result};

/// GPU models of the trace and the device memory (MiB) the simulator gives them. V100M16/V100M32, T4,
/// P100 and A10 are public specs; G1/G2/G3 are undisclosed Alibaba codes, given 32 GiB by assumption.
pub const GPU_MODELS: &[(&str, u64)] = &[
    ("G1", 32_768),
    ("G2", 32_768),
    ("G3", 32_768),
    ("T4", 16_384),
    ("P100", 16_384),
    ("V100M16", 16_384),
    ("V100M32", 32_768),
    ("A10", 24_576),
];

/// Slots per GPU in the simulator: high enough never to bind (the trace's smallest share is 5 %), so
/// placements depend on compute and memory only, as in the paper.
pub const SIM_SPLIT_COUNT: u32 = 100;

/// Upper bounds that catch absurd values (a typo, a unit mix-up) before they distort a run.
const MAX_CPU_MILLI: u64 = 10_000_000;
const MAX_MEMORY_MIB: u64 = 1 << 34;
const MAX_GPUS_PER_NODE: u32 = 64;

/// A trace's node list.
#[derive(Debug, Clone)]
pub struct NodeList {
    /// Nodes with at least one GPU, in file order.
    pub nodes: Vec<Arc<NodeInventory>>,
}

impl NodeList {
    /// Every node idle, in file order.
    #[must_use]
    pub fn idle_states(&self) -> Vec<NodeState> {
        self.nodes.iter().map(|n| NodeState::new(Arc::clone(n))).collect()
    }

    /// An idle cluster whose node order is shuffled with `rng`: ties between equally scored nodes go to
    /// the first node in this order, so the order is part of a run's seed (as in the FGD artifact).
    pub fn shuffled_cluster(&self, rng: &mut impl rand::Rng) -> Cluster {
        let mut nodes = self.idle_states();
        nodes.shuffle(rng);
        Cluster::new(nodes)
    }

    /// Total GPUs.
    #[must_use]
    pub fn gpu_count(&self) -> u64 {
        self.nodes.iter().map(|n| n.gpus.len() as u64).sum()
    }
}

/// One pod row.
#[derive(Debug, Clone, PartialEq)]
pub struct TracePod {
    /// `name` column.
    pub name: String,
    /// Request as hami sees it.
    pub request: PodRequest,
    /// GPU demand in milli-GPU (`num_gpu × gpu_milli`), the unit of the arrived/allocated curves.
    pub gpu_milli_total: u64,
    /// Key shared by all rows with identical requests (used to cache policy scores).
    pub shape_key: u64,
}

#[derive(Debug, Deserialize)]
struct NodeRow {
    sn: String,
    cpu_milli: i64,
    memory_mib: i64,
    gpu: i64,
    #[serde(default)]
    model: String,
}

#[derive(Debug, Deserialize)]
struct PodRow {
    name: String,
    cpu_milli: i64,
    memory_mib: i64,
    num_gpu: i64,
    gpu_milli: i64,
    #[serde(default)]
    gpu_spec: String,
}

fn memory_of(model: &str) -> Option<u64> {
    GPU_MODELS.iter().find(|(m, _)| *m == model).map(|&(_, mib)| mib)
}

fn known_models() -> String {
    GPU_MODELS.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")
}

fn in_range(file: &str, line: u64, field: &'static str, v: i64, max: u64) -> Result<u64> {
    u64::try_from(v)
        .ok()
        .filter(|&x| x <= max)
        .ok_or_else(|| Error::Row {
            file: file.to_owned(),
            line,
            field,
            reason: format!("{v} is outside 0..={max}"),
        })
}

/// Reads a node list (`sn,cpu_milli,memory_mib,gpu,model`). Rows with no GPU are skipped (the paper
/// simulates the GPU nodes only).
///
/// # Errors
/// [`Error::Csv`] for unreadable CSV, [`Error::Row`] for a bad value (naming file, line and field).
pub fn read_nodes(name: &str, text: &str) -> Result<NodeList> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut nodes = Vec::new();
    let mut seen = BTreeSet::new();
    let headers = rdr
        .headers()
        .map_err(|source| Error::csv(name, &source, None))?
        .clone();
    for rec in rdr.records() {
        let rec = rec.map_err(|source| Error::csv(name, &source, Some(&headers)))?;
        let line = rec.position().map_or(0, csv::Position::line);
        let row: NodeRow = rec
            .deserialize(Some(&headers))
            .map_err(|source| Error::csv(name, &source, Some(&headers)))?;
        let gpus = in_range(name, line, "gpu", row.gpu, u64::from(MAX_GPUS_PER_NODE))?;
        let cpu = in_range(name, line, "cpu_milli", row.cpu_milli, MAX_CPU_MILLI)?;
        let mem = in_range(name, line, "memory_mib", row.memory_mib, MAX_MEMORY_MIB)?;
        if !seen.insert(row.sn.clone()) {
            return Err(Error::Row {
                file: name.to_owned(),
                line,
                field: "sn",
                reason: format!("duplicate node {}", row.sn),
            });
        }
        if gpus == 0 {
            continue;
        }
        let gpu_mem = memory_of(&row.model).ok_or_else(|| Error::Row {
            file: name.to_owned(),
            line,
            field: "model",
            reason: format!("unknown GPU model {:?} (known: {})", row.model, known_models()),
        })?;
        let gpus = (0..gpus)
            .map(|i| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut g = GpuDevice::new(format!("{}-gpu{i}", row.sn), index, row.model.clone(), gpu_mem);
                g.split_count = SIM_SPLIT_COUNT;
                g
            })
            .collect();
        nodes.push(Arc::new(NodeInventory {
            name: row.sn,
            cpu_milli: cpu,
            memory_mib: mem,
            gpus,
        }));
    }
    if nodes.is_empty() {
        return Err(Error::Empty {
            file: name.to_owned(),
            what: "GPU nodes",
        });
    }
    Ok(NodeList { nodes })
}

/// Reads a pod list (`name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`).
///
/// # Errors
/// [`Error::Csv`] or [`Error::Row`] as for [`read_nodes`]; also for a `gpu_milli` that is not a
/// multiple of 10 (HAMi's compute unit is a whole percent), out of 1..=1000 for GPU pods, not 1000 for
/// multi-GPU pods, or a `gpu_spec` naming an unknown model.
pub fn read_pods(name: &str, text: &str) -> Result<Vec<TracePod>> {
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    let mut pods = Vec::new();
    let mut shapes: std::collections::HashMap<(u64, u64, u64, u64, String), u64> =
        std::collections::HashMap::new();
    let headers = rdr
        .headers()
        .map_err(|source| Error::csv(name, &source, None))?
        .clone();
    for rec in rdr.records() {
        let rec = rec.map_err(|source| Error::csv(name, &source, Some(&headers)))?;
        let line = rec.position().map_or(0, csv::Position::line);
        let row: PodRow = rec
            .deserialize(Some(&headers))
            .map_err(|source| Error::csv(name, &source, Some(&headers)))?;
        let bad = |field: &'static str, reason: String| Error::Row {
            file: name.to_owned(),
            line,
            field,
            reason,
        };
        let cpu = in_range(name, line, "cpu_milli", row.cpu_milli, MAX_CPU_MILLI)?;
        let mem = in_range(name, line, "memory_mib", row.memory_mib, MAX_MEMORY_MIB)?;
        let num_gpu = in_range(name, line, "num_gpu", row.num_gpu, u64::from(MAX_GPUS_PER_NODE))?;
        let milli = in_range(name, line, "gpu_milli", row.gpu_milli, 1000)?;
        let gpu = if num_gpu == 0 {
            if milli != 0 {
                return Err(bad("gpu_milli", format!("{milli} on a pod with num_gpu 0")));
            }
            None
        } else {
            if milli == 0 || milli % 10 != 0 {
                return Err(bad(
                    "gpu_milli",
                    format!("{milli} is not a multiple of 10 in 10..=1000"),
                ));
            }
            if num_gpu > 1 && milli != 1000 {
                return Err(bad(
                    "gpu_milli",
                    format!("{milli} on a {num_gpu}-GPU pod; multi-GPU pods take whole GPUs"),
                ));
            }
            let pct = u32::try_from(milli / 10).unwrap_or(100);
            let mut req = DeviceRequest::new(
                u32::try_from(num_gpu).unwrap_or(u32::MAX),
                MemoryRequest::Percent(pct),
                pct,
            );
            req.selector = spec_selector(&row.gpu_spec).map_err(|reason| bad("gpu_spec", reason))?;
            Some(req)
        };
        let spec = gpu
            .as_ref()
            .map(|g| g.selector.use_types.join("|"))
            .unwrap_or_default();
        let next = shapes.len() as u64;
        let shape_key = *shapes.entry((cpu, mem, num_gpu, milli, spec)).or_insert(next);
        let request = PodRequest {
            namespace: "trace".to_owned(),
            name: row.name.clone(),
            uid: row.name.clone(),
            containers: vec![ContainerRequest {
                name: "main".to_owned(),
                kind: ContainerKind::App,
                cpu_milli: cpu,
                memory_mib: mem,
                gpu,
            }],
            node_policy: None,
            gpu_policy: None,
        };
        pods.push(TracePod {
            name: row.name,
            request,
            gpu_milli_total: num_gpu * milli,
            shape_key,
        });
    }
    if pods.is_empty() {
        return Err(Error::Empty {
            file: name.to_owned(),
            what: "pods",
        });
    }
    Ok(pods)
}

/// `A|B|B` → a selector allowing models A and B (duplicates dropped); empty → any model.
fn spec_selector(spec: &str) -> std::result::Result<DeviceSelector, String> {
    let mut types: Vec<String> = Vec::new();
    for m in spec.split('|').map(str::trim).filter(|m| !m.is_empty()) {
        if memory_of(m).is_none() {
            return Err(format!("unknown GPU model {m:?} (known: {})", known_models()));
        }
        if !types.iter().any(|t| t == m) {
            types.push(m.to_owned());
        }
    }
    Ok(DeviceSelector {
        use_types: types,
        ..DeviceSelector::default()
    })
}

/// Reads a file for [`read_nodes`] / [`read_pods`].
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\nn0,96000,393216,8,G2\nn1,8000,30000,0,\n";

    #[test]
    fn nodes_map_to_inventory_and_skip_cpu_only() {
        let list = read_nodes("nodes.csv", NODES).unwrap();
        assert_eq!(list.nodes.len(), 1);
        assert_eq!(list.gpu_count(), 8);
        assert_eq!(list.nodes[0].gpus[3].model, "G2");
        assert_eq!(list.nodes[0].cpu_milli, 96000);
    }

    #[test]
    fn pods_map_milli_to_percent_of_cores_and_memory() {
        let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\np0,6000,12288,1,460,\np1,4000,100,2,1000,V100M16|V100M32|V100M32\np2,1000,10,0,0,\n";
        let pods = read_pods("pods.csv", text).unwrap();
        let g = pods[0].request.containers[0].gpu.clone().unwrap();
        assert_eq!((g.count, g.cores, g.memory), (1, 46, MemoryRequest::Percent(46)));
        assert_eq!(pods[0].gpu_milli_total, 460);
        let g = pods[1].request.containers[0].gpu.clone().unwrap();
        assert_eq!(
            g.selector.use_types,
            vec!["V100M16".to_owned(), "V100M32".to_owned()]
        );
        assert_eq!(pods[1].gpu_milli_total, 2000);
        assert!(pods[2].request.containers[0].gpu.is_none());
        assert_ne!(pods[0].shape_key, pods[1].shape_key);
    }

    fn err_of(text: &str) -> String {
        read_pods("bad.csv", text).unwrap_err().to_string()
    }

    #[test]
    fn bad_rows_name_file_line_and_field() {
        let h = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n";
        let e = err_of(&format!("{h}p0,1000,10,1,500,\np1,-5,10,1,500,\n"));
        assert!(
            e.contains("bad.csv") && e.contains("line 3") && e.contains("cpu_milli"),
            "{e}"
        );
        let e = err_of(&format!("{h}p0,1000,10,1,455,\n"));
        assert!(e.contains("gpu_milli") && e.contains("multiple of 10"), "{e}");
        let e = err_of(&format!("{h}p0,1000,10,1,5000,\n"));
        assert!(e.contains("gpu_milli"), "{e}");
        let e = err_of(&format!("{h}p0,1000,10,1,500,H100\n"));
        assert!(e.contains("unknown GPU model") && e.contains("H100"), "{e}");
        let e = err_of(&format!("{h}p0,abc,10,1,500,\n"));
        assert!(e.contains("bad.csv, line 2") && e.contains("cpu_milli"), "{e}");
        let e = err_of(&format!("{h}p0,1000,10\n"));
        assert!(e.contains("bad.csv, line 2") && e.contains("3 fields"), "{e}");
        let e = err_of(&format!("{h}p0,99999999999999999999999,10,1,500,\n"));
        assert!(e.contains("bad.csv") && e.contains("line 2"), "{e}");
        let e = err_of(h);
        assert!(e.contains("no pods"), "{e}");
        let e = read_nodes("n.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,H100\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("n.csv") && e.contains("line 2") && e.contains("unknown GPU model"),
            "{e}"
        );
        let e = read_nodes(
            "n.csv",
            "sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,G2\nn0,1,1,2,G2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }
}
