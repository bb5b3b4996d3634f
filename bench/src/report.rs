//! Results: JSON next to an SVG plot, a table on the terminal, and the
//! tables in BENCHMARKS.md between markers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::sys::Machine;

/// One reported figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The target, in words (e.g. "≥ 1,000,000 rec/s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Whether the target was met, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// A time series for the plot: seconds since the start, value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub unit: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub quick: bool,
    pub machine: Machine,
    /// UTC, RFC 3339.
    pub finished_at: String,
    /// 1-minute load average when the scenario ended (other work on the machine).
    pub load_average_at_end: f64,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    pub throughput: Vec<Series>,
    pub latency: Vec<Series>,
}

impl ScenarioResult {
    pub fn new(scenario: &str, quick: bool, machine: &Machine) -> Self {
        Self {
            scenario: scenario.into(),
            quick,
            machine: machine.clone(),
            finished_at: String::new(),
            load_average_at_end: 0.0,
            figures: Vec::new(),
            notes: Vec::new(),
            throughput: Vec::new(),
            latency: Vec::new(),
        }
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            target: None,
            met: None,
        });
    }

    /// A figure with a target; `met` says whether `value` meets it.
    pub fn target(&mut self, name: &str, value: f64, unit: &str, target: &str, met: bool) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            target: Some(target.into()),
            met: Some(met),
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn finish(&mut self) {
        self.finished_at = now_rfc3339();
        self.load_average_at_end = crate::sys::load_average();
    }

    /// Writes `<dir>/<scenario>.json` and `<dir>/<scenario>.svg`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let svg = dir.join(format!("{}.svg", self.scenario));
        crate::plot::plot(self, &svg)?;
        Ok((json, svg))
    }

    pub fn print(&self) {
        println!(
            "\n{}{}  (load average {:.1} → {:.1})",
            self.scenario,
            if self.quick { " [quick]" } else { "" },
            self.machine.load_average_at_start,
            self.load_average_at_end
        );
        let width = self
            .figures
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(10);
        for f in &self.figures {
            let target = match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("   target {t}: met"),
                (Some(t), _) => format!("   target {t}: MISSED"),
                _ => String::new(),
            };
            println!(
                "  {:width$}  {}{target}",
                f.name,
                format_value(f.value, &f.unit)
            );
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }

    fn markdown(&self, results_rel: &str) -> String {
        let mut md = String::new();
        md.push_str(&format!("### `{}`\n\n", self.scenario));
        md.push_str(&format!(
            "Run {} (load average {:.1} at start, {:.1} at end). Plot: [{rel}/{s}.svg]({rel}/{s}.svg), data: [{rel}/{s}.json]({rel}/{s}.json).\n\n",
            self.finished_at,
            self.machine.load_average_at_start,
            self.load_average_at_end,
            rel = results_rel,
            s = self.scenario
        ));
        md.push_str("| figure | value | target |\n|---|---|---|\n");
        for f in &self.figures {
            let target = match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("{t}: met"),
                (Some(t), _) => format!("{t}: **missed**"),
                _ => String::new(),
            };
            md.push_str(&format!(
                "| {} | {} | {} |\n",
                f.name,
                format_value(f.value, &f.unit),
                target
            ));
        }
        if !self.notes.is_empty() {
            md.push('\n');
            for n in &self.notes {
                md.push_str(&format!("* {n}\n"));
            }
        }
        md.push('\n');
        md
    }
}

/// A number with its unit, readable: thousands separated, sensible precision.
pub fn format_value(value: f64, unit: &str) -> String {
    let number = if !value.is_finite() {
        "n/a".to_string()
    } else if value.abs() >= 1000.0 {
        group_thousands(value.round() as i64)
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else if value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    };
    if unit.is_empty() {
        number
    } else {
        format!("{number} {unit}")
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub const BEGIN: &str =
    "<!-- edgefleet-bench:begin (generated by `edgefleet-bench`; edits here are overwritten) -->";
pub const END: &str = "<!-- edgefleet-bench:end -->";

/// Rewrites the generated region of BENCHMARKS.md from every result JSON in
/// `results` (scenarios not run this time keep their last published result).
pub fn update_benchmarks_md(md_path: &Path, results: &Path, order: &[&str]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(md_path)
        .with_context(|| format!("reading {}", md_path.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        anyhow::bail!(
            "{} has no generated region (lines `{BEGIN}` and `{END}`)",
            md_path.display()
        );
    };
    let mut region = String::from("\n");
    let mut machines: Vec<String> = Vec::new();
    let mut all = Vec::new();
    for scenario in order {
        let path = results.join(format!("{scenario}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let result: ScenarioResult =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let machine = result.machine.describe();
        if !machines.contains(&machine) {
            machines.push(machine);
        }
        all.push(result);
    }
    region.push_str(&format!("Machine: {}.\n\n", machines.join("; ")));
    let rel = results
        .strip_prefix(md_path.parent().unwrap_or(Path::new(".")))
        .unwrap_or(results)
        .display()
        .to_string();
    for result in &all {
        region.push_str(&result.markdown(&rel));
    }
    let new = format!(
        "{}{BEGIN}\n{}{END}{}",
        &text[..begin],
        region,
        &text[end + END.len()..]
    );
    std::fs::write(md_path, new).with_context(|| format!("writing {}", md_path.display()))
}
