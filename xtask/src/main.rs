//! `cargo xtask`: project automation.
//!
//! - `cargo xtask sim [hami-sim args]`: the trace simulator, built in release mode (the main job).
//! - `cargo xtask ci`: everything CI checks, in order: formatting, clippy (warnings denied), every
//!   workspace member inheriting the workspace lints, docs/metrics.md being current, the Helm chart
//!   check, the test suite, every fuzz target for 10 s, and a short simulator smoke run. It installs
//!   what it needs first: rustfmt and clippy, a nightly toolchain with rust-src and bpf-linker 0.10.4
//!   (the eBPF programs), cargo-fuzz 0.13.2, and, as root, the Debian packages fuse3, prometheus, npm,
//!   python3-venv, gcc, openssl and curl when missing (network access to the Rust, Debian, npm and
//!   PyPI servers is assumed).
//! - `cargo xtask bench [criterion args]`: the placement benchmarks (`cargo bench -p hami-policy`);
//!   `cargo xtask bench agent` / `bench interceptor` (root): the telemetry and interceptor overheads.
//! - `cargo xtask fuzz [--seconds N] [--targets a,b]`: every fuzz target of `fuzz/` (libFuzzer through
//!   cargo-fuzz) for N seconds each (default 60); see [`fuzz`].
//! - `cargo xtask soak [--minutes N] [--seed S]` (root): the chaos soak of the whole simulated node
//!   (`agent/tests/soak.rs`) for N minutes (default 30); summary in `target/soak/summary.json`.
//!   `cargo xtask ci` runs it for one minute as part of the test suite.
//! - `cargo xtask lint`: formatting and clippy only.
//! - `cargo xtask metrics-doc`: regenerate docs/metrics.md.
//! - `cargo xtask chart`: the Helm chart check alone.
//! - `cargo xtask plots [--reuse]` (root): PNG plots of the agent's series from Prometheus (docs/img).
//! - `cargo xtask gpu-kit DIR`: the bundle for a real GPU node (see [`gpu_kit`]).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

mod chart;
mod fuzz;
mod gpu_kit;
mod plots;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs a command in the workspace root, echoing it; fails on a non-zero exit.
fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn lint() -> Result<()> {
    run(&cargo(), &["fmt", "--all", "--", "--check"])?;
    // The fuzz targets are their own workspace (built by cargo-fuzz with nightly).
    run(
        &cargo(),
        &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
    )?;
    run(
        &cargo(),
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    check_lints_inherited()
}

/// Every member manifest must opt into the workspace lints (`[lints] workspace = true`).
fn check_lints_inherited() -> Result<()> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).context("reading Cargo.toml")?;
    let members: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("members"))
        .take(1)
        .flat_map(|l| l.split('"').skip(1).step_by(2))
        .collect();
    if members.is_empty() {
        bail!("no workspace members found in Cargo.toml");
    }
    for m in members {
        let manifest = root().join(m).join("Cargo.toml");
        let body =
            std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        if !body.contains("[lints]\nworkspace = true") {
            bail!(
                "{} does not inherit the workspace lints ([lints] workspace = true)",
                manifest.display()
            );
        }
    }
    eprintln!("all workspace members inherit the workspace lints");
    Ok(())
}

fn ci() -> Result<()> {
    // rustup installs the components listed in rust-toolchain.toml on first use; make it explicit so a
    // machine with a minimal profile gets them before fmt/clippy run.
    run("rustup", &["component", "add", "rustfmt", "clippy"])?;
    // Real tools the tests use: fusermount3 (Debian `fuse3`) for the simulated GPU node's FUSE device,
    // and a real Prometheus (Debian `prometheus`) scraping the agent. As root, install what is missing.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    // (package, command whose success shows it is there)
    let wanted: [(&str, &[&str]); 7] = [
        ("fuse3", &["fusermount3", "--version"]),
        ("prometheus", &["prometheus", "--version"]),
        // Helm comes from an npm package, kubernetes-validate from PyPI into a venv (chart check).
        ("npm", &["npm", "--version"]),
        ("python3-venv", &["python3", "-c", "import ensurepip"]),
        ("gcc", &["cc", "--version"]),
        // The dashboards test serves the webhook over TLS with an openssl-made certificate and posts
        // AdmissionReviews to it with curl, as the API server would.
        ("openssl", &["openssl", "version"]),
        ("curl", &["curl", "--version"]),
    ];
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|(_, check)| {
            !Command::new(check[0])
                .args(&check[1..])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(pkg, _)| pkg)
        .collect();
    if is_root && !missing.is_empty() {
        run("apt-get", &["update"])?;
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        run("apt-get", &args)?;
    }
    ebpf_toolchain()?;
    lint()?;
    check_metrics_doc()?;
    chart::check()?;
    run(&cargo(), &["test", "--workspace", "--locked"])?;
    // Every fuzz target for a short bounded time (the long runs are `cargo xtask fuzz`).
    fuzz::fuzz(&["--seconds", "10"])?;
    // A short end-to-end run of the main job on its embedded default.
    let out = root().join("target/xtask-ci-sim");
    let out = out.to_string_lossy();
    run(
        &cargo(),
        &[
            "run",
            "--release",
            "--locked",
            "-p",
            "hami-sim",
            "--bin",
            "hami-sim",
            "--",
            "--policy",
            "bestfit,fgd",
            "--seeds",
            "42,43",
            "--quiet",
            "--out",
            &out,
        ],
    )?;
    for f in ["summary.csv", "curve.csv", "allocation.svg"] {
        let p = root().join("target/xtask-ci-sim").join(f);
        let len = std::fs::metadata(&p)
            .with_context(|| format!("simulator output {} missing", p.display()))?
            .len();
        if len == 0 {
            bail!("simulator output {} is empty", p.display());
        }
    }
    check_fidelity(&root().join("target/xtask-ci-sim/summary.csv"))
}

/// `cargo xtask soak [--minutes N] [--seed S]` (module docs).
fn soak(args: &[&str]) -> Result<()> {
    let (mut minutes, mut seed) = (30u64, 42u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name} {v}: not a whole number"))
        };
        match *a {
            "--minutes" => minutes = value("--minutes")?,
            "--seed" => seed = value("--seed")?,
            other => bail!("cargo xtask soak: unknown argument {other:?} (use --minutes N, --seed S)"),
        }
    }
    eprintln!(
        "+ cargo test -p hami-agent --test soak (HAMI_SOAK_SECONDS={})",
        minutes * 60
    );
    let status = Command::new(cargo())
        .args([
            "test",
            "--locked",
            "-p",
            "hami-agent",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .current_dir(root())
        .env("HAMI_SOAK_SECONDS", (minutes * 60).to_string())
        .env("HAMI_SOAK_SEED", seed.to_string())
        .env("HAMI_REQUIRE_PRIVILEGED", "1")
        .status()
        .context("starting cargo test")?;
    if !status.success() {
        bail!("the soak failed ({status}); see target/soak/summary.json");
    }
    Ok(())
}

/// The pinned BPF linker (0.10.x uses the LLVM of the Rust toolchain,
/// newer releases need a separately installed libLLVM).
const BPF_LINKER_VERSION: &str = "0.10.4";

/// The eBPF programs are built by the agent's build.rs with nightly + rust-src and bpf-linker.
fn ebpf_toolchain() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        run(
            "rustup",
            &[
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        )?;
    }
    run(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )?;
    let have = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("bpf-linker {BPF_LINKER_VERSION}")
        });
    if !have {
        run(
            &cargo(),
            &[
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ],
        )?;
    }
    Ok(())
}

/// The Markdown one binary prints with `metrics-doc` (its part of the metrics reference).
fn metrics_doc_of(package: &str, bin: &str) -> Result<String> {
    let out = Command::new(cargo())
        .args([
            "run",
            "--quiet",
            "--locked",
            "-p",
            package,
            "--bin",
            bin,
            "--",
            "metrics-doc",
        ])
        .current_dir(root())
        .output()
        .with_context(|| format!("running {bin} metrics-doc"))?;
    if !out.status.success() {
        bail!(
            "{bin} metrics-doc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{bin} metrics-doc: not UTF-8"))
}

/// The metrics reference: every binary's metric lists (`hami-agent metrics-doc`, `hami-scheduler
/// metrics-doc`) under one heading. Fails when a metric name has rows in two places.
fn metrics_doc() -> Result<Vec<u8>> {
    let mut doc = String::from(
        "# Metrics reference\n\n\
         Every Prometheus metric the hami binaries export: name, type, label names, unit and meaning. \
         Generated by `cargo xtask metrics-doc` from the binaries' metric lists (`hami-agent metrics-doc`, \
         `hami-scheduler metrics-doc`); CI checks it is current. Dashboards: `grafana/README.md`.\n",
    );
    doc.push_str(&metrics_doc_of("hami-agent", "hami-agent")?);
    doc.push_str(&metrics_doc_of("hami-scheduler", "hami-scheduler")?);
    let mut seen = std::collections::BTreeSet::new();
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix("| `").and_then(|r| r.split('`').next())
            && !seen.insert(name.to_owned())
        {
            bail!("metric {name} is listed twice in the metrics reference");
        }
    }
    Ok(doc.into_bytes())
}

/// `docs/metrics.md` must equal what the binaries generate from their metric lists.
fn check_metrics_doc() -> Result<()> {
    let path = root().join("docs/metrics.md");
    let current = std::fs::read(&path).unwrap_or_default();
    if current != metrics_doc()? {
        bail!(
            "{} is not current: run `cargo xtask metrics-doc` and commit it",
            path.display()
        );
    }
    Ok(())
}

/// Policies whose mean unallocated GPU % at 100 % arrived on the default trace must stay within
/// [`FIDELITY_PP`] of the FGD paper's published mean (read by `hami_sim::report::paper_value` from the
/// embedded `data/alibaba-gpu-v2023/summary_by_workload_policy.csv`).
const FIDELITY_POLICIES: &[&str] = &["bestfit", "fgd"];
const FIDELITY_PP: f64 = 1.0;

/// Our `bestfit` and `fgd` must land within 1 percentage point of the paper (mean over the seeds run).
fn check_fidelity(summary: &Path) -> Result<()> {
    let text = std::fs::read_to_string(summary).with_context(|| format!("reading {}", summary.display()))?;
    for &policy in FIDELITY_POLICIES {
        let (paper, _) = hami_sim::report::paper_value("default", policy, 100)
            .with_context(|| format!("no published value for {policy}"))?;
        let values: Vec<f64> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() == 6 && f[0] == "default" && f[1] == policy && f[3] == "100")
            .filter_map(|f| f[4].parse::<f64>().ok())
            .collect();
        if values.is_empty() {
            bail!("{}: no {policy} value at 100 % arrived", summary.display());
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        eprintln!("fidelity: {policy} {mean:.2} % unallocated at 100 % arrived (paper {paper:.2})");
        if (mean - paper).abs() > FIDELITY_PP {
            bail!("{policy}: {mean:.2} % is more than {FIDELITY_PP} pp from the paper's {paper:.2} %");
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // A failing step is reported in one line (its own output is above it), never with a backtrace.
    match dispatch() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo xtask sim -- --help` and `cargo xtask sim --help` mean the same.
    let rest: Vec<&str> = args
        .iter()
        .skip(1)
        .map(String::as_str)
        .skip_while(|a| *a == "--")
        .collect();
    match args.first().map(String::as_str) {
        Some("sim") => {
            let mut a = vec![
                "run",
                "--release",
                "--quiet",
                "-p",
                "hami-sim",
                "--bin",
                "hami-sim",
                "--",
            ];
            a.extend(rest);
            run(&cargo(), &a)
        }
        Some("bench") if rest.first() == Some(&"agent") => {
            // Root only: eBPF, FUSE and cgroups (the benchmark says so and exits otherwise).
            run(
                &cargo(),
                &["bench", "--locked", "-p", "hami-agent", "--bench", "overhead"],
            )
        }
        Some("bench") if rest.first() == Some(&"interceptor") => run(
            &cargo(),
            &[
                "bench",
                "--locked",
                "-p",
                "hami-interceptor",
                "--bench",
                "overhead",
            ],
        ),
        Some("bench") => {
            let mut a = vec!["bench", "-p", "hami-policy", "--bench", "placement", "--"];
            a.extend(rest);
            run(&cargo(), &a)
        }
        Some("ci") => ci(),
        Some("fuzz") => fuzz::fuzz(&rest),
        Some("soak") => soak(&rest),
        Some("lint") => lint(),
        Some("chart") => chart::check(),
        Some("plots") => plots::plots(&rest),
        Some("gpu-kit") => gpu_kit::gpu_kit(&rest),
        Some("metrics-doc") => {
            std::fs::write(root().join("docs/metrics.md"), metrics_doc()?).context("writing docs/metrics.md")
        }
        _ => bail!("usage: cargo xtask <sim|ci|fuzz|soak|bench|lint|metrics-doc|chart|plots|gpu-kit> [args]"),
    }
}
