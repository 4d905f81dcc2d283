//! `cargo xtask plots [--reuse]`: PNG plots of the agent's utilisation and chargeback series, queried
//! from a real Prometheus, written to `docs/img/`.
//!
//! 1. Runs the ignored test `plot_scenario` of `agent/tests/dashboards.rs` (root: eBPF, FUSE, cgroups;
//!    `HAMI_REQUIRE_PRIVILEGED=1`, so a missing privilege fails instead of skipping). It starts the
//!    simulated node, the agent binary with the fake NVML, and a Prometheus scraping it every second
//!    into `$HAMI_PLOTS_DIR/tsdb` (default `target/plots/tsdb`), runs three pods for about a minute,
//!    and writes the time window and the containers' names to `$HAMI_PLOTS_DIR/window.json`.
//!    `--reuse` skips this step and plots the data the last run left.
//! 2. Starts Prometheus on that TSDB (no scrape targets) and reads the series with
//!    `/api/v1/query_range`: SM utilisation (`rate(hami_container_sm_seconds_total[5s])`), device
//!    memory, and the chargeback counters (`hami_container_device_memory_byte_seconds_total`,
//!    `hami_container_sm_seconds_total`), the queries the Grafana dashboards use.
//! 3. Draws them with `plotters` on a bitmap at twice the size (text rasterised with `ab_glyph` from
//!    DejaVu Sans, Debian `fonts-dejavu-core`, or the TTF file named by `HAMI_PLOT_FONT`), scales it
//!    down (anti-aliasing) and writes PNG files with `png`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ab_glyph::{Font as _, FontVec, PxScale, ScaleFont as _, point};
use anyhow::{Context as _, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind, FontTransform,
};
use serde_json::Value;

/// Drawing happens at this multiple of the output size; the result is averaged down.
const SCALE: u32 = 2;

/// Where the scenario leaves its data.
fn plots_dir() -> PathBuf {
    std::env::var_os("HAMI_PLOTS_DIR").map_or_else(|| crate::root().join("target/plots"), PathBuf::from)
}

/// `cargo xtask plots [--reuse]`.
pub(crate) fn plots(args: &[&str]) -> Result<()> {
    let dir = plots_dir();
    if !args.contains(&"--reuse") {
        run_scenario(&dir)?;
    }
    let window: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("window.json"))
            .with_context(|| format!("{}: run `cargo xtask plots` without --reuse", dir.display()))?,
    )?;
    let start = window["start"].as_f64().context("window.json: start")?;
    let end = window["end"].as_f64().context("window.json: end")?;
    let names: BTreeMap<String, String> = serde_json::from_value(window["names"].clone())?;
    let font = load_font()?;
    let prom = Prometheus::start(&dir.join("tsdb"))?;
    let out = crate::root().join("docs/img");
    std::fs::create_dir_all(&out)?;
    let data = Data {
        prom: &prom,
        start,
        end,
        names: &names,
    };

    let util = data.series(
        "sum by (container_id, gpu) (rate(hami_container_sm_seconds_total[5s])) * 100",
        |l| data.container(l),
    )?;
    let mut gpus = data.series(
        "sum by (gpu) (rate(hami_container_sm_seconds_total[5s])) * 100",
        |l| format!("GPU {} (all containers)", l["gpu"].as_str().unwrap_or("?")),
    )?;
    for g in &mut gpus {
        g.dashed = true;
    }
    let mut all = util;
    all.extend(gpus);
    render(&out.join("sm-utilisation.png"), (1100, 460), &font, |root| {
        line_chart(
            root,
            "SM utilisation per container: rate(hami_container_sm_seconds_total[5s])",
            "% of one GPU's SMs",
            data.span(),
            110.0,
            &all,
            |s| {
                if s.dashed {
                    format!("peak {:.0} %", max_of(&s.points))
                } else {
                    format!("{:.0} % while busy (median)", busy_median(&s.points))
                }
            },
        )
    })?;

    let mem = data.series(
        "sum by (container_id, gpu) (hami_container_device_memory_bytes) / 1073741824",
        |l| data.container(l),
    )?;
    render(&out.join("device-memory.png"), (1100, 460), &font, |root| {
        line_chart(
            root,
            "Device memory per container: hami_container_device_memory_bytes",
            "GiB",
            data.span(),
            peak(&mem) * 1.15,
            &mem,
            |s| format!("peak {:.0} GiB", max_of(&s.points)),
        )
    })?;

    let bytes = data.series(
        "sum by (container_id) (hami_container_device_memory_byte_seconds_total) / 60 / 1073741824",
        |l| data.container(l),
    )?;
    let sm = data.series("sum by (container_id) (hami_container_sm_seconds_total)", |l| {
        data.container(l)
    })?;
    render(&out.join("chargeback.png"), (1400, 480), &font, |root| {
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        line_chart(
            &left,
            "Device memory charged: byte_seconds_total",
            "GiB-minutes (cumulative)",
            data.span(),
            peak(&bytes) * 1.15,
            &bytes,
            |s| format!("total {:.1} GiB·min", max_of(&s.points)),
        )?;
        line_chart(
            &right,
            "SM time charged: sm_seconds_total",
            "SM-seconds (cumulative)",
            data.span(),
            peak(&sm) * 1.15,
            &sm,
            |s| format!("total {:.1} SM·s", max_of(&s.points)),
        )
    })?;
    drop(prom);
    for f in ["sm-utilisation.png", "device-memory.png", "chargeback.png"] {
        eprintln!("wrote docs/img/{f}");
    }
    Ok(())
}

/// Runs the agent test that produces the data (root only).
fn run_scenario(dir: &Path) -> Result<()> {
    // The harness uses the tenant program, fake libcuda and fake NVML it finds in the target
    // directory; build them first so they are current.
    crate::run(
        &crate::cargo(),
        &[
            "build",
            "--locked",
            "-p",
            "hami-fake-cuda",
            "-p",
            "hami-fake-nvml",
        ],
    )?;
    let args = [
        "test",
        "--locked",
        "-p",
        "hami-agent",
        "--test",
        "dashboards",
        "--",
        "--ignored",
        "--exact",
        "plot_scenario",
        "--nocapture",
    ];
    eprintln!("+ HAMI_PLOTS_DIR={} cargo {}", dir.display(), args.join(" "));
    let st = Command::new(crate::cargo())
        .args(args)
        .env("HAMI_PLOTS_DIR", dir)
        .env("HAMI_REQUIRE_PRIVILEGED", "1")
        .current_dir(crate::root())
        .status()
        .context("running cargo test")?;
    if !st.success() {
        bail!("the plot scenario failed ({st}); it needs root (eBPF, FUSE, cgroups) and prometheus");
    }
    Ok(())
}

fn load_font() -> Result<FontVec> {
    let candidates: Vec<PathBuf> = std::env::var_os("HAMI_PLOT_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            ]
            .map(PathBuf::from),
        )
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .context("no DejaVu Sans (apt-get install fonts-dejavu-core) and HAMI_PLOT_FONT unset")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    FontVec::try_from_vec(bytes).with_context(|| format!("{}: not a TrueType font", path.display()))
}

// ---------------------------------------------------------------------------------------------------
// Prometheus on the scenario's TSDB.

struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(tsdb: &Path) -> Result<Self> {
        if !tsdb.exists() {
            bail!(
                "{}: no Prometheus data; run `cargo xtask plots` without --reuse",
                tsdb.display()
            );
        }
        let cfg = tsdb.with_file_name("prometheus-readonly.yml");
        std::fs::write(&cfg, "global:\n  scrape_interval: 15s\nscrape_configs: []\n")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus (apt-get install prometheus)")?;
        let p = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(port, "/-/ready").is_none() {
            if Instant::now() > deadline {
                bail!("prometheus on {} did not become ready", tsdb.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(p)
    }

    fn query_range(&self, expr: &str, start: f64, end: f64) -> Result<Vec<Value>> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            encode(expr)
        );
        let body = get(self.port, &path).with_context(|| format!("prometheus: {expr}"))?;
        let v: Value = serde_json::from_str(&body)?;
        if v["status"] != "success" {
            bail!("prometheus: {expr}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET over HTTP/1.0; `None` unless the answer is 200.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1)? == "200").then(|| rest.to_owned())
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Series.

struct Series {
    name: String,
    color: RGBColor,
    dashed: bool,
    /// (seconds since the window's start, value).
    points: Vec<(f64, f64)>,
}

struct Data<'a> {
    prom: &'a Prometheus,
    start: f64,
    end: f64,
    names: &'a BTreeMap<String, String>,
}

/// Colours of the scenario's containers (their names from `window.json`), then a fallback palette.
fn color(name: &str, i: usize) -> RGBColor {
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    match name.split_whitespace().next() {
        Some("train") => palette[0],
        Some("infer") => palette[1],
        Some("batch") => palette[2],
        Some("GPU") => RGBColor(110, 110, 110),
        _ => palette[i % palette.len()],
    }
}

impl Data<'_> {
    fn span(&self) -> f64 {
        (self.end - self.start).ceil()
    }

    /// A legend name for a container's series: its scenario name, pod UID and container ID ends, GPU.
    fn container(&self, labels: &Value) -> String {
        let cid = labels["container_id"].as_str().unwrap_or("?");
        let short = &cid[cid.len().saturating_sub(4)..];
        let name = self.names.get(cid).map_or("container", String::as_str);
        match labels["gpu"].as_str() {
            Some(g) => format!("{name} (ctr …{short}, GPU {g})"),
            None => format!("{name} (ctr …{short})"),
        }
    }

    fn series(&self, expr: &str, name: impl Fn(&Value) -> String) -> Result<Vec<Series>> {
        let result = self.prom.query_range(expr, self.start, self.end)?;
        if result.is_empty() {
            bail!("no data for `{expr}` in the scenario's window");
        }
        let mut out: Vec<Series> = result
            .iter()
            .map(|r| {
                let points = r["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        let t = p[0].as_f64()?;
                        let v = p[1].as_str()?.parse::<f64>().ok()?;
                        Some((t - self.start, v))
                    })
                    .collect();
                Series {
                    name: name(&r["metric"]),
                    color: BLACK,
                    dashed: false,
                    points,
                }
            })
            .collect();
        // In order of appearance (the GPU totals, drawn dashed, go last: the caller marks them).
        let first = |s: &Series| s.points.first().map_or(f64::MAX, |p| p.0);
        out.sort_by(|a, b| first(a).total_cmp(&first(b)).then_with(|| a.name.cmp(&b.name)));
        for (i, s) in out.iter_mut().enumerate() {
            s.color = color(&s.name, i);
        }
        Ok(out)
    }
}

/// The median of the samples above 1 (the plateau of a utilisation curve, without its ramps' noise).
fn busy_median(points: &[(f64, f64)]) -> f64 {
    let mut v: Vec<f64> = points.iter().map(|p| p.1).filter(|v| *v > 1.0).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn max_of(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|p| p.1).fold(0.0, f64::max)
}

fn peak(series: &[Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1e-9, f64::max)
}

// ---------------------------------------------------------------------------------------------------
// Drawing.

/// `n` output pixels in drawing pixels.
const fn px(n: u32) -> u32 {
    n * SCALE
}

fn font_px(n: u32) -> f64 {
    f64::from(px(n))
}

type Area<'a, 'f> = DrawingArea<Canvas<'a, 'f>, Shift>;

/// A line style (`stroke_width` alone is ambiguous here: `BackendStyle` is in scope for the backend).
fn stroke(color: RGBColor, width: u32) -> ShapeStyle {
    ShapeStyle {
        color: color.to_rgba(),
        filled: false,
        stroke_width: width,
    }
}

/// A line chart with a legend (name and last value) to the right of the plotting area.
fn line_chart(
    area: &Area<'_, '_>,
    title: &str,
    y_desc: &str,
    x_max: f64,
    y_max: f64,
    series: &[Series],
    summary: impl Fn(&Series) -> String,
) -> Result<()> {
    let name_style = ("sans-serif", font_px(12)).into_font().color(&BLACK);
    let value_style = ("sans-serif", font_px(12))
        .into_font()
        .color(&RGBColor(90, 90, 90));
    let swatch = px(22) + px(6);
    let mut legend_w = 0;
    for s in series {
        legend_w = legend_w
            .max(area.estimate_text_size(&s.name, &name_style)?.0)
            .max(area.estimate_text_size(&summary(s), &value_style)?.0);
    }
    let legend_w = legend_w + swatch + px(16);
    let (w, _) = area.dim_in_pixel();
    let (chart_area, legend_area) = area.split_horizontally(w.saturating_sub(legend_w));
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", font_px(15)))
        .margin(px(10))
        .x_label_area_size(px(40))
        .y_label_area_size(px(56))
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the scenario started")
        .y_desc(y_desc)
        .label_style(("sans-serif", font_px(12)))
        .axis_desc_style(("sans-serif", font_px(12)))
        .light_line_style(RGBColor(242, 242, 242))
        .bold_line_style(RGBColor(220, 220, 220))
        .axis_style(RGBColor(120, 120, 120))
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if y_max >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .draw()?;
    // Dashed totals first, so the containers' lines stay on top where they coincide.
    for s in series
        .iter()
        .filter(|s| s.dashed)
        .chain(series.iter().filter(|s| !s.dashed))
    {
        let style = stroke(s.color, if s.dashed { px(1) } else { px(2) });
        if s.dashed {
            chart.draw_series(DashedLineSeries::new(
                s.points.iter().copied(),
                px(6),
                px(4),
                style,
            ))?;
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        }
    }
    // Legend: a swatch, the series name, and its last value.
    let top = i32::try_from(px(46)).unwrap_or(0);
    let row = i32::try_from(px(40)).unwrap_or(1);
    let x0 = 0;
    for (i, s) in series.iter().enumerate() {
        let y = top + row * i32::try_from(i).unwrap_or(0);
        let sw = i32::try_from(px(22)).unwrap_or(0);
        let mid = y + i32::try_from(px(8)).unwrap_or(0);
        if s.dashed {
            legend_area.draw(&PathElement::new(
                vec![(x0, mid), (x0 + sw / 3, mid)],
                stroke(s.color, px(1)),
            ))?;
            legend_area.draw(&PathElement::new(
                vec![(x0 + 2 * sw / 3, mid), (x0 + sw, mid)],
                stroke(s.color, px(1)),
            ))?;
        } else {
            legend_area.draw(&PathElement::new(
                vec![(x0, mid), (x0 + sw, mid)],
                stroke(s.color, px(3)),
            ))?;
        }
        let tx = x0 + sw + i32::try_from(px(6)).unwrap_or(0);
        legend_area.draw_text(&s.name, &name_style, (tx, y))?;
        let label = summary(s);
        legend_area.draw_text(&label, &value_style, (tx, y + i32::try_from(px(16)).unwrap_or(0)))?;
    }
    Ok(())
}

/// Draws `w`×`h` output pixels with `draw` and writes them to `path` as PNG.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    font: &FontVec,
    draw: impl FnOnce(&Area<'_, '_>) -> Result<()>,
) -> Result<()> {
    let (bw, bh) = (px(w), px(h));
    let mut big = vec![255u8; usize::try_from(u64::from(bw) * u64::from(bh) * 3)?];
    {
        let canvas = Canvas {
            inner: BitMapBackend::with_buffer(&mut big, (bw, bh)),
            font,
        };
        let root = canvas.into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    // Box filter SCALE×SCALE → 1 (anti-aliasing for the lines, which plotters draws aliased).
    let (w_us, h_us, bw_us, s) = (w as usize, h as usize, bw as usize, SCALE as usize);
    let mut out = vec![0u8; w_us * h_us * 3];
    for y in 0..h_us {
        for x in 0..w_us {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..s {
                    for dx in 0..s {
                        sum += u32::from(big[((y * s + dy) * bw_us + x * s + dx) * 3 + c]);
                    }
                }
                out[(y * w_us + x) * 3 + c] = u8::try_from(sum / (s * s) as u32).unwrap_or(255);
            }
        }
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&out)?;
    writer.finish()?;
    Ok(())
}

/// A bitmap backend whose text is rasterised with `ab_glyph` (plotters' own bitmap text needs its
/// `ttf` or `ab_glyph` features, which would change how every other plotters user in the workspace
/// lays out text).
struct Canvas<'a, 'f> {
    inner: BitMapBackend<'a>,
    font: &'f FontVec,
}

impl Canvas<'_, '_> {
    /// Width, ascent and height of `text` at `size` pixels.
    fn layout(&self, text: &str, size: f64) -> (f32, f32, f32) {
        #[allow(clippy::cast_possible_truncation, reason = "font sizes are small")]
        let f = self.font.as_scaled(PxScale::from(size as f32));
        let mut w = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                w += f.kern(p, id);
            }
            w += f.h_advance(id);
            prev = Some(id);
        }
        (w, f.ascent(), f.ascent() - f.descent())
    }
}

type Fallible<E> = Result<(), DrawingErrorKind<E>>;

impl DrawingBackend for Canvas<'_, '_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Fallible<Self::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Fallible<Self::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Fallible<Self::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Fallible<Self::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Fallible<Self::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Fallible<Self::ErrorType> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Fallible<Self::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Fallible<Self::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Fallible<Self::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<T: BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, _, h) = self.layout(text, style.size());
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "pixels")]
        Ok((w.ceil() as u32, h.ceil() as u32))
    }

    #[allow(clippy::cast_possible_truncation, reason = "pixel coordinates")]
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> Fallible<Self::ErrorType> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let size = style.size();
        let (w, ascent, h) = self.layout(text, size);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let transform: FontTransform = style.transform();
        let scale = PxScale::from(size as f32);
        let f = self.font.as_scaled(scale);
        let mut coverage = Vec::new();
        let mut x = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                x += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(scale, point(x + dx, ascent + dy));
            x += f.h_advance(id);
            prev = Some(id);
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, cov| {
                    coverage.push((b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32, cov));
                });
            }
        }
        for (lx, ly, cov) in coverage {
            let (tx, ty) = transform.transform(lx, ly);
            let c = BackendColor {
                alpha: color.alpha * f64::from(cov.clamp(0.0, 1.0)),
                rgb: color.rgb,
            };
            self.inner.draw_pixel((pos.0 + tx, pos.1 + ty), c)?;
        }
        Ok(())
    }
}
