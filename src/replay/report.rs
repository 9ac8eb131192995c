//! The replay's outputs: a markdown table per dataset and a PNG of HR@10 over
//! sliding windows of event time.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::Summary;
use super::VariantResult;

/// A peer's figures on the same stream (from `eval/replay_peers.py`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerResult {
    pub name: String,
    pub hr: Option<f64>,
    pub ndcg: Option<f64>,
    pub mrr: Option<f64>,
    pub rmse: Option<f64>,
    pub mae: Option<f64>,
    pub cases: u64,
    pub note: String,
}

/// Everything measured on one dataset.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub name: String,
    pub events: usize,
    pub users: usize,
    pub items: usize,
    pub cut: i64,
    pub window_days: f64,
    pub retrain_days: f64,
    pub variants: Vec<VariantResult>,
    pub peers: Vec<PeerResult>,
    /// Variants replayed over several simulated instances (`--instances`).
    pub instances: Vec<SplitResult>,
}

/// One variant replayed over `instances` simulated instances.
#[derive(Debug, Clone, Serialize)]
pub struct SplitResult {
    pub instances: usize,
    /// Whether the instances shared item knowledge (global item tables).
    pub global_items: bool,
    pub result: VariantResult,
}

fn f4(x: f64) -> String {
    format!("{x:.4}")
}

fn opt(x: Option<f64>) -> String {
    x.map_or("–".into(), f4)
}

/// The markdown section of one dataset.
pub fn markdown(r: &DatasetReport, anchor: Option<f64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {} ({} events, {} users, {} items; models trained at the half-way cut, retrained every {} days)\n",
        r.name, r.events, r.users, r.items, r.retrain_days
    );
    let _ = writeln!(
        s,
        "Second half of event time ({} cases). HR/NDCG/MRR on the top-10 list; carousels = the item in any row.\n",
        r.variants.first().map_or(0, |v| v.second_half.cases)
    );
    let _ = writeln!(s, "| variant | HR@10 | NDCG@10 | MRR | carousels HR | coverage | diversity | novelty | RMSE | MAE | seconds |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let best = r
        .variants
        .iter()
        .map(|v| v.second_half.hr)
        .chain(r.peers.iter().filter_map(|p| p.hr))
        .fold(0.0f64, f64::max);
    for v in &r.variants {
        let h = &v.second_half;
        let hr = if h.hr == best {
            format!("**{}**", f4(h.hr))
        } else {
            f4(h.hr)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.0} |",
            v.name,
            hr,
            f4(h.ndcg),
            f4(h.mrr),
            f4(h.carousel_hr),
            f4(h.coverage),
            f4(h.diversity),
            h.novelty,
            opt(h.rmse),
            opt(h.mae),
            v.seconds
        );
    }
    for p in &r.peers {
        let _ = writeln!(
            s,
            "| {} (peer) | {} | {} | {} | – | – | – | – | {} | {} | |",
            p.name,
            opt(p.hr),
            opt(p.ndcg),
            opt(p.mrr),
            opt(p.rmse),
            opt(p.mae)
        );
    }
    let _ = writeln!(s);
    let peers_with_notes: Vec<&PeerResult> =
        r.peers.iter().filter(|p| !p.note.is_empty()).collect();
    for p in peers_with_notes {
        let _ = writeln!(s, "- {}: {}", p.name, p.note);
    }
    let _ = writeln!(
        s,
        "- RMSE/MAE: `ncf-ratings-fold-in` is the engine's explicit NCF with fold-in after the cut; every other variant reports the online bias baseline (mean + damped user and item offsets, predict then learn), the same for all of them."
    );
    if let Some(pop) = r.variants.iter().find(|v| v.name == "popularity") {
        let _ = write!(
            s,
            "- Anchor: all-time popularity over **all** {} events: HR@10 = {}",
            pop.all.cases,
            f4(pop.all.hr)
        );
        match anchor {
            Some(a) => {
                let ok = (pop.all.hr - a).abs() <= 0.003;
                let _ = writeln!(
                    s,
                    " (published anchor ≈ {a}: {})",
                    if ok {
                        "reproduced within ±0.003"
                    } else {
                        "NOT reproduced"
                    }
                );
            }
            None => {
                let _ = writeln!(s);
            }
        }
    }
    if let Some(line) = goal(r) {
        let _ = writeln!(s, "{line}");
    }
    learned_blends(&mut s, r);
    history_targets(&mut s, r);
    let _ = writeln!(s);
    if !r.instances.is_empty() {
        instances_table(&mut s, r);
    }
    s
}

/// What each learned blend was fitted on and the weights it ended with.
fn learned_blends(s: &mut String, r: &DatasetReport) {
    for v in r.variants.iter().filter(|v| !v.blend_fits.is_empty()) {
        let (first, last) = (&v.blend_fits[0], &v.blend_fits[v.blend_fits.len() - 1]);
        let weights: Vec<String> = crate::ranker::FEATURES
            .iter()
            .zip(&last.weights)
            .map(|(f, w)| format!("{f} {w:.2}"))
            .collect();
        let _ = writeln!(
            s,
            "- {}: {} fits. The first, at the cut, on {} choice sets (the interactions of the quarter of event time before it; {} more whose item was not in the pool); validation (last tenth): the pick is first of its sampled set {:.1} % of the time with the learned weights, {:.1} % with the hand-set ones. Weights at the last fit ({} choice sets; features as in models/README.md#learned-blend): {}.",
            v.name,
            v.blend_fits.len(),
            first.report.cases,
            first.report.missed,
            first.report.validation_top1 * 100.0,
            first.report.validation_top1_hand_set * 100.0,
            last.report.cases,
            weights.join(", ")
        );
    }
}

/// Issue 21's targets on this dataset, from the rows present.
fn history_targets(s: &mut String, r: &DatasetReport) {
    let hr = |name: &str| {
        r.variants
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.second_half.hr)
    };
    let pct = |a: f64, b: f64| (a / b - 1.0) * 100.0;
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let small = r.name.contains("latest-small");
    let mut lines = Vec::new();
    if let (Some(model), Some(co)) = (hr("ncf-history"), hr("co-watched")) {
        lines.push(format!(
            "the model alone (`ncf-history`) {} against co-watch {} ({:+.1} %): **{}**",
            f4(model),
            f4(co),
            pct(model, co),
            verdict(model >= co)
        ));
    }
    let blends = ["full-blend-history", "learned-blend"];
    if let Some((name, best)) = blends
        .iter()
        .filter_map(|n| hr(n).map(|h| (*n, h)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        let target = if small { 0.12 } else { 0.23 };
        lines.push(format!(
            "the full blend, best of the two with the history model (`{name}`) {} against ≥ {target}: **{}**",
            f4(best),
            verdict(best >= target)
        ));
    }
    for (with, without) in [
        ("full-blend-history", "blend-no-model"),
        ("learned-blend", "learned-blend-no-model"),
    ] {
        if let (Some(a), Some(b)) = (hr(with), hr(without)) {
            lines.push(format!(
                "with the model against without it, `{with}` {} against `{without}` {} ({:+.1} %, target +5 %): **{}**",
                f4(a),
                f4(b),
                pct(a, b),
                verdict(pct(a, b) >= 5.0)
            ));
        }
    }
    for (learned, swept) in [
        ("learned-blend", "full-blend-history"),
        ("learned-blend-no-model", "blend-no-model"),
    ] {
        if let (Some(a), Some(b)) = (hr(learned), hr(swept)) {
            lines.push(format!(
                "the learned blend against the swept weights, `{learned}` {} against `{swept}` {} ({:+.1} %)",
                f4(a),
                f4(b),
                pct(a, b)
            ));
        }
    }
    if let Some(rmse) = r
        .variants
        .iter()
        .find(|v| v.name == "ncf-history-ratings")
        .and_then(|v| v.second_half.rmse)
    {
        let target = if small { 0.82 } else { 0.94 };
        let river = r
            .peers
            .iter()
            .find(|p| p.name.starts_with("river"))
            .and_then(|p| p.rmse)
            .map_or(String::new(), |x| format!(", river BiasedMF {}", f4(x)));
        lines.push(format!(
            "progressive RMSE of the rating head (`ncf-history-ratings`) {} against ≤ {target}{river}: **{}**",
            f4(rmse),
            verdict(rmse <= target)
        ));
    }
    if !lines.is_empty() {
        let _ = writeln!(s, "- Issue 21's targets here:");
        for l in lines {
            let _ = writeln!(s, "  - {l};");
        }
    }
}

/// Each split variant beside its one-instance run: what scaling out costs
/// the lists with and without global item tables.
fn instances_table(s: &mut String, r: &DatasetReport) {
    let _ = writeln!(
        s,
        "Scaled out (`--instances`): users hashed to one partition per simulated instance by the engine's partitioner; each list comes from its user's instance. *global* = instances share item knowledge through the global item tables (each one's changelog batches folded in by every other before the next event); *isolated* = each instance learns popularity, trending and co-watch from its own users only (the design before global item tables).\n"
    );
    let _ = writeln!(
        s,
        "| variant | instances | item knowledge | HR@10 | vs one instance | NDCG@10 | carousels HR | seconds |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|");
    for split in &r.instances {
        let v = &split.result;
        let one = r.variants.iter().find(|o| o.name == v.name);
        let delta = one.map_or("–".to_string(), |o| {
            format!(
                "{:+.1} %",
                (v.second_half.hr / o.second_half.hr.max(1e-12) - 1.0) * 100.0
            )
        });
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            v.name,
            split.instances,
            if split.global_items {
                "global"
            } else {
                "isolated"
            },
            f4(v.second_half.hr),
            delta,
            f4(v.second_half.ndcg),
            f4(v.second_half.carousel_hr),
            v.seconds
        );
    }
    let _ = writeln!(s);
}

/// Variants that blend several sources; every other variant is one source or
/// the model alone.
const BLENDS: [&str; 6] = [
    "blend-no-model",
    "full-blend",
    "full-blend-retrained",
    "full-blend-history",
    "learned-blend-no-model",
    "learned-blend",
];

/// The goal, checked on the figures: the full blend against every
/// single source and every peer (second-half HR@10).
fn goal(r: &DatasetReport) -> Option<String> {
    let full = r.variants.iter().find(|v| v.name == "full-blend")?;
    let rivals = r
        .variants
        .iter()
        .filter(|v| !BLENDS.contains(&v.name.as_str()))
        .map(|v| (v.name.clone(), v.second_half.hr))
        .chain(
            r.peers
                .iter()
                .filter_map(|p| p.hr.map(|hr| (format!("{} (peer)", p.name), hr))),
        );
    let (name, best) = rivals.fold((String::new(), f64::NEG_INFINITY), |a, b| {
        if b.1 > a.1 {
            b
        } else {
            a
        }
    });
    let hr = full.second_half.hr;
    Some(format!(
        "- Goal, the full blend above every single source and every peer: **{}**: full-blend {} against the best of them, {name}, {} ({:+.1} %).",
        if hr > best { "met" } else { "not met" },
        f4(hr),
        f4(best),
        (hr / best - 1.0) * 100.0
    ))
}

/// HR@10 per window of event time, one line per variant.
pub fn plot(path: &Path, r: &DatasetReport, names: &[&str]) -> Result<(), String> {
    crate::ncf::plot::font()?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let series: Vec<(&str, &Summary)> = r
        .variants
        .iter()
        .filter(|v| names.contains(&v.name.as_str()))
        .map(|v| (v.name.as_str(), &v.all))
        .collect();
    let max_x = series
        .iter()
        .flat_map(|(_, s)| s.hr_by_window.iter().map(|(w, _)| *w))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * r.window_days;
    let max_y = series
        .iter()
        .flat_map(|(_, s)| s.hr_by_window.iter().map(|(_, h)| *h))
        .fold(0.05f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: prequential HR@10 per {}-day window of event time",
                r.name, r.window_days
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("days since the first event")
        .y_desc("HR@10")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, summary)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = summary
            .hr_by_window
            .iter()
            .map(|(w, h)| (*w as f64 * r.window_days, *h))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
