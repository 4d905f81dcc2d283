//! The `KubeSchedulerConfiguration` (`kubescheduler.config.k8s.io/v1`) that points a kube-scheduler at
//! this extender, as serde types, and kube-scheduler's own validation rules for it
//! (`reference/kubernetes-testing.md` §5; kube-scheduler `pkg/scheduler/apis/config/validation`):
//! `weight > 0` when `prioritizeVerb` is set, at most one extender with a `bindVerb`, and every
//! `managedResources[].name` a valid extended resource name, without duplicates.
//!
//! The generated profile is HAMi's (`reference/hami.md` §3.6): profile `hami-scheduler`, one extender
//! with `filterVerb: filter`, `prioritizeVerb: prioritize`, `bindVerb: bind`, `weight: 1`,
//! `nodeCacheCapable: true`, and every HAMi resource name as a managed resource with
//! `ignoredByScheduler: true` (kube-scheduler does not fit `gpumem`/`gpucores` itself).

use std::collections::BTreeSet;

use hami_api::ResourceNames;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `apiVersion` of the configuration.
pub const API_VERSION: &str = "kubescheduler.config.k8s.io/v1";

/// The configuration document (only the fields this project sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSchedulerConfiguration {
    /// `kubescheduler.config.k8s.io/v1`.
    pub api_version: String,
    /// `KubeSchedulerConfiguration`.
    pub kind: String,
    /// Leader election (Lease named after the profile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_election: Option<LeaderElection>,
    /// Scheduler profiles.
    pub profiles: Vec<Profile>,
    /// Extenders.
    pub extenders: Vec<Extender>,
}

/// The `extenders` stanza alone, as given to users of an existing kube-scheduler (the chart's
/// extender-only `extenders.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendersStanza {
    /// Extenders.
    pub extenders: Vec<Extender>,
}

/// `leaderElection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElection {
    /// Whether to elect a leader.
    pub leader_elect: bool,
    /// `leases`.
    pub resource_lock: String,
    /// Lease name.
    pub resource_name: String,
    /// Lease namespace.
    pub resource_namespace: String,
}

/// One scheduler profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    /// The `spec.schedulerName` it serves.
    pub scheduler_name: String,
}

/// `Extender` (JSON tags of kube-scheduler's v1 type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Extender {
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub url_prefix: String,
    /// Filter verb (`filter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_verb: Option<String>,
    /// Prioritize verb (`prioritize`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prioritize_verb: Option<String>,
    /// Bind verb (`bind`): the extender creates the Binding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_verb: Option<String>,
    /// Preempt verb (unused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preempt_verb: Option<String>,
    /// Weight of the prioritize scores (int64, > 0 with a prioritize verb).
    pub weight: i64,
    /// HTTPS to the extender.
    #[serde(rename = "enableHTTPS")]
    pub enable_https: bool,
    /// TLS client settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
    /// Timeout per call (Go duration).
    pub http_timeout: String,
    /// Send node names only.
    pub node_cache_capable: bool,
    /// Resources that route pods to the extender.
    pub managed_resources: Vec<ManagedResource>,
    /// Whether scheduling goes on without the extender when it fails.
    pub ignorable: bool,
}

/// `tlsConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Skip server certificate verification.
    #[serde(default)]
    pub insecure: bool,
    /// Name the extender's certificate must carry (SNI and verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Client certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// Client key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// CA file verifying the extender's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Client certificate, PEM (base64 in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_data: Option<String>,
    /// Client key, PEM (base64 in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_data: Option<String>,
    /// CA bundle, PEM (base64 in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_data: Option<String>,
}

/// `managedResources[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManagedResource {
    /// Extended resource name.
    pub name: String,
    /// kube-scheduler does not fit this resource itself.
    pub ignored_by_scheduler: bool,
}

/// What the generated configuration depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Profile name (`hami-scheduler`).
    pub scheduler_name: String,
    /// Extender URL prefix.
    pub url_prefix: String,
    /// HAMi resource names.
    pub names: ResourceNames,
    /// Call timeout (Go duration).
    pub http_timeout: String,
    /// Skip TLS verification (HAMi's in-pod setup); else `ca_file` verifies.
    pub insecure: bool,
    /// CA file for HTTPS.
    pub ca_file: Option<String>,
    /// Leader election namespace; `None`: no leader election block.
    pub leader_namespace: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            scheduler_name: hami_api::resources::SCHEDULER_NAME.to_owned(),
            url_prefix: "http://127.0.0.1:8443".to_owned(),
            names: ResourceNames::default(),
            http_timeout: "30s".to_owned(),
            insecure: false,
            ca_file: None,
            leader_namespace: None,
        }
    }
}

impl KubeSchedulerConfiguration {
    /// The configuration for this extender (module docs).
    #[must_use]
    pub fn for_extender(o: &Options) -> Self {
        let https = o.url_prefix.starts_with("https://");
        let names = &o.names;
        Self {
            api_version: API_VERSION.to_owned(),
            kind: "KubeSchedulerConfiguration".to_owned(),
            leader_election: o.leader_namespace.as_ref().map(|ns| LeaderElection {
                leader_elect: true,
                resource_lock: "leases".to_owned(),
                resource_name: o.scheduler_name.clone(),
                resource_namespace: ns.clone(),
            }),
            profiles: vec![Profile {
                scheduler_name: o.scheduler_name.clone(),
            }],
            extenders: vec![Extender {
                url_prefix: o.url_prefix.clone(),
                filter_verb: Some("filter".to_owned()),
                prioritize_verb: Some("prioritize".to_owned()),
                bind_verb: Some("bind".to_owned()),
                preempt_verb: None,
                weight: 1,
                enable_https: https,
                tls_config: https.then(|| TlsConfig {
                    insecure: o.insecure,
                    server_name: None,
                    cert_file: None,
                    key_file: None,
                    ca_file: o.ca_file.clone(),
                    cert_data: None,
                    key_data: None,
                    ca_data: None,
                }),
                http_timeout: o.http_timeout.clone(),
                node_cache_capable: true,
                managed_resources: [
                    &names.gpu,
                    &names.memory,
                    &names.memory_percentage,
                    &names.cores,
                    &names.priority,
                ]
                .into_iter()
                .map(|n| ManagedResource {
                    name: n.clone(),
                    ignored_by_scheduler: true,
                })
                .collect(),
                ignorable: false,
            }],
        }
    }

    /// kube-scheduler's validation of the extenders (module docs).
    ///
    /// # Errors
    /// [`Error::SchedulerConfig`] naming the first broken rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::SchedulerConfig(m));
        if self.api_version != API_VERSION {
            return bad(format!("apiVersion {} is not {API_VERSION}", self.api_version));
        }
        if self.extenders.iter().filter(|e| e.bind_verb.is_some()).count() > 1 {
            return bad("only one extender can implement bind".into());
        }
        for (i, e) in self.extenders.iter().enumerate() {
            if e.prioritize_verb.as_deref().is_some_and(|v| !v.is_empty()) && e.weight <= 0 {
                return bad(format!(
                    "extenders[{i}].weight must be positive with a prioritizeVerb"
                ));
            }
            if crate::config::parse_duration_secs(&e.http_timeout).is_none() {
                return bad(format!(
                    "extenders[{i}].httpTimeout {:?} is not a duration",
                    e.http_timeout
                ));
            }
            let mut seen = BTreeSet::new();
            for r in &e.managed_resources {
                if !is_extended_resource_name(&r.name) {
                    return bad(format!(
                        "extenders[{i}].managedResources: {:?} is not a valid extended resource name",
                        r.name
                    ));
                }
                if !seen.insert(r.name.as_str()) {
                    return bad(format!("extenders[{i}].managedResources: duplicate {:?}", r.name));
                }
            }
        }
        Ok(())
    }

    /// As YAML.
    ///
    /// # Errors
    /// [`Error::Serialize`] if the serialiser fails.
    pub fn to_yaml(&self) -> Result<String> {
        serde_saphyr::to_string(self).map_err(|e| Error::Serialize {
            what: "KubeSchedulerConfiguration",
            message: e.to_string(),
        })
    }

    /// As pretty JSON.
    ///
    /// # Errors
    /// [`Error::Serialize`] if the serialiser fails.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Serialize {
            what: "KubeSchedulerConfiguration",
            message: e.to_string(),
        })
    }
}

/// Whether `name` is a valid extended resource name (Kubernetes `IsExtendedResourceName`): a
/// domain-prefixed name (`prefix/name`) outside `kubernetes.io/` and `requests.` that is a valid
/// qualified name, where the prefix is a DNS subdomain and the name at most 63 characters of
/// alphanumerics, `-`, `_`, `.` beginning and ending alphanumeric.
#[must_use]
pub fn is_extended_resource_name(name: &str) -> bool {
    let Some((prefix, local)) = name.split_once('/') else {
        return false;
    };
    if prefix == "kubernetes.io" || prefix.ends_with(".kubernetes.io") || name.starts_with("requests.") {
        return false;
    }
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let subdomain = prefix.len() <= 253 && prefix.split('.').all(dns_label);
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    let local_ok = !local.is_empty()
        && local.len() <= 63
        && local
            .bytes()
            .all(|c| alnum(c) || c == b'-' || c == b'_' || c == b'.')
        && local.bytes().next().is_some_and(alnum)
        && local.bytes().last().is_some_and(alnum);
    subdomain && local_ok
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    #[test]
    fn generated_config_is_valid_and_hamis() {
        let cfg = KubeSchedulerConfiguration::for_extender(&Options::default());
        cfg.validate().unwrap();
        let json: serde_json::Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
        let e = &json["extenders"][0];
        assert_eq!(json["apiVersion"], "kubescheduler.config.k8s.io/v1");
        assert_eq!(json["profiles"][0]["schedulerName"], "hami-scheduler");
        assert_eq!(e["filterVerb"], "filter");
        assert_eq!(e["prioritizeVerb"], "prioritize");
        assert_eq!(e["bindVerb"], "bind");
        assert_eq!(e["weight"], 1);
        assert_eq!(e["nodeCacheCapable"], true);
        assert_eq!(e["enableHTTPS"], false);
        let managed: Vec<(&str, bool)> = e["managedResources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap(),
                    r["ignoredByScheduler"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            managed,
            [
                ("nvidia.com/gpu", true),
                ("nvidia.com/gpumem", true),
                ("nvidia.com/gpumem-percentage", true),
                ("nvidia.com/gpucores", true),
                ("nvidia.com/priority", true)
            ]
        );
        let yaml = cfg.to_yaml().unwrap();
        let back: KubeSchedulerConfiguration = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn validation_rules() {
        let base = KubeSchedulerConfiguration::for_extender(&Options::default());
        let mut c = base.clone();
        c.extenders[0].weight = 0;
        assert!(c.validate().is_err(), "weight 0 with prioritize");
        c.extenders[0].prioritize_verb = None;
        c.validate().unwrap();
        let mut c = base.clone();
        c.extenders.push(base.extenders[0].clone());
        assert!(c.validate().unwrap_err().to_string().contains("bind"));
        let mut c = base.clone();
        c.extenders[0].managed_resources.push(ManagedResource {
            name: "nvidia.com/gpu".into(),
            ignored_by_scheduler: true,
        });
        assert!(c.validate().unwrap_err().to_string().contains("duplicate"));
        for bad in [
            "gpu",
            "kubernetes.io/gpu",
            "Nvidia.com/gpu",
            "nvidia.com/-gpu",
            "nvidia.com/",
        ] {
            assert!(!is_extended_resource_name(bad), "{bad}");
        }
        assert!(is_extended_resource_name("nvidia.com/gpumem-percentage"));
    }
}
