//! Throughput and latency over time, as one SVG per scenario.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{ScenarioResult, Series};

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

pub fn plot(result: &ScenarioResult, path: &Path) -> anyhow::Result<()> {
    let panels: Vec<(&str, &[Series])> = [
        ("throughput", result.throughput.as_slice()),
        ("latency", result.latency.as_slice()),
    ]
    .into_iter()
    .filter(|(_, s)| s.iter().any(|s| !s.points.is_empty()))
    .collect();
    let height = 320 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    if panels.is_empty() {
        root.titled(
            &format!("{}: no time series", result.scenario),
            ("sans-serif", 18),
        )?;
        root.present()?;
        return Ok(());
    }
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (kind, series)) in areas.iter().zip(panels) {
        let unit = series.first().map(|s| s.unit.as_str()).unwrap_or(kind);
        draw_panel(
            area,
            &format!("{}: {unit} over time", result.scenario),
            series,
        )?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (1e-9f64, 1e-9f64);
    for (x, y) in points {
        if x.is_finite() && y.is_finite() {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
    }
    let unit = series.first().map(|s| s.unit.as_str()).unwrap_or("");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.02, 0f64..y_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit)
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite()),
                color.stroke_width(2),
            ))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
