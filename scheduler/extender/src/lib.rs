//! `hami-scheduler`: the scheduler extender (filter, prioritize, bind) and the mutating webhook, serving
//! the placement core (`hami-policy`) to kube-scheduler over the extender HTTP protocol.
//!
//! | module | what |
//! |---|---|
//! | [`apiserver`] | the kube-rs edge: Node and Pod reflectors feeding the state, the bind's writes |
//! | [`config`] | the binary's one configuration structure (the chart renders it into a ConfigMap) |
//! | [`error`] | the crate's one error type |
//! | [`http`] | the extender's axum routes: filter, prioritize, bind, healthz, readyz, metrics |
//! | [`kubeconf`] | the KubeSchedulerConfiguration pointing kube-scheduler at the extender, validated |
//! | [`metrics`] | Prometheus metrics (`hami_scheduler_*` and HAMi's allocation view) |
//! | [`server`] | start/stop a whole extender (app, reflectors, servers) |
//! | [`state`] | the pure state: nodes, pod allocations (UID-keyed ledger), filter/score/bind decisions |
//! | [`tls`] | HTTPS for the webhook (rustls, certificate reload, self-signed certificates) |
//! | [`webhook`] | the mutating admission webhook (AdmissionReview v1) |
//! | [`wire`] | the extender wire types (`k8s.io/kube-scheduler/extender/v1`) |

pub mod apiserver;
pub mod config;
pub mod error;
pub mod http;
pub mod kubeconf;
pub mod metrics;
pub mod server;
pub mod state;
pub mod tls;
pub mod webhook;
pub mod wire;
