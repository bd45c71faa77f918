//! The bench's results: printed as a table (median and min–max of each figure, ratios, and the
//! targets with PASS/MISS), and written as JSON for later comparison.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::stats::{summarize, CpuPerOrder, Summary, Throughput};

/// One measured figure.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Which case it belongs to (a heading in the table).
    pub section: String,
    /// What was measured.
    pub name: String,
    /// Unit of the samples.
    pub unit: String,
    /// The samples and their median and spread.
    #[serde(flatten)]
    pub summary: Summary,
    /// CPU per order, where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_per_order: Option<CpuPerOrder>,
}

/// The ratio of two medians.
#[derive(Debug, Serialize)]
pub struct Ratio {
    /// `a / b`, in words.
    pub name: String,
    /// The value.
    pub value: f64,
}

/// Which side of its threshold a target wants the figure on.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Higher is better.
    AtLeast,
    /// Lower is better.
    AtMost,
}

/// One target of the "Performance" issue, checked against this run's figures.
#[derive(Debug, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// This run's figure (NaN when its case was not run).
    pub measured: f64,
    /// The goal.
    pub goal: Goal,
    /// The threshold.
    pub threshold: f64,
    /// Unit of both.
    pub unit: String,
    /// Whether the figure is on the right side of the threshold.
    pub pass: bool,
}

/// Everything measured in one bench run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The settings and the machine, for reading the figures later.
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Every figure.
    pub rows: Vec<Row>,
    /// Ratios between figures.
    pub ratios: Vec<Ratio>,
    /// The targets.
    pub targets: Vec<Target>,
    /// Observations printed under the table.
    pub notes: Vec<String>,
}

impl Report {
    /// Records a context value (setting, machine fact).
    pub fn context(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.context.insert(key.to_owned(), value);
    }

    /// Records a figure and returns its median, which ratios and targets are made of.
    pub fn row(&mut self, section: &str, name: &str, unit: &str, summary: Summary) -> f64 {
        let median = summary.median;
        self.rows.push(Row {
            section: section.to_owned(),
            name: name.to_owned(),
            unit: unit.to_owned(),
            summary,
            cpu_per_order: None,
        });
        median
    }

    /// Records the throughput of `runs` in orders/s with the CPU it cost, and returns its median.
    pub fn throughput<T: Throughput>(&mut self, section: &str, name: &str, runs: &[T]) -> f64 {
        let median = self.row(section, name, "orders/s", summarize(runs, T::orders_per_sec));
        if let Some(row) = self.rows.last_mut() {
            row.cpu_per_order = Some(CpuPerOrder::of(runs));
        }
        median
    }

    /// Records `a / b`, and returns it.
    pub fn ratio(&mut self, name: &str, a: f64, b: f64) -> f64 {
        let value = a / b;
        self.ratios.push(Ratio { name: name.to_owned(), value });
        value
    }

    /// Records a target.
    pub fn target(&mut self, name: &str, measured: f64, goal: Goal, threshold: f64, unit: &str) {
        let pass = match goal {
            Goal::AtLeast => measured >= threshold,
            Goal::AtMost => measured <= threshold,
        };
        self.targets.push(Target { name: name.to_owned(), measured, goal, threshold, unit: unit.to_owned(), pass });
    }

    /// Records an observation.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The table, as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for row in &self.rows {
            if row.section != section {
                section = &row.section;
                let _ = writeln!(out, "\n{section}");
                let _ = writeln!(
                    out,
                    "  {:<46} {:>10} {:>19}  {:<9} {:>3} {:>13} {:>13}",
                    "case", "median", "min–max", "unit", "n", "client CPU", "server CPU"
                );
            }
            let s = &row.summary;
            let spread = format!("{}–{}", number(s.min), number(s.max));
            let us = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{} µs/ord", number(v)));
            let cpu = row.cpu_per_order;
            // A name too long for its column gets a line of its own, the figures the next.
            let name = if row.name.chars().count() > 46 {
                let _ = writeln!(out, "  {}", row.name);
                ""
            } else {
                &row.name
            };
            let _ = writeln!(
                out,
                "  {:<46} {:>10} {:>19}  {:<9} {:>3} {:>13} {:>13}",
                name,
                number(s.median),
                spread,
                row.unit,
                s.samples.len(),
                us(cpu.map(|c| c.client_us)),
                us(cpu.and_then(|c| c.server_us))
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(out, "\nratios (of medians)");
            for ratio in &self.ratios {
                let _ = writeln!(out, "  {:<44} {:>12}", ratio.name, format!("{:.2}×", ratio.value));
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets");
            for t in &self.targets {
                let goal = match t.goal {
                    Goal::AtLeast => "≥",
                    Goal::AtMost => "≤",
                };
                // n/a: the case giving the figure was not run (or measured nothing).
                let verdict = if !t.measured.is_finite() {
                    "n/a "
                } else if t.pass {
                    "PASS"
                } else {
                    "MISS"
                };
                let _ = writeln!(
                    out,
                    "  {verdict}  {:<44} {:>10} {:<12} target {goal} {} {}",
                    t.name,
                    number(t.measured),
                    t.unit,
                    number(t.threshold),
                    t.unit
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes");
            for note in &self.notes {
                let _ = writeln!(out, "  - {note}");
            }
        }
        out
    }

    /// Writes the JSON report, creating its directory.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// A figure for people: thousands separated when large, two significant decimals when small.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    if value.abs() >= 100.0 {
        let digits = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if value < 0.0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}
