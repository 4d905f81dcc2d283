//! Shared by the integration tests: the test-support program and the built library.

use std::path::PathBuf;

/// The child processes: `hami-nvml-probe probe|events|tenant|util` (this package's test-support
/// binary).
pub(crate) const HELPER: &str = env!("CARGO_BIN_EXE_hami-nvml-probe");

/// A directory holding the built fake library as `libnvidia-ml.so.1`, removed on drop.
pub(crate) struct LibDir(PathBuf);

impl Drop for LibDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl LibDir {
    /// The library's path (`<dir>/libnvidia-ml.so.1`).
    pub(crate) fn lib(&self) -> PathBuf {
        self.0.join("libnvidia-ml.so.1")
    }
}

/// Copies the built fake library into a fresh directory named after this process and `tag`.
pub(crate) fn lib_dir(tag: &str) -> LibDir {
    // `cargo test` builds the cdylib into target/<profile>/deps (it is uplifted only by `cargo build`);
    // this test binary lives in that deps directory too.
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let built = [
        deps.join("libnvidia_ml.so"),
        deps.parent().expect("target dir").join("libnvidia_ml.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("the fake libnvidia_ml.so was not built");
    let dir = std::env::temp_dir().join(format!("hami-fake-nvml-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the library dir");
    let guard = LibDir(dir);
    std::fs::copy(&built, guard.lib()).expect("copying libnvidia_ml.so");
    guard
}
