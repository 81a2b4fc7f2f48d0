//! The plots, drawn with plotters: the latency CDF (`bench-cdf.svg`: one panel per client form,
//! one curve per system, on a log-scaled RTT axis), the NBD bars (`bench-nbd.svg`) and the TCP
//! throughput bars (`bench-tcp.svg`).

use std::path::Path;

use super::Report;
use super::nbd::NbdSection;
use crate::bench::measure::ClientForm;

/// The series colours of every plot, in order (matplotlib's first eight).
const PALETTE: [plotters::style::RGBColor; 8] = {
    use plotters::style::RGBColor;
    [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ]
};

/// Draws the latency CDF (log-scaled x axis) of every system's UDP ping-pong at `size`, one
/// panel per client form, into an SVG file.
pub fn plot_cdf(report: &Report, size: usize, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;

    let forms = report.settings.client_forms.clone();
    let series: Vec<(String, ClientForm, Vec<f64>)> = report
        .systems
        .iter()
        .flat_map(|system| {
            forms.iter().filter_map(move |&form| {
                let run = system.udp_run(size, form)?;
                Some((system.label.clone(), form, run.cdf_us.clone()))
            })
        })
        .collect();
    if series.is_empty() {
        return Err("no UDP ping-pong run to plot".to_string());
    }
    let positive = |v: &f64| v.is_finite() && *v > 0.0;
    let low = series
        .iter()
        .flat_map(|(_, _, cdf)| cdf.iter().copied().filter(positive))
        .fold(f64::INFINITY, f64::min);
    // The x axis ends past the largest p99.9: the last 0.1% (single outliers up to a second
    // on a shared machine) would squeeze everything else into a corner. The JSON has them.
    let high = series
        .iter()
        .filter_map(|(_, _, cdf)| cdf.get(cdf.len().saturating_sub(2)).copied())
        .filter(positive)
        .fold(0.0, f64::max);
    let (low, high) = (low * 0.8, high * 1.5);
    let labels: Vec<String> = {
        let mut labels: Vec<String> = series.iter().map(|(l, _, _)| l.clone()).collect();
        labels.dedup();
        labels
    };
    let width = 560 * forms.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    let error = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let panels = root.split_evenly((1, forms.len().max(1)));
    for (panel, &form) in panels.iter().zip(&forms) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "UDP echo RTT CDF to p99.9, {size} B, {} client ({})",
                    form.as_str(),
                    report.environment.accelerator
                ),
                ("sans-serif", 17),
            )
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(48)
            .build_cartesian_2d((low..high).log_scale(), 0.0..1.0)
            .map_err(|e| error(&e))?;
        chart
            .configure_mesh()
            .x_desc("round-trip time (us, log scale)")
            .y_desc("fraction of round trips")
            .x_label_formatter(&|v| {
                if *v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .draw()
            .map_err(|e| error(&e))?;
        for (label, series_form, cdf) in &series {
            if *series_form != form {
                continue;
            }
            let index = labels.iter().position(|l| l == label).unwrap_or(0);
            let color = PALETTE[index % PALETTE.len()];
            let points: Vec<(f64, f64)> = cdf
                .iter()
                .enumerate()
                .filter(|(_, v)| positive(v) && **v <= high)
                .map(|(i, &v)| (v, i as f64 / (cdf.len() - 1).max(1) as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| error(&e))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| error(&e))?;
    }
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// One number of an NBD figure.
type FigureValue = fn(&super::nbd::NbdFigure) -> f64;

/// Draws the NBD section as grouped bars, one group per figure and one bar per target: IOPS
/// in the upper panel, p50 request latency in the lower one.
pub fn plot_nbd(section: &NbdSection, accelerator: &str, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;

    let mut keys: Vec<String> = Vec::new();
    for target in &section.targets {
        for figure in &target.figures {
            if !keys.contains(&figure.name()) {
                keys.push(figure.name());
            }
        }
    }
    if keys.is_empty() {
        return Err("no NBD figure to plot".to_string());
    }
    let error = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let panels = root.split_evenly((2, 1));
    let metrics: [(&str, FigureValue); 2] = [
        ("requests per second (4 KiB)", |f| f.iops),
        ("p50 request latency (us)", |f| f.latency.p50_us),
    ];
    let bars = section.targets.len().max(1) as f64;
    for (panel, (title, metric)) in panels.iter().zip(metrics) {
        let high = section
            .targets
            .iter()
            .flat_map(|t| t.figures.iter().map(metric))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15;
        let names = keys.clone();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("NBD {title}, {accelerator}"), ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..keys.len() as f64, 0.0..high.max(1.0))
            .map_err(|e| error(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(keys.len() * 2 + 1)
            .x_label_formatter(&move |v| {
                let index = v.floor() as usize;
                if (v - v.floor() - 0.5).abs() < 0.01 {
                    names.get(index).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(title)
            .draw()
            .map_err(|e| error(&e))?;
        for (slot, target) in section.targets.iter().enumerate() {
            let color = PALETTE[slot % PALETTE.len()];
            let width = 0.8 / bars;
            let rectangles: Vec<Rectangle<(f64, f64)>> = target
                .figures
                .iter()
                .filter_map(|figure| {
                    let index = keys.iter().position(|k| *k == figure.name())? as f64;
                    let left = index + 0.1 + slot as f64 * width;
                    Some(Rectangle::new(
                        [(left, 0.0), (left + width, metric(figure))],
                        color.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(rectangles)
                .map_err(|e| error(&e))?
                .label(target.label.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| error(&e))?;
    }
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// Draws the TCP echo throughput (MB/s) of every system as grouped bars, one group per
/// connection count, into an SVG file.
pub fn plot_tcp(report: &Report, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;

    let counts = report.settings.tcp_connections.clone();
    let systems: Vec<&super::SystemResult> = report
        .systems
        .iter()
        .filter(|s| !s.tcp.is_empty())
        .collect();
    if systems.is_empty() || counts.is_empty() {
        return Err("no TCP throughput run to plot".to_string());
    }
    let high = systems
        .iter()
        .flat_map(|s| s.tcp.iter().map(|r| r.result.mb_per_s))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let slots = systems.len() + 1;
    let groups = counts.len();
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    let error = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "TCP echo throughput, {} MiB each way per connection ({})",
                report.settings.tcp_bytes_each >> 20,
                report.environment.accelerator
            ),
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..(groups * slots) as f64, 0.0..high)
        .map_err(|e| error(&e))?;
    let groups_desc = counts
        .iter()
        .map(|n| format!("{n} connection{}", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join("  |  ");
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc(format!("left to right: {groups_desc}"))
        .y_desc("MB/s echoed (each way)")
        .draw()
        .map_err(|e| error(&e))?;
    for (index, system) in systems.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = counts
            .iter()
            .enumerate()
            .filter_map(|(group, &n)| {
                let run = system.tcp_run(n)?;
                let left = (group * slots + index) as f64 + 0.5;
                Some(Rectangle::new(
                    [(left, 0.0), (left + 0.9, run.result.mb_per_s)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| error(&e))?
            .label(system.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}
