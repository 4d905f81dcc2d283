//! Shared by the fake-cuda integration tests: the built fake `libcuda.so.1`, the workload program as a
//! child process, and polling the node.

#![allow(
    dead_code,
    reason = "each test crate includes this module and uses a different part of it"
)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use hami_fake_gpu::FakeNode;

/// The workload program built with the tests.
pub(crate) const WORKLOAD: &str = env!("CARGO_BIN_EXE_hami-cuda-workload");

/// A directory holding the built fake driver as `libcuda.so.1`, removed on drop.
pub(crate) struct LibDir(pub(crate) PathBuf);

impl Drop for LibDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the built fake driver into a fresh directory as `libcuda.so.1`.
pub(crate) fn lib_dir(tag: &str) -> LibDir {
    // `cargo test` builds the cdylib into target/<profile>/deps (it is uplifted only by `cargo build`).
    let target = Path::new(WORKLOAD).parent().expect("target dir");
    let built = [target.join("deps/libcuda.so"), target.join("libcuda.so")]
        .into_iter()
        .find(|p| p.exists())
        .expect("the fake libcuda.so was not built");
    let dir = std::env::temp_dir().join(format!("hami-fake-cuda-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the library dir");
    let guard = LibDir(dir);
    std::fs::copy(&built, guard.0.join("libcuda.so.1")).expect("copying libcuda.so");
    guard
}

/// A running `hami-cuda-workload` with piped stdin/stdout.
pub(crate) struct Workload {
    pub(crate) child: Child,
    out: BufReader<ChildStdout>,
}

impl Workload {
    pub(crate) fn spawn(node: &FakeNode, lib: &Path, alloc_path: &str, args: &[&str]) -> Self {
        Self::spawn_env(node, lib, alloc_path, args, &[])
    }

    pub(crate) fn spawn_env(
        node: &FakeNode,
        lib: &Path,
        alloc_path: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new(WORKLOAD)
            .args(args)
            .envs(env.iter().copied())
            .env("HAMI_FAKE_GPU_DIR", node.dir())
            .env("HAMI_FAKE_CUDA_ALLOC", alloc_path)
            .env("LD_LIBRARY_PATH", lib)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the workload");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, out }
    }

    /// Reads stdout up to the line starting with `prefix`.
    pub(crate) fn line(&mut self, prefix: &str) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self
                .out
                .read_line(&mut line)
                .expect("reading the workload's stdout")
                == 0
            {
                return None;
            }
            if line.starts_with(prefix) {
                return Some(line.trim_end().to_owned());
            }
        }
    }

    /// The words after `prefix` on the line starting with it; panics (with stderr) if there is none.
    pub(crate) fn words(&mut self, prefix: &str) -> Vec<String> {
        match self.line(prefix) {
            Some(l) => l[prefix.len()..].split_whitespace().map(str::to_owned).collect(),
            None => panic!("no `{prefix}` line; stderr: {}", self.stderr_after_exit()),
        }
    }

    /// Writes one line to the workload's stdin (ends a `--hold` wait).
    pub(crate) fn send(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"\n").expect("writing to the workload");
        stdin.flush().expect("flushing the workload's stdin");
    }

    /// Waits for the exit and returns what the workload wrote to stderr (for failure messages).
    pub(crate) fn stderr_after_exit(&mut self) -> String {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin and waits for the exit.
    pub(crate) fn finish(mut self) -> std::process::Output {
        drop(self.child.stdin.take());
        self.child.wait_with_output().expect("waiting for the workload")
    }
}

/// Polls `cond` for up to 10 s (FUSE delivers RELEASE asynchronously after a close or an exit).
pub(crate) fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Parses `0x…` hex.
pub(crate) fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("a 0x hex number")
}
