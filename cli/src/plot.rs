//! `flamectl metrics --plot FILE.png|.svg`: the per-round figures as a chart
//! (plotters): test accuracy and loss on top, participants and round time below.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use flame_projections::render::MetricsRow;

/// Draws the chart into `path`; the extension picks PNG or SVG.
pub fn draw(path: &Path, title: &str, rows: &[MetricsRow]) -> anyhow::Result<()> {
    if rows.is_empty() {
        bail!("the job has no rounds yet: nothing to plot");
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => {
            let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
            charts(&root, title, rows)?;
            root.present().with_context(|| format!("writing {}", path.display()))?;
        }
        Some("svg") => {
            let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
            charts(&root, title, rows)?;
            root.present().with_context(|| format!("writing {}", path.display()))?;
        }
        _ => bail!("cannot plot to '{}': name a .png or .svg file", path.display()),
    }
    Ok(())
}

fn series(rows: &[MetricsRow], f: impl Fn(&MetricsRow) -> Option<f64>) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (f64::from(r.round), v))).collect()
}

/// Round labels only at whole rounds.
fn whole(x: &f64) -> String {
    if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() }
}

fn upper(points: &[&[(f64, f64)]]) -> f64 {
    let max = points.iter().flat_map(|p| p.iter().map(|(_, y)| *y)).fold(0.0_f64, f64::max);
    if max > 0.0 { max * 1.1 } else { 1.0 }
}

fn charts<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, rows: &[MetricsRow]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(400);
    let last = rows.iter().map(|r| r.round).max().unwrap_or(1).max(1);
    let x = 0.5..(f64::from(last) + 0.5);

    let accuracy = series(rows, |r| r.metrics.get("accuracy").copied());
    let loss = series(rows, |r| r.metrics.get("loss").copied());
    let train_loss = series(rows, |r| r.train_loss);
    let mut c = ChartBuilder::on(&top)
        .margin(10)
        .caption("model quality by round", ("sans-serif", 18))
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x.clone(), 0.0..upper(&[&accuracy, &loss, &train_loss]))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh().x_desc("round").x_label_formatter(&whole).y_desc("value").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, points, color) in [("test accuracy", &accuracy, BLUE), ("test loss", &loss, RED), ("train loss", &train_loss, MAGENTA)] {
        if points.is_empty() {
            continue;
        }
        c.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        c.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow::anyhow!("{e}"))?;

    let participants = series(rows, |r| Some(r.participants as f64));
    let seconds = series(rows, |r| r.seconds);
    let mut c = ChartBuilder::on(&bottom)
        .margin(10)
        .caption("participants and round time", ("sans-serif", 18))
        .x_label_area_size(35)
        .y_label_area_size(50)
        .right_y_label_area_size(50)
        .build_cartesian_2d(x.clone(), 0.0..upper(&[&participants]))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .set_secondary_coord(x, 0.0..upper(&[&seconds]));
    c.configure_mesh().x_desc("round").x_label_formatter(&whole).y_desc("participants").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_secondary_axes().y_desc("seconds").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    c.draw_series(participants.iter().map(|&(r, n)| Rectangle::new([(r - 0.3, 0.0), (r + 0.3, n)], GREEN.mix(0.5).filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("participants")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], GREEN.mix(0.5).filled()));
    c.draw_secondary_series(LineSeries::new(seconds.iter().copied(), BLACK.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("round seconds")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Named lines over rounds in one chart (`flamectl whatif --plot`); the extension picks PNG or SVG.
pub fn lines(path: &Path, title: &str, named: &[(&str, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let points: Vec<&(f64, f64)> = named.iter().flat_map(|(_, p)| p.iter()).collect();
    if points.is_empty() {
        bail!("nothing to plot: no round has these figures (was the held-out data readable? see --data-root)");
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => {
            let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
            line_chart(&root, title, named)?;
            root.present().with_context(|| format!("writing {}", path.display()))?;
        }
        Some("svg") => {
            let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
            line_chart(&root, title, named)?;
            root.present().with_context(|| format!("writing {}", path.display()))?;
        }
        _ => bail!("cannot plot to '{}': name a .png or .svg file", path.display()),
    }
    Ok(())
}

/// Zero, or below the lowest value when some are negative.
fn lower(points: &[&[(f64, f64)]]) -> f64 {
    let min = points.iter().flat_map(|p| p.iter().map(|(_, y)| *y)).fold(0.0_f64, f64::min);
    if min < 0.0 { min * 1.1 } else { 0.0 }
}

fn line_chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, named: &[(&str, Vec<(f64, f64)>)]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let last = named.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)).fold(1.0_f64, f64::max);
    let all: Vec<&[(f64, f64)]> = named.iter().map(|(_, p)| p.as_slice()).collect();
    let mut c = ChartBuilder::on(root)
        .margin(10)
        .caption(title, ("sans-serif", 20))
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5..(last + 0.5), lower(&all)..upper(&all))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh().x_desc("round").x_label_formatter(&whole).y_desc("value").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    let colors = [BLUE, CYAN, RED, MAGENTA, GREEN, BLACK];
    for (i, (name, points)) in named.iter().enumerate().filter(|(_, (_, p))| !p.is_empty()) {
        let color = colors[i % colors.len()];
        c.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
