//! The scheduler binary's configuration (`hami-scheduler serve --config FILE`), JSON (as the chart
//! renders `scheduler.extender.config` with `toPrettyJson` into ConfigMap `<fullname>-scheduler-extender`,
//! key `config.json`) or YAML (a file ending in `.yaml`/`.yml`). Unknown fields are errors, so a typo in
//! values.yaml fails loudly. Every field has a default, so `{}` is a valid file.
//!
//! The chart's block is accepted as rendered: `nodeSchedulerPolicy`, `gpuSchedulerPolicy`,
//! `deviceScoringWeights`, `nodeLockTimeout`. Resource names and request defaults normally come from
//! the chart's device config (`--device-config`, HAMi's `nvidia:` keys), which then wins over
//! `resourceNames` / `requestDefaults` here.

use std::path::{Path, PathBuf};

use hami_api::{
    DeviceScoringWeights, GpuPolicy, NodePolicy, ResourceNames,
    annotations::{parse_gpu_policy, parse_node_policy},
    k8s::RequestDefaults,
};
use hami_policy::DefaultModel;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    webhook::WebhookConfig,
};

/// Default address of the extender's HTTP(S) server (filter, prioritize, bind, health, metrics).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";

/// Default heartbeat age after which a node is unschedulable, seconds (three missed 30 s heartbeats).
pub const DEFAULT_STALE_AFTER_SECS: u64 = 90;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SchedulerConfig {
    /// Extender HTTP(S) address (`--listen` overrides).
    pub listen: String,
    /// Separate metrics-only HTTP address (`--metrics-listen` overrides); `None`: metrics only on the
    /// extender address (`GET /metrics`).
    pub metrics_listen: Option<String>,
    /// Which placement policy: `hami` (HAMi's node and GPU policies below), `usage-aware` (packs on
    /// measured usage with [`Self::usage_margin_percent`], `hami_policy::usage`), `fgd` (the FGD paper's
    /// fragmentation gradient descent) or `fgd-pack` (ours: FGD whose ties go to nodes in use), both over
    /// the observed workload ([`Self::workload_model`]).
    pub policy: String,
    /// HAMi node policy, `binpack` or `spread` (per pod: `hami.io/node-scheduler-policy`).
    pub node_scheduler_policy: String,
    /// HAMi GPU policy, `binpack`, `spread` or `topology-aware` (per pod: `hami.io/gpu-scheduler-policy`).
    pub gpu_scheduler_policy: String,
    /// HAMi device score weights `slot=<int>,core=<int>,memory=<int>` (per pod:
    /// `hami.io/device-scoring-weights`).
    pub device_scoring_weights: String,
    /// How long a pod between bind and the device plugin's Allocate (`hami.io/bind-phase: allocating`)
    /// keeps conflicting decisions off its node (the `PendingAllocationConflict` rule), as a Go duration
    /// (`5m`, `90s`, `1m30s`). HAMi's node-lock timeout plays this part there; there is no node lock here.
    pub node_lock_timeout: String,
    /// A node whose usage heartbeat (`hami.io/node-nvidia-usage`) is older than this is unschedulable,
    /// seconds.
    pub stale_after_secs: u64,
    /// Whether a node without any usage heartbeat is unschedulable (true: every hami agent publishes one;
    /// false: accept nodes registered by a HAMi device plugin, which publishes none).
    pub require_heartbeat: bool,
    /// File holding the HMAC key that signs decisions (`hami.io/vgpu-decision-signature`), the Secret
    /// shared with the agents. Required by `serve`.
    pub decision_key_file: Option<PathBuf>,
    /// Usage-aware policy: percent of each GPU's physical memory kept free of measured use.
    pub usage_margin_percent: u32,
    /// Resource names (HAMi device-config keys); the device config file wins when given.
    pub resource_names: ResourceNames,
    /// Request defaults; the device config file wins when given.
    pub request_defaults: RequestDefaultsConfig,
    /// Mutating webhook settings. Its `quotas` are also enforced by the extender at filter and bind
    /// (`QuotaExceeded`), whether or not the webhook is enabled.
    pub webhook: WebhookConfig,
    /// How `fgd`/`fgd-pack` learn the workload (ignored by the other policies).
    pub workload_model: WorkloadModelConfig,
    /// On SIGTERM/SIGINT: new binds are refused at once, binds in flight get this long to finish, then
    /// the ones that have not sent their Binding yet roll back (seconds; keep it below the pod's
    /// `terminationGracePeriodSeconds`).
    pub shutdown_grace_secs: u64,
}

/// The live workload model of the fragmentation-aware policies (`hami_policy::workload`): the GPU
/// shapes of the pods the extender holds plus a decayed history of the pods it was asked to place,
/// rebuilt every `refreshSecs`; until their weight reaches `minPods`, the `default` model is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadModelConfig {
    /// Seconds between rebuilds (FGD scores every node against every shape, so the model is not
    /// rebuilt per request).
    pub refresh_secs: u64,
    /// Weight (held pods count 1, history decays) needed before the observed model replaces the
    /// default.
    pub min_pods: u32,
    /// Observations after which a history entry counts half.
    pub history_half_life: u32,
    /// Most shapes kept in the history.
    pub max_shapes: u32,
    /// Most pod UIDs remembered (a pod filtered again is observed once while remembered).
    pub remembered_pods: u32,
    /// Fraction of the weight the model's most popular shapes must cover (the FGD paper: 0.95).
    pub coverage: f64,
    /// Model until enough was seen: `alibaba-default` (the GPU shapes of the embedded Alibaba trace)
    /// or `uniform` (one GPU at 10 %, 20 %, …, 100 %).
    pub default: String,
}

impl Default for WorkloadModelConfig {
    fn default() -> Self {
        Self {
            refresh_secs: 30,
            min_pods: 20,
            history_half_life: 200,
            max_shapes: 32,
            remembered_pods: 10_000,
            coverage: hami_policy::workload::DEFAULT_COVERAGE,
            default: "alibaba-default".to_owned(),
        }
    }
}

impl WorkloadModelConfig {
    /// The default model.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for an unknown name.
    pub fn default_model(&self) -> Result<DefaultModel> {
        match self.default.as_str() {
            "alibaba-default" => Ok(DefaultModel::AlibabaDefault),
            "uniform" => Ok(DefaultModel::Uniform),
            other => Err(Error::ConfigValue {
                field: "workloadModel.default",
                message: format!("unknown model {other:?}; known: alibaba-default, uniform"),
            }),
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        self.default_model()?;
        let positive = |field, v: u64| {
            if v == 0 {
                Err(Error::ConfigValue {
                    field,
                    message: "must be above 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("workloadModel.refreshSecs", self.refresh_secs)?;
        positive("workloadModel.historyHalfLife", u64::from(self.history_half_life))?;
        positive("workloadModel.maxShapes", u64::from(self.max_shapes))?;
        positive("workloadModel.rememberedPods", u64::from(self.remembered_pods))?;
        if !(self.coverage > 0.0 && self.coverage <= 1.0) {
            return Err(Error::ConfigValue {
                field: "workloadModel.coverage",
                message: format!("{} is not in (0, 1]", self.coverage),
            });
        }
        Ok(())
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            metrics_listen: None,
            policy: "hami".to_owned(),
            node_scheduler_policy: "binpack".to_owned(),
            gpu_scheduler_policy: "spread".to_owned(),
            device_scoring_weights: "slot=1,core=1,memory=1".to_owned(),
            node_lock_timeout: "5m".to_owned(),
            stale_after_secs: DEFAULT_STALE_AFTER_SECS,
            require_heartbeat: true,
            decision_key_file: None,
            usage_margin_percent: hami_policy::usage::DEFAULT_MARGIN_PERCENT,
            resource_names: ResourceNames::default(),
            request_defaults: RequestDefaultsConfig::default(),
            webhook: WebhookConfig::default(),
            workload_model: WorkloadModelConfig::default(),
            shutdown_grace_secs: 20,
        }
    }
}

/// [`RequestDefaults`] in configuration form (HAMi's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestDefaultsConfig {
    /// GPUs for a container that asks only for memory or cores (HAMi `defaultGPUNum`, 1).
    #[serde(rename = "defaultGPUNum")]
    pub default_gpu_num: u32,
    /// MiB per GPU when no memory is asked (HAMi `defaultMemory`; 0 = the whole GPU).
    pub default_memory: u64,
    /// Percent of SMs when no cores are asked (HAMi `defaultCores`, 0).
    pub default_cores: u32,
    /// A whole-GPU request without cores gets the GPU exclusively (HAMi since v2.7).
    pub exclusive_when_whole: bool,
}

impl Default for RequestDefaultsConfig {
    fn default() -> Self {
        Self::from(RequestDefaults::default())
    }
}

impl From<RequestDefaults> for RequestDefaultsConfig {
    fn from(d: RequestDefaults) -> Self {
        Self {
            default_gpu_num: d.gpu_count,
            default_memory: d.memory_mib,
            default_cores: d.cores,
            exclusive_when_whole: d.exclusive_when_whole,
        }
    }
}

impl From<RequestDefaultsConfig> for RequestDefaults {
    fn from(c: RequestDefaultsConfig) -> Self {
        Self {
            gpu_count: c.default_gpu_num,
            memory_mib: c.default_memory,
            cores: c.default_cores,
            exclusive_when_whole: c.exclusive_when_whole,
        }
    }
}

/// The placement policy chosen by [`SchedulerConfig`], validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChoice {
    /// HAMi's node and GPU policies.
    Hami {
        /// Node level.
        node: NodePolicy,
        /// GPU level.
        gpu: GpuPolicy,
    },
    /// The usage-aware policy with this margin (percent of physical memory).
    UsageAware {
        /// Margin, percent.
        margin_percent: u32,
    },
    /// FGD over the observed workload (`fgd`), or with ties to nodes in use (`fgd-pack`).
    Fgd {
        /// `fgd-pack`.
        consolidate: bool,
    },
}

impl SchedulerConfig {
    /// Reads a config file: YAML when the name ends in `.yaml`/`.yml`, JSON otherwise.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable file, invalid syntax or an unknown field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let yaml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let parsed = if yaml {
            serde_saphyr::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        let cfg: Self = parsed.map_err(|message| Error::Config {
            path: path.to_owned(),
            message,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value that has a syntax of its own.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        self.policy_choice()?;
        self.scoring_weights()?;
        self.pending_timeout_secs()?;
        self.workload_model.validate()?;
        if self.usage_margin_percent > 100 {
            return Err(Error::ConfigValue {
                field: "usageMarginPercent",
                message: format!("{} is above 100", self.usage_margin_percent),
            });
        }
        if self.stale_after_secs == 0 {
            return Err(Error::ConfigValue {
                field: "staleAfterSecs",
                message: "must be above 0".into(),
            });
        }
        if self.request_defaults.default_gpu_num == 0 {
            return Err(Error::ConfigValue {
                field: "requestDefaults.defaultGPUNum",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The policy.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for an unknown policy name.
    pub fn policy_choice(&self) -> Result<PolicyChoice> {
        match self.policy.as_str() {
            "hami" => Ok(PolicyChoice::Hami {
                node: parse_node_policy(&self.node_scheduler_policy).map_err(|e| Error::ConfigValue {
                    field: "nodeSchedulerPolicy",
                    message: e.to_string(),
                })?,
                gpu: parse_gpu_policy(&self.gpu_scheduler_policy).map_err(|e| Error::ConfigValue {
                    field: "gpuSchedulerPolicy",
                    message: e.to_string(),
                })?,
            }),
            "usage-aware" => Ok(PolicyChoice::UsageAware {
                margin_percent: self.usage_margin_percent,
            }),
            "fgd" => Ok(PolicyChoice::Fgd { consolidate: false }),
            "fgd-pack" => Ok(PolicyChoice::Fgd { consolidate: true }),
            other => Err(Error::ConfigValue {
                field: "policy",
                message: format!("unknown policy {other:?}; known: hami, usage-aware, fgd, fgd-pack"),
            }),
        }
    }

    /// The device scoring weights.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for a malformed value.
    pub fn scoring_weights(&self) -> Result<DeviceScoringWeights> {
        DeviceScoringWeights::parse(&self.device_scoring_weights).map_err(|e| Error::ConfigValue {
            field: "deviceScoringWeights",
            message: e.to_string(),
        })
    }

    /// [`Self::node_lock_timeout`] in seconds.
    ///
    /// # Errors
    /// [`Error::ConfigValue`] for a malformed duration.
    pub fn pending_timeout_secs(&self) -> Result<u64> {
        parse_duration_secs(&self.node_lock_timeout).ok_or_else(|| Error::ConfigValue {
            field: "nodeLockTimeout",
            message: format!(
                "{:?} is not a duration like 30s, 5m, 1h or 1m30s",
                self.node_lock_timeout
            ),
        })
    }
}

/// HAMi's device config (`--device-config`, the chart's `devices` values as JSON): the `nvidia` section's
/// resource names and request defaults. Other keys (`deviceSplitCount`, `nodeconfig`, …) belong to the
/// device plugin and are ignored here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Resource names.
    pub names: ResourceNames,
    /// Request defaults.
    pub defaults: RequestDefaults,
}

/// The keys of the `nvidia` section this crate reads; the rest are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NvidiaSection {
    #[serde(flatten)]
    names: ResourceNames,
    #[serde(rename = "defaultGPUNum", default)]
    default_gpu_num: Option<u32>,
    #[serde(default)]
    default_memory: Option<u64>,
    #[serde(default)]
    default_cores: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct DeviceConfigFile {
    nvidia: NvidiaSection,
}

impl DeviceConfig {
    /// Parses the device config JSON text (`{"nvidia": {...}, ...}`).
    ///
    /// # Errors
    /// [`Error::Config`] (with `path`) for invalid JSON, a missing `nvidia` section, or
    /// `defaultGPUNum: 0`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.to_owned(),
            message,
        };
        let file: DeviceConfigFile = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let n = file.nvidia;
        let base = RequestDefaults::default();
        let defaults = RequestDefaults {
            gpu_count: n.default_gpu_num.unwrap_or(base.gpu_count),
            memory_mib: n.default_memory.unwrap_or(base.memory_mib),
            cores: n.default_cores.unwrap_or(base.cores),
            exclusive_when_whole: base.exclusive_when_whole,
        };
        if defaults.gpu_count == 0 {
            return Err(err("nvidia.defaultGPUNum must be at least 1".into()));
        }
        Ok(Self {
            names: n.names,
            defaults,
        })
    }

    /// Reads and parses the file.
    ///
    /// # Errors
    /// As [`Self::parse`], or [`Error::Config`] for an unreadable file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }
}

/// Seconds in a Go-style duration made of `<digits><unit>` parts, units `h`, `m`, `s` (`5m`, `1m30s`,
/// `90s`); `None` for anything else (empty, fractions, other units, overflow).
#[must_use]
pub fn parse_duration_secs(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut digits = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
        any = true;
    }
    (any && digits.is_empty()).then_some(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    /// The block `charts/hami/values.yaml` renders (`scheduler.extender.config`) is accepted as is.
    #[test]
    fn accepts_the_charts_block() {
        let chart = r#"{
          "deviceScoringWeights": "slot=1,core=1,memory=1",
          "gpuSchedulerPolicy": "spread",
          "nodeLockTimeout": "5m",
          "nodeSchedulerPolicy": "binpack"
        }"#;
        let cfg: SchedulerConfig = serde_json::from_str(chart).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.policy_choice().unwrap(),
            PolicyChoice::Hami {
                node: NodePolicy::Binpack,
                gpu: GpuPolicy::Spread
            }
        );
        assert_eq!(cfg.pending_timeout_secs().unwrap(), 300);
        assert_eq!(cfg.stale_after_secs, 90);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        assert!(serde_json::from_str::<SchedulerConfig>(r#"{"nodeSchedulerPolicyy":"binpack"}"#).is_err());
        for (json, field) in [
            (r#"{"policy":"fastest"}"#, "policy"),
            (r#"{"nodeSchedulerPolicy":"pack"}"#, "nodeSchedulerPolicy"),
            (r#"{"deviceScoringWeights":"slot=1"}"#, "deviceScoringWeights"),
            (r#"{"nodeLockTimeout":"5 minutes"}"#, "nodeLockTimeout"),
            (r#"{"usageMarginPercent":101}"#, "usageMarginPercent"),
            (r#"{"workloadModel":{"default":"zipf"}}"#, "workloadModel.default"),
            (r#"{"workloadModel":{"coverage":0}}"#, "workloadModel.coverage"),
            (
                r#"{"workloadModel":{"refreshSecs":0}}"#,
                "workloadModel.refreshSecs",
            ),
        ] {
            let cfg: SchedulerConfig = serde_json::from_str(json).unwrap();
            match cfg.validate() {
                Err(Error::ConfigValue { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    /// C22: a misspelled or wrongly cased policy stops the scheduler with the valid values named; a
    /// padded valid one is read trimmed.
    #[test]
    fn c22_unknown_configured_policies_are_errors_naming_the_valid_values() {
        for (json, field, valid) in [
            (
                r#"{"nodeSchedulerPolicy":"Spread"}"#,
                "nodeSchedulerPolicy",
                "\"spread\"",
            ),
            (
                r#"{"nodeSchedulerPolicy":"spraed"}"#,
                "nodeSchedulerPolicy",
                "\"spread\"",
            ),
            (
                r#"{"gpuSchedulerPolicy":"binpak"}"#,
                "gpuSchedulerPolicy",
                "\"binpack\"",
            ),
        ] {
            let cfg: SchedulerConfig = serde_json::from_str(json).unwrap();
            match cfg.validate() {
                Err(e @ Error::ConfigValue { field: f, .. }) => {
                    assert_eq!(f, field, "{json}");
                    assert!(e.to_string().contains(valid), "{json}: {e}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
        let cfg: SchedulerConfig =
            serde_json::from_str(r#"{"nodeSchedulerPolicy":" spread ","gpuSchedulerPolicy":"binpack "}"#)
                .unwrap();
        assert_eq!(
            cfg.policy_choice().unwrap(),
            PolicyChoice::Hami {
                node: NodePolicy::Spread,
                gpu: GpuPolicy::Binpack
            }
        );
    }

    /// `fgd` and `fgd-pack` with a workload model block.
    #[test]
    fn fragmentation_aware_policies() {
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"policy":"fgd-pack","workloadModel":{"refreshSecs":5,"default":"uniform","minPods":3}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.policy_choice().unwrap(),
            PolicyChoice::Fgd { consolidate: true }
        );
        assert_eq!(cfg.workload_model.default_model().unwrap(), DefaultModel::Uniform);
        assert_eq!(cfg.workload_model.history_half_life, 200);
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"policy":"fgd"}"#).unwrap();
        assert_eq!(
            cfg.policy_choice().unwrap(),
            PolicyChoice::Fgd { consolidate: false }
        );
    }

    #[test]
    fn yaml_and_json_files() {
        let d = std::env::temp_dir().join(format!("hami-sched-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("c.yaml"),
            "policy: usage-aware\nusageMarginPercent: 15\nstaleAfterSecs: 60\n",
        )
        .unwrap();
        let cfg = SchedulerConfig::load(&d.join("c.yaml")).unwrap();
        assert_eq!(
            cfg.policy_choice().unwrap(),
            PolicyChoice::UsageAware { margin_percent: 15 }
        );
        assert_eq!(cfg.stale_after_secs, 60);
        std::fs::write(d.join("bad.yaml"), "polcy: hami\n").unwrap();
        assert!(SchedulerConfig::load(&d.join("bad.yaml")).is_err());
        std::fs::write(d.join("c.json"), "{}").unwrap();
        assert_eq!(
            SchedulerConfig::load(&d.join("c.json")).unwrap(),
            SchedulerConfig::default()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn device_config_from_the_chart() {
        let text = r#"{"nvidia":{"resourceCountName":"nvidia.com/gpu","resourceMemoryName":"example.com/mem",
            "resourceMemoryPercentageName":"nvidia.com/gpumem-percentage","resourceCoreName":"nvidia.com/gpucores",
            "resourcePriorityName":"nvidia.com/priority","deviceSplitCount":10,"deviceMemoryScaling":1,
            "deviceCoreScaling":1,"memoryFactor":1,"defaultMemory":2000,"defaultCores":5,"defaultGPUNum":1},
            "nodeconfig":[]}"#;
        let dc = DeviceConfig::parse(Path::new("x"), text).unwrap();
        assert_eq!(dc.names.memory, "example.com/mem");
        assert_eq!((dc.defaults.memory_mib, dc.defaults.cores), (2000, 5));
        assert!(DeviceConfig::parse(Path::new("x"), r#"{"nvidia":{"defaultGPUNum":0}}"#).is_err());
        assert!(DeviceConfig::parse(Path::new("x"), "{}").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("5m"), Some(300));
        assert_eq!(parse_duration_secs("1m30s"), Some(90));
        assert_eq!(parse_duration_secs("2h"), Some(7200));
        for bad in ["", "5", "1.5m", "5d", "m"] {
            assert_eq!(parse_duration_secs(bad), None, "{bad}");
        }
    }
}
