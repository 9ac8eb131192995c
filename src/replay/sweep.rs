//! The sweep that picks the engine's defaults: a coordinate search over
//! half-lives, co-watch settings, list settings and blend weights, each
//! candidate replayed on every stream and judged by the mean HR@10 on the
//! validation span (from the half-way cut to the held-back tail); the tail
//! (the last 10 % of events) then shows whether the choice holds on events
//! the search never looked at.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::{
    run_variant, ModelPlan, Models, ReplayError, Settings, Stream, VariantResult, VariantSpec,
};
use crate::config::EngineConfig;
use crate::experiment::ALL_SOURCES;
use crate::ncf::model::Objective;

type Setter = fn(&mut EngineConfig, f64);

/// The searched parameters, in search order, with the values tried (the
/// second pass: around the first pass's choice, which is the engine's current
/// defaults, with the co-watch window and seeds below the first grid's edge).
/// `blend.affinity` is not searched: the replay holds ratings only, while the
/// engine's genre taste rests on explicit likes and completions; the first
/// pass preferred 0, which left a user who liked only Sci-Fi with popular
/// comedies (see SWEEP.md), so it stays at its default.
pub fn parameters() -> Vec<(&'static str, Vec<f64>, Setter)> {
    vec![
        ("blend.co_watched", vec![2.0, 4.0, 8.0], |c, v| {
            c.blend.co_watched = v
        }),
        ("co_watch.alpha", vec![0.0, 0.3], |c, v| {
            c.co_watch.alpha = v
        }),
        ("co_watch.support", vec![0.0, 3.0, 10.0], |c, v| {
            c.co_watch.support = v
        }),
        ("co_watch.window", vec![2.0, 3.0, 5.0, 10.0], |c, v| {
            c.co_watch.window = v as usize
        }),
        ("co_watch.seeds", vec![2.0, 3.0, 5.0, 10.0], |c, v| {
            c.co_watch.seeds = v as usize
        }),
        (
            "co_watch.neighbors",
            vec![50.0, 100.0, 200.0, 400.0],
            |c, v| c.co_watch.neighbors = v as usize,
        ),
        ("blend.popularity", vec![0.2, 0.4, 0.8], |c, v| {
            c.blend.popularity = v
        }),
        (
            "decay.popularity_half_life_hours",
            vec![720.0, 8760.0, f64::INFINITY],
            |c, v| c.decay.popularity_half_life_hours = v,
        ),
        ("blend.trending", vec![0.0, 0.15, 0.3], |c, v| {
            c.blend.trending = v
        }),
        ("blend.similarity", vec![0.0, 0.25, 0.5], |c, v| {
            c.blend.similarity = v
        }),
        (
            "decay.user_half_life_hours",
            vec![168.0, 720.0, 8760.0],
            |c, v| c.decay.user_half_life_hours = v,
        ),
        ("lists.max_genre_share", vec![0.7, 1.0], |c, v| {
            c.lists.max_genre_share = v
        }),
    ]
}

/// The engine's defaults before the first sweep (kept to show on the
/// held-back tail what both passes together gained).
pub fn pre_sweep_defaults() -> EngineConfig {
    let mut c = EngineConfig::default();
    c.blend.affinity = 0.40;
    c.blend.similarity = 0.25;
    c.blend.popularity = 0.20;
    c.blend.trending = 0.15;
    c.blend.co_watched = 0.30;
    c.co_watch.alpha = 0.3;
    c.co_watch.window = 10;
    c.co_watch.seeds = 10;
    c.decay.popularity_half_life_hours = 168.0;
    c.decay.user_half_life_hours = 720.0;
    c.lists.max_genre_share = 0.5;
    c
}

/// One evaluated setting.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub parameter: String,
    pub value: f64,
    /// Validation HR@10 per stream, in stream order.
    pub hr: Vec<f64>,
    pub mean: f64,
    pub chosen: bool,
}

/// A config measured on both spans, per stream.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub label: String,
    pub validation: Vec<f64>,
    pub tail: Vec<f64>,
}

pub struct Outcome {
    pub trials: Vec<Trial>,
    pub chosen: EngineConfig,
    /// The pre-sweep defaults, this pass's start and its choice.
    pub checks: Vec<Check>,
    pub ncf_weights: Vec<Trial>,
}

fn spec(config: &EngineConfig, model: ModelPlan) -> VariantSpec {
    VariantSpec {
        name: "sweep".into(),
        config: config.clone(),
        sources: ALL_SOURCES,
        model,
        objective: Objective::Implicit,
        history: false,
        learned_blend: None,
    }
}

/// Replays every stream with one config (one thread per stream).
fn evaluate(
    streams: &[(Stream, Settings)],
    config: &EngineConfig,
    model: ModelPlan,
    models: &mut [Models],
) -> Result<Vec<VariantResult>, ReplayError> {
    let spec = spec(config, model);
    std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .iter()
            .zip(models.iter_mut())
            .map(|((stream, settings), m)| {
                let spec = &spec;
                s.spawn(move || run_variant(stream, spec, settings, m))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sweep thread panicked"))
            .collect()
    })
}

fn validation_hr(results: &[VariantResult]) -> Vec<f64> {
    results
        .iter()
        .map(|r| r.validation.as_ref().map_or(0.0, |v| v.hr))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Coordinate search from `start`; then the NCF blend weight on the chosen
/// config with the model trained at the cut and folded in.
pub fn run(
    streams: &[(Stream, Settings)],
    start: &EngineConfig,
    ncf_weights: &[f64],
    progress: impl Fn(&str),
) -> Result<Outcome, ReplayError> {
    let mut models: Vec<Models> = streams.iter().map(|_| Models::default()).collect();
    let baseline = evaluate(streams, start, ModelPlan::None, &mut models)?;
    let mut best = start.clone();
    let mut best_per_stream = validation_hr(&baseline);
    let mut best_hr = mean(&best_per_stream);
    let mut trials = Vec::new();
    for (name, values, set) in parameters() {
        let mut rows: Vec<Trial> = Vec::new();
        let mut pick: Option<(f64, f64, Vec<f64>)> = None;
        for &v in &values {
            let mut c = best.clone();
            set(&mut c, v);
            if format!("{c:?}") == format!("{best:?}") {
                // The current value: already measured.
                rows.push(Trial {
                    parameter: name.into(),
                    value: v,
                    hr: best_per_stream.clone(),
                    mean: best_hr,
                    chosen: false,
                });
                continue;
            }
            let hr = validation_hr(&evaluate(streams, &c, ModelPlan::None, &mut models)?);
            let m = mean(&hr);
            progress(&format!(
                "sweep {name} = {v}: mean validation HR@10 {m:.4} {hr:?}"
            ));
            if m > best_hr + 1e-9 && pick.as_ref().is_none_or(|(_, p, _)| m > *p) {
                pick = Some((v, m, hr.clone()));
            }
            rows.push(Trial {
                parameter: name.into(),
                value: v,
                hr,
                mean: m,
                chosen: false,
            });
        }
        match pick {
            Some((v, m, hr)) => {
                set(&mut best, v);
                best_hr = m;
                best_per_stream = hr;
                if let Some(r) = rows.iter_mut().find(|r| r.value == v) {
                    r.chosen = true;
                }
            }
            // The current value stays.
            None => {
                let mut current = best.clone();
                for r in rows.iter_mut() {
                    set(&mut current, r.value);
                    if format!("{current:?}") == format!("{best:?}") {
                        r.chosen = true;
                    }
                }
            }
        }
        trials.extend(rows);
    }
    // The NCF weight, on the chosen config with the model folded in
    // (weight 0 is the chosen config without a model).
    let without_model = evaluate(streams, &best, ModelPlan::None, &mut models)?;
    let mut ncf_trials = Vec::new();
    let mut best_ncf: Option<(f64, f64, Vec<VariantResult>)> = None;
    for &w in ncf_weights {
        let mut c = best.clone();
        c.blend.ncf = w;
        let results = if w == 0.0 {
            without_model.clone()
        } else {
            evaluate(streams, &c, ModelPlan::FoldIn, &mut models)?
        };
        let hr = validation_hr(&results);
        let m = mean(&hr);
        progress(&format!(
            "sweep blend.ncf = {w}: mean validation HR@10 {m:.4} {hr:?}"
        ));
        ncf_trials.push(Trial {
            parameter: "blend.ncf".into(),
            value: w,
            hr,
            mean: m,
            chosen: false,
        });
        if best_ncf.as_ref().is_none_or(|(_, b, _)| m > *b) {
            best_ncf = Some((w, m, results));
        }
    }
    let chosen_results = match best_ncf {
        Some((w, _, results)) => {
            best.blend.ncf = w;
            if let Some(t) = ncf_trials.iter_mut().find(|t| t.value == w) {
                t.chosen = true;
            }
            results
        }
        None => without_model,
    };
    let pre_sweep = evaluate(streams, &pre_sweep_defaults(), ModelPlan::None, &mut models)?;
    let check = |label: &str, results: &[VariantResult]| Check {
        label: label.into(),
        validation: validation_hr(results),
        tail: results
            .iter()
            .map(|r| r.tail.as_ref().map_or(0.0, |s| s.hr))
            .collect(),
    };
    Ok(Outcome {
        trials,
        chosen: best,
        checks: vec![
            check("defaults before the first sweep", &pre_sweep),
            check("this pass's start (the first pass's choice)", &baseline),
            check("this pass's choice", &chosen_results),
        ],
        ncf_weights: ncf_trials,
    })
}

/// The sweep's markdown: every trial, the choice and its check on the tail.
pub fn markdown(outcome: &Outcome, names: &[String], start: &EngineConfig) -> String {
    let mut s = String::from("## Sweep of the defaults\n\n");
    let _ = writeln!(
        s,
        "Reproduce: `cargo run --release -- replay-eval --sweep`. Coordinate search in the order below, \
         starting from the engine's defaults at the time; each setting replays both streams in full \
         (every source, no model) and is judged by the mean HR@10 over the **validation span**: from the \
         half-way cut of event time up to the last 10 % of events. A value is kept only if it beats the \
         best so far. The NCF weight is searched last, on the chosen config with the model trained at \
         the cut and folded in from every event; weight 0 is the chosen config without a model.\n"
    );
    let mut header = String::from("| parameter | value |");
    let mut rule = String::from("|---|---:|");
    for n in names {
        header.push_str(&format!(" {n} |"));
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{header} mean | kept |\n{rule}---:|:---:|");
    for t in outcome.trials.iter().chain(&outcome.ncf_weights) {
        let mut row = format!("| {} | {} |", t.parameter, t.value);
        for h in &t.hr {
            row.push_str(&format!(" {h:.4} |"));
        }
        let _ = writeln!(
            s,
            "{row} {:.4} | {} |",
            t.mean,
            if t.chosen { "✔" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        "\n### Held-back tail (the last 10 % of events, never looked at by the search)\n"
    );
    let mut header = String::from("| config |");
    let mut rule = String::from("|---|");
    for n in names {
        header.push_str(&format!(" {n} validation | {n} tail |"));
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for c in &outcome.checks {
        let mut row = format!("| {} |", c.label);
        for (v, t) in c.validation.iter().zip(&c.tail) {
            row.push_str(&format!(" {v:.4} | {t:.4} |"));
        }
        let _ = writeln!(s, "{row}");
    }
    let c = &outcome.chosen;
    let _ = writeln!(
        s,
        "\nChosen (now the engine's defaults): blend affinity {}, similarity {}, popularity {}, trending {}, co_watched {}, ncf {}; \
         co_watch alpha {}, window {}, seeds {}, neighbors {}; popularity half-life {} h, user half-life {} h; max_genre_share {}.\n\n\
         Start of this pass: blend {:?}; co_watch {:?}; decay {:?}; max_genre_share {}.\n",
        c.blend.affinity, c.blend.similarity, c.blend.popularity, c.blend.trending, c.blend.co_watched, c.blend.ncf,
        c.co_watch.alpha, c.co_watch.window, c.co_watch.seeds, c.co_watch.neighbors,
        c.decay.popularity_half_life_hours, c.decay.user_half_life_hours, c.lists.max_genre_share,
        start.blend, start.co_watch, start.decay, start.lists.max_genre_share,
    );
    s
}

/// Mean validation HR@10 per value, one panel line per parameter.
pub fn plot(path: &Path, outcome: &Outcome) -> Result<(), String> {
    crate::ncf::plot::font()?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut groups: Vec<(String, Vec<&Trial>)> = Vec::new();
    for t in outcome.trials.iter().chain(&outcome.ncf_weights) {
        match groups.iter_mut().find(|(n, _)| *n == t.parameter) {
            Some((_, v)) => v.push(t),
            None => groups.push((t.parameter.clone(), vec![t])),
        }
    }
    let all: Vec<f64> = groups
        .iter()
        .flat_map(|(_, v)| v.iter().map(|t| t.mean))
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Sweep: mean validation HR@10 per value tried (value index on x; ● chosen)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .right_y_label_area_size(0)
        .build_cartesian_2d(-0.2f64..5.5f64, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("index of the value in the parameter's list")
        .y_desc("mean validation HR@10")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, trials)) in groups.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = trials
            .iter()
            .enumerate()
            .map(|(k, t)| (k as f64, t.mean))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                trials
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.chosen)
                    .map(|(k, t)| Circle::new((k as f64, t.mean), 5, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
