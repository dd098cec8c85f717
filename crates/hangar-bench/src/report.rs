//! The benchmark's report: rows pairing each hangar figure with libvirt's where there is
//! one (ratios computed pair by pair, from the same run), the raw latency samples, a
//! markdown table, JSON, and a PNG chart of the latency distributions.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::stats::{Summary, ms, summary};

/// Prints a narrower benchmark's `report`: pretty JSON on stdout when `json`, else as
/// `table` prints it.
pub fn print_json_or<T: Serialize>(report: &T, json: bool, table: impl FnOnce(&T)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialize")
        );
    } else {
        table(report);
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub unit: &'static str,
    pub hangar: Option<f64>,
    /// libvirt's figure for the same thing, and the operation that gave it.
    pub libvirt: Option<f64>,
    pub libvirt_op: Option<String>,
    /// libvirt ÷ hangar: above 1, hangar is faster (times) or smaller (memory).
    pub ratio: Option<f64>,
    /// Why a figure is missing, or what qualifies it.
    pub note: Option<String>,
}

/// Latency samples of one operation, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub system: &'static str,
    pub summary: Option<Summary>,
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// RFC 3339, UTC, when the run ended.
    pub date: String,
    pub machine: String,
    /// 1-minute load average when the run started and when it ended.
    pub load_average: [f64; 2],
    pub accel: String,
    pub mode: String,
    pub service: String,
    pub seconds: f64,
    pub rows: Vec<Row>,
    pub series: Vec<Series>,
    /// Set-up steps taken and figures not available, in words.
    pub notes: Vec<String>,
    /// Everything else measured (sustained grants, throughput, placement, sizes).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn new(accel: &str, mode: &str, service: &str) -> Report {
        Report {
            date: String::new(),
            machine: crate::server::machine(),
            load_average: [crate::server::load_average(), f64::NAN],
            accel: accel.to_owned(),
            mode: mode.to_owned(),
            service: service.to_owned(),
            seconds: 0.0,
            rows: Vec::new(),
            series: Vec::new(),
            notes: Vec::new(),
            details: serde_json::Map::new(),
        }
    }

    /// Keeps the samples of an operation (once per name: an operation compared in two
    /// rows is one series); returns their summary.
    pub fn series(
        &mut self,
        name: &str,
        system: &'static str,
        samples: &[Duration],
    ) -> Option<Summary> {
        if let Some(known) = self.series.iter().find(|s| s.name == name) {
            return known.summary.clone();
        }
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        let summary = summary(&mut sorted);
        self.series.push(Series {
            name: name.to_owned(),
            system,
            summary: summary.clone(),
            samples_ms: samples.iter().map(|d| ms(*d)).collect(),
        });
        summary
    }

    /// Two rows (p50, p99) for a latency measured on both systems, or on hangar alone
    /// (`libvirt_op` None).
    pub fn latency(
        &mut self,
        metric: &str,
        hangar: &[Duration],
        libvirt_op: Option<(&str, &[Duration])>,
        note: Option<String>,
    ) {
        let h = self.series(&format!("hangar: {metric}"), "hangar", hangar);
        let l = libvirt_op.map(|(op, samples)| {
            (
                op.to_owned(),
                self.series(&format!("libvirt: {op}"), "libvirt", samples),
            )
        });
        for (quantile, pick) in [
            ("p50", (|s: &Summary| s.p50_ms) as fn(&Summary) -> f64),
            ("p99", |s: &Summary| s.p99_ms),
        ] {
            let hangar = h.as_ref().map(pick);
            let libvirt = l.as_ref().and_then(|(_, s)| s.as_ref().map(pick));
            let n = |s: &Option<Summary>| s.as_ref().map_or(0, |s| s.n);
            self.rows.push(Row {
                metric: match &h {
                    Some(s) => format!("{metric}, {quantile} (n={})", s.n),
                    None => format!("{metric}, {quantile}"),
                },
                unit: "ms",
                hangar,
                libvirt,
                libvirt_op: l.as_ref().map(|(op, s)| format!("{op} (n={})", n(s))),
                ratio: ratio(hangar, libvirt),
                note: note.clone(),
            });
        }
    }

    /// A row with one figure each (or hangar's alone).
    pub fn figure(
        &mut self,
        metric: &str,
        unit: &'static str,
        hangar: Option<f64>,
        libvirt: Option<(&str, Option<f64>)>,
        note: Option<String>,
    ) {
        let libvirt_value = libvirt.and_then(|(_, v)| v);
        self.rows.push(Row {
            metric: metric.to_owned(),
            unit,
            hangar,
            libvirt: libvirt_value,
            libvirt_op: libvirt.map(|(op, _)| op.to_owned()),
            ratio: ratio(hangar, libvirt_value),
            note,
        });
    }

    /// A row with one figure each where more is better (a capacity): its ratio is
    /// hangar ÷ libvirt, as its note says, so that above 1 still favours hangar.
    pub fn figure_more_is_better(
        &mut self,
        metric: &str,
        unit: &'static str,
        hangar: Option<f64>,
        libvirt: Option<(&str, Option<f64>)>,
    ) {
        let note = "more is better: the ratio is hangar ÷ libvirt";
        self.figure(metric, unit, hangar, libvirt, Some(note.into()));
        if let Some(row) = self.rows.last_mut() {
            row.ratio = ratio(row.libvirt, row.hangar);
        }
    }

    /// A figure hangar cannot give in this run, and why.
    pub fn unavailable(&mut self, metric: &str, why: &str) {
        self.rows.push(Row {
            metric: metric.to_owned(),
            unit: "",
            hangar: None,
            libvirt: None,
            libvirt_op: None,
            ratio: None,
            note: Some(format!("not available: {why}")),
        });
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hangar bench ({}): `{}` on {}, accel {}, {}; load average {:.2} at the start, {:.2} at the end; {:.0} s\n",
            self.mode,
            self.service,
            self.machine,
            self.accel,
            self.date,
            self.load_average[0],
            self.load_average[1],
            self.seconds
        );
        out.push_str("| metric | hangar | libvirt | libvirt ÷ hangar |\n|---|---|---|---|\n");
        for row in &self.rows {
            let value = |v: Option<f64>| v.map_or("—".to_owned(), |v| format_value(v, row.unit));
            let libvirt = match (&row.libvirt_op, row.libvirt) {
                (Some(op), Some(v)) => format!("{} ({op})", format_value(v, row.unit)),
                (Some(op), None) => format!("— ({op})"),
                (None, _) => "—".to_owned(),
            };
            let hangar = match (&row.note, row.hangar) {
                (Some(note), None) => note.clone(),
                (Some(note), Some(v)) => format!("{} ({note})", format_value(v, row.unit)),
                (None, v) => value(v),
            };
            let ratio = row.ratio.map_or("—".to_owned(), |r| format!("{r:.2}x"));
            let _ = writeln!(out, "| {} | {hangar} | {libvirt} | {ratio} |", row.metric);
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// `bench.md`, `bench.json` and `latency.png` in `dir`. A chart that cannot be drawn
    /// (no font) is noted in the report instead.
    pub fn write(&mut self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        if let Err(err) = crate::chart::draw(&dir.join("latency.png"), self) {
            self.notes.push(format!("no chart: {err}"));
        }
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text)
                .map_err(|err| format!("{}: {err}", dir.join(name).display()))
        };
        write("bench.md", self.markdown())?;
        write(
            "bench.json",
            serde_json::to_string_pretty(self).expect("serializable"),
        )
    }
}

fn ratio(hangar: Option<f64>, libvirt: Option<f64>) -> Option<f64> {
    match (hangar, libvirt) {
        (Some(h), Some(l)) if h > 0.0 => Some(l / h),
        _ => None,
    }
}

fn format_value(v: f64, unit: &str) -> String {
    let number = if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        number
    } else {
        format!("{number} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pair_figures_and_ratios() {
        let mut report = Report::new("tcg", "quick", "http-static");
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        report.latency(
            "cold boot → answering",
            &ms(&[100, 200, 300]),
            Some(("virsh create → answering", &ms(&[400, 400, 400]))),
            None,
        );
        report.figure("placement decisions/s", "/s", Some(1234.5), None, None);
        report.unavailable(
            "wake from archive, delta tier",
            "the server refused tier delta",
        );
        assert_eq!(report.rows.len(), 4);
        assert_eq!(report.rows[0].ratio, Some(2.0));
        assert_eq!(report.rows[1].hangar, Some(300.0));
        let md = report.markdown();
        assert!(
            md.contains("| cold boot → answering, p50 (n=3) | 200.0 ms | 400.0 ms (virsh create → answering (n=3)) | 2.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| placement decisions/s | 1234 /s | — | — |"),
            "{md}"
        );
        assert!(
            md.contains("not available: the server refused tier delta"),
            "{md}"
        );
        assert_eq!(report.series.len(), 2);
        assert_eq!(report.series[1].samples_ms, [400.0, 400.0, 400.0]);
    }
}
