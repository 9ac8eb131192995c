//! The training curve: loss and the validation metric per epoch, as a PNG.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::train::EpochReport;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a system TrueType font once (plotters draws text with it).
pub(crate) fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = FONT_PATHS
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!("no font at {FONT_PATHS:?} (install Debian's fonts-dejavu-core)")
                })?;
            plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| "the font file is not a usable TrueType font".to_string())
        })
        .clone()
}

/// Draws `loss` and `metric` per epoch side by side; `best_epoch` is marked.
pub fn training_curve(
    path: &Path,
    title: &str,
    metric_name: &str,
    epochs: &[EpochReport],
    best_epoch: usize,
) -> Result<(), String> {
    font()?;
    let root = BitMapBackend::new(path, (1100, 420)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(550);
    let last = epochs.len().max(2) as f64;
    let panels = [
        (
            left,
            "training loss",
            epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>(),
            RED,
        ),
        (
            right,
            metric_name,
            epochs.iter().map(|e| e.validation).collect(),
            BLUE,
        ),
    ];
    for (area, name, values, color) in panels {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let (lo, hi) = if finite.is_empty() {
            (0.0, 1.0)
        } else {
            (lo - pad, hi + pad)
        };
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{name} per epoch"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(1f64..last, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(name)
            .draw()
            .map_err(|e| err(&e))?;
        let points: Vec<(f64, f64)> = epochs
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_finite())
            .map(|(e, v)| (e.epoch as f64, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(&e))?;
        if let Some(best) = points.iter().find(|p| p.0 as usize == best_epoch) {
            chart
                .draw_series(std::iter::once(Circle::new(
                    *best,
                    7,
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
