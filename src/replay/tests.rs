use super::*;

fn stream(events: usize) -> Stream {
    Stream::synthetic(events, 7)
}

fn settings() -> Settings {
    Settings {
        window_days: 1.0,
        epochs: Some(2),
        work_dir: tempfile::tempdir().unwrap().keep(),
        fold_in: FoldInConfig::default(),
        tail_from: None,
        history: Default::default(),
    }
}

fn variant(name: &str) -> VariantSpec {
    standard_variants(&EngineConfig::default(), 1.0, super::HISTORY_BLEND_NCF)
        .into_iter()
        .find(|v| v.name == name)
        .unwrap()
}

/// The anchor's definition, computed independently: an item's score is the
/// number of earlier ratings of it, ties to the lowest id, the user's own
/// items excluded; a hit is the item in the top 10.
fn popularity_hits(stream: &Stream) -> Vec<u16> {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    let mut rated: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut ranks = Vec::new();
    for e in &stream.events {
        let mine = rated.entry(e.user_id).or_default();
        let mut items: Vec<u32> = stream
            .catalog
            .ids()
            .iter()
            .copied()
            .filter(|id| !mine.contains(id))
            .collect();
        items.sort_by(|a, b| {
            let (ca, cb) = (counts.get(a).unwrap_or(&0), counts.get(b).unwrap_or(&0));
            cb.cmp(ca).then(a.cmp(b))
        });
        let rank = items.iter().take(10).position(|id| *id == e.movie_id);
        ranks.push(rank.map_or(0, |r| r as u16 + 1));
        *counts.entry(e.movie_id).or_default() += 1;
        mine.push(e.movie_id);
    }
    ranks
}

#[test]
fn the_popularity_variant_is_the_anchors_all_time_popularity() {
    let s = stream(600);
    let result = run_variant(
        &s,
        &variant("popularity"),
        &settings(),
        &mut Models::default(),
    )
    .unwrap();
    assert_eq!(result.ranks, popularity_hits(&s));
    assert!(result.all.hr > 0.0);
}

#[test]
fn no_look_ahead_future_events_never_change_earlier_lists() {
    let full = stream(600);
    let cut = full.events[200].ts_ms;
    let with = |n: usize| Stream {
        cut,
        events: full.events[..n].to_vec(),
        ..stream(0)
    };
    for name in [
        "full-blend",
        "co-watched",
        "trending",
        "learned-blend-no-model",
    ] {
        let spec = variant(name);
        let a = run_variant(&with(600), &spec, &settings(), &mut Models::default()).unwrap();
        let b = run_variant(&with(250), &spec, &settings(), &mut Models::default()).unwrap();
        assert_eq!(&a.ranks[..250], &b.ranks[..], "{name}");
    }
}

#[test]
fn replays_are_deterministic() {
    let s = stream(400);
    for name in ["full-blend", "ncf-ratings-fold-in"] {
        let spec = variant(name);
        let a = run_variant(&s, &spec, &settings(), &mut Models::default()).unwrap();
        let b = run_variant(&s, &spec, &settings(), &mut Models::default()).unwrap();
        assert_eq!(a.ranks, b.ranks, "{name}");
        assert_eq!(a.second_half, b.second_half, "{name}");
        assert_eq!(a.trainings, 1);
        assert!(a.second_half.rmse.is_some());
    }
}

#[test]
fn the_learned_blend_is_fitted_on_the_first_half_and_saved() {
    let s = stream(3000);
    let settings = settings();
    let spec = variant("learned-blend-no-model");
    let a = run_variant(&s, &spec, &settings, &mut Models::default()).unwrap();
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&settings.work_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".blend.json"))
        .collect();
    assert!(!files.is_empty(), "a fitted blend is saved");
    let first = files.iter().min().unwrap();
    let blend = crate::ranker::LearnedBlend::load(first).unwrap();
    assert!(blend.fit.cases >= 50, "{:?}", blend.fit);
    assert!(
        blend.trained_on.contains("synthetic"),
        "{}",
        blend.trained_on
    );
    // Deterministic: the same stream fits the same blend and the same lists.
    let b = run_variant(&s, &spec, &settings, &mut Models::default()).unwrap();
    assert_eq!(a.ranks, b.ranks);
    assert_eq!(
        crate::ranker::LearnedBlend::load(first).unwrap().fit,
        blend.fit
    );
}

#[test]
fn the_rating_head_predicts_every_rating_of_the_second_half() {
    let s = stream(400);
    let a = run_variant(
        &s,
        &variant("ncf-history-ratings"),
        &settings(),
        &mut Models::default(),
    )
    .unwrap();
    assert_eq!(a.trainings, 1);
    let rmse = a.second_half.rmse.unwrap();
    assert!(rmse.is_finite() && rmse < 4.0, "{rmse}");
}
