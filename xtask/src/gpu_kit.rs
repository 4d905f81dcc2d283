//! `cargo xtask gpu-kit DIR`: a self-contained bundle for a machine with an NVIDIA GPU, CUDA and
//! PyTorch and no network: the release agent (eBPF programs inside), the LD_PRELOAD ioctl logger
//! (`tools/ioctl-log`), and the scripts in `xtask/gpu-kit/` (`run.sh` does everything; see its
//! README.txt). Nothing is built on the GPU machine.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::{cargo, ebpf_toolchain, root, run};

/// The scripts, copied as they are.
const SCRIPTS: [(&str, &str); 4] = [
    ("run.sh", include_str!("../gpu-kit/run.sh")),
    ("phases.py", include_str!("../gpu-kit/phases.py")),
    ("summary.py", include_str!("../gpu-kit/summary.py")),
    ("README.txt", include_str!("../gpu-kit/README.txt")),
];

/// Builds the kit into `args[0]`.
pub(crate) fn gpu_kit(args: &[&str]) -> Result<()> {
    let [dir] = args else {
        bail!("usage: cargo xtask gpu-kit DIR");
    };
    ebpf_toolchain()?;
    // Two builds: a `--bin` filter would apply to every package and skip the logger's library.
    run(
        &cargo(),
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "hami-agent",
            "--bin",
            "hami-agent",
        ],
    )?;
    run(
        &cargo(),
        &["build", "--release", "--locked", "-p", "hami-ioctl-log"],
    )?;
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let release = root().join("target/release");
    for f in ["hami-agent", "libhami_ioctl_log.so"] {
        std::fs::copy(release.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
        // The line tables are of no use there, and a device machine receives at most 64 MiB in all
        // (about 17 MiB stripped against 103 MiB).
        let p = dir.join(f);
        run("strip", &["--strip-debug", &p.to_string_lossy()])?;
    }
    for (name, text) in SCRIPTS {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        if name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", p.display()))?;
        }
    }
    eprintln!(
        "GPU kit in {}: copy it to the GPU machine and run `OUT=<dir> {}/run.sh` as root",
        dir.display(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SCRIPTS;

    #[test]
    fn without_a_gpu_the_kit_says_so_and_exits_3() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            eprintln!("skipped: this machine has an NVIDIA GPU");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hami-gpu-kit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for (name, text) in SCRIPTS {
            std::fs::write(dir.join(name), text).expect("script");
        }
        let out = std::process::Command::new("bash")
            .arg(dir.join("run.sh"))
            .env("OUT", dir.join("out"))
            .output()
            .expect("bash");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("no NVIDIA GPU here"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_python_scripts_parse() {
        for (name, text) in SCRIPTS.iter().filter(|(n, _)| n.ends_with(".py")) {
            let out = std::process::Command::new("python3")
                .args(["-c", "import ast,sys; ast.parse(sys.stdin.read())"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write as _;
                    c.stdin.take().expect("stdin").write_all(text.as_bytes())?;
                    c.wait()
                })
                .expect("python3");
            assert!(out.success(), "{name} does not parse");
        }
    }
}
