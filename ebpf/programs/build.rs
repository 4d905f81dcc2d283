//! Rebuild when the BPF linker changes (it is part of the eBPF toolchain, not a cargo dependency).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
