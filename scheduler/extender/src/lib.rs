//! `hami-scheduler`: the scheduler extender (filter, prioritize, bind) and the mutating webhook, serving
//! the placement core (`hami-policy`) to kube-scheduler over the extender HTTP protocol.
