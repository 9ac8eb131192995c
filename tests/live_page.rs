//! The live page in a real browser (Debian's Chromium driven by Playwright)
//! against the engine and the real Apache Kafka broker: liking several titles of one
//! genre brings that genre's row to the top (below "Top picks"), and the liked
//! titles leave the rows, each update arriving by server-sent events. The
//! screenshot is kept as a CI artefact (`tests/browser/artifacts/`, or
//! `$RECSTREAM_ARTIFACTS`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "page-token-0123456789";
const GENRES: [&str; 4] = ["Action", "Comedy", "Drama", "Sci-Fi"];

fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("RECSTREAM_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn liking_a_genre_brings_its_row_to_the_top_in_a_real_browser() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists()
            && Path::new("/usr/bin/chromium").exists(),
        "playwright-core and Chromium are missing: run .ci/install.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &GENRES, 12);
    let port = free_port();
    let config = write_config(dir.path(), &brokers, &catalog, port, "page", false);
    enable_api(&config, TOKEN, "");
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let engine = EngineProcess::spawn(&config, dir.path().join("engine.log"));
    let log = || format!("{}\n{}", engine.log_text(), engine_progress(port));
    await_ready(port, log);

    // A crowd gives every genre popular titles; the page's user likes Comedy.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut background = Vec::new();
    for u in 0..40u32 {
        for k in 0..4u32 {
            let movie = 1 + (u * 7 + k * 13) % 48;
            let user = format!("crowd-{u}");
            background.push(json!({"key": user, "value": {
                "event_id": format!("bg-{u}-{k}"), "user_id": user, "movie_id": movie,
                "type": "play", "value": 600.0, "ts": now - 3_600_000 + (u * 4 + k) as i64 * 1000
            }}));
        }
    }
    for (i, movie) in [13, 14].iter().enumerate() {
        background.push(json!({"key": "viewer", "value": {
            "event_id": format!("viewer-{i}"), "user_id": "viewer", "movie_id": movie,
            "type": "like", "ts": now - 600_000 + i as i64 * 1000
        }}));
    }
    python_produce(&brokers, "reco.interactions.v1", &background, dir.path());
    // The viewer's Comedy row is the first genre row before the browser starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let rows = http_request(port, "GET", "/api/users/viewer/carousels", &[], b"").json();
        let first_genre = rows["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "genre")
            .map(|r| r["id"].clone());
        if first_genre == Some(json!("genre:Comedy")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "viewer not ready: {rows}\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let screenshot = artifacts_dir().join("live_page.png");
    let url = format!("http://127.0.0.1:{port}/#user=viewer&token={TOKEN}");
    let out = Command::new("node")
        .arg(browser_dir.join("live_page.test.js"))
        .args([&url, "Sci-Fi"])
        .arg(&screenshot)
        .current_dir(&browser_dir)
        .output()
        .expect("run node (installed with the machine)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\nscreenshot: {}", screenshot.display());
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}\n{}",
        log()
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["ok"], true);
    assert_eq!(result["top_taste"], "Sci-Fi", "{result}");
    assert!(screenshot.exists());
}
