//! A PNG chart of the latency distributions: one empirical CDF per operation, on a log
//! time axis; hangar's solid, libvirt's dashed. Text is drawn with a system TrueType font
//! (Debian's `fonts-dejavu-core`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::report::Report;

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

/// Registers the first font found as `sans-serif`, once per process.
fn font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| format!("no font found (looked for {})", FONTS.join(", ")))?;
        let bytes = std::fs::read(path).map_err(|err| format!("{path}: {err}"))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
}

/// The step points of the empirical CDF of `samples`.
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| *v > 0.0).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut points = Vec::with_capacity(sorted.len() * 2);
    for (i, v) in sorted.iter().enumerate() {
        points.push((*v, i as f64 / n));
        points.push((*v, (i + 1) as f64 / n));
    }
    points
}

pub fn draw(path: &Path, report: &Report) -> Result<(), String> {
    font()?;
    let series: Vec<_> = report
        .series
        .iter()
        .filter(|s| !s.samples_ms.is_empty())
        .collect();
    if series.is_empty() {
        return Err("no latency samples".into());
    }
    let values = series
        .iter()
        .flat_map(|s| s.samples_ms.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo / 1.5, hi * 1.5);
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());

    let root = BitMapBackend::new(path, (1500, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot, legend) = root.split_horizontally(1000);
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            format!(
                "{} → answering, {} run, {}",
                report.service, report.mode, report.date
            ),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("share of samples at or under")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    let text = ("sans-serif", 14).into_font();
    legend
        .draw(&Text::new(
            "solid: hangar; dashed: libvirt, in the colour of the hangar row it compares with",
            (0, 24),
            text.clone(),
        ))
        .map_err(|e| err(&e))?;
    let mut color = 0;
    for (i, s) in series.iter().enumerate() {
        // A libvirt operation takes the colour of the hangar operation before it.
        if s.system != "libvirt" && i > 0 {
            color += 1;
        }
        let style = COLORS[color % COLORS.len()].stroke_width(2);
        let points = cdf(&s.samples_ms);
        if s.system == "libvirt" {
            chart.draw_series(DashedLineSeries::new(points, 8, 5, style))
        } else {
            chart.draw_series(LineSeries::new(points, style))
        }
        .map_err(|e| err(&e))?;
        let y = 60 + 26 * i as i32;
        let sample: Vec<(i32, i32)> = vec![(0, y), (34, y)];
        if s.system == "libvirt" {
            legend.draw(&DashedPathElement::new(sample, 6, 4, style))
        } else {
            legend.draw(&PathElement::new(sample, style))
        }
        .map_err(|e| err(&e))?;
        let label = format!(
            "{} (n={}, p50 {:.1} ms)",
            s.name,
            s.samples_ms.len(),
            s.summary.as_ref().map_or(f64::NAN, |s| s.p50_ms)
        );
        legend
            .draw(&Text::new(label, (42, y - 8), text.clone()))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn cdf_steps_up_to_one() {
        assert_eq!(
            cdf(&[20.0, 10.0]),
            [(10.0, 0.0), (10.0, 0.5), (20.0, 0.5), (20.0, 1.0)]
        );
        assert!(cdf(&[]).is_empty());
    }

    #[test]
    fn draws_a_png_when_a_font_is_installed() {
        if font().is_err() {
            eprintln!("no font: nothing to draw with");
            return;
        }
        let mut report = Report::new("tcg", "test", "http-static");
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        report.latency(
            "cold boot → answering",
            &ms(&[3000, 3200, 3900]),
            Some(("virsh create → answering", &ms(&[3500, 3600, 4100]))),
            None,
        );
        report.latency(
            "warm-pool grant → answering",
            &ms(&[20, 30, 70]),
            None,
            None,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::var_os("HANGAR_CHART_TEST_OUT")
            .map_or_else(|| dir.path().join("latency.png"), std::path::PathBuf::from);
        draw(&path, &report).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
    }
}
