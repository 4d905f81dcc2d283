//! Empty on purpose: the programs are the `hami-ebpf` binary target (see `main.rs`). This library exists
//! so that `hami-agent` can depend on the package and be rebuilt when the programs change.
#![no_std]
