//! Results: `summary.csv`, `curve.csv`, the printed table (mean ± sd over seeds at 100 % arrived, beside
//! the paper's published value) and `allocation.svg` (median unallocated GPU % against arrived workload
//! per policy, like the paper's Fig. 9a).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use plotters::prelude::*;

use crate::{
    error::{Error, Result},
    replay::{Curve, MAX_ARRIVED_PCT},
};

/// The FGD artifact's results (mean/sd over seeds 42-51 of unallocated GPU %), embedded; see
/// `data/alibaba-gpu-v2023/PROVENANCE.md`.
const PAPER_SUMMARY: &str = include_str!("../../../data/alibaba-gpu-v2023/summary_by_workload_policy.csv");

/// Arrived-workload points written to `summary.csv`.
pub const SUMMARY_POINTS: &[usize] = &[80, 85, 90, 95, 100, 105, 110, 115, 120, 125, 130];

/// One finished run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Trace name.
    pub trace: String,
    /// Policy name.
    pub policy: String,
    /// Seed.
    pub seed: u64,
    /// The run's curve.
    pub curve: Curve,
}

/// The paper's mean and sd of unallocated GPU % for (trace, our policy name) at `arrived` percent, if
/// the artifact evaluated it.
#[must_use]
pub fn paper_value(trace: &str, policy: &str, arrived: usize) -> Option<(f64, f64)> {
    let theirs = match policy {
        "random" => "01-Random",
        "dotprod" => "02-DotProd",
        "packing" => "04-GpuPacking",
        "bestfit" => "05-BestFit",
        "fgd" => "06-FGD",
        _ => return None,
    };
    PAPER_SUMMARY.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split(',').collect();
        (f.len() >= 6 && f[0] == trace && f[1] == theirs && f[2].parse::<usize>().ok() == Some(arrived))
            .then(|| Some((f[4].parse().ok()?, f[5].parse().ok()?)))
            .flatten()
    })
}

/// Mean and sample standard deviation.
#[must_use]
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    Some(if xs.len() % 2 == 1 {
        xs[m]
    } else {
        f64::midpoint(xs[m - 1], xs[m])
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |x| format!("{x:.4}"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `summary.csv` (`trace,policy,seed,arrived_pct,unallocated_gpu_pct,frag_pct` at
/// [`SUMMARY_POINTS`]) and `curve.csv` (same columns, every integer percent 0..=130) into `dir`.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_csvs(dir: &Path, results: &[RunResult]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let header = "trace,policy,seed,arrived_pct,unallocated_gpu_pct,frag_pct\n";
    let (mut summary, mut curve) = (header.to_owned(), header.to_owned());
    for r in results {
        for pct in 0..=MAX_ARRIVED_PCT {
            let line = format!(
                "{},{},{},{pct},{},{}\n",
                r.trace,
                r.policy,
                r.seed,
                fmt_opt(r.curve.unallocated_pct[pct]),
                fmt_opt(r.curve.frag_pct[pct])
            );
            if SUMMARY_POINTS.contains(&pct) {
                summary.push_str(&line);
            }
            curve.push_str(&line);
        }
    }
    write(&dir.join("summary.csv"), &summary)?;
    write(&dir.join("curve.csv"), &curve)
}

/// Per trace and policy (in first-seen order), the values at `pct` over seeds.
/// One policy's values over seeds: (policy, unallocated %, frag %).
type PolicyValues = (String, Vec<f64>, Vec<f64>);

fn at(results: &[RunResult], pct: usize) -> Vec<(String, Vec<PolicyValues>)> {
    let mut out: Vec<(String, Vec<PolicyValues>)> = Vec::new();
    for r in results {
        let ti = if let Some(i) = out.iter().position(|(t, _)| *t == r.trace) {
            i
        } else {
            out.push((r.trace.clone(), Vec::new()));
            out.len() - 1
        };
        let t = &mut out[ti].1;
        let p = match t.iter().position(|(p, _, _)| *p == r.policy) {
            Some(i) => i,
            None => {
                t.push((r.policy.clone(), Vec::new(), Vec::new()));
                t.len() - 1
            }
        };
        if let Some(u) = r.curve.unallocated_pct[pct] {
            t[p].1.push(u);
        }
        if let Some(f) = r.curve.frag_pct[pct] {
            t[p].2.push(f);
        }
    }
    out
}

/// The table printed after a run: per trace, per policy, unallocated GPU % at 100 % arrived (mean ± sd
/// over seeds), the paper's value where it has one, and fragmentation %.
#[must_use]
pub fn table(results: &[RunResult]) -> String {
    let mut s = String::new();
    for (trace, policies) in at(results, 100) {
        let _ = writeln!(
            s,
            "\ntrace {trace}: unallocated GPU % at 100 % arrived workload (mean ± sd over seeds)"
        );
        let _ = writeln!(
            s,
            "{:<10} {:>6} {:>16} {:>16} {:>10}",
            "policy", "seeds", "ours", "paper", "frag %"
        );
        for (policy, un, fr) in policies {
            let (m, sd) = mean_sd(&un);
            let paper = paper_value(&trace, &policy, 100)
                .map_or_else(|| "-".to_owned(), |(pm, psd)| format!("{pm:.2} ± {psd:.2}"));
            let (fm, _) = mean_sd(&fr);
            let _ = writeln!(
                s,
                "{policy:<10} {:>6} {:>16} {paper:>16} {fm:>10.2}",
                un.len(),
                format!("{m:.2} ± {sd:.2}")
            );
        }
    }
    s
}

/// Plots the median (over seeds) unallocated GPU % against arrived workload, one line per policy, for
/// one trace, into an SVG file.
///
/// # Errors
/// [`Error::Plot`] naming the file.
pub fn plot(path: &Path, trace: &str, results: &[RunResult]) -> Result<()> {
    let perr = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in results.iter().filter(|r| r.trace == trace) {
        if !order.contains(&r.policy) {
            order.push(r.policy.clone());
        }
    }
    let (x0, x1) = (75usize, MAX_ARRIVED_PCT);
    let mut ymax: f64 = 1.0;
    for policy in &order {
        let pts: Vec<(f64, f64)> = (x0..=x1)
            .filter_map(|pct| {
                let vals: Vec<f64> = results
                    .iter()
                    .filter(|r| r.trace == trace && &r.policy == policy)
                    .filter_map(|r| r.curve.unallocated_pct[pct])
                    .collect();
                median(vals).map(|m| (pct as f64, m))
            })
            .collect();
        ymax = pts.iter().map(|p| p.1).fold(ymax, f64::max);
        series.insert(policy.clone(), pts);
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Unallocated GPU % vs arrived workload — trace {trace} (median over seeds)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(x0 as f64..x1 as f64, 0.0..(ymax * 1.05).min(100.0))
        .map_err(|e| perr(&e))?;
    chart
        .configure_mesh()
        .x_desc("arrived workload, % of cluster GPU capacity")
        .y_desc("unallocated GPU, %")
        .draw()
        .map_err(|e| perr(&e))?;
    for (k, policy) in order.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts = series.remove(policy).unwrap_or_default();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| perr(&e))?
            .label(policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| perr(&e))?;
    root.present().map_err(|e| perr(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_values_are_read_from_the_embedded_summary() {
        assert_eq!(paper_value("default", "fgd", 100), Some((4.77, 0.11)));
        assert_eq!(paper_value("default", "bestfit", 100), Some((7.14, 0.14)));
        assert_eq!(paper_value("gpushare40", "fgd", 100), Some((6.04, 0.07)));
        assert_eq!(paper_value("default", "binpack", 100), None);
    }

    #[test]
    fn mean_and_sample_sd() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((sd - 1.290_994_448_735_805_6).abs() < 1e-12);
    }
}
