//! `cargo xtask fuzz [--seconds N] [--targets a,b]`: coverage-guided fuzzing of every parser of
//! outside input (`fuzz/`, cargo-fuzz's layout) with libFuzzer.
//!
//! Installs what it needs (the nightly toolchain, which the eBPF build already uses, and cargo-fuzz
//! [`CARGO_FUZZ_VERSION`]), builds the targets once (the agent with `HAMI_EBPF_STUB=1`: its
//! configuration parser needs no eBPF object) into `target/fuzz`, then runs each target for `N`
//! seconds (default 60) with the committed seeds of `fuzz/corpus/<target>` and a working corpus in
//! `target/fuzz/corpus/<target>` (so the checkout stays clean), a 2 GiB RSS limit and a 256 MiB limit
//! on any single allocation (a decoder that allocates without bound is a finding). Crashes land in
//! `target/fuzz/artifacts/<target>/`. Prints one line per target (executions, corpus, result) and
//! writes the table to `target/fuzz/summary.md`; fails when any target found a crash.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

/// The pinned cargo-fuzz (builds on the workspace's rustc; runs the targets with nightly).
pub(crate) const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One target's outcome.
struct Outcome {
    target: String,
    runs: u64,
    corpus: usize,
    ok: bool,
}

/// The fuzz targets: every `[[bin]]` of `fuzz/Cargo.toml`.
fn targets() -> Result<Vec<String>> {
    let manifest = root().join("fuzz/Cargo.toml");
    let text =
        std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "hami-fuzz")
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        bail!("no fuzz targets in {}", manifest.display());
    }
    Ok(names)
}

/// Installs cargo-fuzz [`CARGO_FUZZ_VERSION`] when another one (or none) is on the PATH.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}")
        });
    if !have {
        run(
            &cargo(),
            &[
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ],
        )?;
    }
    Ok(())
}

/// `cargo +nightly fuzz <args>` in the workspace root with the fuzz build's environment.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .current_dir(root())
        .env("HAMI_EBPF_STUB", "1")
        .env("CARGO_TARGET_DIR", root().join("target/fuzz"));
    cmd
}

/// The value of a libFuzzer final statistic (`stat::<name>: <value>`) in its output.
fn stat(output: &str, name: &str) -> Option<u64> {
    output.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&format!("stat::{name}:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

/// Runs the fuzz targets (module docs); `args`: `--seconds N`, `--targets a,b`.
pub(crate) fn fuzz(args: &[&str]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--seconds" => {
                let v = it.next().context("--seconds needs a value")?;
                seconds = v
                    .parse()
                    .with_context(|| format!("--seconds {v}: not a whole number"))?;
            }
            "--targets" => {
                let v = it.next().context("--targets needs a comma list")?;
                only = Some(v.split(',').map(str::to_owned).collect());
            }
            other => bail!("cargo xtask fuzz: unknown argument {other:?} (use --seconds N, --targets a,b)"),
        }
    }
    crate::ebpf_toolchain()?;
    ensure_cargo_fuzz()?;
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(o) => {
            if let Some(bad) = o.iter().find(|t| !all.contains(t)) {
                bail!("unknown fuzz target {bad:?}; known: {}", all.join(","));
            }
            o
        }
        None => all,
    };
    let status = cargo_fuzz(&["build", "--fuzz-dir", "fuzz"])
        .status()
        .context("starting cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed with {status}");
    }
    let mut outcomes = Vec::new();
    for t in &chosen {
        let work = root().join("target/fuzz/corpus").join(t);
        let artifacts = root().join("target/fuzz/artifacts").join(t);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
        let seeds = root().join("fuzz/corpus").join(t);
        let out = cargo_fuzz(&[
            "run",
            "--fuzz-dir",
            "fuzz",
            t,
            &work.to_string_lossy(),
            &seeds.to_string_lossy(),
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
            "-malloc_limit_mb=256",
            "-timeout=10",
            "-print_final_stats=1",
            &format!("-artifact_prefix={}/", artifacts.display()),
        ])
        .output()
        .with_context(|| format!("running fuzz target {t}"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        let o = Outcome {
            target: t.clone(),
            runs: stat(&text, "number_of_executed_units").unwrap_or(0),
            corpus: files_in(&work),
            ok: out.status.success(),
        };
        eprintln!(
            "fuzz {:<24} {:>10} runs in {seconds} s, corpus {:>5}, {}",
            o.target,
            o.runs,
            o.corpus,
            if o.ok { "no crash" } else { "CRASH" }
        );
        if !o.ok {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        outcomes.push(o);
    }
    let mut table =
        String::from("| target | executions | seconds | corpus | result |\n|---|---:|---:|---:|---|\n");
    for o in &outcomes {
        table.push_str(&format!(
            "| {} | {} | {seconds} | {} | {} |\n",
            o.target,
            o.runs,
            o.corpus,
            if o.ok { "no crash" } else { "crash" }
        ));
    }
    let summary = root().join("target/fuzz/summary.md");
    std::fs::write(&summary, &table).with_context(|| format!("writing {}", summary.display()))?;
    eprintln!("fuzz summary: {}", summary.display());
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs in target/fuzz/artifacts/)",
            crashed.join(", ")
        );
    }
    Ok(())
}
