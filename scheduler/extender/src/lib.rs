//! `hami-scheduler`: the scheduler extender (filter, prioritize, bind) and the mutating webhook, serving
//! the placement core (`hami-policy`) to kube-scheduler over the extender HTTP protocol.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the binary's one configuration structure (the chart renders it into a ConfigMap) |
//! | [`webhook`] | the mutating admission webhook (AdmissionReview v1) |

pub mod config;
pub mod webhook;
