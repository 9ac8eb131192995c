//! The Kafka Streams peer (benches/peers/kafka-streams) implements the seed's
//! rules with the engine's defaults. Its parity fixture, written by the
//! peer's independent Python reference, is checked here against the engine
//! itself: the constants are `EngineConfig`'s defaults, and replaying the
//! fixture's events through the engine's own `UserState::apply` gives every
//! user the strongest genres the fixture's carousels are built from.

use std::collections::HashMap;

use recstream::catalog::{Catalog, CatalogRecord};
use recstream::config::EngineConfig;
use recstream::event::{parse_interaction, EventType};
use recstream::state::{UserState, DEDUP_WINDOW};

const FIXTURE: &str = "benches/peers/kafka-streams/src/test/resources/parity.json";

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(FIXTURE).expect("the peer's parity fixture");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn the_rules_constants_are_the_engine_defaults() {
    let f = fixture();
    let rules = &f["rules"];
    let config = EngineConfig::default();
    for (name, weight) in rules["event_weights"].as_object().unwrap() {
        let kind = EventType::parse(name).unwrap_or_else(|| panic!("unknown type {name}"));
        // The full weight of each type: 5 stars, a whole progress.
        let full = match kind {
            EventType::Rate => Some(5.0),
            EventType::Progress => Some(1.0),
            _ => None,
        };
        assert_eq!(
            config.event_weights.weight(kind, full),
            weight.as_f64().unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        rules["user_half_life_hours"].as_f64().unwrap(),
        config.decay.user_half_life_hours
    );
    assert_eq!(
        rules["popularity_half_life_hours"].as_f64().unwrap(),
        config.decay.popularity_half_life_hours
    );
    assert_eq!(
        rules["genre_rows"].as_u64().unwrap() as usize,
        config.lists.genre_rows
    );
    assert_eq!(
        rules["row_size"].as_u64().unwrap() as usize,
        config.lists.row_size
    );
    assert_eq!(
        rules["dedup_window"].as_u64().unwrap() as usize,
        DEDUP_WINDOW
    );
}

#[test]
fn the_engine_finds_the_same_strongest_genres_for_every_user() {
    let f = fixture();
    let config = EngineConfig::default();
    let mut catalog = Catalog::default();
    for (id, genres) in f["catalog"].as_object().unwrap() {
        catalog
            .upsert(CatalogRecord {
                movie_id: id.parse().unwrap(),
                title: format!("m{id}"),
                genres: genres
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_string())
                    .collect(),
                year: None,
                tmdb_id: None,
                imdb_id: None,
                tags: vec![],
            })
            .unwrap();
    }
    let mut users: HashMap<String, UserState> = HashMap::new();
    for record in f["records"].as_array().unwrap() {
        let Ok(event) = parse_interaction(record["value"].as_str().unwrap().as_bytes()) else {
            continue;
        };
        let Some(movie) = catalog.get(event.movie_id) else {
            continue;
        };
        users
            .entry(event.user_id.clone())
            .or_default()
            .apply(&event, movie, &config);
    }
    let expected = f["expected"].as_object().unwrap();
    assert_eq!(users.len(), expected.len());
    for (user, outputs) in expected {
        let state = &users[user];
        assert_eq!(
            state.version,
            outputs["recommendations"]["version"].as_u64().unwrap(),
            "{user}"
        );
        let mut top: Vec<(String, f32)> = state
            .genre_weights_at(state.last_ts, &config)
            .iter()
            .filter(|g| g.weight > 0.0)
            .map(|g| (catalog.genre_name(g.genre).to_string(), g.weight))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut rows: Vec<String> = top
            .iter()
            .take(config.lists.genre_rows)
            .map(|(g, _)| format!("genre:{g}"))
            .collect();
        if rows.is_empty() {
            rows.push("popular".into());
        }
        let fixture_rows: Vec<String> = outputs["carousels"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(rows, fixture_rows, "{user}");
    }
}
