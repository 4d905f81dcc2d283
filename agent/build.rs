//! Generates the kubelet device plugin API (`proto/deviceplugin/v1beta1/api.proto`, package `v1beta1`)
//! with protox (no `protoc`) and tonic-prost-build into `OUT_DIR/v1beta1.rs`, included by
//! `src/deviceplugin/proto.rs`; always, also with `HAMI_EBPF_STUB=1`.
//!
//! Builds the eBPF object (`hami-ebpf`, for `bpfel-unknown-none`) with aya-build and leaves it in
//! `OUT_DIR/hami-ebpf`, where `src/loader.rs` embeds it.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` 0.10.4 on PATH
//! (`cargo xtask ci` installs both; the versions are in `xtask/src/main.rs`). With `HAMI_EBPF_STUB=1` an empty
//! stub is written instead, so `cargo check` works without the eBPF toolchain; an agent built that way
//! refuses to load (it says why).
use anyhow::{Context as _, anyhow};

/// Compiles the device plugin API into Rust (client and server stubs).
fn device_plugin_proto() -> anyhow::Result<()> {
    let file = "proto/deviceplugin/v1beta1/api.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"]).context("compiling the device plugin proto")?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .context("generating the device plugin stubs")
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=HAMI_EBPF_STUB");
    device_plugin_proto()?;
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    if std::env::var_os("HAMI_EBPF_STUB").is_some_and(|v| v == "1") {
        std::fs::write(std::path::Path::new(&out_dir).join("hami-ebpf"), [])
            .context("writing the eBPF stub")?;
        return Ok(());
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest).join("../ebpf/programs");
    let root = root
        .canonicalize()
        .with_context(|| format!("{} (the hami-ebpf package)", root.display()))?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hami-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
