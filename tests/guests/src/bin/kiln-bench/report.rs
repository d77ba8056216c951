//! Medians, Kiln/QEMU ratios and the Markdown report.

use std::fmt::Write as _;

/// Median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

/// One line of the results table: medians per VMM.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured, with its unit.
    pub metric: String,
    /// Kiln's median.
    pub kiln: Option<f64>,
    /// The other column's median (QEMU, or the floor).
    pub qemu: Option<f64>,
    /// Number of samples behind each median.
    pub samples: usize,
}

impl Row {
    /// A row from raw samples of both VMMs.
    pub fn from_samples(metric: impl Into<String>, kiln: &[f64], qemu: &[f64]) -> Self {
        Row {
            metric: metric.into(),
            kiln: median(kiln),
            qemu: median(qemu),
            samples: kiln.len().max(qemu.len()),
        }
    }

    /// Kiln / QEMU, when both exist and QEMU's is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.kiln, self.qemu) {
            (Some(kiln), Some(qemu)) if qemu != 0.0 => Some(kiln / qemu),
            _ => None,
        }
    }
}

/// Formats a value with a precision suited to its size.
pub fn format_value(value: Option<f64>) -> String {
    match value {
        None => "–".to_string(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The results as a Markdown table; `other` names the column compared with Kiln.
pub fn table(rows: &[Row], other: &str, ratio_title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| Metric | Kiln | {other} | {ratio_title} | n |");
    out.push_str("|---|---:|---:|---:|---:|\n");
    for row in rows {
        let ratio = row
            .ratio()
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "–".to_string());
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.metric,
            format_value(row.kiln),
            format_value(row.qemu),
            ratio,
            row.samples
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn table_has_ratio_and_dashes() {
        let rows = vec![
            Row::from_samples("start (ms)", &[10.0, 30.0, 20.0], &[40.0]),
            Row::from_samples("leak (count)", &[0.0], &[]),
        ];
        let text = table(&rows, "QEMU microvm", "Kiln/QEMU");
        assert!(
            text.contains("| start (ms) | 20.0 | 40.0 | 0.50 | 3 |"),
            "{text}"
        );
        assert!(
            text.contains("| leak (count) | 0.00 | – | – | 1 |"),
            "{text}"
        );
    }
}
