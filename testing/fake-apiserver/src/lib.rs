//! Test double: an in-memory Kubernetes API server on loopback.
