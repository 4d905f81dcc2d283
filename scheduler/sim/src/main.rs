//! `hami-sim`: replay the Alibaba GPU-sharing trace through hami's placement policies.
//!
//! `hami-sim --trace default --policy fgd --seeds 42,43 --out DIR` writes `DIR/summary.csv`,
//! `DIR/curve.csv` and `DIR/allocation.svg`, and prints a table of unallocated GPU % at 100 % arrived.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hami_sim::{SimConfig, replay::PAPER_INFLATION, report, simulate};
use indicatif::{ProgressBar, ProgressStyle};

/// Replay a GPU-sharing trace through hami's placement policies (FGD paper method: seeded shuffle,
/// inflation to 130 % of GPU capacity, one attempt per pod, no departures).
#[derive(Debug, Parser)]
#[command(name = "hami-sim", version)]
struct Args {
    /// Comma-separated traces: names from the data folder (`default`, `gpushare40`, …) or pod-list CSV paths.
    #[arg(long, default_value = "default", value_delimiter = ',')]
    trace: Vec<String>,
    /// Comma-separated policies, or `all`: random, dotprod, packing, bestfit, fgd, binpack, spread, fgd-pack.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    policy: Vec<String>,
    /// Comma-separated seeds, or a range `42..51` (inclusive).
    #[arg(long, default_value = "42..51")]
    seeds: String,
    /// Output folder.
    #[arg(long, default_value = "out/sim")]
    out: PathBuf,
    /// Node-list CSV (default: the embedded 1213-node list).
    #[arg(long)]
    nodes: Option<PathBuf>,
    /// Folder holding `openb_pod_list_<trace>.csv` files.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Inflation target, fraction of GPU capacity.
    #[arg(long, default_value_t = PAPER_INFLATION)]
    inflation: f64,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    if let Some((a, b)) = s.split_once("..") {
        let a: u64 = a
            .trim()
            .parse()
            .with_context(|| format!("seed range start {a:?}"))?;
        let b: u64 = b
            .trim()
            .parse()
            .with_context(|| format!("seed range end {b:?}"))?;
        anyhow::ensure!(a <= b, "empty seed range {s}");
        anyhow::ensure!(
            b - a < MAX_SEEDS as u64,
            "seed range {s} has more than {MAX_SEEDS} seeds"
        );
        return Ok((a..=b).collect());
    }
    let seeds: Vec<u64> = s
        .split(',')
        .map(|x| x.trim().parse::<u64>().with_context(|| format!("seed {x:?}")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(seeds.len() <= MAX_SEEDS, "more than {MAX_SEEDS} seeds");
    for (i, a) in seeds.iter().enumerate() {
        anyhow::ensure!(!seeds[..i].contains(a), "seed {a} is given twice");
    }
    Ok(seeds)
}

fn main() -> std::process::ExitCode {
    // Errors are reports for the user, not crashes: one line per cause, never a backtrace.
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Most seeds one invocation accepts (a typo like `0..1000000000` must not exhaust memory).
const MAX_SEEDS: usize = 10_000;

fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.inflation.is_finite() && args.inflation > 0.0 && args.inflation <= 10.0,
        "--inflation must be in (0, 10]"
    );
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let cfg = SimConfig {
        traces: args.trace,
        policies: args.policy,
        seeds: parse_seeds(&args.seeds)?,
        nodes: args.nodes,
        data: args.data,
        inflation: args.inflation,
        threads,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} pods ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let results = simulate(&cfg, &|total, done| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    report::write_csvs(&args.out, &results)?;
    let svg = args.out.join("allocation.svg");
    if let Some(first) = cfg.traces.first() {
        report::plot(&svg, first, &results)?;
        for t in cfg.traces.iter().skip(1) {
            let name = PathBuf::from(t)
                .file_stem()
                .map_or_else(|| t.clone(), |s| s.to_string_lossy().into_owned());
            report::plot(&args.out.join(format!("allocation-{name}.svg")), t, &results)?;
        }
    }
    print!("{}", report::table(&results));
    println!(
        "\n{} runs in {:.1} s; wrote {}, {} and {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        args.out.join("summary.csv").display(),
        args.out.join("curve.csv").display(),
        svg.display()
    );
    Ok(())
}
